//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and strategic merge patch for
//! the kinds served so far (whose lists have no merge keys, so it is a merge patch that
//! ignores the `$`-directives kubectl adds, such as `$setElementOrder/<list>`).

use serde_json::Value;

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    merge_inner(target, patch, false)
}

/// Strategic merge patch for kinds without keyed lists: a merge patch whose `$` keys
/// (`$setElementOrder/...`, `$retainKeys`, `$patch`) carry no meaning here and are dropped.
pub fn strategic(target: &mut Value, patch: &Value) {
    merge_inner(target, patch, true)
}

fn merge_inner(target: &mut Value, patch: &Value, strategic: bool) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if strategic && k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
        } else {
            merge_inner(t.entry(k.clone()).or_insert(Value::Null), v, strategic);
        }
    }
}

/// Why a JSON patch could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(String, String), PatchError> {
    if !path.starts_with('/') {
        return Err(PatchError(format!("invalid JSON pointer {path:?}")));
    }
    let i = path.rfind('/').expect("starts with /");
    Ok((path[..i].to_string(), unescape(&path[i + 1..])))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    let target = doc
        .pointer_mut(&parent)
        .ok_or_else(|| PatchError(format!("path {parent:?} does not exist")))?;
    match target {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            let idx = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| PatchError(format!("invalid array index {last:?}")))?
            };
            if idx > a.len() {
                return Err(PatchError(format!("array index {idx} out of range")));
            }
            a.insert(idx, value);
            Ok(())
        }
        _ => Err(PatchError(format!("cannot add to a scalar at {parent:?}"))),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let (parent, last) = split_pointer(path)?;
    let target = doc
        .pointer_mut(&parent)
        .ok_or_else(|| PatchError(format!("path {parent:?} does not exist")))?;
    match target {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| PatchError(format!("path {path:?} does not exist"))),
        Value::Array(a) => {
            let idx: usize = last
                .parse()
                .map_err(|_| PatchError(format!("invalid array index {last:?}")))?;
            if idx >= a.len() {
                return Err(PatchError(format!("array index {idx} out of range")));
            }
            Ok(a.remove(idx))
        }
        _ => Err(PatchError(format!(
            "cannot remove from a scalar at {parent:?}"
        ))),
    }
}

/// RFC 6902. Applied to a copy: on any error the document is unchanged.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| PatchError("a JSON patch must be an array of operations".into()))?;
    let mut work = doc.clone();
    for op in ops {
        let name = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| PatchError("operation without \"op\"".into()))?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| PatchError(format!("{name} without \"path\"")))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError(format!("{name} without \"value\"")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError(format!("{name} without \"from\"")))
        };
        match name {
            "add" => add(&mut work, path, value()?)?,
            "remove" => {
                remove(&mut work, path)?;
            }
            "replace" => {
                if work.pointer(path).is_none() {
                    return Err(PatchError(format!("replace: path {path:?} does not exist")));
                }
                *work.pointer_mut(path).expect("checked above") = value()?;
            }
            "move" => {
                let v = remove(&mut work, from()?)?;
                add(&mut work, path, v)?;
            }
            "copy" => {
                let v = work
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| PatchError("copy: source does not exist".into()))?;
                add(&mut work, path, v)?;
            }
            "test" => {
                if work.pointer(path) != Some(&value()?) {
                    return Err(PatchError(format!("test failed at {path:?}")));
                }
            }
            other => {
                return Err(PatchError(format!(
                    "unknown JSON patch operation {other:?}"
                )))
            }
        }
    }
    *doc = work;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn strategic_patch_drops_directives() {
        let mut doc = json!({"metadata": {"labels": {"a": "1"}}});
        strategic(
            &mut doc,
            &json!({"metadata": {"labels": {"b": "2"}}, "$setElementOrder/x": [1]}),
        );
        assert_eq!(doc, json!({"metadata": {"labels": {"a": "1", "b": "2"}}}));
    }

    #[test]
    fn json_patch_applies_all_or_nothing() {
        let mut doc = json!({"data": {"a": "1"}, "list": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/data/b", "value": "2"},
                {"op": "replace", "path": "/data/a", "value": "x"},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "remove", "path": "/list/0"},
                {"op": "test", "path": "/data/b", "value": "2"},
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"data": {"a": "x", "b": "2"}, "list": [2, 3]}));
        let before = doc.clone();
        assert!(json_patch(&mut doc, &json!([{"op": "add", "path": "/data/c", "value": "3"}, {"op": "test", "path": "/data/a", "value": "no"}])).is_err());
        assert_eq!(doc, before);
    }
}
