//! The garbage collector: ownerReferences and cascading deletion.
//!
//! Two parts. [`Graph`], on every replica from start to shutdown, owns the index from an
//! owner's uid to its dependents and the uids of the objects present, kept from the
//! informers of pods, ReplicaSets, Deployments and Jobs (a new leader's collector starts on
//! it instead of rebuilding it from every object). [`Collector`], one per term on the
//! leader, owns the queue of objects to check. A new term queues, of what is already
//! there, only what it may have work for (as kube-controller-manager's graph builder
//! does): the dependents of owners not present ([`Graph::dangling`]) and the owners being
//! deleted (their dependents, their finalizers); not every one of 150,000 pods whose owner
//! is plainly there. Rules, as Kubernetes':
//! - a dependent none of whose owners exist any more is deleted (Background cascade);
//!   references to owners that are gone are dropped while another owner remains;
//! - an owner being deleted with the `foregroundDeletion` finalizer has its dependents
//!   deleted (each in the foreground too, so grandchildren go first), and loses the finalizer
//!   once none is left;
//! - an owner being deleted with the `orphan` finalizer has its references removed from its
//!   dependents, then loses the finalizer.
//!
//! "The owner does not exist" is decided on the leader's own store (not a cache that may
//! lag): the owner was written before any dependent naming it, so the leader has applied it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::informer::{Change, Informer};
use super::queue::Queue;
use super::replicaset::ignore_conflict;
use super::{owner, Ctx};
use crate::api::objects::Consistency;
use crate::api::resources::{self, Resource};
use crate::api::status::KubeError;
use crate::api::Call;

/// The field manager the collector writes as.
pub const MANAGER: &str = "generic-garbage-collector";

/// Queue keys for owners (their finalizers) are prefixed so they never clash with
/// dependents' keys.
const OWNER: &str = "owner:";

/// The informers of every kind that can be an owner or a dependent.
fn watched(ctx: &Ctx) -> [&Arc<Informer>; 4] {
    [&ctx.pods, &ctx.replicasets, &ctx.deployments, &ctx.jobs]
}

/// Owner uid → its dependents' store keys, and the uids present, kept on every replica by
/// lasting subscriptions to the informers of every kind that can be an owner or a dependent.
#[derive(Default)]
pub struct Graph {
    inner: Mutex<GraphInner>,
}

#[derive(Default)]
struct GraphInner {
    dependents: HashMap<String, HashSet<String>>,
    /// The uid of every object of the informers followed.
    present: HashSet<String>,
}

impl Graph {
    /// Subscribes to `informers` for the replica's lifetime (before they run: it hears of
    /// every object).
    pub fn new(informers: &[&Arc<Informer>]) -> Arc<Graph> {
        let graph = Arc::new(Graph::default());
        for inf in informers {
            let g = graph.clone();
            inf.subscribe_lasting(move |c| g.changed(c));
        }
        graph
    }

    fn changed(&self, c: &Change<'_>) {
        // Most changes (a pod's status) touch neither the uid nor the owners: nothing to do,
        // on every replica, for every such change.
        if let (Some(old), Some(new)) = (c.old, c.new) {
            if owner::uid(old) == owner::uid(new)
                && owner::owner_refs(old) == owner::owner_refs(new)
            {
                return;
            }
        }
        let mut g = self.inner.lock().expect("not poisoned");
        let GraphInner {
            dependents: d,
            present,
        } = &mut *g;
        if let Some(old) = c.old {
            present.remove(owner::uid(old));
            for r in owner::owner_refs(old) {
                if let Some(u) = r.get("uid").and_then(Value::as_str) {
                    if let Some(set) = d.get_mut(u) {
                        set.remove(c.key);
                        if set.is_empty() {
                            d.remove(u);
                        }
                    }
                }
            }
        }
        if let Some(new) = c.new {
            present.insert(owner::uid(new).to_string());
            for r in owner::owner_refs(new) {
                if let Some(u) = r.get("uid").and_then(Value::as_str) {
                    d.entry(u.to_string())
                        .or_default()
                        .insert(c.key.to_string());
                }
            }
        }
    }

    /// The store keys of the objects that name `uid` as an owner.
    pub fn dependents_of(&self, uid: &str) -> Vec<String> {
        self.inner
            .lock()
            .expect("not poisoned")
            .dependents
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The store keys of the objects naming an owner that is not present here (gone, or of
    /// a kind not followed: the collector reads the store for those).
    pub fn dangling(&self) -> Vec<String> {
        let g = self.inner.lock().expect("not poisoned");
        g.dependents
            .iter()
            .filter(|(uid, _)| !g.present.contains(*uid))
            .flat_map(|(_, keys)| keys.iter().cloned())
            .collect()
    }
}

/// The garbage collector of one term.
pub struct Collector {
    pub(crate) queue: Arc<Queue>,
    /// The replica's owner → dependents index.
    graph: Arc<Graph>,
}

impl Collector {
    /// Wires the collector to the informers of possible dependents and owners.
    pub fn new(ctx: &Ctx) -> Collector {
        let queue = Arc::new(Queue::default());
        let graph = ctx.gc_graph.clone();
        for inf in watched(ctx) {
            let (q, g) = (queue.clone(), graph.clone());
            inf.subscribe(move |c| {
                // Of what is there at the term's start, only owners being deleted have work
                // here; the dependents of owners not present are queued below, once.
                if c.replay && !c.new.is_some_and(|n| owner::is_deleting(n)) {
                    return;
                }
                if let Some(new) = c.new {
                    if !c.replay && !owner::owner_refs(new).is_empty() {
                        q.add(c.key);
                    }
                    if owner::is_deleting(new)
                        && owner::finalizers(new)
                            .iter()
                            .any(|f| *f == "foregroundDeletion" || *f == "orphan")
                    {
                        q.add(&format!("{OWNER}{}", c.key));
                    }
                }
                // An owner that went or started going: look at its dependents again.
                let gone = c.new.is_none() || c.new.is_some_and(|n| owner::is_deleting(n));
                if gone {
                    let obj = c.new.or(c.old).expect("a change has an object");
                    for k in g.dependents_of(owner::uid(obj)) {
                        q.add(&k);
                    }
                }
            });
        }
        super::queue::background(|| {
            for k in graph.dangling() {
                queue.add(&k);
            }
        });
        Collector { queue, graph }
    }

    fn dependents_of(&self, uid: &str) -> Vec<String> {
        self.graph.dependents_of(uid)
    }

    /// Handles one queue key: a dependent, or an owner's finalizer.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        match key.strip_prefix(OWNER) {
            Some(owner_key) => self.finalize_owner(ctx, owner_key).await,
            None => self.check_dependent(ctx, key).await,
        }
    }

    /// The resource and informer copy of a cached object by its store key.
    fn cached(ctx: &Ctx, key: &str) -> Option<(&'static Resource, Arc<Value>)> {
        for inf in watched(ctx) {
            if let Some(v) = inf.get(key) {
                return Some((inf.resource(), v));
            }
        }
        None
    }

    async fn check_dependent(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some((r, obj)) = Self::cached(ctx, key) else {
            return Ok(None);
        };
        let refs = owner::owner_refs(&obj).to_vec();
        if refs.is_empty() {
            return Ok(None);
        }
        let ns = owner::namespace(&obj);
        let mut live = Vec::new();
        for rf in &refs {
            if owner_exists(ctx, rf, ns).await? {
                live.push(rf.clone());
            }
        }
        let name = owner::name(&obj).to_string();
        if live.is_empty() {
            // No owner left: delete it (its own dependents follow the same way).
            if owner::is_deleting(&obj) {
                return Ok(None);
            }
            let call = Call::internal(r, ns, Some(&name), None, MANAGER);
            ignore_conflict(ctx.api.delete_value(&call, None).await)?;
            return Ok(None);
        }
        if live.len() < refs.len() {
            // The stored object is edited, at the version judged (a cache may hold a part).
            let call = Call::internal(r, ns, Some(&name), None, MANAGER);
            let seen = owner::seen_version(&obj);
            let pruned = ctx.api.update_with(&call, seen, |cur| {
                let mut next = cur.clone();
                next["metadata"]["ownerReferences"] = json!(live);
                Ok(next)
            });
            ignore_conflict(pruned.await)?;
        }
        Ok(None)
    }

    async fn finalize_owner(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some((r, obj)) = Self::cached(ctx, key) else {
            return Ok(None);
        };
        if !owner::is_deleting(&obj) {
            return Ok(None);
        }
        let fins = owner::finalizers(&obj);
        let uid = owner::uid(&obj).to_string();
        let ns = owner::namespace(&obj);
        let deps: Vec<(&'static Resource, Arc<Value>)> = self
            .dependents_of(&uid)
            .iter()
            .filter_map(|k| Self::cached(ctx, k))
            .collect();
        let mut remove = None;
        if fins.contains(&"orphan") {
            for (dr, d) in &deps {
                let call =
                    Call::internal(dr, owner::namespace(d), Some(owner::name(d)), None, MANAGER);
                let seen = owner::seen_version(d);
                let orphaned = ctx.api.update_with(&call, seen, |cur| {
                    let mut next = cur.clone();
                    next["metadata"]["ownerReferences"] = json!(owner::refs_without(cur, &uid));
                    Ok(next)
                });
                ignore_conflict(orphaned.await)?;
            }
            remove = Some("orphan");
        } else if fins.contains(&"foregroundDeletion") {
            if deps.is_empty() {
                remove = Some("foregroundDeletion");
            } else {
                for (dr, d) in &deps {
                    if owner::is_deleting(d) {
                        continue;
                    }
                    let call = Call::internal(
                        dr,
                        owner::namespace(d),
                        Some(owner::name(d)),
                        None,
                        MANAGER,
                    );
                    let options = json!({"propagationPolicy": "Foreground"});
                    ignore_conflict(ctx.api.delete_value(&call, Some(options)).await)?;
                }
                // Come back when they are gone (their deletions also queue this owner).
                return Ok(Some(Duration::from_secs(1)));
            }
        }
        if let Some(f) = remove {
            let call = Call::internal(r, ns, Some(owner::name(&obj)), None, MANAGER);
            let seen = owner::seen_version(&obj);
            let finalized = ctx.api.update_with(&call, seen, |cur| {
                let mut next = cur.clone();
                let left: Vec<&str> = owner::finalizers(cur)
                    .into_iter()
                    .filter(|x| *x != f)
                    .collect();
                next["metadata"]["finalizers"] = json!(left);
                Ok(next)
            });
            ignore_conflict(finalized.await)?;
        }
        Ok(None)
    }
}

/// Whether the owner a reference names exists (same uid): seen in an informer, or else
/// read from the leader's store (a cache may lag, so only its "yes" is taken as is: an
/// owner deleted since is an event that queues its dependents again; a new leader checks
/// every dependent, and a store read each was most of that work at 20,000 pods).
async fn owner_exists(ctx: &Ctx, rf: &Value, ns: Option<&str>) -> Result<bool, KubeError> {
    let api_version = rf.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = rf.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = rf.get("name").and_then(Value::as_str).unwrap_or("");
    let uid = rf.get("uid").and_then(Value::as_str).unwrap_or("");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let Some(r) = resources::RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.kind == kind)
    else {
        // An owner kind this server does not serve cannot exist here.
        return Ok(false);
    };
    let key = r.key(if r.namespaced { ns } else { None }, name);
    if Collector::cached(ctx, &key).is_some_and(|(_, o)| owner::uid(&o) == uid) {
        return Ok(true);
    }
    Ok(ctx
        .api
        .objects()
        .get(&key, Consistency::Local)
        .await?
        .is_some_and(|s| owner::uid(&s.object) == uid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_store as store;

    /// Puts `obj` into `inf` as the informer's watch would (at revision 2).
    fn put(inf: &Informer, obj: Value) {
        let r = inf.resource();
        inf.apply_event(&store::Event {
            kind: store::EventKind::Put,
            kv: store::KeyValue {
                key: r
                    .key(owner::namespace(&obj), owner::name(&obj))
                    .into_bytes(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                value: serde_json::to_vec(&obj).unwrap(),
            },
            prev_kv: None,
        });
    }

    fn rf(kind: &str, name: &str, uid: &str) -> Value {
        let api_version = if kind == "ReplicaSet" {
            "apps/v1"
        } else {
            "v1"
        };
        json!({"apiVersion": api_version, "kind": kind, "name": name, "uid": uid})
    }

    fn pod(ns: &str, name: &str, uid: &str, refs: Value) -> Value {
        json!({"metadata": {"namespace": ns, "name": name, "uid": uid,
            "ownerReferences": refs}})
    }

    fn delete(inf: &Informer, ns: &str, name: &str) {
        inf.apply_event(&store::Event {
            kind: store::EventKind::Delete,
            kv: store::KeyValue {
                key: inf.resource().key(Some(ns), name).into_bytes(),
                create_revision: 2,
                mod_revision: 3,
                version: 1,
                value: Vec::new(),
            },
            prev_kv: None,
        });
    }

    #[test]
    fn the_graph_follows_owner_references_and_tells_dependents_of_owners_not_present() {
        let pods_res = resources::find("", "v1", "pods").unwrap();
        let rs_res = resources::find("apps", "v1", "replicasets").unwrap();
        let (pods, rss) = (Informer::new(pods_res), Informer::new(rs_res));
        let graph = Graph::new(&[&pods, &rss]);
        // It keeps following after a term's subscribers are dropped.
        pods.unsubscribe_all();
        let key = |n: &str| pods_res.key(Some("a"), n);
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        put(
            &rss,
            json!({"metadata": {"namespace": "a", "name": "web", "uid": "u1"}}),
        );
        put(&pods, pod("a", "o", "u9", json!([])));
        put(
            &pods,
            pod("a", "p1", "x1", json!([rf("ReplicaSet", "web", "u1")])),
        );
        put(
            &pods,
            pod(
                "a",
                "p2",
                "x2",
                json!([rf("ReplicaSet", "web", "u1"), rf("Pod", "o", "u9")]),
            ),
        );
        assert_eq!(sorted(graph.dependents_of("u1")), [key("p1"), key("p2")]);
        assert_eq!(graph.dependents_of("u9"), [key("p2")]);
        assert!(graph.dangling().is_empty(), "every owner is there");
        // A change that leaves the uid and the owners alone changes nothing.
        let mut relabelled = pod("a", "p1", "x1", json!([rf("ReplicaSet", "web", "u1")]));
        relabelled["metadata"]["labels"] = json!({"app": "web"});
        put(&pods, relabelled);
        assert_eq!(sorted(graph.dependents_of("u1")), [key("p1"), key("p2")]);
        assert!(graph.inner.lock().unwrap().present.contains("x1"));
        // An owner of a kind not followed, and one that went: their dependents dangle.
        put(
            &pods,
            pod("a", "p3", "x3", json!([rf("ConfigMap", "c", "u5")])),
        );
        delete(&pods, "a", "o");
        assert_eq!(sorted(graph.dangling()), [key("p2"), key("p3")]);
        // Released by its owners, adopted by one that is there.
        put(
            &rss,
            json!({"metadata": {"namespace": "a", "name": "db", "uid": "u2"}}),
        );
        put(
            &pods,
            pod("a", "p2", "x2", json!([rf("ReplicaSet", "db", "u2")])),
        );
        assert_eq!(graph.dependents_of("u1"), [key("p1")]);
        assert!(graph.dependents_of("u9").is_empty());
        assert_eq!(graph.dependents_of("u2"), [key("p2")]);
        assert_eq!(graph.dangling(), [key("p3")]);
        // An owner recreated under its name is another object: its old dependents dangle.
        put(
            &rss,
            json!({"metadata": {"namespace": "a", "name": "web", "uid": "u1b"}}),
        );
        assert_eq!(sorted(graph.dangling()), [key("p1"), key("p3")]);
        // Deleted dependents leave nothing behind.
        delete(&pods, "a", "p1");
        delete(&pods, "a", "p3");
        assert!(graph.dependents_of("u1").is_empty());
        assert!(graph.dangling().is_empty());
        let g = graph.inner.lock().unwrap();
        assert!(!g.dependents.contains_key("u1"));
        assert_eq!(g.present.len(), 3, "web, db and p2: {:?}", g.present);
    }
}
