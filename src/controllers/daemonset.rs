//! The DaemonSet controller: one pod per eligible node.
//!
//! Owns nothing but its work queue and expectations. Decisions come from [`plan`], a pure
//! function of the DaemonSet, the nodes and the pods. Rules, as Kubernetes':
//! - a node is eligible when the pod template's `nodeSelector`, required node affinity and
//!   tolerations (plus the tolerations every daemon pod gets: not-ready, unreachable,
//!   pressure and unschedulable) allow it; cordoned nodes stay eligible;
//! - each eligible node gets exactly one pod, created unbound with a required node affinity
//!   `matchFields metadata.name In [node]`, so the scheduler binds it (and checks resources);
//!   extra pods are deleted, as are pods on nodes no longer eligible and failed pods (which
//!   are then replaced);
//! - `RollingUpdate` replaces pods of an older template (`controller-revision-hash` label)
//!   node by node, never leaving more than `maxUnavailable` eligible nodes without an
//!   available pod; `OnDelete` replaces a pod only once someone deletes it. `maxSurge` is
//!   not honoured (treated as 0), nor are ControllerRevisions kept (no `rollout undo`).

use crate::api::meta::Ptr;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::deployment::{int_or_percent, template_hash};
use super::queue::{Expectations, Queue};
use super::replicaset::{ignore_conflict, pod_from_template};
use super::{owner, pod, Ctx};
use crate::api::status::KubeError;
use crate::api::{meta, Call};
use crate::scheduler::decide;

/// The field manager the controller writes as.
pub const MANAGER: &str = "daemon-set-controller";
/// The label naming a daemon pod's template revision.
pub const HASH_LABEL: &str = "controller-revision-hash";

/// What every daemon pod tolerates (the DaemonSet controller adds these in Kubernetes).
const DEFAULT_TOLERATIONS: [(&str, &str); 7] = [
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ("node.kubernetes.io/network-unavailable", "NoSchedule"),
];

/// What one reconcile should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Nodes to create a pod for.
    pub create: Vec<String>,
    /// Pods to delete, by name.
    pub delete: Vec<String>,
    /// The status to record.
    pub status: Value,
    /// Look again after this many seconds (a pod becoming available after minReadySeconds).
    pub again_secs: Option<u64>,
}

/// The DaemonSet's pod template with the tolerations every daemon pod gets.
fn template_pod(ds: &Value) -> Value {
    let mut spec = ds
        .ptr("/spec/template/spec")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut tolerations = spec
        .get("tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (key, effect) in DEFAULT_TOLERATIONS {
        let present = tolerations.iter().any(|t| {
            t.get("key").and_then(Value::as_str) == Some(key)
                && t.get("effect").and_then(Value::as_str) == Some(effect)
        });
        if !present {
            tolerations.push(json!({"key": key, "operator": "Exists", "effect": effect}));
        }
    }
    spec["tolerations"] = json!(tolerations);
    json!({"spec": spec})
}

/// The node a daemon pod is for: its `nodeName`, else the node its affinity names.
pub fn target_node(p: &Value) -> Option<&str> {
    pod::node(p).or_else(|| {
        p.ptr("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchFields/0/values/0")
            .and_then(Value::as_str)
    })
}

/// The plan for `ds` given every node and the pods of its namespace.
pub fn plan(ds: &Value, nodes: &[Arc<Value>], pods: &[Arc<Value>], now: u64) -> Plan {
    let mut out = Plan::default();
    let uid = owner::uid(ds);
    let hash = ds
        .ptr("/spec/template")
        .map(template_hash)
        .unwrap_or_default();
    let min_ready = ds
        .ptr("/spec/minReadySeconds")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let want = decide::pod_info(&template_pod(ds));
    let mut by_node: BTreeMap<&str, Vec<&Arc<Value>>> = BTreeMap::new();
    for p in pods {
        if owner::controller_uid(p) != Some(uid) || owner::is_deleting(p) {
            continue;
        }
        if pod::phase(p) == "Failed" {
            out.delete.push(owner::name(p).to_string());
            continue;
        }
        if let Some(n) = target_node(p) {
            by_node.entry(n).or_default().push(p);
        }
    }
    let is_current = |p: &Value| {
        p.ptr(&format!("/metadata/labels/{HASH_LABEL}"))
            .and_then(Value::as_str)
            == Some(hash.as_str())
    };
    let available = |p: &Value| pod::is_available(p, min_ready, now);
    let rolling = ds.ptr("/spec/updateStrategy/type").and_then(Value::as_str) != Some("OnDelete");
    let (mut desired, mut scheduled, mut misscheduled, mut ready, mut avail, mut updated) =
        (0, 0, 0, 0, 0, 0);
    let mut old_available = Vec::new();
    let mut unavailable_nodes = 0i64;
    let mut known = std::collections::HashSet::new();
    for node in nodes {
        let name = owner::name(node);
        known.insert(name);
        let here = by_node.remove(name).unwrap_or_default();
        if !decide::should_run(&decide::node_info(node), &want) {
            if !here.is_empty() {
                misscheduled += 1;
            }
            out.delete
                .extend(here.iter().map(|p| owner::name(p).to_string()));
            continue;
        }
        desired += 1;
        if here.is_empty() {
            out.create.push(name.to_string());
            unavailable_nodes += 1;
            continue;
        }
        scheduled += 1;
        // Keep one: the current revision, then available, then oldest.
        let mut here = here;
        here.sort_by_key(|p| {
            (
                !is_current(p),
                !available(p),
                owner::created_secs(p),
                owner::name(p).to_string(),
            )
        });
        out.delete
            .extend(here[1..].iter().map(|p| owner::name(p).to_string()));
        let keep = here[0];
        if pod::is_ready(keep) {
            ready += 1;
        }
        let is_available = available(keep);
        if is_available {
            avail += 1;
        } else {
            unavailable_nodes += 1;
            if min_ready > 0 && pod::is_ready(keep) {
                let since = pod::ready_since(keep).unwrap_or(now);
                out.again_secs = Some((since + min_ready).saturating_sub(now).max(1));
            }
        }
        if is_current(keep) {
            updated += 1;
        } else if rolling {
            if is_available {
                old_available.push(owner::name(keep).to_string());
            } else {
                // An old pod that is not available costs nothing to replace.
                out.delete.push(owner::name(keep).to_string());
            }
        }
    }
    // Pods for nodes that no longer exist.
    for (_, ps) in by_node {
        out.delete
            .extend(ps.iter().map(|p| owner::name(p).to_string()));
    }
    if rolling {
        let max_unavailable = int_or_percent(
            ds.ptr("/spec/updateStrategy/rollingUpdate/maxUnavailable"),
            desired,
            false,
            "1",
        )
        .max(1);
        let budget = (max_unavailable - unavailable_nodes).max(0) as usize;
        out.delete.extend(old_available.into_iter().take(budget));
    }
    out.status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": scheduled,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "numberAvailable": avail,
        "numberUnavailable": (desired - avail).max(0),
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.ptr("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    out
}

/// A daemon pod of `ds` for `node`.
fn pod_for(ds: &Value, node: &str) -> Value {
    let mut p = pod_from_template(ds, "apps/v1", "DaemonSet");
    let hash = ds
        .ptr("/spec/template")
        .map(template_hash)
        .unwrap_or_default();
    p["metadata"]["labels"][HASH_LABEL] = json!(hash);
    p["metadata"]["labels"]["pod-template-generation"] = json!(ds
        .ptr("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .to_string());
    p["spec"]["tolerations"] = template_pod(ds)["spec"]["tolerations"].clone();
    p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!({
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]
    });
    p
}

/// The DaemonSet controller's state.
pub struct Controller {
    pub(crate) queue: Arc<Queue>,
    expectations: Arc<Expectations>,
}

impl Controller {
    /// Wires the controller: a DaemonSet change queues it; a pod change queues its owning
    /// DaemonSet; a node change queues every DaemonSet.
    pub fn new(ctx: &Ctx) -> Controller {
        let queue = Arc::new(Queue::default());
        let expectations = Arc::new(Expectations::default());
        let ds_res = ctx.daemonsets.resource();
        {
            let (q, e) = (queue.clone(), expectations.clone());
            ctx.daemonsets.subscribe(move |c| {
                if c.new.is_none() {
                    e.remove(c.key);
                }
                q.add(c.key);
            });
        }
        {
            let (q, e) = (queue.clone(), expectations.clone());
            ctx.pods.subscribe(move |c| {
                // Every DaemonSet is queued by its own replay (and nothing is expected yet).
                if c.replay {
                    return;
                }
                let obj = c.new.or(c.old).expect("a change has an object");
                let Some(r) = owner::controller_ref(obj)
                    .filter(|r| r.get("kind").and_then(Value::as_str) == Some("DaemonSet"))
                else {
                    return;
                };
                let Some(name) = r.get("name").and_then(Value::as_str) else {
                    return;
                };
                let key = ds_res.key(owner::namespace(obj), name);
                match (c.old, c.new) {
                    (None, Some(_)) => e.created(&key),
                    (Some(_), None) => e.deleted(&key),
                    _ => {}
                }
                q.add(&key);
            });
        }
        {
            let q = queue.clone();
            let dss = ctx.daemonsets.clone();
            ctx.nodes.subscribe(move |c| {
                // Every DaemonSet is queued by its own replay.
                if c.replay {
                    return;
                }
                // Only what eligibility or readiness depends on.
                let relevant = match (c.old, c.new) {
                    (Some(a), Some(b)) => {
                        a.ptr("/metadata/labels") != b.ptr("/metadata/labels")
                            || a.ptr("/spec/taints") != b.ptr("/spec/taints")
                    }
                    _ => true,
                };
                if relevant {
                    for k in dss.keys() {
                        q.add(&k);
                    }
                }
            });
        }
        Controller {
            queue,
            expectations,
        }
    }

    /// Reconciles one DaemonSet by store key.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some(ds) = ctx.daemonsets.get(key) else {
            self.expectations.remove(key);
            return Ok(None);
        };
        if owner::is_deleting(&ds) {
            return Ok(None);
        }
        let ns = owner::namespace(&ds).map(str::to_string);
        let pods = ctx.pods.in_namespace(ns.as_deref());
        let nodes = ctx.nodes.list();
        let plan = plan(&ds, &nodes, &pods, meta::now_secs());
        let pod_res = ctx.pods.resource();
        if self.expectations.satisfied(key) {
            if !plan.create.is_empty() {
                self.expectations.expect(key, plan.create.len() as i64, 0);
                let calls = plan.create.iter().map(|node| {
                    let call = Call::internal(pod_res, ns.as_deref(), None, None, MANAGER);
                    let body = pod_for(&ds, node);
                    async move { ctx.api.create_value(&call, body, false).await }
                });
                let mut failed = None;
                for r in futures::future::join_all(calls).await {
                    if let Err(e) = r {
                        self.expectations.created(key);
                        failed = Some(e);
                    }
                }
                if let Some(e) = failed {
                    ctx.events.warning(
                        &ds,
                        "FailedCreate",
                        &format!("Error creating: {}", e.message),
                    );
                    return Err(e);
                }
                ctx.events.normal(
                    &ds,
                    "SuccessfulCreate",
                    &format!("Created {} pod(s)", plan.create.len()),
                );
            }
            if !plan.delete.is_empty() {
                self.expectations.expect(key, 0, plan.delete.len() as i64);
                for name in &plan.delete {
                    let call = Call::internal(pod_res, ns.as_deref(), Some(name), None, MANAGER);
                    if let Err(e) = ctx.api.delete_value(&call, None).await {
                        self.expectations.deleted(key);
                        if e.code != 404 {
                            return Err(e);
                        }
                    }
                }
                ctx.events.normal(
                    &ds,
                    "SuccessfulDelete",
                    &format!("Deleted {} pod(s)", plan.delete.len()),
                );
            }
        }
        let current = ds.get("status").cloned().unwrap_or_else(|| json!({}));
        let differs = plan
            .status
            .as_object()
            .expect("an object")
            .iter()
            .any(|(k, v)| current.get(k).unwrap_or(&json!(0)) != v);
        if differs {
            let mut next = (*ds).clone();
            next["status"] = plan.status.clone();
            let call = Call::internal(
                ctx.daemonsets.resource(),
                ns.as_deref(),
                Some(owner::name(&ds)),
                Some("status"),
                MANAGER,
            );
            ignore_conflict(ctx.api.update_value(&call, next).await)?;
        }
        Ok(plan.again_secs.map(|s| Duration::from_secs(s.min(60))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(extra_spec: Value) -> Value {
        let mut d = json!({"metadata": {"name": "agent", "namespace": "kube-system", "uid": "ds-1", "generation": 3},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                     "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": [{"name": "c", "image": "v1"}]}}}});
        if let Some(o) = extra_spec.as_object() {
            for (k, v) in o {
                d["spec"][k] = v.clone();
            }
        }
        d
    }

    fn node(name: &str, labels: Value, taints: Value) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        )
    }

    fn daemon_pod(d: &Value, name: &str, node: &str, ready: bool) -> Arc<Value> {
        let mut p = pod_for(d, node);
        p["metadata"]["name"] = json!(name);
        p["metadata"]["creationTimestamp"] = json!("2026-11-25T00:00:00Z");
        p["spec"]["nodeName"] = json!(node);
        p["metadata"]["ownerReferences"][0]["uid"] = json!("ds-1");
        p["status"] = json!({"phase": "Running"});
        if ready {
            p["status"]["conditions"] = json!([{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-25T00:00:01Z"}]);
        }
        Arc::new(p)
    }

    #[test]
    fn one_pod_per_eligible_node() {
        let d = ds(json!({}));
        let nodes = vec![
            node("a", json!({}), json!([])),
            node(
                "b",
                json!({}),
                json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
            ),
            // Unreachable nodes keep their daemon pods.
            node(
                "c",
                json!({}),
                json!([{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]),
            ),
        ];
        let p = plan(&d, &nodes, &[], 100);
        assert_eq!(p.create, vec!["a".to_string(), "c".to_string()]);
        assert_eq!(p.status["desiredNumberScheduled"], 2);
        // A pod on the tainted node is misscheduled and deleted; a duplicate goes too.
        let pods = vec![
            daemon_pod(&d, "on-a", "a", true),
            daemon_pod(&d, "on-a-again", "a", false),
            daemon_pod(&d, "on-b", "b", true),
            daemon_pod(&d, "on-c", "c", true),
        ];
        let p = plan(&d, &nodes, &pods, 100);
        assert!(p.create.is_empty());
        let mut deleted = p.delete.clone();
        deleted.sort();
        assert_eq!(deleted, vec!["on-a-again".to_string(), "on-b".to_string()]);
        assert_eq!(p.status["numberMisscheduled"], 1);
        assert_eq!(p.status["numberReady"], 2);
        // The pod's node affinity names its node, for the scheduler.
        let made = pod_for(&d, "a");
        assert_eq!(target_node(&made), Some("a"));
        // A node selector narrows the nodes.
        let picky = ds(
            json!({"template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"nodeSelector": {"disk": "ssd"}, "containers": [{"name": "c", "image": "v1"}]}}}),
        );
        let nodes = vec![
            node("a", json!({"disk": "ssd"}), json!([])),
            node("b", json!({}), json!([])),
        ];
        assert_eq!(plan(&picky, &nodes, &[], 100).create, vec!["a".to_string()]);
    }

    #[test]
    fn a_rolling_update_replaces_at_most_max_unavailable_at_a_time() {
        let old = ds(json!({}));
        let nodes: Vec<Arc<Value>> = ["a", "b", "c"]
            .iter()
            .map(|n| node(n, json!({}), json!([])))
            .collect();
        let pods: Vec<Arc<Value>> = ["a", "b", "c"]
            .iter()
            .map(|n| daemon_pod(&old, &format!("p-{n}"), n, true))
            .collect();
        let new = ds(
            json!({"template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": [{"name": "c", "image": "v2"}]}}}),
        );
        let p = plan(&new, &nodes, &pods, 100);
        assert_eq!(p.delete.len(), 1, "{p:?}");
        assert_eq!(p.status["updatedNumberScheduled"], 0);
        // While a node has no available pod, nothing else is deleted.
        let mut rest: Vec<Arc<Value>> = pods
            .iter()
            .filter(|x| owner::name(x) != p.delete[0])
            .cloned()
            .collect();
        let p2 = plan(&new, &nodes, &rest, 100);
        assert_eq!(p2.create.len(), 1);
        assert!(p2.delete.is_empty(), "{p2:?}");
        // OnDelete leaves old pods alone.
        let mut on_delete = new.clone();
        on_delete["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
        assert!(plan(&on_delete, &nodes, &pods, 100).delete.is_empty());
        // Once the replacement is available the next old pod goes.
        let node_freed = p2.create[0].clone();
        rest.push(daemon_pod(&new, "fresh", &node_freed, true));
        let p3 = plan(&new, &nodes, &rest, 100);
        assert_eq!(p3.delete.len(), 1);
        assert_eq!(p3.status["updatedNumberScheduled"], 1);
    }
}
