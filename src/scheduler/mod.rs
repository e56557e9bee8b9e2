//! The scheduler: binds each pending pod to a node, on the Raft leader only.
//!
//! Two parts. [`Warm`], on every replica from start to shutdown, owns the [`cache::Cache`]
//! of nodes and what is bound to them, kept current from the informers change by change,
//! and the pods a scheduler has bound but not yet seen bound ("assumed", so the next batch
//! does not hand their room to someone else): a new leader's scheduler starts on it at once
//! instead of rebuilding it from every pod. [`Scheduler`], one per term on the leader, owns
//! the queue of pending pods and the set of pods waiting for the cluster to change; when
//! the term ends, its assumed pods count as the informer has them again. Each round takes up to
//! [`BATCH`] pending pods and decides pod by pod with [`decide::schedule_from`] (a pure
//! function that, on large clusters, scores only the first feasible nodes it finds from a
//! rotating start, as kube-scheduler's `percentageOfNodesToScore` does), assuming each
//! placement into the cache before the next decision; then it binds them concurrently. A bind is a compare-and-swap
//! that succeeds only while the pod is unbound, fenced to the leader's term.
//!
//! A pod that fits nowhere gets `PodScheduled=False` (reason `Unschedulable`, with
//! kube-scheduler's "0/N nodes are available: ..." message) and a `FailedScheduling` event,
//! and waits: it is tried again when a node or a pod changes, and otherwise after a backoff
//! (1 s doubling to 10 s).

pub mod cache;
pub mod decide;

use crate::api::meta::Ptr;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::api::{meta, Call};
use crate::controllers::informer::Informer;
use crate::controllers::queue::Queue;
use crate::controllers::{owner, pod, Ctx};
use decide::Decision;

/// Most pods decided in one round.
pub const BATCH: usize = 2048;
/// Most binds in flight.
pub const BINDS_IN_FLIGHT: usize = 1024;
/// Most pod shapes remembered per round as fitting nowhere (each later pod is compared
/// with every one).
const FAILED_SHAPES: usize = 16;
/// The field manager the scheduler writes as.
pub const MANAGER: &str = "default-scheduler";

/// Pending pod key → (the resourceVersion its facts were derived from, the facts).
type Facts = HashMap<String, (String, Arc<decide::PodInfo>)>;

/// The scheduler's view of the cluster, kept on every replica by lasting subscriptions to
/// the pod and node informers. Lock order: `cache`, then `assumed`.
pub struct Warm {
    /// Nodes and what is bound to them.
    cache: Arc<Mutex<cache::Cache>>,
    /// Bound by this term's scheduler, not yet seen bound (empty between terms).
    assumed: Arc<Mutex<HashSet<String>>>,
}

impl Warm {
    /// Subscribes to `pods` and `nodes` for the replica's lifetime.
    pub fn new(pods: &Informer, nodes: &Informer) -> Arc<Warm> {
        let warm = Arc::new(Warm {
            cache: Arc::default(),
            assumed: Arc::default(),
        });
        let (cache, assumed) = (warm.cache.clone(), warm.assumed.clone());
        pods.subscribe_lasting(move |c| {
            let mut cache = cache.lock().expect("not poisoned");
            let mut assumed = assumed.lock().expect("not poisoned");
            // An assumed pod stays counted where it was assumed until it is seen bound or
            // gone.
            let pending = c
                .new
                .is_some_and(|n| pod::node(n).is_none() && pod::is_active(n));
            if !(pending && assumed.contains(c.key)) {
                cache.pod_changed(c.key, c.new.map(|v| &**v));
            }
            if !pending {
                assumed.remove(c.key);
            }
        });
        let cache = warm.cache.clone();
        nodes.subscribe_lasting(move |c| {
            let name = owner::name(c.new.or(c.old).expect("a change has an object"));
            cache
                .lock()
                .expect("not poisoned")
                .node_changed(name, c.new.map(|v| &**v));
        });
        warm
    }

    /// Ends a term: the pods its scheduler assumed bound but has not seen bound count as
    /// `pods` has them (its binds in flight were cancelled or will be seen when they land).
    pub fn end_term(&self, pods: &Informer) {
        let mut cache = self.cache.lock().expect("not poisoned");
        let mut assumed = self.assumed.lock().expect("not poisoned");
        for key in assumed.drain() {
            cache.remove(&key);
            cache.pod_changed(&key, pods.get(&key).as_deref());
        }
    }
}

/// The scheduler of one term.
pub struct Scheduler {
    queue: Arc<Queue>,
    /// Pods that fit nowhere, waiting for a change: key → failures since the last change.
    waiting: Arc<Mutex<HashMap<String, u32>>>,
    /// The replica's cache of nodes and what is bound to them, and the pods this scheduler
    /// bound but has not seen bound.
    warm: Arc<Warm>,
    /// What each pending pod asks of a node, derived once per version of the pod (a pod
    /// that fits nowhere is decided again on every cluster change: 4–5 times per pod while
    /// 5,000 nodes turn Ready): key → (resourceVersion, facts). Only rounds read and fill
    /// it; an entry goes when its pod is bound or deleted. A round locks the cache, then
    /// this, then the assumed set.
    facts: Arc<Mutex<Facts>>,
    /// Where the next search for a node starts (see [`decide::schedule_from`]).
    next_start: std::sync::atomic::AtomicUsize,
    /// Cluster changes seen (each flushes the waiting pods). A pod found unschedulable on a
    /// snapshot older than the latest change is tried again at once, not after a backoff:
    /// the change it would wait for has already happened.
    changes: Arc<std::sync::atomic::AtomicU64>,
}

/// What pending pod `p` (at `key`) asks of a node: from `facts` if derived for this version
/// of it, else derived now and kept.
fn pod_facts(facts: &mut Facts, key: &str, p: &Value) -> Arc<decide::PodInfo> {
    let version = p
        .ptr("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    // Without a version there is nothing to tell a changed pod by: derived every time, and
    // not kept (an entry that could never be served).
    if version.is_empty() {
        return Arc::new(decide::pod_info(p));
    }
    if let Some((v, info)) = facts.get(key) {
        if v == version {
            return info.clone();
        }
    }
    let info = Arc::new(decide::pod_info(p));
    facts.insert(key.to_string(), (version.to_string(), info.clone()));
    info
}

/// True if the default scheduler should place this pod.
fn wants_scheduling(p: &Value) -> bool {
    pod::node(p).is_none()
        && pod::is_active(p)
        && matches!(
            p.ptr("/spec/schedulerName").and_then(Value::as_str),
            None | Some("default-scheduler")
        )
}

impl Scheduler {
    /// Wires the scheduler to the pod and node informers.
    pub fn new(ctx: &Ctx) -> Scheduler {
        let queue = Arc::new(Queue::default());
        let waiting: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let facts: Arc<Mutex<Facts>> = Arc::default();
        let changes: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let flush = {
            let (q, w, changes) = (queue.clone(), waiting.clone(), changes.clone());
            // Every waiting pod goes back to the queue, and waits again only if it fails
            // again: so a burst of changes (5,000 nodes turning Ready) costs one pass, not
            // one per change.
            move || {
                changes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let keys = std::mem::take(&mut *w.lock().expect("not poisoned"));
                for k in keys.into_keys() {
                    q.add(&k);
                }
            }
        };
        {
            // The cache and the assumed set are kept by the replica's lasting subscriber,
            // which hears of each change first.
            let (q, w, flush, facts) =
                (queue.clone(), waiting.clone(), flush.clone(), facts.clone());
            ctx.pods.subscribe(move |c| {
                // The pods pending at the term's start are queued by `run`, from the cache;
                // nothing is waiting or derived yet.
                if c.replay {
                    return;
                }
                match c.new {
                    // A pending pod is queued when it appears or its spec or labels change;
                    // not for a status write (its own `PodScheduled=False` would otherwise
                    // queue it again at once: a loop of decisions and writes).
                    Some(new) if wants_scheduling(new) => {
                        let same = c.old.is_some_and(|o| {
                            wants_scheduling(o)
                                && o.get("spec") == new.get("spec")
                                && o.ptr("/metadata/labels") == new.ptr("/metadata/labels")
                        });
                        if !same {
                            q.add(c.key)
                        }
                    }
                    Some(new) => {
                        w.lock().expect("not poisoned").remove(c.key);
                        facts.lock().expect("not poisoned").remove(c.key);
                        // A pod that finished or started terminating frees room.
                        if c.old.is_some_and(|o| pod::is_active(o)) && !pod::is_active(new) {
                            flush();
                        }
                    }
                    None => {
                        w.lock().expect("not poisoned").remove(c.key);
                        facts.lock().expect("not poisoned").remove(c.key);
                        if c.old.and_then(|o| pod::node(o)).is_some() {
                            flush();
                        }
                    }
                }
            });
        }
        ctx.nodes.subscribe(move |c| {
            // Nothing waits yet while the nodes are replayed at the term's start.
            if c.replay {
                return;
            }
            let relevant = |v: Option<&Arc<Value>>| {
                v.map(|n| {
                    (
                        n.ptr("/spec").cloned(),
                        n.ptr("/status/allocatable").cloned(),
                        n.ptr("/metadata/labels").cloned(),
                        decide::node_info(n).ready,
                    )
                })
            };
            if relevant(c.old) != relevant(c.new) {
                flush();
            }
        });
        Scheduler {
            queue,
            waiting,
            warm: ctx.scheduling.clone(),
            facts,
            next_start: Default::default(),
            changes,
        }
    }

    /// Schedules until the term ends.
    pub async fn run(self: Arc<Self>, ctx: Arc<Ctx>) {
        {
            let (q, stop) = (self.queue.clone(), ctx.stop.clone());
            tokio::spawn(async move {
                stop.cancelled().await;
                q.shut_down();
            });
        }
        self.queue
            .count_adds(ctx.metrics.adds.with_label_values(&["scheduler"]));
        // Pods pending from before this term.
        for p in ctx.pods.filter(wants_scheduling) {
            self.queue.add(
                &ctx.pods
                    .resource()
                    .key(owner::namespace(&p), owner::name(&p)),
            );
        }
        self.set_pending(&ctx, 0);
        // How soon a new leader's scheduler gets to work (logged once per term).
        let begun = std::time::Instant::now();
        let mut first_round = true;
        while let Some(first) = self.queue.next().await {
            let mut keys = vec![first];
            while keys.len() < BATCH {
                match self.queue.try_next() {
                    Some(k) => keys.push(k),
                    None => break,
                }
            }
            self.set_pending(&ctx, keys.len());
            let started = begun.elapsed();
            self.round(&ctx, &keys).await;
            if std::mem::take(&mut first_round) {
                tracing::info!(
                    term = ctx.term,
                    pods = keys.len(),
                    started_s = started.as_secs_f64(),
                    done_s = begun.elapsed().as_secs_f64(),
                    "scheduler: first round done"
                );
            }
            for k in &keys {
                self.queue.done(k);
            }
            self.set_pending(&ctx, 0);
            // The queue answers at once while it has work: let the runtime run the rest.
            tokio::task::yield_now().await;
        }
        // The term is over: another replica's scheduler reports from now on.
        for q in ["active", "unschedulable"] {
            ctx.metrics.pending.with_label_values(&[q]).set(0);
        }
    }

    /// Reports the pods waiting: `deciding` taken for this round plus the queue, and the
    /// unschedulable ones waiting for a change.
    fn set_pending(&self, ctx: &Ctx, deciding: usize) {
        let waiting = self.waiting.lock().expect("not poisoned").len();
        // Unschedulable pods sit in the queue's delayed set too; count them once.
        let active = (deciding + self.queue.len()).saturating_sub(waiting);
        let m = &ctx.metrics.pending;
        m.with_label_values(&["active"]).set(active as i64);
        m.with_label_values(&["unschedulable"]).set(waiting as i64);
    }

    async fn round(&self, ctx: &Ctx, keys: &[String]) {
        let seen_changes = self.changes.load(std::sync::atomic::Ordering::SeqCst);
        let mut binds: Vec<(String, Arc<Value>, String)> = Vec::new();
        let mut unschedulable: Vec<(String, Arc<Value>, String)> = Vec::new();
        {
            // Decide against the cache, assuming each placement into it so the next
            // decision sees it (no await while it is held).
            let mut cache = self.warm.cache.lock().expect("not poisoned");
            let mut facts = self.facts.lock().expect("not poisoned");
            let want = decide::feasible_to_find(cache.len());
            let mut start = self.next_start.load(std::sync::atomic::Ordering::Relaxed);
            // Shapes of pod found to fit nowhere this round, with the reasons.
            let mut failed: Vec<(Arc<decide::PodInfo>, String)> = Vec::new();
            for key in keys {
                let Some(p) = ctx.pods.get(key) else { continue };
                if !wants_scheduling(&p)
                    || self
                        .warm
                        .assumed
                        .lock()
                        .expect("not poisoned")
                        .contains(key)
                {
                    continue;
                }
                let info = pod_facts(&mut facts, key, &p);
                // A pod shaped like one that already fit nowhere this round fits nowhere
                // either (placements only take room): no second look at every node.
                if let Some((_, message)) = failed
                    .iter()
                    .find(|(f, _)| Arc::ptr_eq(f, &info) || f.same_feasibility(&info))
                {
                    unschedulable.push((key.clone(), p, message.clone()));
                    continue;
                }
                let (decision, next) = decide::schedule_from(cache.nodes(), &info, start, want);
                start = next;
                match decision {
                    Decision::Bind(i) => {
                        let node = cache.nodes()[i].name.clone();
                        facts.remove(key);
                        cache.assume(key, i, info);
                        self.warm
                            .assumed
                            .lock()
                            .expect("not poisoned")
                            .insert(key.clone());
                        binds.push((key.clone(), p, node));
                    }
                    Decision::Unschedulable(message) => {
                        if failed.len() < FAILED_SHAPES {
                            failed.push((info, message.clone()));
                        }
                        unschedulable.push((key.clone(), p, message))
                    }
                }
            }
            self.next_start
                .store(start, std::sync::atomic::Ordering::Relaxed);
        }
        let pod_res = ctx.pods.resource();
        type Bound = (
            String,
            Arc<Value>,
            String,
            Result<i64, crate::api::status::KubeError>,
        );
        let results: Vec<Bound> =
            futures::stream::iter(binds.into_iter().map(|(key, p, node)| async move {
                let call = Call::internal(
                    pod_res,
                    owner::namespace(&p),
                    Some(owner::name(&p)),
                    None,
                    MANAGER,
                );
                // A pod without a readable resourceVersion cannot match revision 0: the bind
                // then reads the pod and binds its current state.
                let revision = owner::resource_version(&p).parse().unwrap_or(0);
                let r = ctx.api.bind_seen(&call, &node, &p, revision).await;
                (key, p, node, r)
            }))
            .buffer_unordered(BINDS_IN_FLIGHT)
            .collect()
            .await;
        for (key, p, node, r) in results {
            match r {
                Ok(revision) => {
                    ctx.metrics.scheduled.with_label_values(&["bound"]).inc();
                    let created = owner::created_secs(&p);
                    if created > 0 {
                        ctx.metrics
                            .schedule_seconds
                            .observe(meta::now_secs().saturating_sub(created) as f64);
                    }
                    self.waiting.lock().expect("not poisoned").remove(&key);
                    self.queue.forget(&key);
                    ctx.events.normal_at(
                        &p,
                        revision,
                        "Scheduled",
                        &format!(
                            "Successfully assigned {}/{} to {node}",
                            owner::namespace(&p).unwrap_or(""),
                            owner::name(&p)
                        ),
                    );
                }
                Err(e) => {
                    // Count the pod as the informer last saw it, not as assumed.
                    {
                        let mut cache = self.warm.cache.lock().expect("not poisoned");
                        self.warm.assumed.lock().expect("not poisoned").remove(&key);
                        let seen = ctx.pods.get(&key);
                        cache.remove(&key);
                        cache.pod_changed(&key, seen.as_deref());
                    }
                    if e.code == 409 {
                        ctx.metrics.binding_conflicts.inc();
                    }
                    if e.code == 404 || (e.code == 409 && e.message.contains("already assigned")) {
                        continue;
                    }
                    ctx.metrics.scheduled.with_label_values(&["error"]).inc();
                    tracing::debug!(key, node, %e, "bind failed; will retry");
                    self.queue.retry(&key);
                }
            }
        }
        // Checked with the waiting set locked: a change counted before this sees them
        // queued again at once; one counted after finds them waiting (the flush takes the
        // same lock). Nothing falls between the two into a long backoff.
        let failures: Vec<u32> = {
            let mut w = self.waiting.lock().expect("not poisoned");
            if self.changes.load(std::sync::atomic::Ordering::SeqCst) != seen_changes {
                drop(w);
                for (key, _, _) in unschedulable {
                    self.queue.add(&key);
                }
                return;
            }
            unschedulable
                .iter()
                .map(|(key, _, _)| {
                    let n = w.entry(key.clone()).or_insert(0);
                    *n += 1;
                    *n
                })
                .collect()
        };
        futures::stream::iter(unschedulable.into_iter().zip(failures).map(
            |((key, p, message), failures)| async move {
                self.unschedulable(ctx, &key, &p, &message, failures).await
            },
        ))
        .buffer_unordered(BINDS_IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    }

    /// Records that `p` fits nowhere (its `failures`-th time since the last change): a
    /// backoff, the condition and an event.
    async fn unschedulable(&self, ctx: &Ctx, key: &str, p: &Value, message: &str, failures: u32) {
        ctx.metrics
            .scheduled
            .with_label_values(&["unschedulable"])
            .inc();
        // Back off: 1 s doubling to 10 s (a cluster change retries sooner).
        let delay = Duration::from_secs(1u64 << (failures - 1).min(3)).min(Duration::from_secs(10));
        self.queue.add_after(key, delay);
        let current = p
            .ptr("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some("PodScheduled"))
            });
        let same = current.is_some_and(|c| {
            c.get("status").and_then(Value::as_str) == Some("False")
                && c.get("message").and_then(Value::as_str) == Some(message)
        });
        if same {
            return;
        }
        let mut next = p.clone();
        let mut conds: Vec<Value> = p
            .ptr("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        conds.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
        conds.push(
            json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                          "message": message, "lastProbeTime": null,
                          "lastTransitionTime": meta::rfc3339(meta::now_secs())}),
        );
        next["status"]["conditions"] = json!(conds);
        let call = Call::internal(
            ctx.pods.resource(),
            owner::namespace(p),
            Some(owner::name(p)),
            Some("status"),
            MANAGER,
        );
        if let Err(e) = ctx.api.update_value(&call, next).await {
            tracing::debug!(key, %e, "could not record PodScheduled=False");
        }
        ctx.events.warning(p, "FailedScheduling", message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources;
    use flotilla_store as store;

    fn event(key: String, rev: i64, obj: Option<&Value>) -> store::Event {
        store::Event {
            kind: if obj.is_some() {
                store::EventKind::Put
            } else {
                store::EventKind::Delete
            },
            kv: store::KeyValue {
                key: key.into_bytes(),
                create_revision: 1,
                mod_revision: rev,
                version: 1,
                value: obj
                    .map(|o| serde_json::to_vec(o).unwrap())
                    .unwrap_or_default(),
            },
            prev_kv: None,
        }
    }

    #[test]
    fn the_cache_stays_warm_between_terms_and_a_term_leaves_no_assumed_pods() {
        let (pr, nr) = (
            resources::find("", "v1", "pods").unwrap(),
            resources::find("", "v1", "nodes").unwrap(),
        );
        let (pods, nodes) = (Informer::new(pr), Informer::new(nr));
        let warm = Warm::new(&pods, &nodes);
        let node = json!({"metadata": {"name": "a"},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "10"},
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        let pod = |name: &str, node: Option<&str>| {
            let mut p = json!({"metadata": {"name": name, "namespace": "d"},
                "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]},
                "status": {"phase": "Pending"}});
            if let Some(n) = node {
                p["spec"]["nodeName"] = json!(n);
            }
            p
        };
        let cpu = |w: &Warm| w.cache.lock().unwrap().nodes()[0].requested.cpu;
        nodes.apply_event(&event(nr.key(None, "a"), 2, Some(&node)));
        let (k1, k2) = (pr.key(Some("d"), "p1"), pr.key(Some("d"), "p2"));
        pods.apply_event(&event(k1.clone(), 3, Some(&pod("p1", Some("a")))));
        assert_eq!(cpu(&warm), 1000, "a bound pod counts without any term");
        // A term's scheduler assumes p2 onto a; p2 is still pending in the informer.
        pods.apply_event(&event(k2.clone(), 4, Some(&pod("p2", None))));
        {
            let mut cache = warm.cache.lock().unwrap();
            cache.assume(&k2, 0, Arc::new(decide::pod_info(&pod("p2", None))));
            warm.assumed.lock().unwrap().insert(k2.clone());
        }
        pods.apply_event(&event(k2.clone(), 5, Some(&pod("p2", None))));
        assert_eq!(cpu(&warm), 2000, "an assumed pod counts until seen bound");
        // The term ends: its subscribers go, the cache keeps following the informers.
        pods.unsubscribe_all();
        nodes.unsubscribe_all();
        pods.apply_event(&event(k1.clone(), 6, None));
        assert_eq!(cpu(&warm), 1000);
        // ... and the pod assumed but never seen bound no longer counts.
        warm.end_term(&pods);
        assert_eq!(cpu(&warm), 0);
        assert!(warm.assumed.lock().unwrap().is_empty());
        // A pod seen bound clears its assumption by itself.
        warm.assumed.lock().unwrap().insert(k2.clone());
        pods.apply_event(&event(k2.clone(), 7, Some(&pod("p2", Some("a")))));
        assert!(warm.assumed.lock().unwrap().is_empty());
        assert_eq!(cpu(&warm), 1000);
    }

    #[test]
    fn a_pods_facts_are_derived_once_per_version() {
        let pod = |rv: &str, cpu: &str| {
            json!({"metadata": {"name": "p", "namespace": "d", "resourceVersion": rv},
                   "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}})
        };
        let mut facts = Facts::new();
        let first = pod_facts(&mut facts, "k", &pod("5", "1"));
        assert_eq!(first.requests.cpu, 1000);
        // The same version again: the same facts, not derived anew.
        assert!(Arc::ptr_eq(
            &first,
            &pod_facts(&mut facts, "k", &pod("5", "1"))
        ));
        // A new version is derived again, and replaces the old entry.
        let second = pod_facts(&mut facts, "k", &pod("6", "2"));
        assert_eq!(second.requests.cpu, 2000);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(facts.len(), 1);
        // A pod without a resourceVersion is never served from the memo.
        let a = pod_facts(&mut facts, "j", &pod("", "1"));
        assert!(!Arc::ptr_eq(&a, &pod_facts(&mut facts, "j", &pod("", "1"))));
        assert_eq!(facts.len(), 1, "nothing kept for it");
    }
}
