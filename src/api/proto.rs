//! Just enough of Kubernetes' protobuf encoding to read what kubectl's imperative generators
//! send (`kubectl create namespace|serviceaccount|configmap|secret generic|service|deployment|job`): the
//! `k8s\0` envelope (`runtime.Unknown`) around a Namespace, ServiceAccount, ConfigMap,
//! Secret, Service, Deployment or Job (the fields those generators set), turned into the JSON object
//! the rest of the API handles. Anything else is refused (the caller answers 415 and asks
//! for JSON). Every length is checked against the input: malformed bytes give `None`,
//! never a panic.

use base64::Engine;
use serde_json::{json, Map, Value};

/// One field of a message.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        out |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(out);
        }
    }
    None
}

/// The fields of a message, in order.
fn fields(b: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < b.len() {
        let tag = varint(b, &mut at)?;
        let (number, wire) = (tag >> 3, tag & 7);
        let f = match wire {
            0 => Field::Varint(varint(b, &mut at)?),
            1 => {
                at = at.checked_add(8).filter(|e| *e <= b.len())?;
                Field::Fixed
            }
            2 => {
                let len = usize::try_from(varint(b, &mut at)?).ok()?;
                let end = at.checked_add(len).filter(|e| *e <= b.len())?;
                let v = &b[at..end];
                at = end;
                Field::Bytes(v)
            }
            5 => {
                at = at.checked_add(4).filter(|e| *e <= b.len())?;
                Field::Fixed
            }
            _ => return None,
        };
        out.push((number, f));
    }
    Some(out)
}

fn text(b: &[u8]) -> Option<String> {
    String::from_utf8(b.to_vec()).ok()
}

/// A `map<string, string|bytes>` entry list; bytes values are base64-encoded when `binary`.
fn map_entry(b: &[u8], binary: bool) -> Option<(String, Value)> {
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for (n, f) in fields(b)? {
        if let Field::Bytes(v) = f {
            match n {
                1 => key = text(v)?,
                2 if binary => value = json!(base64::engine::general_purpose::STANDARD.encode(v)),
                2 => value = json!(text(v)?),
                _ => {}
            }
        }
    }
    Some((key, value))
}

fn object_meta(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    for (n, f) in fields(b)? {
        let Field::Bytes(v) = f else { continue };
        match n {
            1 => {
                m.insert("name".into(), json!(text(v)?));
            }
            2 => {
                m.insert("generateName".into(), json!(text(v)?));
            }
            3 => {
                m.insert("namespace".into(), json!(text(v)?));
            }
            11 => {
                let (k, val) = map_entry(v, false)?;
                labels.insert(k, val);
            }
            12 => {
                let (k, val) = map_entry(v, false)?;
                annotations.insert(k, val);
            }
            _ => {}
        }
    }
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), Value::Object(annotations));
    }
    Some(Value::Object(m))
}

/// A non-empty string field as JSON (Go marshals unset strings as empty ones).
fn set_text(m: &mut Map<String, Value>, key: &str, v: &[u8]) -> Option<()> {
    let t = text(v)?;
    if !t.is_empty() {
        m.insert(key.into(), json!(t));
    }
    Some(())
}

/// Appends a non-empty string to the array `key`.
fn push_text(m: &mut Map<String, Value>, key: &str, v: &[u8]) -> Option<()> {
    let t = text(v)?;
    if !t.is_empty() {
        m.entry(key)
            .or_insert_with(|| json!([]))
            .as_array_mut()?
            .push(json!(t));
    }
    Some(())
}

/// An int32 (a varint holding its two's complement, sign-extended to 64 bits).
fn int32(v: u64) -> i64 {
    i64::from(v as i32)
}

/// `intstr.IntOrString`: type (0 int, 1 string), intVal, strVal.
fn int_or_string(b: &[u8]) -> Option<Value> {
    let (mut kind, mut int, mut string) = (0, 0, String::new());
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Varint(v)) => kind = v,
            (2, Field::Varint(v)) => int = int32(v),
            (3, Field::Bytes(v)) => string = text(v)?,
            _ => {}
        }
    }
    Some(if kind == 1 { json!(string) } else { json!(int) })
}

/// `ServicePort`: name, protocol, port, targetPort, nodePort, appProtocol.
fn service_port(b: &[u8]) -> Option<Value> {
    let mut p = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(v)) => set_text(&mut p, "name", v)?,
            (2, Field::Bytes(v)) => set_text(&mut p, "protocol", v)?,
            (3, Field::Varint(v)) => {
                p.insert("port".into(), json!(int32(v)));
            }
            (4, Field::Bytes(v)) => {
                p.insert("targetPort".into(), int_or_string(v)?);
            }
            (5, Field::Varint(v)) if v != 0 => {
                p.insert("nodePort".into(), json!(int32(v)));
            }
            (6, Field::Bytes(v)) => set_text(&mut p, "appProtocol", v)?,
            _ => {}
        }
    }
    Some(Value::Object(p))
}

/// `ServiceSpec`, the fields an imperative `kubectl create service` or `expose` sets.
fn service_spec(b: &[u8]) -> Option<Value> {
    let mut s = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(v)) => s
                .entry("ports")
                .or_insert_with(|| json!([]))
                .as_array_mut()?
                .push(service_port(v)?),
            (2, Field::Bytes(v)) => {
                let (k, val) = map_entry(v, false)?;
                s.entry("selector").or_insert_with(|| json!({}))[k] = val;
            }
            (3, Field::Bytes(v)) => set_text(&mut s, "clusterIP", v)?,
            (4, Field::Bytes(v)) => set_text(&mut s, "type", v)?,
            (5, Field::Bytes(v)) => push_text(&mut s, "externalIPs", v)?,
            (7, Field::Bytes(v)) => set_text(&mut s, "sessionAffinity", v)?,
            (8, Field::Bytes(v)) => set_text(&mut s, "loadBalancerIP", v)?,
            (10, Field::Bytes(v)) => set_text(&mut s, "externalName", v)?,
            (11, Field::Bytes(v)) => set_text(&mut s, "externalTrafficPolicy", v)?,
            (13, Field::Varint(v)) if v != 0 => {
                s.insert("publishNotReadyAddresses".into(), json!(true));
            }
            (17, Field::Bytes(v)) => set_text(&mut s, "ipFamilyPolicy", v)?,
            (18, Field::Bytes(v)) => push_text(&mut s, "clusterIPs", v)?,
            (19, Field::Bytes(v)) => push_text(&mut s, "ipFamilies", v)?,
            (22, Field::Bytes(v)) => set_text(&mut s, "internalTrafficPolicy", v)?,
            _ => {}
        }
    }
    Some(Value::Object(s))
}

/// Sets `key` to an int32 varint (a field Go sends only when set: a pointer).
fn put_int(m: &mut Map<String, Value>, key: &str, v: u64) {
    m.insert(key.into(), json!(int32(v)));
}

/// Sets `key` to an int64 varint (a pointer field).
fn put_int64(m: &mut Map<String, Value>, key: &str, v: u64) {
    m.insert(key.into(), json!(v as i64));
}

/// Sets `key` to a non-zero int32 varint.
fn set_int(m: &mut Map<String, Value>, key: &str, v: u64) {
    if v != 0 {
        m.insert(key.into(), json!(int32(v)));
    }
}

/// `LabelSelector`: matchLabels (map) and matchExpressions (key, operator, values).
fn label_selector(b: &[u8]) -> Option<Value> {
    let mut s = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(v)) => {
                let (k, val) = map_entry(v, false)?;
                s.entry("matchLabels").or_insert_with(|| json!({}))[k] = val;
            }
            (2, Field::Bytes(v)) => {
                let mut e = Map::new();
                for (m, g) in fields(v)? {
                    if let Field::Bytes(x) = g {
                        match m {
                            1 => set_text(&mut e, "key", x)?,
                            2 => set_text(&mut e, "operator", x)?,
                            3 => push_text(&mut e, "values", x)?,
                            _ => {}
                        }
                    }
                }
                s.entry("matchExpressions")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()?
                    .push(Value::Object(e));
            }
            _ => {}
        }
    }
    Some(Value::Object(s))
}

/// `Container`: name, image, command, args, workingDir, ports, env, imagePullPolicy.
fn container(b: &[u8]) -> Option<Value> {
    let mut c = Map::new();
    for (n, f) in fields(b)? {
        let Field::Bytes(v) = f else { continue };
        match n {
            1 => set_text(&mut c, "name", v)?,
            2 => set_text(&mut c, "image", v)?,
            3 => push_text(&mut c, "command", v)?,
            4 => push_text(&mut c, "args", v)?,
            5 => set_text(&mut c, "workingDir", v)?,
            6 => {
                let mut p = Map::new();
                for (m, g) in fields(v)? {
                    match (m, g) {
                        (1, Field::Bytes(x)) => set_text(&mut p, "name", x)?,
                        (2, Field::Varint(x)) => set_int(&mut p, "hostPort", x),
                        (3, Field::Varint(x)) => set_int(&mut p, "containerPort", x),
                        (4, Field::Bytes(x)) => set_text(&mut p, "protocol", x)?,
                        (5, Field::Bytes(x)) => set_text(&mut p, "hostIP", x)?,
                        _ => {}
                    }
                }
                c.entry("ports")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()?
                    .push(Value::Object(p));
            }
            7 => {
                let mut e = Map::new();
                for (m, g) in fields(v)? {
                    if let Field::Bytes(x) = g {
                        match m {
                            1 => set_text(&mut e, "name", x)?,
                            2 => {
                                e.insert("value".into(), json!(text(x)?));
                            }
                            _ => {}
                        }
                    }
                }
                c.entry("env")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()?
                    .push(Value::Object(e));
            }
            14 => set_text(&mut c, "imagePullPolicy", v)?,
            _ => {}
        }
    }
    Some(Value::Object(c))
}

/// `PodTemplateSpec`: metadata, and of the spec: containers, initContainers,
/// restartPolicy, terminationGracePeriodSeconds, nodeSelector, serviceAccountName.
fn pod_template(b: &[u8]) -> Option<Value> {
    let mut t = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(v)) => {
                t.insert("metadata".into(), object_meta(v)?);
            }
            (2, Field::Bytes(v)) => {
                let mut spec = Map::new();
                for (m, g) in fields(v)? {
                    match (m, g) {
                        (2, Field::Bytes(x)) => spec
                            .entry("containers")
                            .or_insert_with(|| json!([]))
                            .as_array_mut()?
                            .push(container(x)?),
                        (20, Field::Bytes(x)) => spec
                            .entry("initContainers")
                            .or_insert_with(|| json!([]))
                            .as_array_mut()?
                            .push(container(x)?),
                        (3, Field::Bytes(x)) => set_text(&mut spec, "restartPolicy", x)?,
                        (4, Field::Varint(x)) => {
                            put_int64(&mut spec, "terminationGracePeriodSeconds", x)
                        }
                        (7, Field::Bytes(x)) => {
                            let (k, val) = map_entry(x, false)?;
                            spec.entry("nodeSelector").or_insert_with(|| json!({}))[k] = val;
                        }
                        (8, Field::Bytes(x)) => set_text(&mut spec, "serviceAccountName", x)?,
                        _ => {}
                    }
                }
                t.insert("spec".into(), Value::Object(spec));
            }
            _ => {}
        }
    }
    Some(Value::Object(t))
}

/// `DeploymentSpec` (apps/v1): replicas, selector, template, strategy type,
/// minReadySeconds, revisionHistoryLimit, paused, progressDeadlineSeconds.
fn deployment_spec(b: &[u8]) -> Option<Value> {
    let mut s = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Varint(v)) => put_int(&mut s, "replicas", v),
            (2, Field::Bytes(v)) => {
                s.insert("selector".into(), label_selector(v)?);
            }
            (3, Field::Bytes(v)) => {
                s.insert("template".into(), pod_template(v)?);
            }
            (4, Field::Bytes(v)) => {
                let mut strategy = Map::new();
                for (m, g) in fields(v)? {
                    if let (1, Field::Bytes(x)) = (m, g) {
                        set_text(&mut strategy, "type", x)?;
                    }
                }
                if !strategy.is_empty() {
                    s.insert("strategy".into(), Value::Object(strategy));
                }
            }
            (5, Field::Varint(v)) => set_int(&mut s, "minReadySeconds", v),
            (6, Field::Varint(v)) => put_int(&mut s, "revisionHistoryLimit", v),
            (7, Field::Varint(v)) if v != 0 => {
                s.insert("paused".into(), json!(true));
            }
            (9, Field::Varint(v)) => put_int(&mut s, "progressDeadlineSeconds", v),
            _ => {}
        }
    }
    Some(Value::Object(s))
}

/// `JobSpec` (batch/v1): parallelism, completions, activeDeadlineSeconds, selector,
/// template, backoffLimit, ttlSecondsAfterFinished.
fn job_spec(b: &[u8]) -> Option<Value> {
    let mut s = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Varint(v)) => put_int(&mut s, "parallelism", v),
            (2, Field::Varint(v)) => put_int(&mut s, "completions", v),
            (3, Field::Varint(v)) => put_int64(&mut s, "activeDeadlineSeconds", v),
            (4, Field::Bytes(v)) => {
                s.insert("selector".into(), label_selector(v)?);
            }
            (6, Field::Bytes(v)) => {
                s.insert("template".into(), pod_template(v)?);
            }
            (7, Field::Varint(v)) => put_int(&mut s, "backoffLimit", v),
            (8, Field::Varint(v)) => put_int(&mut s, "ttlSecondsAfterFinished", v),
            _ => {}
        }
    }
    Some(Value::Object(s))
}

/// A message whose fields are all strings (or repeated strings): `(number, key, repeated)`.
fn strings_message(b: &[u8], layout: &[(u64, &str, bool)]) -> Option<Value> {
    let mut m = Map::new();
    for (n, f) in fields(b)? {
        let Field::Bytes(v) = f else { continue };
        if let Some((_, key, repeated)) = layout.iter().find(|(num, _, _)| *num == n) {
            if *repeated {
                push_text(&mut m, key, v)?;
            } else {
                set_text(&mut m, key, v)?;
            }
        }
    }
    Some(Value::Object(m))
}

/// `PolicyRule`: verbs, apiGroups, resources, resourceNames, nonResourceURLs.
fn policy_rule(b: &[u8]) -> Option<Value> {
    let mut rule = strings_message(
        b,
        &[
            (1, "verbs", true),
            (2, "apiGroups", true),
            (3, "resources", true),
            (4, "resourceNames", true),
            (5, "nonResourceURLs", true),
        ],
    )?;
    // An empty apiGroups entry is the core group: kept (push_text drops empty strings).
    for (n, f) in fields(b)? {
        if let (2, Field::Bytes(v)) = (n, f) {
            if v.is_empty() {
                rule["apiGroups"]
                    .as_array_mut()
                    .map(|a| a.push(json!("")))
                    .unwrap_or_else(|| rule["apiGroups"] = json!([""]));
            }
        }
    }
    Some(rule)
}

/// `SelfSubjectAccessReviewSpec`: resourceAttributes, nonResourceAttributes.
fn access_review_spec(b: &[u8]) -> Option<Value> {
    let mut spec = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(v)) => {
                spec.insert(
                    "resourceAttributes".into(),
                    strings_message(
                        v,
                        &[
                            (1, "namespace", false),
                            (2, "verb", false),
                            (3, "group", false),
                            (4, "version", false),
                            (5, "resource", false),
                            (6, "subresource", false),
                            (7, "name", false),
                        ],
                    )?,
                );
            }
            (2, Field::Bytes(v)) => {
                spec.insert(
                    "nonResourceAttributes".into(),
                    strings_message(v, &[(1, "path", false), (2, "verb", false)])?,
                );
            }
            _ => {}
        }
    }
    Some(Value::Object(spec))
}

/// The object in a `k8s\0`-prefixed protobuf body, as JSON; `None` if it is malformed or
/// of a kind this server does not read as protobuf.
pub fn decode(body: &[u8]) -> Option<Value> {
    let envelope = body.strip_prefix(b"k8s\0")?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (n, f) in fields(envelope)? {
        let Field::Bytes(v) = f else { continue };
        match n {
            1 => {
                for (m, g) in fields(v)? {
                    if let Field::Bytes(s) = g {
                        match m {
                            1 => api_version = text(s)?,
                            2 => kind = text(s)?,
                            _ => {}
                        }
                    }
                }
            }
            2 => raw = v,
            _ => {}
        }
    }
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    let (data_field, binary) = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") | ("v1", "ServiceAccount") => (None, false),
        ("v1", "ConfigMap") => (Some("data"), false),
        ("v1", "Secret") => (Some("data"), true),
        ("v1", "Service") | ("apps/v1", "Deployment") | ("batch/v1", "Job") => (None, false),
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => (None, false),
        ("authentication.k8s.io/v1", "TokenRequest") => (None, false),
        (
            "rbac.authorization.k8s.io/v1",
            "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding",
        ) => (None, false),
        _ => return None,
    };
    let rbac_role = matches!(kind.as_str(), "Role" | "ClusterRole");
    let rbac_binding = matches!(kind.as_str(), "RoleBinding" | "ClusterRoleBinding");
    for (n, f) in fields(raw)? {
        match (n, f) {
            (1, Field::Bytes(v)) => obj["metadata"] = object_meta(v)?,
            (2, Field::Bytes(v)) if kind == "Service" => obj["spec"] = service_spec(v)?,
            (2, Field::Bytes(v)) if kind == "Deployment" => obj["spec"] = deployment_spec(v)?,
            (2, Field::Bytes(v)) if kind == "Job" => obj["spec"] = job_spec(v)?,
            (2, Field::Bytes(v)) if kind == "SelfSubjectAccessReview" => {
                obj["spec"] = access_review_spec(v)?
            }
            (2, Field::Bytes(v)) if kind == "TokenRequest" => {
                // TokenRequestSpec: audiences (1), boundObjectRef (3), expirationSeconds (4).
                let mut spec = Map::new();
                for (m, g) in fields(v)? {
                    match (m, g) {
                        (1, Field::Bytes(a)) => push_text(&mut spec, "audiences", a)?,
                        (4, Field::Varint(s)) => {
                            spec.insert("expirationSeconds".into(), json!(s as i64));
                        }
                        _ => {}
                    }
                }
                obj["spec"] = Value::Object(spec);
            }
            (2, Field::Bytes(v)) if rbac_role => {
                if !obj["rules"].is_array() {
                    obj["rules"] = json!([]);
                }
                let rule = policy_rule(v)?;
                obj["rules"].as_array_mut()?.push(rule);
            }
            (3, Field::Bytes(v)) if kind == "ClusterRole" => {
                let mut selectors = Vec::new();
                for (m, g) in fields(v)? {
                    if let (1, Field::Bytes(sel)) = (m, g) {
                        selectors.push(label_selector(sel)?);
                    }
                }
                obj["aggregationRule"] = json!({"clusterRoleSelectors": selectors});
            }
            (2, Field::Bytes(v)) if rbac_binding => {
                let subject = strings_message(
                    v,
                    &[
                        (1, "kind", false),
                        (2, "apiGroup", false),
                        (3, "name", false),
                        (4, "namespace", false),
                    ],
                )?;
                if !obj["subjects"].is_array() {
                    obj["subjects"] = json!([]);
                }
                obj["subjects"].as_array_mut()?.push(subject);
            }
            (3, Field::Bytes(v)) if rbac_binding => {
                obj["roleRef"] = strings_message(
                    v,
                    &[
                        (1, "apiGroup", false),
                        (2, "kind", false),
                        (3, "name", false),
                    ],
                )?;
            }
            (2, Field::Bytes(v)) if data_field.is_some() => {
                let (k, val) = map_entry(v, binary)?;
                obj["data"][k] = val;
            }
            (3, Field::Bytes(v)) if kind == "ConfigMap" => {
                let (k, val) = map_entry(v, true)?;
                obj["binaryData"][k] = val;
            }
            (3, Field::Bytes(v)) if kind == "Secret" => obj["type"] = json!(text(v)?),
            (4, Field::Bytes(v)) if kind == "Secret" => {
                let (k, val) = map_entry(v, false)?;
                obj["stringData"][k] = val;
            }
            (4, Field::Varint(b)) if kind == "ConfigMap" => obj["immutable"] = json!(b != 0),
            (5, Field::Varint(b)) if kind == "Secret" => obj["immutable"] = json!(b != 0),
            _ => {}
        }
    }
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(n << 3 | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn a_configmap_from_kubectl_create_decodes_and_garbage_does_not() {
        let meta = [
            field(1, b"cm1"),
            field(3, b"team"),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let raw = [
            field(1, &meta),
            field(2, &[field(1, b"a"), field(2, b"1")].concat()),
        ]
        .concat();
        let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &type_meta), field(2, &raw)].concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "cm1", "namespace": "team", "labels": {"app": "web"}},
                   "data": {"a": "1"}})
        );
        // Truncated, unprefixed and unsupported bodies are refused.
        assert!(decode(&body[..body.len() - 3]).is_none());
        assert!(decode(b"\x0a\x02v1").is_none());
        let deploy = [
            b"k8s\0".to_vec(),
            field(
                1,
                &[field(1, b"apps/v1"), field(2, b"StatefulSet")].concat(),
            ),
        ]
        .concat();
        assert!(decode(&deploy).is_none());
    }

    fn varint_field(n: u64, v: u64) -> Vec<u8> {
        let mut out = vec![(n << 3) as u8];
        let mut v = v;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn a_service_from_kubectl_create_service_decodes() {
        // As Go marshals it: unset strings sent empty, zero numbers sent.
        let port = [
            field(1, b"80-8080"),
            field(2, b"TCP"),
            varint_field(3, 80),
            field(
                4,
                &[varint_field(1, 0), varint_field(2, 8080), field(3, b"")].concat(),
            ),
            varint_field(5, 0),
        ]
        .concat();
        let named = [
            field(1, b"http"),
            varint_field(3, 443),
            field(
                4,
                &[varint_field(1, 1), varint_field(2, 0), field(3, b"web")].concat(),
            ),
        ]
        .concat();
        let spec = [
            field(1, &port),
            field(1, &named),
            field(2, &[field(1, b"app"), field(2, b"late")].concat()),
            field(3, b"None"),
            field(4, b"ClusterIP"),
            field(10, b""),
            varint_field(13, 0),
        ]
        .concat();
        let raw = [field(1, &field(1, b"late")), field(2, &spec)].concat();
        let type_meta = [field(1, b"v1"), field(2, b"Service")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &type_meta), field(2, &raw)].concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "late"},
                   "spec": {"ports": [{"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080},
                                      {"name": "http", "port": 443, "targetPort": "web"}],
                            "selector": {"app": "late"}, "clusterIP": "None", "type": "ClusterIP"}})
        );
        assert!(decode(&body[..body.len() - 2]).is_none());
    }
}
