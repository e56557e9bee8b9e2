//! The README's main command with the examples: `flotilla up --agents 2`, then
//! `kubectl apply -f examples/...` with the real kubectl. The web site's pods run, each on its
//! own pod address, pass their HTTP readiness probes, serve the ConfigMap's page, sit behind
//! their Service's endpoints, log, and on deletion see SIGTERM; the Job completes; the hello
//! Deployment runs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// `flotilla up`, interrupted (and so stopped with its replicas and agents) when the test
/// ends.
struct Up(Child, std::path::PathBuf);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGINT);
        let _ = self.0.wait();
        // Containers outlive their agent (as under the kubelet): a test that failed midway
        // leaves some, found by their pid files.
        for pid in glob_pids(&self.1) {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The container pids recorded under `data/agent-*/pods/*/`.
fn glob_pids(data: &std::path::Path) -> Vec<i32> {
    let dirs = |p: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let mut out = Vec::new();
    for agent in dirs(data) {
        for pod in dirs(&agent.join("pods")) {
            for f in dirs(&pod) {
                if f.extension().is_some_and(|e| e == "pid") {
                    if let Some(pid) = std::fs::read_to_string(&f)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                    {
                        out.push(pid);
                    }
                }
            }
        }
    }
    out
}

/// A service range inside the test's own loopback block (`host` is its `.1`).
pub fn service_cidr(host: &str) -> String {
    format!("{}.64/28", host.rsplit_once('.').unwrap().0)
}

fn example(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn pid_of(p: &Value) -> Option<i32> {
    p["status"]["containerStatuses"][0]["containerID"]
        .as_str()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_under_flotilla_up() {
    let host = Cluster::new(1, &[]).replica(1).ip.clone();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "up",
            "--agents",
            "2",
            "--host",
            &host,
            "--base-port",
            "6441",
            "--service-cidr",
            &service_cidr(&host),
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let up = Up(child, data.clone());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("`flotilla up` reports the cluster up");
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    // Secure by default: HTTPS, and the admin's certificate in the kubeconfig `up` wrote.
    let k = Kubectl {
        server: format!("https://{host}:6441"),
        cache: dir.path().join("kube-cache"),
        dir: dir.path().to_path_buf(),
        kubeconfig: Some(data.join("kubeconfig")),
    };
    let pki = data.join("pki");
    let admin = std::sync::Arc::new(
        flotilla::tls::client_config(
            &pki.join("ca.crt"),
            Some((&pki.join("admin.crt"), &pki.join("admin.key"))),
        )
        .unwrap(),
    );
    let nobody =
        std::sync::Arc::new(flotilla::tls::client_config(&pki.join("ca.crt"), None).unwrap());
    let (anonymous, _) = req_tls(
        Some(nobody),
        &[format!("{host}:6441")],
        http::Method::GET,
        "/api/v1/nodes",
        "application/json",
        &Value::Null,
    )
    .await;
    assert_eq!(anonymous, 401, "`flotilla up` lets anonymous requests in");
    let api = vec![format!("{host}:6441")];
    let get = |path: String| {
        let api = api.clone();
        let admin = admin.clone();
        async move {
            req_tls(
                Some(admin),
                &api,
                http::Method::GET,
                &path,
                "application/json",
                &Value::Null,
            )
            .await
            .1
        }
    };
    wait_for(
        Duration::from_secs(60),
        "both nodes to be Ready",
        || async {
            let nodes = get("/api/v1/nodes".into()).await;
            let ready = nodes["items"]
                .as_array()?
                .iter()
                .filter(|n| {
                    n["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                })
                .count();
            (ready == 2).then_some(())
        },
    )
    .await;

    // The web site: Ready through its HTTP probes, each pod on its own address.
    k.ok(&["apply", "-f", &example("web.yaml")]);
    let out = k.ok(&["rollout", "status", "deploy/web", "--timeout=90s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    let pods = get("/api/v1/namespaces/default/pods?labelSelector=app%3Dweb".into()).await;
    let pods: Vec<Value> = pods["items"].as_array().unwrap().clone();
    assert_eq!(pods.len(), 2);
    let ips: Vec<String> = pods
        .iter()
        .map(|p| p["status"]["podIP"].as_str().unwrap().to_string())
        .collect();
    assert_ne!(ips[0], ips[1], "each pod has its own address");
    let client = flotilla::client::Client::new(vec![], Duration::from_secs(5));
    for ip in &ips {
        assert!(ip.starts_with("127.10"), "{ip}");
        let (code, body) = client.get_text(&format!("{ip}:8080"), "/").await.unwrap();
        assert_eq!(code, 200);
        assert_eq!(body, "<h1>hello from flotilla</h1>\n");
    }
    let endpoints = wait_for(
        Duration::from_secs(30),
        "the Service's endpoints",
        || async {
            let e = get("/api/v1/namespaces/default/endpoints/web".into()).await;
            let n = e["subsets"][0]["addresses"].as_array().map_or(0, Vec::len);
            (n == 2).then_some(e)
        },
    )
    .await;
    assert_eq!(
        endpoints["subsets"][0]["ports"][0]["port"], 8080,
        "{endpoints}"
    );
    // Through the Service: its cluster IP (the service proxy `flotilla up` runs as root),
    // and its name from a pod (the cluster DNS).
    let svc = get("/api/v1/namespaces/default/services/web".into()).await;
    let vip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let body = wait_for(
        Duration::from_secs(30),
        "the Service's cluster IP to serve",
        || async {
            let (code, body) = client.get_text(&format!("{vip}:80"), "/").await.ok()?;
            (code == 200).then_some(body)
        },
    )
    .await;
    assert_eq!(body, "<h1>hello from flotilla</h1>\n");
    let out = k.ok(&[
        "exec",
        "deploy/web",
        "--",
        "python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen('http://web/', timeout=5).read().decode())",
    ]);
    assert!(out.contains("hello from flotilla"), "{out}");
    let name = pods[0]["metadata"]["name"].as_str().unwrap().to_string();
    let logs = k.ok(&["logs", &name]);
    assert_eq!(logs, format!("serving {name} on {}:8080\n", ips[0]));

    // Deleting it: the servers see SIGTERM (a followed log shows it) and exit.
    let follow = Command::new(KUBECTL)
        .arg(format!(
            "--kubeconfig={}",
            data.join("kubeconfig").display()
        ))
        .arg(format!("--server={}", k.server))
        .arg(format!("--cache-dir={}", k.cache.display()))
        .args(["logs", "-f", &name])
        .env("HOME", &k.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pids: Vec<i32> = pods.iter().filter_map(pid_of).collect();
    assert_eq!(pids.len(), 2);
    k.ok(&[
        "delete",
        "-f",
        &example("web.yaml"),
        "--wait=true",
        "--timeout=60s",
    ]);
    let follow = std::sync::Mutex::new(follow);
    wait_for(
        Duration::from_secs(30),
        "the followed log to end",
        || async { follow.lock().unwrap().try_wait().ok().flatten().map(|_| ()) },
    )
    .await;
    let mut text = String::new();
    use std::io::Read;
    let out = follow.lock().unwrap().stdout.take().unwrap();
    BufReader::new(out).read_to_string(&mut text).unwrap();
    assert!(
        text.ends_with("received SIGTERM, shutting down\n"),
        "{text}\n{}{}",
        std::fs::read_to_string(data.join("agent-1/agent.log")).unwrap_or_default(),
        std::fs::read_to_string(data.join("agent-2/agent.log")).unwrap_or_default()
    );
    wait_for(
        Duration::from_secs(30),
        "the servers' processes to be gone",
        || async {
            pids.iter()
                .all(|p| kill(Pid::from_raw(*p), None).is_err())
                .then_some(())
        },
    )
    .await;

    // The Job runs its three completions to the end.
    k.ok(&["apply", "-f", &example("job.yaml")]);
    let out = k.ok(&[
        "wait",
        "--for=condition=complete",
        "job/count",
        "--timeout=90s",
    ]);
    assert!(out.contains("condition met"), "{out}");
    let logs = k.ok(&["logs", "job/count"]);
    assert!(logs.contains("counts 3\ndone\n"), "{logs}");
    k.ok(&["delete", "-f", &example("job.yaml")]);

    // The hello Deployment runs and logs.
    k.ok(&["apply", "-f", &example("hello.yaml")]);
    k.ok(&["rollout", "status", "deploy/hello", "--timeout=90s"]);
    let logs = wait_for(Duration::from_secs(30), "hello's output", || async {
        let (ok, out, _) = k.run(&["logs", "deploy/hello"]);
        (ok && out.contains("hello from")).then_some(out)
    })
    .await;
    assert!(logs.contains(" on node-"), "{logs}");
    k.ok(&["delete", "-f", &example("hello.yaml"), "--timeout=60s"]);
    // The agent deletes a stopped pod from the API, then removes its directory.
    wait_for(
        Duration::from_secs(60),
        "every pod to be gone, and its directory with it",
        || async {
            let pods = get("/api/v1/pods".into()).await;
            let gone = pods["items"].as_array().is_some_and(Vec::is_empty);
            (gone && glob_pids(&data).is_empty()).then_some(())
        },
    )
    .await;
    drop(up);
}
