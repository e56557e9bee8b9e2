//! Pod state as the controllers judge it: active, ready, available, and which pod to delete
//! first when scaling down (the order Kubernetes' ReplicaSet controller uses).

use std::cmp::Ordering;

use serde_json::Value;

use super::owner;
use crate::api::meta;

/// `status.phase`.
pub fn phase(pod: &Value) -> &str {
    pod.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

/// `spec.nodeName` if bound.
pub fn node(pod: &Value) -> Option<&str> {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
}

/// Not finished and not being deleted: it counts toward its owner's replicas.
pub fn is_active(pod: &Value) -> bool {
    !matches!(phase(pod), "Succeeded" | "Failed") && !owner::is_deleting(pod)
}

fn condition<'a>(pod: &'a Value, kind: &str) -> Option<&'a Value> {
    pod.pointer("/status/conditions")
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
    pod.pointer("/status/containerStatuses")
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
