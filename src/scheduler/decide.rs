//! The scheduling decision: a pure function of a snapshot of the nodes (with what is
//! already bound to them) and one pod.
//!
//! Filters (a node must pass all): Ready and schedulable (cordoned nodes only for pods that
//! tolerate `node.kubernetes.io/unschedulable`); resource requests (cpu, memory,
//! ephemeral-storage, pod count) within allocatable minus what is bound; `nodeSelector`;
//! required node affinity; NoSchedule/NoExecute taints tolerated; host ports free; required
//! pod anti-affinity by topology key. Scores (highest wins, ties to the node with fewer pods,
//! then by name): least allocated and balanced cpu/memory, fewer pods of the same owner
//! (spreading replicas), preferred node affinity.

use crate::api::meta::Ptr;
use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use crate::api::quantity;

/// Resource amounts: cpu in milli-cores, memory and storage in bytes, and pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Milli-cpu.
    pub cpu: i64,
    /// Bytes of memory.
    pub memory: i64,
    /// Bytes of ephemeral storage.
    pub storage: i64,
    /// Pods.
    pub pods: i64,
}

impl Resources {
    fn add(&mut self, o: &Resources) {
        self.cpu += o.cpu;
        self.memory += o.memory;
        self.storage += o.storage;
        self.pods += o.pods;
    }

    fn sub(&mut self, o: &Resources) {
        self.cpu -= o.cpu;
        self.memory -= o.memory;
        self.storage -= o.storage;
        self.pods -= o.pods;
    }

    /// From a resource list (`{"cpu": "500m", "memory": "1Gi", ...}`).
    pub fn from_list(list: Option<&Value>) -> Resources {
        let get = |k: &str, milli: bool| -> i64 {
            list.and_then(|l| l.get(k))
                .and_then(Value::as_str)
                .and_then(|s| {
                    if milli {
                        quantity::parse_milli(s)
                    } else {
                        quantity::parse_units(s)
                    }
                })
                .map(|v| v.clamp(0, i64::MAX as i128) as i64)
                .unwrap_or(0)
        };
        Resources {
            cpu: get("cpu", true),
            memory: get("memory", false),
            storage: get("ephemeral-storage", false),
            pods: get("pods", false),
        }
    }
}

/// A taint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// A toleration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    key: String,
    exists: bool,
    value: String,
    effect: String,
}

impl Toleration {
    /// True if this toleration tolerates `t`.
    pub fn tolerates(&self, t: &Taint) -> bool {
        (self.effect.is_empty() || self.effect == t.effect)
            && (self.key.is_empty() && self.exists || self.key == t.key)
            && (self.exists || self.value == t.value)
    }

    /// From a pod's `tolerations`.
    pub fn list(v: Option<&Value>) -> Vec<Toleration> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|t| {
                        let s =
                            |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                        Toleration {
                            key: s("key"),
                            exists: s("operator") == "Exists",
                            value: s("value"),
                            effect: s("effect"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Cordoned.
    pub unschedulable: bool,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// Allocatable resources.
    pub allocatable: Resources,
    /// Requested by the pods bound to it.
    pub requested: Resources,
    /// Host ports in use: (protocol, port).
    pub host_ports: HashSet<(String, i64)>,
    /// Pods bound per owner uid.
    pub owners: HashMap<String, i64>,
    /// Labels of the pods bound to it (for pod anti-affinity).
    pub pod_labels: Vec<BTreeMap<String, String>>,
}

/// What the scheduler needs of one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodInfo {
    /// Requests (containers summed, init containers' max, plus one pod).
    pub requests: Resources,
    /// `nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity terms (any may match; each a list of requirements).
    pub required_terms: Vec<Vec<Requirement>>,
    /// Preferred node affinity: (weight, requirements).
    pub preferred: Vec<(i64, Vec<Requirement>)>,
    /// Tolerations.
    pub tolerations: Vec<Toleration>,
    /// Host ports wanted.
    pub host_ports: Vec<(String, i64)>,
    /// The controlling owner's uid.
    pub owner: Option<String>,
    /// Required pod anti-affinity: (label selector as requirements, topology key).
    pub anti_affinity: Vec<(Vec<Requirement>, String)>,
    /// Required pod affinity: (label selector as requirements, topology key).
    pub affinity: Vec<(Vec<Requirement>, String)>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl PodInfo {
    /// True if `other` fits exactly where this pod fits, now and after any placements are
    /// assumed: the same requests, node constraints, tolerations, host ports and
    /// anti-affinity, and no required pod affinity in either (a placement can satisfy an
    /// affinity term, while it can only take room or add a clash for everything else). So
    /// once this pod fits nowhere in a round, neither does `other`: the round need not look
    /// at every node again for it (kube-scheduler once kept an equivalence cache for this).
    pub fn same_feasibility(&self, other: &PodInfo) -> bool {
        self.affinity.is_empty()
            && other.affinity.is_empty()
            && self.requests == other.requests
            && self.node_selector == other.node_selector
            && self.required_terms == other.required_terms
            && self.tolerations == other.tolerations
            && self.host_ports == other.host_ports
            && self.anti_affinity == other.anti_affinity
    }
}

/// A node selector requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt`, `Lt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    op: String,
    values: Vec<String>,
    /// A `matchFields` requirement on `metadata.name` (how DaemonSet pods name their node).
    field: bool,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        self.matches_value(v)
    }

    /// Matches a node: its labels, or its name for a `matchFields` requirement.
    fn matches_node(&self, node: &NodeInfo) -> bool {
        if self.field {
            self.key == "metadata.name" && self.matches_value(Some(&node.name))
        } else {
            self.matches(&node.labels)
        }
    }

    fn matches_value(&self, v: Option<&String>) -> bool {
        match self.op.as_str() {
            "In" => v.is_some_and(|v| self.values.contains(v)),
            "NotIn" => v.is_none_or(|v| !self.values.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            "Gt" | "Lt" => {
                let (Some(v), Some(bound)) = (
                    v.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|b| b.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.op == "Gt" {
                    v > bound
                } else {
                    v < bound
                }
            }
            _ => false,
        }
    }

    /// From a list of `{key, operator, values}` (also `matchLabels`-style maps for pod
    /// label selectors).
    pub fn list(exprs: Option<&Value>, match_labels: Option<&Value>) -> Vec<Requirement> {
        let mut out: Vec<Requirement> = exprs
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|e| Requirement {
                        key: e
                            .get("key")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        op: e
                            .get("operator")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        values: e
                            .get("values")
                            .and_then(Value::as_array)
                            .map(|v| {
                                v.iter()
                                    .filter_map(|x| x.as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        field: false,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(m) = match_labels.and_then(Value::as_object) {
            for (k, v) in m {
                out.push(Requirement {
                    key: k.clone(),
                    op: "In".into(),
                    values: vec![v.as_str().unwrap_or("").to_string()],
                    field: false,
                });
            }
        }
        out
    }
}

/// Why a node was filtered out (the reasons kube-scheduler reports).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not Ready.
    NotReady,
    /// Cordoned.
    Unschedulable,
    /// Not enough of a resource.
    Insufficient(&'static str),
    /// Too many pods.
    TooManyPods,
    /// Node selector or required affinity.
    Affinity,
    /// An untolerated taint.
    Taint(String),
    /// A host port in use.
    Ports,
    /// Pod anti-affinity.
    AntiAffinity,
    /// Pod affinity.
    PodAffinity,
}

impl Reason {
    fn text(&self) -> String {
        match self {
            Reason::NotReady => "node(s) were not ready".into(),
            Reason::Unschedulable => "node(s) were unschedulable".into(),
            Reason::Insufficient(r) => format!("Insufficient {r}"),
            Reason::TooManyPods => "Too many pods".into(),
            Reason::Affinity => "node(s) didn't match Pod's node affinity/selector".into(),
            Reason::Taint(t) => format!("node(s) had untolerated taint {{{t}}}"),
            Reason::Ports => "node(s) didn't have free ports for the requested pod ports".into(),
            Reason::AntiAffinity => "node(s) didn't match pod anti-affinity rules".into(),
            Reason::PodAffinity => "node(s) didn't match pod affinity rules".into(),
        }
    }
}

/// The outcome for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Bind to this node (an index into the snapshot).
    Bind(usize),
    /// No node fits; the message says why, as kube-scheduler words it.
    Unschedulable(String),
}

/// Whether `pod` may run on `node` at all, resources aside: every NoSchedule and NoExecute
/// taint tolerated, `nodeSelector` and required node affinity met (what the DaemonSet
/// controller asks of a node).
pub fn should_run(node: &NodeInfo, pod: &PodInfo) -> bool {
    node.taints.iter().all(|t| {
        !(t.effect == "NoSchedule" || t.effect == "NoExecute")
            || pod.tolerations.iter().any(|x| x.tolerates(t))
    }) && pod
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
        && (pod.required_terms.is_empty()
            || pod
                .required_terms
                .iter()
                .any(|term| term.iter().all(|r| r.matches_node(node))))
}

fn filter(node: &NodeInfo, pod: &PodInfo, all: &[NodeInfo]) -> Result<(), Reason> {
    if !node.ready {
        return Err(Reason::NotReady);
    }
    if node.unschedulable {
        let unschedulable_taint = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            value: String::new(),
            effect: "NoSchedule".into(),
        };
        if !pod
            .tolerations
            .iter()
            .any(|t| t.tolerates(&unschedulable_taint))
        {
            return Err(Reason::Unschedulable);
        }
    }
    for t in &node.taints {
        if (t.effect == "NoSchedule" || t.effect == "NoExecute")
            && !pod.tolerations.iter().any(|x| x.tolerates(t))
        {
            return Err(Reason::Taint(format!("{}: {}", t.key, t.value)));
        }
    }
    if pod
        .node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Err(Reason::Affinity);
    }
    if !pod.required_terms.is_empty()
        && !pod
            .required_terms
            .iter()
            .any(|term| term.iter().all(|r| r.matches_node(node)))
    {
        return Err(Reason::Affinity);
    }
    let free = |alloc: i64, used: i64| alloc - used;
    if node.allocatable.pods > 0
        && free(node.allocatable.pods, node.requested.pods) < pod.requests.pods
    {
        return Err(Reason::TooManyPods);
    }
    if pod.requests.cpu > 0 && free(node.allocatable.cpu, node.requested.cpu) < pod.requests.cpu {
        return Err(Reason::Insufficient("cpu"));
    }
    if pod.requests.memory > 0
        && free(node.allocatable.memory, node.requested.memory) < pod.requests.memory
    {
        return Err(Reason::Insufficient("memory"));
    }
    if pod.requests.storage > 0
        && free(node.allocatable.storage, node.requested.storage) < pod.requests.storage
    {
        return Err(Reason::Insufficient("ephemeral-storage"));
    }
    if pod.host_ports.iter().any(|p| node.host_ports.contains(p)) {
        return Err(Reason::Ports);
    }
    for (selector, topology) in &pod.anti_affinity {
        let Some(domain) = node.labels.get(topology) else {
            continue;
        };
        let clash = all.iter().any(|n| {
            n.labels.get(topology) == Some(domain)
                && n.pod_labels
                    .iter()
                    .any(|l| !selector.is_empty() && selector.iter().all(|r| r.matches(l)))
        });
        if clash {
            return Err(Reason::AntiAffinity);
        }
    }
    // Required pod affinity: a pod matching the selector runs in this node's topology
    // domain. As in Kubernetes, the first pod of a group that matches its own selector may
    // go anywhere when no such pod runs yet.
    for (selector, topology) in &pod.affinity {
        let matches = |l: &BTreeMap<String, String>| selector.iter().all(|r| r.matches(l));
        let Some(domain) = node.labels.get(topology) else {
            return Err(Reason::PodAffinity);
        };
        let near = all
            .iter()
            .any(|n| n.labels.get(topology) == Some(domain) && n.pod_labels.iter().any(&matches));
        if !near {
            let anywhere = all.iter().any(|n| n.pod_labels.iter().any(&matches));
            if anywhere || !matches(&pod.labels) {
                return Err(Reason::PodAffinity);
            }
        }
    }
    Ok(())
}

fn score(node: &NodeInfo, pod: &PodInfo) -> i64 {
    let frac = |used: i64, alloc: i64| -> f64 {
        if alloc <= 0 {
            0.0
        } else {
            (used as f64 / alloc as f64).min(1.0)
        }
    };
    let cpu = frac(node.requested.cpu + pod.requests.cpu, node.allocatable.cpu);
    let mem = frac(
        node.requested.memory + pod.requests.memory,
        node.allocatable.memory,
    );
    let least_allocated = ((1.0 - cpu) + (1.0 - mem)) / 2.0 * 100.0;
    let balanced = (1.0 - (cpu - mem).abs()) * 100.0;
    let same_owner = pod
        .owner
        .as_ref()
        .and_then(|o| node.owners.get(o))
        .copied()
        .unwrap_or(0);
    let spread = 100.0 / (1.0 + same_owner as f64) * 2.0;
    let preferred: i64 = pod
        .preferred
        .iter()
        .filter(|(_, reqs)| reqs.iter().all(|r| r.matches(&node.labels)))
        .map(|(w, _)| *w)
        .sum();
    (least_allocated + balanced + spread) as i64 + preferred
}

/// How many feasible nodes to find before choosing among them (kube-scheduler's
/// adaptive `percentageOfNodesToScore`): every node below 100, then 50% less 1% per 125
/// nodes, at least 5% and at least 100 nodes.
pub fn feasible_to_find(n: usize) -> usize {
    if n < 100 {
        return n;
    }
    let percent = (50 - (n / 125) as i64).max(5) as usize;
    (n * percent / 100).max(100)
}

/// Chooses a node for `pod`, or says why none fits (every node scored).
pub fn schedule(nodes: &[NodeInfo], pod: &PodInfo) -> Decision {
    schedule_from(nodes, pod, 0, nodes.len()).0
}

/// Chooses a node for `pod` among the first `want` feasible nodes found, looking from
/// node `start` round the list; returns the decision and where the next search starts (so
/// successive pods look at different nodes, as kube-scheduler does). A pod that fits
/// nowhere has looked at every node, so its message counts them all.
pub fn schedule_from(
    nodes: &[NodeInfo],
    pod: &PodInfo,
    start: usize,
    want: usize,
) -> (Decision, usize) {
    let mut best: Option<(i64, i64, &str, usize)> = None;
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let n = nodes.len();
    let mut found = 0;
    let mut examined = 0;
    for k in 0..n {
        if found >= want.max(1) {
            break;
        }
        let i = (start + k) % n;
        let node = &nodes[i];
        examined += 1;
        match filter(node, pod, nodes) {
            Ok(()) => {
                found += 1;
                let s = score(node, pod);
                let key = (s, -node.requested.pods, node.name.as_str(), i);
                let better = match &best {
                    None => true,
                    Some(b) => {
                        (key.0, key.1) > (b.0, b.1) || ((key.0, key.1) == (b.0, b.1) && key.2 < b.2)
                    }
                };
                if better {
                    best = Some(key);
                }
            }
            Err(r) => *reasons.entry(r).or_default() += 1,
        }
    }
    let next = if n == 0 { 0 } else { (start + examined) % n };
    let decision = match best {
        Some((_, _, _, i)) => Decision::Bind(i),
        None => {
            // Sorted as text, as kube-scheduler's FitError does.
            let mut parts: Vec<String> = reasons
                .iter()
                .map(|(r, n)| format!("{n} {}", r.text()))
                .collect();
            parts.sort();
            Decision::Unschedulable(format!(
                "0/{} nodes are available: {}.",
                nodes.len(),
                if parts.is_empty() {
                    "no nodes registered".to_string()
                } else {
                    parts.join(", ")
                }
            ))
        }
    };
    (decision, next)
}

/// Records `pod` as bound to `node` in the snapshot (so later decisions in a batch see it).
pub fn assume(node: &mut NodeInfo, pod: &PodInfo) {
    node.requested.add(&pod.requests);
    for p in &pod.host_ports {
        node.host_ports.insert(p.clone());
    }
    if let Some(o) = &pod.owner {
        *node.owners.entry(o.clone()).or_default() += 1;
    }
    node.pod_labels.push(pod.labels.clone());
}

/// Undoes [`assume`] (the bind failed).
pub fn forget(node: &mut NodeInfo, pod: &PodInfo) {
    node.requested.sub(&pod.requests);
    for p in &pod.host_ports {
        node.host_ports.remove(p);
    }
    if let Some(o) = &pod.owner {
        if let Some(c) = node.owners.get_mut(o) {
            *c -= 1;
            if *c <= 0 {
                node.owners.remove(o);
            }
        }
    }
    if let Some(i) = node.pod_labels.iter().position(|l| *l == pod.labels) {
        node.pod_labels.swap_remove(i);
    }
}

/// What a pod asks of a node, from its JSON.
pub fn pod_info(pod: &Value) -> PodInfo {
    let spec = pod.get("spec");
    let containers = |k: &str| -> Vec<&Value> {
        spec.and_then(|s| s.get(k))
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    };
    let mut requests = Resources::default();
    for c in containers("containers") {
        requests.add(&Resources::from_list(c.ptr("/resources/requests")));
    }
    for c in containers("initContainers") {
        let r = Resources::from_list(c.ptr("/resources/requests"));
        requests.cpu = requests.cpu.max(r.cpu);
        requests.memory = requests.memory.max(r.memory);
        requests.storage = requests.storage.max(r.storage);
    }
    requests.pods = 1;
    let mut host_ports = Vec::new();
    for c in containers("containers") {
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(hp) = p.get("hostPort").and_then(Value::as_i64).filter(|p| *p > 0) {
                let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                host_ports.push((proto.to_string(), hp));
            }
        }
    }
    let str_map = |v: Option<&Value>| -> BTreeMap<String, String> {
        v.and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let na = spec.and_then(|s| s.ptr("/affinity/nodeAffinity"));
    let required_terms = na
        .and_then(|a| a.ptr("/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms"))
        .and_then(Value::as_array)
        .map(|terms| {
            terms
                .iter()
                .map(|t| {
                    let mut reqs = Requirement::list(t.get("matchExpressions"), None);
                    reqs.extend(
                        Requirement::list(t.get("matchFields"), None)
                            .into_iter()
                            .map(|mut r| {
                                r.field = true;
                                r
                            }),
                    );
                    reqs
                })
                .collect()
        })
        .unwrap_or_default();
    let preferred = na
        .and_then(|a| a.get("preferredDuringSchedulingIgnoredDuringExecution"))
        .and_then(Value::as_array)
        .map(|terms| {
            terms
                .iter()
                .map(|t| {
                    (
                        t.get("weight").and_then(Value::as_i64).unwrap_or(1),
                        Requirement::list(t.ptr("/preference/matchExpressions"), None),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let pod_terms = |path: &str| -> Vec<(Vec<Requirement>, String)> {
        spec.and_then(|s| s.ptr(path))
            .and_then(Value::as_array)
            .map(|terms| {
                terms
                    .iter()
                    .map(|t| {
                        (
                            Requirement::list(
                                t.ptr("/labelSelector/matchExpressions"),
                                t.ptr("/labelSelector/matchLabels"),
                            ),
                            t.get("topologyKey")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let anti_affinity =
        pod_terms("/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution");
    let affinity =
        pod_terms("/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution");
    PodInfo {
        requests,
        node_selector: str_map(spec.and_then(|s| s.get("nodeSelector"))),
        required_terms,
        preferred,
        tolerations: Toleration::list(spec.and_then(|s| s.get("tolerations"))),
        host_ports,
        owner: crate::controllers::owner::controller_uid(pod).map(str::to_string),
        anti_affinity,
        affinity,
        labels: str_map(pod.ptr("/metadata/labels")),
    }
}

/// A node's scheduling view from its JSON (without the pods bound to it).
pub fn node_info(node: &Value) -> NodeInfo {
    let labels = node
        .ptr("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let taints = node
        .ptr("/spec/taints")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| {
                    let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    Taint {
                        key: s("key"),
                        value: s("value"),
                        effect: s("effect"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let ready = node
        .ptr("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        });
    let alloc = node
        .ptr("/status/allocatable")
        .or_else(|| node.ptr("/status/capacity"));
    NodeInfo {
        name: crate::controllers::owner::name(node).to_string(),
        labels,
        taints,
        unschedulable: node.ptr("/spec/unschedulable").and_then(Value::as_bool) == Some(true),
        ready,
        allocatable: Resources::from_list(alloc),
        ..NodeInfo::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, cpu: &str, mem: &str) -> NodeInfo {
        node_info(&json!({
            "metadata": {"name": name, "labels": {"zone": if name == "a" {"z1"} else {"z2"}, "kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
    }

    fn pod(cpu: &str, extra: Value) -> PodInfo {
        let mut p = json!({"metadata": {"labels": {"app": "web"}, "ownerReferences": [{"uid": "rs1", "controller": true}]},
                           "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": "100Mi"}}}]}});
        if let (Some(s), Some(e)) = (p["spec"].as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        pod_info(&p)
    }

    #[test]
    fn pods_of_one_shape_fit_the_same_nodes_whatever_their_names_owners_and_labels() {
        let a = pod("500m", json!({}));
        let mut b = pod("500m", json!({}));
        b.owner = Some("another".into());
        b.labels.insert("x".into(), "y".into());
        assert!(a.same_feasibility(&b));
        assert!(!a.same_feasibility(&pod("600m", json!({}))));
        assert!(!a.same_feasibility(&pod("500m", json!({"nodeSelector": {"zone": "a"}}))));
        assert!(!a.same_feasibility(&pod(
            "500m",
            json!({"tolerations": [{"key": "k", "operator": "Exists"}]})
        )));
        // A required pod affinity can be met by a placement: never equivalent, not even to
        // itself.
        let affine = pod(
            "500m",
            json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "zone"}]}}}),
        );
        assert!(!affine.affinity.is_empty());
        assert!(!affine.same_feasibility(&affine.clone()));
        // Once a shape fits nowhere, placing pods keeps it so: the second of two pods that
        // each need the whole node's room fails on the node the first took.
        let nodes = vec![node_info(&json!({"metadata": {"name": "n1"},
            "status": {"allocatable": {"cpu": "1", "memory": "1Gi", "pods": "10"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}))];
        let big = pod("1", json!({}));
        let mut nodes = nodes;
        assert!(matches!(
            schedule_from(&nodes, &big, 0, 1).0,
            Decision::Bind(0)
        ));
        assume(&mut nodes[0], &big);
        assert!(matches!(
            schedule_from(&nodes, &big, 0, 1).0,
            Decision::Unschedulable(_)
        ));
        assert!(big.same_feasibility(&pod("1", json!({}))));
    }

    #[test]
    fn requests_must_fit_what_is_left() {
        let mut nodes = vec![node("a", "1", "1Gi")];
        let p = pod("600m", json!({}));
        assert_eq!(schedule(&nodes, &p), Decision::Bind(0));
        assume(&mut nodes[0], &p);
        assert_eq!(
            schedule(&nodes, &p),
            Decision::Unschedulable("0/1 nodes are available: 1 Insufficient cpu.".into())
        );
        forget(&mut nodes[0], &p);
        assert_eq!(schedule(&nodes, &p), Decision::Bind(0));
    }

    #[test]
    fn replicas_of_one_owner_spread_over_nodes() {
        let mut nodes = vec![
            node("a", "4", "8Gi"),
            node("b", "4", "8Gi"),
            node("c", "4", "8Gi"),
        ];
        let mut counts = [0; 3];
        for _ in 0..9 {
            let p = pod("100m", json!({}));
            let Decision::Bind(i) = schedule(&nodes, &p) else {
                panic!()
            };
            assume(&mut nodes[i], &p);
            counts[i] += 1;
        }
        assert_eq!(counts, [3, 3, 3]);
    }

    #[test]
    fn selectors_taints_cordons_and_readiness_filter_nodes_with_reasons() {
        let mut nodes = vec![
            node("a", "4", "8Gi"),
            node("b", "4", "8Gi"),
            node("c", "4", "8Gi"),
        ];
        nodes[0].unschedulable = true;
        nodes[1].taints.push(Taint {
            key: "dedicated".into(),
            value: "gpu".into(),
            effect: "NoSchedule".into(),
        });
        nodes[2].ready = false;
        let p = pod("100m", json!({}));
        assert_eq!(
            schedule(&nodes, &p),
            Decision::Unschedulable("0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 1 node(s) were not ready, 1 node(s) were unschedulable.".into())
        );
        let tolerant = pod(
            "100m",
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}),
        );
        assert_eq!(schedule(&nodes, &tolerant), Decision::Bind(1));
        nodes[0].unschedulable = false;
        let picky = pod("100m", json!({"nodeSelector": {"zone": "z2"}}));
        assert_eq!(
            schedule(&nodes, &picky),
            Decision::Unschedulable("0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint {dedicated: gpu}, 1 node(s) were not ready.".into())
        );
    }

    #[test]
    fn required_affinity_host_ports_and_anti_affinity() {
        let mut nodes = vec![node("a", "4", "8Gi"), node("b", "4", "8Gi")];
        let affine = pod(
            "100m",
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}]}]}}}}),
        );
        assert_eq!(schedule(&nodes, &affine), Decision::Bind(1));
        // A DaemonSet pod names its node with matchFields.
        for name in ["a", "b"] {
            let pinned = pod(
                "100m",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [name]}]}]}}}}),
            );
            let want = if name == "a" { 0 } else { 1 };
            assert_eq!(schedule(&nodes, &pinned), Decision::Bind(want));
        }
        let ported = pod(
            "100m",
            json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
        );
        assume(&mut nodes[0], &ported);
        assume(&mut nodes[1], &ported);
        assert!(
            matches!(schedule(&nodes, &ported), Decision::Unschedulable(m) if m.contains("free ports"))
        );
        let lonely = pod(
            "100m",
            json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}}),
        );
        assert!(
            matches!(schedule(&nodes, &lonely), Decision::Unschedulable(m) if m.contains("anti-affinity"))
        );
        // Pod affinity: near a pod with app=web (on node b only), or anywhere for the first
        // of a group that selects itself.
        let mut nodes = vec![node("a", "4", "8Gi"), node("b", "4", "8Gi")];
        let near_web = json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
        let mut follower = pod("100m", near_web.clone());
        follower.labels = BTreeMap::from([("app".to_string(), "cache".to_string())]);
        assert!(
            matches!(schedule(&nodes, &follower), Decision::Unschedulable(m) if m.contains("2 node(s) didn't match pod affinity rules"))
        );
        let first = pod("100m", near_web);
        assert!(matches!(schedule(&nodes, &first), Decision::Bind(_)));
        assume(&mut nodes[1], &first);
        assert_eq!(schedule(&nodes, &follower), Decision::Bind(1));
    }

    #[test]
    fn large_clusters_score_a_rotating_sample_of_feasible_nodes() {
        assert_eq!(feasible_to_find(50), 50);
        assert_eq!(feasible_to_find(1000), 420);
        assert_eq!(feasible_to_find(5000), 500);
        assert_eq!(feasible_to_find(100_000), 5000);
        let nodes: Vec<NodeInfo> = (0..1000)
            .map(|i| node(&format!("n{i:04}"), "4", "8Gi"))
            .collect();
        let p = pod("100m", json!({}));
        let want = feasible_to_find(nodes.len());
        let (d, next) = schedule_from(&nodes, &p, 900, want);
        assert_eq!(next, (900 + 420) % 1000);
        let Decision::Bind(i) = d else {
            panic!("{d:?}")
        };
        assert!(!(320..900).contains(&i), "chosen from the sample: {i}");
        // A pod that fits nowhere looks at every node.
        let huge = pod("64", json!({}));
        let (d, _) = schedule_from(&nodes, &huge, 10, want);
        assert!(
            matches!(&d, Decision::Unschedulable(m) if m.starts_with("0/1000 nodes are available: 1000 Insufficient cpu")),
            "{d:?}"
        );
    }
}
