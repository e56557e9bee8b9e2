//! Object metadata rules: names, labels, timestamps, uids, and the fields each kind knows
//! (for `fieldValidation=Strict`).

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::Value;

use super::status::Cause;

/// `Value::pointer` without its allocations: serde_json unescapes every token of a JSON
/// pointer into new strings (two `replace`s per token), which in a profile of the leader at
/// 50,000 pods was a quarter of its CPU (controllers read owners, phases, labels and node
/// names by pointer, pod after pod). A pointer with an escape (`~0`, `~1`) goes to
/// `Value::pointer`; the answer is always the same as its.
pub trait Ptr {
    /// The value at JSON pointer `pointer` (RFC 6901), as `Value::pointer` finds it.
    fn ptr(&self, pointer: &str) -> Option<&Value>;
}

impl Ptr for Value {
    fn ptr(&self, pointer: &str) -> Option<&Value> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        if rest.contains('~') {
            return self.pointer(pointer);
        }
        rest.split('/').try_fold(self, |v, token| match v {
            Value::Object(m) => m.get(token),
            Value::Array(a) => array_index(token).and_then(|i| a.get(i)),
            _ => None,
        })
    }
}

/// An array index token as serde_json reads one: digits, no sign, no leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
        return None;
    }
    token.parse().ok()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time in seconds.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (fractions and offsets other than Z are not needed here).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // days_from_civil
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// kubectl's short age: `5s`, `3m`, `2h`, `4d`.
pub fn age(created: &str, now: u64) -> String {
    let Some(t) = parse_rfc3339(created) else {
        return "<unknown>".into();
    };
    let s = now.saturating_sub(t);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A random RFC 4122 version-4 UUID.
pub fn uid() -> String {
    let mut b: [u8; 16] = rand::thread_rng().gen();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Five characters for `generateName`, from Kubernetes' alphabet (no vowels, no look-alikes).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 label (namespaces).
pub fn check_dns1123_label(field: &str, s: &str) -> Option<Cause> {
    (!is_dns_label(s)).then(|| Cause {
        reason: "FieldValueInvalid".into(),
        message: format!(
            "Invalid value: \"{s}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        ),
        field: field.into(),
    })
}

/// RFC 1123 subdomain (most object names).
pub fn check_dns1123_subdomain(field: &str, s: &str) -> Option<Cause> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    (!ok).then(|| Cause {
        reason: "FieldValueInvalid".into(),
        message: format!(
            "Invalid value: \"{s}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        ),
        field: field.into(),
    })
}

/// A label or annotation key: `[prefix/]name`, the name at most 63 characters of
/// `[A-Za-z0-9_.-]` starting and ending alphanumeric; the prefix a DNS subdomain.
pub fn valid_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let prefix_ok = prefix.is_none_or(|p| check_dns1123_subdomain("", p).is_none());
    name_ok && prefix_ok
}

/// A label value: empty, or at most 63 characters of `[A-Za-z0-9_.-]` starting and ending
/// alphanumeric.
pub fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

/// Checks `metadata.labels` and `metadata.annotations`.
pub fn check_labels(meta: &serde_json::Map<String, Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(labels) = meta.get("labels") {
        match labels.as_object() {
            Some(labels) => {
                for (k, v) in labels {
                    if !valid_qualified_name(k) {
                        causes.push(Cause {
                            reason: "FieldValueInvalid".into(),
                            message: format!("Invalid value: \"{k}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"),
                            field: "metadata.labels".into(),
                        });
                    }
                    match v.as_str() {
                        Some(v) if valid_label_value(v) => {}
                        _ => causes.push(Cause {
                            reason: "FieldValueInvalid".into(),
                            message: format!("Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"),
                            field: "metadata.labels".into(),
                        }),
                    }
                }
            }
            None if labels.is_null() => {}
            None => causes.push(Cause {
                reason: "FieldValueInvalid".into(),
                message: "Invalid value: labels must be a map of strings".into(),
                field: "metadata.labels".into(),
            }),
        }
    }
    if let Some(ann) = meta.get("annotations") {
        if let Some(ann) = ann.as_object() {
            for (k, v) in ann {
                if !valid_qualified_name(k) || !v.is_string() {
                    causes.push(Cause {
                        reason: "FieldValueInvalid".into(),
                        message: format!("Invalid value: \"{k}\": annotations must be a map of qualified names to strings"),
                        field: "metadata.annotations".into(),
                    });
                }
            }
        } else if !ann.is_null() {
            causes.push(Cause {
                reason: "FieldValueInvalid".into(),
                message: "Invalid value: annotations must be a map of strings".into(),
                field: "metadata.annotations".into(),
            });
        }
    }
    causes
}

/// Fields `ObjectMeta` knows.
const META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Top-level fields each kind knows (beyond `apiVersion`, `kind`, `metadata`).
fn kind_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "ConfigMap" => &["data", "binaryData", "immutable"],
        "Secret" => &["data", "stringData", "type", "immutable"],
        "Namespace" => &["spec", "status"],
        "ServiceAccount" => &[
            "secrets",
            "imagePullSecrets",
            "automountServiceAccountToken",
        ],
        "Lease" => &["spec"],
        "Pod" | "Node" | "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" | "Service" => {
            &["spec", "status"]
        }
        "Endpoints" => &["subsets"],
        "Role" => &["rules"],
        "ClusterRole" => &["rules", "aggregationRule"],
        "RoleBinding" | "ClusterRoleBinding" => &["subjects", "roleRef"],
        "SelfSubjectAccessReview" => &["spec", "status"],
        "EndpointSlice" => &["addressType", "endpoints", "ports"],
        "Event" => &[
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "series",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
        ],
        _ => &[],
    }
}

/// The first unknown field of `obj` (top level and metadata), for `fieldValidation=Strict`.
pub fn unknown_field(kind: &str, obj: &serde_json::Map<String, Value>) -> Option<String> {
    let known = kind_fields(kind);
    for k in obj.keys() {
        if !matches!(k.as_str(), "apiVersion" | "kind" | "metadata") && !known.contains(&k.as_str())
        {
            return Some(k.clone());
        }
    }
    if let Some(meta) = obj.get("metadata").and_then(Value::as_object) {
        for k in meta.keys() {
            if !META_FIELDS.contains(&k.as_str()) {
                return Some(format!("metadata.{k}"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptr_finds_what_pointer_finds() {
        let v = serde_json::json!({
            "metadata": {"labels": {"a/b": "1", "c~d": "2", "": "3"},
                         "ownerReferences": [{"uid": "u"}, {"uid": "w"}]},
            "spec": {"n": [[0, 1], 2], "0": "zero", "01": "x"},
            "s": "str",
        });
        for p in [
            "",
            "/",
            "/metadata",
            "/metadata/labels/a~1b",
            "/metadata/labels/c~0d",
            "/metadata/labels/",
            "/metadata/ownerReferences/1/uid",
            "/metadata/ownerReferences/01",
            "/metadata/ownerReferences/+1",
            "/metadata/ownerReferences/2",
            "/metadata/ownerReferences/-1",
            "/spec/n/0/1",
            "/spec/0",
            "/spec/01",
            "/s/x",
            "/missing",
            "metadata",
            "/metadata/labels/a/b",
            "//",
        ] {
            assert_eq!(v.ptr(p), v.pointer(p), "{p:?}");
        }
    }

    #[test]
    fn timestamps_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_620_492), "2026-11-25T15:28:12Z");
        for t in [0, 86_399, 951_782_400, 1_795_620_492, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
    }

    #[test]
    fn names_and_labels_follow_kubernetes_rules() {
        assert!(check_dns1123_subdomain("metadata.name", "web-1.example").is_none());
        assert!(check_dns1123_subdomain("metadata.name", "Bad_Name").is_some());
        assert!(check_dns1123_label("metadata.name", "a.b").is_some());
        assert!(valid_qualified_name("app.kubernetes.io/name"));
        assert!(!valid_qualified_name("-bad"));
        assert!(valid_label_value(""));
        assert!(!valid_label_value("has space"));
        let u = uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
