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
