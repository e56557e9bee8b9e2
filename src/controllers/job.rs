//! The Job controller: runs pods until `completions` of them succeed, at most `parallelism`
//! at a time, giving up after `backoffLimit` failures or `activeDeadlineSeconds`.
//!
//! [`plan`] is the decision, a pure function of the Job, its pods and the time: how many
//! pods (or which completion indexes) to start, which to stop, and the status to report.
//! Failed pods are replaced after an exponential backoff (base `--job-backoff-seconds`,
//! 10 s by default as in Kubernetes, doubling up to 6 minutes), counted from the last
//! failure. A finished Job (`Complete` or `Failed`) keeps no running pods and, with
//! `ttlSecondsAfterFinished`, is deleted (with its pods) that long after it finished.
//!
//! Counts come from the pods themselves (finished pods are kept until the Job goes), so a
//! pod deleted by hand after it finished is no longer counted (Kubernetes tracks them with
//! a finalizer; see the maintainers' guide).

use crate::api::meta::Ptr;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::queue::{Expectations, Queue};
use super::replicaset::{ignore_conflict, pod_from_template};
use super::{owner, pod, Ctx};
use crate::api::status::KubeError;
use crate::api::{meta, Call};

/// The field manager this controller writes as.
pub const MANAGER: &str = "job-controller";
/// The annotation (and env var) carrying an indexed pod's completion index.
pub const INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// Longest backoff before replacing a failed pod.
const MAX_BACKOFF_SECS: u64 = 360;

/// What to do for one Job.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Pods to create: completion indexes for an Indexed Job, `None`s otherwise.
    pub create: Vec<Option<i64>>,
    /// Active pods to delete (names).
    pub delete: Vec<String>,
    /// The status to write.
    pub status: Value,
    /// When to look again (seconds from now), for a backoff, deadline or TTL.
    pub again_secs: Option<u64>,
    /// Delete the Job itself (its TTL after finishing ran out).
    pub delete_job: bool,
}

fn int(v: Option<&Value>, default: i64) -> i64 {
    v.and_then(Value::as_i64).unwrap_or(default)
}

fn condition_true(job: &Value, kind: &str) -> bool {
    job.ptr("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some(kind)
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

fn index_of(p: &Value) -> Option<i64> {
    p.ptr("/metadata/annotations")
        .and_then(|a| a.get(INDEX))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

/// `0-2,4` for {0,1,2,4}.
pub fn format_indexes(set: &BTreeSet<i64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().expect("peeked");
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

/// The decision for `job` given its pods, at wall-clock second `now`.
pub fn plan(job: &Value, pods: &[Arc<Value>], now: u64, backoff_base_secs: u64) -> Plan {
    let spec = job.get("spec").cloned().unwrap_or_else(|| json!({}));
    let completions = spec.get("completions").and_then(Value::as_i64);
    let parallelism = int(spec.get("parallelism"), 1).max(0);
    let backoff_limit = int(spec.get("backoffLimit"), 6).max(0);
    let indexed = spec.get("completionMode").and_then(Value::as_str) == Some("Indexed");
    let suspended = spec.get("suspend").and_then(Value::as_bool) == Some(true);
    let on_failure = spec
        .ptr("/template/spec/restartPolicy")
        .and_then(Value::as_str)
        == Some("OnFailure");
    let active: Vec<&Arc<Value>> = pods.iter().filter(|p| pod::is_active(p)).collect();
    let succeeded_pods: Vec<&Arc<Value>> = pods
        .iter()
        .filter(|p| pod::phase(p) == "Succeeded")
        .collect();
    let failed_pods: Vec<&Arc<Value>> = pods.iter().filter(|p| pod::phase(p) == "Failed").collect();
    let restarts: i64 = if on_failure {
        active
            .iter()
            .map(|p| {
                p.ptr("/status/containerStatuses")
                    .and_then(Value::as_array)
                    .map(|cs| {
                        cs.iter()
                            .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                            .sum::<i64>()
                    })
                    .unwrap_or(0)
            })
            .sum()
    } else {
        0
    };
    let failures = failed_pods.len() as i64 + restarts;
    let completed: BTreeSet<i64> = succeeded_pods.iter().filter_map(|p| index_of(p)).collect();
    let succeeded = if indexed {
        completed.len() as i64
    } else {
        succeeded_pods.len() as i64
    };
    let ready = active.iter().filter(|p| pod::is_ready(p)).count();
    let start = job
        .ptr("/status/startTime")
        .and_then(Value::as_str)
        .and_then(meta::parse_rfc3339);
    let mut out = Plan::default();
    let mut conditions: Vec<Value> = job
        .ptr("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let stamp = meta::rfc3339(now);
    let finish = |conditions: &mut Vec<Value>, kind: &str, reason: &str, message: &str| {
        conditions.retain(|c| c.get("type").and_then(Value::as_str) != Some(kind));
        conditions.push(
            json!({"type": kind, "status": "True", "reason": reason, "message": message,
                               "lastProbeTime": stamp, "lastTransitionTime": stamp}),
        );
    };
    let was_finished = condition_true(job, "Complete") || condition_true(job, "Failed");
    let mut finished_now = false;
    let mut completion_time = job.ptr("/status/completionTime").cloned();
    if !was_finished {
        let deadline = spec.get("activeDeadlineSeconds").and_then(Value::as_u64);
        if failures > backoff_limit {
            finish(
                &mut conditions,
                "Failed",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            );
            finished_now = true;
        } else if let (Some(d), Some(s)) = (deadline, start) {
            if s + d <= now {
                finish(
                    &mut conditions,
                    "Failed",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                );
                finished_now = true;
            } else {
                out.again_secs = Some(s + d - now);
            }
        }
        if !finished_now {
            let done = match completions {
                Some(c) => succeeded >= c,
                // A work queue: done once one succeeded and none is still running.
                None => succeeded > 0 && active.is_empty(),
            };
            if done {
                finish(&mut conditions, "Complete", "", "");
                // Complete carries no reason in Kubernetes; drop the empty strings.
                if let Some(c) = conditions.last_mut().and_then(Value::as_object_mut) {
                    c.remove("reason");
                    c.remove("message");
                }
                completion_time = Some(json!(stamp));
                finished_now = true;
            }
        }
    }
    let finished = was_finished || finished_now;
    if finished || suspended {
        out.delete = active.iter().map(|p| owner::name(p).to_string()).collect();
    } else {
        // How many should run now.
        let remaining = completions.map_or(parallelism, |c| (c - succeeded).max(0));
        let want = parallelism.min(remaining);
        let have = active.len() as i64;
        // After a failure, wait out the backoff before starting replacements.
        let last_failure = failed_pods
            .iter()
            .filter_map(|p| {
                p.ptr("/status/containerStatuses/0/state/terminated/finishedAt")
                    .or_else(|| p.ptr("/metadata/deletionTimestamp"))
                    .and_then(Value::as_str)
                    .and_then(meta::parse_rfc3339)
                    .or_else(|| Some(owner::created_secs(p)))
            })
            .max();
        let backoff = if failures == 0 || backoff_base_secs == 0 {
            0
        } else {
            (backoff_base_secs << (failures - 1).clamp(0, 20) as u32).min(MAX_BACKOFF_SECS)
        };
        let ready_at = last_failure.map_or(0, |t| t + backoff);
        if have < want {
            if ready_at > now {
                out.again_secs = Some(
                    out.again_secs
                        .map_or(ready_at - now, |a| a.min(ready_at - now)),
                );
            } else if indexed {
                let running: BTreeSet<i64> = active.iter().filter_map(|p| index_of(p)).collect();
                let total = completions.unwrap_or(parallelism);
                out.create = (0..total)
                    .filter(|i| !completed.contains(i) && !running.contains(i))
                    .take((want - have) as usize)
                    .map(Some)
                    .collect();
            } else {
                out.create = vec![None; (want - have) as usize];
            }
        } else if have > want {
            let mut extra: Vec<&Arc<Value>> = active.clone();
            extra.sort_by(|a, b| pod::deletion_order(a, b));
            out.delete = extra
                .iter()
                .take((have - want) as usize)
                .map(|p| owner::name(p).to_string())
                .collect();
        }
    }
    if let (true, Some(ttl)) = (
        finished,
        spec.get("ttlSecondsAfterFinished").and_then(Value::as_u64),
    ) {
        let done_at = completion_time
            .as_ref()
            .and_then(Value::as_str)
            .and_then(meta::parse_rfc3339)
            .or_else(|| {
                conditions.iter().find_map(|c| {
                    c.get("lastTransitionTime")
                        .and_then(Value::as_str)
                        .and_then(meta::parse_rfc3339)
                })
            })
            .unwrap_or(now);
        if done_at + ttl <= now {
            out.delete_job = true;
        } else {
            out.again_secs = Some(done_at + ttl - now);
        }
    }
    let mut status = json!({
        "active": if finished { 0 } else { active.len() },
        "succeeded": succeeded,
        "failed": failed_pods.len(),
        "ready": ready,
        "conditions": conditions,
    });
    if suspended && !finished {
        status["conditions"] = json!(conditions
            .iter()
            .filter(|c| c.get("type").and_then(Value::as_str) != Some("Suspended"))
            .cloned()
            .chain(std::iter::once(json!({"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended", "lastProbeTime": stamp, "lastTransitionTime": stamp})))
            .collect::<Vec<_>>());
    }
    match start {
        Some(s) => status["startTime"] = json!(meta::rfc3339(s)),
        None if !suspended => status["startTime"] = json!(stamp),
        None => {}
    }
    if let Some(t) = completion_time {
        status["completionTime"] = t;
    }
    if indexed {
        status["completedIndexes"] = json!(format_indexes(&completed));
    }
    out.status = status;
    out
}

/// The Job controller of one term.
pub struct Controller {
    pub(crate) queue: Arc<Queue>,
    expectations: Arc<Expectations>,
    backoff_base_secs: u64,
}

impl Controller {
    /// A Job change queues it; a pod change queues its Job.
    pub fn new(ctx: &Ctx) -> Controller {
        let queue = Arc::new(Queue::default());
        let expectations = Arc::new(Expectations::default());
        {
            let q = queue.clone();
            let e = expectations.clone();
            ctx.jobs.subscribe(move |c| {
                if c.new.is_none() {
                    e.remove(c.key);
                }
                q.add(c.key);
            });
        }
        {
            let (q, e) = (queue.clone(), expectations.clone());
            let jres = ctx.jobs.resource();
            ctx.pods.subscribe(move |c| {
                // Every Job is queued by its own replay (and nothing is expected yet).
                if c.replay {
                    return;
                }
                let obj = c.new.or(c.old).expect("a change has an object");
                let Some(name) = owner::controller_ref(obj)
                    .filter(|r| r.get("kind").and_then(Value::as_str) == Some("Job"))
                    .and_then(|r| r.get("name").and_then(Value::as_str))
                else {
                    return;
                };
                let key = jres.key(owner::namespace(obj), name);
                match (c.old, c.new) {
                    (None, Some(_)) => e.created(&key),
                    (Some(_), None) => e.deleted(&key),
                    _ => {}
                }
                q.add(&key);
            });
        }
        Controller {
            queue,
            expectations,
            backoff_base_secs: ctx.config.job_backoff.as_secs(),
        }
    }

    /// Reconciles one Job by store key.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some(job) = ctx.jobs.get(key) else {
            self.expectations.remove(key);
            return Ok(None);
        };
        if owner::is_deleting(&job) {
            return Ok(None);
        }
        let ns = owner::namespace(&job).map(str::to_string);
        let uid = owner::uid(&job).to_string();
        let pods: Vec<Arc<Value>> = ctx
            .pods
            .in_namespace(ns.as_deref())
            .into_iter()
            .filter(|p| owner::controller_uid(p) == Some(uid.as_str()))
            .collect();
        let now = meta::now_secs();
        let plan = plan(&job, &pods, now, self.backoff_base_secs);
        let pod_res = ctx.pods.resource();
        if plan.delete_job {
            let call = Call::internal(
                ctx.jobs.resource(),
                ns.as_deref(),
                Some(owner::name(&job)),
                None,
                MANAGER,
            );
            ignore_conflict(
                ctx.api
                    .delete_value(&call, Some(json!({"propagationPolicy": "Background"})))
                    .await,
            )?;
            return Ok(None);
        }
        let manage = self.expectations.satisfied(key);
        if manage && !plan.create.is_empty() {
            self.expectations.expect(key, plan.create.len() as i64, 0);
            let mut failed = None;
            for index in &plan.create {
                let mut p = pod_from_template(&job, "batch/v1", "Job");
                if let Some(i) = index {
                    p["metadata"]["generateName"] = json!(format!("{}-{i}-", owner::name(&job)));
                    p["metadata"]["annotations"][INDEX] = json!(i.to_string());
                    p["metadata"]["labels"][INDEX] = json!(i.to_string());
                    p["spec"]["hostname"] = json!(format!("{}-{i}", owner::name(&job)));
                    if let Some(cs) = p
                        .pointer_mut("/spec/containers")
                        .and_then(Value::as_array_mut)
                    {
                        for c in cs {
                            let mut env = c
                                .get("env")
                                .and_then(Value::as_array)
                                .cloned()
                                .unwrap_or_default();
                            env.push(
                                json!({"name": "JOB_COMPLETION_INDEX", "value": i.to_string()}),
                            );
                            c["env"] = json!(env);
                        }
                    }
                }
                let call = Call::internal(pod_res, ns.as_deref(), None, None, MANAGER);
                if let Err(e) = ctx.api.create_value(&call, p, false).await {
                    self.expectations.created(key);
                    failed = Some(e);
                }
            }
            if let Some(e) = failed {
                ctx.events.warning(
                    &job,
                    "FailedCreate",
                    &format!("Error creating: {}", e.message),
                );
                return Err(e);
            }
            ctx.events.normal(
                &job,
                "SuccessfulCreate",
                &format!("Created {} pod(s)", plan.create.len()),
            );
        }
        for name in &plan.delete {
            let call = Call::internal(pod_res, ns.as_deref(), Some(name), None, MANAGER);
            ignore_conflict(ctx.api.delete_value(&call, None).await)?;
        }
        let current = job.get("status").cloned().unwrap_or_else(|| json!({}));
        if strip(&current) != strip(&plan.status) {
            let mut next = (*job).clone();
            next["status"] = plan.status.clone();
            let call = Call::internal(
                ctx.jobs.resource(),
                ns.as_deref(),
                Some(owner::name(&job)),
                Some("status"),
                MANAGER,
            );
            ignore_conflict(ctx.api.update_value(&call, next.clone()).await)?;
            if condition_true(&next, "Complete") && !condition_true(&job, "Complete") {
                ctx.events.normal(&job, "Completed", "Job completed");
            }
            if condition_true(&next, "Failed") && !condition_true(&job, "Failed") {
                ctx.events
                    .warning(&job, "BackoffLimitExceeded", "Job has failed");
            }
        }
        Ok(plan.again_secs.map(|s| Duration::from_secs(s.max(1))))
    }
}

/// A status without timestamps and zero counts (what decides whether to write).
fn strip(s: &Value) -> Value {
    let mut s = s.clone();
    if let Some(conds) = s.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastProbeTime");
                o.remove("lastTransitionTime");
            }
        }
    }
    if let Some(o) = s.as_object_mut() {
        o.remove("startTime");
        o.retain(|_, v| *v != json!(0) && *v != json!([]) && *v != json!(""));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: Value) -> Value {
        let mut j = json!({"metadata": {"name": "pi", "namespace": "d", "uid": "j1"},
                           "spec": {"completions": 3, "parallelism": 2, "backoffLimit": 1,
                                    "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}},
                           "status": {"startTime": "2026-11-25T00:00:00Z"}});
        if let (Some(s), Some(e)) = (j["spec"].as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        j
    }

    fn pod(phase: &str, index: Option<i64>, created: &str) -> Arc<Value> {
        let mut p = json!({"metadata": {"name": format!("p-{phase}-{created}"), "creationTimestamp": created, "annotations": {}},
                           "status": {"phase": phase}});
        if let Some(i) = index {
            p["metadata"]["annotations"][INDEX] = json!(i.to_string());
        }
        Arc::new(p)
    }

    const T0: u64 = 1_795_564_800; // 2026-11-25T00:00:00Z

    #[test]
    fn pods_run_in_parallel_until_enough_succeed() {
        let p = plan(&job(json!({})), &[], T0, 10);
        assert_eq!(p.create.len(), 2);
        let pods = vec![
            pod("Succeeded", None, "2026-11-25T00:00:01Z"),
            pod("Running", None, "2026-11-25T00:00:01Z"),
        ];
        let p = plan(&job(json!({})), &pods, T0 + 5, 10);
        assert_eq!(p.create.len(), 1, "one more to reach 3, with one running");
        let pods = vec![
            pod("Succeeded", None, "2026-11-25T00:00:01Z"),
            pod("Succeeded", None, "2026-11-25T00:00:02Z"),
            pod("Succeeded", None, "2026-11-25T00:00:03Z"),
        ];
        let p = plan(&job(json!({})), &pods, T0 + 9, 10);
        assert!(p.create.is_empty());
        assert_eq!(p.status["succeeded"], 3);
        assert!(p.status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Complete"));
        assert!(p.status["completionTime"].is_string());
    }

    #[test]
    fn failures_back_off_and_past_the_limit_the_job_fails() {
        let one = vec![pod("Failed", None, "2026-11-25T00:00:10Z")];
        let p = plan(&job(json!({})), &one, T0 + 12, 10);
        assert!(p.create.is_empty(), "within the backoff");
        assert_eq!(p.again_secs, Some(8));
        let p = plan(&job(json!({})), &one, T0 + 21, 10);
        assert_eq!(p.create.len(), 2, "after the backoff");
        let two = vec![
            pod("Failed", None, "2026-11-25T00:00:10Z"),
            pod("Failed", None, "2026-11-25T00:00:30Z"),
            pod("Running", None, "2026-11-25T00:00:31Z"),
        ];
        let p = plan(&job(json!({})), &two, T0 + 40, 10);
        let failed = p.status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Failed")
            .cloned()
            .unwrap();
        assert_eq!(failed["reason"], "BackoffLimitExceeded");
        assert_eq!(
            p.delete.len(),
            1,
            "running pods of a failed job are stopped"
        );
    }

    #[test]
    fn the_deadline_fails_the_job_and_ttl_deletes_it() {
        let running = vec![pod("Running", None, "2026-11-25T00:00:01Z")];
        let p = plan(
            &job(json!({"activeDeadlineSeconds": 30})),
            &running,
            T0 + 10,
            10,
        );
        assert_eq!(p.again_secs, Some(20));
        let p = plan(
            &job(json!({"activeDeadlineSeconds": 30})),
            &running,
            T0 + 31,
            10,
        );
        let failed = p.status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Failed")
            .cloned()
            .unwrap();
        assert_eq!(failed["reason"], "DeadlineExceeded");
        let mut done = job(json!({"ttlSecondsAfterFinished": 5}));
        done["status"]["conditions"] = json!([{"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-25T00:01:00Z"}]);
        done["status"]["completionTime"] = json!("2026-11-25T00:01:00Z");
        assert!(!plan(&done, &[], T0 + 62, 10).delete_job);
        assert!(plan(&done, &[], T0 + 65, 10).delete_job);
    }

    #[test]
    fn indexed_jobs_run_each_missing_index_once() {
        let j = job(json!({"completionMode": "Indexed"}));
        let p = plan(&j, &[], T0, 10);
        assert_eq!(p.create, vec![Some(0), Some(1)]);
        let pods = vec![
            pod("Succeeded", Some(0), "2026-11-25T00:00:01Z"),
            pod("Running", Some(1), "2026-11-25T00:00:01Z"),
        ];
        let p = plan(&j, &pods, T0 + 2, 10);
        assert_eq!(p.create, vec![Some(2)]);
        assert_eq!(p.status["completedIndexes"], "0");
        let mut set = BTreeSet::new();
        set.extend([0, 1, 2, 4, 6, 7]);
        assert_eq!(format_indexes(&set), "0-2,4,6-7");
    }
}
