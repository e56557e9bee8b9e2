//! The scheduler's cache: every node as the scheduler sees it, with what the pods bound (or
//! assumed bound) to it ask for, kept current change by change.
//!
//! Owns the node list and, per pod that counts against a node, the node and what it asks.
//! Invariants:
//! - a node's aggregates (`requested`, host ports, owners, pod labels) are exactly the sum of
//!   the entries in `pods` that name it, whatever order node and pod changes arrive in (a
//!   pod whose node is not known yet is counted when the node appears);
//! - a pod counts while it is bound and active, or while the scheduler has assumed it bound
//!   and not yet seen the outcome; it counts once;
//! - nothing is recomputed from scratch per decision: a node's JSON is parsed when it
//!   changes, a pod's when it lands on a node.
//!
//! Held behind a `std::sync::Mutex` by the scheduler; never across an `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::decide::{self, NodeInfo, PodInfo};
use crate::controllers::pod;

/// Nodes and the pods that count against them.
#[derive(Default)]
pub struct Cache {
    nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    /// Pod key → (node, what it asks).
    pods: HashMap<String, (String, Arc<PodInfo>)>,
    /// Node name → keys of the pods in `pods` that name it.
    on_node: HashMap<String, HashSet<String>>,
}

impl Cache {
    /// The nodes, for decisions (indexes are stable until the next node change).
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True without nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A node was added, changed or deleted.
    pub fn node_changed(&mut self, name: &str, new: Option<&Value>) {
        match (new, self.index.get(name).copied()) {
            (Some(n), Some(i)) => {
                let mut info = decide::node_info(n);
                let old = &mut self.nodes[i];
                info.requested = old.requested;
                info.host_ports = std::mem::take(&mut old.host_ports);
                info.owners = std::mem::take(&mut old.owners);
                info.pod_labels = std::mem::take(&mut old.pod_labels);
                *old = info;
            }
            (Some(n), None) => {
                let mut info = decide::node_info(n);
                for k in self.on_node.get(name).into_iter().flatten() {
                    if let Some((_, p)) = self.pods.get(k) {
                        decide::assume(&mut info, p);
                    }
                }
                self.index.insert(name.to_string(), self.nodes.len());
                self.nodes.push(info);
            }
            (None, Some(i)) => {
                self.nodes.swap_remove(i);
                self.index.remove(name);
                if let Some(moved) = self.nodes.get(i) {
                    self.index.insert(moved.name.clone(), i);
                }
            }
            (None, None) => {}
        }
    }

    /// A pod changed (`None`: deleted): it counts against its node while bound and active.
    pub fn pod_changed(&mut self, key: &str, new: Option<&Value>) {
        let node = new.filter(|p| pod::is_active(p)).and_then(|p| pod::node(p));
        let current = self.pods.get(key).map(|(n, _)| n.as_str());
        if current == node {
            return;
        }
        self.remove(key);
        if let (Some(node), Some(p)) = (node, new) {
            self.add(key, node, Arc::new(decide::pod_info(p)));
        }
    }

    /// Counts `pod` against node `i` (the scheduler decided so; not yet bound).
    pub fn assume(&mut self, key: &str, i: usize, info: Arc<PodInfo>) {
        let node = self.nodes[i].name.clone();
        self.remove(key);
        self.add(key, &node, info);
    }

    /// The pod's entry, if it counts against a node.
    pub fn node_of(&self, key: &str) -> Option<&str> {
        self.pods.get(key).map(|(n, _)| n.as_str())
    }

    fn add(&mut self, key: &str, node: &str, info: Arc<PodInfo>) {
        if let Some(&i) = self.index.get(node) {
            decide::assume(&mut self.nodes[i], &info);
        }
        self.on_node
            .entry(node.to_string())
            .or_default()
            .insert(key.to_string());
        self.pods.insert(key.to_string(), (node.to_string(), info));
    }

    /// Stops counting the pod.
    pub fn remove(&mut self, key: &str) {
        let Some((node, info)) = self.pods.remove(key) else {
            return;
        };
        if let Some(&i) = self.index.get(&node) {
            decide::forget(&mut self.nodes[i], &info);
        }
        if let Some(set) = self.on_node.get_mut(&node) {
            set.remove(key);
            if set.is_empty() {
                self.on_node.remove(&node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str) -> Value {
        json!({"metadata": {"name": name}, "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "10"},
               "conditions": [{"type": "Ready", "status": "True"}]}})
    }

    fn bound(name: &str, node: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "a"}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]},
               "status": {"phase": "Running"}})
    }

    #[test]
    fn aggregates_follow_pods_and_nodes_in_any_order() {
        let mut c = Cache::default();
        // A pod seen before its node counts once the node appears.
        c.pod_changed("p1", Some(&bound("p1", "a")));
        c.node_changed("a", Some(&node("a")));
        c.node_changed("b", Some(&node("b")));
        let cpu = |c: &Cache, n: &str| {
            c.nodes()
                .iter()
                .find(|x| x.name == n)
                .map(|x| x.requested)
                .unwrap()
        };
        assert_eq!(cpu(&c, "a"), {
            let mut n = NodeInfo::default();
            decide::assume(&mut n, &decide::pod_info(&bound("p1", "a")));
            n.requested
        });
        // Assumed on b, then seen bound on b: counted once.
        let b = c.nodes().iter().position(|x| x.name == "b").unwrap();
        c.assume("p2", b, Arc::new(decide::pod_info(&bound("p2", "b"))));
        c.pod_changed("p2", Some(&bound("p2", "b")));
        assert_eq!(cpu(&c, "b"), cpu(&c, "a"));
        assert_eq!(c.nodes()[b].pod_labels.len(), 1);
        // A node update keeps its pods; a finished pod stops counting.
        c.node_changed("a", Some(&node("a")));
        assert_eq!(cpu(&c, "a"), cpu(&c, "b"));
        let mut done = bound("p1", "a");
        done["status"]["phase"] = json!("Succeeded");
        c.pod_changed("p1", Some(&done));
        assert_eq!(cpu(&c, "a"), NodeInfo::default().requested);
        // Deleting a node and adding it back recounts its pods.
        c.node_changed("b", None);
        assert_eq!(c.len(), 1);
        c.node_changed("b", Some(&node("b")));
        assert_eq!(cpu(&c, "b").cpu, 1000);
        c.pod_changed("p2", None);
        assert_eq!(cpu(&c, "b").cpu, 0);
        assert!(c.nodes().iter().all(|n| n.pod_labels.is_empty()));
    }
}
