//! The agent's `cri` runtime against a real containerd (started here with its own root,
//! state and socket) and images built locally (`deploy/images/build.py`): the same pod spec
//! as under the process runtime runs in a real container, with its volumes mounted, exec
//! probes through the runtime, logs, restarts, image errors, graceful deletion and an agent
//! restart that adopts the running container.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A containerd of the test's own, stopped and cleaned up however the test ends: its shims
/// and containers killed, its mounts unmounted, its cgroups removed.
struct Containerd {
    child: Child,
    dir: PathBuf,
}

impl Containerd {
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    async fn start(dir: &Path) -> Containerd {
        let dir = dir.join("containerd");
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        let config = include_str!("../deploy/containerd/config.toml")
            .replace("@DIR@", &dir.display().to_string());
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd is installed (apt-get install containerd runc)");
        let c = Containerd { child, dir };
        let sock = c.socket();
        wait_for(Duration::from_secs(20), "containerd's socket", || async {
            sock.exists().then_some(())
        })
        .await;
        // Images: built here from the static busybox, imported into the CRI namespace.
        let images = c.dir.join("images");
        let built = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/images/build.py"
            ))
            .arg(&images)
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        for tar in ["busybox.tar", "pause.tar"] {
            let out = Command::new("ctr")
                .arg("-a")
                .arg(&sock)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(images.join(tar))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "importing {tar}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // The shims (and so the containers) of this containerd: their command line names its
        // socket.
        let sock = self.socket().display().to_string();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("containerd-shim") && cmd.contains(&sock) {
                // The shim's children (the containers) first.
                let _ = Command::new("pkill")
                    .args(["-9", "-P", &pid.to_string()])
                    .status();
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(300));
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(self.dir.to_str().unwrap()))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        for controller in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            remove_empty_tree(&controller.path().join("flotilla").join("c1"));
            let _ = std::fs::remove_dir(controller.path().join("flotilla"));
        }
    }
}

/// Removes a cgroup directory tree bottom-up (cgroup directories only go when empty).
fn remove_empty_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            remove_empty_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The agent, killed when the test ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(c: &Cluster, ctd: &Containerd, data: &Path, n: usize) -> Agent {
    let servers: Vec<String> = (1..=3).map(|i| c.replica(i).api()).collect();
    let log = std::fs::File::create(c.dir.path().join(format!("agent-{n}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "agent",
            "--servers",
            &servers.join(","),
            "--node-name",
            "c1",
        ])
        .args([
            "--heartbeat-seconds",
            "1",
            "--runtime",
            "cri",
            "--cri-endpoint",
        ])
        .arg(format!("unix://{}", ctd.socket().display()))
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Agent(child)
}

async fn pod(c: &Cluster, name: &str) -> Value {
    req(
        &[c.replica(2).api()],
        http::Method::GET,
        &format!("/api/v1/namespaces/default/pods/{name}"),
        "application/json",
        &Value::Null,
    )
    .await
    .1
}

fn ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|x| x["type"] == "Ready" && x["status"] == "True")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_in_real_containers_under_containerd() {
    let c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let ctd = Containerd::start(c.dir.path()).await;
    let data = c.dir.path().join("agent-c1");
    let mut first = agent(&c, &ctd, &data, 1);
    let k = Kubectl::new(&c, 2);
    let version = wait_for(
        Duration::from_secs(30),
        "node c1 to register with its runtime",
        || async {
            let (_, n) = req(
                &[c.replica(2).api()],
                http::Method::GET,
                "/api/v1/nodes/c1",
                "application/json",
                &Value::Null,
            )
            .await;
            n["status"]["nodeInfo"]["containerRuntimeVersion"]
                .as_str()
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        },
    )
    .await;
    assert!(version.starts_with("containerd://1."), "{version}");
    let out = c.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let manifest = c.dir.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  greeting: hello from a configmap
---
apiVersion: v1
kind: Pod
metadata:
  name: boxed
spec:
  terminationGracePeriodSeconds: 10
  dnsPolicy: None
  dnsConfig:
    nameservers: [192.0.2.53]
    searches: [flotilla.test]
  volumes:
  - name: config
    configMap:
      name: settings
  - name: out
    hostPath:
      path: {out}
  containers:
  - name: c
    image: busybox:1.35
    command: ["sh", "-c"]
    args:
    - trap 'echo got TERM > /out/term; exit 0' TERM; cat /etc/config/greeting; echo; (echo x > /etc/config/new) 2>/dev/null && echo writable || echo read-only; test -e /etc/os-release && echo host filesystem || echo image filesystem; grep -h -e nameserver -e search /etc/resolv.conf; touch /tmp/ready; while :; do sleep 0.2; done
    env:
    - name: GREETING
      valueFrom:
        configMapKeyRef:
          name: settings
          key: greeting
    volumeMounts:
    - name: config
      mountPath: /etc/config
      readOnly: true
    - name: out
      mountPath: /out
    readinessProbe:
      exec:
        command: ["test", "-f", "/tmp/ready"]
      periodSeconds: 1
    resources:
      limits:
        memory: 64Mi
        cpu: 500m
"#,
            out = out.display()
        ),
    )
    .unwrap();
    k.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    let running = wait_for(
        Duration::from_secs(90),
        "the pod to run and be ready",
        || async {
            let p = pod(&c, "boxed").await;
            ready(&p).then_some(p)
        },
    )
    .await;
    let id = running["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(id.starts_with("containerd://"), "{running}");
    // A real container: the image's filesystem (no /etc/os-release in busybox), the
    // ConfigMap mounted read-only where the spec says, output through the runtime's log.
    assert!(!Path::new("/etc/config/greeting").exists());
    let logs = wait_for(
        Duration::from_secs(20),
        "the container's output",
        || async {
            let (ok, out, _) = k.run(&["logs", "boxed"]);
            (ok && out.contains("nameserver")).then_some(out)
        },
    )
    .await;
    assert!(
        logs.starts_with(
            "hello from a configmap\nread-only\nimage filesystem\nsearch flotilla.test\nnameserver 192.0.2.53\n"
        ),
        "{logs}"
    );

    // kubectl exec runs in the container (ExecSync): its files, its exit code; stdin is
    // refused with the reason.
    assert_eq!(
        k.ok(&["exec", "boxed", "--", "cat", "/etc/config/greeting"]),
        "hello from a configmap"
    );
    let (ok, _, err) = k.run(&["exec", "boxed", "--", "sh", "-c", "exit 4"]);
    assert!(
        !ok && err.contains("command terminated with exit code 4"),
        "{err}"
    );
    let (ok, _, err) = k.run(&["exec", "-i", "boxed", "--", "cat"]);
    assert!(!ok && err.contains("stdin"), "{err}");

    // The container's resource use comes from the runtime's stats into the agent's metrics.
    let (_, node) = req(
        &[c.replica(2).api()],
        http::Method::GET,
        "/api/v1/nodes/c1",
        "application/json",
        &Value::Null,
    )
    .await;
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap();
    let series =
        "container_memory_working_set_bytes{container=\"c\",namespace=\"default\",pod=\"boxed\"} ";
    let memory = wait_for(
        Duration::from_secs(30),
        "the container's memory in the agent's metrics",
        || async {
            let (_, text) = flotilla::client::Client::new(vec![], Duration::from_secs(5))
                .get_text(&format!("127.0.0.1:{port}"), "/metrics/resource")
                .await
                .ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix(series))
                .and_then(|v| v.parse::<f64>().ok())
        },
    )
    .await;
    assert!(memory > 0.0 && memory < 64.0 * 1024.0 * 1024.0, "{memory}");

    // Image errors are the Kubernetes waiting reasons.
    std::fs::write(
        c.dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: missing\nspec:\n  containers:\n  - name: c\n    image: nosuch:1\n    command: [\"true\"]\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: never\nspec:\n  containers:\n  - name: c\n    image: nosuch:2\n    imagePullPolicy: Never\n    command: [\"true\"]\n",
    )
    .unwrap();
    k.ok(&[
        "apply",
        "-f",
        c.dir.path().join("bad.yaml").to_str().unwrap(),
    ]);
    for (name, reason) in [("missing", "ErrImagePull"), ("never", "ErrImageNeverPull")] {
        let p = wait_for(
            Duration::from_secs(60),
            &format!("{name} to wait with {reason}"),
            || async {
                let p = pod(&c, name).await;
                (p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == reason)
                    .then_some(p)
            },
        )
        .await;
        assert!(
            p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("nosuch")),
            "{p}"
        );
    }
    k.ok(&[
        "delete",
        "pod",
        "missing",
        "never",
        "--grace-period=0",
        "--force",
    ]);

    // A container that fails is restarted in a new container, its exit code kept.
    std::fs::write(
        c.dir.path().join("crash.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: crash\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: busybox:1.35\n    command: [\"sh\", \"-c\", \"echo run; exit 7\"]\n",
    )
    .unwrap();
    k.ok(&[
        "apply",
        "-f",
        c.dir.path().join("crash.yaml").to_str().unwrap(),
    ]);
    let crashed = wait_for(
        Duration::from_secs(60),
        "the crashing container to restart",
        || async {
            let p = pod(&c, "crash").await;
            (p["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(1)).then_some(p)
        },
    )
    .await;
    let last = &crashed["status"]["containerStatuses"][0];
    let terminated = if last["lastState"]["terminated"].is_object() {
        &last["lastState"]["terminated"]
    } else {
        &last["state"]["terminated"]
    };
    assert_eq!(terminated["exitCode"], 7, "{crashed}");
    assert_eq!(k.ok(&["logs", "crash", "--previous"]), "run\n");
    k.ok(&["delete", "pod", "crash", "--grace-period=0", "--force"]);

    // The examples' busybox specs run here unchanged (the same spec as under the process
    // runtime).
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello.yaml");
    k.ok(&["apply", "-f", hello]);
    k.ok(&["rollout", "status", "deploy/hello", "--timeout=90s"]);
    let logs = wait_for(Duration::from_secs(30), "hello's output", || async {
        let (ok, out, _) = k.run(&["logs", "deploy/hello"]);
        (ok && out.contains(" on c1")).then_some(out)
    })
    .await;
    assert!(logs.starts_with("hello from hello-"), "{logs}");
    k.ok(&["delete", "-f", hello]);

    // The agent dies and comes back: the container is adopted, not restarted.
    let _ = first.0.kill();
    let _ = first.0.wait();
    let _second = agent(&c, &ctd, &data, 2);
    let log = c.dir.path().join("agent-2.log");
    wait_for(
        Duration::from_secs(30),
        "the restarted agent to adopt the container",
        || async {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("adopted a container"))
                .then_some(())
        },
    )
    .await;
    let p = pod(&c, "boxed").await;
    assert_eq!(
        p["status"]["containerStatuses"][0]["containerID"],
        id.as_str(),
        "{p}"
    );
    assert_eq!(
        p["status"]["containerStatuses"][0]["restartCount"], 0,
        "{p}"
    );

    // Deletion: SIGTERM reaches the container, which exits; the sandbox goes.
    k.ok(&["delete", "pod", "boxed", "--timeout=60s"]);
    assert_eq!(
        std::fs::read_to_string(out.join("term")).unwrap(),
        "got TERM\n"
    );
    wait_for(
        Duration::from_secs(30),
        "the pod's directory to be removed",
        || async {
            let left = std::fs::read_dir(data.join("pods")).ok()?.flatten().count();
            (left == 0).then_some(())
        },
    )
    .await;
    // ... and with them the pods' cgroups, in every controller.
    wait_for(
        Duration::from_secs(30),
        "the pods' cgroups to be removed",
        || async {
            let left: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
                .ok()?
                .flatten()
                .map(|c| c.path().join("flotilla/c1"))
                .filter(|d| d.exists())
                .collect();
            left.is_empty().then_some(())
        },
    )
    .await;
}
