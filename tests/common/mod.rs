//! Test harness: real `flotilla server` processes on per-test loopback addresses.
//!
//! Each cluster gets its own `127.X.Y.0/24` block (replica N listens on `127.X.Y.N`), so tests
//! run in parallel without port clashes and every replica has an address of its own. Every
//! wait has a deadline and says what it was waiting for.

#![allow(dead_code)]

pub mod agent;
pub mod kubectl;
#[allow(unused_imports)]
pub use agent::Agent;
#[allow(unused_imports)]
pub use kubectl::{req, req_tls, req_with, Kubectl, KUBECTL};

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::client::{Client, ClientError};
use flotilla::gateway::json::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;

pub const API_PORT: u16 = 6441;

/// Tests' own keys start with a letter; the Kubernetes API keeps its objects under
/// `/registry/`, which sorts before. Reads and watches of "everything" start here.
pub const USER_KEYS_START: &[u8] = b"A";
pub const PEER_PORT: u16 = 7441;

/// GET `path` from replica `id` of `c`: the status and the JSON body (`Null` if none).
pub async fn kube_get(c: &Cluster, id: u64, path: &str) -> (u16, serde_json::Value) {
    req(
        &[c.replica(id).api()],
        http::Method::GET,
        path,
        "application/json",
        &serde_json::Value::Null,
    )
    .await
}

/// Waits until `check` returns `Some`, polling every 20 ms, or panics with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Replica {
    pub id: u64,
    pub ip: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
}

impl Replica {
    pub fn api(&self) -> String {
        format!("{}:{API_PORT}", self.ip)
    }
    pub fn peer(&self) -> String {
        format!("{}:{PEER_PORT}", self.ip)
    }
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("replica is running").id() as i32)
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub replicas: Vec<Replica>,
    pub args: Vec<String>,
    pub initial_cluster: String,
    /// With TLS on the API: the clients' config (and `https`).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

fn free_prefix() -> String {
    let mut rng = rand::thread_rng();
    loop {
        let prefix = format!("127.{}.{}", rng.gen_range(1..=254), rng.gen_range(1..=254));
        let free = (1..=5).all(|n| {
            [API_PORT, PEER_PORT]
                .iter()
                .all(|p| std::net::TcpListener::bind(format!("{prefix}.{n}:{p}")).is_ok())
        });
        if free {
            return prefix;
        }
    }
}

impl Cluster {
    /// Starts `n` replicas with extra `args` and waits for a leader.
    pub async fn start(n: u64, args: &[&str]) -> Cluster {
        let mut c = Cluster::new(n, args);
        for id in 1..=n {
            c.launch(id, &[]);
        }
        c.wait_leader().await;
        c.wait_bootstrapped().await;
        c
    }

    /// Waits until the leader has created the system namespaces and their service accounts,
    /// so tests that count revisions do not race with those writes.
    pub async fn wait_bootstrapped(&self) {
        let client = self.client();
        wait_for(
            Duration::from_secs(30),
            "the system namespaces to be created",
            || async {
                let server = client.servers().first()?.clone();
                let (status, _) = client
                    .get_text(
                        &server,
                        "/api/v1/namespaces/kube-node-lease/serviceaccounts/default",
                    )
                    .await
                    .ok()?;
                (status == 200).then_some(())
            },
        )
        .await
    }

    /// Prepares `n` replica slots (addresses, data directories) without starting them.
    pub fn new(n: u64, args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = free_prefix();
        let initial_cluster = (1..=n)
            .map(|id| format!("{id}={prefix}.{id}:{PEER_PORT}"))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            replicas: (1..=n)
                .map(|id| Replica {
                    id,
                    ip: format!("{prefix}.{id}"),
                    data_dir: dir.path().join(id.to_string()),
                    child: None,
                })
                .collect(),
            dir,
            prefix,
            args: args.iter().map(|s| s.to_string()).collect(),
            initial_cluster,
            tls: None,
        }
    }

    pub fn replica(&self, id: u64) -> &Replica {
        &self.replicas[(id - 1) as usize]
    }

    fn replica_mut(&mut self, id: u64) -> &mut Replica {
        &mut self.replicas[(id - 1) as usize]
    }

    /// Starts replica `id` (again), appending to its log file.
    pub fn launch(&mut self, id: u64, extra: &[&str]) {
        let initial = self.initial_cluster.clone();
        let args = self.args.clone();
        let r = self.replica_mut(id);
        assert!(r.child.is_none(), "replica {id} is already running");
        std::fs::create_dir_all(&r.data_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(r.data_dir.with_extension("log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .arg("server")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&r.data_dir)
            .args(["--listen-api", &r.api()])
            .args(["--listen-peer", &r.peer()])
            .args(["--initial-cluster", &initial])
            .args(&args)
            .args(extra)
            .env(
                "FLOTILLA_LOG",
                "info,openraft=warn,openraft::replication=off",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning flotilla server");
        r.child = Some(child);
    }

    /// Adds replica slot `id` (not in the initial cluster) without starting it.
    pub fn add_slot(&mut self, id: u64) {
        assert_eq!(id as usize, self.replicas.len() + 1);
        self.replicas.push(Replica {
            id,
            ip: format!("{}.{id}", self.prefix),
            data_dir: self.dir.path().join(id.to_string()),
            child: None,
        });
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: u64) {
        let r = self.replica_mut(id);
        let mut child = r.child.take().expect("replica is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) {
        let r = self.replica_mut(id);
        let mut child = r.child.take().expect("replica is running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "replica {id} exited with {status} on SIGTERM"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {id} did not stop within 15 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pause(&self, id: u64) {
        kill(self.replica(id).pid(), Signal::SIGSTOP).unwrap();
    }

    pub fn resume(&self, id: u64) {
        kill(self.replica(id).pid(), Signal::SIGCONT).unwrap();
    }

    pub fn running(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .filter(|r| r.child.is_some())
            .map(|r| r.id)
            .collect()
    }

    /// A failover client over every running replica.
    pub fn client(&self) -> Client {
        Client::with_tls(
            self.replicas
                .iter()
                .filter(|r| r.child.is_some())
                .map(|r| r.api())
                .collect(),
            Duration::from_secs(10),
            self.tls.clone(),
        )
    }

    /// A client bound to one replica.
    pub fn client_for(&self, id: u64) -> Client {
        Client::with_tls(
            vec![self.replica(id).api()],
            Duration::from_secs(10),
            self.tls.clone(),
        )
    }

    pub async fn status(&self, id: u64) -> Result<StatusResponse, ClientError> {
        self.client_for(id)
            .post_to(
                &self.replica(id).api(),
                "/v3/maintenance/status",
                &serde_json::json!({}),
            )
            .await
    }

    /// Waits until every running replica agrees on one leader (which is running).
    pub async fn wait_leader(&self) -> u64 {
        wait_for(
            Duration::from_secs(30),
            "a leader that every running replica agrees on",
            || async {
                let mut leader = None;
                for id in self.running() {
                    let s = self.status(id).await.ok()?;
                    if s.leader == 0 || leader.is_some_and(|l| l != s.leader) {
                        return None;
                    }
                    leader = Some(s.leader);
                }
                leader.filter(|l| self.running().contains(l))
            },
        )
        .await
    }

    /// Waits until replica `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        wait_for(
            Duration::from_secs(30),
            &format!("replica {id} to apply index {index}"),
            || async {
                let s = self.status(id).await.ok()?;
                (s.raft_applied_index >= index).then_some(())
            },
        )
        .await
    }

    /// The metric `name` as exposed by replica `id`.
    pub async fn metric(&self, id: u64, name: &str) -> Option<f64> {
        let (_, text) = self
            .client_for(id)
            .get_text(&self.replica(id).api(), "/metrics")
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            if let Some(mut c) = r.child.take() {
                // A paused replica must be resumed to die promptly.
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            // Keep the replicas' logs of a failed test (not their data, hundreds of MB).
            let keep = std::env::temp_dir().join(format!(
                "flotilla-test-logs-{}",
                self.dir
                    .path()
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ));
            if std::fs::create_dir_all(&keep).is_ok() {
                for entry in std::fs::read_dir(self.dir.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "log") {
                        let _ = std::fs::copy(&path, keep.join(entry.file_name()));
                    }
                }
                eprintln!("replica logs kept in {}", keep.display());
            }
        }
    }
}

/// Puts `key = value`, retrying while the cluster says the write was certainly not applied
/// (503, connection failures); a 504 is retried too, since re-putting the same value is
/// harmless for these tests. Returns the revision.
pub async fn put(client: &Client, key: &str, value: &str) -> i64 {
    let req = PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        prev_kv: false,
        lease: 0,
    };
    wait_for(Duration::from_secs(30), &format!("put {key}"), || async {
        match client.post::<_, PutResponse>("/v3/kv/put", &req).await {
            Ok(r) => Some(r.header.revision),
            Err(ClientError::Api { status, .. }) if status != 503 && status != 504 => {
                panic!("put {key} failed with {status}")
            }
            Err(_) => None,
        }
    })
    .await
}

/// A linearizable (or serializable) read of one key.
pub async fn get(
    client: &Client,
    key: &str,
    serializable: bool,
) -> Result<Option<KeyValue>, ClientError> {
    let req = RangeRequest {
        key: key.as_bytes().to_vec(),
        serializable,
        ..RangeRequest::default()
    };
    let r: RangeResponse = client.post("/v3/kv/range", &req).await?;
    Ok(r.kvs.into_iter().next())
}

/// Every key from `prefix` on, read linearizably.
pub async fn all(client: &Client, serializable: bool) -> Result<RangeResponse, ClientError> {
    client
        .post(
            "/v3/kv/range",
            &RangeRequest {
                key: USER_KEYS_START.to_vec(),
                range_end: vec![0],
                serializable,
                ..RangeRequest::default()
            },
        )
        .await
}

/// Reads watch lines from one replica until `until` returns true for the collected events.
pub struct WatchStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl WatchStream {
    pub async fn open(client: &Client, server: &str, start_revision: i64) -> WatchStream {
        let req = WatchRequest {
            create_request: WatchCreateRequest {
                key: USER_KEYS_START.to_vec(),
                range_end: vec![0],
                start_revision,
                progress_notify: false,
                prev_kv: false,
            },
        };
        let resp = client
            .post_raw(server, "/v3/watch", serde_json::to_vec(&req).unwrap(), None)
            .await
            .expect("opening a watch");
        assert_eq!(resp.status(), 200, "watch refused");
        WatchStream {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next message, within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<WatchResponse> {
        use http_body_util::BodyExt;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let msg: WatchLine = serde_json::from_slice(&line).expect("a watch line");
                return Some(msg.result);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        self.buf.extend_from_slice(d);
                    }
                }
                _ => return None,
            }
        }
    }

    /// Collects event revisions until `last` has been seen; panics on a cancel or timeout.
    pub async fn revisions_until(&mut self, last: i64, timeout: Duration) -> Vec<i64> {
        let mut revs = Vec::new();
        let deadline = Instant::now() + timeout;
        while revs.last().copied().unwrap_or(0) < last {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = self.next(left).await.unwrap_or_else(|| {
                panic!(
                    "watch ended or stalled; saw revisions up to {:?}",
                    revs.last()
                )
            });
            assert!(!msg.canceled, "watch cancelled: {}", msg.cancel_reason);
            revs.extend(msg.events.iter().map(|e| e.kv.mod_revision));
        }
        revs
    }
}

/// An iptables partition that cuts one replica off from the others of its cluster (only
/// this cluster's own loopback addresses are named). The rules are removed when it is
/// dropped, also when the test panics.
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    fn iptables(op: &str, rule: &[String]) -> bool {
        Command::new("iptables")
            .args(["-w", op, "INPUT"])
            .args(rule)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for r in &self.rules {
            while Self::iptables("-D", r) {}
        }
    }
}

impl Cluster {
    /// Drops every packet between 127.0.0.1 (where local clients such as agents connect
    /// from) and replica `id`, both directions; the replicas still reach each other.
    pub fn cut_off_local_clients(&self, id: u64) -> Partition {
        let me = self.replica(id).ip.clone();
        let local = "127.0.0.1".to_string();
        let mut p = Partition { rules: Vec::new() };
        for (s, d) in [(&me, &local), (&local, &me)] {
            let rule: Vec<String> = ["-i", "lo", "-s", s, "-d", d, "-j", "DROP"]
                .iter()
                .map(|x| x.to_string())
                .collect();
            assert!(
                Partition::iptables("-I", &rule),
                "iptables -I INPUT {rule:?} failed"
            );
            p.rules.push(rule);
        }
        p
    }

    /// Drops every packet between replica `id` and the other replicas (both directions);
    /// clients on 127.0.0.1 still reach it.
    pub fn isolate(&self, id: u64) -> Partition {
        let me = self.replica(id).ip.clone();
        let mut p = Partition { rules: Vec::new() };
        for other in self.replicas.iter().filter(|r| r.id != id) {
            for (s, d) in [(&me, &other.ip), (&other.ip, &me)] {
                let rule: Vec<String> = ["-i", "lo", "-s", s, "-d", d, "-j", "DROP"]
                    .iter()
                    .map(|x| x.to_string())
                    .collect();
                assert!(
                    Partition::iptables("-I", &rule),
                    "iptables -I INPUT {rule:?} failed"
                );
                p.rules.push(rule);
            }
        }
        p
    }
}

/// One Kubernetes watch stream (newline-delimited JSON events).
pub struct KubeWatch {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl KubeWatch {
    /// Opens the watch `path` (with its query) on replica `id`.
    pub async fn open_path(c: &Cluster, id: u64, path: &str) -> Result<KubeWatch, String> {
        let resp = c
            .client_for(id)
            .get_stream(&c.replica(id).api(), path)
            .await
            .map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("watch {path} refused: {}", resp.status()));
        }
        Ok(KubeWatch {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// The next event; `None` when the stream ends, breaks or stays silent for `idle`.
    pub async fn next(&mut self, idle: Duration) -> Option<serde_json::Value> {
        use http_body_util::BodyExt;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON watch event"));
            }
            match tokio::time::timeout(idle, self.body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        self.buf.extend_from_slice(d);
                    }
                }
                _ => return None,
            }
        }
    }
}
