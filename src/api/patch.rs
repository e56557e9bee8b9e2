//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and strategic merge patch for
//! the kinds served so far (whose lists have no merge keys, so it is a merge patch that
//! ignores the `$`-directives kubectl adds, such as `$setElementOrder/<list>`).

use serde_json::Value;

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The merge key of a list field of the built-in types (by field name and, for `ports`, the
/// object it sits in), or `None` for lists that a patch replaces.
pub(crate) fn merge_key(field: &str, parent: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "ports" if parent == "container" => "containerPort",
        "ports" => "port",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "readinessGates" => "conditionType",
        _ => return None,
    })
}

/// The context the items of a keyed list are merged in (what [`merge_key`] takes as the
/// parent of their own lists).
pub(crate) fn item_context(field: &str) -> &'static str {
    if matches!(
        field,
        "containers" | "initContainers" | "ephemeralContainers"
    ) {
        "container"
    } else {
        ""
    }
}

/// Lists of strings that a strategic patch merges as sets.
pub(crate) fn merges_as_set(field: &str) -> bool {
    matches!(field, "finalizers")
}

/// Strategic merge patch with the merge keys of the built-in types: lists of containers, env,
/// ports, volumes, conditions and the like merge element by element by their key;
/// `$patch: delete|replace`, `$setElementOrder/<list>`, `$retainKeys` and
/// `$deleteFromPrimitiveList/<list>` are honoured; other lists are replaced.
pub fn strategic(target: &mut Value, patch: &Value) {
    strategic_in(target, patch, "")
}

fn strategic_in(target: &mut Value, patch: &Value, context: &str) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replacement = patch.clone();
        if let Some(o) = replacement.as_object_mut() {
            o.remove("$patch");
        }
        *target = replacement;
        return;
    }
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (v, merge_key(k, context)) {
            (Value::Array(items), Some(key)) => {
                let current = t
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if !current.is_array() {
                    *current = Value::Array(Vec::new());
                }
                let list = current.as_array_mut().expect("made an array above");
                let child = item_context(k);
                for item in items {
                    let id = item.get(key).cloned();
                    let pos = id
                        .as_ref()
                        .and_then(|id| list.iter().position(|e| e.get(key) == Some(id)));
                    if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                        if let Some(i) = pos {
                            list.remove(i);
                        }
                        continue;
                    }
                    match pos {
                        Some(i) => strategic_in(&mut list[i], item, child),
                        None => {
                            let mut fresh = Value::Null;
                            strategic_in(&mut fresh, item, child);
                            list.push(fresh);
                        }
                    }
                }
            }
            (Value::Array(items), None) if merges_as_set(k) => {
                let current = t
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Some(list) = current.as_array_mut() {
                    for item in items {
                        if !list.contains(item) {
                            list.push(item.clone());
                        }
                    }
                }
            }
            (Value::Object(_), _) => strategic_in(t.entry(k.clone()).or_insert(Value::Null), v, k),
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    // Directives that act on the merged result.
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(doomed)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !doomed.contains(x));
            }
        } else if let Some(field) = k.strip_prefix("$setElementOrder/") {
            let Some(order) = v.as_array() else { continue };
            let key = merge_key(field, context);
            if let Some(Value::Array(list)) = t.get_mut(field) {
                let rank = |e: &Value| {
                    order.iter().position(|o| match key {
                        Some(key) => o.get(key).is_some() && o.get(key) == e.get(key),
                        None => o == e,
                    })
                };
                let mut indexed: Vec<(usize, Value)> = list.drain(..).enumerate().collect();
                indexed.sort_by_key(|(i, e)| (rank(e).unwrap_or(usize::MAX), *i));
                list.extend(indexed.into_iter().map(|(_, e)| e));
            }
        } else if k == "$retainKeys" {
            if let Some(keep) = v.as_array() {
                t.retain(|name, _| keep.iter().any(|x| x.as_str() == Some(name)));
            }
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
    fn strategic_patch_merges_keyed_lists_and_honours_directives() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1", "ports": [{"containerPort": 80, "protocol": "TCP"}], "env": [{"name": "E", "value": "1"}]},
            {"name": "b", "image": "y:1"},
        ], "tolerations": [{"key": "t"}]}, "metadata": {"finalizers": ["f1"], "labels": {"a": "1"}}});
        // What `kubectl set image pod/p a=x:2` sends.
        strategic(
            &mut pod,
            &json!({"spec": {
                "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                "containers": [{"image": "x:2", "name": "a"}],
            }}),
        );
        assert_eq!(pod["spec"]["containers"][0]["image"], "x:2");
        assert_eq!(
            pod["spec"]["containers"][0]["ports"][0]["containerPort"], 80,
            "untouched fields stay"
        );
        assert_eq!(pod["spec"]["containers"][1]["name"], "b");
        strategic(
            &mut pod,
            &json!({"spec": {
            "containers": [{"name": "c", "image": "z:1"}, {"name": "b", "$patch": "delete"}],
            "tolerations": [{"key": "u"}],
        }, "metadata": {"finalizers": ["f2"], "labels": {"b": "2"}}}),
        );
        let names: Vec<&str> = pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["a", "c"]);
        assert_eq!(
            pod["spec"]["tolerations"],
            json!([{"key": "u"}]),
            "lists without a merge key are replaced"
        );
        assert_eq!(pod["metadata"]["finalizers"], json!(["f1", "f2"]));
        assert_eq!(pod["metadata"]["labels"], json!({"a": "1", "b": "2"}));
        strategic(
            &mut pod,
            &json!({"spec": {"$setElementOrder/containers": [{"name": "c"}, {"name": "a"}]},
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["f1"]}}),
        );
        assert_eq!(pod["spec"]["containers"][0]["name"], "c");
        assert_eq!(pod["metadata"]["finalizers"], json!(["f2"]));
        let mut svc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}});
        strategic(
            &mut svc,
            &json!({"spec": {"ports": [{"port": 443, "name": "tls"}]}}),
        );
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"port": 80, "name": "http"}, {"port": 443, "name": "tls"}])
        );
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
