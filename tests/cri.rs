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
    /// The node whose pods it runs (their cgroups are under `flotilla/<node>`).
    node: String,
}

impl Containerd {
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Writes the CNI configuration of `deploy/containerd` (the `bridge` plugin) on
    /// `pod_cidr`, its main plugin named `plugin` (containerd reloads it when it changes).
    fn write_cni(dir: &Path, pod_cidr: &str, plugin: &str) {
        let cni = include_str!("../deploy/containerd/10-flotilla.conflist")
            .replace("@DIR@", &dir.display().to_string())
            .replace("@POD_CIDR@", pod_cidr)
            .replace("\"type\": \"bridge\"", &format!("\"type\": \"{plugin}\""));
        let tmp = dir.join("cni/.10-flotilla.conflist");
        std::fs::write(&tmp, cni).unwrap();
        std::fs::rename(tmp, dir.join("cni/10-flotilla.conflist")).unwrap();
    }

    /// Starts containerd for `node`'s pods, with the CNI bridge of `deploy/containerd`
    /// on `pod_cidr` if there is one (written before containerd starts), its main plugin
    /// named `plugin`.
    async fn start(dir: &Path, node: &str, pod_cidr: Option<&str>, plugin: &str) -> Containerd {
        let dir = dir.join("containerd");
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        let config = include_str!("../deploy/containerd/config.toml")
            .replace("@DIR@", &dir.display().to_string());
        std::fs::write(dir.join("config.toml"), config).unwrap();
        if let Some(cidr) = pod_cidr {
            Self::write_cni(&dir, cidr, plugin);
        }
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd is installed (apt-get install containerd runc)");
        let c = Containerd {
            child,
            dir,
            node: node.to_string(),
        };
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
            remove_empty_tree(&controller.path().join("flotilla").join(&self.node));
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

/// Every pod on the node's network (this containerd has no CNI configuration).
const NODE_NETWORK: [&str; 2] = ["--cri-network", "node"];

/// The agent, killed when the test ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent of `ctd`'s node on the cri runtime, with `extra` flags.
fn agent(c: &Cluster, ctd: &Containerd, data: &Path, n: usize, extra: &[&str]) -> Agent {
    let servers: Vec<String> = (1..=3).map(|i| c.replica(i).api()).collect();
    let log = std::fs::File::create(c.dir.path().join(format!("agent-{n}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "agent",
            "--servers",
            &servers.join(","),
            "--node-name",
            &ctd.node,
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
        .args(extra)
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
    let ctd = Containerd::start(c.dir.path(), "c1", None, "bridge").await;
    let data = c.dir.path().join("agent-c1");
    let mut first = agent(&c, &ctd, &data, 1, &NODE_NETWORK);
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
    let _second = agent(&c, &ctd, &data, 2, &NODE_NETWORK);
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

/// Runs `script` with `sh`, failing the test with its output if it fails.
fn sh(script: &str) {
    let out = Command::new("sh").args(["-ec", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pods of a label selector, by name.
async fn pods(c: &Cluster, selector: &str) -> Vec<Value> {
    let (_, list) = req(
        &[c.replica(2).api()],
        http::Method::GET,
        &format!("/api/v1/namespaces/default/pods?labelSelector={selector}"),
        "application/json",
        &Value::Null,
    )
    .await;
    let mut items = list["items"].as_array().cloned().unwrap_or_default();
    items.sort_by_key(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string());
    items
}

/// What `n` HTTP requests from pod `from` to the Service `name` (port 80) were answered
/// with (each answer a web pod's hostname), failing on any request that fails. Each request
/// looks the name up first (busybox's `nslookup`, through the pod's search path) and
/// connects with `nc`: the static busybox's `wget` crashes in an image without glibc's NSS
/// modules.
fn answers(k: &Kubectl, from: &str, name: &str, n: usize) -> Vec<String> {
    let script = format!(
        r#"for i in $(seq {n}); do
             ip=$(nslookup {name} | awk '/^Address: /{{print $2}}' | tail -n1)
             a=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 "$ip" 80 | tail -n1)
             [ -n "$a" ] && echo "$a" || echo "FAILED: {name} -> $ip"
           done"#
    );
    let out = k.ok(&["exec", from, "--", "sh", "-c", &script]);
    let lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), n, "{out}");
    assert!(
        !out.contains("FAILED"),
        "a request from {from} failed: {out}"
    );
    lines
}

const POD_CIDR: &str = "10.88.0.0/24";
/// The cluster DNS where pods on the bridge reach it: a link-local address of the node's
/// (on its loopback interface: reachable from the bridge, unlike 127.0.0.0/8), as
/// NodeLocal DNSCache does.
const CLUSTER_DNS: &str = "169.254.20.10";

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: c
        image: busybox:1.35
        command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1.35
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: on-host}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1.35
    command: ["sleep", "3600"]
"#;

/// CRI pods on containerd's CNI bridge (`--cri-network pod`): each gets an address of its
/// own on the bridge (its `status.podIP`, what its HTTP readiness probe connects to), finds
/// a Service by name through the node's cluster DNS and reaches every ready backend through
/// the iptables proxy, including itself (hairpin); a scale-down reaches DNS and rules. The
/// whole test runs in a network namespace of its own (replicas, containerd, the agent, the
/// bridge and its rules), gone when the test process ends. It starts with the node's CNI
/// plugin missing: the pods start once it is there.
#[test]
fn pods_on_the_cni_bridge_reach_services() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("a network namespace of the test's own (root)");
    // The node's prerequisites for a pod network, as Kubernetes lists them: forwarding, and
    // bridged traffic through iptables (so a backend's answer to a pod on the same bridge
    // goes back through the proxy's DNAT).
    sh(&format!(
        "ip link set lo up
         ip addr add {CLUSTER_DNS}/32 dev lo
         echo 1 > /proc/sys/net/ipv4/ip_forward
         echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables"
    ));
    // The runtime's threads are made here, in the namespace.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bridge_test());
}

async fn bridge_test() {
    let mut c = Cluster::new(3, &[]);
    c.args = vec!["--service-cluster-ip-range".into(), "10.96.0.0/24".into()];
    for id in 1..=3 {
        c.launch(id, &[]);
    }
    c.wait_leader().await;
    c.wait_bootstrapped().await;
    // The node's CNI configuration names a plugin that is not installed (a fresh node
    // without the CNI plugins package): sandboxes fail in their network setup, and each
    // failed one keeps holding the pod's sandbox name in containerd.
    let ctd = Containerd::start(c.dir.path(), "b1", Some(POD_CIDR), "flotilla-absent").await;
    let data = c.dir.path().join("agent-b1");
    let _agent = agent(
        &c,
        &ctd,
        &data,
        1,
        &["--cluster-dns", CLUSTER_DNS, "--proxy-mode", "iptables"],
    );
    let k = Kubectl::new(&c, 2);
    let manifest = c.dir.path().join("web.yaml");
    std::fs::write(&manifest, WEB).unwrap();
    k.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(60),
        "an event of a web pod's failed network setup",
        || async {
            let (_, events) = req(
                &[c.replica(2).api()],
                http::Method::GET,
                "/api/v1/namespaces/default/events",
                "application/json",
                &Value::Null,
            )
            .await;
            events["items"]
                .as_array()?
                .iter()
                .any(|e| {
                    e["reason"] == "FailedCreatePodSandBox"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("flotilla-absent"))
                })
                .then_some(())
        },
    )
    .await;
    // Once the plugin is there, the next attempt replaces the failed sandbox (the agent
    // removes what a failed attempt left, as the kubelet does) and every pod starts.
    Containerd::write_cni(&ctd.dir, POD_CIDR, "bridge");
    let web = wait_for(
        Duration::from_secs(120),
        "three ready web pods (an HTTP probe to each pod's address)",
        || async {
            let p = pods(&c, "app=web").await;
            (p.len() == 3 && p.iter().all(ready)).then_some(p)
        },
    )
    .await;
    let names: Vec<String> = web
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    // Each pod has an address of its own on the bridge, the one its eth0 has.
    let mut ips = std::collections::BTreeSet::new();
    for p in &web {
        let ip = p["status"]["podIP"].as_str().unwrap().to_string();
        assert!(ip.starts_with("10.88.0."), "{p}");
        assert_ne!(p["status"]["hostIP"], p["status"]["podIP"], "{p}");
        let name = p["metadata"]["name"].as_str().unwrap();
        let inside = k.ok(&["exec", name, "--", "ip", "-4", "-o", "addr", "show", "eth0"]);
        assert!(inside.contains(&format!(" {ip}/")), "{name}: {inside}");
        assert_eq!(k.ok(&["exec", name, "--", "hostname"]).trim(), name);
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 3, "{ips:?}");
    // A hostNetwork pod is on the node's network.
    let on_host = wait_for(Duration::from_secs(60), "on-host to run", || async {
        let p = pod(&c, "on-host").await;
        (p["status"]["phase"] == "Running").then_some(p)
    })
    .await;
    assert_eq!(
        on_host["status"]["podIP"], on_host["status"]["hostIP"],
        "{on_host}"
    );
    wait_for(
        Duration::from_secs(60),
        "the client to be ready",
        || async { ready(&pod(&c, "client").await).then_some(()) },
    )
    .await;
    let (_, svc) = req(
        &[c.replica(2).api()],
        http::Method::GET,
        "/api/v1/namespaces/default/services/web",
        "application/json",
        &Value::Null,
    )
    .await;
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(cluster_ip.starts_with("10.96.0."), "{svc}");
    // The client's resolver is the cluster DNS, which answers the Service's name.
    let resolv = k.ok(&["exec", "client", "--", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains(&format!("nameserver {CLUSTER_DNS}"))
            && resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    let lookup = k.ok(&[
        "exec",
        "client",
        "--",
        "nslookup",
        "web.default.svc.cluster.local",
    ]);
    assert!(lookup.contains(&cluster_ip), "{lookup}");
    assert_eq!(
        k.ok(&[
            "exec",
            "client",
            "--",
            "sh",
            "-c",
            "echo $WEB_SERVICE_HOST:$WEB_SERVICE_PORT"
        ])
        .trim(),
        format!("{cluster_ip}:80")
    );
    // Many connections by name reach every backend, and only backends.
    let seen: std::collections::BTreeSet<String> =
        answers(&k, "client", "web.default.svc.cluster.local", 60)
            .into_iter()
            .collect();
    assert_eq!(
        seen,
        names.iter().cloned().collect(),
        "every web pod answers, nothing else"
    );
    // The short name through the search path; a backend reaches the Service too, itself
    // included (the proxy masquerades the hairpin).
    let own = answers(&k, &names[0], "web", 40);
    assert!(own.iter().all(|a| names.contains(a)), "{own:?}");
    assert!(
        own.contains(&names[0]),
        "{} never reached itself: {own:?}",
        names[0]
    );

    // Scaled to one: DNS and rules follow, every connection reaches the one left.
    k.ok(&["scale", "deployment/web", "--replicas=1"]);
    let left = wait_for(Duration::from_secs(60), "one web pod left", || async {
        let p = pods(&c, "app=web").await;
        (p.len() == 1).then(|| p[0]["metadata"]["name"].as_str().unwrap().to_string())
    })
    .await;
    wait_for(
        Duration::from_secs(30),
        "the proxy to send every connection to the one web pod left",
        || async {
            let a = answers(&k, "client", "web", 10);
            a.iter().all(|x| *x == left).then_some(())
        },
    )
    .await;
    k.ok(&["delete", "-f", manifest.to_str().unwrap(), "--timeout=60s"]);
    // The sandboxes go with their pods, and with them the bridge's addresses.
    wait_for(
        Duration::from_secs(60),
        "every pod address to be released",
        || async {
            let held = std::fs::read_dir(ctd.dir.join("ipam/flotilla"))
                .ok()?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("10.88."))
                .count();
            (held == 0).then_some(())
        },
    )
    .await;
}
