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
        "Pod" => vec![
            name,
            column("Ready", "string", "", 0),
            column("Status", "string", "", 0),
            column("Restarts", "string", "", 0),
            age,
            column("IP", "string", "", 1),
            column("Node", "string", "", 1),
            column("Nominated Node", "string", "", 1),
            column("Readiness Gates", "string", "", 1),
        ],
        "Node" => vec![
            name,
            column("Status", "string", "", 0),
            column("Roles", "string", "", 0),
            age,
            column("Version", "string", "", 0),
            column("Internal-IP", "string", "", 1),
            column("External-IP", "string", "", 1),
            column("OS-Image", "string", "", 1),
            column("Kernel-Version", "string", "", 1),
            column("Container-Runtime", "string", "", 1),
        ],
        "Deployment" => vec![
            name,
            column("Ready", "string", "", 0),
            column("Up-to-date", "string", "", 0),
            column("Available", "string", "", 0),
            age,
            column("Containers", "string", "", 1),
            column("Images", "string", "", 1),
            column("Selector", "string", "", 1),
        ],
        "ReplicaSet" => vec![
            name,
            column("Desired", "integer", "", 0),
            column("Current", "integer", "", 0),
            column("Ready", "integer", "", 0),
            age,
            column("Containers", "string", "", 1),
            column("Images", "string", "", 1),
            column("Selector", "string", "", 1),
        ],
        "DaemonSet" => vec![
            name,
            column("Desired", "integer", "", 0),
            column("Current", "integer", "", 0),
            column("Ready", "integer", "", 0),
            column("Up-to-date", "integer", "", 0),
            column("Available", "integer", "", 0),
            column("Node Selector", "string", "", 0),
            age,
        ],
        "Job" => vec![
            name,
            column("Status", "string", "", 0),
            column("Completions", "string", "", 0),
            column("Duration", "string", "", 0),
            age,
        ],
        "Service" => vec![
            name,
            column("Type", "string", "", 0),
            column("Cluster-IP", "string", "", 0),
            column("External-IP", "string", "", 0),
            column("Port(s)", "string", "", 0),
            age,
            column("Selector", "string", "", 1),
        ],
        "Endpoints" => vec![name, column("Endpoints", "string", "", 0), age],
        "EndpointSlice" => vec![
            name,
            column("AddressType", "string", "", 0),
            column("Ports", "string", "", 0),
            column("Endpoints", "string", "", 0),
            age,
        ],
        "Event" => vec![
            column("Last Seen", "string", "", 0),
            column("Type", "string", "", 0),
            column("Reason", "string", "", 0),
            column("Object", "string", "", 0),
            column("Message", "string", "", 0),
        ],
        _ => vec![name, age],
    }
}

fn int_at(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn containers_and_images(obj: &Value) -> (String, String) {
    let cs = obj
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = cs
        .iter()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let images: Vec<&str> = cs
        .iter()
        .filter_map(|c| c.get("image").and_then(Value::as_str))
        .collect();
    (names.join(","), images.join(","))
}

/// A label selector object as `k=v,k in (a,b)`.
pub fn selector_string(sel: Option<&Value>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e.get("key").and_then(Value::as_str).unwrap_or("");
        let vals: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        parts.push(
            match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                "In" => format!("{key} in ({})", vals.join(",")),
                "NotIn" => format!("{key} notin ({})", vals.join(",")),
                "Exists" => key.to_string(),
                "DoesNotExist" => format!("!{key}"),
                _ => continue,
            },
        );
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

fn service_ports(obj: &Value) -> String {
    let ports = obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() {
        return "<none>".into();
    }
    ports
        .iter()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) => format!("{port}:{np}/{proto}"),
                None => format!("{port}/{proto}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn endpoints_summary(obj: &Value) -> String {
    let mut addrs = Vec::new();
    for subset in obj
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ports: Vec<i64> = subset
            .get("ports")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p.get("port").and_then(Value::as_i64))
                    .collect()
            })
            .unwrap_or_default();
        for a in subset
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ip = a.get("ip").and_then(Value::as_str).unwrap_or("");
            if ports.is_empty() {
                addrs.push(ip.to_string());
            }
            for p in &ports {
                addrs.push(format!("{ip}:{p}"));
            }
        }
    }
    if addrs.is_empty() {
        "<none>".into()
    } else if addrs.len() > 3 {
        format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
    } else {
        addrs.join(",")
    }
}

fn job_status(obj: &Value) -> &'static str {
    let conds = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let has = |t: &str| {
        conds.iter().any(|c| {
            c.get("type").and_then(Value::as_str) == Some(t)
                && c.get("status").and_then(Value::as_str) == Some("True")
        })
    };
    if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else if has("Suspended") {
        "Suspended"
    } else {
        "Running"
    }
}

/// kubectl's pod STATUS: the deletion, a waiting or terminated container's reason, or the
/// phase.
fn pod_status(obj: &Value) -> String {
    if obj
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        return "Terminating".into();
    }
    if let Some(r) = obj.pointer("/status/reason").and_then(Value::as_str) {
        return r.to_string();
    }
    let statuses = obj
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for cs in &statuses {
        for state in ["waiting", "terminated"] {
            if let Some(reason) = cs
                .pointer(&format!("/state/{state}/reason"))
                .and_then(Value::as_str)
            {
                if !reason.is_empty() {
                    return reason.to_string();
                }
            }
        }
    }
    str_at(obj, "/status/phase").to_string()
}

fn node_status(obj: &Value) -> String {
    let ready = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .and_then(|c| c.get("status").and_then(Value::as_str));
    let mut s = match ready {
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if obj.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
        s.push_str(",SchedulingDisabled");
    }
    s
}

fn node_roles(obj: &Value) -> String {
    let mut roles: Vec<String> = obj
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    if roles.is_empty() {
        "<none>".into()
    } else {
        roles.join(",")
    }
}

fn node_address(obj: &Value, kind: &str) -> String {
    obj.pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|x| x.get("type").and_then(Value::as_str) == Some(kind))
        })
        .and_then(|x| x.get("address").and_then(Value::as_str))
        .unwrap_or("<none>")
        .to_string()
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s.to_string()
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
        "Pod" => {
            let statuses = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let total = obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = statuses
                .iter()
                .filter(|c| c.get("ready") == Some(&Value::Bool(true)))
                .count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .sum();
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(obj)),
                json!(restarts.to_string()),
                age,
                json!(or_none(str_at(obj, "/status/podIP"))),
                json!(or_none(str_at(obj, "/spec/nodeName"))),
                json!(or_none(str_at(obj, "/status/nominatedNodeName"))),
                json!("<none>"),
            ]
        }
        "Node" => vec![
            name,
            json!(node_status(obj)),
            json!(node_roles(obj)),
            age,
            json!(str_at(obj, "/status/nodeInfo/kubeletVersion")),
            json!(node_address(obj, "InternalIP")),
            json!(node_address(obj, "ExternalIP")),
            json!(or_none(str_at(obj, "/status/nodeInfo/osImage"))),
            json!(or_none(str_at(obj, "/status/nodeInfo/kernelVersion"))),
            json!(or_none(str_at(
                obj,
                "/status/nodeInfo/containerRuntimeVersion"
            ))),
        ],
        "Deployment" => {
            let (containers, images) = containers_and_images(obj);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int_at(obj, "/status/readyReplicas"),
                    int_at(obj, "/spec/replicas")
                )),
                json!(int_at(obj, "/status/updatedReplicas").to_string()),
                json!(int_at(obj, "/status/availableReplicas").to_string()),
                age,
                json!(containers),
                json!(images),
                json!(selector_string(obj.pointer("/spec/selector"))),
            ]
        }
        "ReplicaSet" => {
            let (containers, images) = containers_and_images(obj);
            vec![
                name,
                json!(int_at(obj, "/spec/replicas")),
                json!(int_at(obj, "/status/replicas")),
                json!(int_at(obj, "/status/readyReplicas")),
                age,
                json!(containers),
                json!(images),
                json!(selector_string(obj.pointer("/spec/selector"))),
            ]
        }
        "DaemonSet" => vec![
            name,
            json!(int_at(obj, "/status/desiredNumberScheduled")),
            json!(int_at(obj, "/status/currentNumberScheduled")),
            json!(int_at(obj, "/status/numberReady")),
            json!(int_at(obj, "/status/updatedNumberScheduled")),
            json!(int_at(obj, "/status/numberAvailable")),
            json!(obj
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(Value::as_object)
                .map(|m| m
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(","))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "<none>".into())),
            age,
        ],
        "Job" => {
            let started = super::meta::parse_rfc3339(str_at(obj, "/status/startTime"));
            let done = super::meta::parse_rfc3339(str_at(obj, "/status/completionTime"));
            let duration = match (started, done) {
                (Some(s), Some(d)) => format!("{}s", d.saturating_sub(s)),
                (Some(s), None) => format!("{}s", now.saturating_sub(s)),
                _ => String::new(),
            };
            vec![
                name,
                json!(job_status(obj)),
                json!(format!(
                    "{}/{}",
                    int_at(obj, "/status/succeeded"),
                    int_at(obj, "/spec/completions")
                )),
                json!(duration),
                age,
            ]
        }
        "Service" => {
            let external: Vec<String> = obj
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|i| i.get("ip").and_then(Value::as_str).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let typ = str_at(obj, "/spec/type");
            vec![
                name,
                json!(typ),
                json!(or_none(str_at(obj, "/spec/clusterIP"))),
                json!(if !external.is_empty() {
                    external.join(",")
                } else if typ == "LoadBalancer" {
                    "<pending>".to_string()
                } else if typ == "ExternalName" {
                    str_at(obj, "/spec/externalName").to_string()
                } else {
                    "<none>".to_string()
                }),
                json!(service_ports(obj)),
                age,
                json!(obj
                    .pointer("/spec/selector")
                    .and_then(Value::as_object)
                    .map(|m| m
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(","))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "<none>".into())),
            ]
        }
        "Endpoints" => vec![name, json!(endpoints_summary(obj)), age],
        "EndpointSlice" => {
            let ports: Vec<String> = obj
                .get("ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .filter_map(|p| p.get("port").and_then(Value::as_i64))
                        .map(|p| p.to_string())
                        .collect()
                })
                .unwrap_or_default();
            let eps: Vec<String> = obj
                .get("endpoints")
                .and_then(Value::as_array)
                .map(|es| {
                    es.iter()
                        .flat_map(|e| {
                            e.get("addresses")
                                .and_then(Value::as_array)
                                .cloned()
                                .unwrap_or_default()
                        })
                        .filter_map(|a| a.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(str_at(obj, "/addressType")),
                json!(if ports.is_empty() {
                    "<unset>".to_string()
                } else {
                    ports.join(",")
                }),
                json!(if eps.is_empty() {
                    "<unset>".to_string()
                } else {
                    eps.join(",")
                }),
                age,
            ]
        }
        "Event" => {
            let last = [
                "/lastTimestamp",
                "/eventTime",
                "/firstTimestamp",
                "/metadata/creationTimestamp",
            ]
            .iter()
            .map(|p| str_at(obj, p))
            .find(|s| !s.is_empty())
            .unwrap_or("");
            let kind = str_at(obj, "/involvedObject/kind").to_lowercase();
            vec![
                json!(meta::age(last, now)),
                json!(str_at(obj, "/type")),
                json!(str_at(obj, "/reason")),
                json!(format!("{kind}/{}", str_at(obj, "/involvedObject/name"))),
                json!(str_at(obj, "/message")),
            ]
        }
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
