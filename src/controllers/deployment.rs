//! The Deployment controller: rolls each Deployment's pod template out through
//! ReplicaSets, one per template version, as Kubernetes does.
//!
//! The ReplicaSet of the current template (the "new" one) is named
//! `<deployment>-<pod-template-hash>` and carries the hash as a label in its selector and
//! template, so its pods never match another version's. [`rolling_plan`] and
//! [`recreate_plan`] are the decisions, pure functions of the Deployment and its
//! ReplicaSets: how many replicas each ReplicaSet should have now.
//! - RollingUpdate: the new ReplicaSet grows while the total stays within
//!   `replicas + maxSurge`; old ones shrink while at least `replicas - maxUnavailable` pods
//!   stay available (unhealthy old pods go first).
//! - Recreate: old ReplicaSets go to zero; the new one is scaled up once no old pod is left.
//!
//! Revisions: each ReplicaSet carries `deployment.kubernetes.io/revision`; the new one gets
//! the next number (a template rolled back to gets a new, higher one), which is what
//! `kubectl rollout history|undo` read. Old ReplicaSets at zero beyond
//! `revisionHistoryLimit` are deleted. A paused Deployment is only scaled, not rolled.
//! Status: replica counts over all its ReplicaSets, `observedGeneration`, and the
//! `Available` and `Progressing` conditions (with `ProgressDeadlineExceeded`).

use crate::api::meta::Ptr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::queue::Queue;
use super::replicaset::ignore_conflict;
use super::{owner, Ctx};
use crate::api::selector::LabelSelector;
use crate::api::status::KubeError;
use crate::api::{meta, Call};

/// The field manager this controller writes as.
pub const MANAGER: &str = "deployment-controller";
/// The label that ties a ReplicaSet and its pods to one template version.
pub const HASH_LABEL: &str = "pod-template-hash";
/// A ReplicaSet's (and its Deployment's) revision.
pub const REVISION: &str = "deployment.kubernetes.io/revision";

/// The hash of a pod template (FNV-1a over its canonical JSON, in Kubernetes' safe
/// alphabet), used in the new ReplicaSet's name and label.
pub fn template_hash(template: &Value) -> String {
    let mut t = template.clone();
    if let Some(l) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        l.remove(HASH_LABEL);
    }
    strip_nulls(&mut t);
    let text = serde_json::to_string(&t).expect("JSON serializes");
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = String::new();
    let mut n = h;
    for _ in 0..10 {
        out.push(ALPHABET[(n % ALPHABET.len() as u32) as usize] as char);
        n /= ALPHABET.len() as u32;
        if n == 0 {
            break;
        }
    }
    out
}

/// Removes `null` fields (an absent field and a null one are the same template; kubectl
/// sends `creationTimestamp: null` in templates it copies back on `rollout undo`).
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// An int-or-percent of `total`: percentages round up for surge, down for unavailable.
pub(crate) fn int_or_percent(v: Option<&Value>, total: i64, round_up: bool, default: &str) -> i64 {
    let v = v.cloned().unwrap_or_else(|| json!(default));
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0).max(0),
        Value::String(s) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(p) => {
                let x = p * total;
                (if round_up { (x + 99) / 100 } else { x / 100 }).max(0)
            }
            None => s.parse().unwrap_or(0),
        },
        _ => 0,
    }
}

/// `spec.replicas` of an object.
fn spec_replicas(obj: &Value) -> i64 {
    obj.ptr("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0)
}

fn status_count(obj: &Value, field: &str) -> i64 {
    obj.ptr(&format!("/status/{field}"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// (maxSurge, maxUnavailable) of a RollingUpdate Deployment.
pub fn surge_and_unavailable(d: &Value) -> (i64, i64) {
    let replicas = spec_replicas(d);
    let ru = d.ptr("/spec/strategy/rollingUpdate");
    let surge = int_or_percent(ru.and_then(|r| r.get("maxSurge")), replicas, true, "25%");
    let mut unavailable = int_or_percent(
        ru.and_then(|r| r.get("maxUnavailable")),
        replicas,
        false,
        "25%",
    );
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable.min(replicas))
}

/// The replica count each ReplicaSet should have (new first, then the old ones in the order
/// given, oldest first), for a RollingUpdate step.
pub fn rolling_plan(d: &Value, new_rs: &Value, old: &[&Value]) -> (i64, Vec<i64>) {
    let replicas = spec_replicas(d);
    let (surge, max_unavailable) = surge_and_unavailable(d);
    let mut new_count = spec_replicas(new_rs);
    let mut old_counts: Vec<i64> = old.iter().map(|r| spec_replicas(r)).collect();
    // Scale up the new ReplicaSet within the surge.
    let all: i64 = new_count + old_counts.iter().sum::<i64>();
    if new_count > replicas {
        new_count = replicas;
    } else if all < replicas + surge && new_count < replicas {
        new_count = (new_count + (replicas + surge - all)).min(replicas);
    }
    // Scale down old ReplicaSets while enough pods stay available.
    let old_total: i64 = old_counts.iter().sum();
    if old_total > 0 {
        let all_pods = spec_replicas(new_rs) + old_total;
        let min_available = replicas - max_unavailable;
        let new_unavailable =
            (spec_replicas(new_rs) - status_count(new_rs, "availableReplicas")).max(0);
        let mut budget = all_pods - min_available - new_unavailable;
        // Unhealthy old pods first: they cost no availability.
        for (i, rs) in old.iter().enumerate() {
            if budget <= 0 {
                break;
            }
            let unhealthy = (old_counts[i] - status_count(rs, "availableReplicas")).max(0);
            let cut = unhealthy.min(budget).min(old_counts[i]);
            old_counts[i] -= cut;
            budget -= cut;
        }
        // Then healthy ones, as far as availability allows.
        let available: i64 = status_count(new_rs, "availableReplicas")
            + old
                .iter()
                .enumerate()
                .map(|(i, rs)| status_count(rs, "availableReplicas").min(old_counts[i]))
                .sum::<i64>();
        let mut cut_total = (available - min_available).max(0).min(budget.max(0));
        for c in old_counts.iter_mut() {
            if cut_total <= 0 {
                break;
            }
            let cut = (*c).min(cut_total);
            *c -= cut;
            cut_total -= cut;
        }
    }
    (new_count, old_counts)
}

/// The replica counts for a Recreate step: old ReplicaSets to zero; the new one to
/// `replicas` once no old pod is active.
pub fn recreate_plan(
    d: &Value,
    _new_rs: &Value,
    old: &[&Value],
    old_pods_active: usize,
) -> (i64, Vec<i64>) {
    let old_counts = vec![0; old.len()];
    let new_count = if old_pods_active == 0 && old.iter().all(|r| status_count(r, "replicas") == 0)
    {
        spec_replicas(d)
    } else {
        0
    };
    (new_count, old_counts)
}

/// The Deployment controller of one term.
pub struct Controller {
    pub(crate) queue: Arc<Queue>,
}

fn revision(obj: &Value) -> i64 {
    obj.ptr("/metadata/annotations")
        .and_then(|a| a.get(REVISION))
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

impl Controller {
    /// A Deployment change queues it; a ReplicaSet change queues its owning Deployment.
    pub fn new(ctx: &Ctx) -> Controller {
        let queue = Arc::new(Queue::default());
        {
            let q = queue.clone();
            ctx.deployments.subscribe(move |c| q.add(c.key));
        }
        {
            let q = queue.clone();
            let dres = ctx.deployments.resource();
            ctx.replicasets.subscribe(move |c| {
                for obj in [c.old, c.new].into_iter().flatten() {
                    if let Some(r) = owner::controller_ref(obj)
                        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("Deployment"))
                    {
                        if let Some(n) = r.get("name").and_then(Value::as_str) {
                            q.add(&dres.key(owner::namespace(obj), n));
                        }
                    }
                }
            });
        }
        Controller { queue }
    }

    /// Reconciles one Deployment by store key.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some(d) = ctx.deployments.get(key) else {
            return Ok(None);
        };
        if owner::is_deleting(&d) {
            return Ok(None);
        }
        let ns = owner::namespace(&d).map(str::to_string);
        let uid = owner::uid(&d).to_string();
        let rs_res = ctx.replicasets.resource();
        let mut owned: Vec<Arc<Value>> = ctx
            .replicasets
            .in_namespace(ns.as_deref())
            .into_iter()
            .filter(|rs| owner::controller_uid(rs) == Some(uid.as_str()))
            .collect();
        owned.sort_by_key(|rs| {
            (
                owner::created_secs(rs),
                revision(rs),
                owner::name(rs).to_string(),
            )
        });
        let template = d
            .ptr("/spec/template")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let hash = template_hash(&template);
        let paused = d.ptr("/spec/paused").and_then(Value::as_bool) == Some(true);
        let max_revision = owned.iter().map(|r| revision(r)).max().unwrap_or(0);
        // The ReplicaSet whose template is the Deployment's (compared as templates, not by
        // the label, so a template copied back by `rollout undo` finds its old ReplicaSet).
        let mut new_rs = owned
            .iter()
            .find(|rs| {
                rs.ptr("/spec/template")
                    .is_some_and(|t| template_hash(t) == hash)
            })
            .cloned();
        // Ensure the new ReplicaSet exists, with the newest revision.
        if !paused {
            match &new_rs {
                None => {
                    let rs = self.new_replicaset(&d, &template, &hash, max_revision + 1, &owned);
                    let call = Call::internal(rs_res, ns.as_deref(), None, None, MANAGER);
                    match ctx.api.create_value(&call, rs, false).await {
                        Ok(created) => {
                            ctx.events.normal(
                                &d,
                                "ScalingReplicaSet",
                                &format!(
                                    "Scaled up replica set {} to {}",
                                    owner::name(&created),
                                    spec_replicas(&created)
                                ),
                            );
                            new_rs = Some(Arc::new(created));
                        }
                        // Created by this controller before (the informer has not seen it):
                        // come back when it has.
                        Err(e) if e.reason == "AlreadyExists" => {
                            return Ok(Some(Duration::from_millis(50)))
                        }
                        Err(e) => return Err(e),
                    }
                }
                Some(rs) if revision(rs) < max_revision => {
                    // Rolled back to an older template: it becomes the newest revision.
                    let mut next = (**rs).clone();
                    next["metadata"]["annotations"][REVISION] =
                        json!((max_revision + 1).to_string());
                    let call =
                        Call::internal(rs_res, ns.as_deref(), Some(owner::name(rs)), None, MANAGER);
                    let updated = ctx.api.update_value(&call, next).await?;
                    new_rs = Some(Arc::new(updated));
                }
                Some(_) => {}
            }
        }
        let old: Vec<Arc<Value>> = owned
            .iter()
            .filter(|rs| {
                new_rs
                    .as_ref()
                    .is_none_or(|n| owner::uid(n) != owner::uid(rs))
            })
            .cloned()
            .collect();
        let replicas = spec_replicas(&d);
        // Decide the replica counts.
        let targets: Vec<(Arc<Value>, i64)> = match (&new_rs, paused) {
            (Some(n), false) => {
                let old_refs: Vec<&Value> = old.iter().map(|r| r.as_ref()).collect();
                let strategy = d
                    .ptr("/spec/strategy/type")
                    .and_then(Value::as_str)
                    .unwrap_or("RollingUpdate");
                let (nc, oc) = if strategy == "Recreate" {
                    let old_uids: Vec<&str> = old.iter().map(|r| owner::uid(r)).collect();
                    let active_old = ctx
                        .pods
                        .filter(|p| {
                            owner::controller_uid(p).is_some_and(|u| old_uids.contains(&u))
                                && super::pod::is_active(p)
                        })
                        .len();
                    recreate_plan(&d, n, &old_refs, active_old)
                } else {
                    rolling_plan(&d, n, &old_refs)
                };
                std::iter::once((n.clone(), nc))
                    .chain(old.iter().cloned().zip(oc))
                    .collect()
            }
            // Paused (or no new ReplicaSet): only keep the total at `replicas`, on the newest.
            _ => {
                let total: i64 = owned.iter().map(|r| spec_replicas(r)).sum();
                match owned.last() {
                    Some(latest) if total != replicas => {
                        let others = total - spec_replicas(latest);
                        vec![(latest.clone(), (replicas - others).max(0))]
                    }
                    _ => Vec::new(),
                }
            }
        };
        let mut changed = false;
        for (rs, count) in &targets {
            if spec_replicas(rs) == *count {
                continue;
            }
            let mut next = (**rs).clone();
            next["spec"]["replicas"] = json!(count);
            next["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] =
                json!(replicas.to_string());
            let call = Call::internal(rs_res, ns.as_deref(), Some(owner::name(rs)), None, MANAGER);
            ignore_conflict(ctx.api.update_value(&call, next).await)?;
            ctx.events.normal(
                &d,
                "ScalingReplicaSet",
                &format!(
                    "Scaled {} replica set {} to {count}",
                    if *count > spec_replicas(rs) {
                        "up"
                    } else {
                        "down"
                    },
                    owner::name(rs)
                ),
            );
            changed = true;
        }
        // History: old ReplicaSets at zero beyond the limit go, oldest first.
        let limit = d
            .ptr("/spec/revisionHistoryLimit")
            .and_then(Value::as_i64)
            .unwrap_or(10)
            .max(0) as usize;
        let idle: Vec<&Arc<Value>> = old
            .iter()
            .filter(|rs| {
                spec_replicas(rs) == 0
                    && status_count(rs, "replicas") == 0
                    && !owner::is_deleting(rs)
            })
            .collect();
        if idle.len() > limit {
            for rs in &idle[..idle.len() - limit] {
                let call =
                    Call::internal(rs_res, ns.as_deref(), Some(owner::name(rs)), None, MANAGER);
                ignore_conflict(ctx.api.delete_value(&call, None).await)?;
            }
        }
        // The Deployment's revision annotation follows the new ReplicaSet's.
        if let Some(n) = &new_rs {
            let want = revision(n).to_string();
            let have = d
                .ptr("/metadata/annotations")
                .and_then(|a| a.get(REVISION))
                .and_then(Value::as_str);
            if have != Some(want.as_str()) && revision(n) > 0 {
                let mut next = (*d).clone();
                next["metadata"]["annotations"][REVISION] = json!(want);
                let call = Call::internal(
                    ctx.deployments.resource(),
                    ns.as_deref(),
                    Some(owner::name(&d)),
                    None,
                    MANAGER,
                );
                ignore_conflict(ctx.api.update_value(&call, next).await)?;
                return Ok(Some(Duration::ZERO));
            }
        }
        self.update_status(ctx, &d, new_rs.as_deref(), &owned, paused)
            .await?;
        // While a rollout is under way, look again soon (availability moves with time).
        let done = new_rs.as_ref().is_some_and(|n| {
            status_count(n, "availableReplicas") == replicas
                && old.iter().all(|r| status_count(r, "replicas") == 0)
        });
        Ok((!done || changed).then(|| Duration::from_secs(1)))
    }

    fn new_replicaset(
        &self,
        d: &Value,
        template: &Value,
        hash: &str,
        revision: i64,
        _owned: &[Arc<Value>],
    ) -> Value {
        let mut template = template.clone();
        template["metadata"]["labels"][HASH_LABEL] = json!(hash);
        let mut selector = d
            .ptr("/spec/selector")
            .cloned()
            .unwrap_or_else(|| json!({}));
        selector["matchLabels"][HASH_LABEL] = json!(hash);
        let mut labels = template
            .ptr("/metadata/labels")
            .cloned()
            .unwrap_or_else(|| json!({}));
        labels[HASH_LABEL] = json!(hash);
        let replicas = spec_replicas(d);
        let strategy = d
            .ptr("/spec/strategy/type")
            .and_then(Value::as_str)
            .unwrap_or("RollingUpdate");
        // Start at zero and let the strategy scale it (a first rollout has no old pods, so
        // the rolling plan takes it straight to `replicas` within the surge).
        let _ = strategy;
        let (surge, _) = surge_and_unavailable(d);
        json!({
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": format!("{}-{hash}", owner::name(d)),
                "namespace": owner::namespace(d),
                "labels": labels,
                "annotations": {
                    REVISION: revision.to_string(),
                    "deployment.kubernetes.io/desired-replicas": replicas.to_string(),
                    "deployment.kubernetes.io/max-replicas": (replicas + surge).to_string(),
                },
                "ownerReferences": [owner::controller_ref_to(d, "apps/v1", "Deployment")],
            },
            "spec": {
                "replicas": 0,
                "minReadySeconds": d.ptr("/spec/minReadySeconds").cloned().unwrap_or(json!(0)),
                "selector": selector,
                "template": template,
            },
        })
    }

    async fn update_status(
        &self,
        ctx: &Ctx,
        d: &Value,
        new_rs: Option<&Value>,
        owned: &[Arc<Value>],
        paused: bool,
    ) -> Result<(), KubeError> {
        let replicas = spec_replicas(d);
        let sum = |f: &str| owned.iter().map(|r| status_count(r, f)).sum::<i64>();
        let updated = new_rs.map(|n| status_count(n, "replicas")).unwrap_or(0);
        let available = sum("availableReplicas");
        let (_, max_unavailable) = surge_and_unavailable(d);
        let now = meta::rfc3339(meta::now_secs());
        let old_conds: Vec<Value> = d
            .ptr("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let find = |t: &str| {
            old_conds
                .iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some(t))
                .cloned()
        };
        let cond = |t: &str, status: &str, reason: &str, message: String| {
            let prev = find(t);
            let same = prev.as_ref().is_some_and(|p| {
                p.get("status").and_then(Value::as_str) == Some(status)
                    && p.get("reason").and_then(Value::as_str) == Some(reason)
            });
            let transition = match (&prev, same) {
                (Some(p), true) => p.get("lastTransitionTime").cloned().unwrap_or(json!(now)),
                (Some(p), false) if p.get("status").and_then(Value::as_str) == Some(status) => {
                    p.get("lastTransitionTime").cloned().unwrap_or(json!(now))
                }
                _ => json!(now),
            };
            let update = if same {
                prev.as_ref()
                    .and_then(|p| p.get("lastUpdateTime").cloned())
                    .unwrap_or(json!(now))
            } else {
                json!(now)
            };
            json!({"type": t, "status": status, "reason": reason, "message": message,
                   "lastUpdateTime": update, "lastTransitionTime": transition})
        };
        let available_cond = if available >= replicas - max_unavailable {
            cond(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
            )
        } else {
            cond(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
            )
        };
        let complete = new_rs.is_some_and(|n| {
            status_count(n, "availableReplicas") >= replicas && spec_replicas(n) == replicas
        }) && owned
            .iter()
            .filter(|r| new_rs.is_none_or(|n| owner::uid(n) != owner::uid(r)))
            .all(|r| status_count(r, "replicas") == 0);
        let new_name = new_rs.map(owner::name).unwrap_or("");
        let deadline = d
            .ptr("/spec/progressDeadlineSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(600);
        let progressing_cond = if paused {
            cond(
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused".into(),
            )
        } else if complete {
            cond(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            )
        } else {
            // Progress is any change in the counts; without one for the deadline, it failed.
            let prev = find("Progressing");
            let counts_changed = d.get("status").map(|s| {
                (
                    s.get("updatedReplicas"),
                    s.get("availableReplicas"),
                    s.get("replicas"),
                )
            }) != Some((
                Some(&json!(updated)),
                Some(&json!(available)),
                Some(&json!(sum("replicas"))),
            ));
            let last = prev
                .as_ref()
                .and_then(|p| p.get("lastUpdateTime"))
                .and_then(Value::as_str)
                .and_then(meta::parse_rfc3339)
                .unwrap_or_else(meta::now_secs);
            let was_failed = prev
                .as_ref()
                .and_then(|p| p.get("reason"))
                .and_then(Value::as_str)
                == Some("ProgressDeadlineExceeded");
            if !counts_changed && !was_failed && meta::now_secs() > last + deadline {
                cond(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                )
            } else if was_failed && !counts_changed {
                prev.expect("was failed")
            } else {
                let mut c = cond(
                    "Progressing",
                    "True",
                    "ReplicaSetUpdated",
                    format!("ReplicaSet \"{new_name}\" is progressing."),
                );
                if counts_changed {
                    c["lastUpdateTime"] = json!(now);
                }
                c
            }
        };
        let status = json!({
            "observedGeneration": d.ptr("/metadata/generation").and_then(Value::as_i64).unwrap_or(1),
            "replicas": sum("replicas"),
            "updatedReplicas": updated,
            "readyReplicas": sum("readyReplicas"),
            "availableReplicas": available,
            "unavailableReplicas": (replicas - available).max(0),
            "conditions": [available_cond, progressing_cond],
        });
        let current = d.get("status").cloned().unwrap_or_else(|| json!({}));
        if strip_times(&current) == strip_times(&status) {
            return Ok(());
        }
        let mut next = d.clone();
        next["status"] = status;
        let call = Call::internal(
            ctx.deployments.resource(),
            owner::namespace(d),
            Some(owner::name(d)),
            Some("status"),
            MANAGER,
        );
        ignore_conflict(ctx.api.update_value(&call, next).await)
    }
}

/// A status without condition timestamps and zero counts (what decides whether to write).
fn strip_times(s: &Value) -> Value {
    let mut s = s.clone();
    if let Some(conds) = s.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastUpdateTime");
                o.remove("lastTransitionTime");
            }
        }
    }
    if let Some(o) = s.as_object_mut() {
        o.retain(|_, v| *v != json!(0));
    }
    s
}

/// True if `rs`'s pods match the Deployment's selector (for adoption checks).
pub fn selects(d: &Value, rs: &Value) -> bool {
    LabelSelector::from_object(d.ptr("/spec/selector"))
        .filter(|s| !s.is_empty())
        .is_some_and(|s| s.matches(rs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(replicas: i64, surge: Value, unavailable: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "d", "uid": "d1", "generation": 1},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}},
                        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}})
    }

    fn rs(replicas: i64, available: i64) -> Value {
        json!({"spec": {"replicas": replicas}, "status": {"replicas": replicas, "availableReplicas": available}})
    }

    #[test]
    fn percentages_round_as_kubernetes_does() {
        let d = deploy(10, json!("25%"), json!("25%"));
        assert_eq!(surge_and_unavailable(&d), (3, 2));
        let d = deploy(3, json!(0), json!(0));
        assert_eq!(surge_and_unavailable(&d), (0, 1));
    }

    #[test]
    fn a_first_rollout_goes_straight_to_the_desired_count() {
        let d = deploy(10, json!("25%"), json!("25%"));
        assert_eq!(rolling_plan(&d, &rs(0, 0), &[]), (10, vec![]));
    }

    #[test]
    fn a_rolling_update_surges_then_trades_old_for_available_new() {
        let d = deploy(10, json!(2), json!(1));
        let old = rs(10, 10);
        // Step 1: surge 2 new pods; old may lose 1 (max unavailable) at most.
        let (n, o) = rolling_plan(&d, &rs(0, 0), &[&old]);
        assert_eq!(n, 2);
        assert_eq!(o, vec![9]);
        // New pods became available: the old set shrinks by what availability allows.
        let (n, o) = rolling_plan(&d, &rs(2, 2), &[&rs(9, 9)]);
        assert_eq!(n, 3);
        assert_eq!(o, vec![7]);
        // Unhealthy old pods go first; availability then allows no more.
        let (_, o) = rolling_plan(&d, &rs(2, 2), &[&rs(9, 6)]);
        assert_eq!(o, vec![7]);
        // New pods not yet available hold the old ones back entirely.
        let (_, o) = rolling_plan(&d, &rs(3, 0), &[&rs(9, 9)]);
        assert_eq!(o, vec![9]);
    }

    #[test]
    fn recreate_waits_for_old_pods_to_be_gone() {
        let d = deploy(3, json!(1), json!(1));
        let old = rs(3, 3);
        assert_eq!(recreate_plan(&d, &rs(0, 0), &[&old], 3), (0, vec![0]));
        let old_gone = rs(0, 0);
        assert_eq!(recreate_plan(&d, &rs(0, 0), &[&old_gone], 0), (3, vec![0]));
    }

    #[test]
    fn the_template_hash_ignores_its_own_label_and_changes_with_the_template() {
        let d = deploy(1, json!(1), json!(1));
        let t = d.ptr("/spec/template").unwrap().clone();
        let h = template_hash(&t);
        let mut labeled = t.clone();
        labeled["metadata"]["labels"][HASH_LABEL] = json!(h);
        assert_eq!(template_hash(&labeled), h);
        let mut changed = t.clone();
        changed["spec"]["containers"][0]["image"] = json!("x:2");
        assert_ne!(template_hash(&changed), h);
        assert!(h.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
        let mut nulled = t.clone();
        nulled["metadata"]["creationTimestamp"] = Value::Null;
        assert_eq!(template_hash(&nulled), h, "null fields are absent fields");
    }
}
