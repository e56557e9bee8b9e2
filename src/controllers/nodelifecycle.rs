//! Node lifecycle: notices nodes that stopped heartbeating, marks them, and evicts their
//! pods (Kubernetes' node lifecycle controller with its taint manager).
//!
//! Owns, per node, the instant this leader last saw it heartbeat: a change of its Lease in
//! `kube-node-lease` or of its `Ready` condition's `lastHeartbeatTime`. Staleness is judged
//! on this leader's own monotonic clock, never by the timestamps written in the objects, and
//! a new leader starts every node with a fresh grace period: clock skew or a leader change
//! never marks a healthy node NotReady.
//!
//! Every tick:
//! - a node unheard for longer than the grace period gets `Ready=Unknown` (all its
//!   conditions Unknown, "Kubelet stopped posting node status.") and the
//!   `node.kubernetes.io/unreachable` NoSchedule taint at once, and the NoExecute one at most
//!   `node_eviction_rate` nodes per second, and never while every node is unreachable (a
//!   full disruption is more likely the control plane's own partition than dead nodes);
//! - a node heard again, reporting `Ready=True`, loses both taints;
//! - pods on a node with a NoExecute taint are evicted (deleted gracefully) once their
//!   toleration of it runs out (at once without one); their owners replace them elsewhere;
//! - a node's pressure conditions become NoSchedule taints (TaintNodesByCondition);
//! - pods bound to a node that no longer exists are deleted for good once it has been gone
//!   for the grace period (the pod garbage collector's orphans).
//!
//! Also owns, per orphaned pod, when this leader first saw it orphaned.

use crate::api::meta::Ptr;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::replicaset::ignore_conflict;
use super::{owner, pod, Ctx};
use crate::api::{meta, Call};

/// The field manager this controller writes as.
pub const MANAGER: &str = "node-controller";
/// The taint of an unreachable node.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// The taint of a node that reports itself not ready.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
/// The NoSchedule taint for each pressure condition (Kubernetes' TaintNodesByCondition).
const CONDITION_TAINTS: [(&str, &str); 3] = [
    ("MemoryPressure", "node.kubernetes.io/memory-pressure"),
    ("DiskPressure", "node.kubernetes.io/disk-pressure"),
    ("PIDPressure", "node.kubernetes.io/pid-pressure"),
];
/// How often nodes are checked.
const TICK: Duration = Duration::from_millis(500);

/// The node lifecycle controller of one term.
pub struct NodeLifecycle {
    /// node name → when this leader last saw it heartbeat.
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    /// Pods bound to a node that does not exist → when this leader first saw them so.
    orphans: Mutex<HashMap<String, Instant>>,
}

fn ready_status(node: &Value) -> Option<&str> {
    node.ptr("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
}

fn heartbeat(node: &Value) -> Option<&Value> {
    node.ptr("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .and_then(|c| c.get("lastHeartbeatTime"))
}

fn taints(node: &Value) -> Vec<Value> {
    node.ptr("/spec/taints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The node's taints with a NoSchedule taint for each pressure condition that is True (and
/// none for the others); `None` when they are already so.
pub fn condition_taints(node: &Value) -> Option<Vec<Value>> {
    let current = taints(node);
    let is_true = |kind: &str| {
        node.ptr("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.get("type").and_then(Value::as_str) == Some(kind)
                        && c.get("status").and_then(Value::as_str) == Some("True")
                })
            })
    };
    let mut next: Vec<Value> = current
        .iter()
        .filter(|t| {
            let key = t.get("key").and_then(Value::as_str).unwrap_or("");
            !CONDITION_TAINTS
                .iter()
                .any(|(kind, k)| *k == key && !is_true(kind))
        })
        .cloned()
        .collect();
    for (kind, key) in CONDITION_TAINTS {
        if is_true(kind) && !has_taint(node, key, "NoSchedule") {
            next.push(json!({"key": key, "effect": "NoSchedule"}));
        }
    }
    (next != current).then_some(next)
}

fn has_taint(node: &Value, key: &str, effect: &str) -> bool {
    taints(node).iter().any(|t| {
        t.get("key").and_then(Value::as_str) == Some(key)
            && t.get("effect").and_then(Value::as_str) == Some(effect)
    })
}

/// When `pod` must leave a node carrying the NoExecute taint `taint` (added at
/// `added_secs`): `Some(0)` at once, `Some(t)` at wall-clock second t, `None` never.
pub fn eviction_due(pod: &Value, taint: &Value, added_secs: u64) -> Option<u64> {
    let key = taint.get("key").and_then(Value::as_str).unwrap_or("");
    let value = taint.get("value").and_then(Value::as_str).unwrap_or("");
    let tolerations = pod
        .ptr("/spec/tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let matching: Vec<Option<i64>> = tolerations
        .iter()
        .filter(|t| {
            let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("");
            let effect_ok = s("effect").is_empty() || s("effect") == "NoExecute";
            let exists = s("operator") == "Exists";
            let key_ok = (s("key").is_empty() && exists) || s("key") == key;
            let value_ok = exists || s("value") == value;
            effect_ok && key_ok && value_ok
        })
        .map(|t| t.get("tolerationSeconds").and_then(Value::as_i64))
        .collect();
    if matching.is_empty() {
        return Some(0);
    }
    if matching.iter().any(Option::is_none) {
        return None;
    }
    let secs = matching.into_iter().flatten().max().unwrap_or(0).max(0) as u64;
    Some(added_secs + secs)
}

impl NodeLifecycle {
    /// Wires heartbeats: lease renewals and node status changes.
    pub fn new(ctx: &Ctx) -> NodeLifecycle {
        let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        {
            let seen = seen.clone();
            ctx.leases.subscribe(move |c| {
                if let Some(new) = c.new {
                    if owner::namespace(new) == Some("kube-node-lease")
                        && c.old.map(|o| o.get("spec")) != Some(new.get("spec"))
                    {
                        seen.lock()
                            .expect("not poisoned")
                            .insert(owner::name(new).to_string(), Instant::now());
                    }
                }
            });
        }
        {
            let seen = seen.clone();
            ctx.nodes.subscribe(move |c| match c.new {
                Some(new) => {
                    if c.old.is_none() || c.old.and_then(|o| heartbeat(o)) != heartbeat(new) {
                        seen.lock()
                            .expect("not poisoned")
                            .insert(owner::name(new).to_string(), Instant::now());
                    }
                }
                None => {
                    if let Some(old) = c.old {
                        seen.lock().expect("not poisoned").remove(owner::name(old));
                    }
                }
            });
        }
        NodeLifecycle {
            seen,
            orphans: Mutex::default(),
        }
    }

    /// Checks the nodes until the term ends.
    pub async fn run(self: Arc<Self>, ctx: Arc<Ctx>) {
        // A new leader gives every node a fresh grace period.
        {
            let now = Instant::now();
            let mut seen = self.seen.lock().expect("not poisoned");
            for n in ctx.nodes.list() {
                seen.insert(owner::name(&n).to_string(), now);
            }
        }
        let mut tick = tokio::time::interval(TICK);
        let mut tokens: f64 = 1.0;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = ctx.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let rate = ctx.config.node_eviction_rate;
            tokens =
                (tokens + now.duration_since(last).as_secs_f64() * rate).min(1.0_f64.max(rate));
            last = now;
            if let Err(e) = self.check(&ctx, now, &mut tokens).await {
                tracing::debug!(%e, "node lifecycle check failed; next tick retries");
            }
        }
    }

    async fn check(
        &self,
        ctx: &Ctx,
        now: Instant,
        tokens: &mut f64,
    ) -> Result<(), crate::api::status::KubeError> {
        let nodes = ctx.nodes.list();
        let grace = ctx.config.node_grace;
        let heard: HashMap<String, bool> = {
            let seen = self.seen.lock().expect("not poisoned");
            nodes
                .iter()
                .map(|n| {
                    let name = owner::name(n).to_string();
                    let fresh = seen
                        .get(&name)
                        .is_some_and(|t| now.duration_since(*t) <= grace);
                    (name, fresh)
                })
                .collect()
        };
        let all_down = !nodes.is_empty() && heard.values().all(|h| !h);
        for n in &nodes {
            let name = owner::name(n);
            let fresh = heard.get(name).copied().unwrap_or(true);
            if !fresh {
                if ready_status(n) != Some("Unknown") {
                    self.mark_unknown(ctx, n).await?;
                    continue;
                }
                if !has_taint(n, UNREACHABLE, "NoSchedule") {
                    self.set_taints(ctx, n, true, false).await?;
                    continue;
                }
                if !has_taint(n, UNREACHABLE, "NoExecute") && !all_down && *tokens >= 1.0 {
                    *tokens -= 1.0;
                    self.set_taints(ctx, n, true, true).await?;
                    continue;
                }
            } else if ready_status(n) == Some("True")
                && (has_taint(n, UNREACHABLE, "NoSchedule")
                    || has_taint(n, UNREACHABLE, "NoExecute"))
            {
                self.set_taints(ctx, n, false, false).await?;
                continue;
            }
            if fresh {
                if let Some(ts) = condition_taints(n) {
                    let mut next = (**n).clone();
                    next["spec"]["taints"] = json!(ts);
                    let call =
                        Call::internal(ctx.nodes.resource(), None, Some(name), None, MANAGER);
                    ignore_conflict(ctx.api.update_value(&call, next).await)?;
                    continue;
                }
            }
            self.evict(ctx, n).await?;
        }
        self.collect_orphans(ctx, &nodes, now, grace).await
    }

    /// Kubernetes' pod garbage collection of orphans: a pod bound to a node that does not
    /// exist is deleted for good (grace 0: no agent will confirm it) once the node has been
    /// missing for the grace period, so its owner replaces it elsewhere.
    async fn collect_orphans(
        &self,
        ctx: &Ctx,
        nodes: &[Arc<Value>],
        now: Instant,
        grace: Duration,
    ) -> Result<(), crate::api::status::KubeError> {
        let names: std::collections::HashSet<&str> = nodes.iter().map(|n| owner::name(n)).collect();
        let orphaned: Vec<Arc<Value>> = ctx
            .pods
            .index_values(pod::BY_NODE)
            .iter()
            .filter(|n| !names.contains(n.as_str()))
            .flat_map(|n| ctx.pods.by_index(pod::BY_NODE, n))
            .collect();
        let pod_res = ctx.pods.resource();
        let due: Vec<Arc<Value>> = {
            let mut orphans = self.orphans.lock().expect("not poisoned");
            let keys: std::collections::HashSet<String> = orphaned
                .iter()
                .map(|p| pod_res.key(owner::namespace(p), owner::name(p)))
                .collect();
            orphans.retain(|k, _| keys.contains(k));
            orphaned
                .into_iter()
                .filter(|p| {
                    let first = *orphans
                        .entry(pod_res.key(owner::namespace(p), owner::name(p)))
                        .or_insert(now);
                    now.duration_since(first) >= grace
                })
                .collect()
        };
        for p in due {
            let call = Call::internal(
                pod_res,
                owner::namespace(&p),
                Some(owner::name(&p)),
                None,
                MANAGER,
            );
            let options =
                json!({"gracePeriodSeconds": 0, "preconditions": {"uid": owner::uid(&p)}});
            ignore_conflict(ctx.api.delete_value(&call, Some(options)).await)?;
            ctx.events.normal(
                &p,
                "PodGC",
                &format!(
                    "Deleted pod {}: its node {} no longer exists",
                    owner::name(&p),
                    pod::node(&p).unwrap_or("")
                ),
            );
        }
        Ok(())
    }

    async fn mark_unknown(
        &self,
        ctx: &Ctx,
        n: &Value,
    ) -> Result<(), crate::api::status::KubeError> {
        let now = meta::rfc3339(meta::now_secs());
        let mut next = n.clone();
        let mut conds: Vec<Value> = n
            .ptr("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !conds
            .iter()
            .any(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        {
            conds.push(json!({"type": "Ready"}));
        }
        for c in conds.iter_mut() {
            c["status"] = json!("Unknown");
            c["reason"] = json!("NodeStatusUnknown");
            c["message"] = json!("Kubelet stopped posting node status.");
            c["lastTransitionTime"] = json!(now);
        }
        next["status"]["conditions"] = json!(conds);
        let call = Call::internal(
            ctx.nodes.resource(),
            None,
            Some(owner::name(n)),
            Some("status"),
            MANAGER,
        );
        ignore_conflict(ctx.api.update_value(&call, next).await)?;
        ctx.events.normal(
            n,
            "NodeNotReady",
            &format!("Node {} status is now: NodeNotReady", owner::name(n)),
        );
        Ok(())
    }

    async fn set_taints(
        &self,
        ctx: &Ctx,
        n: &Value,
        no_schedule: bool,
        no_execute: bool,
    ) -> Result<(), crate::api::status::KubeError> {
        let now = meta::rfc3339(meta::now_secs());
        let mut ts: Vec<Value> = taints(n)
            .into_iter()
            .filter(|t| t.get("key").and_then(Value::as_str) != Some(UNREACHABLE))
            .collect();
        if no_schedule {
            ts.push(json!({"key": UNREACHABLE, "effect": "NoSchedule", "timeAdded": now}));
        }
        if no_execute {
            ts.push(json!({"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": now}));
        }
        let mut next = n.clone();
        next["spec"]["taints"] = json!(ts);
        if ts.is_empty() {
            if let Some(spec) = next.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("taints");
            }
        }
        let call = Call::internal(
            ctx.nodes.resource(),
            None,
            Some(owner::name(n)),
            None,
            MANAGER,
        );
        ignore_conflict(ctx.api.update_value(&call, next).await)
    }

    async fn evict(&self, ctx: &Ctx, n: &Value) -> Result<(), crate::api::status::KubeError> {
        let no_execute: Vec<Value> = taints(n)
            .into_iter()
            .filter(|t| t.get("effect").and_then(Value::as_str) == Some("NoExecute"))
            .collect();
        if no_execute.is_empty() {
            return Ok(());
        }
        let name = owner::name(n);
        let now = meta::now_secs();
        for p in ctx
            .pods
            .by_index(pod::BY_NODE, name)
            .into_iter()
            .filter(|p| pod::is_active(p))
        {
            let due = no_execute
                .iter()
                .map(|t| {
                    let added = t
                        .get("timeAdded")
                        .and_then(Value::as_str)
                        .and_then(meta::parse_rfc3339)
                        .unwrap_or(now);
                    eviction_due(&p, t, added)
                })
                .fold(None, |acc: Option<u64>, d| match (acc, d) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                });
            if due.is_some_and(|d| d <= now) {
                let call = Call::internal(
                    ctx.pods.resource(),
                    owner::namespace(&p),
                    Some(owner::name(&p)),
                    None,
                    MANAGER,
                );
                ignore_conflict(ctx.api.delete_value(&call, None).await)?;
                ctx.events.normal(
                    &p,
                    "TaintManagerEviction",
                    &format!(
                        "Marking for deletion Pod {}/{}",
                        owner::namespace(&p).unwrap_or(""),
                        owner::name(&p)
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(tolerations: Value) -> Value {
        json!({"spec": {"tolerations": tolerations}})
    }

    #[test]
    fn tolerations_decide_when_a_pod_leaves_a_tainted_node() {
        let taint = json!({"key": UNREACHABLE, "effect": "NoExecute"});
        assert_eq!(
            eviction_due(&pod(json!([])), &taint, 100),
            Some(0),
            "no toleration: at once"
        );
        let timed = json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]);
        assert_eq!(eviction_due(&pod(timed), &taint, 100), Some(130));
        let forever = json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}]);
        assert_eq!(eviction_due(&pod(forever), &taint, 100), None);
        let everything = json!([{"operator": "Exists"}]);
        assert_eq!(eviction_due(&pod(everything), &taint, 100), None);
        let other = json!([{"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]);
        assert_eq!(
            eviction_due(&pod(other), &taint, 100),
            Some(0),
            "another taint's toleration does not count"
        );
    }

    #[test]
    fn pressure_conditions_taint_and_untaint_nodes() {
        let node = |disk: &str, taints: Value| {
            json!({"metadata": {"name": "n"}, "spec": {"taints": taints},
                   "status": {"conditions": [{"type": "Ready", "status": "True"},
                                             {"type": "DiskPressure", "status": disk}]}})
        };
        let other = json!({"key": "dedicated", "value": "db", "effect": "NoSchedule"});
        let pressured = condition_taints(&node("True", json!([other.clone()]))).unwrap();
        assert_eq!(
            pressured,
            vec![
                other.clone(),
                json!({"key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule"})
            ]
        );
        assert_eq!(
            condition_taints(&node("True", json!(pressured.clone()))),
            None
        );
        assert_eq!(
            condition_taints(&node("False", json!(pressured))).unwrap(),
            vec![other]
        );
    }
}
