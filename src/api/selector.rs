//! Label and field selectors, parsed once per request and matched against JSON objects.
//!
//! Labels: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, joined by commas
//! (all must hold). Fields: `path=v`, `path==v`, `path!=v` over a dotted path into the object,
//! for the paths each kind allows.

use serde_json::Value;

use super::status::KubeError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced parentheses".into());
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses".into());
    }
    out.push(&s[start..]);
    Ok(out)
}

fn valid_key(k: &str) -> bool {
    super::meta::valid_qualified_name(k)
}

fn bad(sel: &str, why: &str) -> KubeError {
    KubeError::bad_request(format!(
        "unable to parse requirement: {why} (in label selector {sel:?})"
    ))
}

impl LabelSelector {
    /// Parses a `labelSelector` query parameter.
    pub fn parse(s: &str) -> Result<LabelSelector, KubeError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for term in split_top(s).map_err(|e| bad(s, &e))? {
            let t = term.trim();
            if t.is_empty() {
                return Err(bad(s, "empty requirement"));
            }
            let req = if let Some(k) = t.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = t.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = split_set(t, " notin ") {
                LabelReq::NotIn(k, parse_set(&rest).ok_or_else(|| bad(s, "bad value set"))?)
            } else if let Some((k, rest)) = split_set(t, " in ") {
                LabelReq::In(k, parse_set(&rest).ok_or_else(|| bad(s, "bad value set"))?)
            } else {
                LabelReq::Exists(t.to_string())
            };
            let (key, values): (&str, Vec<&str>) = match &req {
                LabelReq::Eq(k, v) | LabelReq::Ne(k, v) => (k, vec![v.as_str()]),
                LabelReq::Exists(k) | LabelReq::NotExists(k) => (k, vec![]),
                LabelReq::In(k, vs) | LabelReq::NotIn(k, vs) => {
                    (k, vs.iter().map(String::as_str).collect())
                }
            };
            if !valid_key(key) {
                return Err(bad(s, &format!("invalid label key {key:?}")));
            }
            if let Some(v) = values.iter().find(|v| !super::meta::valid_label_value(v)) {
                return Err(bad(s, &format!("invalid label value {v:?}")));
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// True if `obj`'s labels satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => get(k) != Some(v.as_str()),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        })
    }

    /// True for the empty selector.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A metav1.LabelSelector object (`matchLabels`, `matchExpressions` with `In`, `NotIn`,
    /// `Exists`, `DoesNotExist`). `None` for a malformed one, which matches nothing (as the
    /// Go controllers treat a selector that does not convert). An absent or empty object is
    /// the empty selector, which callers that want "nothing" must check for themselves.
    pub fn from_object(sel: Option<&Value>) -> Option<LabelSelector> {
        let mut reqs = Vec::new();
        let Some(sel) = sel.filter(|s| !s.is_null()) else {
            return Some(LabelSelector(reqs));
        };
        if let Some(m) = sel.get("matchLabels") {
            for (k, v) in m.as_object()? {
                reqs.push(LabelReq::Eq(k.clone(), v.as_str()?.to_string()));
            }
        }
        if let Some(exprs) = sel.get("matchExpressions") {
            for e in exprs.as_array()? {
                let key = e.get("key")?.as_str()?.to_string();
                let values: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                reqs.push(match e.get("operator")?.as_str()? {
                    "In" => LabelReq::In(key, values),
                    "NotIn" => LabelReq::NotIn(key, values),
                    "Exists" => LabelReq::Exists(key),
                    "DoesNotExist" => LabelReq::NotExists(key),
                    _ => return None,
                });
            }
        }
        Some(LabelSelector(reqs))
    }
}

fn split_set(t: &str, op: &str) -> Option<(String, String)> {
    let i = t.find(op)?;
    Some((
        t[..i].trim().to_string(),
        t[i + op.len()..].trim().to_string(),
    ))
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    let vals: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    (!vals.is_empty()).then_some(vals)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<FieldReq>);

impl FieldSelector {
    /// Parses a `fieldSelector`, allowing `metadata.name`, `metadata.namespace` and `extra`.
    pub fn parse(s: &str, extra: &[&str]) -> Result<FieldSelector, KubeError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for term in s.split(',') {
            let (path, value, negate) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, true)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, v, false)
            } else {
                return Err(KubeError::bad_request(format!(
                    "invalid field selector: {term:?} is not of the form field=value or field!=value"
                )));
            };
            let path = path.trim();
            if !matches!(path, "metadata.name" | "metadata.namespace") && !extra.contains(&path) {
                return Err(KubeError::bad_request(format!(
                    "field label not supported: {path}"
                )));
            }
            reqs.push(FieldReq {
                path: path.to_string(),
                value: value.trim().to_string(),
                negate,
            });
        }
        Ok(FieldSelector(reqs))
    }

    /// True if `obj` satisfies every requirement (a missing field is the empty string).
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let pointer = format!("/{}", r.path.replace('.', "/"));
            let actual = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            (actual == r.value) != r.negate
        })
    }

    /// True for the empty selector.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value required for `metadata.name`, if the selector pins it (used to narrow a
    /// list to one key).
    pub fn name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|r| r.path == "metadata.name" && !r.negate)
            .map(|r| r.value.as_str())
    }

    /// The node required by `spec.nodeName=X` (X not empty), if the selector has that
    /// requirement.
    pub fn node_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|r| r.path == "spec.nodeName" && !r.negate && !r.value.is_empty())
            .map(|r| r.value.as_str())
    }

    /// The node, if `spec.nodeName=X` is the selector's only requirement (then knowing an
    /// object's node is knowing whether it matches).
    pub fn only_node_name(&self) -> Option<&str> {
        match self.0.as_slice() {
            [_] => self.node_name(),
            _ => None,
        }
    }

    /// Bytes every stored object this selector matches contains: for `spec.nodeName=X`
    /// (X not empty) the compact JSON member `"nodeName":"X"` (stored objects are
    /// serde_json's compact output). A list can skip, without decoding, every object whose
    /// stored bytes lack them; the ones that have them are still checked in full. `None`
    /// when there is no such requirement (an empty value also matches objects without the
    /// field).
    pub fn prefilter(&self) -> Option<Vec<u8>> {
        let r = self
            .0
            .iter()
            .find(|r| r.path == "spec.nodeName" && !r.negate && !r.value.is_empty())?;
        let mut needle = b"\"nodeName\":".to_vec();
        needle.extend(serde_json::to_vec(&r.value).ok()?);
        Some(needle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_node_name_requirement_gives_the_bytes_its_objects_contain() {
        let labels: &[&str] = &["spec.nodeName"];
        let f = FieldSelector::parse("spec.nodeName=n1", labels).unwrap();
        let needle = f.prefilter().unwrap();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [], "nodeName": "n1"}});
        let raw = serde_json::to_vec(&pod).unwrap();
        assert!(raw.windows(needle.len()).any(|w| w == needle.as_slice()));
        assert!(f.matches(&pod));
        // No shortcut where an object without the field may match, or none is required.
        for s in ["spec.nodeName=", "spec.nodeName!=n1", "metadata.name=p", ""] {
            assert_eq!(
                FieldSelector::parse(s, labels).unwrap().prefilter(),
                None,
                "{s}"
            );
        }
    }

    #[test]
    fn label_selectors_cover_equality_existence_and_sets() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "fe"}}});
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web,tier=fe", true),
            ("app=web,tier=be", false),
            ("tier in (fe,be)", true),
            ("tier notin (fe,be)", false),
            ("missing notin (x)", true),
            ("app in (web),tier", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&obj),
                want,
                "{sel}"
            );
        }
        for bad in ["app in (a", "=web", "a=b,", "bad key=x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_selectors_read_dotted_paths_and_refuse_unknown_fields() {
        let obj =
            json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {"nodeName": "n1"}});
        let s =
            FieldSelector::parse("metadata.name=p,spec.nodeName!=n2", &["spec.nodeName"]).unwrap();
        assert!(s.matches(&obj));
        assert_eq!(s.name(), Some("p"));
        assert!(
            !FieldSelector::parse("spec.nodeName=n2", &["spec.nodeName"])
                .unwrap()
                .matches(&obj)
        );
        assert!(FieldSelector::parse("spec.nodeName=n1", &[]).is_err());
        assert!(FieldSelector::parse("garbage", &[]).is_err());
    }
}
