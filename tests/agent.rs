//! The node agent (`flotilla agent`, process runtime) against a real three-replica cluster,
//! with the real controllers and scheduler and kubectl 1.32: registration, heartbeats, pods
//! run as processes with their environment, restarts, Jobs, graceful deletion, and a watch
//! that fails over when the agent's replica is killed.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::Value;

fn kubectl(c: &Cluster, id: u64, args: &[&str]) -> String {
    Kubectl::new(c, id).ok(args)
}

/// The pods of `default` labelled `app=<app>`, not terminating.
async fn live_pods(c: &Cluster, id: u64, app: &str) -> Vec<Value> {
    let (s, list) = kube_get(
        c,
        id,
        &format!("/api/v1/namespaces/default/pods?labelSelector=app%3D{app}"),
    )
    .await;
    if s != 200 {
        return Vec::new();
    }
    list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect()
}

fn pid_of(p: &Value) -> Option<i32> {
    p["status"]["containerStatuses"][0]["containerID"]
        .as_str()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive: the agent reaps its children.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_registers_runs_pods_restarts_them_and_fails_over() {
    let mut c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let data = c.dir.path().join("agent-a1");
    let _agent = Agent::start(
        &c,
        "a1",
        &data,
        &["--labels", "disk=ssd", "--reserved", "cpu=100m,memory=64Mi"],
    );

    // Registration: a Ready node describing the machine, with the agent's endpoint.
    let node = wait_for(Duration::from_secs(30), "node a1 to be Ready", || async {
        let (s, n) = kube_get(&c, 2, "/api/v1/nodes/a1").await;
        let ready = n["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|x| x["type"] == "Ready" && x["status"] == "True")
        });
        (s == 200 && ready).then_some(n)
    })
    .await;
    assert_eq!(node["metadata"]["labels"]["disk"], "ssd");
    assert_eq!(node["metadata"]["labels"]["kubernetes.io/os"], "linux");
    assert_eq!(node["status"]["nodeInfo"]["operatingSystem"], "linux");
    let cpus: i64 = node["status"]["capacity"]["cpu"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cpus >= 1);
    // Allocatable is capacity less what --reserved keeps back.
    assert_eq!(
        node["status"]["allocatable"]["cpu"],
        format!("{}m", cpus * 1000 - 100)
    );
    let kib: i64 = node["status"]["capacity"]["memory"]
        .as_str()
        .unwrap()
        .trim_end_matches("Ki")
        .parse()
        .unwrap();
    assert_eq!(
        node["status"]["allocatable"]["memory"],
        (kib * 1024 - 64 * 1024 * 1024).to_string()
    );
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap();
    assert!(port > 0);
    let health = flotilla::client::Client::new(vec![], Duration::from_secs(5))
        .get_text(&format!("127.0.0.1:{port}"), "/healthz")
        .await
        .unwrap();
    assert_eq!(health.0, 200);
    let ready = wait_for(Duration::from_secs(10), "the agent to be ready", || async {
        let r = flotilla::client::Client::new(vec![], Duration::from_secs(5))
            .get_text(&format!("127.0.0.1:{port}"), "/readyz")
            .await
            .ok()?;
        (r.0 == 200).then_some(r.1)
    })
    .await;
    assert_eq!(ready, "ok\n");
    // Heartbeats: the Lease is renewed.
    let renew = |v: &Value| v["spec"]["renewTime"].as_str().unwrap_or("").to_string();
    let first = wait_for(Duration::from_secs(10), "the node's Lease", || async {
        let (s, l) = kube_get(
            &c,
            2,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/a1",
        )
        .await;
        (s == 200).then(|| renew(&l))
    })
    .await;
    wait_for(
        Duration::from_secs(10),
        "the Lease to be renewed",
        || async {
            let (_, l) = kube_get(
                &c,
                2,
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/a1",
            )
            .await;
            (renew(&l) != first).then_some(())
        },
    )
    .await;

    // A Deployment: its pods run as processes, with their environment.
    let web = c.dir.path().join("web.yaml");
    std::fs::write(
        &web,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - name: c\n        image: busybox\n        command: [\"sh\", \"-c\", \"echo hello from $(MY_NAME) on $MY_NODE; exec sleep 300\"]\n        env:\n        - name: MY_NAME\n          valueFrom:\n            fieldRef:\n              fieldPath: metadata.name\n        - name: MY_NODE\n          valueFrom:\n            fieldRef:\n              fieldPath: spec.nodeName\n",
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", web.to_str().unwrap()]);
    let out = kubectl(&c, 2, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    let running = live_pods(&c, 2, "web").await;
    assert_eq!(running.len(), 2);
    let mut pids = Vec::new();
    for p in &running {
        assert_eq!(p["status"]["phase"], "Running", "{p}");
        assert_eq!(p["spec"]["nodeName"], "a1");
        let pid = pid_of(p).expect("a process container ID");
        assert!(alive(pid), "pid {pid} runs");
        pids.push(pid);
        // `kubectl logs` reads the output through the API server, from the agent.
        let name = p["metadata"]["name"].as_str().unwrap().to_string();
        let text = wait_for(
            Duration::from_secs(10),
            "the container's output",
            || async {
                let out = kubectl(&c, 3, &["logs", &name]);
                (!out.is_empty()).then_some(out)
            },
        )
        .await;
        assert_eq!(text, format!("hello from {name} on a1\n"));
    }
    let stamped = kubectl(&c, 2, &["logs", "deploy/web", "--tail=1", "--timestamps"]);
    assert!(
        stamped.starts_with("20")
            && stamped.contains("Z hello from web-")
            && stamped.trim_end().ends_with("on a1"),
        "{stamped}"
    );
    // A followed log stays open and sends what is there.
    let pod_name = running[0]["metadata"]["name"].as_str().unwrap();
    let follow = flotilla::client::Client::new(vec![], Duration::from_secs(5))
        .get_stream(
            &c.replica(2).api(),
            &format!("/api/v1/namespaces/default/pods/{pod_name}/log?follow=true"),
        )
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    let mut body = follow.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("a first chunk")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("hello from"));
    drop(body);

    // A crashing container is restarted (restartPolicy Always) and its count goes up.
    let crash = c.dir.path().join("crash.yaml");
    std::fs::write(
        &crash,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: crash\n  labels:\n    app: crash\nspec:\n  containers:\n  - name: c\n    image: busybox\n    command: [\"sh\", \"-c\", \"exit 3\"]\n",
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", crash.to_str().unwrap()]);
    let crashed = wait_for(
        Duration::from_secs(40),
        "the crashing container to be restarted",
        || async {
            let ps = live_pods(&c, 2, "crash").await;
            ps.into_iter()
                .find(|p| p["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(1))
        },
    )
    .await;
    assert_eq!(crashed["status"]["phase"], "Running");

    // Probes: an exec readiness probe keeps a running pod unready until its file exists; a
    // failing liveness probe kills the container, which then waits out its back-off.
    let probes = c.dir.path().join("probes.yaml");
    std::fs::write(
        &probes,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: probed\n  labels:\n    app: probed\nspec:\n  containers:\n  - name: c\n    image: busybox\n    command: [\"sh\", \"-c\", \"sleep 3; touch ready; exec sleep 300\"]\n    readinessProbe:\n      exec:\n        command: [\"test\", \"-f\", \"ready\"]\n      periodSeconds: 1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: unhealthy\n  labels:\n    app: unhealthy\nspec:\n  containers:\n  - name: c\n    image: busybox\n    command: [\"sleep\", \"300\"]\n    livenessProbe:\n      tcpSocket:\n        port: 1\n      periodSeconds: 1\n      failureThreshold: 2\n",
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", probes.to_str().unwrap()]);
    let pod_ready = |p: &Value| {
        p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|x| x["type"] == "Ready" && x["status"] == "True")
        })
    };
    wait_for(
        Duration::from_secs(20),
        "probed to run, not yet ready",
        || async {
            let ps = live_pods(&c, 2, "probed").await;
            ps.first()
                .filter(|p| p["status"]["phase"] == "Running" && !pod_ready(p))
                .map(|_| ())
        },
    )
    .await;
    wait_for(Duration::from_secs(20), "probed to turn ready", || async {
        let ps = live_pods(&c, 2, "probed").await;
        ps.first().filter(|p| pod_ready(p)).map(|_| ())
    })
    .await;
    let killed = wait_for(
        Duration::from_secs(20),
        "the liveness probe to kill its container",
        || async {
            let ps = live_pods(&c, 2, "unhealthy").await;
            ps.into_iter().find(|p| {
                p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                    == "CrashLoopBackOff"
            })
        },
    )
    .await;
    assert!(!pod_ready(&killed));
    // The agent's events show in `kubectl describe`.
    let described = wait_for(Duration::from_secs(10), "the agent's events", || async {
        let out = kubectl(&c, 2, &["describe", "pod", "unhealthy"]);
        (out.contains("Liveness probe failed")
            && out.contains("failed liveness probe, will be restarted"))
        .then_some(out)
    })
    .await;
    assert!(described.contains("Started container c"), "{described}");
    assert!(described.contains("Unhealthy"), "{described}");
    let crashing = kubectl(&c, 2, &["describe", "pod", "crash"]);
    assert!(
        crashing.contains("Back-off restarting failed container c"),
        "{crashing}"
    );
    kubectl(
        &c,
        2,
        &["delete", "pod", "probed", "unhealthy", "--wait=false"],
    );

    // Environment from ConfigMaps, Secrets and resources; a missing ConfigMap holds the
    // container in CreateContainerConfigError until it appears.
    let envy = c.dir.path().join("envy.yaml");
    std::fs::write(
        &envy,
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  color: blue
  size: L
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
stringData:
  password: s3cret
---
apiVersion: v1
kind: Pod
metadata:
  name: envy
  labels:
    app: envy
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: busybox
    command: ["sh", "-c", "echo $COLOR $PASSWORD $CFG_size $MEM_MI $LATER"]
    resources:
      limits:
        memory: 64Mi
    envFrom:
    - prefix: CFG_
      configMapRef:
        name: settings
    env:
    - name: COLOR
      valueFrom:
        configMapKeyRef:
          name: settings
          key: color
    - name: PASSWORD
      valueFrom:
        secretKeyRef:
          name: creds
          key: password
    - name: MEM_MI
      valueFrom:
        resourceFieldRef:
          resource: limits.memory
          divisor: 1Mi
    - name: LATER
      valueFrom:
        configMapKeyRef:
          name: later
          key: x
"#,
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", envy.to_str().unwrap()]);
    let waiting = wait_for(
        Duration::from_secs(20),
        "envy to wait for its ConfigMap",
        || async {
            let ps = live_pods(&c, 2, "envy").await;
            ps.into_iter().find(|p| {
                p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                    == "CreateContainerConfigError"
            })
        },
    )
    .await;
    let message = waiting["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("later"), "{message}");
    let later = c.dir.path().join("later.yaml");
    std::fs::write(
        &later,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: later\ndata:\n  x: here\n",
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", later.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(20),
        "envy to run to completion",
        || async {
            let ps = live_pods(&c, 2, "envy").await;
            ps.first()
                .filter(|p| p["status"]["phase"] == "Succeeded")
                .map(|_| ())
        },
    )
    .await;
    assert_eq!(kubectl(&c, 2, &["logs", "envy"]), "blue s3cret L 64 here\n");

    // Resource limits: enforced through the container's cgroups; a container that outgrows
    // its memory limit is OOM-killed.
    let limited = c.dir.path().join("limited.yaml");
    std::fs::write(
        &limited,
        r#"apiVersion: v1
kind: Pod
metadata:
  name: limited
  labels:
    app: limited
spec:
  containers:
  - name: c
    image: busybox
    command: ["sleep", "300"]
    resources:
      limits:
        cpu: 250m
        memory: 64Mi
---
apiVersion: v1
kind: Pod
metadata:
  name: hog
  labels:
    app: hog
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: busybox
    command: ["python3", "-c", "import time; b = bytearray(512 * 1024 * 1024); time.sleep(30)"]
    resources:
      limits:
        memory: 64Mi
"#,
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", limited.to_str().unwrap()]);
    let lim = wait_for(
        Duration::from_secs(20),
        "the limited pod to run",
        || async {
            live_pods(&c, 2, "limited")
                .await
                .into_iter()
                .find(|p| p["status"]["phase"] == "Running")
        },
    )
    .await;
    let uid = lim["metadata"]["uid"].as_str().unwrap().to_string();
    let lim_pid = pid_of(&lim).unwrap();
    let cg = |controller: &str| {
        std::path::PathBuf::from(format!("/sys/fs/cgroup/{controller}/flotilla/a1/{uid}/c"))
    };
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(read(cg("memory").join("memory.limit_in_bytes")), "67108864");
    assert_eq!(read(cg("cpu").join("cpu.cfs_quota_us")), "25000");
    assert!(
        read(cg("memory").join("cgroup.procs"))
            .lines()
            .any(|l| l == lim_pid.to_string()),
        "the container runs in its cgroup"
    );
    let hog = wait_for(
        Duration::from_secs(30),
        "the hog to be OOM-killed",
        || async {
            live_pods(&c, 2, "hog")
                .await
                .into_iter()
                .find(|p| p["status"]["phase"] == "Failed")
        },
    )
    .await;
    assert_eq!(
        hog["status"]["containerStatuses"][0]["state"]["terminated"]["reason"], "OOMKilled",
        "{hog}"
    );
    kubectl(&c, 2, &["delete", "pod", "limited", "hog"]);
    wait_for(
        Duration::from_secs(20),
        "the limited pod's cgroups to be removed",
        || async { (!cg("memory").exists() && !cg("cpu").exists()).then_some(()) },
    )
    .await;

    // Jobs: one that succeeds completes; one that fails with backoffLimit 0 fails.
    let jobs = c.dir.path().join("jobs.yaml");
    std::fs::write(
        &jobs,
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: ok\nspec:\n  completions: 2\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: c\n        image: busybox\n        command: [\"true\"]\n---\napiVersion: batch/v1\nkind: Job\nmetadata:\n  name: bad\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: c\n        image: busybox\n        command: [\"false\"]\n",
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", jobs.to_str().unwrap()]);
    let out = kubectl(
        &c,
        2,
        &[
            "wait",
            "--for=condition=complete",
            "job/ok",
            "--timeout=60s",
        ],
    );
    assert!(out.contains("condition met"), "{out}");
    let out = kubectl(
        &c,
        2,
        &["wait", "--for=condition=failed", "job/bad", "--timeout=60s"],
    );
    assert!(out.contains("condition met"), "{out}");

    // The agent's replica (the first it was given) dies: the agent fails over and runs a
    // new pod; nothing already running is started twice.
    c.kill(1);
    c.wait_leader().await;
    kubectl(&c, 2, &["scale", "deploy/web", "--replicas=3"]);
    let three = wait_for(
        Duration::from_secs(60),
        "three web pods running after the failover",
        || async {
            let ps = live_pods(&c, 2, "web").await;
            (ps.len() == 3 && ps.iter().all(|p| p["status"]["phase"] == "Running")).then_some(ps)
        },
    )
    .await;
    let now_pids: Vec<i32> = three.iter().filter_map(pid_of).collect();
    for pid in &pids {
        assert!(
            now_pids.contains(pid),
            "the first pods kept their processes"
        );
    }
    let mut all = now_pids.clone();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 3);

    // The agent's metrics: lint-clean, and counting what happened.
    let (code, text) = flotilla::client::Client::new(vec![], Duration::from_secs(5))
        .get_text(&format!("127.0.0.1:{port}"), "/metrics")
        .await
        .unwrap();
    assert_eq!(code, 200);
    let value = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        value("flotilla_agent_container_starts_total{result=\"ok\"}") >= 5.0,
        "{text}"
    );
    assert!(
        value("flotilla_agent_container_exits_total{reason=\"OOMKilled\"}") >= 1.0,
        "{text}"
    );
    assert!(
        value("flotilla_agent_probes_total{probe=\"liveness\",result=\"failure\"}") >= 2.0,
        "{text}"
    );
    assert!(
        value("flotilla_agent_lease_renewals_total{result=\"ok\"}") >= 1.0,
        "{text}"
    );
    assert!(
        value("flotilla_agent_watch_restarts_total") >= 1.0,
        "the killed replica's watch: {text}"
    );
    assert!(value("flotilla_agent_pods") >= 3.0, "{text}");
    assert!(
        value("flotilla_agent_containers{state=\"running\"}") >= 3.0,
        "{text}"
    );
    assert!(
        value("flotilla_agent_runtime_operation_seconds_count{operation=\"start\"}") >= 5.0,
        "{text}"
    );
    assert!(
        value("flotilla_agent_lease_renew_seconds_count") >= 1.0,
        "{text}"
    );
    assert!(
        value("flotilla_agent_api_failovers_total") >= 1.0,
        "the killed replica: {text}"
    );
    assert_eq!(
        value("flotilla_agent_api_server{"),
        1.0,
        "one replica in use: {text}"
    );
    // Containers' resource use, from the runtime, on the kubelet's `/metrics/resource`
    // (per-object labels stay out of `/metrics`); the web pods run, so memory is never 0.
    assert!(
        !text.contains("pod=\""),
        "no per-pod labels in /metrics: {text}"
    );
    let resource = wait_for(
        Duration::from_secs(30),
        "per-container resource metrics",
        || async {
            let (code, text) = flotilla::client::Client::new(vec![], Duration::from_secs(5))
                .get_text(&format!("127.0.0.1:{port}"), "/metrics/resource")
                .await
                .ok()?;
            (code == 200 && text.contains("container_cpu_usage_seconds_total{")).then_some(text)
        },
    )
    .await;
    let memory: f64 = resource
        .lines()
        .filter(|l| l.starts_with("container_memory_working_set_bytes{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(memory > 0.0, "{resource}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Deleting the Deployment stops its processes and the pods go.
    kubectl(&c, 2, &["delete", "deploy/web", "--timeout=60s"]);
    wait_for(
        Duration::from_secs(60),
        "the web pods and their processes to be gone",
        || async {
            let left = {
                let (_, list) = kube_get(
                    &c,
                    2,
                    "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb",
                )
                .await;
                list["items"].as_array().map_or(usize::MAX, Vec::len)
            };
            (left == 0 && now_pids.iter().all(|p| !alive(*p))).then_some(())
        },
    )
    .await;
}

/// A tmpfs mounted for a test, unmounted however the test ends.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn node_condition(n: &Value, kind: &str) -> String {
    n["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

fn tainted(n: &Value, key: &str) -> bool {
    n["spec"]["taints"].as_array().is_some_and(|ts| {
        ts.iter()
            .any(|t| t["key"] == key && t["effect"] == "NoSchedule")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_as_disk_pressure_and_taints_the_node() {
    let c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let disk = c.dir.path().join("small-disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs (tests run as root)");
    let _tmpfs = Tmpfs(disk.clone());
    let _agent = Agent::start(&c, "d1", &disk.join("agent"), &[]);
    let node = || async { kube_get(&c, 2, "/api/v1/nodes/d1").await.1 };
    wait_for(
        Duration::from_secs(30),
        "d1 Ready without disk pressure",
        || async {
            let n = node().await;
            (node_condition(&n, "Ready") == "True" && node_condition(&n, "DiskPressure") == "False")
                .then_some(())
        },
    )
    .await;
    // Fill the disk past 90%.
    std::fs::write(disk.join("ballast"), vec![0u8; 7_800_000]).unwrap();
    wait_for(
        Duration::from_secs(30),
        "DiskPressure and its taint",
        || async {
            let n = node().await;
            (node_condition(&n, "DiskPressure") == "True"
                && tainted(&n, "node.kubernetes.io/disk-pressure"))
            .then_some(())
        },
    )
    .await;
    std::fs::remove_file(disk.join("ballast")).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the pressure and the taint to clear",
        || async {
            let n = node().await;
            (node_condition(&n, "DiskPressure") == "False"
                && !tainted(&n, "node.kubernetes.io/disk-pressure"))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_its_replica_fails_over_and_keeps_running_pods() {
    let c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let data = c.dir.path().join("agent-p1");
    let _agent = Agent::start(&c, "p1", &data, &[]);
    let running = |name: &'static str| {
        let c = &c;
        async move {
            wait_for(
                Duration::from_secs(60),
                &format!("pod {name} to run"),
                || async {
                    let (_, p) =
                        kube_get(c, 2, &format!("/api/v1/namespaces/default/pods/{name}")).await;
                    (p["status"]["phase"] == "Running").then_some(p)
                },
            )
            .await
        }
    };
    let pod = |name: &str| {
        let f = c.dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &f,
            format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: busybox\n    command: [\"sleep\", \"300\"]\n"),
        )
        .unwrap();
        kubectl(&c, 2, &["apply", "-f", f.to_str().unwrap()]);
    };
    pod("before");
    let before = running("before").await;
    // The agent starts on the first replica it was given; iptables cuts it off from there.
    let cut = c.cut_off_local_clients(1);
    pod("after");
    let after = running("after").await;
    assert_eq!(after["spec"]["nodeName"], "p1");
    // The first pod kept its process (nothing started twice) and the node stays Ready.
    let (_, now) = kube_get(&c, 2, "/api/v1/namespaces/default/pods/before").await;
    assert_eq!(pid_of(&now), pid_of(&before));
    assert!(alive(pid_of(&now).unwrap()));
    let (_, node) = kube_get(&c, 2, "/api/v1/nodes/p1").await;
    let ready = node["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|x| x["type"] == "Ready" && x["status"] == "True")
    });
    assert!(ready, "{node}");
    drop(cut);
    kubectl(&c, 2, &["delete", "pod", "before", "after"]);
}

/// The pod `name` of `default` as replica 2 serves it.
async fn pod(c: &Cluster, name: &str) -> Value {
    kube_get(c, 2, &format!("/api/v1/namespaces/default/pods/{name}"))
        .await
        .1
}

fn restarts(p: &Value) -> u64 {
    p["status"]["containerStatuses"][0]["restartCount"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_its_pods_and_removes_the_ones_deleted_meanwhile() {
    let c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let data = c.dir.path().join("agent-r1");
    let mut first = Agent::start(&c, "r1", &data, &[]);
    let manifest = c.dir.path().join("pods.yaml");
    let spec = |name: &str, script: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: busybox\n    command: [\"sh\", \"-c\", {script:?}]\n    readinessProbe:\n      exec:\n        command: [\"true\"]\n      periodSeconds: 1\n")
    };
    std::fs::write(
        &manifest,
        [
            spec(
                "steady",
                "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done",
            ),
            spec("gone", "exec sleep 300"),
            spec("crasher", "echo run-output; exit 3"),
        ]
        .join("---\n"),
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", manifest.to_str().unwrap()]);
    let ready = |p: &Value| {
        p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|x| x["type"] == "Ready" && x["status"] == "True")
        })
    };
    let steady = wait_for(
        Duration::from_secs(60),
        "pods steady and gone to run and be ready",
        || async {
            let (s, g) = (pod(&c, "steady").await, pod(&c, "gone").await);
            (ready(&s) && ready(&g)).then_some(s)
        },
    )
    .await;
    let steady_pid = pid_of(&steady).expect("a process container id");
    let gone_pid = pid_of(&pod(&c, "gone").await).expect("a process container id");

    // One log per run: `--previous` shows the crashed run's output.
    wait_for(
        Duration::from_secs(60),
        "the crasher to restart",
        || async { (restarts(&pod(&c, "crasher").await) >= 1).then_some(()) },
    )
    .await;
    let previous = kubectl(&c, 2, &["logs", "crasher", "--previous"]);
    assert_eq!(previous, "run-output\n");
    let (ok, _, err) = Kubectl::new(&c, 2).run(&["logs", "steady", "--previous"]);
    assert!(
        !ok && err.contains("previous terminated container"),
        "{err}"
    );
    // `--since`: everything in the last hour; nothing after a time to come.
    assert!(kubectl(&c, 2, &["logs", "steady", "--since=1h"]).contains("tick 0\n"));
    let future = "2099-01-01T00:00:00Z";
    assert_eq!(
        kubectl(
            &c,
            2,
            &["logs", "steady", &format!("--since-time={future}")]
        ),
        ""
    );

    // The agent dies; its containers do not, and go on logging.
    let endpoint = |n: &Value| n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64();
    let first_port = endpoint(&kube_get(&c, 2, "/api/v1/nodes/r1").await.1);
    first.kill9();
    assert!(
        alive(steady_pid) && alive(gone_pid),
        "the containers outlive the agent"
    );
    let ticks = || {
        let log = std::fs::read_dir(data.join("pods"))
            .unwrap()
            .flatten()
            .find(|d| {
                d.file_name()
                    .to_string_lossy()
                    .starts_with("default_steady_")
            })
            .map(|d| std::fs::read_to_string(d.path().join("c/0.log")).unwrap_or_default())
            .unwrap_or_default();
        log.lines().filter(|l| l.contains(" tick ")).count()
    };
    let before = ticks();
    wait_for(
        Duration::from_secs(30),
        "the container's output to be logged with the agent down",
        || async { (ticks() > before + 2).then_some(()) },
    )
    .await;
    // Meanwhile `gone` is deleted for good (no agent to wait for).
    kubectl(
        &c,
        2,
        &["delete", "pod", "gone", "--grace-period=0", "--force"],
    );

    let _second = Agent::start(&c, "r1", &data, &[]);
    // `gone`'s process and directory go; `steady` keeps its process, count and readiness.
    wait_for(
        Duration::from_secs(60),
        "the restarted agent to stop the pod deleted while it was down",
        || async {
            let dir_left = std::fs::read_dir(data.join("pods"))
                .unwrap()
                .flatten()
                .any(|d| d.file_name().to_string_lossy().starts_with("default_gone_"));
            (!alive(gone_pid) && !dir_left).then_some(())
        },
    )
    .await;
    let metric = |text: &str, prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // The restarted agent reports again (its status writes) without restarting anything.
    let port = wait_for(
        Duration::from_secs(60),
        "the restarted agent's endpoint",
        || async {
            endpoint(&kube_get(&c, 2, "/api/v1/nodes/r1").await.1)
                .filter(|p| Some(*p) != first_port)
        },
    )
    .await;
    wait_for(
        Duration::from_secs(60),
        "the restarted agent to take steady back",
        || async {
            let (code, text) = flotilla::client::Client::new(vec![], Duration::from_secs(5))
                .get_text(&format!("127.0.0.1:{port}"), "/metrics")
                .await
                .ok()?;
            (code == 200
                && metric(
                    &text,
                    "flotilla_agent_pod_status_writes_total{result=\"ok\"}",
                ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    let now = pod(&c, "steady").await;
    assert_eq!(
        pid_of(&now),
        Some(steady_pid),
        "steady was not restarted: {now}"
    );
    assert_eq!(restarts(&now), 0, "{now}");
    assert!(ready(&now), "{now}");
    assert!(alive(steady_pid));
    // kubectl exec reaches the adopted container: its environment, its exit code, stdin.
    let k = Kubectl::new(&c, 2);
    assert_eq!(
        k.ok(&[
            "exec",
            "steady",
            "--",
            "sh",
            "-c",
            "echo $HOSTNAME; echo oops >&2"
        ]),
        "steady\n"
    );
    let (ok, out, err) = k.run(&["exec", "steady", "--", "sh", "-c", "echo partial; exit 3"]);
    assert!(!ok && out == "partial\n", "{out}{err}");
    assert!(err.contains("command terminated with exit code 3"), "{err}");
    let mut cat = Command::new(common::KUBECTL)
        .arg(format!("--server={}", k.server))
        .arg(format!("--cache-dir={}", k.cache.display()))
        .args(["exec", "-i", "steady", "--", "tr", "a-z", "A-Z"])
        .env("HOME", &k.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    cat.stdin
        .take()
        .unwrap()
        .write_all(b"through stdin\n")
        .unwrap();
    let out = cat.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "THROUGH STDIN\n");
    // A client that cannot upgrade to a websocket is told why.
    let (code, body) = req(
        &[c.replica(2).api()],
        http::Method::POST,
        "/api/v1/namespaces/default/pods/steady/exec?command=true&stdout=true",
        "application/json",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("websocket")),
        "{body}"
    );

    // A status write for another instance of the pod (the uid a precondition) changes
    // nothing.
    let (code, body) = req(
        &[c.replica(2).api()],
        http::Method::PATCH,
        "/api/v1/namespaces/default/pods/steady/status",
        "application/strategic-merge-patch+json",
        &serde_json::json!({"metadata": {"uid": "another-instance"}, "status": {"phase": "Failed"}}),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("Precondition failed: UID in precondition")),
        "{body}"
    );
    assert_eq!(pod(&c, "steady").await["status"]["phase"], "Running");

    // The adopted container is supervised: when it dies, it is restarted and counted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(steady_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let again = wait_for(
        Duration::from_secs(60),
        "the adopted container's death to be seen and the container restarted",
        || async {
            let p = pod(&c, "steady").await;
            (restarts(&p) == 1 && pid_of(&p).is_some_and(|x| x != steady_pid)).then_some(p)
        },
    )
    .await;
    assert_eq!(
        again["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 137,
        "{again}"
    );
    kubectl(&c, 2, &["delete", "pod", "steady", "crasher"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_made_ready_before_containers_start_and_kept_in_sync() {
    let c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let data = c.dir.path().join("agent-v1");
    let _agent = Agent::start(
        &c,
        "v1",
        &data,
        &["--volume-sync-seconds", "1", "--pod-max-pids", "20"],
    );
    let host = c.dir.path().join("host-dir");
    let manifest = c.dir.path().join("volumes.yaml");
    // The ConfigMap does not exist yet: the pod waits, with a FailedMount event.
    std::fs::write(
        &manifest,
        format!(
            r#"apiVersion: v1
kind: Secret
metadata:
  name: creds
stringData:
  password: hunter2
---
apiVersion: v1
kind: Pod
metadata:
  name: vols
  labels:
    tier: web
spec:
  terminationGracePeriodSeconds: 1
  volumes:
  - name: config
    configMap:
      name: settings
      items:
      - key: greeting
        path: greeting.txt
        mode: 0400
  - name: secret
    secret:
      secretName: creds
  - name: info
    downwardAPI:
      items:
      - path: labels
        fieldRef:
          fieldPath: metadata.labels
  - name: scratch
    emptyDir: {{}}
  - name: host
    hostPath:
      path: {host}
      type: DirectoryOrCreate
  initContainers:
  - name: init
    image: busybox
    command: ["sh", "-c", "echo from-init > shared/note && echo host-file > h/made-by-pod"]
    volumeMounts:
    - name: scratch
      mountPath: /shared
    - name: host
      mountPath: /h
  containers:
  - name: c
    image: busybox
    workingDir: /work
    command: ["sh", "-c", "while [ ! -f ../shared/started ]; do sleep 0.1; done; cat ../shared/started; echo sub > ../sub/f; cat ../shared/note ../etc/secret/password ../etc/info/labels; stat -c %a ../etc/config/greeting.txt; while :; do cat ../etc/config/greeting.txt; echo; sleep 0.3; done"]
    volumeMounts:
    - name: config
      mountPath: /etc/config
    - name: secret
      mountPath: /etc/secret
    - name: info
      mountPath: /etc/info
    - name: scratch
      mountPath: /shared
    - name: scratch
      mountPath: /sub
      subPath: deeper
    - name: host
      mountPath: /h
    lifecycle:
      postStart:
        exec:
          command: ["sh", "-c", "echo post-start > ../shared/started"]
      preStop:
        exec:
          command: ["sh", "-c", "echo stopping > ../h/prestop"]
"#,
            host = host.display()
        ),
    )
    .unwrap();
    kubectl(&c, 2, &["apply", "-f", manifest.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(30),
        "a FailedMount event naming the missing ConfigMap",
        || async {
            let (_, evs) = kube_get(&c, 2, "/api/v1/namespaces/default/events").await;
            evs["items"]
                .as_array()?
                .iter()
                .find(|e| {
                    e["reason"] == "FailedMount"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("configmap \"settings\" not found"))
                })
                .cloned()
        },
    )
    .await;
    let waiting = wait_for(
        Duration::from_secs(10),
        "the pod to report ContainerCreating",
        || async {
            let p = pod(&c, "vols").await;
            (p["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"]
                == "ContainerCreating")
                .then_some(p)
        },
    )
    .await;
    assert_eq!(waiting["status"]["phase"], "Pending", "{waiting}");
    kubectl(
        &c,
        2,
        &[
            "create",
            "configmap",
            "settings",
            "--from-literal=greeting=hello",
        ],
    );
    wait_for(Duration::from_secs(60), "the pod to run", || async {
        (pod(&c, "vols").await["status"]["phase"] == "Running").then_some(())
    })
    .await;
    let logs = wait_for(
        Duration::from_secs(30),
        "the container's first output",
        || async {
            let (ok, out, _) = Kubectl::new(&c, 2).run(&["logs", "vols"]);
            (ok && out.contains("hello\n")).then_some(out)
        },
    )
    .await;
    // postStart ran (the command waited for its file), in the container's directory.
    assert!(
        logs.starts_with("post-start\nfrom-init\nhunter2tier=\"web\"\n400\nhello\n"),
        "{logs}"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("made-by-pod")).unwrap(),
        "host-file\n",
        "the hostPath is the host's directory"
    );
    let pod_dir = std::fs::read_dir(data.join("pods"))
        .unwrap()
        .flatten()
        .next()
        .expect("the pod's directory")
        .path();
    assert_eq!(
        std::fs::read_to_string(pod_dir.join("volumes/scratch/deeper/f")).unwrap(),
        "sub\n",
        "a subPath mount is a directory inside its volume"
    );
    // An edited ConfigMap reaches the running container.
    kubectl(
        &c,
        2,
        &[
            "patch",
            "configmap",
            "settings",
            "-p",
            r#"{"data":{"greeting":"changed"}}"#,
        ],
    );
    wait_for(
        Duration::from_secs(30),
        "the edited key in the volume",
        || async {
            let (ok, out, _) = Kubectl::new(&c, 2).run(&["logs", "vols", "--tail=1"]);
            (ok && out == "changed\n").then_some(())
        },
    )
    .await;
    // --pod-max-pids: a pod that forks past it is refused processes.
    std::fs::write(
        c.dir.path().join("forky.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: forky\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: busybox\n    command:\n    - sh\n    - -c\n    - |\n      sh -c 'i=0; while [ $i -lt 40 ]; do sleep 60 & i=$((i+1)); done; echo tried $i'\n      exec sleep 600\n",
    )
    .unwrap();
    kubectl(
        &c,
        2,
        &[
            "apply",
            "-f",
            c.dir.path().join("forky.yaml").to_str().unwrap(),
        ],
    );
    let logs = wait_for(Duration::from_secs(60), "forky's output", || async {
        let (ok, out, err) = Kubectl::new(&c, 2).run(&["logs", "forky"]);
        (ok && out.contains("Cannot fork")).then_some(format!("{out}{err}"))
    })
    .await;
    assert!(
        !logs.contains("tried 40"),
        "forks past the limit were refused: {logs}"
    );
    let forky_uid = pod(&c, "forky").await["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let pids_max = format!("/sys/fs/cgroup/pids/flotilla/v1/{forky_uid}/pids.max");
    assert_eq!(std::fs::read_to_string(&pids_max).unwrap().trim(), "20");
    kubectl(&c, 2, &["delete", "pod", "forky"]);

    // A container without a command cannot run under the process runtime: it waits, saying
    // why, and the agent carries on.
    std::fs::write(
        c.dir.path().join("nocmd.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nocmd\nspec:\n  containers:\n  - name: c\n    image: busybox:1.35\n",
    )
    .unwrap();
    kubectl(
        &c,
        2,
        &[
            "apply",
            "-f",
            c.dir.path().join("nocmd.yaml").to_str().unwrap(),
        ],
    );
    let waiting = wait_for(
        Duration::from_secs(30),
        "nocmd to wait with its reason",
        || async {
            let p = pod(&c, "nocmd").await;
            let w = p["status"]["containerStatuses"][0]["state"]["waiting"].clone();
            (w["reason"] == "CreateContainerConfigError").then_some(w)
        },
    )
    .await;
    assert!(
        waiting["message"]
            .as_str()
            .is_some_and(|m| m.contains("the process runtime runs commands, not images")),
        "{waiting}"
    );
    kubectl(
        &c,
        2,
        &["delete", "pod", "nocmd", "--grace-period=0", "--force"],
    );

    // A command that cannot be started is a run error, with the system's reason.
    std::fs::write(
        c.dir.path().join("nobin.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nobin\nspec:\n  containers:\n  - name: c\n    image: busybox:1.35\n    command: [\"/no/such/program\"]\n",
    )
    .unwrap();
    kubectl(
        &c,
        2,
        &[
            "apply",
            "-f",
            c.dir.path().join("nobin.yaml").to_str().unwrap(),
        ],
    );
    let waiting = wait_for(
        Duration::from_secs(30),
        "nobin to wait with its reason",
        || async {
            let p = pod(&c, "nobin").await;
            let w = p["status"]["containerStatuses"][0]["state"]["waiting"].clone();
            (w["reason"] == "RunContainerError").then_some(w)
        },
    )
    .await;
    assert!(
        waiting["message"]
            .as_str()
            .is_some_and(|m| m.contains("stat /no/such/program: no such file or directory")),
        "{waiting}"
    );
    kubectl(
        &c,
        2,
        &["delete", "pod", "nobin", "--grace-period=0", "--force"],
    );

    // Specs the API would never run are refused with the field at fault.
    let bad = c.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n  - name: c\n    image: busybox\n    command: [\"true\"]\n    volumeMounts:\n    - name: nope\n      mountPath: /x\n    livenessProbe:\n      periodSeconds: 1\n",
    )
    .unwrap();
    let (ok, _, err) = Kubectl::new(&c, 2).run(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("spec.containers[0].volumeMounts[0].name: Not found: \"nope\""),
        "{err}"
    );
    assert!(
        err.contains(
            "spec.containers[0].livenessProbe: Required value: must specify a handler type"
        ),
        "{err}"
    );
    kubectl(&c, 2, &["delete", "pod", "vols"]);
    wait_for(
        Duration::from_secs(30),
        "the pod's directory to be removed",
        || async {
            let left = std::fs::read_dir(data.join("pods")).ok()?.flatten().count();
            (left == 0).then_some(())
        },
    )
    .await;
    assert!(
        host.join("made-by-pod").exists(),
        "a hostPath outlives the pod"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("prestop")).unwrap(),
        "stopping\n",
        "preStop ran before the container was stopped"
    );
}

#[test]
fn bad_agent_flags_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (args, reason) in [
        (
            vec!["--servers", "127.0.0.1:1", "--node-name", "Bad_Name"],
            "is not a valid node name",
        ),
        (
            vec!["--servers", ",", "--node-name", "n1"],
            "--servers needs at least one host:port",
        ),
        (
            vec![
                "--servers",
                "127.0.0.1:1",
                "--node-name",
                "n1",
                "--runtime",
                "vm",
            ],
            "unknown runtime \"vm\"",
        ),
        (
            vec![
                "--servers",
                "127.0.0.1:1",
                "--node-name",
                "n1",
                "--runtime",
                "cri",
                "--cri-endpoint",
                "unix:///nonexistent/containerd.sock",
            ],
            "cannot reach the CRI runtime at /nonexistent/containerd.sock",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .arg("agent")
            .args(&args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(reason),
            "{args:?}: {err}"
        );
    }
}
