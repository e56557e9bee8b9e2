//! Kind-specific rules beyond metadata: defaults, validation and immutability of pods and
//! nodes, as the Kubernetes API server applies them.

use serde_json::{json, Map, Value};

use super::meta;
use super::status::{Cause, KubeError};
use super::Call;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        message: message.into(),
        field: field.into(),
    }
}

fn required(field: impl Into<String>) -> Cause {
    Cause {
        reason: "FieldValueRequired".into(),
        message: "Required value".into(),
        field: field.into(),
    }
}

/// `Always` for `:latest` or untagged images, `IfNotPresent` otherwise.
fn pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_containers(list: Option<&mut Value>) {
    let Some(Value::Array(containers)) = list else {
        return;
    };
    for c in containers.iter_mut().filter_map(Value::as_object_mut) {
        let image = c
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        c.entry("imagePullPolicy")
            .or_insert_with(|| json!(pull_policy(&image)));
        c.entry("terminationMessagePath")
            .or_insert_with(|| json!("/dev/termination-log"));
        c.entry("terminationMessagePolicy")
            .or_insert_with(|| json!("File"));
        c.entry("resources").or_insert_with(|| json!({}));
        if let Some(Value::Array(ports)) = c.get_mut("ports") {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                p.entry("protocol").or_insert_with(|| json!("TCP"));
            }
        }
    }
}

/// The pod's QoS class from its containers' requests and limits.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten()
        .collect();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in containers {
        let limits = c.pointer("/resources/limits").and_then(Value::as_object);
        let requests = c.pointer("/resources/requests").and_then(Value::as_object);
        if limits.is_some_and(|l| !l.is_empty()) || requests.is_some_and(|r| !r.is_empty()) {
            any = true;
        }
        for res in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(res));
            let request = requests.and_then(|r| r.get(res)).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// Defaults of a new pod (spec and initial status).
pub fn default_pod(map: &mut Map<String, Value>) {
    let spec = map.entry("spec").or_insert_with(|| json!({}));
    if let Some(s) = spec.as_object_mut() {
        s.entry("restartPolicy").or_insert_with(|| json!("Always"));
        s.entry("terminationGracePeriodSeconds")
            .or_insert_with(|| json!(30));
        s.entry("dnsPolicy")
            .or_insert_with(|| json!("ClusterFirst"));
        s.entry("schedulerName")
            .or_insert_with(|| json!("default-scheduler"));
        s.entry("securityContext").or_insert_with(|| json!({}));
        s.entry("enableServiceLinks").or_insert_with(|| json!(true));
        s.entry("preemptionPolicy")
            .or_insert_with(|| json!("PreemptLowerPriority"));
        s.entry("priority").or_insert_with(|| json!(0));
        let sa = s
            .get("serviceAccountName")
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .unwrap_or("default")
            .to_string();
        s.insert("serviceAccountName".into(), json!(sa));
        s.entry("serviceAccount").or_insert_with(|| json!(sa));
        if !s.contains_key("tolerations") {
            // What the DefaultTolerationSeconds admission plugin adds.
            s.insert(
                "tolerations".into(),
                json!([
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                ]),
            );
        }
        default_containers(s.get_mut("containers"));
        default_containers(s.get_mut("initContainers"));
    }
    let qos = qos_class(map.get("spec").unwrap_or(&Value::Null));
    map.insert(
        "status".into(),
        json!({"phase": "Pending", "qosClass": qos}),
    );
}

fn validate_containers(
    spec: &Value,
    field: &str,
    required_nonempty: bool,
    causes: &mut Vec<Cause>,
) {
    let list = spec.get(field);
    let Some(arr) = list.and_then(Value::as_array) else {
        if required_nonempty {
            causes.push(required(format!("spec.{field}")));
        } else if list.is_some_and(|v| !v.is_null()) {
            causes.push(invalid(
                format!("spec.{field}"),
                "Invalid value: must be a list",
            ));
        }
        return;
    };
    if required_nonempty && arr.is_empty() {
        causes.push(required(format!("spec.{field}")));
    }
    let mut names = Vec::new();
    for (i, c) in arr.iter().enumerate() {
        let path = format!("spec.{field}[{i}]");
        let name = c.get("name").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() {
            causes.push(required(format!("{path}.name")));
        } else if let Some(cause) = meta::check_dns1123_label(&format!("{path}.name"), name) {
            causes.push(cause);
        } else if names.contains(&name) {
            causes.push(Cause {
                reason: "FieldValueDuplicate".into(),
                message: format!("Duplicate value: \"{name}\""),
                field: format!("{path}.name"),
            });
        }
        names.push(name);
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(|i| i.trim().is_empty())
        {
            causes.push(required(format!("{path}.image")));
        }
        if let Some(ports) = c.get("ports").and_then(Value::as_array) {
            for (j, p) in ports.iter().enumerate() {
                let port = p.get("containerPort").and_then(Value::as_i64);
                if !port.is_some_and(|p| (1..=65535).contains(&p)) {
                    causes.push(invalid(
                        format!("{path}.ports[{j}].containerPort"),
                        format!(
                            "Invalid value: {}: must be between 1 and 65535, inclusive",
                            p.get("containerPort").unwrap_or(&Value::Null)
                        ),
                    ));
                }
            }
        }
    }
}

/// Validation of a pod.
pub fn validate_pod(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    validate_containers(spec, "containers", true, &mut causes);
    validate_containers(spec, "initContainers", false, &mut causes);
    if let Some(rp) = spec.get("restartPolicy").and_then(Value::as_str) {
        if !matches!(rp, "Always" | "OnFailure" | "Never") {
            causes.push(Cause {
                reason: "FieldValueNotSupported".into(),
                message: format!("Unsupported value: \"{rp}\": supported values: \"Always\", \"OnFailure\", \"Never\""),
                field: "spec.restartPolicy".into(),
            });
        }
    }
    if let Some(g) = spec.get("terminationGracePeriodSeconds") {
        if g.as_i64().is_none_or(|g| g < 0) {
            causes.push(invalid(
                "spec.terminationGracePeriodSeconds",
                "Invalid value: must be greater than or equal to 0",
            ));
        }
    }
    causes
}

/// Pod spec updates may change only images, `activeDeadlineSeconds`, added tolerations and
/// a lowered `terminationGracePeriodSeconds`; `nodeName` is set only by binding.
pub(crate) fn check_pod_update(
    call: &Call,
    current: &Value,
    next: &Map<String, Value>,
) -> Result<(), KubeError> {
    let mask = |spec: Option<&Value>| -> Value {
        let mut s = spec.cloned().unwrap_or_else(|| json!({}));
        if let Some(o) = s.as_object_mut() {
            for k in [
                "activeDeadlineSeconds",
                "tolerations",
                "terminationGracePeriodSeconds",
            ] {
                o.remove(k);
            }
            for list in ["containers", "initContainers"] {
                if let Some(Value::Array(cs)) = o.get_mut(list) {
                    for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                        c.remove("image");
                    }
                }
            }
        }
        s
    };
    if mask(current.get("spec")) != mask(next.get("spec")) {
        return Err(KubeError::invalid(
            call.r,
            call.name(),
            vec![Cause {
                reason: "FieldValueForbidden".into(),
                message: "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".into(),
                field: "spec".into(),
            }],
        ));
    }
    Ok(())
}

/// Defaults of a new node: an empty spec, and a status whose `nodeInfo` carries every field
/// clients require (the agent fills them in).
pub fn default_node(map: &mut Map<String, Value>) {
    map.entry("spec").or_insert_with(|| json!({}));
    let status = map.entry("status").or_insert_with(|| json!({}));
    if let Some(st) = status.as_object_mut() {
        let info = st.entry("nodeInfo").or_insert_with(|| json!({}));
        if let Some(info) = info.as_object_mut() {
            for k in [
                "architecture",
                "bootID",
                "containerRuntimeVersion",
                "kernelVersion",
                "kubeProxyVersion",
                "kubeletVersion",
                "machineID",
                "operatingSystem",
                "osImage",
                "systemUUID",
            ] {
                info.entry(k).or_insert_with(|| json!(""));
            }
        }
    }
}
