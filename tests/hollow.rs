//! Hollow nodes (`flotilla agent --hollow N`): one process registering many simulated nodes
//! against a real three-replica cluster, with the real scheduler and controllers: every
//! node Ready with its Lease, a Deployment's pods bound across them and reported Running by
//! their hollow node's pod workers, then scaled away (graceful deletion through the same
//! workers).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// GET `path` from replica 2: the JSON body.
async fn get_body(c: &Cluster, path: &str) -> Value {
    kube_get(c, 2, path).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hollow_nodes_register_run_pods_and_delete_them() {
    let c = Cluster::start(3, &[]).await;
    let data = c.dir.path().join("hollow");
    let _agent = Agent::start(
        &c,
        "h",
        &data,
        &["--hollow", "20", "--hollow-start-ms", "100"],
    );
    // Every node registers, heartbeats through its own Lease, and is Ready.
    wait_for(Duration::from_secs(60), "20 hollow nodes Ready", || async {
        let nodes = get_body(&c, "/api/v1/nodes").await;
        let ready = nodes["items"]
            .as_array()?
            .iter()
            .filter(|n| {
                n["metadata"]["name"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("h-"))
            })
            .filter(|n| {
                n["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|x| x["type"] == "Ready" && x["status"] == "True")
                })
            })
            .count();
        (ready == 20).then_some(())
    })
    .await;
    wait_for(
        Duration::from_secs(30),
        "every hollow node's Lease",
        || async {
            for i in 0..20 {
                let lease = get_body(
                    &c,
                    &format!(
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/h-{i}"
                    ),
                )
                .await;
                if lease["spec"]["holderIdentity"] != format!("h-{i}").as_str() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let node = get_body(&c, "/api/v1/nodes/h-0").await;
    assert_eq!(
        node["status"]["nodeInfo"]["containerRuntimeVersion"],
        "hollow://1"
    );

    // A Deployment of 100 pods: bound across the nodes, Running as their nodes report.
    let kubectl = Kubectl::new(&c, 2);
    let manifest = c.dir.path().join("many.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: many}\nspec:\n  replicas: 100\n  selector: {matchLabels: {app: many}}\n  template:\n    metadata: {labels: {app: many}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {name: c, image: busybox, command: [sleep, '3600'], resources: {requests: {cpu: 10m}}}\n",
    )
    .unwrap();
    kubectl.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    let pods = wait_for(Duration::from_secs(120), "100 pods Running", || async {
        let list = get_body(
            &c,
            "/api/v1/namespaces/default/pods?labelSelector=app%3Dmany",
        )
        .await;
        let items = list["items"].as_array()?.clone();
        let running = items
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count();
        (running == 100).then_some(items)
    })
    .await;
    let mut per_node = std::collections::BTreeMap::<String, usize>::new();
    for p in &pods {
        let id = p["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .unwrap();
        assert!(id.starts_with("hollow://"), "{p}");
        *per_node
            .entry(p["spec"]["nodeName"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        per_node.len() >= 15,
        "the scheduler spreads the pods: {per_node:?}"
    );

    // A Job whose pods `sleep 1`: hollow containers exit 0 after that, so it completes
    // (a `sleep 3600` above does not end).
    let job = c.dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: short}\nspec:\n  completions: 4\n  parallelism: 2\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - {name: c, image: busybox, command: [sleep, '1']}\n",
    )
    .unwrap();
    kubectl.ok(&["apply", "-f", job.to_str().unwrap()]);
    let done = wait_for(Duration::from_secs(120), "the Job to complete", || async {
        let j = get_body(&c, "/apis/batch/v1/namespaces/default/jobs/short").await;
        (j["status"]["succeeded"] == 4).then_some(j)
    })
    .await;
    assert!(
        done["status"]["conditions"].as_array().is_some_and(|cs| cs
            .iter()
            .any(|x| x["type"] == "Complete" && x["status"] == "True")),
        "{done}"
    );
    let running = get_body(
        &c,
        "/api/v1/namespaces/default/pods?labelSelector=app%3Dmany",
    )
    .await;
    assert!(
        running["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"]["phase"] == "Running"),
        "the sleep 3600 pods still run"
    );

    // Scaled away: each hollow node stops its containers and deletes its pods.
    kubectl.ok(&["scale", "deploy/many", "--replicas=0"]);
    wait_for(Duration::from_secs(120), "the pods to be gone", || async {
        let list = get_body(
            &c,
            "/api/v1/namespaces/default/pods?labelSelector=app%3Dmany",
        )
        .await;
        list["items"].as_array()?.is_empty().then_some(())
    })
    .await;
}
