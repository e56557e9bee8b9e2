//! The leader's controllers and scheduler against real three-replica clusters, driven by the
//! real kubectl. Until the node agent lands, the test registers nodes through the API and a
//! stand-in kubelet (below) marks bound pods running and ready, and finishes graceful
//! deletions, as the agent will; the ReplicaSet and Deployment controllers, the garbage
//! collector and the scheduler are the real ones.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

/// Sends one request to replica `id`; returns status and JSON body.
async fn call(
    c: &Cluster,
    id: u64,
    method: http::Method,
    path: &str,
    ctype: &str,
    body: Value,
) -> (u16, Value) {
    req(&[c.replica(id).api()], method, path, ctype, &body).await
}

/// GET `path` from replica `id`: the JSON body (`Null` if none).
async fn get_json(c: &Cluster, id: u64, path: &str) -> Value {
    get_status(c, id, path).await.1
}

/// GET `path` from replica `id`: status and JSON body.
async fn get_status(c: &Cluster, id: u64, path: &str) -> (u16, Value) {
    call(
        c,
        id,
        http::Method::GET,
        path,
        "application/json",
        Value::Null,
    )
    .await
}

/// Registers a Ready node with the given allocatable resources.
async fn add_node(c: &Cluster, id: u64, name: &str, cpu: &str, memory: &str) {
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}});
    let (s, b) = call(
        c,
        id,
        http::Method::POST,
        "/api/v1/nodes",
        "application/json",
        node,
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let status = json!({"status": {
        "capacity": {"cpu": cpu, "memory": memory, "pods": "110"},
        "allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": "2026-11-25T00:00:00Z", "lastTransitionTime": "2026-11-25T00:00:00Z"}],
    }});
    let (s, b) = call(
        c,
        id,
        http::Method::PATCH,
        &format!("/api/v1/nodes/{name}/status"),
        "application/merge-patch+json",
        status,
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

/// A stand-in for the node agents: bound pods become Running and Ready with an IP; pods being
/// deleted gracefully are finished off with grace 0. It talks to whichever replica answers.
fn stand_in_kubelet(servers: Vec<String>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    stand_in_kubelets(servers, stop, Arc::default())
}

/// As [`stand_in_kubelet`], but the nodes named in `down` are dead: nothing happens to
/// their pods.
fn stand_in_kubelets(
    servers: Vec<String>,
    stop: Arc<AtomicBool>,
    down: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut order = servers.clone();
        while !stop.load(Ordering::SeqCst) {
            let (s, list) = req(
                &order,
                http::Method::GET,
                "/api/v1/pods",
                "application/json",
                &Value::Null,
            )
            .await;
            if s != 200 {
                order.rotate_left(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            for p in list["items"].as_array().cloned().unwrap_or_default() {
                let on_dead_node = p["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| down.lock().unwrap().contains(n));
                if on_dead_node {
                    continue;
                }
                let ns = p["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
                let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
                if p["metadata"]["deletionTimestamp"].is_string() {
                    req(
                        &order,
                        http::Method::DELETE,
                        &path,
                        "application/json",
                        &json!({"gracePeriodSeconds": 0}),
                    )
                    .await;
                } else if p["spec"]["nodeName"].is_string()
                    && matches!(p["status"]["phase"].as_str(), None | Some("Pending"))
                {
                    let now = "2026-11-25T00:00:00Z";
                    let h = name
                        .bytes()
                        .fold(7u32, |h, b| h.wrapping_mul(31) ^ u32::from(b));
                    let ip = format!("10.244.{}.{}", (h >> 8) % 250, h % 250 + 2);
                    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Initialized", "status": "True"},
                        {"type": "ContainersReady", "status": "True"},
                        {"type": "Ready", "status": "True", "lastTransitionTime": now}]}});
                    req(
                        &order,
                        http::Method::PATCH,
                        &format!("{path}/status"),
                        "application/merge-patch+json",
                        &status,
                    )
                    .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

fn apis(c: &Cluster) -> Vec<String> {
    (1..=3).map(|id| c.replica(id).api()).collect()
}

/// The pods of a namespace: name → (node, image, owner kind/name, phase).
async fn pods(c: &Cluster, id: u64, ns: &str) -> BTreeMap<String, Value> {
    let (s, list) = get_status(c, id, &format!("/api/v1/namespaces/{ns}/pods")).await;
    if s != 200 {
        return BTreeMap::new();
    }
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p.clone(),
            )
        })
        .collect()
}

fn deployment(replicas: u32, image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: apps\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: web}}\n  strategy:\n    rollingUpdate: {{maxSurge: 2, maxUnavailable: 1}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n        resources:\n          requests: {{cpu: 300m, memory: 100Mi}}\n"
    )
}

/// Waits until the namespace has exactly `n` active pods, all bound, Running, with `image`.
async fn wait_pods(
    c: &Cluster,
    id: u64,
    ns: &str,
    n: usize,
    image: &str,
) -> BTreeMap<String, Value> {
    wait_for(
        Duration::from_secs(60),
        &format!("{n} running pods with {image}"),
        || async {
            let ps = pods(c, id, ns).await;
            let active: BTreeMap<String, Value> = ps
                .into_iter()
                .filter(|(_, p)| p["metadata"]["deletionTimestamp"].is_null())
                .collect();
            let good = active.len() == n
                && active.values().all(|p| {
                    p["spec"]["nodeName"].is_string()
                        && p["status"]["phase"] == "Running"
                        && p["spec"]["containers"][0]["image"] == image
                });
            good.then_some(active)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_created_spread_scaled_rolled_out_undone_and_deleted() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let k = Kubectl::new(&c, follower);
    for n in ["n1", "n2", "n3"] {
        add_node(&c, follower, n, "2", "4Gi").await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet = stand_in_kubelet(apis(&c), stop.clone());
    let ns = k.file(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n",
    );
    k.ok(&["create", "-f", &ns]);

    // Ten replicas of 300m on three 2-cpu nodes: spread, and within capacity (6 per node).
    let file = k.file("web.yaml", &deployment(10, "nginx:1.25"));
    assert_eq!(
        k.ok(&["apply", "-f", &file]).trim(),
        "deployment.apps/web created"
    );
    let ps = wait_pods(&c, follower, "apps", 10, "nginx:1.25").await;
    // Bound by the scheduler (from its cache), each pod keeps the field ownership of the
    // ReplicaSet controller that created it.
    for p in ps.values() {
        let managers: Vec<&str> = p["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        assert!(managers.contains(&"replicaset-controller"), "{p}");
    }
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in ps.values() {
        *per_node
            .entry(p["spec"]["nodeName"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_node.len(), 3, "spread over every node: {per_node:?}");
    assert!(
        per_node.values().all(|&n| (3..=4).contains(&n)),
        "{per_node:?}"
    );
    let out = k.ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "apps",
        "--timeout=60s",
    ]);
    assert!(out.contains("successfully rolled out"), "{out}");
    let describe = k.ok(&["describe", "deployment", "web", "-n", "apps"]);
    assert!(
        describe.contains("ScalingReplicaSet"),
        "events are recorded:\n{describe}"
    );

    // Scale down.
    k.ok(&["scale", "deployment/web", "-n", "apps", "--replicas=4"]);
    wait_pods(&c, follower, "apps", 4, "nginx:1.25").await;

    // A rolling update, then back.
    k.ok(&[
        "set",
        "image",
        "deployment/web",
        "-n",
        "apps",
        "web=nginx:1.26",
    ]);
    let out = k.ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "apps",
        "--timeout=60s",
    ]);
    assert!(out.contains("successfully rolled out"), "{out}");
    wait_pods(&c, follower, "apps", 4, "nginx:1.26").await;
    let history = k.ok(&["rollout", "history", "deployment/web", "-n", "apps"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    k.ok(&["rollout", "undo", "deployment/web", "-n", "apps"]);
    let out = k.ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "apps",
        "--timeout=60s",
    ]);
    assert!(out.contains("successfully rolled out"), "{out}");
    wait_pods(&c, follower, "apps", 4, "nginx:1.25").await;
    let rs = k.ok(&["get", "rs", "-n", "apps", "-o", "jsonpath={range .items[*]}{.spec.replicas}/{.metadata.annotations.deployment\\.kubernetes\\.io/revision} {end}"]);
    let mut rs: Vec<&str> = rs.split_whitespace().collect();
    rs.sort();
    assert_eq!(
        rs,
        ["0/2", "4/3"],
        "the undone template is revision 3; the other is idle"
    );

    // Orphan: the Deployment goes; its ReplicaSets and pods stay, no longer owned.
    k.ok(&[
        "delete",
        "deployment",
        "web",
        "-n",
        "apps",
        "--cascade=orphan",
    ]);
    wait_for(
        Duration::from_secs(30),
        "the orphaned ReplicaSets",
        || async {
            let (s, rs) =
                get_status(&c, follower, "/apis/apps/v1/namespaces/apps/replicasets").await;
            let (ds, _) = get_status(
                &c,
                follower,
                "/apis/apps/v1/namespaces/apps/deployments/web",
            )
            .await;
            let items = rs["items"].as_array().cloned().unwrap_or_default();
            (s == 200
                && ds == 404
                && items.len() == 2
                && items.iter().all(|r| {
                    r["metadata"]["ownerReferences"]
                        .as_array()
                        .is_none_or(Vec::is_empty)
                }))
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        pods(&c, follower, "apps").await.len(),
        4,
        "the pods stay with their ReplicaSet"
    );
    // The pods are orphaned too (the garbage collector takes the owner reference off each
    // stored pod), then adopted by a new ReplicaSet: the controllers' cache holds only a part
    // of a bound pod, and none of the rest may be lost on the way.
    let before = pods(&c, follower, "apps").await;
    k.ok(&["delete", "rs", "--all", "-n", "apps", "--cascade=orphan"]);
    wait_for(Duration::from_secs(30), "the orphaned pods", || async {
        let ps = pods(&c, follower, "apps").await;
        (ps.len() == 4
            && ps.values().all(|p| {
                p["metadata"]["ownerReferences"]
                    .as_array()
                    .is_none_or(Vec::is_empty)
            }))
        .then_some(())
    })
    .await;
    let adopter = k.file(
        "adopter.yaml",
        "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: adopter\n  namespace: apps\nspec:\n  replicas: 4\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: web\n        image: adopter:1\n",
    );
    k.ok(&["apply", "-f", &adopter]);
    let adopted = wait_for(Duration::from_secs(30), "the pods adopted", || async {
        let ps = pods(&c, follower, "apps").await;
        (ps.len() == 4
            && ps.values().all(|p| {
                p["metadata"]["ownerReferences"][0]["name"] == "adopter"
                    && p["metadata"]["ownerReferences"][0]["controller"] == true
            }))
        .then_some(ps)
    })
    .await;
    assert_eq!(
        adopted.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same pods, none made"
    );
    for (name, p) in &adopted {
        let was = &before[name];
        assert_eq!(p["spec"], was["spec"], "{name}'s spec survives");
        for f in ["phase", "podIP", "hostIP", "startTime"] {
            assert_eq!(p["status"][f], was["status"][f], "{name}'s status survives");
        }
        assert_eq!(p["metadata"]["labels"], was["metadata"]["labels"]);
        assert!(
            p["metadata"]["managedFields"]
                .as_array()
                .is_some_and(|m| m.len()
                    >= was["metadata"]["managedFields"]
                        .as_array()
                        .map_or(0, Vec::len)),
            "{name}'s field ownership survives: {p}"
        );
    }
    // The ReplicaSets are independent now; clean them up with the pods (background).
    k.ok(&["delete", "rs", "--all", "-n", "apps"]);
    wait_for(
        Duration::from_secs(30),
        "the background cascade",
        || async { pods(&c, follower, "apps").await.is_empty().then_some(()) },
    )
    .await;

    // Foreground: the Deployment stays (with its finalizer) until its ReplicaSets and pods
    // are gone, then goes.
    k.ok(&["apply", "-f", &file]);
    wait_pods(&c, follower, "apps", 10, "nginx:1.25").await;
    k.ok(&[
        "delete",
        "deployment",
        "web",
        "-n",
        "apps",
        "--cascade=foreground",
        "--wait=false",
    ]);
    let (s, d) = get_status(
        &c,
        follower,
        "/apis/apps/v1/namespaces/apps/deployments/web",
    )
    .await;
    if s == 200 {
        assert_eq!(
            d["metadata"]["finalizers"],
            json!(["foregroundDeletion"]),
            "{d}"
        );
        assert!(d["metadata"]["deletionTimestamp"].is_string());
    }
    wait_for(
        Duration::from_secs(30),
        "the foreground cascade",
        || async {
            let ps = pods(&c, follower, "apps").await;
            let (s, rs) =
                get_status(&c, follower, "/apis/apps/v1/namespaces/apps/replicasets").await;
            let (ds, _) = get_status(
                &c,
                follower,
                "/apis/apps/v1/namespaces/apps/deployments/web",
            )
            .await;
            (s == 200
                && ds == 404
                && ps.is_empty()
                && rs["items"].as_array().is_some_and(Vec::is_empty))
            .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    kubelet.await.unwrap();
}

/// Every pod ever created in a namespace, from a watch that replays from the namespace's
/// creation: (name, node it was first seen bound to, every node it was seen bound to).
struct PodHistory {
    created: std::collections::BTreeSet<String>,
    bound: BTreeMap<String, std::collections::BTreeSet<String>>,
}

async fn pod_history(
    servers: &[String],
    ns: &str,
    from_rv: &str,
    until_quiet: Duration,
) -> PodHistory {
    let mut h = PodHistory {
        created: Default::default(),
        bound: BTreeMap::new(),
    };
    let client = flotilla::client::Client::new(servers.to_vec(), Duration::from_secs(5));
    let mut rv = from_rv.to_string();
    let mut order = servers.to_vec();
    'outer: loop {
        let path = format!("/api/v1/namespaces/{ns}/pods?watch=true&resourceVersion={rv}");
        let Ok(resp) = client.get_stream(&order[0], &path).await else {
            order.rotate_left(1);
            continue;
        };
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        loop {
            match tokio::time::timeout(until_quiet, body.frame()).await {
                Err(_) => break 'outer,
                Ok(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        buf.extend_from_slice(d);
                    }
                    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        let ev: Value = serde_json::from_slice(&line).unwrap();
                        let obj = &ev["object"];
                        rv = obj["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or(&rv)
                            .to_string();
                        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
                        if ev["type"] == "ADDED" {
                            h.created.insert(name.clone());
                        }
                        if let Some(n) = obj["spec"]["nodeName"].as_str() {
                            h.bound.entry(name).or_default().insert(n.to_string());
                        }
                    }
                }
                _ => {
                    order.rotate_left(1);
                    continue 'outer;
                }
            }
        }
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_resumes_scaling_and_rollouts_without_duplicates_or_overcommit() {
    let mut c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    for n in ["n1", "n2", "n3"] {
        add_node(&c, follower, n, "4", "8Gi").await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet = stand_in_kubelet(apis(&c), stop.clone());
    let k = Kubectl::new(&c, follower);
    let ns = k.file(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n",
    );
    k.ok(&["create", "-f", &ns]);
    let (_, list) = get_status(&c, follower, "/api/v1/namespaces/apps/pods").await;
    let start_rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // 36 replicas of 300m on three 4-cpu nodes (13 fit on each): kill the leader while the
    // pods are being created and bound.
    let file = k.file("web.yaml", &deployment(36, "nginx:1.25"));
    k.ok(&["apply", "-f", &file]);
    wait_for(Duration::from_secs(30), "the first pods", || async {
        (pods(&c, follower, "apps").await.len() >= 3).then_some(())
    })
    .await;
    c.kill(leader);
    let live: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let second = c.wait_leader().await;
    wait_pods(&c, live[0], "apps", 36, "nginx:1.25").await;
    // The new leader's control loops started on the informers it kept current as a
    // follower: its pods were listed once, when the process started, not again on election.
    wait_for(
        Duration::from_secs(10),
        "the new leader's control loops",
        || async {
            (c.metric(second, "flotilla_controllers_start_seconds_count")
                .await
                .unwrap_or(0.0)
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        c.metric(second, "flotilla_informer_lists_total{resource=\"pods\"}")
            .await,
        Some(1.0),
        "a new leader lists pods again"
    );
    c.launch(leader, &[]);

    // A rolling update, with the new leader killed in the middle of it.
    let k2 = Kubectl::new(
        &c,
        live.iter()
            .copied()
            .find(|&id| id != second)
            .unwrap_or(live[0]),
    );
    k2.ok(&[
        "set",
        "image",
        "deployment/web",
        "-n",
        "apps",
        "web=nginx:1.26",
    ]);
    wait_for(Duration::from_secs(30), "the rollout to start", || async {
        let ps = pods(&c, leader, "apps").await;
        ps.values()
            .any(|p| p["spec"]["containers"][0]["image"] == "nginx:1.26")
            .then_some(())
    })
    .await;
    c.kill(second);
    c.wait_leader().await;
    let watcher_at = (1..=3).find(|&id| id != second).unwrap();
    let k3 = Kubectl::new(&c, watcher_at);
    let out = k3.ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "apps",
        "--timeout=90s",
    ]);
    assert!(out.contains("successfully rolled out"), "{out}");
    let ps = wait_pods(&c, watcher_at, "apps", 36, "nginx:1.26").await;
    c.launch(second, &[]);

    // No node over capacity (13 × 300m fit in 4 cpu), every pod bound exactly once.
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in ps.values() {
        *per_node
            .entry(p["spec"]["nodeName"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        per_node.values().all(|&n| n <= 13),
        "over capacity: {per_node:?}"
    );
    let servers = apis(&c);
    let history = pod_history(&servers, "apps", &start_rv, Duration::from_secs(2)).await;
    for (name, nodes) in &history.bound {
        assert_eq!(nodes.len(), 1, "pod {name} was bound to {nodes:?}");
    }
    // 36 pods of the first template, plus the rolling update's 36: a pod created twice by
    // two leaders would show up as more.
    assert_eq!(
        history.created.len(),
        72,
        "pods ever created: {}",
        history.created.len()
    );
    stop.store(true, Ordering::SeqCst);
    kubelet.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_former_leader_cannot_create_or_bind_pods() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let others: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    for n in ["n1", "n2", "n3"] {
        add_node(&c, others[0], n, "8", "16Gi").await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet = stand_in_kubelet(
        others.iter().map(|&id| c.replica(id).api()).collect(),
        stop.clone(),
    );
    let k = Kubectl::new(&c, others[0]);
    let ns = k.file(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n",
    );
    k.ok(&["create", "-f", &ns]);
    let (_, list) = call(
        &c,
        others[0],
        http::Method::GET,
        "/api/v1/namespaces/apps/pods",
        "application/json",
        Value::Null,
    )
    .await;
    let start_rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let file = k.file("web.yaml", &deployment(0, "nginx:1.25"));
    k.ok(&["apply", "-f", &file]);
    wait_for(Duration::from_secs(30), "the ReplicaSet", || async {
        let (s, rs) = call(
            &c,
            others[0],
            http::Method::GET,
            "/apis/apps/v1/namespaces/apps/replicasets",
            "application/json",
            Value::Null,
        )
        .await;
        (s == 200 && rs["items"].as_array().is_some_and(|a| a.len() == 1)).then_some(())
    })
    .await;

    // Scale up through the leader, and cut it off at once: its controllers are creating
    // pods (or about to) when it loses the others.
    let (s, b) = call(
        &c,
        leader,
        http::Method::PATCH,
        "/apis/apps/v1/namespaces/apps/deployments/web/scale",
        "application/merge-patch+json",
        json!({"spec": {"replicas": 30}}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let partition = c.isolate(leader);
    // The cut-off leader stops its control loops once it no longer hears from a quorum ...
    wait_for(
        Duration::from_secs(10),
        "the isolated leader to stop its controllers",
        || async {
            (c.metric(leader, "flotilla_controllers_leading").await == Some(0.0)).then_some(())
        },
    )
    .await;
    // ... while the majority elects a leader that finishes the job.
    wait_pods(&c, others[0], "apps", 30, "nginx:1.25").await;
    let new_leader = wait_for(
        Duration::from_secs(10),
        "a leader among the majority",
        || async {
            for &id in &others {
                if c.metric(id, "flotilla_controllers_leading").await == Some(1.0) {
                    return Some(id);
                }
            }
            None
        },
    )
    .await;
    assert_ne!(new_leader, leader);
    drop(partition);
    // Healed: the old leader follows, and has the majority's history, not its own.
    wait_for(
        Duration::from_secs(30),
        "the old leader to catch up",
        || async { (pods(&c, leader, "apps").await.len() == 30).then_some(()) },
    )
    .await;
    assert_eq!(
        c.metric(leader, "flotilla_controllers_leading").await,
        Some(0.0)
    );
    let history = pod_history(
        &(1..=3).map(|id| c.replica(id).api()).collect::<Vec<_>>(),
        "apps",
        &start_rv,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        history.created.len(),
        30,
        "no pod created beyond the 30 asked for"
    );
    for (name, nodes) in &history.bound {
        assert_eq!(nodes.len(), 1, "pod {name} was bound to {nodes:?}");
    }
    stop.store(true, Ordering::SeqCst);
    kubelet.await.unwrap();
}

/// Renews each live node's Lease in `kube-node-lease` every 300 ms, as the agents will.
fn heartbeats(
    servers: Vec<String>,
    nodes: Vec<String>,
    stop: Arc<AtomicBool>,
    down: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            for node in &nodes {
                if down.lock().unwrap().contains(node) {
                    continue;
                }
                let renew = format!("2026-11-25T00:{:02}:{:02}.{:06}Z", (n / 60) % 60, n % 60, n);
                let path = format!(
                    "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}"
                );
                let (s, _) = req(
                    &servers,
                    http::Method::PATCH,
                    &path,
                    "application/merge-patch+json",
                    &json!({"spec": {"renewTime": renew}}),
                )
                .await;
                if s == 404 {
                    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": node, "namespace": "kube-node-lease"},
                        "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": renew}});
                    req(
                        &servers,
                        http::Method::POST,
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        "application/json",
                        &lease,
                    )
                    .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_goes_unready_its_pods_move_and_it_comes_back() {
    let c = Cluster::start(
        3,
        &[
            "--node-monitor-grace-period",
            "2",
            "--default-unreachable-toleration-seconds",
            "1",
            "--node-eviction-rate",
            "10",
        ],
    )
    .await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
    for n in &nodes {
        add_node(&c, follower, n, "4", "8Gi").await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let down: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>> = Arc::default();
    let kubelet = stand_in_kubelets(apis(&c), stop.clone(), down.clone());
    let beats = heartbeats(apis(&c), nodes.clone(), stop.clone(), down.clone());
    let k = Kubectl::new(&c, follower);
    let ns = k.file(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n",
    );
    k.ok(&["create", "-f", &ns]);
    let file = k.file("web.yaml", &deployment(6, "nginx:1.25"));
    k.ok(&["apply", "-f", &file]);
    let ps = wait_pods(&c, follower, "apps", 6, "nginx:1.25").await;
    assert!(
        ps.values().any(|p| p["spec"]["nodeName"] == "n3"),
        "spread over n3 too"
    );
    // Healthy nodes stay Ready well past the grace period (a condition that must keep
    // holding, checked after the time it would have taken to fail).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n3 = get_json(&c, follower, "/api/v1/nodes/n3").await;
    assert_eq!(n3["status"]["conditions"][0]["status"], "True", "{n3}");

    // n3 dies: no more heartbeats, its pods are left alone.
    down.lock().unwrap().insert("n3".into());
    wait_for(
        Duration::from_secs(20),
        "n3 to be marked unreachable",
        || async {
            let n = get_json(&c, follower, "/api/v1/nodes/n3").await;
            let unknown = n["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "Unknown")
            });
            let tainted = n["spec"]["taints"].as_array().is_some_and(|ts| {
                ts.iter().any(|t| {
                    t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute"
                })
            });
            (unknown && tainted).then_some(())
        },
    )
    .await;
    assert!(k.ok(&["get", "nodes"]).contains("NotReady"));
    // Its pods are evicted (left Terminating: nobody on n3 confirms) and replaced elsewhere.
    wait_for(
        Duration::from_secs(30),
        "the pods of n3 to be replaced on n1 and n2",
        || async {
            let ps = pods(&c, follower, "apps").await;
            let active: Vec<&Value> = ps
                .values()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .collect();
            let ok = active.len() == 6
                && active.iter().all(|p| {
                    p["spec"]["nodeName"].is_string()
                        && p["spec"]["nodeName"] != "n3"
                        && p["status"]["phase"] == "Running"
                });
            ok.then_some(())
        },
    )
    .await;
    let ps = pods(&c, follower, "apps").await;
    assert!(
        ps.values().any(
            |p| p["spec"]["nodeName"] == "n3" && p["metadata"]["deletionTimestamp"].is_string()
        ),
        "the evicted pods wait for their node"
    );

    // n3 comes back: heartbeats and Ready=True again; the taints go.
    down.lock().unwrap().remove("n3");
    let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
        "lastHeartbeatTime": "2026-11-25T01:00:00Z", "lastTransitionTime": "2026-11-25T01:00:00Z"}]}});
    let (s, b) = call(
        &c,
        follower,
        http::Method::PATCH,
        "/api/v1/nodes/n3/status",
        "application/merge-patch+json",
        ready,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    wait_for(
        Duration::from_secs(20),
        "n3 to be Ready and untainted",
        || async {
            let n = get_json(&c, follower, "/api/v1/nodes/n3").await;
            let ready = n["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            (ready && n["spec"]["taints"].as_array().is_none_or(Vec::is_empty)).then_some(())
        },
    )
    .await;

    // n2 is deleted while its pods run: nobody will ever confirm them, so the pod garbage
    // collector deletes them for good and their ReplicaSet replaces them on n1 and n3.
    let on_n2 = pods(&c, follower, "apps")
        .await
        .values()
        .filter(|p| p["spec"]["nodeName"] == "n2")
        .count();
    assert!(on_n2 > 0, "n2 runs some of the pods");
    down.lock().unwrap().insert("n2".into());
    k.ok(&["delete", "node", "n2"]);
    wait_for(
        Duration::from_secs(30),
        "the orphans of n2 to be collected and replaced",
        || async {
            let ps = pods(&c, follower, "apps").await;
            let ok = ps.len() == 6
                && ps
                    .values()
                    .all(|p| p["spec"]["nodeName"] != "n2" && p["status"]["phase"] == "Running");
            ok.then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    kubelet.await.unwrap();
    beats.await.unwrap();
}

/// Sets the phase of every active pod of `job` (as if its containers exited).
async fn finish_job_pods(c: &Cluster, id: u64, job: &str, phase: &str, how_many: usize) -> usize {
    let ps = pods(c, id, "apps").await;
    let mut done = 0;
    for (name, p) in ps {
        if done == how_many {
            break;
        }
        if p["metadata"]["labels"]["job-name"] == job
            && p["status"]["phase"] == "Running"
            && p["metadata"]["deletionTimestamp"].is_null()
        {
            let status = json!({"status": {"phase": phase, "conditions": [{"type": "Ready", "status": "False"}]}});
            let (s, b) = call(
                c,
                id,
                http::Method::PATCH,
                &format!("/api/v1/namespaces/apps/pods/{name}/status"),
                "application/merge-patch+json",
                status,
            )
            .await;
            assert_eq!(s, 200, "{b}");
            done += 1;
        }
    }
    done
}

async fn job_condition(c: &Cluster, id: u64, job: &str) -> Option<(String, String)> {
    let (s, j) = get_status(c, id, &format!("/apis/batch/v1/namespaces/apps/jobs/{job}")).await;
    if s != 200 {
        return None;
    }
    j["status"]["conditions"].as_array()?.iter().find_map(|c| {
        (c["status"] == "True" && (c["type"] == "Complete" || c["type"] == "Failed")).then(|| {
            (
                c["type"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
    })
}

fn job_yaml(name: &str, spec: &str) -> String {
    format!("apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n  namespace: apps\nspec:\n{spec}  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: c\n        image: busybox\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_complete_retry_up_to_their_backoff_limit_and_respect_deadlines() {
    let c = Cluster::start(3, &["--job-backoff-seconds", "1"]).await;
    let leader = c.wait_leader().await;
    let f = (1..=3).find(|&id| id != leader).unwrap();
    for n in ["n1", "n2"] {
        add_node(&c, f, n, "8", "16Gi").await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet = stand_in_kubelet(apis(&c), stop.clone());
    let k = Kubectl::new(&c, f);
    let ns = k.file(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n",
    );
    k.ok(&["create", "-f", &ns]);

    // Three completions, two at a time; deleted five seconds after it completes (long
    // enough for `kubectl wait` below to see it complete on a loaded machine: with one
    // second it was sometimes gone first).
    let pi = k.file(
        "pi.yaml",
        &job_yaml(
            "pi",
            "  completions: 3\n  parallelism: 2\n  ttlSecondsAfterFinished: 5\n",
        ),
    );
    k.ok(&["apply", "-f", &pi]);
    let running = |n: usize, job: &'static str| {
        let c = &c;
        async move {
            wait_for(
                Duration::from_secs(30),
                &format!("{n} running pods of {job}"),
                || async {
                    let ps = pods(c, f, "apps").await;
                    let r = ps
                        .values()
                        .filter(|p| {
                            p["metadata"]["labels"]["job-name"] == job
                                && p["status"]["phase"] == "Running"
                                && p["metadata"]["deletionTimestamp"].is_null()
                        })
                        .count();
                    (r == n).then_some(())
                },
            )
            .await
        }
    };
    running(2, "pi").await;
    assert_eq!(finish_job_pods(&c, f, "pi", "Succeeded", 2).await, 2);
    running(1, "pi").await;
    assert_eq!(finish_job_pods(&c, f, "pi", "Succeeded", 1).await, 1);
    let out = k.ok(&[
        "wait",
        "--for=condition=complete",
        "job/pi",
        "-n",
        "apps",
        "--timeout=30s",
    ]);
    assert!(out.contains("condition met"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the finished job and its pods to be deleted (TTL)",
        || async {
            let (s, _) = get_status(&c, f, "/apis/batch/v1/namespaces/apps/jobs/pi").await;
            let left = pods(&c, f, "apps")
                .await
                .values()
                .filter(|p| p["metadata"]["labels"]["job-name"] == "pi")
                .count();
            (s == 404 && left == 0).then_some(())
        },
    )
    .await;

    // backoffLimit 1: the first failure is retried, the second fails the job.
    let flaky = k.file("flaky.yaml", &job_yaml("flaky", "  backoffLimit: 1\n"));
    k.ok(&["apply", "-f", &flaky]);
    running(1, "flaky").await;
    finish_job_pods(&c, f, "flaky", "Failed", 1).await;
    running(1, "flaky").await;
    finish_job_pods(&c, f, "flaky", "Failed", 1).await;
    let cond = wait_for(Duration::from_secs(30), "the job to fail", || async {
        job_condition(&c, f, "flaky").await
    })
    .await;
    assert_eq!(
        cond,
        ("Failed".to_string(), "BackoffLimitExceeded".to_string())
    );
    let all = pods(&c, f, "apps").await;
    let flaky_pods: Vec<&Value> = all
        .values()
        .filter(|p| p["metadata"]["labels"]["job-name"] == "flaky")
        .collect();
    assert_eq!(flaky_pods.len(), 2, "exactly one retry");

    // A deadline: the running pod is stopped and the job fails.
    let slow = k.file(
        "slow.yaml",
        &job_yaml("slow", "  activeDeadlineSeconds: 2\n"),
    );
    k.ok(&["apply", "-f", &slow]);
    running(1, "slow").await;
    let cond = wait_for(Duration::from_secs(30), "the deadline", || async {
        job_condition(&c, f, "slow").await
    })
    .await;
    assert_eq!(cond, ("Failed".to_string(), "DeadlineExceeded".to_string()));
    running(0, "slow").await;
    stop.store(true, Ordering::SeqCst);
    kubelet.await.unwrap();
}

/// The addresses (ready, not ready) of Endpoints `name` in `apps`, sorted.
async fn endpoint_ips(c: &Cluster, id: u64, name: &str) -> (Vec<String>, Vec<String>) {
    let (s, ep) = get_status(c, id, &format!("/api/v1/namespaces/apps/endpoints/{name}")).await;
    let (mut ready, mut not_ready) = (Vec::new(), Vec::new());
    if s == 200 {
        for subset in ep["subsets"].as_array().cloned().unwrap_or_default() {
            for (k, out) in [
                ("addresses", &mut ready),
                ("notReadyAddresses", &mut not_ready),
            ] {
                for a in subset[k].as_array().cloned().unwrap_or_default() {
                    out.push(a["ip"].as_str().unwrap_or("").to_string());
                }
            }
        }
    }
    ready.sort();
    not_ready.sort();
    (ready, not_ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonsets_endpoints_service_accounts_and_namespace_deletion() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let f = (1..=3).find(|&id| id != leader).unwrap();
    for n in ["n1", "n2", "n3"] {
        add_node(&c, f, n, "8", "16Gi").await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet = stand_in_kubelet(apis(&c), stop.clone());
    let k = Kubectl::new(&c, f);
    k.ok(&["taint", "nodes", "n3", "dedicated=db:NoSchedule"]);
    let ns = k.file(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n",
    );
    k.ok(&["create", "-f", &ns]);
    // The service-account controller gives the new namespace its default account, and
    // brings it back when it is deleted.
    let has_default_sa = || async {
        let (s, _) = get_status(&c, f, "/api/v1/namespaces/apps/serviceaccounts/default").await;
        (s == 200).then_some(())
    };
    wait_for(
        Duration::from_secs(10),
        "the default ServiceAccount",
        has_default_sa,
    )
    .await;
    k.ok(&["delete", "sa", "default", "-n", "apps"]);
    wait_for(
        Duration::from_secs(10),
        "the default ServiceAccount again",
        has_default_sa,
    )
    .await;

    // A DaemonSet: one pod on each node it may run on (not the tainted n3).
    let ds = |image: &str| {
        format!("apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\n  namespace: apps\nspec:\n  selector:\n    matchLabels:\n      app: agent\n  template:\n    metadata:\n      labels:\n        app: agent\n    spec:\n      containers:\n      - name: c\n        image: {image}\n")
    };
    let f1 = k.file("ds1.yaml", &ds("agent:v1"));
    k.ok(&["apply", "-f", &f1]);
    let out = k.ok(&[
        "rollout",
        "status",
        "ds/agent",
        "-n",
        "apps",
        "--timeout=60s",
    ]);
    assert!(out.contains("successfully rolled out"), "{out}");
    let daemon_nodes = |want: usize, image: &'static str| {
        let c = &c;
        async move {
            wait_for(
                Duration::from_secs(30),
                &format!("{want} daemon pods running {image}, one per node"),
                || async {
                    let ps = pods(c, f, "apps").await;
                    let mut nodes: Vec<String> = ps
                        .values()
                        .filter(|p| {
                            p["metadata"]["labels"]["app"] == "agent"
                                && p["metadata"]["deletionTimestamp"].is_null()
                        })
                        .filter(|p| p["spec"]["containers"][0]["image"] == image)
                        .filter_map(|p| p["spec"]["nodeName"].as_str().map(str::to_string))
                        .collect();
                    let all = ps
                        .values()
                        .filter(|p| p["metadata"]["labels"]["app"] == "agent")
                        .count();
                    nodes.sort();
                    nodes.dedup();
                    (nodes.len() == want && all == want).then_some(nodes)
                },
            )
            .await
        }
    };
    assert_eq!(daemon_nodes(2, "agent:v1").await, vec!["n1", "n2"]);
    // A rolling update replaces them node by node.
    k.ok(&["set", "image", "ds/agent", "c=agent:v2", "-n", "apps"]);
    let out = k.ok(&[
        "rollout",
        "status",
        "ds/agent",
        "-n",
        "apps",
        "--timeout=60s",
    ]);
    assert!(out.contains("successfully rolled out"), "{out}");
    assert_eq!(daemon_nodes(2, "agent:v2").await, vec!["n1", "n2"]);
    // The taint goes: n3 gets its daemon pod too.
    k.ok(&["taint", "nodes", "n3", "dedicated-"]);
    assert_eq!(daemon_nodes(3, "agent:v2").await, vec!["n1", "n2", "n3"]);

    // A Service whose targetPort names a container port: Endpoints and EndpointSlices
    // follow the ready pods.
    let web = k.file(
        "web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: apps\nspec:\n  replicas: 2\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      containers:\n      - name: c\n        image: nginx\n        ports:\n        - name: http\n          containerPort: 8080\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: apps\nspec:\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: http\n",
    );
    k.ok(&["apply", "-f", &web]);
    let web_ips = |n: usize| {
        let c = &c;
        async move {
            wait_for(
                Duration::from_secs(30),
                &format!("{n} ready endpoints of web"),
                || async {
                    let (ready, not_ready) = endpoint_ips(c, f, "web").await;
                    (ready.len() == n && not_ready.is_empty()).then_some(ready)
                },
            )
            .await
        }
    };
    let ips = web_ips(2).await;
    let mut pod_ips: Vec<String> = pods(&c, f, "apps")
        .await
        .values()
        .filter(|p| p["metadata"]["labels"]["app"] == "web")
        .map(|p| p["status"]["podIP"].as_str().unwrap_or("").to_string())
        .collect();
    pod_ips.sort();
    assert_eq!(ips, pod_ips, "the endpoints are the pods' IPs");
    let port = k.ok(&[
        "get",
        "endpoints",
        "web",
        "-n",
        "apps",
        "-o",
        "jsonpath={.subsets[0].ports[0].port}",
    ]);
    assert_eq!(port, "8080", "the named target port is resolved");
    // A hand edit of the Endpoints is repaired: the controller skips only the echoes of its
    // own writes.
    let out = k.ok(&[
        "patch",
        "endpoints",
        "web",
        "-n",
        "apps",
        "--type=merge",
        "-p",
        r#"{"subsets":[{"addresses":[{"ip":"10.9.9.9"}],"ports":[{"port":1}]}]}"#,
    ]);
    assert!(out.contains("patched"), "{out}");
    assert_eq!(web_ips(2).await, pod_ips, "the hand edit is undone");
    k.ok(&["scale", "deploy/web", "--replicas=3", "-n", "apps"]);
    web_ips(3).await;
    let slices = k.ok(&[
        "get",
        "endpointslices",
        "-n",
        "apps",
        "-l",
        "kubernetes.io/service-name=web",
        "-o",
        "json",
    ]);
    let slices: Value = serde_json::from_str(&slices).unwrap();
    let endpoints: usize = slices["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["endpoints"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(endpoints, 3, "{slices}");
    // Unready pods move to notReadyAddresses.
    let one = pod_ips_of(&c, f, "web").await.remove(0);
    let (s, b) = call(
        &c,
        f,
        http::Method::PATCH,
        &format!("/api/v1/namespaces/apps/pods/{}/status", one.0),
        "application/merge-patch+json",
        json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    wait_for(Duration::from_secs(30), "an unready endpoint", || async {
        let (ready, not_ready) = endpoint_ips(&c, f, "web").await;
        (ready.len() == 2 && not_ready == vec![one.1.clone()]).then_some(())
    })
    .await;

    // Deleting the namespace deletes everything in it (pods terminate gracefully through
    // their node), then the namespace itself; kubectl waits for all of it.
    let out = k.ok(&["delete", "ns", "apps", "--timeout=60s"]);
    assert!(out.contains("namespace \"apps\" deleted"), "{out}");
    let (s, _) = get_status(&c, f, "/api/v1/namespaces/apps").await;
    assert_eq!(s, 404, "the namespace is gone");
    for path in [
        "/api/v1/pods",
        "/api/v1/services",
        "/api/v1/endpoints",
        "/apis/apps/v1/daemonsets",
        "/apis/apps/v1/deployments",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/serviceaccounts",
    ] {
        let (s, list) = get_status(&c, f, path).await;
        assert_eq!(s, 200);
        let left: Vec<&Value> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["metadata"]["namespace"] == "apps")
            .collect();
        assert!(left.is_empty(), "{path} still has {left:?}");
    }
    stop.store(true, Ordering::SeqCst);
    kubelet.await.unwrap();
}

/// (name, IP) of the pods labelled `app=<app>` in `apps`.
async fn pod_ips_of(c: &Cluster, id: u64, app: &str) -> Vec<(String, String)> {
    pods(c, id, "apps")
        .await
        .into_iter()
        .filter(|(_, p)| p["metadata"]["labels"]["app"] == app)
        .map(|(n, p)| (n, p["status"]["podIP"].as_str().unwrap_or("").to_string()))
        .collect()
}
