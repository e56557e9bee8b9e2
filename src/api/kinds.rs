//! Kind-specific rules beyond metadata: defaults, validation and immutability of pods and
//! nodes, as the Kubernetes API server applies them.

use crate::api::meta::Ptr;
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
        let limits = c.ptr("/resources/limits").and_then(Value::as_object);
        let requests = c.ptr("/resources/requests").and_then(Value::as_object);
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
/// Seconds a pod tolerates its node being not ready or unreachable before it is evicted,
/// as the DefaultTolerationSeconds admission plugin adds them (server flags
/// `--default-not-ready-toleration-seconds`, `--default-unreachable-toleration-seconds`).
/// Set once at start; 300 s each until then.
static DEFAULT_TOLERATION_SECONDS: std::sync::OnceLock<(i64, i64)> = std::sync::OnceLock::new();

/// Sets the default toleration seconds (not-ready, unreachable). Only the first call counts.
pub fn set_default_toleration_seconds(not_ready: i64, unreachable: i64) {
    let _ = DEFAULT_TOLERATION_SECONDS.set((not_ready, unreachable));
}

/// Pod defaults, as the API server and its admission plugins apply them.
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
            let (not_ready, unreachable) = DEFAULT_TOLERATION_SECONDS
                .get()
                .copied()
                .unwrap_or((300, 300));
            s.insert(
                "tolerations".into(),
                json!([
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": not_ready},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": unreachable},
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

/// The volume source types a pod may name (one per volume).
const VOLUME_SOURCES: &[&str] = &[
    "emptyDir",
    "hostPath",
    "configMap",
    "secret",
    "downwardAPI",
    "projected",
    "persistentVolumeClaim",
    "nfs",
    "iscsi",
    "csi",
    "ephemeral",
    "image",
    "gitRepo",
    "awsElasticBlockStore",
    "gcePersistentDisk",
    "azureDisk",
    "azureFile",
    "cephfs",
    "cinder",
    "fc",
    "flexVolume",
    "flocker",
    "glusterfs",
    "photonPersistentDisk",
    "portworxVolume",
    "quobyte",
    "rbd",
    "scaleIO",
    "storageos",
    "vsphereVolume",
];

/// The pod's volumes: named (DNS labels, unique), each with exactly one source. Returns
/// their names.
fn validate_volumes(spec: &Value, causes: &mut Vec<Cause>) -> Vec<String> {
    let mut names = Vec::new();
    for (i, v) in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let path = format!("spec.volumes[{i}]");
        let name = v.get("name").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() {
            causes.push(required(format!("{path}.name")));
        } else if let Some(cause) = meta::check_dns1123_label(&format!("{path}.name"), name) {
            causes.push(cause);
        } else if names.iter().any(|n| n == name) {
            causes.push(Cause {
                reason: "FieldValueDuplicate".into(),
                message: format!("Duplicate value: \"{name}\""),
                field: format!("{path}.name"),
            });
        }
        names.push(name.to_string());
        let kinds = VOLUME_SOURCES
            .iter()
            .filter(|k| v.get(**k).is_some_and(|x| !x.is_null()))
            .count();
        if kinds == 0 {
            causes.push(required_msg(&path, "must specify a volume type"));
        } else if kinds > 1 {
            causes.push(Cause {
                reason: "FieldValueForbidden".into(),
                message: "Forbidden: may not specify more than 1 volume type".into(),
                field: path.clone(),
            });
        }
        if v.ptr("/hostPath/path")
            .and_then(Value::as_str)
            .is_some_and(str::is_empty)
            || v.get("hostPath").is_some_and(|h| h.get("path").is_none())
        {
            causes.push(required(format!("{path}.hostPath.path")));
        }
    }
    names
}

fn required_msg(field: &str, message: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired".into(),
        message: format!("Required value: {message}"),
        field: field.into(),
    }
}

/// A relative path without `..` (`subPath`, volume item paths).
fn check_relative(field: String, p: &str, causes: &mut Vec<Cause>) {
    if p.starts_with('/') {
        causes.push(invalid(
            field,
            format!("Invalid value: \"{p}\": must be a relative path"),
        ));
    } else if p.split('/').any(|c| c == "..") {
        causes.push(invalid(
            field,
            format!("Invalid value: \"{p}\": must not contain '..'"),
        ));
    }
}

/// A probe: one handler, non-negative timings, `successThreshold` 1 unless readiness.
fn validate_probe(path: &str, p: &Value, readiness: bool, causes: &mut Vec<Cause>) {
    let handlers = ["exec", "httpGet", "tcpSocket", "grpc"]
        .iter()
        .filter(|k| p.get(**k).is_some_and(|x| !x.is_null()))
        .count();
    if handlers == 0 {
        causes.push(required_msg(path, "must specify a handler type"));
    } else if handlers > 1 {
        causes.push(Cause {
            reason: "FieldValueForbidden".into(),
            message: "Forbidden: may not specify more than 1 handler type".into(),
            field: path.into(),
        });
    }
    for k in [
        "initialDelaySeconds",
        "timeoutSeconds",
        "periodSeconds",
        "successThreshold",
        "failureThreshold",
        "terminationGracePeriodSeconds",
    ] {
        if let Some(v) = p.get(k).filter(|v| !v.is_null()) {
            if v.as_i64().is_none_or(|n| n < 0) {
                causes.push(invalid(
                    format!("{path}.{k}"),
                    format!("Invalid value: {v}: must be greater than or equal to 0"),
                ));
            }
        }
    }
    if !readiness {
        if let Some(n) = p.get("successThreshold").and_then(Value::as_i64) {
            if n != 1 {
                causes.push(invalid(
                    format!("{path}.successThreshold"),
                    format!("Invalid value: {n}: must be 1"),
                ));
            }
        }
    }
    for (handler, what) in [("httpGet", "port"), ("tcpSocket", "port")] {
        if let Some(h) = p.get(handler).filter(|h| !h.is_null()) {
            let ok = match h.get(what) {
                Some(Value::Number(n)) => n.as_i64().is_some_and(|n| (1..=65535).contains(&n)),
                Some(Value::String(name)) => {
                    !name.is_empty()
                        && name.len() <= 15
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && name.chars().any(|c| c.is_ascii_lowercase())
                }
                _ => false,
            };
            if !ok {
                causes.push(invalid(
                    format!("{path}.{handler}.{what}"),
                    format!(
                        "Invalid value: {}: must be a port number between 1 and 65535 or a port name",
                        h.get(what).unwrap_or(&Value::Null)
                    ),
                ));
            }
        }
    }
    if p.ptr("/exec/command")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        || p.get("exec").is_some_and(|e| e.get("command").is_none())
    {
        causes.push(required(format!("{path}.exec.command")));
    }
}

fn validate_containers(
    spec: &Value,
    field: &str,
    required_nonempty: bool,
    volumes: &[String],
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
        let mut mount_paths = Vec::new();
        for (j, m) in c
            .get("volumeMounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let mpath = format!("{path}.volumeMounts[{j}]");
            let name = m.get("name").and_then(Value::as_str).unwrap_or("");
            if name.is_empty() {
                causes.push(required(format!("{mpath}.name")));
            } else if !volumes.iter().any(|v| v == name) {
                causes.push(Cause {
                    reason: "FieldValueNotFound".into(),
                    message: format!("Not found: \"{name}\""),
                    field: format!("{mpath}.name"),
                });
            }
            let at = m.get("mountPath").and_then(Value::as_str).unwrap_or("");
            if at.is_empty() {
                causes.push(required(format!("{mpath}.mountPath")));
            } else if mount_paths.contains(&at) {
                causes.push(invalid(
                    format!("{mpath}.mountPath"),
                    format!("Invalid value: \"{at}\": must be unique"),
                ));
            }
            mount_paths.push(at);
            if let Some(sub) = m.get("subPath").and_then(Value::as_str) {
                check_relative(format!("{mpath}.subPath"), sub, causes);
            }
        }
        for (key, readiness) in [
            ("livenessProbe", false),
            ("readinessProbe", true),
            ("startupProbe", false),
        ] {
            if let Some(p) = c.get(key).filter(|p| !p.is_null()) {
                validate_probe(&format!("{path}.{key}"), p, readiness, causes);
            }
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
    let volumes = validate_volumes(spec, &mut causes);
    validate_containers(spec, "containers", true, &volumes, &mut causes);
    validate_containers(spec, "initContainers", false, &volumes, &mut causes);
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

/// Applies the pod defaults to a workload's `spec.template.spec`.
fn default_template(spec: &mut Map<String, Value>) {
    let Some(Value::Object(template)) = spec.get_mut("template") else {
        return;
    };
    let mut pod = Map::new();
    pod.insert(
        "spec".into(),
        template.get("spec").cloned().unwrap_or_else(|| json!({})),
    );
    default_pod(&mut pod);
    if let Some(s) = pod.remove("spec") {
        template.insert("spec".into(), s);
    }
    template.entry("metadata").or_insert_with(|| json!({}));
}

/// Defaults of the workload kinds, services and events.
pub fn default_workload(kind: &str, map: &mut Map<String, Value>) {
    let spec = map.entry("spec").or_insert_with(|| json!({}));
    let Some(s) = spec.as_object_mut() else {
        return;
    };
    match kind {
        "Deployment" => {
            s.entry("replicas").or_insert_with(|| json!(1));
            s.entry("revisionHistoryLimit").or_insert_with(|| json!(10));
            s.entry("progressDeadlineSeconds")
                .or_insert_with(|| json!(600));
            let strategy = s
                .entry("strategy")
                .or_insert_with(|| json!({"type": "RollingUpdate"}));
            if strategy
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("RollingUpdate")
                == "RollingUpdate"
            {
                strategy["type"] = json!("RollingUpdate");
                let ru = strategy
                    .as_object_mut()
                    .map(|o| o.entry("rollingUpdate").or_insert_with(|| json!({})));
                if let Some(Value::Object(ru)) = ru {
                    ru.entry("maxUnavailable").or_insert_with(|| json!("25%"));
                    ru.entry("maxSurge").or_insert_with(|| json!("25%"));
                }
            }
            default_template(s);
        }
        "ReplicaSet" => {
            s.entry("replicas").or_insert_with(|| json!(1));
            default_template(s);
        }
        "DaemonSet" => {
            s.entry("revisionHistoryLimit").or_insert_with(|| json!(10));
            s.entry("updateStrategy").or_insert_with(|| {
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
            });
            default_template(s);
        }
        "Job" => {
            s.entry("parallelism").or_insert_with(|| json!(1));
            s.entry("completions").or_insert_with(|| json!(1));
            s.entry("backoffLimit").or_insert_with(|| json!(6));
            s.entry("completionMode")
                .or_insert_with(|| json!("NonIndexed"));
            s.entry("suspend").or_insert_with(|| json!(false));
            default_template(s);
        }
        "Service" => {
            s.entry("type").or_insert_with(|| json!("ClusterIP"));
            s.entry("sessionAffinity").or_insert_with(|| json!("None"));
            s.entry("internalTrafficPolicy")
                .or_insert_with(|| json!("Cluster"));
            if let Some(Value::Array(ports)) = s.get_mut("ports") {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    p.entry("protocol").or_insert_with(|| json!("TCP"));
                    if let Some(port) = p.get("port").cloned() {
                        p.entry("targetPort").or_insert(port);
                    }
                }
            }
        }
        _ => {}
    }
    match kind {
        "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" => {
            map.entry("status").or_insert_with(|| json!({}));
        }
        "Service" => {
            map.entry("status")
                .or_insert_with(|| json!({"loadBalancer": {}}));
        }
        _ => {}
    }
}

/// True if `selector` (a LabelSelector object) matches `labels`.
fn selector_matches(selector: &Value, labels: &Map<String, Value>) -> bool {
    let ml_ok = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let exprs_ok = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_none_or(|es| {
            es.iter().all(|e| {
                let key = e.get("key").and_then(Value::as_str).unwrap_or("");
                let values: Vec<&str> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|vs| vs.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let have = labels.get(key).and_then(Value::as_str);
                match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                    "In" => have.is_some_and(|h| values.contains(&h)),
                    "NotIn" => have.is_none_or(|h| !values.contains(&h)),
                    "Exists" => have.is_some(),
                    "DoesNotExist" => have.is_none(),
                    _ => false,
                }
            })
        });
    ml_ok && exprs_ok
}

/// Validation of the workload kinds, services and endpoint slices.
pub fn validate_workload(kind: &str, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    match kind {
        "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" => {
            let template_labels = spec
                .ptr("/template/metadata/labels")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            match spec.get("selector") {
                Some(sel) if sel.is_object() => {
                    let empty = sel
                        .get("matchLabels")
                        .and_then(Value::as_object)
                        .is_none_or(Map::is_empty)
                        && sel
                            .get("matchExpressions")
                            .and_then(Value::as_array)
                            .is_none_or(Vec::is_empty);
                    if empty {
                        causes.push(Cause {
                            reason: "FieldValueInvalid".into(),
                            message: "Invalid value: {}: empty selector is invalid for deployment"
                                .into(),
                            field: "spec.selector".into(),
                        });
                    } else if !selector_matches(sel, &template_labels) {
                        causes.push(Cause {
                            reason: "FieldValueInvalid".into(),
                            message: format!(
                                "Invalid value: {}: `selector` does not match template `labels`",
                                serde_json::to_string(&template_labels).unwrap_or_default()
                            ),
                            field: "spec.template.metadata.labels".into(),
                        });
                    }
                }
                // A Job without a selector gets one generated.
                None if kind == "Job" => {}
                _ => causes.push(required("spec.selector")),
            }
            if spec.get("template").is_none_or(|t| !t.is_object()) {
                causes.push(required("spec.template"));
            } else {
                let pod =
                    json!({"spec": spec.ptr("/template/spec").cloned().unwrap_or(Value::Null)});
                for mut c in validate_pod(&pod) {
                    c.field = format!("spec.template.{}", c.field);
                    causes.push(c);
                }
                if kind == "Job" {
                    let rp = spec
                        .ptr("/template/spec/restartPolicy")
                        .and_then(Value::as_str);
                    if !matches!(rp, Some("Never" | "OnFailure")) {
                        causes.push(Cause {
                            reason: "FieldValueNotSupported".into(),
                            message: format!(
                                "Unsupported value: \"{}\": supported values: \"OnFailure\", \"Never\"",
                                rp.unwrap_or("")
                            ),
                            field: "spec.template.spec.restartPolicy".into(),
                        });
                    }
                }
            }
            for field in ["replicas", "parallelism", "completions", "backoffLimit"] {
                if let Some(v) = spec.get(field) {
                    if v.as_i64().is_none_or(|n| n < 0) {
                        causes.push(invalid(
                            format!("spec.{field}"),
                            format!("Invalid value: {v}: must be greater than or equal to 0"),
                        ));
                    }
                }
            }
        }
        "Service" => {
            let typ = spec
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP");
            if !matches!(
                typ,
                "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
            ) {
                causes.push(Cause {
                    reason: "FieldValueNotSupported".into(),
                    message: format!("Unsupported value: \"{typ}\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
                    field: "spec.type".into(),
                });
            }
            let ports = spec
                .get("ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if ports.is_empty()
                && typ != "ExternalName"
                && spec.get("clusterIP").and_then(Value::as_str) != Some("None")
            {
                causes.push(required("spec.ports"));
            }
            let mut names = Vec::new();
            for (i, p) in ports.iter().enumerate() {
                if !p
                    .get("port")
                    .and_then(Value::as_i64)
                    .is_some_and(|n| (1..=65535).contains(&n))
                {
                    causes.push(invalid(
                        format!("spec.ports[{i}].port"),
                        format!(
                            "Invalid value: {}: must be between 1 and 65535, inclusive",
                            p.get("port").unwrap_or(&Value::Null)
                        ),
                    ));
                }
                let name = p.get("name").and_then(Value::as_str).unwrap_or("");
                if ports.len() > 1 && name.is_empty() {
                    causes.push(required(format!("spec.ports[{i}].name")));
                }
                if !name.is_empty() && names.contains(&name) {
                    causes.push(Cause {
                        reason: "FieldValueDuplicate".into(),
                        message: format!("Duplicate value: \"{name}\""),
                        field: format!("spec.ports[{i}].name"),
                    });
                }
                names.push(name);
            }
        }
        "EndpointSlice" => {
            let at = obj.get("addressType").and_then(Value::as_str);
            if !matches!(at, Some("IPv4" | "IPv6" | "FQDN")) {
                causes.push(required("addressType"));
            }
        }
        _ => {}
    }
    causes
}

/// Fields a workload update may not change (the selector; a job's template).
pub(crate) fn check_workload_update(
    call: &Call,
    current: &Value,
    next: &Map<String, Value>,
) -> Result<(), KubeError> {
    let immutable: &[&str] = match call.r.kind {
        "Deployment" | "ReplicaSet" | "DaemonSet" => &["selector"],
        "Job" => &["selector", "template", "completions", "completionMode"],
        _ => &[],
    };
    for field in immutable {
        let before = current.ptr(&format!("/spec/{field}"));
        let after = next.get("spec").and_then(|s| s.get(*field));
        if before != after && !(call.r.kind == "Job" && *field == "completions" && after.is_none())
        {
            return Err(KubeError::invalid(
                call.r,
                call.name(),
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!(
                        "Invalid value: {}: field is immutable",
                        after.cloned().unwrap_or(Value::Null)
                    ),
                    field: format!("spec.{field}"),
                }],
            ));
        }
    }
    Ok(())
}

/// A Job's generated selector and template labels (as Kubernetes' job strategy adds them).
pub fn default_job_selector(map: &mut Map<String, Value>) {
    let uid = map
        .get("metadata")
        .and_then(|m| m.get("uid"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(Value::Object(spec)) = map.get_mut("spec") else {
        return;
    };
    if spec.get("manualSelector") == Some(&Value::Bool(true)) || spec.contains_key("selector") {
        return;
    }
    spec.insert(
        "selector".into(),
        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
    );
    if let Some(Value::Object(t)) = spec.get_mut("template") {
        let meta = t.entry("metadata").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            let labels = m.entry("labels").or_insert_with(|| json!({}));
            if let Some(l) = labels.as_object_mut() {
                l.insert("batch.kubernetes.io/controller-uid".into(), json!(uid));
                l.insert("batch.kubernetes.io/job-name".into(), json!(name));
                l.insert("controller-uid".into(), json!(uid));
                l.insert("job-name".into(), json!(name));
            }
        }
    }
}
