//! The density and load harness (issue "Scale to Kubernetes' limits").
//!
//! `--scenario density --nodes N --pods P --pod-rate R` starts three replicas and one
//! `flotilla agent --hollow N` (N simulated nodes: real registration, leases, pod watches and
//! status, a runtime that runs nothing), then:
//! 1. **Load**: namespaces of up to `--namespace-pods` pods (3,000: the LIST SLO's case),
//!    each filled with Deployments of `--deployment-size` replicas, a Service per Deployment
//!    and one Job (pods `sleep 30`), created at R declared pods per second until P pods are
//!    declared; then waits until every Deployment pod is Running.
//! 2. **Measured throughout**: per verb and resource API latency (a probe every 250 ms: GET
//!    pod, GET node, LIST pods of one namespace, PATCH and POST+DELETE of a ConfigMap, and
//!    the harness's own creates); pod startup latency (first seen in a watch → first seen
//!    Running, the SLI of Kubernetes' density test; a hollow container takes 500 ms to
//!    start); scheduler throughput (pods first seen bound per second, over the load
//!    phase); watch delivery delay to `--watchers` watchers of one namespace's pods spread
//!    over the replicas (a probe patch sent → its event received; until the leader is
//!    killed); each replica's CPU and resident memory every 2 s, and its data directory's
//!    size.
//! 3. **At full scale**: LIST of all pods of a full namespace (5 times), and with
//!    `--kill-leader`, `kill -9` of the leader: time to a new leader, to the API taking a
//!    write, to the controllers' first action (a Deployment scaled up by one → its new
//!    pod seen) and to the scheduler's first bind (a pod seen bound after the kill).
//! 4. **Teardown**: every namespace deleted; time until no pod is left.
//!
//! Figures go to `--out` (JSON) and stdout.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use crate::{cpu_seconds, latency, rss, send, Args, Cluster, Http, Latency};

/// What one pod's watch showed, and when.
#[derive(Default, Clone, Copy)]
struct PodSeen {
    added: Option<Instant>,
    bound: Option<Instant>,
    running: Option<Instant>,
    deleted: bool,
}

#[derive(Default)]
struct Seen {
    pods: HashMap<String, PodSeen>,
    /// Pods whose watch showed them at all, and not yet deleted.
    live: usize,
}

/// One replica's samples.
#[derive(Debug, Default, Serialize, Clone)]
struct ReplicaUsage {
    /// Mean CPU (% of one core) over the load phase and at steady state.
    cpu_percent_load: f64,
    cpu_percent_steady: f64,
    rss_mib_peak: f64,
    rss_mib_steady: f64,
    data_dir_mib: f64,
}

#[derive(Debug, Default, Serialize)]
struct DensityResults {
    command: String,
    nodes: usize,
    pods: usize,
    pod_rate: f64,
    namespaces: usize,
    deployments: usize,
    services: usize,
    jobs: usize,
    nodes_ready_s: f64,
    /// First Deployment created → every Deployment pod Running.
    load_s: f64,
    /// Pods Running when the load phase ended (all of them, unless it timed out).
    pods_running: usize,
    pod_startup: Latency,
    /// First seen → first seen bound.
    pod_scheduling: Latency,
    scheduler_pods_per_s_mean: f64,
    scheduler_pods_per_s_peak_10s: f64,
    api: HashMap<String, Latency>,
    list_full_namespace: Latency,
    watchers: usize,
    watch_delay: Latency,
    /// Watch streams that ended or could not be opened (each try counts: the watchers on
    /// a killed leader try every 200 ms until it is back).
    watch_restarts: usize,
    replicas: Vec<ReplicaUsage>,
    agent_cpu_percent_load: f64,
    agent_rss_mib_peak: f64,
    kill_leader: Option<Failover>,
    teardown_s: f64,
    /// Answers 429/503/504 the harness retried.
    retried: usize,
    /// Raft terms that passed during the load and steady phases (1 term: no election).
    raft_terms_during_load: u64,
}

#[derive(Debug, Default, Serialize)]
struct Failover {
    new_leader_ms: f64,
    api_write_ms: f64,
    controllers_first_action_ms: f64,
    /// Until the watch shows a pod bound by the new leader's scheduler.
    scheduler_first_bind_ms: f64,
}

static RETRIED: AtomicUsize = AtomicUsize::new(0);
static WATCH_RESTARTS: AtomicUsize = AtomicUsize::new(0);

/// One request, retried on overload (429, 503) and 504 as client-go retries; the status and
/// body of the last answer.
async fn call(
    http: &Http,
    method: Method,
    url: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<(StatusCode, bytes::Bytes)> {
    for attempt in 0..20u64 {
        let r = send(
            http,
            method.clone(),
            url.to_string(),
            content_type,
            "application/json",
            body.to_vec(),
        )
        .await;
        match r {
            Ok((s, _))
                if (s == StatusCode::TOO_MANY_REQUESTS
                    || s == StatusCode::SERVICE_UNAVAILABLE
                    || s == StatusCode::GATEWAY_TIMEOUT)
                    && attempt < 19 =>
            {
                RETRIED.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => return Ok(r),
            Err(_) if attempt < 19 => {
                RETRIED.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1).min(10))).await;
    }
    unreachable!("the last attempt returns")
}

async fn get_json(http: &Http, url: &str) -> anyhow::Result<Value> {
    let (s, b) = call(http, Method::GET, url, "application/json", &[]).await?;
    if s != StatusCode::OK {
        bail!("GET {url}: {s}: {}", String::from_utf8_lossy(&b));
    }
    Ok(serde_json::from_slice(&b)?)
}

/// Sends a write; an answer other than 2xx (or 409 on a create: made by an earlier try) is
/// an error.
async fn write(http: &Http, method: Method, url: &str, body: &Value) -> anyhow::Result<Value> {
    let ct = if method == Method::PATCH {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    let (s, b) = call(http, method.clone(), url, ct, &serde_json::to_vec(body)?).await?;
    if !(s.is_success() || (method == Method::POST && s == StatusCode::CONFLICT)) {
        bail!("{method} {url}: {s}: {}", String::from_utf8_lossy(&b));
    }
    Ok(serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// Latencies by "VERB resource".
#[derive(Default, Clone)]
struct Lat(Arc<Mutex<HashMap<String, Vec<u64>>>>);

impl Lat {
    fn add(&self, what: &str, since: Instant) {
        self.0
            .lock()
            .unwrap()
            .entry(what.to_string())
            .or_default()
            .push(since.elapsed().as_micros() as u64);
    }
}

/// The hollow agent process.
struct Hollow(Child);

impl Drop for Hollow {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Follows `path` (a watch URL without `resourceVersion`) on `apis[first]` from `rv` until
/// `stop`, reopening it from the last version seen when it ends (a replica may cut a slow
/// watcher off), on the next replica if this one does not answer (it may have been killed),
/// as clients fail over; relisting after a 410. `on` gets each event and the moment it
/// arrived; after a relist, a `DELETED` (with the namespace and name only) for every
/// object it had been told of that the list no longer has (deleted while the watch was
/// down), as a reflector's replace does.
fn follow(
    http: Http,
    apis: Vec<String>,
    first: usize,
    path: String,
    mut rv: String,
    stop: Arc<AtomicBool>,
    mut on: impl FnMut(&str, &Value, Instant) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    use http_body_util::BodyExt;
    fn key(o: &Value) -> String {
        format!(
            "{}/{}",
            o["metadata"]["namespace"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or("")
        )
    }
    tokio::spawn(async move {
        let mut at = first;
        // What `on` has been told exists.
        let mut known: std::collections::HashSet<String> = Default::default();
        while !stop.load(Ordering::SeqCst) {
            let api = &apis[at % apis.len()];
            let sep = if path.contains('?') { '&' } else { '?' };
            let url = format!(
                "http://{api}{path}{sep}watch=true&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=3600"
            );
            let Ok(req) =
                http::Request::get(&url).body(http_body_util::Full::new(bytes::Bytes::new()))
            else {
                return;
            };
            let resp = match http.request(req).await {
                Ok(r) if r.status() == StatusCode::OK => Some(r),
                // Too old for the replica's window: relist (below), as reflectors do.
                Ok(r) if r.status() == StatusCode::GONE => None,
                _ => {
                    WATCH_RESTARTS.fetch_add(1, Ordering::Relaxed);
                    at += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut expired = resp.is_none();
            let mut body = resp.map(|r| r.into_body());
            let mut buf: Vec<u8> = Vec::new();
            while let Some(body) = body.as_mut().filter(|_| !stop.load(Ordering::SeqCst)) {
                match tokio::time::timeout(Duration::from_millis(200), body.frame()).await {
                    Err(_) => continue,
                    Ok(Some(Ok(frame))) => {
                        let now = Instant::now();
                        if let Some(d) = frame.data_ref() {
                            buf.extend_from_slice(d);
                        }
                        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=pos).collect();
                            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                                continue;
                            };
                            let t = ev["type"].as_str().unwrap_or("");
                            if t == "ERROR" {
                                expired = ev["object"]["code"] == 410;
                                break;
                            }
                            if let Some(v) = ev["object"]["metadata"]["resourceVersion"].as_str() {
                                rv = v.to_string();
                            }
                            match t {
                                "BOOKMARK" => continue,
                                "DELETED" => known.remove(&key(&ev["object"])),
                                _ => known.insert(key(&ev["object"])),
                            };
                            on(t, &ev["object"], now);
                        }
                        if expired {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            WATCH_RESTARTS.fetch_add(1, Ordering::Relaxed);
            if expired {
                // Relist: what the list shows counts as seen now.
                let sep = if path.contains('?') { '&' } else { '?' };
                if let Ok(list) =
                    get_json(&http, &format!("http://{api}{path}{sep}resourceVersion=0")).await
                {
                    let now = Instant::now();
                    let mut listed = std::collections::HashSet::new();
                    for o in list["items"].as_array().into_iter().flatten() {
                        listed.insert(key(o));
                        on("ADDED", o, now);
                    }
                    for gone in known.difference(&listed) {
                        let (ns, name) = gone.split_once('/').unwrap_or(("", gone));
                        let o = json!({"metadata": {"namespace": ns, "name": name}});
                        on("DELETED", &o, now);
                    }
                    known = listed;
                    if let Some(v) = list["metadata"]["resourceVersion"].as_str() {
                        rv = v.to_string();
                    }
                }
            }
        }
    })
}

fn is_running(o: &Value) -> bool {
    o["status"]["phase"] == "Running"
}

/// Sum of file sizes under `dir`, MiB.
fn dir_mib(dir: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir) as f64 / 1048576.0
}

/// The leader (0-based index) and term, as the first replica of `apis` that answers sees them.
async fn leader(http: &Http, apis: &[String]) -> Option<(usize, u64)> {
    for api in apis {
        if let Some((id, term)) = crate::control::status(http, api).await {
            if id > 0 {
                return Some((id as usize - 1, term));
            }
        }
    }
    None
}

pub(crate) async fn density(
    args: &Args,
    c: &mut Cluster,
    http: &Http,
    dir: &Path,
) -> anyhow::Result<()> {
    let n = args.nodes;
    let total = args.pods;
    let size = args.deployment_size.max(1);
    let per_ns = (args.namespace_pods / size).max(1) * size;
    let namespaces = total.div_ceil(per_ns);
    let mut res = DensityResults {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        nodes: n,
        pods: total,
        pod_rate: args.pod_rate,
        namespaces,
        watchers: args.watchers,
        ..DensityResults::default()
    };
    let apis = c.apis.clone();
    let a0 = apis[0].clone();
    for api in &apis {
        let deadline = Instant::now() + Duration::from_secs(60);
        while get_json(http, &format!("http://{api}/api/v1/namespaces/default"))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("{api} not serving");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Hollow nodes.
    let log = std::fs::File::create(dir.join("hollow-agent.log"))?;
    let agent = Hollow(
        Command::new(&args.flotilla)
            .args([
                "agent",
                "--servers",
                &apis.join(","),
                "--node-name",
                "hollow",
                "--data-dir",
                &dir.join("hollow").display().to_string(),
                "--hollow",
                &n.to_string(),
                "--hollow-start-ms",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the hollow agent")?,
    );
    let t0 = Instant::now();
    loop {
        let nodes = get_json(http, &format!("http://{a0}/api/v1/nodes?resourceVersion=0")).await?;
        let ready = nodes["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| {
                n["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|x| x["type"] == "Ready" && x["status"] == "True")
                })
            })
            .count();
        if ready >= n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("only {ready} of {n} hollow nodes Ready after 600 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    res.nodes_ready_s = t0.elapsed().as_secs_f64();
    println!("{n} hollow nodes Ready in {:.1} s", res.nodes_ready_s);

    // Usage sampling: every 2 s, per replica (and the agent) CPU since the last sample and RSS.
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicUsize::new(0)); // 0 load, 1 steady, 2 after
    #[derive(Default)]
    struct Usage {
        cpu: Vec<[Vec<f64>; 2]>,
        rss_peak: Vec<u64>,
        rss_last: Vec<u64>,
        agent_cpu: Vec<f64>,
        agent_rss_peak: u64,
    }
    let usage = Arc::new(Mutex::new(Usage {
        cpu: vec![Default::default(), Default::default(), Default::default()],
        rss_peak: vec![0; 3],
        rss_last: vec![0; 3],
        ..Usage::default()
    }));
    let pids = c.pids();
    let agent_pid = agent.0.id();
    let sampler = {
        let (stop, phase, usage, pids) = (stop.clone(), phase.clone(), usage.clone(), pids.clone());
        tokio::spawn(async move {
            let mut last: Vec<f64> = pids.iter().map(|p| cpu_seconds(&[*p])).collect();
            let mut last_agent = cpu_seconds(&[agent_pid]);
            let mut at = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let dt = at.elapsed().as_secs_f64();
                at = Instant::now();
                let ph = phase.load(Ordering::SeqCst);
                let mut u = usage.lock().unwrap();
                for (i, p) in pids.iter().enumerate() {
                    let now = cpu_seconds(&[*p]);
                    if ph < 2 {
                        u.cpu[i][ph].push((now - last[i]) / dt * 100.0);
                    }
                    last[i] = now;
                    let r = rss(*p);
                    u.rss_peak[i] = u.rss_peak[i].max(r);
                    if ph == 1 {
                        u.rss_last[i] = r;
                    }
                }
                let now = cpu_seconds(&[agent_pid]);
                if ph == 0 {
                    u.agent_cpu.push((now - last_agent) / dt * 100.0);
                }
                last_agent = now;
                u.agent_rss_peak = u.agent_rss_peak.max(rss(agent_pid));
            }
        })
    };

    // Pods as a watch on a follower shows them.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let rv = get_json(http, &format!("http://{}/api/v1/pods?limit=1", apis[1])).await?["metadata"]
        ["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let pod_watch = {
        let seen = seen.clone();
        follow(
            http.clone(),
            apis.to_vec(),
            1,
            "/api/v1/pods?labelSelector=density%3D1".into(),
            rv,
            stop.clone(),
            move |t, o, now| {
                let name = format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap_or(""),
                    o["metadata"]["name"].as_str().unwrap_or("")
                );
                let mut s = seen.lock().unwrap();
                let Seen { pods, live } = &mut *s;
                let p = pods.entry(name).or_default();
                if p.deleted {
                    return;
                }
                if t == "DELETED" {
                    p.deleted = true;
                    if p.added.is_some() {
                        *live -= 1;
                    }
                    return;
                }
                if p.added.is_none() {
                    p.added = Some(now);
                    *live += 1;
                }
                if p.bound.is_none() && o["spec"]["nodeName"].is_string() {
                    p.bound = Some(now);
                }
                if p.running.is_none() && is_running(o) {
                    p.running = Some(now);
                }
            },
        )
    };

    // The watch-delay probe: `watchers` watches of the probe namespace's pods, spread over
    // the replicas; a probe pod patched every 250 ms.
    write(
        http,
        Method::POST,
        &format!("http://{a0}/api/v1/namespaces"),
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "probe"}}),
    )
    .await?;
    write(http, Method::POST, &format!("http://{a0}/api/v1/namespaces/probe/pods"),
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "labels": {"n": "0"}},
                "spec": {"schedulerName": "none", "containers": [{"name": "c", "image": "pause"}]}})).await?;
    write(http, Method::POST, &format!("http://{a0}/api/v1/namespaces/probe/configmaps"),
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}, "data": {"n": "0"}})).await?;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let delays: Arc<Mutex<Vec<u64>>> = Arc::default();
    let prv = get_json(http, &format!("http://{a0}/api/v1/namespaces/probe/pods")).await?
        ["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let mut watchers = Vec::new();
    for w in 0..args.watchers {
        let (sent, delays, phase) = (sent.clone(), delays.clone(), phase.clone());
        watchers.push(follow(
            http.clone(),
            apis.to_vec(),
            w % 3,
            "/api/v1/namespaces/probe/pods".into(),
            prv.clone(),
            stop.clone(),
            move |_, o, now| {
                // Load and steady state only: after the leader is killed, the watchers on
                // it replay what they missed, with the outage in their delay.
                if phase.load(Ordering::SeqCst) >= 2 {
                    return;
                }
                let n = o["metadata"]["labels"]["n"].as_str().unwrap_or("");
                if let Some(t) = sent.lock().unwrap().get(n) {
                    delays
                        .lock()
                        .unwrap()
                        .push(now.saturating_duration_since(*t).as_micros() as u64);
                }
            },
        ));
    }

    // The API probe.
    let lat = Lat::default();
    let probe = {
        let (http, a0, a1, stop, lat, seen, sent) = (
            http.clone(),
            a0.clone(),
            apis[1].clone(),
            stop.clone(),
            lat.clone(),
            seen.clone(),
            sent.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                i += 1;
                let t = Instant::now();
                sent.lock().unwrap().insert(i.to_string(), t);
                if write(
                    &http,
                    Method::PATCH,
                    &format!("http://{a0}/api/v1/namespaces/probe/pods/probe"),
                    &json!({"metadata": {"labels": {"n": i.to_string()}}}),
                )
                .await
                .is_ok()
                {
                    lat.add("PATCH pods", t);
                }
                let t = Instant::now();
                if write(
                    &http,
                    Method::PATCH,
                    &format!("http://{a0}/api/v1/namespaces/probe/configmaps/probe"),
                    &json!({"data": {"n": i.to_string()}}),
                )
                .await
                .is_ok()
                {
                    lat.add("PATCH configmaps", t);
                }
                let name = format!("c{i}");
                let t = Instant::now();
                if write(
                    &http,
                    Method::POST,
                    &format!("http://{a1}/api/v1/namespaces/probe/configmaps"),
                    &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}),
                )
                .await
                .is_ok()
                {
                    lat.add("POST configmaps", t);
                }
                let t = Instant::now();
                if write(
                    &http,
                    Method::DELETE,
                    &format!("http://{a1}/api/v1/namespaces/probe/configmaps/{name}"),
                    &json!({}),
                )
                .await
                .is_ok()
                {
                    lat.add("DELETE configmaps", t);
                }
                let some_pod = seen
                    .lock()
                    .unwrap()
                    .pods
                    .iter()
                    .find(|(_, p)| !p.deleted)
                    .map(|(k, _)| k.clone());
                if let Some(k) = some_pod {
                    let (ns, name) = k.split_once('/').unwrap_or(("", ""));
                    let t = Instant::now();
                    if get_json(
                        &http,
                        &format!("http://{a1}/api/v1/namespaces/{ns}/pods/{name}"),
                    )
                    .await
                    .is_ok()
                    {
                        lat.add("GET pods", t);
                    }
                }
                let t = Instant::now();
                if get_json(
                    &http,
                    &format!("http://{a1}/api/v1/nodes/hollow-{}", i as usize % n.max(1)),
                )
                .await
                .is_ok()
                {
                    lat.add("GET nodes", t);
                }
                if i.is_multiple_of(8) {
                    let t = Instant::now();
                    if get_json(
                        &http,
                        &format!("http://{a1}/api/v1/namespaces/density-0/pods"),
                    )
                    .await
                    .is_ok()
                    {
                        lat.add("LIST pods (namespace)", t);
                    }
                }
            }
        })
    };

    // Load: namespaces of Deployments (+ a Service each) and a Job, at the pod rate.
    let term_before = leader(http, &apis).await.map_or(0, |l| l.1);
    let load_start = Instant::now();
    let mut declared = 0usize;
    let mut deployments = 0;
    'load: for ns_i in 0..namespaces {
        let ns = format!("density-{ns_i}");
        let t = Instant::now();
        write(
            http,
            Method::POST,
            &format!("http://{a0}/api/v1/namespaces"),
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .await?;
        lat.add("POST namespaces", t);
        let t = Instant::now();
        write(http, Method::POST, &format!("http://{a0}/apis/batch/v1/namespaces/{ns}/jobs"),
            &json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "job"},
                    "spec": {"completions": 10, "parallelism": 5, "template": {"metadata": {"labels": {"job": "1"}},
                        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "30"],
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}})).await?;
        lat.add("POST jobs", t);
        res.jobs += 1;
        for d in 0..per_ns / size {
            if declared >= total {
                break 'load;
            }
            let replicas = size.min(total - declared);
            let app = format!("d{d}");
            let t = Instant::now();
            write(http, Method::POST, &format!("http://{a0}/apis/apps/v1/namespaces/{ns}/deployments"),
                &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": app},
                        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}},
                        "template": {"metadata": {"labels": {"app": app, "density": "1"}},
                        "spec": {"containers": [{"name": "c", "image": "pause", "ports": [{"containerPort": 8080}],
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}})).await?;
            lat.add("POST deployments", t);
            let t = Instant::now();
            write(http, Method::POST, &format!("http://{a0}/api/v1/namespaces/{ns}/services"),
                &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": app},
                        "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]}})).await?;
            lat.add("POST services", t);
            deployments += 1;
            declared += replicas;
            // Pace: `declared` pods by now at the target rate.
            let due =
                load_start + Duration::from_secs_f64(declared as f64 / args.pod_rate.max(0.001));
            tokio::time::sleep_until(due.into()).await;
        }
    }
    res.deployments = deployments;
    res.services = deployments;
    println!(
        "declared {declared} pods in {namespaces} namespaces in {:.1} s",
        load_start.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let running = seen
            .lock()
            .unwrap()
            .pods
            .values()
            .filter(|p| p.running.is_some() && !p.deleted)
            .count();
        res.pods_running = running;
        if running >= declared {
            break;
        }
        if Instant::now() > deadline {
            println!("timed out: {running} of {declared} pods Running");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    res.load_s = load_start.elapsed().as_secs_f64();
    let load_end = Instant::now();
    println!(
        "{} pods Running {:.1} s after the first Deployment",
        res.pods_running, res.load_s
    );

    // Steady state at full scale.
    phase.store(1, Ordering::SeqCst);
    let mut lists = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        get_json(
            http,
            &format!("http://{}/api/v1/namespaces/density-0/pods", apis[2]),
        )
        .await?;
        lists.push(t.elapsed().as_micros() as u64);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    res.list_full_namespace = latency(lists);
    tokio::time::sleep(Duration::from_secs(10)).await;
    phase.store(2, Ordering::SeqCst);
    res.raft_terms_during_load = leader(http, &apis).await.map_or(0, |l| l.1) - term_before;

    // The leader killed at full scale.
    if args.kill_leader {
        let (l, term) = leader(http, &apis).await.context("no leader")?;
        let alive: Vec<String> = (0..3)
            .filter(|&i| i != l)
            .map(|i| apis[i].clone())
            .collect();
        let before = seen.lock().unwrap().pods.len();
        let t = Instant::now();
        c.kill(l);
        let mut f = Failover::default();
        loop {
            if let Some((nl, nt)) = leader(http, &alive).await {
                if nt > term && nl != l {
                    f.new_leader_ms = t.elapsed().as_secs_f64() * 1000.0;
                    break;
                }
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("no new leader within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The first write the API takes, then a scale-up the controllers must act on.
        loop {
            let r = send(
                http,
                Method::PATCH,
                format!(
                    "http://{}/apis/apps/v1/namespaces/density-0/deployments/d0",
                    alive[0]
                ),
                "application/merge-patch+json",
                "application/json",
                serde_json::to_vec(&json!({"spec": {"replicas": size + 1}}))?,
            )
            .await;
            if matches!(r, Ok((StatusCode::OK, _))) {
                f.api_write_ms = t.elapsed().as_secs_f64() * 1000.0;
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("no write taken within 60 s of the kill: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        loop {
            if seen.lock().unwrap().pods.len() > before {
                f.controllers_first_action_ms = t.elapsed().as_secs_f64() * 1000.0;
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the new leader's controllers did not act within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        loop {
            if seen
                .lock()
                .unwrap()
                .pods
                .values()
                .any(|p| p.bound.is_some_and(|b| b > t))
            {
                f.scheduler_first_bind_ms = t.elapsed().as_secs_f64() * 1000.0;
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the new leader's scheduler bound nothing within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("leader killed: new leader {:.0} ms, write taken {:.0} ms, controllers' first pod {:.0} ms, scheduler's first bind {:.0} ms",
            f.new_leader_ms, f.api_write_ms, f.controllers_first_action_ms, f.scheduler_first_bind_ms);
        res.kill_leader = Some(f);
        c.spawn(l)?;
    }

    // Sizes, then teardown.
    for i in 0..3 {
        res.replicas.push(ReplicaUsage {
            data_dir_mib: dir_mib(&dir.join(format!("flotilla-{}", i + 1))),
            ..ReplicaUsage::default()
        });
    }
    let t = Instant::now();
    for ns_i in 0..namespaces {
        write(
            http,
            Method::DELETE,
            &format!("http://{a0}/api/v1/namespaces/density-{ns_i}"),
            &json!({}),
        )
        .await?;
    }
    // Deleting a pod takes two writes (the deletion, then the agent's confirmation once its
    // containers stopped) and rewrites its Service's endpoints: 150,000 pods took 300–330 s
    // here, so the bound grows with the count (3 s per thousand pods, at least 300 s).
    let deadline = Instant::now() + Duration::from_secs((total as u64 * 3 / 1000).max(300));
    loop {
        let live = seen.lock().unwrap().live;
        if live == 0 {
            break;
        }
        if Instant::now() > deadline {
            println!("teardown timed out with {live} pods left");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    res.teardown_s = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let _ = probe.await;
    let _ = sampler.await;
    pod_watch.abort();
    for w in watchers {
        w.abort();
    }

    // Figures.
    {
        let s = seen.lock().unwrap();
        let mut startup = Vec::new();
        let mut sched = Vec::new();
        let mut bound: Vec<Instant> = Vec::new();
        for p in s.pods.values() {
            if let (Some(a), Some(r)) = (p.added, p.running) {
                startup.push(r.saturating_duration_since(a).as_micros() as u64);
            }
            if let (Some(a), Some(b)) = (p.added, p.bound) {
                sched.push(b.saturating_duration_since(a).as_micros() as u64);
                // Throughput over the load phase (not the failover's pod).
                if b <= load_end {
                    bound.push(b);
                }
            }
        }
        res.pod_startup = latency(startup);
        res.pod_scheduling = latency(sched);
        bound.sort();
        if let (Some(first), Some(last)) = (bound.first(), bound.last()) {
            let span = last.duration_since(*first).as_secs_f64().max(0.001);
            res.scheduler_pods_per_s_mean = bound.len() as f64 / span;
            let mut j = 0;
            let mut peak = 0;
            for i in 0..bound.len() {
                while bound[i].duration_since(bound[j]) > Duration::from_secs(10) {
                    j += 1;
                }
                peak = peak.max(i - j + 1);
            }
            res.scheduler_pods_per_s_peak_10s = peak as f64 / 10.0;
        }
    }
    res.api = lat
        .0
        .lock()
        .unwrap()
        .drain()
        .map(|(k, v)| (k, latency(v)))
        .collect();
    res.watch_delay = latency(std::mem::take(&mut *delays.lock().unwrap()));
    res.watch_restarts = WATCH_RESTARTS.load(Ordering::Relaxed);
    res.retried = RETRIED.load(Ordering::Relaxed);
    {
        let u = usage.lock().unwrap();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        for i in 0..3 {
            let r = &mut res.replicas[i];
            r.cpu_percent_load = mean(&u.cpu[i][0]);
            r.cpu_percent_steady = mean(&u.cpu[i][1]);
            r.rss_mib_peak = u.rss_peak[i] as f64 / 1048576.0;
            r.rss_mib_steady = u.rss_last[i] as f64 / 1048576.0;
        }
        res.agent_cpu_percent_load = mean(&u.agent_cpu);
        res.agent_rss_mib_peak = u.agent_rss_peak as f64 / 1048576.0;
    }
    drop(agent);
    print(&res);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&res)?)?;
    }
    Ok(())
}

fn print(r: &DensityResults) {
    println!("\n== density: {} hollow nodes, {} pods ({} namespaces, {} Deployments + Services, {} Jobs) at {} pods/s ==",
        r.nodes, r.pods, r.namespaces, r.deployments, r.jobs, r.pod_rate);
    println!("command: {}", r.command);
    println!(
        "nodes Ready {:.1} s; load {:.1} s ({} Running)",
        r.nodes_ready_s, r.load_s, r.pods_running
    );
    let l = |x: &Latency| {
        format!(
            "p50 {:.1} / p90 {:.1} / p99 {:.1} / max {:.1} ms (n={})",
            x.p50_ms, x.p90_ms, x.p99_ms, x.max_ms, x.count
        )
    };
    println!("pod startup (seen → Running):   {}", l(&r.pod_startup));
    println!("pod scheduling (seen → bound):  {}", l(&r.pod_scheduling));
    println!(
        "scheduler: {:.0} pods/s mean, {:.0} peak over 10 s",
        r.scheduler_pods_per_s_mean, r.scheduler_pods_per_s_peak_10s
    );
    let mut keys: Vec<&String> = r.api.keys().collect();
    keys.sort();
    for k in keys {
        println!("API {k:<24} {}", l(&r.api[k]));
    }
    println!(
        "LIST full namespace:            {}",
        l(&r.list_full_namespace)
    );
    println!(
        "watch delay ({} watchers):     {} ({} restarts)",
        r.watchers,
        l(&r.watch_delay),
        r.watch_restarts
    );
    for (i, u) in r.replicas.iter().enumerate() {
        println!("replica {}: CPU {:.0}% load / {:.0}% steady; RSS peak {:.0} MiB, steady {:.0} MiB; data {:.0} MiB",
            i + 1, u.cpu_percent_load, u.cpu_percent_steady, u.rss_mib_peak, u.rss_mib_steady, u.data_dir_mib);
    }
    println!(
        "hollow agent: CPU {:.0}% load, RSS peak {:.0} MiB",
        r.agent_cpu_percent_load, r.agent_rss_mib_peak
    );
    if let Some(f) = &r.kill_leader {
        println!("leader killed: new leader {:.0} ms, API write {:.0} ms, controllers' first action {:.0} ms, scheduler's first bind {:.0} ms",
            f.new_leader_ms, f.api_write_ms, f.controllers_first_action_ms, f.scheduler_first_bind_ms);
    }
    println!(
        "teardown {:.1} s; {} overload answers retried",
        r.teardown_s, r.retried
    );
}
