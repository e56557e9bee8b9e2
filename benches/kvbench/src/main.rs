//! kvbench: Flotilla's key-value put path against etcd, side by side, in one run.
//!
//! It starts a three-replica Flotilla cluster and a three-member etcd cluster on loopback
//! (each in its own temporary data directory on the same disk), then for each client count
//! runs the same put load against etcd and against Flotilla back to back, and finally
//! measures leader failover: the time from `kill -9` of the leader to the next acknowledged
//! write that was sent after the kill. It prints a table, the command that produced it, and
//! writes the figures as JSON.
//!
//! etcd is driven through its native gRPC API (etcd-client), Flotilla through its JSON API
//! over HTTP/2; each client sends its requests to the three members in turn, over the same
//! number of connections for both systems.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Parser, Debug)]
struct Args {
    /// The flotilla binary (a release build).
    #[arg(long)]
    flotilla: PathBuf,
    /// The etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// Client counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    clients: Vec<usize>,
    /// Seconds of measured load per system and client count.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct keys written.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Most connections per system (clients share them beyond this).
    #[arg(long, default_value_t = 16)]
    max_conns: usize,
    /// Leader-kill trials per system (0 skips failover).
    #[arg(long, default_value_t = 5)]
    failover_trials: usize,
    /// Systems to measure.
    #[arg(long, value_delimiter = ',', default_value = "etcd,flotilla")]
    systems: Vec<String>,
    /// Directory for data (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the figures here as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct LoadResult {
    system: String,
    clients: usize,
    puts: u64,
    errors: u64,
    seconds: f64,
    puts_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Server CPU (all three processes, user+system) per successful put.
    server_cpu_us_per_put: f64,
}

#[derive(Debug, Clone, Serialize)]
struct FailoverResult {
    system: String,
    trials_ms: Vec<f64>,
    median_ms: f64,
}

/// A three-member cluster of either system.
struct Cluster {
    name: &'static str,
    clients: Vec<String>,
    children: Vec<Option<Child>>,
    /// How to start member `i` again.
    commands: Vec<Vec<String>>,
    bin: PathBuf,
}

impl Cluster {
    fn spawn(&mut self, i: usize, log: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(&self.bin)
            .args(&self.commands[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} member {i}", self.name))?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn pids(&self) -> Vec<i32> {
        self.children
            .iter()
            .flatten()
            .map(|c| c.id() as i32)
            .collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn flotilla_cluster(bin: &Path, dir: &Path) -> anyhow::Result<Cluster> {
    let initial = "1=127.0.0.1:27441,2=127.0.0.1:27442,3=127.0.0.1:27443";
    let mut c = Cluster {
        name: "flotilla",
        clients: (1..=3).map(|i| format!("127.0.0.1:2644{i}")).collect(),
        children: vec![None, None, None],
        commands: (1..=3)
            .map(|i| {
                vec![
                    "server".into(),
                    "--id".into(),
                    i.to_string(),
                    "--data-dir".into(),
                    dir.join(format!("flotilla-{i}")).display().to_string(),
                    "--listen-api".into(),
                    format!("127.0.0.1:2644{i}"),
                    "--listen-peer".into(),
                    format!("127.0.0.1:2744{i}"),
                    "--initial-cluster".into(),
                    initial.into(),
                ]
            })
            .collect(),
        bin: bin.to_path_buf(),
    };
    for i in 0..3 {
        c.spawn(i, &dir.join(format!("flotilla-{}.log", i + 1)))?;
    }
    Ok(c)
}

fn etcd_cluster(bin: &Path, dir: &Path) -> anyhow::Result<Cluster> {
    let initial = "e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803";
    let mut c = Cluster {
        name: "etcd",
        clients: (1..=3).map(|i| format!("127.0.0.1:2379{i}")).collect(),
        children: vec![None, None, None],
        commands: (1..=3)
            .map(|i| {
                vec![
                    "--name".into(),
                    format!("e{i}"),
                    "--data-dir".into(),
                    dir.join(format!("etcd-{i}")).display().to_string(),
                    "--listen-client-urls".into(),
                    format!("http://127.0.0.1:2379{i}"),
                    "--advertise-client-urls".into(),
                    format!("http://127.0.0.1:2379{i}"),
                    "--listen-peer-urls".into(),
                    format!("http://127.0.0.1:2380{i}"),
                    "--initial-advertise-peer-urls".into(),
                    format!("http://127.0.0.1:2380{i}"),
                    "--initial-cluster".into(),
                    initial.into(),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--initial-cluster-token".into(),
                    "kvbench".into(),
                    "--log-level".into(),
                    "warn".into(),
                ]
            })
            .collect(),
        bin: bin.to_path_buf(),
    };
    for i in 0..3 {
        c.spawn(i, &dir.join(format!("etcd-{}.log", i + 1)))?;
    }
    Ok(c)
}

/// CPU seconds (user+system) used so far by `pids`.
fn cpu_seconds(pids: &[i32]) -> f64 {
    let ticks = 100.0; // CLK_TCK on Linux
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .sum()
}

/// One put against either system.
#[derive(Clone)]
enum Putter {
    Etcd(etcd_client::KvClient),
    Flotilla {
        http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
        addr: String,
    },
}

impl Putter {
    async fn put(&mut self, key: String, value: &[u8]) -> anyhow::Result<()> {
        match self {
            Putter::Etcd(kv) => {
                kv.put(key, value.to_vec(), None).await?;
                Ok(())
            }
            Putter::Flotilla { http, addr } => {
                let body = format!(
                    r#"{{"key":"{}","value":"{}"}}"#,
                    B64.encode(key.as_bytes()),
                    B64.encode(value)
                );
                let req = http::Request::post(format!("http://{addr}/v3/kv/put"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                let resp = http.request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                if !status.is_success() {
                    bail!("{status}: {}", String::from_utf8_lossy(&body));
                }
                Ok(())
            }
        }
    }
}

fn h2_client() -> hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>> {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(1)));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .build(c)
}

/// `n` connections to the cluster, spread over its members.
async fn connections(system: &str, cluster: &Cluster, n: usize) -> anyhow::Result<Vec<Putter>> {
    let mut out = Vec::new();
    for i in 0..n {
        let ep = &cluster.clients[i % cluster.clients.len()];
        out.push(match system {
            "etcd" => Putter::Etcd(
                etcd_client::Client::connect([format!("http://{ep}")], None)
                    .await?
                    .kv_client(),
            ),
            _ => Putter::Flotilla {
                http: h2_client(),
                addr: ep.clone(),
            },
        });
    }
    Ok(out)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

async fn load(
    system: &str,
    cluster: &Cluster,
    clients: usize,
    args: &Args,
) -> anyhow::Result<LoadResult> {
    // At least one connection per member, and every client cycles through them, so both
    // systems see the same mix of requests to the leader and to followers at any client
    // count (a single client pinned to one member would measure leader-or-follower luck).
    let conns = connections(system, cluster, clients.min(args.max_conns).max(3)).await?;
    let value: Arc<Vec<u8>> = Arc::new(vec![b'v'; args.value_size]);
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let lat: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut mine_conns: Vec<Putter> = (0..conns.len())
            .map(|k| conns[(i + k) % conns.len()].clone())
            .collect();
        let (stop, measuring, errors, lat, value) = (
            stop.clone(),
            measuring.clone(),
            errors.clone(),
            lat.clone(),
            value.clone(),
        );
        let keys = args.keys;
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::with_capacity(100_000);
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("bench/{:08}", rng.gen_range(0..keys));
                let len = mine_conns.len();
                let p = &mut mine_conns[n % len];
                n += 1;
                let t = Instant::now();
                let ok = p.put(key, &value).await.is_ok();
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        mine.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat.lock().unwrap().extend(mine);
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    let cpu0 = cpu_seconds(&cluster.pids());
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&cluster.pids()) - cpu0;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let mut l = std::mem::take(&mut *lat.lock().unwrap());
    l.sort_unstable();
    let puts = l.len() as u64;
    Ok(LoadResult {
        system: system.into(),
        clients,
        puts,
        errors: errors.load(Ordering::Relaxed),
        seconds: secs,
        puts_per_sec: puts as f64 / secs,
        p50_ms: percentile(&l, 0.50),
        p90_ms: percentile(&l, 0.90),
        p99_ms: percentile(&l, 0.99),
        max_ms: l.last().copied().unwrap_or(0) as f64 / 1000.0,
        server_cpu_us_per_put: if puts > 0 {
            cpu * 1e6 / puts as f64
        } else {
            0.0
        },
    })
}

/// The index of the current leader, asking every member.
async fn leader(system: &str, cluster: &Cluster) -> Option<usize> {
    match system {
        "etcd" => {
            for (i, ep) in cluster.clients.iter().enumerate() {
                if cluster.children[i].is_none() {
                    continue;
                }
                let Ok(mut c) = etcd_client::Client::connect([format!("http://{ep}")], None).await
                else {
                    continue;
                };
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), c.status()).await
                else {
                    continue;
                };
                let me = s.header().map(|h| h.member_id()).unwrap_or(0);
                if s.leader() != 0 && s.leader() == me {
                    return Some(i);
                }
            }
            None
        }
        _ => {
            let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<Full<Bytes>>();
            for (i, ep) in cluster.clients.iter().enumerate() {
                if cluster.children[i].is_none() {
                    continue;
                }
                let req = http::Request::post(format!("http://{ep}/v3/maintenance/status"))
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .ok()?;
                let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_millis(500), http.request(req)).await
                else {
                    continue;
                };
                let Ok(body) = resp.into_body().collect().await else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).ok()?;
                if v["state"] == "leader" {
                    return Some(i);
                }
            }
            None
        }
    }
}

async fn wait_leader(system: &str, cluster: &Cluster) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(l) = leader(system, cluster).await {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!("{system}: no leader after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kill -9 the leader while writers keep writing; the time to the first acknowledged write
/// sent after the kill.
async fn failover_trial(system: &str, cluster: &mut Cluster, dir: &Path) -> anyhow::Result<f64> {
    let killed = wait_leader(system, cluster).await?;
    let per_member: Vec<Putter> = connections(system, cluster, 3).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let first_after: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let (stop, killed_at, first_after) = (stop.clone(), killed_at.clone(), first_after.clone());
        let mut members = per_member.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = w % 3;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let sent = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_millis(250),
                    members[m].put(format!("failover/{w}/{n}"), b"x"),
                )
                .await;
                match r {
                    Ok(Ok(())) => {
                        let k = *killed_at.lock().unwrap();
                        if k.is_some_and(|k| sent >= k) {
                            let mut f = first_after.lock().unwrap();
                            if f.is_none() {
                                *f = Some(Instant::now());
                            }
                        }
                    }
                    _ => {
                        m = (m + 1) % 3;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pid = cluster.children[killed].as_ref().unwrap().id() as i32;
    *killed_at.lock().unwrap() = Some(Instant::now());
    kill(Pid::from_raw(pid), Signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let took = loop {
        if let Some(f) = *first_after.lock().unwrap() {
            break f - killed_at.lock().unwrap().unwrap();
        }
        if Instant::now() > deadline {
            bail!("{system}: no write succeeded within 30 s of killing the leader");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    cluster.kill(killed);
    let log = dir.join(format!("{}-{}.log", cluster.name, killed + 1));
    cluster.spawn(killed, &log)?;
    // Let it rejoin before the next trial.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_leader(system, cluster).await?;
    Ok(took.as_secs_f64() * 1000.0)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        0.0
    } else {
        s[s.len() / 2]
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let mut etcd = etcd_cluster(&args.etcd, &dir)?;
    let mut flotilla = flotilla_cluster(&args.flotilla, &dir)?;
    wait_leader("etcd", &etcd).await?;
    wait_leader("flotilla", &flotilla).await?;

    let mut results = Vec::new();
    for &clients in &args.clients {
        for (system, cluster) in [("etcd", &etcd), ("flotilla", &flotilla)] {
            if !args.systems.iter().any(|s| s == system) {
                continue;
            }
            let r = load(system, cluster, clients, &args).await?;
            eprintln!(
                "{system:>8} {clients:>4} clients: {:>8.0} puts/s  p50 {:>6.2} ms  p99 {:>7.2} ms  ({} errors, {:.0} µs server CPU/put)",
                r.puts_per_sec, r.p50_ms, r.p99_ms, r.errors, r.server_cpu_us_per_put
            );
            results.push(r);
        }
    }
    let mut failovers = Vec::new();
    if args.failover_trials > 0 {
        for (system, cluster) in [("etcd", &mut etcd), ("flotilla", &mut flotilla)] {
            if !args.systems.iter().any(|s| s == system) {
                continue;
            }
            let mut trials = Vec::new();
            for _ in 0..args.failover_trials {
                let ms = failover_trial(system, cluster, &dir).await?;
                eprintln!("{system:>8} failover: {ms:.0} ms");
                trials.push(ms);
            }
            failovers.push(FailoverResult {
                system: system.into(),
                median_ms: median(&trials),
                trials_ms: trials,
            });
        }
    }

    println!("command: {command}");
    println!();
    println!(
        "| clients | system | puts/s | p50 ms | p90 ms | p99 ms | server CPU µs/put | errors |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {} |",
            r.clients,
            r.system,
            r.puts_per_sec,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.server_cpu_us_per_put,
            r.errors
        );
    }
    if !failovers.is_empty() {
        println!();
        println!("| system | leader kill → next acknowledged write, median | trials (ms) |");
        println!("|---|---:|---|");
        for f in &failovers {
            let t: Vec<String> = f.trials_ms.iter().map(|x| format!("{x:.0}")).collect();
            println!(
                "| {} | {:.0} ms | {} |",
                f.system,
                f.median_ms,
                t.join(", ")
            );
        }
    }
    if let Some(out) = &args.out {
        std::fs::write(
            out,
            serde_json::to_vec_pretty(&serde_json::json!({
                "command": command,
                "load": results,
                "failover": failovers,
            }))?,
        )?;
    }
    Ok(())
}
