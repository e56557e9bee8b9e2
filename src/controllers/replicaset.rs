//! The ReplicaSet controller: keeps exactly `spec.replicas` active pods matching each
//! ReplicaSet's selector.
//!
//! [`plan`] is the decision, a pure function of the ReplicaSet and the pods of its
//! namespace: which pods to adopt (matching, without a controller) and release (owned, no
//! longer matching), how many to create, which to delete (in Kubernetes' order: unbound,
//! pending, not ready, newest first), and the status to report. [`Controller::reconcile`]
//! carries it out through the API with the leader's fenced writes; [`Expectations`] hold
//! back a ReplicaSet whose creations or deletions have not been seen yet.

use crate::api::meta::Ptr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::queue::{Expectations, Queue};
use super::{owner, pod, Ctx};
use crate::api::selector::LabelSelector;
use crate::api::status::KubeError;
use crate::api::{meta, Call};

/// Most pods created or deleted in one reconcile (Kubernetes' burst replicas).
pub const BURST: usize = 500;

/// The field manager this controller writes as.
pub const MANAGER: &str = "replicaset-controller";

/// What to do for one ReplicaSet.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Pods to create.
    pub create: usize,
    /// Pods to delete (names).
    pub delete: Vec<String>,
    /// Pods to adopt (names).
    pub adopt: Vec<String>,
    /// Pods to release (names).
    pub release: Vec<String>,
    /// The status to write.
    pub status: Value,
}

/// The decision for `rs` given the pods of its namespace. `manage` is false while earlier
/// creations or deletions are still in flight: then only adoption and status are decided.
pub fn plan(rs: &Value, pods: &[Arc<Value>], manage: bool, now: u64) -> Plan {
    let uid = owner::uid(rs);
    let replicas = rs
        .ptr("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0) as usize;
    let min_ready = rs
        .ptr("/spec/minReadySeconds")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let selector = LabelSelector::from_object(rs.ptr("/spec/selector")).filter(|s| !s.is_empty());
    let deleting = owner::is_deleting(rs);
    let mut mine: Vec<&Value> = Vec::new();
    let mut out = Plan::default();
    // The selector is evaluated only for this set's pods and orphans: a namespace's pods
    // owned by other controllers (most of them) are passed over without it.
    let matches = |p: &Value| selector.as_ref().is_some_and(|s| s.matches(p));
    for p in pods {
        match owner::controller_uid(p) {
            Some(u) if u == uid => {
                if deleting || matches(p) {
                    mine.push(p);
                } else {
                    out.release.push(owner::name(p).to_string());
                }
            }
            Some(_) => {}
            None => {
                if !deleting && !owner::is_deleting(p) && pod::is_active(p) && matches(p) {
                    out.adopt.push(owner::name(p).to_string());
                    mine.push(p);
                }
            }
        }
    }
    let mut active: Vec<&Value> = mine.iter().copied().filter(|p| pod::is_active(p)).collect();
    if manage && !deleting {
        if active.len() < replicas {
            out.create = (replicas - active.len()).min(BURST);
        } else if active.len() > replicas {
            active.sort_by(|a, b| pod::deletion_order(a, b));
            out.delete = active
                .iter()
                .take((active.len() - replicas).min(BURST))
                .map(|p| owner::name(p).to_string())
                .collect();
        }
    }
    let ready = active.iter().filter(|p| pod::is_ready(p)).count();
    let available = active
        .iter()
        .filter(|p| pod::is_available(p, min_ready, now))
        .count();
    let template_labels = rs.ptr("/spec/template/metadata/labels");
    let fully_labeled = active
        .iter()
        .filter(|p| match template_labels.and_then(Value::as_object) {
            None => true,
            Some(want) => want
                .iter()
                .all(|(k, v)| p.ptr("/metadata/labels").and_then(|l| l.get(k)) == Some(v)),
        })
        .count();
    out.status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": fully_labeled,
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs.ptr("/metadata/generation").and_then(Value::as_i64).unwrap_or(1),
    });
    if let Some(conds) = rs.ptr("/status/conditions") {
        out.status["conditions"] = conds.clone();
    }
    out
}

/// A pod for `owner` from its pod template (labels, annotations and spec), owned by it.
pub fn pod_from_template(owner_obj: &Value, api_version: &str, kind: &str) -> Value {
    let template = owner_obj
        .ptr("/spec/template")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut metadata = json!({
        "generateName": format!("{}-", owner::name(owner_obj)),
        "ownerReferences": [owner::controller_ref_to(owner_obj, api_version, kind)],
    });
    for k in ["labels", "annotations"] {
        if let Some(v) = template.ptr(&format!("/metadata/{k}")) {
            metadata[k] = v.clone();
        }
    }
    if let Some(ns) = owner::namespace(owner_obj) {
        metadata["namespace"] = json!(ns);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    })
}

/// The ReplicaSet controller's state: its queue and expectations.
pub struct Controller {
    pub(crate) queue: Arc<Queue>,
    expectations: Arc<Expectations>,
}

impl Controller {
    /// Wires the controller to the informers: a ReplicaSet change queues it; a pod change
    /// queues its controlling ReplicaSet (and counts toward expectations), or, for an
    /// orphan, every ReplicaSet of its namespace that might adopt it.
    pub fn new(ctx: &Ctx) -> Controller {
        let queue = Arc::new(Queue::default());
        let expectations = Arc::new(Expectations::default());
        let rs_res = ctx.replicasets.resource();
        {
            let q = queue.clone();
            let e = expectations.clone();
            ctx.replicasets.subscribe(move |c| {
                if c.new.is_none() {
                    e.remove(c.key);
                }
                q.add(c.key);
            });
        }
        {
            let q = queue.clone();
            let e = expectations.clone();
            let rss = ctx.replicasets.clone();
            ctx.pods.subscribe(move |c| {
                // Every ReplicaSet is queued by its own replay (and nothing is expected yet).
                if c.replay {
                    return;
                }
                let obj = c.new.or(c.old).expect("a change has an object");
                let ns = owner::namespace(obj);
                let owner_key = |p: &Value| {
                    owner::controller_ref(p)
                        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("ReplicaSet"))
                        .and_then(|r| r.get("name").and_then(Value::as_str))
                        .map(|n| rs_res.key(ns, n))
                };
                match (c.old, c.new) {
                    (None, Some(new)) => {
                        if let Some(k) = owner_key(new) {
                            e.created(&k);
                            q.add(&k);
                        } else {
                            for rs in rss.in_namespace(ns) {
                                q.add(&rs_res.key(ns, owner::name(&rs)));
                            }
                        }
                    }
                    (Some(old), None) => {
                        if let Some(k) = owner_key(old) {
                            e.deleted(&k);
                            q.add(&k);
                        }
                    }
                    (Some(old), Some(new)) => {
                        let (a, b) = (owner_key(old), owner_key(new));
                        if let Some(k) = &a {
                            q.add(k);
                        }
                        if let Some(k) = b.as_ref().filter(|_| b != a) {
                            q.add(k);
                        }
                        if b.is_none() && old.ptr("/metadata/labels") != new.ptr("/metadata/labels")
                        {
                            for rs in rss.in_namespace(ns) {
                                q.add(&rs_res.key(ns, owner::name(&rs)));
                            }
                        }
                        // A pod that starts terminating is as good as deleted for counting.
                        if !owner::is_deleting(old) && owner::is_deleting(new) {
                            if let Some(k) = &b {
                                q.add(k);
                            }
                        }
                    }
                    (None, None) => {}
                }
            });
        }
        Controller {
            queue,
            expectations,
        }
    }

    /// Reconciles one ReplicaSet by store key.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some(rs) = ctx.replicasets.get(key) else {
            self.expectations.remove(key);
            return Ok(None);
        };
        let ns = owner::namespace(&rs).map(str::to_string);
        // Its own pods and the namespace's orphans (what it may adopt): `plan` passes over
        // any other pod, and a namespace of thousands is mostly other sets' pods.
        let mut pods = ctx.pods.by_index(
            pod::BY_CONTROLLER,
            &pod::controller_index(ns.as_deref(), owner::uid(&rs)),
        );
        pods.extend(ctx.pods.by_index(
            pod::BY_CONTROLLER,
            &pod::controller_index(ns.as_deref(), ""),
        ));
        let manage = self.expectations.satisfied(key);
        let now = meta::now_secs();
        let plan = plan(&rs, &pods, manage, now);
        let pod_res = ctx.pods.resource();
        let rs_ref = owner::controller_ref_to(&rs, "apps/v1", "ReplicaSet");
        for name in &plan.adopt {
            let Some(p) = ctx.pods.get(&pod_res.key(ns.as_deref(), name)) else {
                continue;
            };
            // The stored pod is edited, at the version judged (the cache holds a part of it).
            let call = Call::internal(pod_res, ns.as_deref(), Some(name), None, MANAGER);
            let seen = owner::seen_version(&p);
            let adopted = ctx.api.update_with(&call, seen, |cur| {
                let mut next = cur.clone();
                let mut refs = owner::owner_refs(cur).to_vec();
                refs.push(rs_ref.clone());
                next["metadata"]["ownerReferences"] = json!(refs);
                Ok(next)
            });
            ignore_conflict(adopted.await)?;
        }
        for name in &plan.release {
            let Some(p) = ctx.pods.get(&pod_res.key(ns.as_deref(), name)) else {
                continue;
            };
            let call = Call::internal(pod_res, ns.as_deref(), Some(name), None, MANAGER);
            let seen = owner::seen_version(&p);
            let released = ctx.api.update_with(&call, seen, |cur| {
                let mut next = cur.clone();
                next["metadata"]["ownerReferences"] =
                    json!(owner::refs_without(cur, owner::uid(&rs)));
                Ok(next)
            });
            ignore_conflict(released.await)?;
        }
        if plan.create > 0 {
            self.expectations.expect(key, plan.create as i64, 0);
            let template = pod_from_template(&rs, "apps/v1", "ReplicaSet");
            let mut failed = None;
            // Slow start, as Kubernetes does: 1, 2, 4, ... at a time, stopping at the first
            // failure so a broken template does not flood the API.
            let mut left = plan.create;
            let mut batch = 1;
            while left > 0 && failed.is_none() {
                let n = batch.min(left);
                let calls = (0..n).map(|_| {
                    let call = Call::internal(pod_res, ns.as_deref(), None, None, MANAGER);
                    let body = template.clone();
                    async move { ctx.api.create_value(&call, body, false).await }
                });
                for r in futures::future::join_all(calls).await {
                    if let Err(e) = r {
                        self.expectations.created(key);
                        failed = Some(e);
                    }
                }
                left -= n;
                batch *= 2;
            }
            // Creations never attempted will never be seen.
            for _ in 0..left {
                self.expectations.created(key);
            }
            if let Some(e) = failed {
                ctx.events.warning(
                    &rs,
                    "FailedCreate",
                    &format!("Error creating: {}", e.message),
                );
                return Err(e);
            }
            ctx.events.normal(
                &rs,
                "SuccessfulCreate",
                &format!("Created {} pod(s)", plan.create),
            );
        }
        if !plan.delete.is_empty() {
            self.expectations.expect(key, 0, plan.delete.len() as i64);
            let calls = plan.delete.iter().map(|name| {
                let call = Call::internal(pod_res, ns.as_deref(), Some(name), None, MANAGER);
                async move { ctx.api.delete_value(&call, None).await }
            });
            let mut failed = None;
            for r in futures::future::join_all(calls).await {
                match r {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => self.expectations.deleted(key),
                    Err(e) => {
                        self.expectations.deleted(key);
                        failed = Some(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            ctx.events.normal(
                &rs,
                "SuccessfulDelete",
                &format!("Deleted {} pod(s)", plan.delete.len()),
            );
        }
        // Status: only when it changed.
        let current = rs.get("status").cloned().unwrap_or_else(|| json!({}));
        if !same_status(&current, &plan.status) {
            let mut next = (*rs).clone();
            next["status"] = plan.status.clone();
            let call = Call::internal(
                ctx.replicasets.resource(),
                ns.as_deref(),
                Some(owner::name(&rs)),
                Some("status"),
                MANAGER,
            );
            ignore_conflict(ctx.api.update_value(&call, next).await)?;
        }
        // Pods that become available after minReadySeconds need another look then.
        let min_ready = rs
            .ptr("/spec/minReadySeconds")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let ready = plan.status["readyReplicas"].as_u64().unwrap_or(0);
        let available = plan.status["availableReplicas"].as_u64().unwrap_or(0);
        Ok((min_ready > 0 && available < ready).then(|| Duration::from_secs(min_ready.min(60))))
    }
}

/// A status with the same counts (conditions compared too).
fn same_status(a: &Value, b: &Value) -> bool {
    [
        "replicas",
        "fullyLabeledReplicas",
        "readyReplicas",
        "availableReplicas",
        "observedGeneration",
        "conditions",
    ]
    .iter()
    .all(|k| {
        let x = a.get(*k).filter(|v| !v.is_null() && *v != &json!(0));
        let y = b.get(*k).filter(|v| !v.is_null() && *v != &json!(0));
        x == y
    })
}

/// A 409 (someone else changed the object) or 404 is not a failure: the informer will
/// bring the change and the key comes back.
pub(crate) fn ignore_conflict(r: Result<Value, KubeError>) -> Result<(), KubeError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if (e.code == 409 && e.reason == "Conflict" && !is_fenced(&e)) || e.code == 404 => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The write was refused because this replica's term is over.
pub(crate) fn is_fenced(e: &KubeError) -> bool {
    e.message.starts_with("fenced")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(replicas: i64) -> Value {
        json!({"metadata": {"name": "web", "namespace": "d", "uid": "rs-1", "generation": 2},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
    }

    fn pod(
        name: &str,
        owner: Option<&str>,
        labels: Value,
        node: Option<&str>,
        ready: bool,
    ) -> Arc<Value> {
        let mut p = json!({"metadata": {"name": name, "namespace": "d", "labels": labels, "creationTimestamp": "2026-11-25T00:00:00Z"},
                           "spec": {}, "status": {"phase": if node.is_some() {"Running"} else {"Pending"}}});
        if let Some(o) = owner {
            p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": o, "controller": true}]);
        }
        if let Some(n) = node {
            p["spec"]["nodeName"] = json!(n);
        }
        if ready {
            p["status"]["conditions"] = json!([{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-25T00:00:10Z"}]);
        }
        Arc::new(p)
    }

    #[test]
    fn too_few_pods_are_created_and_orphans_that_match_are_adopted() {
        let pods = vec![
            pod("a", Some("rs-1"), json!({"app": "web"}), Some("n1"), true),
            pod("orphan", None, json!({"app": "web"}), Some("n1"), false),
            pod(
                "other",
                Some("rs-2"),
                json!({"app": "web"}),
                Some("n1"),
                true,
            ),
            pod("stray", None, json!({"app": "db"}), None, false),
        ];
        let p = plan(&rs(4), &pods, true, 100);
        assert_eq!(p.adopt, ["orphan"]);
        assert_eq!(p.create, 2);
        assert!(p.delete.is_empty());
        assert_eq!(p.status["replicas"], 2);
        assert_eq!(p.status["readyReplicas"], 1);
        assert_eq!(p.status["observedGeneration"], 2);
    }

    #[test]
    fn too_many_pods_lose_the_unbound_and_unready_first() {
        let pods = vec![
            pod(
                "ready",
                Some("rs-1"),
                json!({"app": "web"}),
                Some("n1"),
                true,
            ),
            pod(
                "unready",
                Some("rs-1"),
                json!({"app": "web"}),
                Some("n1"),
                false,
            ),
            pod("unbound", Some("rs-1"), json!({"app": "web"}), None, false),
        ];
        let p = plan(&rs(1), &pods, true, 100);
        assert_eq!(p.delete, ["unbound", "unready"]);
        assert_eq!(p.create, 0);
    }

    #[test]
    fn nothing_is_created_or_deleted_while_expectations_are_pending() {
        let p = plan(&rs(3), &[], false, 100);
        assert_eq!(p.create, 0);
        let p = plan(&rs(3), &[], true, 100);
        assert_eq!(p.create, 3);
    }

    #[test]
    fn owned_pods_that_stop_matching_are_released_and_finished_ones_do_not_count() {
        let mut done = (*pod(
            "done",
            Some("rs-1"),
            json!({"app": "web"}),
            Some("n1"),
            false,
        ))
        .clone();
        done["status"]["phase"] = json!("Succeeded");
        let pods = vec![
            pod(
                "moved",
                Some("rs-1"),
                json!({"app": "other"}),
                Some("n1"),
                true,
            ),
            Arc::new(done),
        ];
        let p = plan(&rs(1), &pods, true, 100);
        assert_eq!(p.release, ["moved"]);
        assert_eq!(p.create, 1);
    }

    #[test]
    fn pods_from_the_template_carry_its_labels_and_a_controller_reference() {
        let p = pod_from_template(&rs(1), "apps/v1", "ReplicaSet");
        assert_eq!(p["metadata"]["generateName"], "web-");
        assert_eq!(p["metadata"]["labels"]["app"], "web");
        assert_eq!(p["metadata"]["ownerReferences"][0]["uid"], "rs-1");
        assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(p["spec"]["containers"][0]["image"], "x");
    }
}
