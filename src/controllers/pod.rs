//! Pod state as the controllers judge it: active, ready, available, and which pod to delete
//! first when scaling down (the order Kubernetes' ReplicaSet controller uses).

use crate::api::meta::Ptr;
use std::cmp::Ordering;

use serde_json::Value;

use super::owner;
use crate::api::meta;

/// Pods by controller: `<namespace>/<controller uid>`, or `<namespace>/` for a pod without
/// a controller (an orphan a controller may adopt).
pub const BY_CONTROLLER: &str = "controller";
/// Pods by label: `<namespace>/<key>=<value>` for each label.
pub const BY_LABEL: &str = "label";
/// Bound pods by node name.
pub const BY_NODE: &str = "node";

/// The pod informer's indexes (see [`BY_CONTROLLER`], [`BY_LABEL`], [`BY_NODE`]).
pub fn indexers() -> Vec<(&'static str, super::informer::IndexFn)> {
    vec![
        (BY_CONTROLLER, |p| {
            vec![controller_index(
                owner::namespace(p),
                owner::controller_uid(p).unwrap_or(""),
            )]
        }),
        (BY_LABEL, |p| {
            let ns = owner::namespace(p).unwrap_or("");
            p.ptr("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| v.as_str().map(|v| format!("{ns}/{k}={v}")))
                .collect()
        }),
        (BY_NODE, |p| {
            node(p).map(str::to_string).into_iter().collect()
        }),
    ]
}

/// The [`BY_CONTROLLER`] value of a namespace's pods controlled by `uid` ("" for orphans).
pub fn controller_index(ns: Option<&str>, uid: &str) -> String {
    format!("{}/{uid}", ns.unwrap_or(""))
}

/// The [`BY_LABEL`] value of label `key=value` in a namespace.
pub fn label_index(ns: Option<&str>, key: &str, value: &str) -> String {
    format!("{}/{key}={value}", ns.unwrap_or(""))
}

/// What the pod informer keeps of a pod ([`super::informer::Trim`]): a pod bound to a node
/// is kept as the part of it the controllers and the scheduler's cache read, a pod not yet
/// bound whole (the scheduler reads all of its spec, and writes it back when it binds it or
/// marks it unschedulable, field ownership included).
///
/// A bound pod keeps: `apiVersion`, `kind`; `metadata` but its field ownership and kubectl's
/// last-applied configuration; of `spec`: the node, scheduler, priority, hostname, subdomain,
/// host network, restart policy, overhead, node selector, affinity and tolerations, and each
/// container's name, ports and resource requests (init containers: name and requests); of
/// `status`: the phase, the pod IP, the `Ready` condition (type, status, since when) and each
/// container status's name, restart count and `state.terminated`, in order. Left out: the
/// volumes, images, commands, environments, mounts, probes, security contexts, limits, the
/// other conditions and container states: at 100,000 pods a replica held 1.9 GB of parsed
/// pods, mostly these. Nothing writes a bound pod back from this cache: writers edit its
/// stored state ([`crate::api::Kube::update_with`]). A reader of another field must add it
/// here (test `a_bound_pods_projection_answers_every_reader_as_the_whole_pod`).
pub fn trim(pod: Value) -> Result<Value, Value> {
    if node(&pod).is_none() {
        return Err(pod);
    }
    let Value::Object(mut top) = pod else {
        return Err(pod);
    };
    type Map = serde_json::Map<String, Value>;
    fn take(from: &mut Map, to: &mut Map, keys: &[&str]) {
        for k in keys {
            if let Some(v) = from.remove(*k) {
                to.insert((*k).to_string(), v);
            }
        }
    }
    let mut out = Map::new();
    take(&mut top, &mut out, &["apiVersion", "kind"]);
    if let Some(Value::Object(mut meta)) = top.remove("metadata") {
        meta.remove("managedFields");
        if let Some(Value::Object(a)) = meta.get_mut("annotations") {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
        out.insert("metadata".into(), Value::Object(meta));
    }
    if let Some(Value::Object(mut spec)) = top.remove("spec") {
        let mut kept = Map::new();
        take(
            &mut spec,
            &mut kept,
            &[
                "nodeName",
                "schedulerName",
                "priority",
                "hostname",
                "subdomain",
                "hostNetwork",
                "restartPolicy",
                "overhead",
                "nodeSelector",
                "affinity",
                "tolerations",
            ],
        );
        for (key, fields) in [
            ("containers", &["name", "ports", "resources"][..]),
            ("initContainers", &["name", "resources"][..]),
        ] {
            if let Some(Value::Array(cs)) = spec.remove(key) {
                let cs = cs
                    .into_iter()
                    .map(|c| match c {
                        Value::Object(mut c) => {
                            let mut k = Map::new();
                            take(&mut c, &mut k, fields);
                            if let Some(Value::Object(r)) = k.get_mut("resources") {
                                r.retain(|name, _| name == "requests");
                            }
                            Value::Object(k)
                        }
                        other => other,
                    })
                    .collect();
                kept.insert(key.into(), Value::Array(cs));
            }
        }
        out.insert("spec".into(), Value::Object(kept));
    }
    if let Some(Value::Object(mut status)) = top.remove("status") {
        let mut kept = Map::new();
        take(&mut status, &mut kept, &["phase", "podIP"]);
        if let Some(Value::Array(cs)) = status.remove("conditions") {
            let ready: Vec<Value> = cs
                .into_iter()
                .filter(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
                .map(|c| match c {
                    Value::Object(mut c) => {
                        let mut k = Map::new();
                        take(&mut c, &mut k, &["type", "status", "lastTransitionTime"]);
                        Value::Object(k)
                    }
                    other => other,
                })
                .collect();
            kept.insert("conditions".into(), Value::Array(ready));
        }
        if let Some(Value::Array(cs)) = status.remove("containerStatuses") {
            let cs = cs
                .into_iter()
                .map(|c| match c {
                    Value::Object(mut c) => {
                        let mut k = Map::new();
                        take(&mut c, &mut k, &["name", "restartCount"]);
                        if let Some(t) = c.get_mut("state").and_then(|s| s.get_mut("terminated")) {
                            let t = t.take();
                            k.insert("state".into(), serde_json::json!({"terminated": t}));
                        }
                        Value::Object(k)
                    }
                    other => other,
                })
                .collect();
            kept.insert("containerStatuses".into(), Value::Array(cs));
        }
        out.insert("status".into(), Value::Object(kept));
    }
    Ok(Value::Object(out))
}

/// `status.phase`.
pub fn phase(pod: &Value) -> &str {
    pod.ptr("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

/// `spec.nodeName` if bound.
pub fn node(pod: &Value) -> Option<&str> {
    pod.ptr("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
}

/// Not finished and not being deleted: it counts toward its owner's replicas.
pub fn is_active(pod: &Value) -> bool {
    !matches!(phase(pod), "Succeeded" | "Failed") && !owner::is_deleting(pod)
}

fn condition<'a>(pod: &'a Value, kind: &str) -> Option<&'a Value> {
    pod.ptr("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// The `Ready` condition is `True`.
pub fn is_ready(pod: &Value) -> bool {
    condition(pod, "Ready")
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

/// When the pod last became ready (seconds), if it is ready.
pub fn ready_since(pod: &Value) -> Option<u64> {
    if !is_ready(pod) {
        return None;
    }
    Some(
        condition(pod, "Ready")
            .and_then(|c| c.get("lastTransitionTime"))
            .and_then(Value::as_str)
            .and_then(meta::parse_rfc3339)
            .unwrap_or(0),
    )
}

/// Ready for at least `min_ready_seconds` at `now`.
pub fn is_available(pod: &Value, min_ready_seconds: u64, now: u64) -> bool {
    match ready_since(pod) {
        Some(t) => min_ready_seconds == 0 || t + min_ready_seconds <= now,
        None => false,
    }
}

fn restarts(pod: &Value) -> i64 {
    pod.ptr("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

fn phase_rank(pod: &Value) -> u8 {
    match phase(pod) {
        "Pending" => 0,
        "Unknown" => 1,
        _ => 2,
    }
}

/// The order in which to delete pods when there are too many: the first is deleted first.
/// Unbound before bound, pending before running, not ready before ready, ready for less
/// time before longer, more restarts before fewer, newer before older (Kubernetes'
/// `ActivePods` ordering).
pub fn deletion_order(a: &Value, b: &Value) -> Ordering {
    node(a)
        .is_some()
        .cmp(&node(b).is_some())
        .then(phase_rank(a).cmp(&phase_rank(b)))
        .then(is_ready(a).cmp(&is_ready(b)))
        .then_with(|| match (ready_since(a), ready_since(b)) {
            (Some(x), Some(y)) => y.cmp(&x),
            _ => Ordering::Equal,
        })
        .then(restarts(b).cmp(&restarts(a)))
        .then(owner::created_secs(b).cmp(&owner::created_secs(a)))
        .then(owner::name(a).cmp(owner::name(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    /// A pod of a Deployment as the API stores it once it runs, with everything the API and
    /// the agent add.
    fn stored(name: &str, ready: bool, terminated: bool) -> Value {
        let state = if terminated {
            json!({"terminated": {"exitCode": 1, "reason": "Error", "startedAt": "2026-11-25T00:00:05Z", "finishedAt": "2026-11-25T00:00:09Z"}})
        } else {
            json!({"running": {"startedAt": "2026-11-25T00:00:05Z"}})
        };
        let s = if ready { "True" } else { "False" };
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "generateName": "web-5d8f-", "namespace": "d", "uid": format!("uid-{name}"),
                "resourceVersion": "42", "creationTimestamp": "2026-11-25T00:00:01Z",
                "labels": {"app": "web", "pod-template-hash": "5d8f", "controller-revision-hash": "r1"},
                "annotations": {"batch.kubernetes.io/job-completion-index": "2", "kubectl.kubernetes.io/last-applied-configuration": "{}", "note": "x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f", "uid": "rs-1", "controller": true, "blockOwnerDeletion": true}],
                "finalizers": ["example.com/keep"],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
            },
            "spec": {
                "nodeName": "n1", "schedulerName": "default-scheduler", "priority": 0, "restartPolicy": "Always",
                "serviceAccountName": "default", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
                "nodeSelector": {"disk": "ssd"},
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}}},
                "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}, {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
                "initContainers": [{"name": "init", "image": "busybox", "command": ["true"], "resources": {"requests": {"cpu": "200m"}, "limits": {"cpu": "1"}}}],
                "containers": [{
                    "name": "c", "image": "nginx", "command": ["nginx"], "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"containerPort": 9000, "hostPort": 9000, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi", "ephemeral-storage": "1Gi"}, "limits": {"memory": "128Mi"}},
                    "volumeMounts": [{"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}
                }]
            },
            "status": {
                "phase": if terminated { "Failed" } else { "Running" },
                "hostIP": "10.0.0.1", "hostIPs": [{"ip": "10.0.0.1"}], "podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}],
                "startTime": "2026-11-25T00:00:02Z", "qosClass": "Burstable",
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-25T00:00:01Z"},
                    {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-25T00:00:03Z"},
                    {"type": "ContainersReady", "status": s, "lastProbeTime": null, "lastTransitionTime": "2026-11-25T00:00:06Z"},
                    {"type": "Ready", "status": s, "lastProbeTime": null, "lastTransitionTime": "2026-11-25T00:00:06Z"}
                ],
                "containerStatuses": [{"name": "c", "ready": ready, "started": true, "restartCount": 3, "image": "nginx", "imageID": "", "containerID": "hollow://1", "state": state}]
            }
        })
    }

    #[test]
    fn a_pod_not_yet_bound_is_kept_whole() {
        let mut p = stored("p", false, false);
        p["spec"]["nodeName"] = json!("");
        assert_eq!(trim(p.clone()), Err(p.clone()));
        p["spec"].as_object_mut().unwrap().remove("nodeName");
        assert_eq!(trim(p.clone()), Err(p));
    }

    #[test]
    fn a_bound_pods_projection_answers_every_reader_as_the_whole_pod() {
        let now = meta::parse_rfc3339("2026-11-25T00:10:00Z").unwrap();
        for (ready, terminated) in [(true, false), (false, false), (false, true)] {
            let whole = stored("p", ready, terminated);
            let part = trim(whole.clone()).expect("a bound pod is projected");
            assert!(
                serde_json::to_vec(&part).unwrap().len() * 3
                    < serde_json::to_vec(&whole).unwrap().len() * 2,
                "the projection is a fraction of the pod: {part}"
            );
            assert!(part.pointer("/metadata/managedFields").is_none());
            assert!(part.pointer("/spec/volumes").is_none());
            assert!(part.pointer("/spec/containers/0/image").is_none());
            // This module's and the owner module's readers.
            assert_eq!(phase(&part), phase(&whole));
            assert_eq!(node(&part), node(&whole));
            assert_eq!(is_active(&part), is_active(&whole));
            assert_eq!(is_ready(&part), is_ready(&whole));
            assert_eq!(ready_since(&part), ready_since(&whole));
            assert_eq!(is_available(&part, 5, now), is_available(&whole, 5, now));
            assert_eq!(restarts(&part), restarts(&whole));
            assert_eq!(owner::name(&part), owner::name(&whole));
            assert_eq!(owner::namespace(&part), owner::namespace(&whole));
            assert_eq!(owner::uid(&part), owner::uid(&whole));
            assert_eq!(
                owner::resource_version(&part),
                owner::resource_version(&whole)
            );
            assert_eq!(owner::controller_uid(&part), owner::controller_uid(&whole));
            assert_eq!(owner::owner_refs(&part), owner::owner_refs(&whole));
            assert_eq!(owner::finalizers(&part), owner::finalizers(&whole));
            assert_eq!(owner::created_secs(&part), owner::created_secs(&whole));
            assert_eq!(owner::is_deleting(&part), owner::is_deleting(&whole));
            assert_eq!(part["apiVersion"], whole["apiVersion"], "Events name it");
            assert_eq!(part["kind"], whole["kind"], "Events name it");
            for (name, f) in indexers() {
                assert_eq!(f(&part), f(&whole), "index {name}");
            }
            let other = Arc::new(stored("q", !ready, false));
            assert_eq!(
                deletion_order(&part, &other),
                deletion_order(&whole, &other)
            );
            // The scheduler's cache.
            assert_eq!(
                crate::scheduler::decide::pod_info(&part),
                crate::scheduler::decide::pod_info(&whole)
            );
            // The controllers' decisions.
            let (part, whole) = (vec![Arc::new(part)], vec![Arc::new(whole)]);
            let svc = json!({"metadata": {"name": "web", "namespace": "d", "uid": "s-1"},
                             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}});
            assert_eq!(
                super::super::endpoints::desired(&svc, &part),
                super::super::endpoints::desired(&svc, &whole)
            );
            let rs = json!({"metadata": {"name": "web-5d8f", "namespace": "d", "uid": "rs-1"},
                            "spec": {"replicas": 1, "minReadySeconds": 5, "selector": {"matchLabels": {"app": "web"}},
                                     "template": {"metadata": {"labels": {"app": "web"}}}}});
            assert_eq!(
                super::super::replicaset::plan(&rs, &part, true, now),
                super::super::replicaset::plan(&rs, &whole, true, now)
            );
            let mut job = json!({"metadata": {"name": "pi", "namespace": "d", "uid": "rs-1"},
                                 "spec": {"completions": 3, "parallelism": 2, "backoffLimit": 1, "completionMode": "Indexed",
                                          "template": {"spec": {"restartPolicy": "OnFailure"}}},
                                 "status": {"startTime": "2026-11-25T00:00:00Z"}});
            assert_eq!(
                super::super::job::plan(&job, &part, now, 10),
                super::super::job::plan(&job, &whole, now, 10)
            );
            job["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
            assert_eq!(
                super::super::job::plan(&job, &part, now, 10),
                super::super::job::plan(&job, &whole, now, 10)
            );
            let ds = json!({"metadata": {"name": "agent", "namespace": "d", "uid": "rs-1"},
                            "spec": {"selector": {"matchLabels": {"app": "web"}},
                                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}});
            let nodes = vec![Arc::new(
                json!({"metadata": {"name": "n1", "labels": {}}, "spec": {},
                                             "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            )];
            assert_eq!(
                super::super::daemonset::plan(&ds, &nodes, &part, now),
                super::super::daemonset::plan(&ds, &nodes, &whole, now)
            );
        }
    }
}
