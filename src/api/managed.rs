//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Owns the field sets recorded per manager (Kubernetes' `FieldsV1` encoding), the rule that
//! decides when an apply conflicts with another manager, and the structured merge an apply
//! performs. Everything here is a pure function over JSON values; the caller does the
//! read-modify-write with its compare-and-swap.
//!
//! Invariants:
//! - every write names a manager. An `Update` entry accumulates the fields its manager changed,
//!   and those fields stop being owned by anybody else; an `Apply` entry is exactly the field
//!   set of its manager's last applied configuration;
//! - an apply changes a field another manager owns only with `force`, which takes the field
//!   from that manager; fields set to the value they already have are shared, not conflicts;
//! - a field the applier stops specifying is removed from the object unless another manager
//!   still owns it;
//! - no set names a field the object does not have (sets are pruned after every write), and
//!   entries left empty are dropped.
//!
//! Lists follow the merge keys of the built-in types ([`super::patch::merge_key`]): keyed
//! lists are owned item by item (`k:{"name":"c"}`), `finalizers` value by value (`v:"x"`),
//! and other lists as a whole. Maps are never owned themselves, only their fields.

use crate::api::meta::Ptr;
use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::patch::{item_context, merge_key, merges_as_set};
use super::status::{Cause, KubeError};

/// Longest accepted `fieldManager` (as the Go server).
pub const MAX_MANAGER_LEN: usize = 128;

/// Who is writing, and through which subresource.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    /// The `fieldManager` (or the client's user-agent name).
    pub manager: &'a str,
    /// `status` for writes through the status subresource.
    pub subresource: Option<&'a str>,
    /// The object's `apiVersion`.
    pub api_version: String,
    /// Now, RFC 3339.
    pub time: String,
}

/// A set of field paths in the shape of `FieldsV1`: each child is a path element
/// (`f:<field>`, `k:<key JSON>`, `v:<value JSON>`, `i:<index>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    children: BTreeMap<String, Node>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Node {
    /// The path itself is in the set (a leaf, a list item, an atomic list).
    member: bool,
    children: FieldSet,
}

impl FieldSet {
    /// Decodes `fieldsV1`; `None` for anything that is not one.
    pub fn from_v1(v: &Value) -> Option<FieldSet> {
        let map = v.as_object()?;
        let mut set = FieldSet::default();
        for (k, child) in map {
            if k == "." {
                continue;
            }
            if !(k.starts_with("f:")
                || k.starts_with("k:")
                || k.starts_with("v:")
                || k.starts_with("i:"))
            {
                return None;
            }
            let obj = child.as_object()?;
            let node = Node {
                member: obj.is_empty() || obj.contains_key("."),
                children: FieldSet::from_v1(child)?,
            };
            set.children.insert(k.clone(), node);
        }
        Some(set)
    }

    /// Encodes as `fieldsV1`.
    pub fn to_v1(&self) -> Value {
        let mut map = Map::new();
        for (k, node) in &self.children {
            let mut inner = match node.children.to_v1() {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            if node.member && !inner.is_empty() {
                inner.insert(".".into(), json!({}));
            }
            map.insert(k.clone(), Value::Object(inner));
        }
        Value::Object(map)
    }

    /// No paths at all.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Every member path.
    pub fn members(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for (k, node) in &self.children {
            prefix.push(k.clone());
            if node.member {
                out.push(prefix.clone());
            }
            node.children.collect(prefix, out);
            prefix.pop();
        }
    }

    /// Whether `path` is a member.
    pub fn contains(&self, path: &[String]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return false;
        };
        match self.children.get(first) {
            None => false,
            Some(n) if rest.is_empty() => n.member,
            Some(n) => n.children.contains(rest),
        }
    }

    /// Whether `path` or anything under it is a member.
    fn owns_under(&self, path: &[String]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return !self.children.is_empty();
        };
        match self.children.get(first) {
            None => false,
            Some(n) if rest.is_empty() => n.member || !n.children.is_empty(),
            Some(n) => n.children.owns_under(rest),
        }
    }

    /// Adds every path of `other`.
    pub fn union(&mut self, other: &FieldSet) {
        for (k, node) in &other.children {
            let mine = self.children.entry(k.clone()).or_default();
            mine.member |= node.member;
            mine.children.union(&node.children);
        }
    }

    /// Removes every member path of `other` (and nodes left empty).
    pub fn subtract(&mut self, other: &FieldSet) {
        for (k, node) in &other.children {
            if let Some(mine) = self.children.get_mut(k) {
                if node.member {
                    mine.member = false;
                }
                mine.children.subtract(&node.children);
                if !mine.member && mine.children.is_empty() {
                    self.children.remove(k);
                }
            }
        }
    }

    /// Removes one member path.
    fn remove(&mut self, path: &[String]) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        if let Some(n) = self.children.get_mut(first) {
            if rest.is_empty() {
                n.member = false;
            } else {
                n.children.remove(rest);
            }
            if !n.member && n.children.is_empty() {
                self.children.remove(first);
            }
        }
    }

    /// Drops the paths `value` does not have.
    fn prune(&mut self, value: &Value) {
        self.children.retain(|k, node| match child(value, k) {
            None => false,
            Some(c) => {
                node.children.prune(c);
                node.member || !node.children.is_empty()
            }
        });
    }
}

/// The value at one path element below `v`.
fn child<'a>(v: &'a Value, pe: &str) -> Option<&'a Value> {
    let (kind, rest) = pe.split_at(2);
    match (kind, v) {
        ("f:", Value::Object(m)) => m.get(rest),
        ("k:", Value::Array(items)) => {
            let key: Map<String, Value> = serde_json::from_str(rest).ok()?;
            items
                .iter()
                .find(|item| key.iter().all(|(k, want)| item.get(k) == Some(want)))
        }
        ("v:", Value::Array(items)) => {
            let want: Value = serde_json::from_str(rest).ok()?;
            items.iter().find(|item| **item == want)
        }
        ("i:", Value::Array(items)) => items.get(rest.parse::<usize>().ok()?),
        _ => None,
    }
}

/// The path element of a list item: its merge key, its value for a set, else its index.
fn item_element(item: &Value, key: Option<&str>, set: bool, index: usize) -> String {
    if let Some(k) = key {
        if let Some(id) = item.get(k) {
            return format!("k:{}", json!({ k: id }));
        }
    }
    if set {
        return format!("v:{item}");
    }
    format!("i:{index}")
}

/// How a list field is owned.
enum ListKind {
    Keyed(&'static str),
    Set,
    Atomic,
}

fn list_kind(field: &str, parent: &str) -> ListKind {
    match merge_key(field, parent) {
        Some(k) => ListKind::Keyed(k),
        None if merges_as_set(field) => ListKind::Set,
        None => ListKind::Atomic,
    }
}

/// The fields of `new` that differ from `old` (all of them when there is no `old`). `name`
/// is the field that holds these objects (the context of merge keys).
fn changed(old: Option<&Value>, new: &Value, name: &str) -> FieldSet {
    let mut set = FieldSet::default();
    let Value::Object(fields) = new else {
        return set;
    };
    for (k, nv) in fields {
        let ov = old.and_then(|o| o.get(k));
        if ov == Some(nv) || nv.is_null() {
            continue;
        }
        let node = match nv {
            Value::Object(m) if !m.is_empty() => Node {
                member: false,
                children: changed(ov.filter(|o| o.is_object()), nv, k),
            },
            Value::Array(items) => match list_kind(k, name) {
                ListKind::Atomic => Node {
                    member: true,
                    children: FieldSet::default(),
                },
                kind => {
                    let (key, is_set) = match kind {
                        ListKind::Keyed(key) => (Some(key), false),
                        _ => (None, true),
                    };
                    let olds = ov.filter(|o| o.is_array());
                    let ictx = item_context(k);
                    let mut children = FieldSet::default();
                    for (i, item) in items.iter().enumerate() {
                        let pe = item_element(item, key, is_set, i);
                        let before = olds.and_then(|o| child(o, &pe));
                        match before {
                            Some(b) if b == item => {}
                            Some(b) => {
                                let sub = changed(Some(b), item, ictx);
                                if !sub.is_empty() {
                                    children.children.insert(
                                        pe,
                                        Node {
                                            member: false,
                                            children: sub,
                                        },
                                    );
                                }
                            }
                            None => {
                                children.children.insert(
                                    pe,
                                    Node {
                                        member: true,
                                        children: changed(None, item, ictx),
                                    },
                                );
                            }
                        }
                    }
                    if children.is_empty() {
                        // Only the order changed, or items went away: the list is touched.
                        Node {
                            member: true,
                            children,
                        }
                    } else {
                        Node {
                            member: false,
                            children,
                        }
                    }
                }
            },
            _ => Node {
                member: true,
                children: FieldSet::default(),
            },
        };
        if node.member || !node.children.is_empty() {
            set.children.insert(format!("f:{k}"), node);
        }
    }
    set
}

/// Metadata the server sets; nobody owns it.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The part of an object whose fields are owned: without apiVersion, kind and server-set
/// metadata, and with status only for writes through the status subresource.
fn trackable(obj: &Value, status: bool) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        if status {
            m.retain(|k, _| k == "status");
        } else {
            m.remove("status");
        }
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            meta.retain(|k, _| !SERVER_METADATA.contains(&k.as_str()));
            if meta.is_empty() {
                m.remove("metadata");
            }
        }
    }
    v
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    subresource: String,
    api_version: String,
    time: Option<String>,
    fields: FieldSet,
}

impl Entry {
    fn from_json(v: &Value) -> Option<Entry> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Some(Entry {
            manager: s("manager").unwrap_or_default(),
            operation: s("operation")?,
            subresource: s("subresource").unwrap_or_default(),
            api_version: s("apiVersion").unwrap_or_default(),
            time: s("time"),
            fields: match v.get("fieldsV1") {
                Some(f) => FieldSet::from_v1(f)?,
                None => FieldSet::default(),
            },
        })
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("manager".into(), json!(self.manager));
        m.insert("operation".into(), json!(self.operation));
        m.insert("apiVersion".into(), json!(self.api_version));
        if let Some(t) = &self.time {
            m.insert("time".into(), json!(t));
        }
        m.insert("fieldsType".into(), json!("FieldsV1"));
        m.insert("fieldsV1".into(), self.fields.to_v1());
        if !self.subresource.is_empty() {
            m.insert("subresource".into(), json!(self.subresource));
        }
        Value::Object(m)
    }

    fn is(&self, w: &Writer<'_>, operation: &str) -> bool {
        self.manager == w.manager
            && self.operation == operation
            && self.subresource == w.subresource.unwrap_or("")
    }

    /// How a conflict names this manager (as the Go server prints it).
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s = format!("{s} with subresource {:?}", self.subresource);
        }
        if self.operation == "Update" {
            s = format!("{s} using {}", self.api_version);
        }
        s
    }
}

fn entries_of(obj: &Value) -> Vec<Entry> {
    obj.ptr("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Entry::from_json).collect())
        .unwrap_or_default()
}

fn store_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    for e in &mut entries {
        e.fields.prune(&trackable(obj, e.subresource == "status"));
    }
    entries.retain(|e| !e.fields.is_empty());
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert(
                "managedFields".into(),
                Value::Array(entries.iter().map(Entry::to_json).collect()),
            );
        }
    }
}

/// Checks a `managedFields` the client sent; `Err` names what is wrong.
fn client_entries(v: &Value) -> Result<Vec<Entry>, String> {
    let Some(items) = v.as_array() else {
        return Err("must be a list".into());
    };
    // `[{}]` is the documented way to clear every entry.
    if items.len() == 1 && items[0].as_object().is_some_and(Map::is_empty) {
        return Ok(Vec::new());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let entry = Entry::from_json(e).ok_or_else(|| format!("[{i}]: not a valid entry"))?;
            if entry.operation != "Apply" && entry.operation != "Update" {
                return Err(format!("[{i}].operation: must be \"Apply\" or \"Update\""));
            }
            Ok(entry)
        })
        .collect()
}

/// Records a create, update or patch by `w`: the fields it changed become its own (and
/// nobody else's). `old` is the stored object (`None` on create); `new` gets the result.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    w: &Writer<'_>,
) -> Result<(), KubeError> {
    let old_entries = old.map(entries_of).unwrap_or_default();
    let sent = new.ptr("/metadata/managedFields").cloned();
    let stored = old.and_then(|o| o.ptr("/metadata/managedFields").cloned());
    let mut entries = match sent {
        Some(v) if Some(&v) != stored.as_ref() => client_entries(&v)
            .map_err(|m| KubeError::bad_request(format!("metadata.managedFields{m}")))?,
        _ => old_entries,
    };
    let status = w.subresource == Some("status");
    let diff = changed(
        old.map(|o| trackable(o, status)).as_ref(),
        &trackable(new, status),
        "",
    );
    if !diff.is_empty() {
        for e in &mut entries {
            e.fields.subtract(&diff);
        }
        match entries.iter_mut().find(|e| e.is(w, "Update")) {
            Some(mine) => {
                mine.fields.union(&diff);
                mine.time = Some(w.time.clone());
                mine.api_version = w.api_version.clone();
            }
            None => entries.push(Entry {
                manager: w.manager.to_string(),
                operation: "Update".into(),
                subresource: w.subresource.unwrap_or("").to_string(),
                api_version: w.api_version.clone(),
                time: Some(w.time.clone()),
                fields: diff,
            }),
        }
    }
    store_entries(new, entries);
    Ok(())
}

/// Server-side apply of `config` by `w` onto `live` (`None` when the object does not exist
/// yet). Returns the merged object with its `managedFields`, or a 409 naming every field
/// another manager owns and the apply would change (unless `force`).
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    w: &Writer<'_>,
    force: bool,
) -> Result<Value, KubeError> {
    let status = w.subresource == Some("status");
    let config_t = trackable(config, status);
    let applied = changed(None, &config_t, "");
    let empty = json!({});
    let live_v = live.unwrap_or(&empty);
    let mut entries = entries_of(live_v);
    let previous = entries
        .iter()
        .find(|e| e.is(w, "Apply"))
        .map(|e| e.fields.clone())
        .unwrap_or_default();

    let mut merged = live_v.clone();
    merge_into(&mut merged, &config_t, "");
    // Fields this manager applied before and no longer does go, unless someone else owns them.
    let mut dropped = previous.clone();
    dropped.subtract(&applied);
    let others: Vec<&Entry> = entries.iter().filter(|e| !e.is(w, "Apply")).collect();
    let mut doomed: Vec<Vec<String>> = dropped
        .members()
        .into_iter()
        .filter(|p| !others.iter().any(|e| e.fields.owns_under(p)))
        .collect();
    // Shortest first; what lies under a removed list item or field goes with it.
    doomed.sort_by_key(Vec::len);
    let mut removed: Vec<&Vec<String>> = Vec::new();
    for p in &doomed {
        if removed.iter().any(|r| p.starts_with(r)) {
            continue;
        }
        remove_path(&mut merged, p);
        removed.push(p);
    }

    let touched = changed(
        Some(&trackable(live_v, status)),
        &trackable(&merged, status),
        "",
    );
    let mut conflicts: Vec<(usize, Vec<String>)> = Vec::new();
    for path in touched.members() {
        for (i, e) in entries.iter().enumerate() {
            if !e.is(w, "Apply")
                && e.subresource == w.subresource.unwrap_or("")
                && e.fields.contains(&path)
            {
                conflicts.push((i, path.clone()));
            }
        }
    }
    if !conflicts.is_empty() {
        if !force {
            return Err(conflict_error(&entries, &conflicts));
        }
        for (i, path) in &conflicts {
            entries[*i].fields.remove(path);
        }
    }
    match entries.iter_mut().find(|e| e.is(w, "Apply")) {
        Some(mine) => {
            mine.fields = applied;
            mine.time = Some(w.time.clone());
            mine.api_version = w.api_version.clone();
        }
        None => entries.push(Entry {
            manager: w.manager.to_string(),
            operation: "Apply".into(),
            subresource: w.subresource.unwrap_or("").to_string(),
            api_version: w.api_version.clone(),
            time: Some(w.time.clone()),
            fields: applied,
        }),
    }
    if live.is_none() {
        // The object is new: take identity from the configuration.
        for k in ["apiVersion", "kind"] {
            if let Some(v) = config.get(k) {
                merged[k] = v.clone();
            }
        }
        for k in ["name", "namespace"] {
            if let Some(v) = config.ptr(&format!("/metadata/{k}")) {
                merged["metadata"][k] = v.clone();
            }
        }
    }
    store_entries(&mut merged, entries);
    Ok(merged)
}

/// The structured merge of an applied configuration: maps merge field by field, keyed lists
/// item by item (the configuration's items first, in its order, then the others), sets by
/// value, everything else is replaced. `null` in a configuration means nothing.
fn merge_into(target: &mut Value, config: &Value, name: &str) {
    let Value::Object(fields) = config else {
        *target = config.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, cv) in fields {
        if cv.is_null() {
            continue;
        }
        match (t.get_mut(k), cv) {
            (Some(tv @ Value::Object(_)), Value::Object(_)) => merge_into(tv, cv, k),
            (Some(Value::Array(live)), Value::Array(items)) => match list_kind(k, name) {
                ListKind::Atomic => {
                    t.insert(k.clone(), cv.clone());
                }
                ListKind::Keyed(key) => {
                    let ictx = item_context(k);
                    let mut rest: Vec<Option<Value>> = live.drain(..).map(Some).collect();
                    let mut out = Vec::with_capacity(items.len() + rest.len());
                    for item in items {
                        let id = item.get(key);
                        let found = rest
                            .iter_mut()
                            .find(|x| x.as_ref().is_some_and(|x| id.is_some() && x.get(key) == id));
                        match found.and_then(Option::take) {
                            Some(mut existing) => {
                                merge_into(&mut existing, item, ictx);
                                out.push(existing);
                            }
                            None => {
                                let mut fresh = Value::Null;
                                merge_into(&mut fresh, item, ictx);
                                out.push(fresh);
                            }
                        }
                    }
                    out.extend(rest.into_iter().flatten());
                    *live = out;
                }
                ListKind::Set => {
                    let mut out: Vec<Value> = items.clone();
                    for x in live.drain(..) {
                        if !out.contains(&x) {
                            out.push(x);
                        }
                    }
                    *live = out;
                }
            },
            _ => {
                let mut fresh = Value::Null;
                merge_into(&mut fresh, cv, k);
                t.insert(k.clone(), fresh);
            }
        }
    }
}

/// Removes the value at `path` (a list item, a field).
fn remove_path(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match v {
            Value::Object(m) => {
                if let Some(f) = first.strip_prefix("f:") {
                    m.remove(f);
                }
            }
            Value::Array(items) => {
                let target = child(&Value::Array(items.clone()), first).cloned();
                if let Some(t) = target {
                    if let Some(i) = items.iter().position(|x| *x == t) {
                        items.remove(i);
                    }
                }
            }
            _ => {}
        }
        return;
    }
    let next = match v {
        Value::Object(m) => first.strip_prefix("f:").and_then(|f| m.get_mut(f)),
        Value::Array(items) => {
            let target = child(&Value::Array(items.clone()), first).cloned();
            target.and_then(|t| items.iter_mut().find(|x| **x == t))
        }
        _ => None,
    };
    if let Some(n) = next {
        remove_path(n, rest);
        // A map emptied by the removal goes too (it was only there for the removed field).
        if n.as_object().is_some_and(Map::is_empty) {
            if let (Value::Object(m), Some(f)) = (v, first.strip_prefix("f:")) {
                m.remove(f);
            }
        }
    }
}

/// A path as Kubernetes prints it: `.spec.containers[name="c"].image`.
pub fn path_string(path: &[String]) -> String {
    let mut s = String::new();
    for pe in path {
        let (kind, rest) = pe.split_at(2);
        match kind {
            "f:" => {
                s.push('.');
                s.push_str(rest);
            }
            "k:" => {
                let key: Map<String, Value> = serde_json::from_str(rest).unwrap_or_default();
                let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
            "v:" => s.push_str(&format!("[={rest}]")),
            _ => s.push_str(&format!("[{rest}]")),
        }
    }
    s
}

fn conflict_error(entries: &[Entry], conflicts: &[(usize, Vec<String>)]) -> KubeError {
    let causes: Vec<Cause> = conflicts
        .iter()
        .map(|(i, p)| Cause {
            reason: "FieldManagerConflict".into(),
            message: format!("conflict with {}", entries[*i].describe()),
            field: path_string(p),
        })
        .collect();
    let message = if conflicts.len() == 1 {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            entries[conflicts[0].0].describe(),
            path_string(&conflicts[0].1)
        )
    } else {
        let mut by_manager: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, p) in conflicts {
            by_manager
                .entry(entries[*i].describe())
                .or_default()
                .push(path_string(p));
        }
        let mut lines = Vec::new();
        for (m, paths) in by_manager {
            lines.push(format!("conflicts with {m}:"));
            lines.extend(paths.into_iter().map(|p| format!("- {p}")));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    KubeError::apply_conflict(message, causes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            subresource: None,
            api_version: "v1".into(),
            time: "2026-11-25T00:00:00Z".into(),
        }
    }

    fn managers(obj: &Value) -> Vec<(String, String, Value)> {
        entries_of(obj)
            .into_iter()
            .map(|e| (e.manager, e.operation, e.fields.to_v1()))
            .collect()
    }

    #[test]
    fn field_sets_round_trip_fields_v1() {
        let v1 = json!({"f:data": {"f:a": {}}, "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:image": {}}}}});
        let set = FieldSet::from_v1(&v1).unwrap();
        assert_eq!(set.to_v1(), v1);
        assert!(set.contains(&["f:data".into(), "f:a".into()]));
        assert!(!set.contains(&["f:data".into()]));
        assert!(set.contains(&[
            "f:spec".into(),
            "f:containers".into(),
            "k:{\"name\":\"c\"}".into()
        ]));
        assert!(FieldSet::from_v1(&json!({"x": {}})).is_none());
    }

    #[test]
    fn an_update_takes_the_fields_it_changed_from_everybody() {
        let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"a": "1"}}, "data": {"x": "1", "y": "2"}});
        record_update(None, &mut obj, &w("creator")).unwrap();
        assert_eq!(
            managers(&obj),
            vec![(
                "creator".into(),
                "Update".into(),
                json!({"f:data": {"f:x": {}, "f:y": {}}, "f:metadata": {"f:labels": {"f:a": {}}}})
            )]
        );
        let mut next = obj.clone();
        next["data"]["x"] = json!("changed");
        next["data"]["z"] = json!("new");
        record_update(Some(&obj), &mut next, &w("editor")).unwrap();
        assert_eq!(
            managers(&next),
            vec![
                (
                    "creator".into(),
                    "Update".into(),
                    json!({"f:data": {"f:y": {}}, "f:metadata": {"f:labels": {"f:a": {}}}})
                ),
                (
                    "editor".into(),
                    "Update".into(),
                    json!({"f:data": {"f:x": {}, "f:z": {}}})
                ),
            ]
        );
        // A removed field leaves every set.
        let mut last = next.clone();
        last["data"].as_object_mut().unwrap().remove("y");
        record_update(Some(&next), &mut last, &w("editor")).unwrap();
        assert_eq!(
            managers(&last)[0].2,
            json!({"f:metadata": {"f:labels": {"f:a": {}}}})
        );
    }

    #[test]
    fn apply_conflicts_only_on_changed_fields_another_manager_owns() {
        let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}});
        record_update(None, &mut obj, &w("kubectl-edit")).unwrap();
        // Same value: shared, no conflict.
        let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1", "c": "3"}});
        let merged = apply(Some(&obj), &cfg, &w("me"), false).unwrap();
        assert_eq!(merged["data"], json!({"a": "1", "b": "2", "c": "3"}));
        // A different value: conflict, with the Go server's message.
        let cfg2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "9", "b": "8"}});
        let err = apply(Some(&merged), &cfg2, &w("me"), false).unwrap_err();
        assert_eq!(err.code, 409);
        assert_eq!(
            err.message,
            "Apply failed with 2 conflicts: conflicts with \"kubectl-edit\" using v1:\n- .data.a\n- .data.b"
        );
        assert_eq!(err.details.causes[0].reason, "FieldManagerConflict");
        assert_eq!(
            err.details.causes[0].message,
            "conflict with \"kubectl-edit\" using v1"
        );
        // Forced: the fields move to the applier.
        let forced = apply(Some(&merged), &cfg2, &w("me"), true).unwrap();
        // `c` was only ever this applier's, and it stopped specifying it.
        assert_eq!(forced["data"], json!({"a": "9", "b": "8"}));
        let m = managers(&forced);
        assert!(m
            .iter()
            .all(|(name, _, f)| name != "kubectl-edit" || f.ptr("/f:data/f:a").is_none()));
        assert_eq!(
            m.iter().find(|x| x.0 == "me").unwrap().2,
            json!({"f:data": {"f:a": {}, "f:b": {}}})
        );
    }

    #[test]
    fn fields_an_applier_stops_specifying_go_unless_someone_else_owns_them() {
        let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"l": "x"}}, "data": {"a": "1", "b": "2"}});
        let first = apply(None, &cfg, &w("me"), false).unwrap();
        assert_eq!(first["metadata"]["name"], "c");
        let mut edited = first.clone();
        edited["data"]["b"] = json!("2"); // unchanged: stays only mine
        edited["data"]["e"] = json!("other");
        record_update(Some(&first), &mut edited, &w("editor")).unwrap();
        let cfg2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
        let second = apply(Some(&edited), &cfg2, &w("me"), false).unwrap();
        assert_eq!(second["data"], json!({"a": "1", "e": "other"}));
        assert!(second["metadata"].get("labels").is_none(), "{second}");
    }

    #[test]
    fn keyed_lists_are_merged_and_owned_item_by_item() {
        let cfg = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x:1"}]}});
        let live = apply(None, &cfg, &w("one"), false).unwrap();
        let cfg2 = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "b", "image": "y:1"}]}});
        let both = apply(Some(&live), &cfg2, &w("two"), false).unwrap();
        let names: Vec<&str> = both["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["b", "a"]);
        let cfg3 = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x:2"}]}});
        let err = apply(Some(&both), &cfg3, &w("two"), false).unwrap_err();
        assert!(
            err.message.contains(".spec.containers[name=\"a\"].image"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("conflict with \"one\""),
            "{}",
            err.message
        );
    }
}
