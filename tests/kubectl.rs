//! The Kubernetes API with the real kubectl 1.32 against a three-replica cluster, pointed at
//! a follower and at the leader, and the raw API for what kubectl does not exercise.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm1\n  labels: {app: web}\ndata:\n  a: \"1\"\n";

async fn follower_and_leader(c: &Cluster) -> (u64, u64) {
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    (follower, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_creates_reads_updates_and_deletes_through_a_follower_and_the_leader() {
    let c = Cluster::start(3, &[]).await;
    let (follower, leader) = follower_and_leader(&c).await;
    let kf = Kubectl::new(&c, follower);
    let kl = Kubectl::new(&c, leader);

    // The system namespaces exist, each with its default service account.
    let ns = wait_for(Duration::from_secs(10), "the system namespaces", || async {
        let (ok, out, _) = kf.run(&["get", "ns"]);
        (ok && out.contains("kube-node-lease")).then_some(out)
    })
    .await;
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(
            ns.lines()
                .any(|l| l.starts_with(name) && l.contains("Active")),
            "{ns}"
        );
    }
    // The service-account controller adds the default accounts just after.
    wait_for(
        Duration::from_secs(10),
        "the default ServiceAccount in kube-system",
        || async {
            let (ok, out, _) = kl.run(&["get", "sa", "default", "-n", "kube-system", "-o", "name"]);
            (ok && out.contains("serviceaccount/default")).then_some(())
        },
    )
    .await;

    let file = kf.file("cm.yaml", CM);
    assert_eq!(
        kf.ok(&["create", "-f", &file]).trim(),
        "configmap/cm1 created"
    );
    // Read through the leader right away: linearizable.
    let out = kl.ok(&["get", "cm", "cm1"]);
    assert!(out.starts_with("NAME   DATA   AGE"), "{out}");
    assert!(out.contains("cm1    1"), "{out}");
    assert_eq!(
        kl.ok(&["get", "cm", "cm1", "-o", "jsonpath={.data.a}"]),
        "1"
    );
    assert_eq!(
        kf.ok(&["get", "configmaps", "-o", "name"]).trim(),
        "configmap/cm1"
    );
    let json: serde_json::Value =
        serde_json::from_str(&kl.ok(&["get", "cm", "cm1", "-o", "json"])).unwrap();
    assert!(json["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| u.len() == 36));
    assert!(
        json["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > 0
    );

    // Exact error output.
    let err = kl.fails(&["create", "-f", &file]);
    assert_eq!(
        err.trim(),
        format!("Error from server (AlreadyExists): error when creating \"{file}\": configmaps \"cm1\" already exists")
    );
    assert_eq!(
        kf.fails(&["get", "cm", "nope"]).trim(),
        "Error from server (NotFound): configmaps \"nope\" not found"
    );

    // label, annotate, selectors.
    assert_eq!(
        kf.ok(&["label", "cm", "cm1", "tier=fe"]).trim(),
        "configmap/cm1 labeled"
    );
    assert_eq!(
        kl.ok(&["annotate", "cm", "cm1", "note=hi"]).trim(),
        "configmap/cm1 annotated"
    );
    let out = kl.ok(&["get", "cm", "-l", "tier=fe,app in (web)", "--show-labels"]);
    assert!(out.contains("app=web,tier=fe"), "{out}");
    assert!(kl.ok(&["get", "cm", "-l", "tier!=fe"]).trim().is_empty());
    let out = kl.ok(&[
        "get",
        "cm",
        "--field-selector",
        "metadata.name=cm1",
        "-o",
        "name",
    ]);
    assert_eq!(out.trim(), "configmap/cm1");

    // Patches of every type.
    kf.ok(&[
        "patch",
        "cm",
        "cm1",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"b":"2"}}"#,
    ]);
    kf.ok(&[
        "patch",
        "cm",
        "cm1",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/data/a","value":"x"}]"#,
    ]);
    kf.ok(&[
        "patch",
        "cm",
        "cm1",
        "--type",
        "strategic",
        "-p",
        r#"{"data":{"c":"3"}}"#,
    ]);
    assert_eq!(
        kl.ok(&["get", "cm", "cm1", "-o", "jsonpath={.data}"]),
        r#"{"a":"x","b":"2","c":"3"}"#
    );
    let err = kf.fails(&[
        "patch",
        "cm",
        "cm1",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/data/nope"}]"#,
    ]);
    assert!(err.starts_with("The request is invalid: "), "{err}");
    assert_eq!(
        kl.ok(&["get", "cm", "cm1", "-o", "jsonpath={.data.a}"]),
        "x",
        "a failed patch changes nothing"
    );

    // apply (client-side) and server-side apply.
    let applied = kf.file("cm-applied.yaml", &CM.replace("a: \"1\"", "a: \"9\""));
    let out = kf.ok(&["apply", "-f", &applied]);
    assert!(out.contains("configmap/cm1 configured"), "{out}");
    assert_eq!(
        kf.ok(&["apply", "-f", &applied]).trim(),
        "configmap/cm1 unchanged"
    );
    let ssa = kf.file("cm2.yaml", &CM.replace("cm1", "cm2"));
    assert_eq!(
        kl.ok(&["apply", "--server-side", "-f", &ssa]).trim(),
        "configmap/cm2 serverside-applied"
    );
    assert_eq!(
        kl.ok(&["apply", "--server-side", "-f", &ssa]).trim(),
        "configmap/cm2 serverside-applied"
    );

    // replace with a stale resourceVersion conflicts.
    let stale = kf.file(
        "cm-stale.yaml",
        &CM.replace("  name: cm1\n", "  name: cm1\n  resourceVersion: \"1\"\n"),
    );
    let err = kf.fails(&["replace", "-f", &stale]);
    assert_eq!(
        err.trim(),
        format!("Error from server (Conflict): error when replacing \"{stale}\": Operation cannot be fulfilled on configmaps \"cm1\": the object has been modified; please apply your changes to the latest version and try again")
    );
    assert!(kf
        .ok(&["replace", "-f", &file])
        .contains("configmap/cm1 replaced"));

    // delete, then it is gone everywhere.
    assert_eq!(
        kl.ok(&["delete", "cm", "cm1", "cm2"]).trim(),
        "configmap \"cm1\" deleted\nconfigmap \"cm2\" deleted"
    );
    assert_eq!(
        kf.fails(&["get", "cm", "cm1"]).trim(),
        "Error from server (NotFound): configmaps \"cm1\" not found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_pages_namespaces_and_validation_behave_as_kubernetes() {
    let c = Cluster::start(3, &[]).await;
    let (follower, leader) = follower_and_leader(&c).await;
    let kf = Kubectl::new(&c, follower);
    let kl = Kubectl::new(&c, leader);
    wait_for(Duration::from_secs(10), "the default namespace", || async {
        kf.run(&["get", "ns", "default"]).0.then_some(())
    })
    .await;

    // A watch on the follower sees changes made through the leader, in order.
    let watch = {
        let (server, cache, dir) = (kf.server.clone(), kf.cache.clone(), kf.dir.clone());
        std::thread::spawn(move || {
            Command::new(KUBECTL)
                .arg(format!("--server={server}"))
                .arg(format!("--cache-dir={}", cache.display()))
                .args([
                    "get",
                    "cm",
                    "-w",
                    "--output-watch-events",
                    "-o",
                    "jsonpath={.type} {.object.metadata.name}{\"\\n\"}",
                    "--request-timeout=8s",
                ])
                .env("HOME", &dir)
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let file = kl.file("w.yaml", &CM.replace("cm1", "w1"));
    kl.ok(&["create", "-f", &file]);
    kl.ok(&["label", "cm", "w1", "x=y"]);
    kl.ok(&["delete", "cm", "w1"]);
    let out = watch.join().unwrap();
    let events = String::from_utf8_lossy(&out.stdout);
    let seen: Vec<&str> = events.lines().filter(|l| l.ends_with(" w1")).collect();
    assert_eq!(
        seen,
        vec!["ADDED w1", "MODIFIED w1", "DELETED w1"],
        "{events}"
    );

    // Paging: chunked lists return everything.
    for i in 0..7 {
        kl.ok(&[
            "create",
            "-f",
            &kl.file(
                &format!("p{i}.yaml"),
                &CM.replace("cm1", &format!("page{i}")),
            ),
        ]);
    }
    let names = kf.ok(&["get", "cm", "--chunk-size=2", "-o", "name"]);
    assert_eq!(names.lines().count(), 7, "{names}");

    // Namespaces: content lives and dies with them.
    let ns = kl.file(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-a\n",
    );
    assert_eq!(
        kl.ok(&["create", "-f", &ns]).trim(),
        "namespace/team-a created"
    );
    kl.ok(&["create", "-n", "team-a", "-f", &file]);
    assert!(kf.ok(&["get", "cm", "-A"]).contains("team-a"));
    let err = kl.fails(&["create", "-n", "nowhere", "-f", &file]);
    assert!(err.contains("namespaces \"nowhere\" not found"), "{err}");
    assert!(kl
        .ok(&["delete", "ns", "team-a"])
        .contains("namespace \"team-a\" deleted"));
    assert!(!kf.ok(&["get", "cm", "-A"]).contains("team-a"));
    let err = kl.fails(&["delete", "ns", "default"]);
    assert!(err.contains("this namespace may not be deleted"), "{err}");

    // The imperative generators send protobuf: namespaces, configmaps and secrets are read;
    // other kinds get a 415 that asks for JSON.
    assert_eq!(
        kf.ok(&["create", "namespace", "team-b"]).trim(),
        "namespace/team-b created"
    );
    assert_eq!(
        kf.ok(&[
            "create",
            "configmap",
            "settings",
            "-n",
            "team-b",
            "--from-literal=color=blue",
            "--from-literal=size=L"
        ])
        .trim(),
        "configmap/settings created"
    );
    assert_eq!(
        kf.ok(&[
            "get",
            "cm",
            "settings",
            "-n",
            "team-b",
            "-o",
            "jsonpath={.data.color}/{.data.size}"
        ]),
        "blue/L"
    );
    assert_eq!(
        kf.ok(&[
            "create",
            "secret",
            "generic",
            "creds",
            "-n",
            "team-b",
            "--from-literal=password=s3cret"
        ])
        .trim(),
        "secret/creds created"
    );
    assert_eq!(
        kf.ok(&[
            "get",
            "secret",
            "creds",
            "-n",
            "team-b",
            "-o",
            "jsonpath={.data.password}"
        ]),
        "czNjcmV0"
    );
    // The other imperative generators kubectl sends as protobuf.
    assert_eq!(
        kf.ok(&[
            "create",
            "deployment",
            "web",
            "--image=busybox:1.35",
            "--replicas=2",
            "--port=8080",
            "-n",
            "team-b",
            "--",
            "sleep",
            "600",
        ])
        .trim(),
        "deployment.apps/web created"
    );
    let d: serde_json::Value =
        serde_json::from_str(&kf.ok(&["get", "deploy", "web", "-n", "team-b", "-o", "json"]))
            .unwrap();
    assert_eq!(d["spec"]["replicas"], 2, "{d}");
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web", "{d}");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "busybox:1.35", "{d}");
    assert_eq!(c["command"], serde_json::json!(["sleep", "600"]), "{d}");
    assert_eq!(c["ports"][0]["containerPort"], 8080, "{d}");
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["app"], "web",
        "{d}"
    );
    assert_eq!(
        kf.ok(&[
            "create",
            "job",
            "once",
            "--image=busybox:1.35",
            "-n",
            "team-b",
            "--",
            "true"
        ])
        .trim(),
        "job.batch/once created"
    );
    let j: serde_json::Value =
        serde_json::from_str(&kf.ok(&["get", "job", "once", "-n", "team-b", "-o", "json"]))
            .unwrap();
    assert_eq!(
        j["spec"]["template"]["spec"]["restartPolicy"], "Never",
        "{j}"
    );
    assert_eq!(
        j["spec"]["template"]["spec"]["containers"][0]["command"],
        serde_json::json!(["true"]),
        "{j}"
    );
    assert_eq!(
        kf.ok(&["create", "serviceaccount", "robot", "-n", "team-b"])
            .trim(),
        "serviceaccount/robot created"
    );
    kl.ok(&["delete", "ns", "team-b"]);

    // Validation: a 422 with causes, printed as Kubernetes prints it.
    let bad = kl.file("bad.yaml", &CM.replace("cm1", "Bad_Name"));
    let err = kl.fails(&["create", "-f", &bad]);
    assert!(
        err.starts_with("The ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"),
        "{err}"
    );
    let unknown = kl.file("unknown.yaml", &format!("{CM}spec:\n  foo: 1\n"));
    let err = kl.fails(&["create", "-f", &unknown]);
    assert!(err.contains("unknown field \"spec\""), "{err}");
    assert_eq!(
        kf.ok(&["api-resources", "--api-group=", "-o", "name"])
            .lines()
            .filter(|l| *l == "configmaps")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_with_the_same_resource_version_have_exactly_one_winner() {
    let c = Cluster::start(3, &[]).await;
    let client = c.client();
    let api = |id: u64| c.replica(id).api();
    let body = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "race"}, "data": {"n": "0"}});
    wait_for(
        Duration::from_secs(10),
        "creating the configmap",
        || async {
            let resp = client
                .post_raw(
                    &api(1),
                    "/api/v1/namespaces/default/configmaps",
                    serde_json::to_vec(&body).unwrap(),
                    None,
                )
                .await
                .ok()?;
            (resp.status() == 201).then_some(())
        },
    )
    .await;
    let (_, text) = client
        .get_text(&api(2), "/api/v1/namespaces/default/configmaps/race")
        .await
        .unwrap();
    let current: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rv = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let server = api(i % 3 + 1);
        let mut obj = current.clone();
        // Every update changes something (a no-op update would rightly succeed).
        obj["data"]["n"] = serde_json::json!((i + 1).to_string());
        let rv = rv.clone();
        obj["metadata"]["resourceVersion"] = serde_json::json!(rv);
        tasks.push(tokio::spawn(async move {
            let req = http::Request::put(format!(
                "http://{server}/api/v1/namespaces/default/configmaps/race"
            ))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                serde_json::to_vec(&obj).unwrap(),
            )))
            .unwrap();
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            let resp = client.request(req).await.unwrap();
            resp.status().as_u16()
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes.sort();
    assert_eq!(
        codes,
        vec![200, 409, 409, 409, 409, 409],
        "exactly one stale-RV update wins"
    );
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  containers:\n  - name: c\n    image: nginx:1.25\n    ports: [{containerPort: 80}]\n";
const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels: {kubernetes.io/hostname: n1, node-role.kubernetes.io/worker: \"\"}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_nodes_default_validate_bind_once_and_keep_status_separate() {
    let c = Cluster::start(3, &[]).await;
    let (follower, leader) = follower_and_leader(&c).await;
    let kf = Kubectl::new(&c, follower);
    let kl = Kubectl::new(&c, leader);

    assert_eq!(
        kf.ok(&["create", "-f", &kf.file("pod.yaml", POD)]).trim(),
        "pod/web created"
    );
    assert_eq!(
        kl.ok(&["create", "-f", &kl.file("node.yaml", NODE)]).trim(),
        "node/n1 created"
    );
    let out = kl.ok(&["get", "po"]);
    assert!(
        out.starts_with("NAME   READY   STATUS    RESTARTS   AGE"),
        "{out}"
    );
    assert!(out.contains("web    0/1     Pending   0"), "{out}");
    let pod: serde_json::Value =
        serde_json::from_str(&kl.ok(&["get", "po", "web", "-o", "json"])).unwrap();
    assert_eq!(pod["spec"]["restartPolicy"], "Always");
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 30);
    assert_eq!(
        pod["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(pod["status"]["qosClass"], "BestEffort");
    assert_eq!(pod["metadata"]["generation"], 1);
    let node = kl.ok(&["get", "no", "n1"]);
    assert!(node.contains("n1     Unknown   worker"), "{node}");

    // Validation and immutability.
    let bad = kf.file("bad-pod.yaml", &POD.replace("    image: nginx:1.25\n", ""));
    let err = kf.fails(&["create", "-f", &bad]);
    assert!(
        err.contains("spec.containers[0].image: Required value"),
        "{err}"
    );
    let err = kf.fails(&[
        "patch",
        "po",
        "web",
        "-p",
        r#"{"spec":{"restartPolicy":"Never"}}"#,
    ]);
    assert!(
        err.contains("pod updates may not change fields other than"),
        "{err}"
    );
    // What kubectl set image sends: a strategic patch merging containers by name.
    assert_eq!(
        kf.ok(&["set", "image", "pod/web", "c=nginx:1.26"]).trim(),
        "pod/web image updated"
    );
    assert_eq!(
        kl.ok(&[
            "get",
            "po",
            "web",
            "-o",
            "jsonpath={.spec.containers[0].image} {.spec.containers[0].ports[0].containerPort}"
        ]),
        "nginx:1.26 80"
    );

    // Binding: once.
    let client = c.client_for(follower);
    let bind = |node: &str| {
        serde_json::to_vec(&serde_json::json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "web"}, "target": {"kind": "Node", "name": node}})).unwrap()
    };
    let path = "/api/v1/namespaces/default/pods/web/binding";
    let resp = client
        .post_raw(&c.replica(follower).api(), path, bind("n1"), None)
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client
        .post_raw(&c.replica(leader).api(), path, bind("n2"), None)
        .await
        .unwrap();
    assert_eq!(resp.status(), 409, "a bound pod cannot be bound again");
    let out = kl.ok(&[
        "get",
        "po",
        "-o",
        "wide",
        "--field-selector",
        "spec.nodeName=n1",
    ]);
    assert!(out.contains("web") && out.contains(" n1 "), "{out}");
    assert!(kl
        .ok(&["get", "po", "--field-selector", "spec.nodeName=n2"])
        .trim()
        .is_empty());

    // Status goes through the status subresource; the main resource ignores it.
    let status_patch = |body: &str| {
        Command::new(KUBECTL)
            .arg(format!("--server={}", kf.server))
            .arg(format!("--cache-dir={}", kf.cache.display()))
            .args([
                "patch",
                "po",
                "web",
                "--subresource=status",
                "--type=merge",
                "-p",
                body,
            ])
            .env("HOME", &kf.dir)
            .output()
            .unwrap()
    };
    assert!(status_patch(r#"{"status":{"phase":"Running"}}"#)
        .status
        .success());
    kf.ok(&[
        "patch",
        "po",
        "web",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Failed"}}"#,
    ]);
    assert_eq!(
        kl.ok(&["get", "po", "web", "-o", "jsonpath={.status.phase}"]),
        "Running"
    );
    let out = kl.ok(&["cordon", "n1"]);
    assert_eq!(out.trim(), "node/n1 cordoned");
    assert!(kl.ok(&["get", "no"]).contains("SchedulingDisabled"));
    let resources = kf.ok(&["api-resources"]);
    assert!(
        resources
            .lines()
            .any(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == ["pods", "po"]),
        "{resources}"
    );

    // Graceful deletion: a bound, running pod is marked Terminating and stays until its
    // node's agent confirms (here: a forced delete with grace 0, as the agent sends).
    assert_eq!(
        kf.ok(&["delete", "po", "web", "--wait=false"]).trim(),
        "pod \"web\" deleted"
    );
    assert_eq!(
        kl.ok(&[
            "get",
            "po",
            "web",
            "-o",
            "jsonpath={.metadata.deletionGracePeriodSeconds}"
        ]),
        "30"
    );
    assert!(kl.ok(&["get", "po", "web"]).contains("Terminating"));
    // A shorter grace period shortens it; a longer one does not lengthen it.
    kf.ok(&["delete", "po", "web", "--wait=false", "--grace-period=5"]);
    kf.ok(&["delete", "po", "web", "--wait=false", "--grace-period=60"]);
    assert_eq!(
        kl.ok(&[
            "get",
            "po",
            "web",
            "-o",
            "jsonpath={.metadata.deletionGracePeriodSeconds}"
        ]),
        "5"
    );
    kf.ok(&["delete", "po", "web", "--grace-period=0", "--force"]);
    let err = kl.fails(&["get", "po", "web"]);
    assert!(
        err.contains("Error from server (NotFound): pods \"web\" not found"),
        "{err}"
    );

    // Eviction (what kubectl drain sends): a running pod is deleted gracefully; a finished
    // one goes at once, so draining its node completes.
    let pod = |name: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: c\n    image: busybox\n")
    };
    for (name, phase) in [("live", "Running"), ("done", "Succeeded")] {
        let f = kf.file(&format!("{name}.yaml"), &pod(name));
        kf.ok(&["create", "-f", &f]);
        let body = serde_json::json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name}, "target": {"kind": "Node", "name": "n1"}});
        let resp = client
            .post_raw(
                &c.replica(follower).api(),
                &format!("/api/v1/namespaces/default/pods/{name}/binding"),
                serde_json::to_vec(&body).unwrap(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        kf.ok(&[
            "patch",
            "po",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(r#"{{"status":{{"phase":"{phase}"}}}}"#),
        ]);
    }
    let eviction = serde_json::json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "live", "namespace": "default"}, "deleteOptions": {}});
    let resp = client
        .post_raw(
            &c.replica(leader).api(),
            "/api/v1/namespaces/default/pods/live/eviction",
            serde_json::to_vec(&eviction).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert!(kl.ok(&["get", "po", "live"]).contains("Terminating"));
    kf.ok(&["delete", "po", "live", "--grace-period=0", "--force"]);
    let (ok, out, err) = kf.run(&[
        "drain",
        "n1",
        "--ignore-daemonsets",
        "--force",
        "--timeout=30s",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("pod/done evicted") && out.contains("node/n1 drained"),
        "{out}{err}"
    );
    kl.fails(&["get", "po", "done"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_services_and_events_work_with_kubectl() {
    let c = Cluster::start(3, &[]).await;
    let (follower, leader) = follower_and_leader(&c).await;
    let kf = Kubectl::new(&c, follower);
    let kl = Kubectl::new(&c, leader);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads.yaml");
    let out = kf.ok(&["apply", "-f", file]);
    assert_eq!(
        out.trim(),
        "deployment.apps/web created\nservice/web created\njob.batch/pi created"
    );
    assert_eq!(
        kf.ok(&["apply", "-f", file])
            .lines()
            .filter(|l| l.ends_with("unchanged"))
            .count(),
        3
    );
    let all = kl.ok(&["get", "all"]);
    for want in [
        "service/web",
        "ClusterIP",
        "deployment.apps/web",
        "0/3",
        "job.batch/pi",
        "Running",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
    // Defaults, the generated job selector, and describe.
    assert_eq!(
        kl.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.strategy.rollingUpdate.maxSurge} {.spec.revisionHistoryLimit} {.spec.template.spec.restartPolicy}"]),
        "25% 10 Always"
    );
    let job_uid = kl.ok(&["get", "job", "pi", "-o", "jsonpath={.metadata.uid}"]);
    assert_eq!(
        kl.ok(&[
            "get",
            "job",
            "pi",
            "-o",
            "jsonpath={.spec.selector.matchLabels.batch\\.kubernetes\\.io/controller-uid}"
        ]),
        job_uid
    );
    assert!(kf
        .ok(&["describe", "deploy", "web"])
        .contains("Replicas:               3 desired"));

    // scale goes through the scale subresource and bumps the generation.
    assert_eq!(
        kf.ok(&["scale", "deploy", "web", "--replicas=5"]).trim(),
        "deployment.apps/web scaled"
    );
    assert_eq!(
        kl.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas} {.metadata.generation}"
        ]),
        "5 2"
    );
    let err = kf.fails(&[
        "patch",
        "deploy",
        "web",
        "-p",
        r#"{"spec":{"selector":{"matchLabels":{"app":"other"}}}}"#,
    ]);
    assert!(
        err.contains("field is immutable") || err.contains("selector"),
        "{err}"
    );

    // Service addresses: allocated, unique, released on delete.
    let ip = kl.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(ip.starts_with("10."), "{ip}");
    let fixed = kf.file("fixed.yaml", &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: fixed}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"));
    let err = kf.fails(&["create", "-f", &fixed]);
    assert!(err.contains("provided IP is already allocated"), "{err}");
    kl.ok(&["delete", "svc", "web"]);
    assert_eq!(
        kf.ok(&["create", "-f", &fixed]).trim(),
        "service/fixed created"
    );
    let np = kf.file("np.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n");
    kf.ok(&["create", "-f", &np]);
    let ports = kl.ok(&[
        "get",
        "svc",
        "np",
        "-o",
        "jsonpath={.spec.ports[0].nodePort} {.spec.ports[0].targetPort}",
    ]);
    let node_port: i64 = ports.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        (30000..=32767).contains(&node_port) && ports.ends_with(" 8080"),
        "{ports}"
    );

    // Events, with the field selectors describe uses.
    let event = serde_json::json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "web.1"},
        "involvedObject": {"kind": "Deployment", "name": "web", "namespace": "default"},
        "reason": "ScalingReplicaSet", "message": "Scaled up", "type": "Normal",
        "lastTimestamp": flotilla::api::meta::rfc3339(flotilla::api::meta::now_secs()),
    });
    let resp = c
        .client_for(leader)
        .post_raw(
            &c.replica(leader).api(),
            "/api/v1/namespaces/default/events",
            serde_json::to_vec(&event).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let events = kf.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=web,involvedObject.kind=Deployment",
    ]);
    assert!(
        events.contains("ScalingReplicaSet") && events.contains("deployment/web"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_tracks_field_owners_and_detects_conflicts() {
    let c = Cluster::start(3, &[]).await;
    let (follower, leader) = follower_and_leader(&c).await;
    let kf = Kubectl::new(&c, follower);
    let kl = Kubectl::new(&c, leader);
    let cm = |data: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  labels: {{team: a}}\ndata:\n{data}")
    };
    let file = kf.file("ssa.yaml", &cm("  a: \"1\"\n  b: \"2\"\n"));
    assert_eq!(
        kf.ok(&["apply", "--server-side", "-f", &file]).trim(),
        "configmap/ssa serverside-applied"
    );
    let owners = kl.ok(&[
        "get",
        "cm",
        "ssa",
        "--show-managed-fields",
        "-o",
        "jsonpath={range .metadata.managedFields[*]}{.manager}/{.operation} {end}",
    ]);
    assert_eq!(owners.trim(), "kubectl/Apply");

    // Another writer changes a field the applier owns: the next apply conflicts, with the
    // Go server's message, and changes nothing.
    kl.ok(&[
        "patch",
        "cm",
        "ssa",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"changed"}}"#,
    ]);
    let err = kf.fails(&["apply", "--server-side", "-f", &file]);
    assert!(
        err.contains(
            r#"Apply failed with 1 conflict: conflict with "kubectl-patch" using v1: .data.a"#
        ),
        "{err}"
    );
    assert_eq!(
        kl.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data.a}"]),
        "changed"
    );

    // --force-conflicts takes the field back.
    kf.ok(&["apply", "--server-side", "--force-conflicts", "-f", &file]);
    assert_eq!(
        kl.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data.a}"]),
        "1"
    );
    let owners = kl.ok(&[
        "get",
        "cm",
        "ssa",
        "--show-managed-fields",
        "-o",
        "jsonpath={range .metadata.managedFields[*]}{.manager}/{.operation} {end}",
    ]);
    assert_eq!(
        owners.trim(),
        "kubectl/Apply",
        "kubectl-patch owned only .data.a"
    );

    // A second manager adds its own field; the first stops specifying `b` and the label:
    // they go, while the second manager's field stays.
    let other = kf.file(
        "other.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  c: \"3\"\n",
    );
    kl.ok(&[
        "apply",
        "--server-side",
        "--field-manager=other",
        "-f",
        &other,
    ]);
    std::fs::write(
        &file,
        cm("  a: \"1\"\n").replace("  labels: {team: a}\n", ""),
    )
    .unwrap();
    kf.ok(&["apply", "--server-side", "-f", &file]);
    assert_eq!(
        kl.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data}"]),
        r#"{"a":"1","c":"3"}"#
    );
    assert_eq!(
        kl.ok(&["get", "cm", "ssa", "-o", "jsonpath={.metadata.labels}"]),
        ""
    );

    // Keyed lists are owned item by item: two managers apply different containers of one
    // deployment, and a change to the other's container conflicts.
    let dep = |name: &str, image: &str| {
        format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: {name}\n        image: {image}\n")
    };
    let one = kf.file("one.yaml", &dep("main", "nginx:1.25"));
    let two = kf.file("two.yaml", &dep("sidecar", "envoy:1"));
    kf.ok(&["apply", "--server-side", "--field-manager=one", "-f", &one]);
    kf.ok(&["apply", "--server-side", "--field-manager=two", "-f", &two]);
    assert_eq!(
        kl.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[*].name}"
        ]),
        "sidecar main"
    );
    let clash = kf.file("clash.yaml", &dep("main", "nginx:1.26"));
    let err = kf.fails(&[
        "apply",
        "--server-side",
        "--field-manager=two",
        "-f",
        &clash,
    ]);
    assert!(
        err.contains(r#"conflict with "one": .spec.template.spec.containers[name="main"].image"#),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sorts_names_json_patches_waits_and_deletes_by_selector() {
    let c = Cluster::start(3, &[]).await;
    let (follower, leader) = follower_and_leader(&c).await;
    let kf = Kubectl::new(&c, follower);
    let kl = Kubectl::new(&c, leader);
    wait_for(Duration::from_secs(10), "the default namespace", || async {
        kl.run(&["get", "ns", "default"]).0.then_some(())
    })
    .await;

    // The version dispatcher at /usr/bin/kubectl picks kubectl 1.32 from our /version.
    let out = Command::new("/usr/bin/kubectl")
        .arg(format!("--server={}", kf.server))
        .arg(format!("--cache-dir={}", kf.cache.display()))
        .args(["get", "ns", "kube-system", "-o", "name"])
        .env("HOME", &kf.dir)
        .output()
        .expect("/usr/bin/kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "namespace/kube-system"
    );

    let docs: String = ["b", "c", "a"]
        .iter()
        .map(|n| {
            let tier = if *n == "c" { "cache" } else { "web" };
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {n}\n  labels: {{tier: {tier}}}\ndata:\n  k: \"{n}\"\n---\n")
        })
        .collect();
    let file = kf.file("three.yaml", &docs);
    kf.ok(&["create", "-f", &file]);
    assert_eq!(
        kl.ok(&["get", "cm", "-l", "tier", "--sort-by=.data.k", "-o", "name"]),
        "configmap/a\nconfigmap/b\nconfigmap/c\n"
    );
    let sorted = kl.ok(&[
        "get",
        "cm",
        "-l",
        "tier",
        "--sort-by=.metadata.labels.tier",
        "--no-headers",
    ]);
    assert!(sorted.starts_with("c "), "{sorted}");

    // JSON patch, and one that does not apply: 422, nothing changed.
    kf.ok(&["patch", "cm", "a", "--type=json", "-p", r#"[{"op":"replace","path":"/data/k","value":"x"},{"op":"add","path":"/data/n","value":"1"}]"#]);
    assert_eq!(
        kl.ok(&["get", "cm", "a", "-o", "jsonpath={.data}"]),
        r#"{"k":"x","n":"1"}"#
    );
    let err = kf.fails(&[
        "patch",
        "cm",
        "a",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/data/z","value":"1"},{"op":"remove","path":"/data/missing"}]"#,
    ]);
    assert!(
        err.contains("The request is invalid") && err.contains("/data/missing"),
        "{err}"
    );
    assert_eq!(
        kl.ok(&["get", "cm", "a", "-o", "jsonpath={.data}"]),
        r#"{"k":"x","n":"1"}"#
    );

    // Delete by selector, then wait --for=delete on a pod in graceful deletion.
    assert_eq!(
        kf.ok(&["delete", "cm", "-l", "tier=web"]).trim(),
        "configmap \"a\" deleted\nconfigmap \"b\" deleted"
    );
    assert_eq!(
        kl.ok(&["get", "cm", "-l", "tier", "-o", "name"]),
        "configmap/c\n"
    );
    let pod = kf.file("p.yaml", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: slow\nspec:\n  containers:\n  - name: c\n    image: busybox\n");
    kf.ok(&["create", "-f", &pod]);
    let bind = serde_json::json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "slow"}, "target": {"kind": "Node", "name": "n1"}});
    let resp = c
        .client_for(leader)
        .post_raw(
            &c.replica(leader).api(),
            "/api/v1/namespaces/default/pods/slow/binding",
            serde_json::to_vec(&bind).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    kf.ok(&["delete", "po", "slow", "--wait=false"]);
    // Open watches on the waiter's replica: the force delete below waits until the
    // waiter's own watch is open, so it sees the deletion happen (started after it, kubectl
    // would find no pod and print nothing).
    let api = c.replica(follower).api();
    let metrics = flotilla::client::Client::new(vec![api.clone()], Duration::from_secs(5));
    let open_watches = || async {
        let (_, text) = metrics.get_text(&api, "/metrics").await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("flotilla_api_watches_open "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let before = wait_for(
        Duration::from_secs(10),
        "the open watch count",
        open_watches,
    )
    .await;
    let waiter = {
        let server = kf.server.clone();
        let cache = c.dir.path().join("kube-cache-wait");
        let home = kf.dir.clone();
        std::thread::spawn(move || {
            Command::new(KUBECTL)
                .arg(format!("--server={server}"))
                .arg(format!("--cache-dir={}", cache.display()))
                .args(["wait", "--for=delete", "pod/slow", "--timeout=30s"])
                .env("HOME", home)
                .output()
                .unwrap()
        })
    };
    // The pod is still there (Terminating) while the waiter waits; the agent's final
    // delete (grace 0) releases it.
    assert!(kl.ok(&["get", "po", "slow"]).contains("Terminating"));
    wait_for(
        Duration::from_secs(20),
        "kubectl wait's watch to open",
        || async { open_watches().await.filter(|n| *n > before) },
    )
    .await;
    kl.ok(&["delete", "po", "slow", "--grace-period=0", "--force"]);
    let out = waiter.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pod/slow condition met"));

    // delete --all and delete -f.
    kf.ok(&["delete", "cm", "c"]);
    kf.ok(&["create", "-f", &file]);
    kf.fails(&["create", "-f", &file]);
    assert_eq!(kf.ok(&["delete", "-f", &file]).lines().count(), 3);
    kf.ok(&["create", "-f", &file]);
    assert_eq!(
        kf.ok(&["delete", "cm", "--all"])
            .lines()
            .filter(|l| l.ends_with("deleted"))
            .count(),
        3
    );
    assert!(kl.ok(&["get", "cm", "-l", "tier", "-o", "name"]).is_empty());

    // uncordon undoes cordon.
    let node = kf.file(
        "n.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n9\n",
    );
    kf.ok(&["create", "-f", &node]);
    assert_eq!(kf.ok(&["cordon", "n9"]).trim(), "node/n9 cordoned");
    assert_eq!(kf.ok(&["uncordon", "n9"]).trim(), "node/n9 uncordoned");
    assert_eq!(
        kl.ok(&["get", "no", "n9", "-o", "jsonpath={.spec.unschedulable}"]),
        ""
    );
}
