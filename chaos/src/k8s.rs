//! The Kubernetes workload (`--workload k8s`) and its checks: Deployments scaled up and down
//! through random replicas onto simulated nodes, while the control loops run on whichever
//! replica leads.
//!
//! Setup registers [`NODES`] Ready nodes of [`PODS_PER_NODE`] pods each (simulated: no
//! agent, so the cluster runs with a node grace period longer than the run) and
//! [`DEPLOYMENTS`] Deployments. During the run a client scales a random Deployment to a
//! random size every few hundred milliseconds; an observer lists the pods and scrapes every
//! replica's metrics. Checks:
//! - **no pod bound twice**: a pod (by uid) never shows two different nodes;
//! - **no node over capacity**: no list shows more live pods on a node than it allows;
//! - **one controller leader per term**: no two replicas report running the control loops
//!   (`flotilla_controllers_leading`) in the same Raft term;
//! - **convergence**: after the faults heal, every Deployment has exactly its wanted number
//!   of live pods, all bound, within [`CONVERGE`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use flotilla::client::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

/// Simulated nodes.
pub const NODES: usize = 4;
/// Pods each node allows.
pub const PODS_PER_NODE: usize = 8;
/// Deployments scaled.
pub const DEPLOYMENTS: usize = 3;
/// Most replicas a Deployment is scaled to (all fit: 3 × 8 ≤ 4 × 8).
pub const MAX_REPLICAS: u64 = 8;
/// How long Deployments get to converge after recovery.
pub const CONVERGE: Duration = Duration::from_secs(60);
const NS: &str = "chaos";

/// What the Kubernetes workload saw.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    /// Scale requests answered 200.
    pub scales: u64,
    /// Pod lists taken.
    pub lists: u64,
    /// Distinct pods seen.
    pub pods_seen: usize,
    /// The most live pods seen on one node.
    pub max_pods_on_a_node: usize,
    /// Raft terms in which some replica reported running the control loops.
    pub terms_with_a_controller_leader: usize,
}

async fn send(
    client: &Client,
    server: &str,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: &Value,
) -> Option<(u16, Value)> {
    let resp = client
        .send_raw(
            method,
            server,
            path,
            content_type,
            serde_json::to_vec(body).ok()?,
            None,
        )
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let bytes = flotilla::client::read_all(server, resp.into_body(), Duration::from_secs(5))
        .await
        .ok()?;
    Some((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Sends a request (through the servers in turn) until it is answered with one of `ok`,
/// within 30 s.
#[allow(clippy::too_many_arguments)]
async fn must(
    client: &Client,
    servers: &[String],
    what: &str,
    ok: &[u16],
    method: http::Method,
    path: &str,
    content_type: &str,
    body: Value,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        let server = &servers[i % servers.len()];
        if let Some((status, _)) =
            send(client, server, method.clone(), path, content_type, &body).await
        {
            if ok.contains(&status) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what}: no success within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!()
}

/// Registers the namespace, the nodes and the Deployments.
pub async fn setup(servers: &[String]) -> anyhow::Result<()> {
    let client = Client::new(servers.to_vec(), Duration::from_secs(5));
    let post = http::Method::POST;
    let json_type = "application/json";
    must(
        &client,
        servers,
        "create the namespace",
        &[201, 409],
        post.clone(),
        "/api/v1/namespaces",
        json_type,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await?;
    for i in 0..NODES {
        let name = format!("sim-{i}");
        must(
            &client,
            servers,
            "register a node",
            &[201, 409],
            post.clone(),
            "/api/v1/nodes",
            json_type,
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}),
        )
        .await?;
        let pods = PODS_PER_NODE.to_string();
        must(
            &client,
            servers,
            "make a node Ready",
            &[200],
            http::Method::PATCH,
            &format!("/api/v1/nodes/{name}/status"),
            "application/merge-patch+json",
            json!({"status": {
                "capacity": {"cpu": "8", "memory": "16Gi", "pods": pods},
                "allocatable": {"cpu": "8", "memory": "16Gi", "pods": pods},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}),
        )
        .await?;
    }
    for d in 0..DEPLOYMENTS {
        let name = format!("web-{d}");
        must(
            &client,
            servers,
            "create a Deployment",
            &[201, 409],
            post.clone(),
            &format!("/apis/apps/v1/namespaces/{NS}/deployments"),
            json_type,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": name},
                   "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                            "template": {"metadata": {"labels": {"app": name}},
                                         "spec": {"terminationGracePeriodSeconds": 0,
                                                  "containers": [{"name": "c", "image": "pause"}]}}}}),
        )
        .await?;
    }
    Ok(())
}

/// Scales random Deployments through random replicas until `until`; returns the scales
/// that were answered 200.
pub async fn run_scaler(seed: u64, servers: Vec<String>, until: Instant) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x006b_3873);
    let client = Client::new(servers.clone(), Duration::from_secs(2));
    let mut scales = 0;
    while Instant::now() < until {
        let d = rng.gen_range(0..DEPLOYMENTS);
        let n = rng.gen_range(0..=MAX_REPLICAS);
        let server = &servers[rng.gen_range(0..servers.len())];
        let patch = json!({"spec": {"replicas": n}});
        let path = format!("/apis/apps/v1/namespaces/{NS}/deployments/web-{d}");
        if let Some((200, _)) = send(
            &client,
            server,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            &patch,
        )
        .await
        {
            scales += 1;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..500))).await;
    }
    scales
}

/// What the observer keeps between samples.
#[derive(Default)]
pub struct Observer {
    /// Pod uid → the node it was first seen bound to.
    bound: HashMap<String, String>,
    /// Raft term → replicas that reported running the control loops in it.
    leaders: BTreeMap<u64, BTreeSet<String>>,
    summary: Summary,
    /// Everything wrong, as found.
    pub violations: Vec<String>,
}

fn live(p: &Value) -> bool {
    p.pointer("/metadata/deletionTimestamp").is_none()
        && !matches!(
            p.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        )
}

impl Observer {
    /// Checks one pod list.
    pub fn pods(&mut self, list: &Value) {
        self.summary.lists += 1;
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for p in list["items"].as_array().into_iter().flatten() {
            let uid = p
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            let Some(node) = p
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            else {
                continue;
            };
            match self.bound.get(uid) {
                Some(before) if before != node => self.violations.push(format!(
                    "pod {} (uid {uid}) bound to {before}, later seen on {node}",
                    p.pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                )),
                Some(_) => {}
                None => {
                    self.bound.insert(uid.to_string(), node.to_string());
                }
            }
            if live(p) {
                *per_node.entry(node.to_string()).or_default() += 1;
            }
        }
        for (node, n) in per_node {
            self.summary.max_pods_on_a_node = self.summary.max_pods_on_a_node.max(n);
            if n > PODS_PER_NODE {
                self.violations.push(format!(
                    "node {node} ran {n} pods, over its {PODS_PER_NODE}"
                ));
            }
        }
        self.summary.pods_seen = self.bound.len();
    }

    /// Records one replica's metrics: the term and whether it runs the control loops.
    pub fn metrics(&mut self, replica: &str, text: &str) {
        let value = |name: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        };
        if let (Some(term), Some(leading)) = (
            value("flotilla_raft_term"),
            value("flotilla_controllers_leading"),
        ) {
            if leading >= 1.0 {
                let set = self.leaders.entry(term as u64).or_default();
                set.insert(replica.to_string());
                if set.len() > 1 {
                    self.violations.push(format!(
                        "term {term}: {set:?} all reported running the control loops"
                    ));
                }
            }
        }
    }

    /// The summary so far.
    pub fn summary(&self) -> Summary {
        Summary {
            terms_with_a_controller_leader: self.leaders.len(),
            ..self.summary.clone()
        }
    }
}

/// Samples pods and metrics every 300 ms until `until`.
pub async fn observe(servers: Vec<String>, until: Instant) -> Observer {
    let client = Client::new(servers.clone(), Duration::from_secs(2));
    let mut obs = Observer::default();
    let mut i = 0;
    while Instant::now() < until {
        let server = &servers[i % servers.len()];
        i += 1;
        if let Ok((200, body)) = client
            .get_text(server, &format!("/api/v1/namespaces/{NS}/pods"))
            .await
        {
            if let Ok(list) = serde_json::from_str::<Value>(&body) {
                obs.pods(&list);
            }
        }
        for s in &servers {
            if let Ok((200, text)) = client.get_text(s, "/metrics").await {
                obs.metrics(s, &text);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    obs
}

/// Waits until every Deployment has exactly its wanted number of live pods, all bound;
/// the last pod list goes through the observer's checks too.
pub async fn converge(servers: &[String], obs: &mut Observer) -> Result<(), String> {
    let client = Client::new(servers.to_vec(), Duration::from_secs(5));
    let deadline = Instant::now() + CONVERGE;
    let mut last = String::new();
    for i in 0.. {
        let server = &servers[i % servers.len()];
        let mut done = true;
        let mut state = Vec::new();
        if let Ok((200, body)) = client
            .get_text(server, &format!("/api/v1/namespaces/{NS}/pods"))
            .await
        {
            let list: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            obs.pods(&list);
            for d in 0..DEPLOYMENTS {
                let name = format!("web-{d}");
                let want = match client
                    .get_text(
                        server,
                        &format!("/apis/apps/v1/namespaces/{NS}/deployments/{name}"),
                    )
                    .await
                {
                    Ok((200, b)) => serde_json::from_str::<Value>(&b)
                        .ok()
                        .and_then(|v| v.pointer("/spec/replicas").and_then(Value::as_u64)),
                    _ => None,
                };
                let pods: Vec<&Value> = list["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| {
                        p.pointer("/metadata/labels/app").and_then(Value::as_str)
                            == Some(name.as_str())
                            && live(p)
                    })
                    .collect();
                let bound = pods
                    .iter()
                    .filter(|p| {
                        p.pointer("/spec/nodeName")
                            .and_then(Value::as_str)
                            .is_some()
                    })
                    .count();
                state.push(format!(
                    "{name}: want {want:?}, {} live, {bound} bound",
                    pods.len()
                ));
                if want != Some(pods.len() as u64) || bound != pods.len() {
                    done = false;
                }
            }
        } else {
            done = false;
        }
        if done {
            return Ok(());
        }
        last = state.join("; ");
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(format!(
        "the Deployments did not converge within {CONVERGE:?} after recovery: {last}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, node: &str) -> Value {
        json!({"metadata": {"uid": uid, "name": uid}, "spec": {"nodeName": node}})
    }

    #[test]
    fn a_pod_seen_on_two_nodes_is_caught() {
        let mut o = Observer::default();
        o.pods(&json!({"items": [pod("a", "n1"), pod("b", "n2")]}));
        assert!(o.violations.is_empty());
        o.pods(&json!({"items": [pod("a", "n1")]}));
        assert!(o.violations.is_empty());
        o.pods(&json!({"items": [pod("a", "n2")]}));
        assert_eq!(o.violations.len(), 1, "{:?}", o.violations);
    }

    #[test]
    fn a_node_over_capacity_is_caught_and_deleting_pods_do_not_count() {
        let mut o = Observer::default();
        let mut items: Vec<Value> = (0..PODS_PER_NODE)
            .map(|i| pod(&format!("p{i}"), "n1"))
            .collect();
        let mut deleting = pod("gone", "n1");
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        items.push(deleting);
        o.pods(&json!({ "items": items.clone() }));
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        items.push(pod("extra", "n1"));
        o.pods(&json!({ "items": items }));
        assert_eq!(o.violations.len(), 1, "{:?}", o.violations);
    }

    #[test]
    fn two_controller_leaders_in_one_term_are_caught() {
        let mut o = Observer::default();
        o.metrics(
            "r1",
            "flotilla_raft_term 3\nflotilla_controllers_leading 1\n",
        );
        o.metrics(
            "r2",
            "flotilla_raft_term 3\nflotilla_controllers_leading 0\n",
        );
        o.metrics(
            "r2",
            "flotilla_raft_term 4\nflotilla_controllers_leading 1\n",
        );
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        assert_eq!(o.summary().terms_with_a_controller_leader, 2);
        o.metrics(
            "r3",
            "flotilla_raft_term 4\nflotilla_controllers_leading 1\n",
        );
        assert_eq!(o.violations.len(), 1, "{:?}", o.violations);
    }
}
