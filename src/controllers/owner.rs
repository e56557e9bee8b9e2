//! Reading object metadata and owner references (what ties a pod to its ReplicaSet, a
//! ReplicaSet to its Deployment), as the controllers and the garbage collector need them.

use crate::api::meta::Ptr;
use serde_json::{json, Value};

/// `metadata.name`.
pub fn name(obj: &Value) -> &str {
    obj.ptr("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `metadata.namespace`.
pub fn namespace(obj: &Value) -> Option<&str> {
    obj.ptr("/metadata/namespace").and_then(Value::as_str)
}

/// `metadata.uid`.
pub fn uid(obj: &Value) -> &str {
    obj.ptr("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The version a write judged from `obj` is made at (`None` without one: no precondition).
pub fn seen_version(obj: &Value) -> Option<String> {
    Some(resource_version(obj))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// `metadata.resourceVersion`.
pub fn resource_version(obj: &Value) -> &str {
    obj.ptr("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// True once `metadata.deletionTimestamp` is set.
pub fn is_deleting(obj: &Value) -> bool {
    obj.ptr("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// `metadata.ownerReferences`.
pub fn owner_refs(obj: &Value) -> &[Value] {
    obj.ptr("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// `obj`'s owner references but the one to `uid`.
pub fn refs_without(obj: &Value, uid: &str) -> Vec<Value> {
    owner_refs(obj)
        .iter()
        .filter(|r| r.get("uid").and_then(Value::as_str) != Some(uid))
        .cloned()
        .collect()
}

/// The owner reference with `controller: true`, if any.
pub fn controller_ref(obj: &Value) -> Option<&Value> {
    owner_refs(obj)
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
}

/// The uid of the controlling owner, if any.
pub fn controller_uid(obj: &Value) -> Option<&str> {
    controller_ref(obj)
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
}

/// A controller owner reference to `owner`.
pub fn controller_ref_to(owner: &Value, api_version: &str, kind: &str) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "name": name(owner),
        "uid": uid(owner),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// `metadata.finalizers`.
pub fn finalizers(obj: &Value) -> Vec<&str> {
    obj.ptr("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `metadata.creationTimestamp` in seconds (0 if absent).
pub fn created_secs(obj: &Value) -> u64 {
    obj.ptr("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(crate::api::meta::parse_rfc3339)
        .unwrap_or(0)
}
