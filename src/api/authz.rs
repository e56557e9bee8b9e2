//! Authorization of API requests, as kube-apiserver's `Node,RBAC` chain: `system:masters`
//! may do anything; a node agent (`system:node:<name>` in `system:nodes`) is allowed what
//! the node authorizer allows; anyone is allowed what RBAC grants; everything else is 403.
//!
//! The node authorizer (Kubernetes' node authorizer with NodeRestriction's object checks):
//! a node may read nodes, pods, Services, Endpoints and EndpointSlices; write its own Node
//! (and status) and its own Lease in `kube-node-lease`; write the status of, and delete,
//! pods bound to it; create Events; and read a ConfigMap, Secret, PersistentVolumeClaim
//! or ServiceAccount only while a pod bound to it refers to it. Nothing else: another
//! node's objects, pods bound elsewhere and unreferenced Secrets are 403.
//!
//! Owns, per replica, informers of the four RBAC resources and a projection of pods (node
//! and references only, not whole pods) with its reference index — all read from this
//! replica's own store. Invariants: a decision reads only these caches and, to confirm a
//! pod's node when the cache says otherwise, this replica's store; decisions wait for the
//! first list (never deny because a cache is empty).

use crate::api::meta::Ptr;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::objects::{Consistency, Objects};
use super::rbac::{self, Attributes, ResourceAttributes};
use super::resources;
use crate::auth::User;
use crate::controllers::informer::Informer;

/// The group of node agents.
pub const NODES: &str = "system:nodes";
/// The namespace of node Leases.
pub const NODE_LEASES: &str = "kube-node-lease";

/// The node name of a node agent's user, if it is one.
pub fn node_of(user: &User) -> Option<&str> {
    user.name
        .strip_prefix("system:node:")
        .filter(|n| !n.is_empty() && user.in_group(NODES))
}

/// What the node graph keeps of a pod: its node and what it refers to.
fn project_pod(pod: &Value) -> Value {
    let mut refs: Vec<Value> = Vec::new();
    let mut add = |kind: &str, name: Option<&Value>| {
        if let Some(n) = name.and_then(Value::as_str).filter(|n| !n.is_empty()) {
            let r = json!([kind, n]);
            if !refs.contains(&r) {
                refs.push(r);
            }
        }
    };
    let spec = pod.get("spec").unwrap_or(&Value::Null);
    add("serviceaccounts", spec.get("serviceAccountName"));
    for s in spec
        .get("imagePullSecrets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add("secrets", s.get("name"));
    }
    for v in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add("configmaps", v.ptr("/configMap/name"));
        add("secrets", v.ptr("/secret/secretName"));
        add(
            "persistentvolumeclaims",
            v.ptr("/persistentVolumeClaim/claimName"),
        );
        for src in v
            .ptr("/projected/sources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            add("configmaps", src.ptr("/configMap/name"));
            add("secrets", src.ptr("/secret/name"));
        }
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for c in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for e in c.get("env").and_then(Value::as_array).into_iter().flatten() {
                add("configmaps", e.ptr("/valueFrom/configMapKeyRef/name"));
                add("secrets", e.ptr("/valueFrom/secretKeyRef/name"));
            }
            for e in c
                .get("envFrom")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                add("configmaps", e.ptr("/configMapRef/name"));
                add("secrets", e.ptr("/secretRef/name"));
            }
        }
    }
    json!({
        "node": spec.get("nodeName").cloned().unwrap_or(Value::Null),
        "refs": refs,
    })
}

/// (namespace, resource, name) → node → how many of its pods refer to it.
type Graph = HashMap<(String, String, String), HashMap<String, u32>>;

fn graph_edit(graph: &mut Graph, ns: &str, pod: &Value, delta: i32) {
    let Some(node) = pod.get("node").and_then(Value::as_str) else {
        return;
    };
    for r in pod
        .get("refs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(kind), Some(name)) = (r[0].as_str(), r[1].as_str()) else {
            continue;
        };
        let key = (ns.to_string(), kind.to_string(), name.to_string());
        let nodes = graph.entry(key.clone()).or_default();
        let n = nodes.entry(node.to_string()).or_default();
        if delta > 0 {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                nodes.remove(node);
                if nodes.is_empty() {
                    graph.remove(&key);
                }
            }
        }
    }
}

/// The namespace of a pod's store key (`/registry/pods/<ns>/<name>`).
fn key_namespace(key: &str) -> &str {
    key.trim_start_matches("/registry/pods/")
        .split('/')
        .next()
        .unwrap_or("")
}

/// One replica's authorizer.
pub struct Authorizer {
    objects: Objects,
    roles: Arc<Informer>,
    role_bindings: Arc<Informer>,
    cluster_roles: Arc<Informer>,
    cluster_role_bindings: Arc<Informer>,
    pods: Arc<Informer>,
    graph: Arc<Mutex<Graph>>,
    /// Every cache has listed (it stays so): the per-request check is one load.
    listed: std::sync::atomic::AtomicBool,
    /// The caches' tasks, awaited at shutdown (see [`Authorizer::stopped`]).
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl rbac::Store for Authorizer {
    fn cluster_role(&self, name: &str) -> Option<Arc<Value>> {
        self.cluster_roles
            .get(&self.cluster_roles.resource().key(None, name))
    }
    fn role(&self, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.roles
            .get(&self.roles.resource().key(Some(namespace), name))
    }
    fn cluster_role_bindings(&self) -> Vec<Arc<Value>> {
        self.cluster_role_bindings.list()
    }
    fn role_bindings(&self, namespace: &str) -> Vec<Arc<Value>> {
        self.role_bindings
            .filter(|b| b.ptr("/metadata/namespace").and_then(Value::as_str) == Some(namespace))
    }
}

fn informer(plural: &str) -> Arc<Informer> {
    Informer::new(resources::find(rbac::GROUP, "v1", plural).expect("served"))
}

impl Authorizer {
    /// Starts the caches on this replica's store; they run until `stop`.
    pub fn start(objects: Objects, stop: CancellationToken) -> Arc<Authorizer> {
        let pods = Informer::trimmed(resources::find("", "v1", "pods").expect("served"), |p| {
            Ok(project_pod(&p))
        });
        let graph: Arc<Mutex<Graph>> = Arc::default();
        {
            let graph = graph.clone();
            pods.subscribe(move |c| {
                let ns = key_namespace(c.key);
                let mut g = graph.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(old) = c.old {
                    graph_edit(&mut g, ns, old, -1);
                }
                if let Some(new) = c.new {
                    graph_edit(&mut g, ns, new, 1);
                }
            });
        }
        let a = Arc::new(Authorizer {
            objects: objects.clone(),
            roles: informer("roles"),
            role_bindings: informer("rolebindings"),
            cluster_roles: informer("clusterroles"),
            cluster_role_bindings: informer("clusterrolebindings"),
            pods,
            graph,
            listed: std::sync::atomic::AtomicBool::new(false),
            tasks: Mutex::default(),
        });
        for inf in a.informers() {
            let task = tokio::spawn(inf.run(objects.clone(), stop.clone()));
            a.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        }
        a
    }

    /// Waits until every cache's task has ended (after the stop token given to
    /// [`Authorizer::start`] was cancelled): their store reads end before the store closes.
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }

    fn informers(&self) -> [Arc<Informer>; 5] {
        [
            self.roles.clone(),
            self.role_bindings.clone(),
            self.cluster_roles.clone(),
            self.cluster_role_bindings.clone(),
            self.pods.clone(),
        ]
    }

    /// Waits until every cache has listed once.
    pub async fn synced(&self) {
        use std::sync::atomic::Ordering;
        if self.listed.load(Ordering::Acquire) {
            return;
        }
        for inf in self.informers() {
            inf.synced().await;
        }
        self.listed.store(true, Ordering::Release);
    }

    /// Whether the pod `namespace/name` is bound to `node`: the cache, confirmed from the
    /// store when the cache says no (it may lag the store by an event). A pod that does not
    /// exist counts as bound (the request then gets its 404, as in Kubernetes, where
    /// NodeRestriction only looks at pods that exist).
    async fn bound_to(&self, namespace: &str, name: &str, node: &str) -> bool {
        let r = self.pods.resource();
        let key = r.key(Some(namespace), name);
        let on = |p: &Value| p.ptr("/spec/nodeName").and_then(Value::as_str) == Some(node);
        if self
            .pods
            .get(&key)
            .is_some_and(|p| p.get("node").and_then(Value::as_str) == Some(node))
        {
            return true;
        }
        match self.objects.get(&key, Consistency::Local).await {
            Ok(Some(s)) => on(&s.object),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Whether a pod bound to `node` refers to `resource/name` in `namespace`: the index,
    /// confirmed from the store when the index says no (a pod just bound may not be in it
    /// yet, and its agent asks for its Secrets at once). The store read scans only the
    /// namespace's pods whose bytes name the node, and only on a miss.
    async fn referenced(&self, namespace: &str, resource: &str, name: &str, node: &str) -> bool {
        let indexed = self
            .graph
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(
                namespace.to_string(),
                resource.to_string(),
                name.to_string(),
            ))
            .is_some_and(|nodes| nodes.contains_key(node));
        if indexed {
            return true;
        }
        let start = format!("{}{namespace}/", self.pods.resource().prefix());
        let end = super::objects::prefix_end(start.as_bytes());
        let mut needle = b"\"nodeName\":".to_vec();
        needle.extend(serde_json::to_vec(node).unwrap_or_default());
        let Ok((pods, ..)) = self
            .objects
            .range_containing(
                start.as_bytes(),
                &end,
                0,
                0,
                Consistency::Local,
                Some(&needle),
            )
            .await
        else {
            return false;
        };
        let want = json!([resource, name]);
        pods.iter().any(|p| {
            let projected = project_pod(&p.object);
            projected["node"] == node
                && projected["refs"]
                    .as_array()
                    .is_some_and(|refs| refs.contains(&want))
        })
    }

    /// The node authorizer: `Some(reason)` if it allows the request (it has no opinion
    /// otherwise).
    async fn node_allows(&self, node: &str, a: &Attributes<'_>) -> Option<String> {
        let r = a.resource?;
        let read = matches!(a.verb, "get" | "list" | "watch");
        let allowed = match (r.group, r.resource, r.subresource) {
            ("", "nodes", _) if read => true,
            // Its own Node (creating it: NodeRestriction checks the body's name).
            ("", "nodes", "") if a.verb == "create" => true,
            ("", "nodes", "" | "status") => r.name == node,
            ("coordination.k8s.io", "leases", "") => {
                r.namespace == NODE_LEASES
                    && (r.name == node || (a.verb == "create" && r.name.is_empty()))
            }
            ("", "pods", "") if read => true,
            ("", "pods", "status") if matches!(a.verb, "get" | "update" | "patch") => {
                self.bound_to(r.namespace, r.name, node).await
            }
            ("", "pods", "") if a.verb == "delete" => {
                self.bound_to(r.namespace, r.name, node).await
            }
            ("" | "events.k8s.io", "events", "") => {
                matches!(a.verb, "create" | "update" | "patch")
            }
            ("", "services" | "endpoints", "") | ("discovery.k8s.io", "endpointslices", "") => read,
            ("", "configmaps" | "secrets" | "persistentvolumeclaims" | "serviceaccounts", "") => {
                a.verb == "get" && self.referenced(r.namespace, r.resource, r.name, node).await
            }
            _ => false,
        };
        allowed.then(|| format!("node authorizer: allowed for node {node:?}"))
    }

    /// The decision: `Ok(reason)` or `Err(why not)`, Kubernetes' wording.
    pub async fn authorize(&self, a: &Attributes<'_>) -> Result<String, String> {
        if a.user.in_group(rbac::MASTERS) {
            return Ok(format!("{} may do anything", rbac::MASTERS));
        }
        self.synced().await;
        if let Some(node) = node_of(a.user) {
            if let Some(why) = self.node_allows(node, a).await {
                return Ok(why);
            }
        }
        if let Some(why) = rbac::allows(self, a) {
            return Ok(why);
        }
        Err(forbidden_message(a))
    }

    /// The escalation check for writing an RBAC object as `user` (see
    /// [`rbac::covers`]): roles need `escalate` or every permission they grant; bindings
    /// need `bind` on the role or every permission it grants.
    /// (Called after [`Authorizer::authorize`] passed for the same request, so the caches
    /// have listed.)
    pub fn may_write_rbac(&self, user: &User, kind: &str, obj: &Value) -> Result<(), String> {
        if user.in_group(rbac::MASTERS) {
            return Ok(());
        }
        let ns = obj
            .ptr("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        let name = obj
            .ptr("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let holds = |verb: &str, resource: &str, name: &str| {
            rbac::allows(
                self,
                &Attributes {
                    user,
                    verb,
                    resource: Some(ResourceAttributes {
                        group: rbac::GROUP,
                        resource,
                        subresource: "",
                        namespace: ns,
                        name,
                    }),
                    path: "",
                },
            )
            .is_some()
        };
        let rules = |v: &Value| -> Vec<Value> {
            v.get("rules")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        match kind {
            "Role" | "ClusterRole" => {
                let plural = if kind == "Role" {
                    "roles"
                } else {
                    "clusterroles"
                };
                if holds("escalate", plural, name) {
                    return Ok(());
                }
                if obj.get("aggregationRule").is_some() {
                    return Err(format!(
                        "user {:?} may not create an aggregated ClusterRole without the escalate verb",
                        user.name
                    ));
                }
                rbac::covers(self, user, ns, &rules(obj)).map_err(|missing| {
                    format!(
                        "user {:?} is attempting to grant RBAC permissions not currently held: {missing}",
                        user.name
                    )
                })
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                let role_kind = obj
                    .ptr("/roleRef/kind")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let role_name = obj
                    .ptr("/roleRef/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let plural = if role_kind == "Role" {
                    "roles"
                } else {
                    "clusterroles"
                };
                if holds("bind", plural, role_name) {
                    return Ok(());
                }
                let role = if role_kind == "Role" {
                    rbac::Store::role(self, ns, role_name)
                } else {
                    rbac::Store::cluster_role(self, role_name)
                };
                let Some(role) = role else {
                    return Err(format!(
                        "user {:?} cannot bind {role_kind} {role_name:?}: it does not exist (and they lack the bind verb)",
                        user.name
                    ));
                };
                rbac::covers(self, user, ns, &rules(&role)).map_err(|missing| {
                    format!(
                        "user {:?} is attempting to grant RBAC permissions not currently held: {missing}",
                        user.name
                    )
                })
            }
            _ => Ok(()),
        }
    }
}

/// Label prefixes a node may not set on itself (they steer workloads to it).
const RESTRICTED_LABELS: &[&str] = &["node-restriction.kubernetes.io/", "node-role.kubernetes.io"];

/// NodeRestriction on what a node writes (`current`: the object it replaces, for an
/// update): only its own Node and Lease; no restricted labels set or changed on its Node
/// (`node-restriction.kubernetes.io/`, `node-role.kubernetes.io`), and no taint changed
/// after it registered (taints keep workloads away; a node removing its own would draw
/// them in, and with them their Secrets).
pub fn node_admits(
    user: &User,
    kind: &str,
    obj: &Value,
    current: Option<&Value>,
) -> Result<(), String> {
    let Some(node) = node_of(user) else {
        return Ok(());
    };
    let name = obj
        .ptr("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    match kind {
        "Node" | "Lease" if name != node => {
            return Err(format!(
                "node {node:?} is not allowed to modify {} {name:?}",
                kind.to_lowercase()
            ))
        }
        "Node" => {}
        _ => return Ok(()),
    }
    let labels = |v: Option<&Value>| {
        v.and_then(|v| v.ptr("/metadata/labels"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let (new, old) = (labels(Some(obj)), labels(current));
    for key in new.keys().chain(old.keys()) {
        if RESTRICTED_LABELS.iter().any(|p| key.starts_with(p)) && new.get(key) != old.get(key) {
            return Err(format!(
                "node {node:?} is not allowed to modify the label {key:?}"
            ));
        }
    }
    if let Some(cur) = current {
        if cur.ptr("/spec/taints") != obj.ptr("/spec/taints") {
            return Err(format!("node {node:?} is not allowed to modify its taints"));
        }
    }
    Ok(())
}

/// Kubernetes' message for a denied request.
pub fn forbidden_message(a: &Attributes<'_>) -> String {
    match &a.resource {
        Some(r) => {
            let resource = if r.subresource.is_empty() {
                r.resource.to_string()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            let scope = if r.namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace {:?}", r.namespace)
            };
            format!(
                "User {:?} cannot {} resource {resource:?} in API group {:?} {scope}",
                a.user.name, a.verb, r.group
            )
        }
        None => format!("User {:?} cannot {} path {:?}", a.user.name, a.verb, a.path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_graph_follows_pods() {
        let pod = json!({"spec": {"nodeName": "n1", "serviceAccountName": "sa",
            "volumes": [{"name": "v", "secret": {"secretName": "s1"}},
                        {"name": "p", "projected": {"sources": [{"configMap": {"name": "c2"}}]}}],
            "containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "k"}}}],
                            "envFrom": [{"configMapRef": {"name": "c1"}}]}]}});
        let p = project_pod(&pod);
        assert_eq!(p["node"], "n1");
        let mut g = Graph::new();
        graph_edit(&mut g, "ns", &p, 1);
        graph_edit(&mut g, "ns", &p, 1);
        for (kind, name) in [
            ("secrets", "s1"),
            ("secrets", "s2"),
            ("configmaps", "c1"),
            ("configmaps", "c2"),
            ("serviceaccounts", "sa"),
        ] {
            let k = ("ns".to_string(), kind.to_string(), name.to_string());
            assert_eq!(g[&k]["n1"], 2, "{kind}/{name}");
        }
        graph_edit(&mut g, "ns", &p, -1);
        graph_edit(&mut g, "ns", &p, -1);
        assert!(g.is_empty());
        // Unbound pods refer nothing to any node.
        let unbound = project_pod(&json!({"spec": {"volumes": [{"secret": {"secretName": "s"}}]}}));
        graph_edit(&mut g, "ns", &unbound, 1);
        assert!(g.is_empty());
    }

    #[test]
    fn node_restriction_on_creates() {
        let node = User {
            name: "system:node:n1".into(),
            uid: String::new(),
            groups: vec![NODES.into(), crate::auth::AUTHENTICATED.into()],
        };
        let n1 = json!({"metadata": {"name": "n1", "labels": {"zone": "a"}},
            "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}});
        assert!(node_admits(&node, "Node", &n1, None).is_ok());
        assert!(node_admits(&node, "Node", &json!({"metadata": {"name": "n2"}}), None).is_err());
        assert!(node_admits(&node, "Lease", &json!({"metadata": {"name": "n2"}}), None).is_err());
        // Its own labels, not the restricted ones; its taints stay as registered.
        let mut relabelled = n1.clone();
        relabelled["metadata"]["labels"]["zone"] = json!("b");
        assert!(node_admits(&node, "Node", &relabelled, Some(&n1)).is_ok());
        relabelled["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = json!("");
        assert!(node_admits(&node, "Node", &relabelled, Some(&n1)).is_err());
        let mut untainted = n1.clone();
        untainted["spec"]["taints"] = json!([]);
        assert!(node_admits(&node, "Node", &untainted, Some(&n1)).is_err());
        let impostor = User {
            groups: vec![crate::auth::AUTHENTICATED.into()],
            ..node
        };
        assert_eq!(node_of(&impostor), None);
        assert!(node_admits(&impostor, "Node", &json!({"metadata": {"name": "x"}}), None).is_ok());
    }
}
