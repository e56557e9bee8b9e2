//! The control-plane scenarios (issue 4's numbers).
//!
//! - `scheduler`: registers `--nodes` Ready nodes, opens a watch on the pods of one namespace
//!   on a follower, then creates `--pods` unbound pods with `--concurrency` clients. Every
//!   pod is created through Raft, scheduled by the leader's scheduler and bound through Raft;
//!   the watch sees each binding. Reports scheduling throughput end to end (pods bound per
//!   second from the first create to the last binding), the creation rate (the ceiling of
//!   the former), and each pod's latency from its create's acknowledgement to its binding
//!   showing up in the watch. With `--backlog`, the pods are created while no node is
//!   Ready (so all are pending), then every node is turned Ready and the time to bind the
//!   whole backlog is measured.
//! - `failover`: `--rounds` times, `kill -9` of the leader; at once a ReplicaSet is scaled
//!   from 0 to 1 through a surviving replica (the write waits for the new leader). It
//!   reports how long the election took (first survivor to report a new leader, polling
//!   every 2 ms) and how long after it the new leader's ReplicaSet controller created the
//!   pod (its ADDED event in a watch on a survivor); the killed replica is then restarted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use crate::{cpu_seconds, latency, ok, send, Args, Cluster, Http, Latency};

const NS: &str = "sched";

#[derive(Debug, Default, Serialize)]
pub(crate) struct SchedulerResults {
    command: String,
    nodes: usize,
    pods: usize,
    concurrency: usize,
    node_registration_seconds: f64,
    /// Pods were created while no node was Ready; the window starts when the nodes turn
    /// Ready (those status writes included).
    backlog: bool,
    /// Pods bound per second, from the first create sent (or, with a backlog, from the
    /// first node turned Ready) to the last binding seen.
    scheduled_per_sec: f64,
    /// Pods created per second (the ceiling of the figure above in this setup).
    created_per_sec: f64,
    /// Time from the last create's acknowledgement to the last binding seen.
    drain_after_last_create_ms: f64,
    /// Create acknowledged → binding seen in the watch, per pod.
    create_ack_to_bound: Latency,
    /// With a backlog: when each pod was seen bound, from the first node turned Ready.
    backlog_bound_after_release: Latency,
    pods_unbound: usize,
    server_cpu_percent: f64,
    /// Creates answered 429 or 503 (overload) and retried.
    overload_retries: usize,
    /// The scheduler's own counts over the whole run (`flotilla_scheduler_pods_total` by
    /// result and `flotilla_scheduler_binding_conflicts_total`, summed over the replicas):
    /// how many decisions it took to bind the pods.
    scheduler_attempts: HashMap<String, f64>,
    /// Store revisions (writes) between the start and the end of the measured window.
    writes_in_window: u64,
    /// Pods seen bound in each half second of the window.
    bound_per_half_second: Vec<usize>,
}

/// Sums the samples of the metrics named in `names` over every replica's `/metrics`,
/// keyed by the sample's name and labels.
async fn scrape(http: &Http, c: &Cluster, names: &[&str]) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for api in &c.apis {
        let Ok((_, body)) = send(
            http,
            Method::GET,
            format!("http://{api}/metrics"),
            "text/plain",
            "text/plain",
            Vec::new(),
        )
        .await
        else {
            continue;
        };
        for line in String::from_utf8_lossy(&body).lines() {
            if line.starts_with('#') || !names.iter().any(|n| line.starts_with(n)) {
                continue;
            }
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    *out.entry(series.to_string()).or_insert(0.0) += v;
                }
            }
        }
    }
    out
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct FailoverResults {
    command: String,
    rounds: usize,
    /// kill -9 of the leader → a survivor reports a new leader.
    election_ms: Vec<f64>,
    /// New leader reported → the pod its ReplicaSet controller created is seen.
    first_action_after_election_ms: Vec<f64>,
    /// kill -9 → that pod seen.
    end_to_end_ms: Vec<f64>,
}

pub(crate) async fn status(http: &Http, api: &str) -> Option<(u64, u64)> {
    let (s, b) = send(
        http,
        Method::POST,
        format!("http://{api}/v3/maintenance/status"),
        "application/json",
        "application/json",
        b"{}".to_vec(),
    )
    .await
    .ok()?;
    if s != StatusCode::OK {
        return None;
    }
    let v: Value = serde_json::from_slice(&b).ok()?;
    let leader = v["leader"]
        .as_u64()
        .or_else(|| v["leader"].as_str().and_then(|s| s.parse().ok()))?;
    let term = v["raftTerm"]
        .as_u64()
        .or_else(|| v["raftTerm"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0);
    Some((leader, term))
}

async fn wait_leader(http: &Http, c: &Cluster, alive: &[usize]) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut leaders = Vec::new();
        for &i in alive {
            leaders.push(status(http, &c.apis[i]).await.map(|s| s.0));
        }
        if let Some(Some(l)) = leaders.first() {
            if *l != 0 && leaders.iter().all(|x| *x == Some(*l)) {
                return Ok(*l);
            }
        }
        if Instant::now() > deadline {
            bail!("no leader: {leaders:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Overload answers (429, 503) that were retried, as client-go retries them.
/// Most clients turning nodes Ready at once in a backlog run.
const READY_CLIENTS: usize = 512;

static RETRIED: AtomicUsize = AtomicUsize::new(0);

async fn post(http: &Http, api: &str, path: &str, body: &Value) -> anyhow::Result<Bytes> {
    let body = serde_json::to_vec(body)?;
    for attempt in 0..10u64 {
        let (status, b) = send(
            http,
            Method::POST,
            format!("http://{api}{path}"),
            "application/json",
            "application/json",
            body.clone(),
        )
        .await?;
        if status.is_success() {
            return Ok(b);
        }
        if (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE)
            && attempt < 9
        {
            RETRIED.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            continue;
        }
        bail!("{status}: {}", String::from_utf8_lossy(&b));
    }
    unreachable!("the last attempt returns")
}

/// Registers `n` Ready nodes with room for many pods, `concurrency` at a time.
async fn register_nodes(
    http: &Http,
    apis: &[String],
    n: usize,
    concurrency: usize,
    ready: bool,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (http, api, next) = (http.clone(), apis[w % apis.len()].clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let name = format!("node-{i:05}");
                if !ready {
                    post(&http, &api, "/api/v1/nodes", &json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "zone": format!("z{}", i % 3)}}}))
                    .await?;
                }
                let condition = if ready { "True" } else { "False" };
                let status = json!({"status": {
                    "capacity": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                    "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": condition, "reason": "KubeletReady"}]}});
                ok(
                    &http,
                    Method::PATCH,
                    format!("http://{api}/api/v1/nodes/{name}/status"),
                    "application/merge-patch+json",
                    serde_json::to_vec(&status)?,
                )
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Watches pods in `ns` on `api` from `rv`; records when each pod is first seen bound, and
/// when each is first seen at all.
fn watch_pods(
    http: Http,
    api: String,
    ns: &'static str,
    rv: String,
    bound: Arc<Mutex<HashMap<String, Instant>>>,
    added: Arc<Mutex<HashMap<String, Instant>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let url = format!(
        "http://{api}/api/v1/namespaces/{ns}/pods?watch=true&resourceVersion={rv}&timeoutSeconds=3600"
    );
    crate::watch_events(http, url, stop, move |ev, now| {
        let name = ev["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        added.lock().unwrap().entry(name.clone()).or_insert(now);
        if ev["object"]["spec"]["nodeName"].is_string() {
            bound.lock().unwrap().entry(name).or_insert(now);
        }
    })
}

async fn list_rv(http: &Http, api: &str, path: &str) -> anyhow::Result<String> {
    let b = ok(
        http,
        Method::GET,
        format!("http://{api}{path}?limit=1"),
        "application/json",
        vec![],
    )
    .await?;
    let v: Value = serde_json::from_slice(&b)?;
    Ok(v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string())
}

pub(crate) async fn scheduler(args: &Args, c: &Cluster, http: &Http) -> anyhow::Result<()> {
    let leader = wait_leader(http, c, &[0, 1, 2]).await? as usize;
    let follower = (0..3).find(|i| i + 1 != leader).unwrap_or(0);
    post(
        http,
        &c.apis[0],
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await?;
    let mut res = SchedulerResults {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        nodes: args.nodes,
        pods: args.pods,
        concurrency: args.concurrency,
        ..Default::default()
    };
    let t = Instant::now();
    register_nodes(http, &c.apis, args.nodes, args.concurrency, false).await?;
    if !args.backlog {
        register_nodes(http, &c.apis, args.nodes, args.concurrency, true).await?;
    }
    res.node_registration_seconds = t.elapsed().as_secs_f64();
    res.backlog = args.backlog;
    println!(
        "registered {} nodes in {:.1} s",
        args.nodes, res.node_registration_seconds
    );
    let rv = list_rv(
        http,
        &c.apis[follower],
        &format!("/api/v1/namespaces/{NS}/pods"),
    )
    .await?;
    let bound: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let added: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let watch = watch_pods(
        http.clone(),
        c.apis[follower].clone(),
        NS,
        rv.clone(),
        bound.clone(),
        added.clone(),
        stop.clone(),
    );
    let cpu0 = cpu_seconds(&c.pids());
    let acks: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let (http, api, next, acks, n) = (
            http.clone(),
            c.apis[w % 3].clone(),
            next.clone(),
            acks.clone(),
            args.pods,
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let name = format!("p-{i:06}");
                let pod = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": NS, "labels": {"app": format!("a{}", i % 100)}},
                    "spec": {"containers": [{"name": "c", "image": "pause",
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}});
                post(&http, &api, &format!("/api/v1/namespaces/{NS}/pods"), &pod).await?;
                acks.lock().unwrap().insert(name, Instant::now());
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let created = start.elapsed();
    let last_ack = Instant::now();
    res.created_per_sec = args.pods as f64 / created.as_secs_f64();
    println!(
        "created {} pods in {:.2} s",
        args.pods,
        created.as_secs_f64()
    );
    let mut window_start = start;
    let mut rv0 = rv.clone();
    let mut cpu0 = cpu0;
    if args.backlog {
        // Every pod is pending (no node is Ready). Let the writes about them settle, then
        // turn the nodes Ready and time how fast the backlog is bound.
        let quiet = Instant::now() + Duration::from_secs(600);
        let mut last = cpu_seconds(&c.pids());
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = cpu_seconds(&c.pids());
            if now - last < 0.3 || Instant::now() > quiet {
                break;
            }
            last = now;
        }
        if !bound.lock().unwrap().is_empty() {
            bail!("pods were bound before any node was Ready");
        }
        cpu0 = cpu_seconds(&c.pids());
        rv0 = list_rv(
            http,
            &c.apis[follower],
            &format!("/api/v1/namespaces/{NS}/pods"),
        )
        .await?;
        window_start = Instant::now();
        // Each node's kubelet reports Ready on its own, as in a real cluster: one client per
        // node (up to READY_CLIENTS at once), not the creators' few, whose round trips behind
        // the binds' Raft entries would otherwise pace the release.
        let ready_clients = args.nodes.clamp(args.concurrency, READY_CLIENTS);
        register_nodes(http, &c.apis, args.nodes, ready_clients, true).await?;
        println!(
            "{} nodes turned Ready in {:.2} s",
            args.nodes,
            window_start.elapsed().as_secs_f64()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while bound.lock().unwrap().len() < args.pods && Instant::now() < deadline {
        if watch.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The three replicas' CPU over the measured window (100% = one core).
    res.server_cpu_percent =
        (cpu_seconds(&c.pids()) - cpu0) / window_start.elapsed().as_secs_f64() * 100.0;
    let rv1 = list_rv(
        http,
        &c.apis[follower],
        &format!("/api/v1/namespaces/{NS}/pods"),
    )
    .await?;
    res.writes_in_window = rv1.parse::<u64>()?.saturating_sub(rv0.parse()?);
    res.scheduler_attempts = scrape(
        http,
        c,
        &[
            "flotilla_scheduler_pods_total",
            "flotilla_scheduler_binding_conflicts_total",
        ],
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    if watch.is_finished() {
        watch.await??;
    }
    let bound = bound.lock().unwrap().clone();
    let acks = acks.lock().unwrap().clone();
    res.pods_unbound = args.pods.saturating_sub(bound.len());
    res.overload_retries = RETRIED.load(Ordering::Relaxed);
    let last_bound = bound.values().max().copied().unwrap_or(window_start);
    res.scheduled_per_sec = bound.len() as f64 / (last_bound - window_start).as_secs_f64();
    for b in bound.values() {
        let i = (b.saturating_duration_since(window_start).as_millis() / 500) as usize;
        if res.bound_per_half_second.len() <= i {
            res.bound_per_half_second.resize(i + 1, 0);
        }
        res.bound_per_half_second[i] += 1;
    }
    res.backlog_bound_after_release = latency(
        bound
            .values()
            .map(|b| b.saturating_duration_since(window_start).as_micros() as u64)
            .collect(),
    );
    res.drain_after_last_create_ms =
        last_bound.saturating_duration_since(last_ack).as_secs_f64() * 1000.0;
    res.create_ack_to_bound = latency(
        acks.iter()
            .filter_map(|(n, a)| {
                bound
                    .get(n)
                    .map(|b| b.saturating_duration_since(*a).as_micros() as u64)
            })
            .collect(),
    );
    println!("{}", serde_json::to_string_pretty(&res)?);
    println!("\ncommand: {}", res.command);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&res)?)?;
    }
    if res.pods_unbound > 0 {
        bail!("{} pods were never bound", res.pods_unbound);
    }
    Ok(())
}

pub(crate) async fn failover(args: &Args, c: &mut Cluster, http: &Http) -> anyhow::Result<()> {
    let mut res = FailoverResults {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        rounds: args.rounds,
        ..Default::default()
    };
    wait_leader(http, c, &[0, 1, 2]).await?;
    post(
        http,
        &c.apis[0],
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await?;
    register_nodes(http, &c.apis, 3, 3, false).await?;
    register_nodes(http, &c.apis, 3, 3, true).await?;
    for round in 0..args.rounds {
        let leader = wait_leader(http, c, &[0, 1, 2]).await? as usize;
        let (_, term0) = status(http, &c.apis[leader - 1])
            .await
            .context("leader status")?;
        let survivors: Vec<usize> = (0..3).filter(|i| i + 1 != leader).collect();
        let rs_name = format!("probe-{round}");
        let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": rs_name, "namespace": NS},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"probe": rs_name}},
                     "template": {"metadata": {"labels": {"probe": rs_name}},
                                  "spec": {"containers": [{"name": "c", "image": "pause"}]}}}});
        post(
            http,
            &c.apis[survivors[0]],
            &format!("/apis/apps/v1/namespaces/{NS}/replicasets"),
            &rs,
        )
        .await?;
        let watch_api = c.apis[survivors[1]].clone();
        let rv = list_rv(http, &watch_api, &format!("/api/v1/namespaces/{NS}/pods")).await?;
        let bound: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let added: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let watch = watch_pods(
            http.clone(),
            watch_api,
            NS,
            rv,
            bound,
            added.clone(),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;

        let killed = Instant::now();
        c.kill(leader - 1);
        // The scale, retried on a survivor until the new leader takes it.
        let scaler = {
            let (http, api) = (http.clone(), c.apis[survivors[0]].clone());
            let path = format!("/apis/apps/v1/namespaces/{NS}/replicasets/{rs_name}");
            tokio::spawn(async move {
                loop {
                    let r = send(
                        &http,
                        Method::PATCH,
                        format!("http://{api}{path}"),
                        "application/merge-patch+json",
                        "application/json",
                        br#"{"spec":{"replicas":1}}"#.to_vec(),
                    )
                    .await;
                    if matches!(r, Ok((StatusCode::OK, _))) {
                        return Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        // Election: the first survivor to name a new leader in a later term.
        let elected = loop {
            let mut found = None;
            for &i in &survivors {
                if let Some((l, term)) = status(http, &c.apis[i]).await {
                    if l != 0 && l as usize != leader && term > term0 {
                        found = Some(Instant::now());
                    }
                }
            }
            if let Some(t) = found {
                break t;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no new leader");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let acked = scaler.await?;
        let seen = loop {
            let prefix = format!("{rs_name}-");
            let t = added
                .lock()
                .unwrap()
                .iter()
                .filter(|(n, _)| n.starts_with(&prefix))
                .map(|(_, t)| *t)
                .min();
            if let Some(t) = t {
                break t;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("the new leader's controller created nothing");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        stop.store(true, Ordering::SeqCst);
        let _ = watch.await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        res.election_ms.push(ms(elected - killed));
        res.first_action_after_election_ms
            .push(ms(seen.saturating_duration_since(elected)));
        res.end_to_end_ms.push(ms(seen - killed));
        println!(
            "round {round}: election {:.0} ms, scale acknowledged {:.0} ms after election, pod created {:.0} ms after election ({:.0} ms after the kill)",
            ms(elected - killed),
            ms(acked.saturating_duration_since(elected)),
            ms(seen.saturating_duration_since(elected)),
            ms(seen - killed)
        );
        c.spawn(leader - 1)?;
        wait_leader(http, c, &[0, 1, 2]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("{}", serde_json::to_string_pretty(&res)?);
    println!("\ncommand: {}", res.command);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&res)?)?;
    }
    Ok(())
}
