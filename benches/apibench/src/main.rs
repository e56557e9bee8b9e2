//! apibench: the Kubernetes API of a three-replica Flotilla cluster under a watch-heavy load.
//!
//! It starts the cluster on loopback (release binary, temporary data directories on the same
//! disk), then measures, in order:
//! 1. **Mutating calls with watchers open**: `--watchers` watches on one namespace's
//!    ConfigMaps, spread over the three replicas; a paced writer makes `--rate` changes per
//!    second for `--seconds` (create, merge-patch, delete of one object after another, sent
//!    to the replicas in turn). It reports the latency of each call and the watch delivery
//!    latency of every event at every watcher: from the write's acknowledgement, and from
//!    the moment it was sent. Every event must reach every watcher.
//! 2. **Reads**: GET of one object (linearizable, and `resourceVersion=0`), and a small LIST,
//!    one client; then GET throughput with `--concurrency` clients.
//! 3. **Many pods**: creates `--pods` pods with `--concurrency` clients (throughput and
//!    latency), then LISTs them all from one replica: whole (JSON and as a Table, as kubectl
//!    asks) and in pages of 500, timing each and sampling that replica's resident memory.
//!
//! It prints the figures and the command that produced them, and writes them as JSON.
//!
//! `--scenario scheduler` and `--scenario failover` measure the control plane instead
//! (see `control.rs`); `--scenario startup` the node agents (see `startup.rs`);
//! `--scenario services` the cluster DNS and the service proxy (see `services.rs`);
//! `--scenario density` hollow nodes under a load of namespaces, Deployments, Services and
//! Jobs (see `density.rs`).

mod control;
mod density;
mod services;
mod startup;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Parser, Debug, Clone)]
pub(crate) struct Args {
    /// The flotilla binary (a release build).
    #[arg(long)]
    pub(crate) flotilla: PathBuf,
    /// What to measure: `api` (the API under watch load), `scheduler` (pods bound per
    /// second), `failover` (controllers after a leader is killed) or `startup` (pod startup
    /// latency through real agents, and the agents' cost).
    #[arg(long, default_value = "api")]
    scenario: String,
    /// Nodes registered for the scheduler scenario.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Scheduler scenario: create every pod while no node is Ready, then release them all.
    #[arg(long)]
    pub(crate) backlog: bool,
    /// Agents started for the startup scenario.
    #[arg(long, default_value_t = 2)]
    pub(crate) agents: usize,
    /// The agents' runtime in the startup scenario: `process` or `cri`.
    #[arg(long, default_value = "process")]
    pub(crate) runtime: String,
    /// The CRI socket for `--runtime cri`.
    #[arg(long, default_value = "unix:///run/containerd/containerd.sock")]
    pub(crate) cri_endpoint: String,
    /// Startup scenario: pods per node for the agents' cost.
    #[arg(long, default_value_t = 110)]
    pub(crate) pods_per_node: usize,
    /// Leader kills in the failover scenario.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Watches kept open during the write phase.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Changes per second in the write phase.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Length of the write phase.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Single-client GETs of each kind.
    #[arg(long, default_value_t = 1000)]
    gets: usize,
    /// Pods to create and list (api), or to schedule (scheduler).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) pods: usize,
    /// Clients for the throughput phases.
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// Directory for data (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Density scenario: declared pods per second.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) pod_rate: f64,
    /// Density scenario: replicas per Deployment.
    #[arg(long, default_value_t = 100)]
    pub(crate) deployment_size: usize,
    /// Density scenario: pods per namespace.
    #[arg(long, default_value_t = 3000)]
    pub(crate) namespace_pods: usize,
    /// Density scenario: kill the leader at full scale.
    #[arg(long)]
    pub(crate) kill_leader: bool,
    /// Write the figures here as JSON.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

/// One write of the write phase: its name, the watch event it causes, method, path,
/// content type and body.
type Op = (
    &'static str,
    &'static str,
    Method,
    String,
    &'static str,
    Vec<u8>,
);

pub(crate) type Http = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

const NS: &str = "bench";

pub(crate) fn http_client() -> Http {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(2)));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(c)
}

/// One request; the whole answer.
pub(crate) async fn send(
    http: &Http,
    method: Method,
    url: String,
    content_type: &str,
    accept: &str,
    body: Vec<u8>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", content_type)
        .header("accept", accept)
        .body(Full::new(Bytes::from(body)))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), http.request(req))
        .await
        .context("request timed out")??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

pub(crate) async fn ok(
    http: &Http,
    method: Method,
    url: String,
    content_type: &str,
    body: Vec<u8>,
) -> anyhow::Result<Bytes> {
    let (status, b) = send(http, method, url, content_type, "application/json", body).await?;
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&b));
    }
    Ok(b)
}

/// A three-replica cluster of release binaries on loopback.
pub(crate) struct Cluster {
    pub(crate) apis: Vec<String>,
    children: Vec<Option<Child>>,
    bin: PathBuf,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn start(bin: &Path, dir: &Path) -> anyhow::Result<Cluster> {
        Self::start_with(bin, dir, &[])
    }

    /// A cluster whose servers get `extra` arguments too.
    pub(crate) fn start_with(bin: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Cluster> {
        let mut c = Cluster {
            apis: (1..=3).map(|i| format!("127.0.0.1:2645{i}")).collect(),
            children: vec![None, None, None],
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            // The load generator's clients are many on purpose (512 nodes turning Ready at
            // once, 1,000 watchers): the replicas' in-flight bounds (429 beyond 400 reads
            // or 200 writes) are off, so the figures measure the work, not the shedding.
            extra: [
                "--max-requests-inflight",
                "0",
                "--max-mutating-requests-inflight",
                "0",
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .map(str::to_string)
            .collect(),
        };
        for i in 0..3 {
            c.spawn(i)?;
        }
        Ok(c)
    }

    /// Starts replica `i` (0-based) on its data directory.
    pub(crate) fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial = "1=127.0.0.1:27451,2=127.0.0.1:27452,3=127.0.0.1:27453";
        let id = i + 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("flotilla-{id}.log")))?;
        let child = Command::new(&self.bin)
            .args([
                "server",
                "--id",
                &id.to_string(),
                "--data-dir",
                &self
                    .dir
                    .join(format!("flotilla-{id}"))
                    .display()
                    .to_string(),
                "--listen-api",
                &format!("127.0.0.1:2645{id}"),
                "--listen-peer",
                &format!("127.0.0.1:2745{id}"),
                "--initial-cluster",
                initial,
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting flotilla")?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// `kill -9` of replica `i`.
    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().map_or(0, Child::id)
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().flatten().map(Child::id).collect()
    }
}

/// Follows the watch at `url` until `stop`, calling `on` with each event and the moment its
/// bytes arrived; an ERROR event, or the stream ending or breaking, is an error.
pub(crate) fn watch_events(
    http: Http,
    url: String,
    stop: Arc<AtomicBool>,
    mut on: impl FnMut(&Value, Instant) + Send + 'static,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let req = http::Request::get(&url).body(Full::new(Bytes::new()))?;
        let resp = http.request(req).await?;
        if resp.status() != StatusCode::OK {
            bail!("watch refused: {}", resp.status());
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match tokio::time::timeout(Duration::from_millis(200), body.frame()).await {
                Err(_) => continue,
                Ok(None) => bail!("watch {url} ended"),
                Ok(Some(Err(e))) => bail!("watch {url} broke: {e}"),
                Ok(Some(Ok(frame))) => {
                    let now = Instant::now();
                    if let Some(d) = frame.data_ref() {
                        buf.extend_from_slice(d);
                    }
                    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        let ev: Value = serde_json::from_slice(&line)?;
                        if ev["type"] == "ERROR" {
                            bail!("watch error: {ev}");
                        }
                        on(&ev, now);
                    }
                }
            }
        }
        Ok(())
    })
}

/// CPU seconds (user+system) used so far by `pids`.
pub(crate) fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .sum()
}

/// Resident memory of `pid`, bytes.
pub(crate) fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    count: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

pub(crate) fn latency(mut micros: Vec<u64>) -> Latency {
    micros.sort_unstable();
    let p = |q: f64| {
        if micros.is_empty() {
            0.0
        } else {
            micros[((micros.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0
        }
    };
    Latency {
        count: micros.len(),
        p50_ms: p(0.5),
        p90_ms: p(0.9),
        p99_ms: p(0.99),
        max_ms: micros.last().copied().unwrap_or(0) as f64 / 1000.0,
    }
}

#[derive(Debug, Default, Serialize)]
struct Results {
    command: String,
    watchers: usize,
    rate_per_sec: u64,
    write_seconds: u64,
    create: Latency,
    patch: Latency,
    delete: Latency,
    mutating_all: Latency,
    write_errors: usize,
    /// Watch delivery, from the write's acknowledgement (an event that arrives before the
    /// acknowledgement counts as 0).
    delivery_after_ack: Latency,
    /// Watch delivery, from the moment the write was sent.
    delivery_from_send: Latency,
    deliveries_expected: usize,
    deliveries_missing: usize,
    server_cpu_percent_during_writes: f64,
    /// This load generator's own CPU in the same window (it shares the machine).
    client_cpu_percent_during_writes: f64,
    get_linearizable: Latency,
    get_rv0: Latency,
    list_small: Latency,
    gets_per_sec_concurrent: f64,
    concurrency: usize,
    pods: usize,
    pod_creates_per_sec: f64,
    pod_create: Latency,
    list_pods_json_ms: Vec<f64>,
    list_pods_json_bytes: usize,
    list_pods_table_ms: Vec<f64>,
    list_pods_paged_500_ms: Vec<f64>,
    list_replica_rss_before_mib: f64,
    list_replica_rss_peak_mib: f64,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    object: EventObject,
}

#[derive(Deserialize)]
struct EventObject {
    metadata: EventMeta,
}

#[derive(Deserialize)]
struct EventMeta {
    #[serde(default)]
    name: String,
}

/// What one watcher saw: (name, event type, when).
type Seen = Vec<(String, String, Instant)>;

async fn watcher(
    http: Http,
    api: String,
    rv: String,
    opened: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Seen> {
    let url = format!(
        "http://{api}/api/v1/namespaces/{NS}/configmaps?watch=true&resourceVersion={rv}&timeoutSeconds=3600"
    );
    let req = http::Request::get(url).body(Full::new(Bytes::new()))?;
    let resp = http.request(req).await?;
    if resp.status() != StatusCode::OK {
        bail!("watch refused: {}", resp.status());
    }
    opened.fetch_add(1, Ordering::SeqCst);
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match tokio::time::timeout(Duration::from_millis(200), body.frame()).await {
            Err(_) => continue,
            Ok(None) => bail!("watch on {api} ended"),
            Ok(Some(Err(e))) => bail!("watch on {api} broke: {e}"),
            Ok(Some(Ok(frame))) => {
                let now = Instant::now();
                if let Some(d) = frame.data_ref() {
                    buf.extend_from_slice(d);
                }
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let ev: Event = serde_json::from_slice(&line)
                        .with_context(|| String::from_utf8_lossy(&line).into_owned())?;
                    if ev.kind == "ERROR" {
                        bail!("watch error: {}", String::from_utf8_lossy(&line));
                    }
                    if ev.kind != "BOOKMARK" {
                        seen.push((ev.object.metadata.name, ev.kind, now));
                    }
                }
            }
        }
    }
    Ok(seen)
}

/// One acknowledged write: (name, event type it causes) → (sent, acknowledged).
type Writes = HashMap<(String, String), (Instant, Instant)>;

async fn write_phase(
    args: &Args,
    c: &Cluster,
    http: &Http,
    res: &mut Results,
) -> anyhow::Result<()> {
    let list = ok(
        http,
        Method::GET,
        format!("http://{}/api/v1/namespaces/{NS}/configmaps", c.apis[0]),
        "application/json",
        vec![],
    )
    .await?;
    let rv = serde_json::from_slice::<Value>(&list)?["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let opened = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut watchers = Vec::new();
    for i in 0..args.watchers {
        watchers.push(tokio::spawn(watcher(
            http_client(),
            c.apis[i % 3].clone(),
            rv.clone(),
            opened.clone(),
            stop.clone(),
        )));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while opened.load(Ordering::SeqCst) < args.watchers {
        if Instant::now() > deadline {
            bail!("only {} watchers opened", opened.load(Ordering::SeqCst));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{} watchers open; writing {}/s for {}s",
        args.watchers, args.rate, args.seconds
    );

    let writes: Arc<Mutex<Writes>> = Arc::new(Mutex::new(HashMap::new()));
    let lat: Arc<Mutex<HashMap<&'static str, Vec<u64>>>> = Arc::new(Mutex::new(HashMap::new()));
    let errors = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_micros(1_000_000 / args.rate.max(1));
    let objects = (args.rate * args.seconds / 3).max(1) as usize;
    let cpu0 = cpu_seconds(&c.pids());
    let me = [std::process::id()];
    let my_cpu0 = cpu_seconds(&me);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..objects {
        // Object k's three changes are due at t0 + (3k + j) * interval.
        let due = t0 + interval * (3 * k as u32);
        tokio::time::sleep_until(due.into()).await;
        let (http, apis, writes, lat, errors) = (
            http.clone(),
            c.apis.clone(),
            writes.clone(),
            lat.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let name = format!("obj-{k}");
            let ops: [Op; 3] = [
                (
                    "create",
                    "ADDED",
                    Method::POST,
                    format!("/api/v1/namespaces/{NS}/configmaps"),
                    "application/json",
                    serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"app": "bench"}}, "data": {"v": "0"}})).unwrap(),
                ),
                (
                    "patch",
                    "MODIFIED",
                    Method::PATCH,
                    format!("/api/v1/namespaces/{NS}/configmaps/{name}"),
                    "application/merge-patch+json",
                    br#"{"data":{"v":"1"}}"#.to_vec(),
                ),
                (
                    "delete",
                    "DELETED",
                    Method::DELETE,
                    format!("/api/v1/namespaces/{NS}/configmaps/{name}"),
                    "application/json",
                    vec![],
                ),
            ];
            for (j, (op, event, method, path, ctype, body)) in ops.into_iter().enumerate() {
                tokio::time::sleep_until((due + interval * j as u32).into()).await;
                let api = &apis[(3 * k + j) % 3];
                let sent = Instant::now();
                let r = ok(&http, method, format!("http://{api}{path}"), ctype, body).await;
                let acked = Instant::now();
                match r {
                    Ok(_) => {
                        lat.lock().unwrap().entry(op).or_default().push((acked - sent).as_micros() as u64);
                        writes
                            .lock()
                            .unwrap()
                            .insert((name.clone(), event.to_string()), (sent, acked));
                    }
                    Err(e) => {
                        eprintln!("{op} {name}: {e}");
                        errors.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let write_secs = t0.elapsed().as_secs_f64();
    res.server_cpu_percent_during_writes = (cpu_seconds(&c.pids()) - cpu0) / write_secs * 100.0;
    res.client_cpu_percent_during_writes = (cpu_seconds(&me) - my_cpu0) / write_secs * 100.0;
    // Let the last events arrive, then stop the watchers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writes.lock().unwrap().clone();
    let mut after_ack = Vec::new();
    let mut from_send = Vec::new();
    let mut received = 0;
    for w in watchers {
        let seen = w.await??;
        for (name, kind, at) in seen {
            if let Some((sent, acked)) = writes.get(&(name, kind)) {
                received += 1;
                after_ack.push(at.saturating_duration_since(*acked).as_micros() as u64);
                from_send.push(at.saturating_duration_since(*sent).as_micros() as u64);
            }
        }
    }
    let lat = lat.lock().unwrap().clone();
    res.create = latency(lat.get("create").cloned().unwrap_or_default());
    res.patch = latency(lat.get("patch").cloned().unwrap_or_default());
    res.delete = latency(lat.get("delete").cloned().unwrap_or_default());
    res.mutating_all = latency(lat.values().flatten().copied().collect());
    res.write_errors = errors.load(Ordering::SeqCst);
    res.deliveries_expected = writes.len() * args.watchers;
    res.deliveries_missing = res.deliveries_expected.saturating_sub(received);
    res.delivery_after_ack = latency(after_ack);
    res.delivery_from_send = latency(from_send);
    Ok(())
}

async fn read_phase(
    args: &Args,
    c: &Cluster,
    http: &Http,
    res: &mut Results,
) -> anyhow::Result<()> {
    ok(
        http,
        Method::POST,
        format!("http://{}/api/v1/namespaces/{NS}/configmaps", c.apis[0]),
        "application/json",
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "target"}, "data": {"v": "x"}}))?,
    )
    .await?;
    let timed = |suffix: &'static str| {
        let http = http.clone();
        let apis = c.apis.clone();
        let n = args.gets;
        async move {
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                let t = Instant::now();
                ok(
                    &http,
                    Method::GET,
                    format!("http://{}{suffix}", apis[i % 3]),
                    "application/json",
                    vec![],
                )
                .await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok(latency(lat))
        }
    };
    res.get_linearizable = timed("/api/v1/namespaces/bench/configmaps/target").await?;
    res.get_rv0 = timed("/api/v1/namespaces/bench/configmaps/target?resourceVersion=0").await?;
    res.list_small = timed("/api/v1/namespaces/bench/configmaps").await?;
    // Throughput: concurrent clients for five seconds.
    let stop_at = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        let (http, api) = (http.clone(), c.apis[i % 3].clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop_at {
                ok(
                    &http,
                    Method::GET,
                    format!("http://{api}/api/v1/namespaces/bench/configmaps/target"),
                    "application/json",
                    vec![],
                )
                .await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    res.gets_per_sec_concurrent = total as f64 / 5.0;
    Ok(())
}

fn pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{i:05}"), "labels": {"app": "bench", "shard": (i % 10).to_string()}},
        "spec": {"containers": [{
            "name": "app", "image": "registry.example/app:1.0",
            "ports": [{"containerPort": 8080}],
            "env": [{"name": "INDEX", "value": i.to_string()}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        }]},
    })
}

async fn pods_phase(
    args: &Args,
    c: &Cluster,
    http: &Http,
    res: &mut Results,
) -> anyhow::Result<()> {
    res.pods = args.pods;
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let (http, apis, next, total) = (http.clone(), c.apis.clone(), next.clone(), args.pods);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                ok(
                    &http,
                    Method::POST,
                    format!("http://{}/api/v1/namespaces/{NS}/pods", apis[(i + w) % 3]),
                    "application/json",
                    serde_json::to_vec(&pod(i))?,
                )
                .await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    res.pod_creates_per_sec = args.pods as f64 / t0.elapsed().as_secs_f64();
    res.pod_create = latency(lat);
    eprintln!(
        "{} pods created at {:.0}/s",
        args.pods, res.pod_creates_per_sec
    );

    // LISTs from replica 2, sampling its memory.
    let (api, pid) = (c.apis[1].clone(), c.pid(1));
    res.list_replica_rss_before_mib = rss(pid) as f64 / 1048576.0;
    let peak = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::SeqCst) {
                peak.fetch_max(rss(pid) as usize, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    for _ in 0..3 {
        let t = Instant::now();
        let (status, body) = send(
            http,
            Method::GET,
            format!("http://{api}/api/v1/namespaces/{NS}/pods"),
            "application/json",
            "application/json",
            vec![],
        )
        .await?;
        res.list_pods_json_ms
            .push(t.elapsed().as_secs_f64() * 1000.0);
        if status != StatusCode::OK {
            bail!("LIST pods: {status}");
        }
        let items = serde_json::from_slice::<Value>(&body)?["items"]
            .as_array()
            .map_or(0, Vec::len);
        if items != args.pods {
            bail!("LIST returned {items} pods, not {}", args.pods);
        }
        res.list_pods_json_bytes = body.len();
    }
    for _ in 0..3 {
        let t = Instant::now();
        let (status, _) = send(
            http,
            Method::GET,
            format!("http://{api}/api/v1/namespaces/{NS}/pods?limit=500"),
            "application/json",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
            vec![],
        )
        .await?;
        // kubectl pages with limit=500: fetch the rest the same way.
        let mut pages_ok = status == StatusCode::OK;
        let mut cont = String::new();
        loop {
            let url = format!("http://{api}/api/v1/namespaces/{NS}/pods?limit=500&continue={cont}");
            let (s, body) = send(
                http,
                Method::GET,
                url,
                "application/json",
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
                vec![],
            )
            .await?;
            pages_ok &= s == StatusCode::OK;
            let v: Value = serde_json::from_slice(&body)?;
            cont = v["metadata"]["continue"].as_str().unwrap_or("").to_string();
            if cont.is_empty() {
                break;
            }
        }
        if !pages_ok {
            bail!("Table LIST failed");
        }
        res.list_pods_table_ms
            .push(t.elapsed().as_secs_f64() * 1000.0);
    }
    for _ in 0..3 {
        let t = Instant::now();
        let mut cont = String::new();
        let mut n = 0;
        loop {
            let url = format!("http://{api}/api/v1/namespaces/{NS}/pods?limit=500&continue={cont}");
            let body = ok(http, Method::GET, url, "application/json", vec![]).await?;
            let v: Value = serde_json::from_slice(&body)?;
            n += v["items"].as_array().map_or(0, Vec::len);
            cont = v["metadata"]["continue"].as_str().unwrap_or("").to_string();
            if cont.is_empty() {
                break;
            }
        }
        if n != args.pods {
            bail!("paged LIST returned {n} pods, not {}", args.pods);
        }
        res.list_pods_paged_500_ms
            .push(t.elapsed().as_secs_f64() * 1000.0);
    }
    sampling.store(false, Ordering::SeqCst);
    let _ = sampler.join();
    res.list_replica_rss_peak_mib = peak.load(Ordering::SeqCst) as f64 / 1048576.0;
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn print(res: &Results) {
    let row = |name: &str, l: &Latency| {
        println!(
            "  {name:<28} n={:<7} p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        )
    };
    println!(
        "\n== mutating calls at {}/s with {} watchers open ({} s)",
        res.rate_per_sec, res.watchers, res.write_seconds
    );
    row("create", &res.create);
    row("patch (merge)", &res.patch);
    row("delete", &res.delete);
    row("all mutating", &res.mutating_all);
    println!(
        "  write errors: {}; CPU during writes: servers {:.0}%, this load generator {:.0}% (of 200%)",
        res.write_errors, res.server_cpu_percent_during_writes, res.client_cpu_percent_during_writes
    );
    println!(
        "== watch delivery ({} expected, {} missing)",
        res.deliveries_expected, res.deliveries_missing
    );
    row("after acknowledgement", &res.delivery_after_ack);
    row("from send", &res.delivery_from_send);
    println!("== reads (one client)");
    row("GET (linearizable)", &res.get_linearizable);
    row("GET resourceVersion=0", &res.get_rv0);
    row("LIST (1 object)", &res.list_small);
    println!(
        "  GET throughput, {} clients: {:.0}/s",
        res.concurrency, res.gets_per_sec_concurrent
    );
    println!("== {} pods", res.pods);
    println!("  create throughput: {:.0}/s", res.pod_creates_per_sec);
    row("create", &res.pod_create);
    println!(
        "  LIST all (JSON, {:.1} MiB): {:?} ms",
        res.list_pods_json_bytes as f64 / 1048576.0,
        res.list_pods_json_ms
            .iter()
            .map(|x| x.round())
            .collect::<Vec<_>>()
    );
    println!(
        "  LIST all as Table in pages of 500 (kubectl get): {:?} ms",
        res.list_pods_table_ms
            .iter()
            .map(|x| x.round())
            .collect::<Vec<_>>()
    );
    println!(
        "  LIST all in pages of 500 (JSON): {:?} ms",
        res.list_pods_paged_500_ms
            .iter()
            .map(|x| x.round())
            .collect::<Vec<_>>()
    );
    println!(
        "  listing replica RSS: {:.0} MiB before, {:.0} MiB peak",
        res.list_replica_rss_before_mib, res.list_replica_rss_peak_mib
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_fd_limit();
    let tmp = tempfile::tempdir_in("/var/tmp")?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let http = http_client();
    match args.scenario.as_str() {
        "api" => {}
        "scheduler" => {
            // Nodes are registered without heartbeats: keep them Ready for the run.
            let c = Cluster::start_with(
                &args.flotilla,
                &dir,
                &["--node-monitor-grace-period", "100000"],
            )?;
            return control::scheduler(&args, &c, &http).await;
        }
        "failover" => {
            let mut c = Cluster::start_with(
                &args.flotilla,
                &dir,
                &["--node-monitor-grace-period", "100000"],
            )?;
            return control::failover(&args, &mut c, &http).await;
        }
        "startup" => {
            let c = Cluster::start(&args.flotilla, &dir)?;
            return startup::startup(&args, &c, &http, &dir).await;
        }
        "density" => {
            let mut c = Cluster::start(&args.flotilla, &dir)?;
            return density::density(&args, &mut c, &http, &dir).await;
        }
        "services" => {
            let c = Cluster::start_with(
                &args.flotilla,
                &dir,
                &["--service-cluster-ip-range", "127.97.0.0/16"],
            )?;
            return services::services(&args, &c, &http, &dir).await;
        }
        other => bail!(
            "unknown scenario {other:?}: api, scheduler, failover, startup, services or density"
        ),
    }
    let c = Cluster::start(&args.flotilla, &dir)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for api in &c.apis {
        loop {
            let r = send(
                &http,
                Method::GET,
                format!("http://{api}/api/v1/namespaces/default"),
                "application/json",
                "application/json",
                vec![],
            )
            .await;
            if matches!(r, Ok((StatusCode::OK, _))) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the cluster did not come up (logs in {})", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    ok(
        &http,
        Method::POST,
        format!("http://{}/api/v1/namespaces", c.apis[0]),
        "application/json",
        serde_json::to_vec(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        )?,
    )
    .await?;

    let mut res = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        watchers: args.watchers,
        rate_per_sec: args.rate,
        write_seconds: args.seconds,
        concurrency: args.concurrency,
        ..Default::default()
    };
    write_phase(&args, &c, &http, &mut res).await?;
    read_phase(&args, &c, &http, &mut res).await?;
    if args.pods > 0 {
        pods_phase(&args, &c, &http, &mut res).await?;
    }
    print(&res);
    println!("\ncommand: {}", res.command);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&res)?)?;
    }
    Ok(())
}
