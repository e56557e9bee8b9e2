//! Server-side printing: the `Table` kubectl asks for with
//! `Accept: application/json;as=Table;g=meta.k8s.io;v=v1`. kubectl prints the columns it is
//! given; `priority: 1` columns show only with `-o wide`.

use serde_json::{json, Value};

use super::meta;
use super::resources::Resource;

/// What a row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    /// Nothing.
    None,
    /// `PartialObjectMetadata` (the default; kubectl needs it for `-A`, `--show-labels`).
    Metadata,
    /// The whole object (`--sort-by`).
    Object,
}

impl Include {
    /// From the `includeObject` parameter.
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// True if the Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn column(name: &str, typ: &str, format: &str, priority: u8) -> Value {
    json!({"name": name, "type": typ, "format": format, "description": "", "priority": priority})
}

/// Column definitions for a resource.
pub fn columns(r: &Resource) -> Vec<Value> {
    let name = column("Name", "string", "name", 0);
    let age = column("Age", "string", "", 0);
    match r.kind {
        "Namespace" => vec![name, column("Status", "string", "", 0), age],
        "ConfigMap" => vec![name, column("Data", "integer", "", 0), age],
        "Secret" => vec![
            name,
            column("Type", "string", "", 0),
            column("Data", "integer", "", 0),
            age,
        ],
        "ServiceAccount" => vec![name, column("Secrets", "integer", "", 0), age],
        "Lease" => vec![name, column("Holder", "string", "", 0), age],
        _ => vec![name, age],
    }
}

fn count(v: Option<&Value>) -> usize {
    match v {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The cells of one object's row.
pub fn cells(r: &Resource, obj: &Value, now: u64) -> Vec<Value> {
    let name = json!(str_at(obj, "/metadata/name"));
    let age = json!(meta::age(str_at(obj, "/metadata/creationTimestamp"), now));
    match r.kind {
        "Namespace" => vec![name, json!(str_at(obj, "/status/phase")), age],
        "ConfigMap" => vec![
            name,
            json!(count(obj.get("data")) + count(obj.get("binaryData"))),
            age,
        ],
        "Secret" => vec![
            name,
            json!(str_at(obj, "/type")),
            json!(count(obj.get("data"))),
            age,
        ],
        "ServiceAccount" => vec![name, json!(count(obj.get("secrets"))), age],
        "Lease" => vec![name, json!(str_at(obj, "/spec/holderIdentity")), age],
        _ => vec![name, age],
    }
}

/// One row.
pub fn row(r: &Resource, obj: &Value, include: Include, now: u64) -> Value {
    let mut row = json!({"cells": cells(r, obj, now)});
    match include {
        Include::None => {}
        Include::Object => row["object"] = obj.clone(),
        Include::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
            })
        }
    }
    row
}

/// A Table of `objects`.
pub fn table(
    r: &Resource,
    objects: &[Value],
    include: Include,
    resource_version: &str,
    cont: Option<&str>,
) -> Value {
    let now = meta::now_secs();
    let mut metadata = json!({"resourceVersion": resource_version});
    if let Some(c) = cont {
        metadata["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns(r),
        "rows": objects.iter().map(|o| row(r, o, include, now)).collect::<Vec<_>>(),
    })
}
