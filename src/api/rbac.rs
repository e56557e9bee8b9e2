//! RBAC (`rbac.authorization.k8s.io/v1`) as Kubernetes evaluates it: the pure decision over
//! Roles, ClusterRoles and their bindings, the checks on RBAC objects (validation, and the
//! escalation rule: nobody grants or binds what they do not hold), and the default roles
//! every cluster starts with.
//!
//! Owns nothing but functions: the objects come through [`Store`] (the replica's informers;
//! maps in tests). Invariants:
//! - the decision is a function of the request's attributes and the objects alone;
//! - a RoleBinding grants only inside its own namespace, and never a non-resource URL;
//! - a rule with `resourceNames` never matches a request without a name (list, create);
//! - `system:masters` is allowed everything without looking at any object (as
//!   kube-apiserver's superuser group), so a cluster whose roles are broken stays repairable.

use std::sync::Arc;

use serde_json::{json, Value};

use super::status::Cause;
use crate::auth::User;

/// The API group.
pub const GROUP: &str = "rbac.authorization.k8s.io";
/// The superuser group.
pub const MASTERS: &str = "system:masters";

/// A request as the authorizers see it.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// Who asks.
    pub user: &'a User,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`
    /// (and `bind`, `escalate` for RBAC's own checks).
    pub verb: &'a str,
    /// A resource request; `None`: a non-resource path.
    pub resource: Option<ResourceAttributes<'a>>,
    /// The URL path of a non-resource request.
    pub path: &'a str,
}

/// What a resource request names.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResourceAttributes<'a> {
    /// API group (`""` for core).
    pub group: &'a str,
    /// Plural resource.
    pub resource: &'a str,
    /// Subresource (`""` for none).
    pub subresource: &'a str,
    /// Namespace (`""` for cluster scope or all namespaces).
    pub namespace: &'a str,
    /// Object name (`""` for a collection).
    pub name: &'a str,
}

/// The RBAC objects, read-only.
pub trait Store {
    /// A ClusterRole by name.
    fn cluster_role(&self, name: &str) -> Option<Arc<Value>>;
    /// A Role by namespace and name.
    fn role(&self, namespace: &str, name: &str) -> Option<Arc<Value>>;
    /// Every ClusterRoleBinding.
    fn cluster_role_bindings(&self) -> Vec<Arc<Value>>;
    /// The RoleBindings of one namespace.
    fn role_bindings(&self, namespace: &str) -> Vec<Arc<Value>>;
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

/// Whether one rule covers the request.
pub fn rule_allows(rule: &Value, a: &Attributes<'_>) -> bool {
    if !has(&strings(rule, "verbs"), a.verb) {
        return false;
    }
    match &a.resource {
        None => strings(rule, "nonResourceURLs").iter().any(|u| {
            u == "*" || u == a.path || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p))
        }),
        Some(r) => {
            if !has(&strings(rule, "apiGroups"), r.group) {
                return false;
            }
            let resources = strings(rule, "resources");
            let combined = if r.subresource.is_empty() {
                r.resource.to_string()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            // As Kubernetes: `*`, the exact `resource[/subresource]`, or `*/subresource`
            // (not `resource/*`).
            let resource_ok = resources.iter().any(|x| {
                x == "*"
                    || *x == combined
                    || (!r.subresource.is_empty() && *x == format!("*/{}", r.subresource))
            });
            if !resource_ok {
                return false;
            }
            let names = strings(rule, "resourceNames");
            names.is_empty() || (!r.name.is_empty() && names.iter().any(|n| n == r.name))
        }
    }
}

/// Whether a binding's subject is this user (`binding_ns`: a RoleBinding's namespace, the
/// default namespace of its ServiceAccount subjects).
pub fn subject_matches(s: &Value, user: &User, binding_ns: &str) -> bool {
    let name = s.get("name").and_then(Value::as_str).unwrap_or("");
    match s.get("kind").and_then(Value::as_str).unwrap_or("") {
        "User" => name == user.name,
        "Group" => user.in_group(name),
        "ServiceAccount" => {
            let ns = s
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

fn rules_of(role: &Value) -> impl Iterator<Item = &Value> {
    role.get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn role_of(store: &dyn Store, binding: &Value, binding_ns: &str) -> Option<Arc<Value>> {
    let r = binding.get("roleRef")?;
    let name = r.get("name").and_then(Value::as_str)?;
    match r.get("kind").and_then(Value::as_str)? {
        "ClusterRole" => store.cluster_role(name),
        "Role" if !binding_ns.is_empty() => store.role(binding_ns, name),
        _ => None,
    }
}

fn name_of(v: &Value) -> &str {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// RBAC's answer: why it is allowed, or `None` (RBAC has no opinion: denied unless another
/// authorizer allows it).
pub fn allows(store: &dyn Store, a: &Attributes<'_>) -> Option<String> {
    if a.user.in_group(MASTERS) {
        return Some(format!("{MASTERS} may do anything"));
    }
    let grants = |binding: &Value, ns: &str| -> Option<String> {
        let subjects = binding.get("subjects").and_then(Value::as_array)?;
        if !subjects.iter().any(|s| subject_matches(s, a.user, ns)) {
            return None;
        }
        let role = role_of(store, binding, ns)?;
        let allowed = rules_of(&role).any(|r| rule_allows(r, a));
        allowed.then(|| {
            format!(
                "RBAC: allowed by {} {:?} of {} {:?}",
                if ns.is_empty() {
                    "ClusterRoleBinding"
                } else {
                    "RoleBinding"
                },
                name_of(binding),
                binding
                    .pointer("/roleRef/kind")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                name_of(&role)
            )
        })
    };
    for b in store.cluster_role_bindings() {
        if let Some(why) = grants(&b, "") {
            return Some(why);
        }
    }
    let ns = a.resource.map_or("", |r| r.namespace);
    if !ns.is_empty() {
        for b in store.role_bindings(ns) {
            if let Some(why) = grants(&b, ns) {
                return Some(why);
            }
        }
    }
    None
}

/// Most permissions one escalation check expands a role into (verbs × groups × resources
/// × names, each list without duplicates); a role past it is refused.
pub const MAX_COVERED: usize = 10_000;

/// The rules `user` holds: those of cluster-wide bindings, and those of `namespace`'s
/// bindings (which hold only there, and never for non-resource URLs).
fn held_rules(store: &dyn Store, user: &User, namespace: &str) -> (Vec<Value>, Vec<Value>) {
    let mut cluster = Vec::new();
    let mut local = Vec::new();
    let collect = |binding: &Value, ns: &str, into: &mut Vec<Value>| {
        let Some(subjects) = binding.get("subjects").and_then(Value::as_array) else {
            return;
        };
        if !subjects.iter().any(|s| subject_matches(s, user, ns)) {
            return;
        }
        if let Some(role) = role_of(store, binding, ns) {
            into.extend(rules_of(&role).cloned());
        }
    };
    for b in store.cluster_role_bindings() {
        collect(&b, "", &mut cluster);
    }
    if !namespace.is_empty() {
        for b in store.role_bindings(namespace) {
            collect(&b, namespace, &mut local);
        }
    }
    (cluster, local)
}

fn unique(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// Whether `user` holds every permission `rules` grant, in `namespace` (`""`: cluster
/// wide): the escalation check. A wildcard in a rule is held only through a wildcard. The
/// user's own rules are gathered once; `Err` names the first permission the user lacks (or
/// says the role is too large to check).
pub fn covers(
    store: &dyn Store,
    user: &User,
    namespace: &str,
    rules: &[Value],
) -> Result<(), String> {
    if user.in_group(MASTERS) {
        return Ok(());
    }
    let (cluster, local) = held_rules(store, user, namespace);
    let held = |a: &Attributes<'_>| {
        cluster.iter().any(|r| rule_allows(r, a))
            || (a.resource.is_some() && local.iter().any(|r| rule_allows(r, a)))
    };
    let mut budget = MAX_COVERED;
    let mut spend = |n: usize| -> Result<(), String> {
        budget = budget.checked_sub(n).ok_or_else(|| {
            format!("the rules grant more than {MAX_COVERED} permissions to check")
        })?;
        Ok(())
    };
    for rule in rules {
        let verbs = unique(strings(rule, "verbs"));
        let urls = unique(strings(rule, "nonResourceURLs"));
        let groups = unique(strings(rule, "apiGroups"));
        let resources = unique(strings(rule, "resources"));
        let names = unique(strings(rule, "resourceNames"));
        let names: Vec<&str> = if names.is_empty() {
            vec![""]
        } else {
            names.iter().map(String::as_str).collect()
        };
        spend(verbs.len() * urls.len())?;
        spend(
            verbs
                .len()
                .saturating_mul(groups.len())
                .saturating_mul(resources.len())
                .saturating_mul(names.len()),
        )?;
        for verb in &verbs {
            for url in &urls {
                let a = Attributes {
                    user,
                    verb,
                    resource: None,
                    path: url,
                };
                if !held(&a) {
                    return Err(format!("{verb} on {url}"));
                }
            }
            for group in &groups {
                for resource in &resources {
                    let (res, sub) = resource.split_once('/').unwrap_or((resource, ""));
                    for name in &names {
                        let a = Attributes {
                            user,
                            verb,
                            resource: Some(ResourceAttributes {
                                group,
                                resource: res,
                                subresource: sub,
                                namespace,
                                name,
                            }),
                            path: "",
                        };
                        if !held(&a) {
                            let what = if group.is_empty() {
                                resource.clone()
                            } else {
                                format!("{resource}.{group}")
                            };
                            return Err(format!("{verb} on {what}"));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn cause(reason: &str, field: String, message: String) -> Cause {
    Cause {
        reason: reason.into(),
        message,
        field,
    }
}

/// The checks on a Role, ClusterRole, RoleBinding or ClusterRoleBinding.
pub fn validate(kind: &str, obj: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    match kind {
        "Role" | "ClusterRole" => {
            for (i, rule) in obj
                .get("rules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let f = |k: &str| format!("rules[{i}].{k}");
                if strings(rule, "verbs").is_empty() {
                    out.push(cause(
                        "FieldValueRequired",
                        f("verbs"),
                        "Required value: verbs must contain at least one value".into(),
                    ));
                }
                let urls = strings(rule, "nonResourceURLs");
                let resources = strings(rule, "resources");
                if !urls.is_empty() {
                    if kind == "Role" {
                        out.push(cause(
                            "FieldValueInvalid",
                            f("nonResourceURLs"),
                            "Invalid value: namespaced rules cannot apply to non-resource URLs"
                                .into(),
                        ));
                    }
                    if !resources.is_empty() || !strings(rule, "apiGroups").is_empty() {
                        out.push(cause(
                            "FieldValueInvalid",
                            f("nonResourceURLs"),
                            "Invalid value: rules cannot apply to both regular resources and non-resource URLs".into(),
                        ));
                    }
                } else {
                    if rule.get("apiGroups").and_then(Value::as_array).is_none() {
                        out.push(cause(
                            "FieldValueRequired",
                            f("apiGroups"),
                            "Required value: resource rules must supply at least one api group"
                                .into(),
                        ));
                    }
                    if resources.is_empty() {
                        out.push(cause(
                            "FieldValueRequired",
                            f("resources"),
                            "Required value: resource rules must supply at least one resource"
                                .into(),
                        ));
                    }
                }
            }
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let kinds: &[&str] = if kind == "RoleBinding" {
                &["Role", "ClusterRole"]
            } else {
                &["ClusterRole"]
            };
            match obj.get("roleRef") {
                None => out.push(cause(
                    "FieldValueRequired",
                    "roleRef".into(),
                    "Required value".into(),
                )),
                Some(r) => {
                    let k = r.get("kind").and_then(Value::as_str).unwrap_or("");
                    if !kinds.contains(&k) {
                        out.push(cause(
                            "FieldValueNotSupported",
                            "roleRef.kind".into(),
                            format!(
                                "Unsupported value: {k:?}: supported values: {}",
                                kinds
                                    .iter()
                                    .map(|k| format!("\"{k}\""))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    if r.get("apiGroup").and_then(Value::as_str) != Some(GROUP) {
                        out.push(cause(
                            "FieldValueNotSupported",
                            "roleRef.apiGroup".into(),
                            format!("Unsupported value: supported values: \"{GROUP}\""),
                        ));
                    }
                    if r.get("name")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        out.push(cause(
                            "FieldValueRequired",
                            "roleRef.name".into(),
                            "Required value".into(),
                        ));
                    }
                }
            }
            for (i, s) in obj
                .get("subjects")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let k = s.get("kind").and_then(Value::as_str).unwrap_or("");
                if !matches!(k, "User" | "Group" | "ServiceAccount") {
                    out.push(cause(
                        "FieldValueNotSupported",
                        format!("subjects[{i}].kind"),
                        format!("Unsupported value: {k:?}: supported values: \"ServiceAccount\", \"User\", \"Group\""),
                    ));
                }
                if s.get("name")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    out.push(cause(
                        "FieldValueRequired",
                        format!("subjects[{i}].name"),
                        "Required value".into(),
                    ));
                }
                if k == "ServiceAccount"
                    && kind == "ClusterRoleBinding"
                    && s.get("namespace")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    out.push(cause(
                        "FieldValueRequired",
                        format!("subjects[{i}].namespace"),
                        "Required value".into(),
                    ));
                }
            }
        }
        _ => {}
    }
    out
}

/// A ClusterRole's rules as the aggregation controller makes them: the rules of every other
/// ClusterRole whose labels match one of its `clusterRoleSelectors`, each rule once, in the
/// order of the roles' names. `None` for a role without an aggregation rule.
pub fn aggregate(role: &Value, all: &[Arc<Value>]) -> Option<Vec<Value>> {
    let selectors = role
        .pointer("/aggregationRule/clusterRoleSelectors")?
        .as_array()?;
    let own = name_of(role);
    let mut sources: Vec<&Arc<Value>> = all
        .iter()
        .filter(|r| name_of(r) != own)
        .filter(|r| {
            let labels = r.pointer("/metadata/labels");
            selectors.iter().any(|s| selector_matches(s, labels))
        })
        .collect();
    sources.sort_by_key(|r| name_of(r).to_string());
    let mut out: Vec<Value> = Vec::new();
    for r in sources {
        for rule in rules_of(r) {
            if !out.contains(rule) {
                out.push(rule.clone());
            }
        }
    }
    Some(out)
}

/// A label selector (`matchLabels`, `matchExpressions`) against labels.
fn selector_matches(sel: &Value, labels: Option<&Value>) -> bool {
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    let labels_ok = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_none_or(|m| m.iter().all(|(k, v)| label(k) == v.as_str()));
    let exprs_ok = sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_none_or(|es| {
            es.iter().all(|e| {
                let key = e.get("key").and_then(Value::as_str).unwrap_or("");
                let values = strings(e, "values");
                match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                    "In" => label(key).is_some_and(|v| values.iter().any(|x| x == v)),
                    "NotIn" => label(key).is_none_or(|v| !values.iter().any(|x| x == v)),
                    "Exists" => label(key).is_some(),
                    "DoesNotExist" => label(key).is_none(),
                    _ => false,
                }
            })
        });
    labels_ok && exprs_ok
}

fn rule(verbs: &[&str], groups: &[&str], resources: &[&str]) -> Value {
    json!({"verbs": verbs, "apiGroups": groups, "resources": resources})
}

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];

fn cluster_role(
    name: &str,
    labels: Value,
    rules: Vec<Value>,
    aggregate_from: Option<&str>,
) -> Value {
    let mut role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
        },
        "rules": rules,
    });
    if let Some(label) = aggregate_from {
        role["aggregationRule"] = json!({
            "clusterRoleSelectors": [{"matchLabels": {label: "true"}}]
        });
    }
    role
}

fn cluster_binding(name: &str, role: &str, groups: &[&str]) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
        },
        "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": role},
        "subjects": groups.iter().map(|g| json!({"apiGroup": GROUP, "kind": "Group", "name": g})).collect::<Vec<_>>(),
    })
}

/// The ClusterRoles and ClusterRoleBindings every cluster starts with, as Kubernetes':
/// `cluster-admin` (bound to `system:masters`), the user-facing `admin`, `edit` and `view`
/// (aggregated from `system:aggregate-to-*` and any ClusterRole labelled
/// `rbac.authorization.k8s.io/aggregate-to-<role>: "true"`), `system:discovery` and
/// `system:public-info-viewer` (bound to every authenticated user, the latter to
/// unauthenticated ones too) and `system:basic-user` (which lets users ask what they may do).
pub fn defaults() -> Vec<Value> {
    let boot = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
    let with = |extra: &[(&str, &str)]| {
        let mut l = boot.clone();
        for (k, v) in extra {
            l[*k] = json!(v);
        }
        l
    };
    // What `view` grants: reading the workloads and their configuration, not Secrets.
    let viewable: &[&str] = &[
        "pods",
        "pods/log",
        "pods/status",
        "configmaps",
        "endpoints",
        "persistentvolumeclaims",
        "replicationcontrollers",
        "services",
        "services/status",
        "serviceaccounts",
        "events",
        "limitranges",
        "resourcequotas",
        "namespaces",
        "namespaces/status",
    ];
    let apps: &[&str] = &[
        "deployments",
        "deployments/scale",
        "deployments/status",
        "replicasets",
        "replicasets/scale",
        "replicasets/status",
        "daemonsets",
        "daemonsets/status",
        "statefulsets",
        "statefulsets/scale",
    ];
    let editable_core: &[&str] = &[
        "pods",
        "pods/eviction",
        "pods/exec",
        "pods/attach",
        "pods/portforward",
        "configmaps",
        "persistentvolumeclaims",
        "replicationcontrollers",
        "replicationcontrollers/scale",
        "secrets",
        "services",
        "serviceaccounts",
        "events",
    ];
    // (No Endpoints or EndpointSlices: Kubernetes took their writes out of edit and admin,
    // CVE-2021-25740.)
    let apps_write: &[&str] = &[
        "deployments",
        "deployments/scale",
        "replicasets",
        "replicasets/scale",
        "daemonsets",
        "statefulsets",
        "statefulsets/scale",
    ];
    let batch: &[&str] = &["jobs", "jobs/status", "cronjobs", "cronjobs/status"];
    let mut edit_read = vec![rule(READ, &[""], &["secrets"])];
    edit_read.extend([
        rule(WRITE, &[""], editable_core),
        rule(WRITE, &["apps"], apps_write),
        rule(WRITE, &["batch"], &["jobs", "cronjobs"]),
        rule(WRITE, &["coordination.k8s.io"], &["leases"]),
        rule(&["create"], &[""], &["pods/exec", "serviceaccounts/token"]),
        rule(&["impersonate"], &[""], &["serviceaccounts"]),
    ]);
    vec![
        cluster_role(
            "cluster-admin",
            boot.clone(),
            vec![
                rule(&["*"], &["*"], &["*"]),
                json!({"verbs": ["*"], "nonResourceURLs": ["*"]}),
            ],
            None,
        ),
        cluster_role(
            "admin",
            boot.clone(),
            vec![],
            Some("rbac.authorization.k8s.io/aggregate-to-admin"),
        ),
        cluster_role(
            "edit",
            with(&[("rbac.authorization.k8s.io/aggregate-to-admin", "true")]),
            vec![],
            Some("rbac.authorization.k8s.io/aggregate-to-edit"),
        ),
        cluster_role(
            "view",
            with(&[
                ("rbac.authorization.k8s.io/aggregate-to-edit", "true"),
                ("rbac.authorization.k8s.io/aggregate-to-admin", "true"),
            ]),
            vec![],
            Some("rbac.authorization.k8s.io/aggregate-to-view"),
        ),
        cluster_role(
            "system:aggregate-to-admin",
            with(&[("rbac.authorization.k8s.io/aggregate-to-admin", "true")]),
            vec![
                rule(
                    &["create"],
                    &["authorization.k8s.io"],
                    &["localsubjectaccessreviews"],
                ),
                rule(
                    &[READ, WRITE].concat(),
                    &[GROUP],
                    &["roles", "rolebindings"],
                ),
            ],
            None,
        ),
        cluster_role(
            "system:aggregate-to-edit",
            with(&[("rbac.authorization.k8s.io/aggregate-to-edit", "true")]),
            edit_read,
            None,
        ),
        cluster_role(
            "system:aggregate-to-view",
            with(&[("rbac.authorization.k8s.io/aggregate-to-view", "true")]),
            vec![
                rule(READ, &[""], viewable),
                rule(READ, &["apps"], apps),
                rule(READ, &["batch"], batch),
                rule(READ, &["discovery.k8s.io"], &["endpointslices"]),
                rule(READ, &["coordination.k8s.io"], &["leases"]),
            ],
            None,
        ),
        cluster_role(
            "system:discovery",
            boot.clone(),
            vec![json!({"verbs": ["get"], "nonResourceURLs": [
                "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz",
                "/openapi", "/openapi/*", "/version", "/version/"
            ]})],
            None,
        ),
        cluster_role(
            "system:public-info-viewer",
            boot.clone(),
            vec![json!({"verbs": ["get"], "nonResourceURLs": [
                "/healthz", "/livez", "/readyz", "/version", "/version/"
            ]})],
            None,
        ),
        cluster_role(
            "system:basic-user",
            boot.clone(),
            vec![rule(
                &["create"],
                &["authorization.k8s.io"],
                &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
            )],
            None,
        ),
        cluster_binding("cluster-admin", "cluster-admin", &[MASTERS]),
        cluster_binding(
            "system:discovery",
            "system:discovery",
            &["system:authenticated"],
        ),
        cluster_binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            &["system:authenticated", "system:unauthenticated"],
        ),
        cluster_binding(
            "system:basic-user",
            "system:basic-user",
            &["system:authenticated"],
        ),
    ]
}

/// [`defaults`] with every aggregated ClusterRole's rules filled in (to a fixpoint), as the
/// aggregation controller would leave them: what the leader creates, so nothing is
/// rewritten right after.
pub fn defaults_aggregated() -> Vec<Value> {
    let (mut roles, bindings): (Vec<Arc<Value>>, Vec<Arc<Value>>) = defaults()
        .into_iter()
        .map(Arc::new)
        .partition(|v| v["kind"] == "ClusterRole");
    // Each pass settles one more level of chaining; the defaults have three.
    for _ in 0..8 {
        let next: Vec<Arc<Value>> = roles
            .iter()
            .map(|r| match aggregate(r, &roles) {
                Some(rules) => {
                    let mut r = (**r).clone();
                    r["rules"] = json!(rules);
                    Arc::new(r)
                }
                None => r.clone(),
            })
            .collect();
        if next == roles {
            break;
        }
        roles = next;
    }
    roles
        .into_iter()
        .chain(bindings)
        .map(|v| (*v).clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Maps {
        cluster_roles: HashMap<String, Arc<Value>>,
        roles: HashMap<(String, String), Arc<Value>>,
        crbs: Vec<Arc<Value>>,
        rbs: Vec<(String, Arc<Value>)>,
    }

    impl Store for Maps {
        fn cluster_role(&self, name: &str) -> Option<Arc<Value>> {
            self.cluster_roles.get(name).cloned()
        }
        fn role(&self, ns: &str, name: &str) -> Option<Arc<Value>> {
            self.roles.get(&(ns.into(), name.into())).cloned()
        }
        fn cluster_role_bindings(&self) -> Vec<Arc<Value>> {
            self.crbs.clone()
        }
        fn role_bindings(&self, ns: &str) -> Vec<Arc<Value>> {
            self.rbs
                .iter()
                .filter(|(n, _)| n == ns)
                .map(|(_, b)| b.clone())
                .collect()
        }
    }

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            uid: String::new(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn res<'a>(
        u: &'a User,
        verb: &'a str,
        group: &'a str,
        resource: &'a str,
        ns: &'a str,
        name: &'a str,
    ) -> Attributes<'a> {
        Attributes {
            user: u,
            verb,
            resource: Some(ResourceAttributes {
                group,
                resource,
                subresource: "",
                namespace: ns,
                name,
            }),
            path: "",
        }
    }

    /// The defaults, aggregated as the controller would.
    fn defaults_store() -> Maps {
        let mut m = Maps::default();
        for v in defaults_aggregated() {
            let v = Arc::new(v);
            match v["kind"].as_str().unwrap() {
                "ClusterRole" => {
                    // Aggregation has settled: once more changes nothing.
                    let all: Vec<Arc<Value>> = defaults_aggregated()
                        .into_iter()
                        .filter(|r| r["kind"] == "ClusterRole")
                        .map(Arc::new)
                        .collect();
                    if let Some(rules) = aggregate(&v, &all) {
                        assert_eq!(json!(rules), v["rules"], "{}", name_of(&v));
                    }
                    m.cluster_roles.insert(name_of(&v).to_string(), v);
                }
                _ => m.crbs.push(v),
            }
        }
        m
    }

    #[test]
    fn view_reads_workloads_but_not_secrets_and_writes_nothing() {
        let mut m = defaults_store();
        m.rbs.push((
            "team".into(),
            Arc::new(json!({"metadata": {"name": "v", "namespace": "team"},
                "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": "view"},
                "subjects": [{"kind": "User", "name": "val"}]})),
        ));
        let val = user("val", &["system:authenticated"]);
        assert!(allows(&m, &res(&val, "list", "", "pods", "team", "")).is_some());
        assert!(allows(&m, &res(&val, "get", "apps", "deployments", "team", "web")).is_some());
        assert!(allows(&m, &res(&val, "create", "", "pods", "team", "")).is_none());
        assert!(allows(&m, &res(&val, "get", "", "secrets", "team", "s")).is_none());
        // Only in the binding's namespace.
        assert!(allows(&m, &res(&val, "list", "", "pods", "other", "")).is_none());
        assert!(allows(&m, &res(&val, "list", "", "pods", "", "")).is_none());
        // Discovery for every authenticated user; nothing for the anonymous one but health.
        let disc = Attributes {
            user: &val,
            verb: "get",
            resource: None,
            path: "/apis/apps/v1",
        };
        assert!(allows(&m, &disc).is_some());
        let anon = user("system:anonymous", &["system:unauthenticated"]);
        let health = Attributes {
            user: &anon,
            verb: "get",
            resource: None,
            path: "/version",
        };
        assert!(allows(&m, &health).is_some());
        assert!(allows(
            &m,
            &Attributes {
                path: "/apis",
                ..health
            }
        )
        .is_none());
        // Edit aggregates view, plus Secrets and writes.
        let edit = &m.cluster_roles["edit"];
        let a = res(&val, "get", "", "secrets", "team", "s");
        assert!(rules_of(edit).any(|r| rule_allows(r, &a)));
        assert!(rules_of(edit).any(|r| rule_allows(r, &res(&val, "list", "", "pods", "", ""))));
    }

    #[test]
    fn rules_match_as_kubernetes_matches_them() {
        let u = user("u", &[]);
        let named = json!({"verbs": ["get"], "apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cfg"]});
        assert!(rule_allows(
            &named,
            &res(&u, "get", "", "configmaps", "ns", "cfg")
        ));
        assert!(!rule_allows(
            &named,
            &res(&u, "get", "", "configmaps", "ns", "other")
        ));
        assert!(!rule_allows(
            &named,
            &res(&u, "list", "", "configmaps", "ns", "")
        ));
        let sub =
            json!({"verbs": ["*"], "apiGroups": ["apps"], "resources": ["deployments/scale"]});
        let mut a = res(&u, "update", "apps", "deployments", "ns", "d");
        assert!(!rule_allows(&sub, &a));
        a.resource.as_mut().unwrap().subresource = "scale";
        assert!(rule_allows(&sub, &a));
        let any_sub = json!({"verbs": ["get"], "apiGroups": ["*"], "resources": ["*/status"]});
        let mut s = res(&u, "get", "", "pods", "ns", "p");
        s.resource.as_mut().unwrap().subresource = "status";
        assert!(rule_allows(&any_sub, &s));
        let urls = json!({"verbs": ["get"], "nonResourceURLs": ["/metrics", "/debug/*"]});
        let p = |path| Attributes {
            user: &u,
            verb: "get",
            resource: None,
            path,
        };
        assert!(rule_allows(&urls, &p("/metrics")));
        assert!(rule_allows(&urls, &p("/debug/pprof")));
        assert!(!rule_allows(&urls, &p("/metricsx")));
    }

    #[test]
    fn nobody_grants_what_they_do_not_hold() {
        let mut m = defaults_store();
        m.rbs.push((
            "team".into(),
            Arc::new(json!({"metadata": {"name": "e"},
                "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": "edit"},
                "subjects": [{"kind": "Group", "name": "devs"}]})),
        ));
        let dev = user("dev", &["devs", "system:authenticated"]);
        let pods = [rule(&["get", "create"], &[""], &["pods"])];
        assert!(covers(&m, &dev, "team", &pods).is_ok());
        // (Permissions are checked in order: create before get.)
        assert_eq!(
            covers(&m, &dev, "other", &pods).unwrap_err(),
            "create on pods"
        );
        let wildcard = [rule(&["*"], &[""], &["pods"])];
        assert_eq!(
            covers(&m, &dev, "team", &wildcard).unwrap_err(),
            "* on pods"
        );
        let nodes = [rule(&["get"], &[""], &["nodes"])];
        assert!(covers(&m, &dev, "team", &nodes).is_err());
        let root = user("root", &[MASTERS]);
        assert!(covers(&m, &root, "", &wildcard).is_ok());
        // A role too large to check is refused at once (duplicates count once).
        let many: Vec<String> = (0..200).map(|i| format!("r{i}")).collect();
        let huge = json!([{"verbs": ["get", "list", "get"], "apiGroups": ["", "apps", "batch"],
            "resources": many.clone(), "resourceNames": many}]);
        let started = std::time::Instant::now();
        let e = covers(&m, &dev, "team", huge.as_array().unwrap()).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let dup = json!([{"verbs": vec!["get"; 5000], "apiGroups": vec![""; 5000],
            "resources": vec!["pods"; 5000]}]);
        assert!(covers(&m, &dev, "team", dup.as_array().unwrap()).is_ok());
    }

    #[test]
    fn rbac_objects_are_checked() {
        let bad = json!({"rules": [{"verbs": [], "apiGroups": [""], "resources": []},
            {"verbs": ["get"], "nonResourceURLs": ["/x"]}]});
        let fields: Vec<String> = validate("Role", &bad)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            vec![
                "rules[0].verbs",
                "rules[0].resources",
                "rules[1].nonResourceURLs"
            ]
        );
        let binding = json!({"roleRef": {"apiGroup": GROUP, "kind": "Role", "name": "r"},
            "subjects": [{"kind": "ServiceAccount", "name": "sa"}, {"kind": "Robot", "name": "x"}]});
        let fields: Vec<String> = validate("ClusterRoleBinding", &binding)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            vec!["roleRef.kind", "subjects[0].namespace", "subjects[1].kind"]
        );
        assert!(validate(
            "RoleBinding",
            &json!({"roleRef": {"apiGroup": GROUP, "kind": "Role", "name": "r"},
            "subjects": [{"kind": "ServiceAccount", "name": "sa"}]})
        )
        .is_empty());
    }
}
