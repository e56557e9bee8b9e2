//! The node agent's numbers (issue 5): pod startup latency and the agent's cost.
//!
//! `--scenario startup` starts the three replicas and `--agents` real `flotilla agent`s
//! (`--runtime process`, or `cri` against `--cri-endpoint`), then:
//! 1. **Startup latency**: opens a watch on the pods of one namespace (on a follower), then
//!    creates `--pods` pods (`sleep 3600`, image `busybox:1.35`) with `--concurrency`
//!    clients. A pod's latency runs from the moment its create was sent to the moment the
//!    watch shows it `Running` (Kubernetes' pod startup SLI, which excludes image pulls:
//!    images are local here). Reports p50/p90/p99/max.
//! 2. **Agent cost at `--pods-per-node` pods per node**: fills every node to that many
//!    pods, waits until all run, then for 30 s samples each agent's CPU (user+system) and
//!    resident memory, and the proportional memory of the per-container supervisors (the
//!    process runtime's `flotilla-shim`s).

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

use crate::{cpu_seconds, latency, ok, send, Args, Cluster, Http, Latency};

const NS: &str = "startup";

#[derive(Debug, Default, Serialize)]
struct StartupResults {
    command: String,
    runtime: String,
    agents: usize,
    pods: usize,
    concurrency: usize,
    /// Created (sent) → seen Running in a watch.
    startup: Latency,
    pods_per_node: usize,
    /// Per agent, with `pods_per_node` pods running: CPU (% of one core) and RSS.
    agent_cpu_percent: Vec<f64>,
    agent_rss_mib: Vec<f64>,
    /// The shims of all agents: proportional set size together, and per container.
    shims: usize,
    shim_pss_mib_total: f64,
    shim_pss_kib_each: f64,
}

/// The agents, killed (with what their pods left) when the run ends.
struct Agents {
    children: Vec<Child>,
    dirs: Vec<std::path::PathBuf>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.dirs {
            for pid in shim_pids(d) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            for pod in std::fs::read_dir(d.join("pods"))
                .into_iter()
                .flatten()
                .flatten()
            {
                for f in std::fs::read_dir(pod.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if f.path().extension().is_some_and(|e| e == "pid") {
                        if let Some(pid) = std::fs::read_to_string(f.path())
                            .ok()
                            .and_then(|s| s.trim().parse::<i32>().ok())
                        {
                            let _ = nix::sys::signal::killpg(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The shim processes (`flotilla-shim`) whose command line names `dir`.
fn shim_pids(dir: &Path) -> Vec<u32> {
    let want = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_string_lossy().parse().ok()?;
            let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.contains("shim\0") && cmd.contains(&want)).then_some(pid)
        })
        .collect()
}

/// Proportional set size: resident memory with shared pages (the shim binary's) divided
/// among the processes sharing them.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

async fn get(http: &Http, url: String) -> anyhow::Result<Value> {
    let (status, body) = send(
        http,
        Method::GET,
        url,
        "application/json",
        "application/json",
        vec![],
    )
    .await?;
    if status != StatusCode::OK {
        bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Watches the pods of [`NS`] on `api` from `rv`; records when each is first seen Running.
fn watch_running(
    http: Http,
    api: String,
    rv: String,
    running: Arc<Mutex<HashMap<String, Instant>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let url = format!(
        "http://{api}/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={rv}&timeoutSeconds=3600"
    );
    crate::watch_events(http, url, stop, move |ev, now| {
        if ev["object"]["status"]["phase"] == "Running" {
            let name = ev["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            running.lock().unwrap().entry(name).or_insert(now);
        }
    })
}

/// Creates pods `prefix-<from..to>` with `concurrency` clients; returns when each was sent.
async fn create_pods(
    http: &Http,
    apis: &[String],
    prefix: &str,
    range: std::ops::Range<usize>,
    concurrency: usize,
) -> anyhow::Result<HashMap<String, Instant>> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (http, api, next, sent) = (
            http.clone(),
            apis[w % apis.len()].clone(),
            next.clone(),
            sent.clone(),
        );
        let (prefix, end) = (prefix.to_string(), range.end);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return anyhow::Ok(());
                }
                let name = format!("{prefix}-{i:05}");
                let pod = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": {"app": "startup"}},
                    "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                        "name": "c", "image": "busybox:1.35", "command": ["sleep", "3600"],
                        "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}}}]}});
                sent.lock().unwrap().insert(name, Instant::now());
                ok(
                    &http,
                    Method::POST,
                    format!("http://{api}/api/v1/namespaces/{NS}/pods"),
                    "application/json",
                    serde_json::to_vec(&pod)?,
                )
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let out = sent.lock().unwrap().clone();
    Ok(out)
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Deletes every pod of [`NS`] and waits until they are gone.
async fn delete_all(http: &Http, api: &str) -> anyhow::Result<()> {
    ok(
        http,
        Method::DELETE,
        format!("http://{api}/api/v1/namespaces/{NS}/pods"),
        "application/json",
        vec![],
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list = get(http, format!("http://{api}/api/v1/namespaces/{NS}/pods")).await?;
        if list["items"].as_array().is_some_and(Vec::is_empty) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pods were not deleted within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn startup(
    args: &Args,
    c: &Cluster,
    http: &Http,
    dir: &Path,
) -> anyhow::Result<()> {
    // The cluster answers; a namespace for the pods.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = send(
            http,
            Method::POST,
            format!("http://{}/api/v1/namespaces", c.apis[0]),
            "application/json",
            "application/json",
            serde_json::to_vec(
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
            )?,
        )
        .await;
        if matches!(r, Ok((s, _)) if s.is_success() || s == StatusCode::CONFLICT) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the cluster did not come up (logs in {})", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut agents = Agents {
        children: Vec::new(),
        dirs: Vec::new(),
    };
    let servers = c.apis.join(",");
    for n in 1..=args.agents {
        let data = dir.join(format!("agent-{n}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::File::create(dir.join(format!("agent-{n}.log")))?;
        let mut cmd = Command::new(&args.flotilla);
        cmd.args([
            "agent",
            "--servers",
            &servers,
            "--node-name",
            &format!("bench-{n}"),
        ])
        .args(["--max-pods", &args.pods_per_node.max(110).to_string()])
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        if args.runtime == "cri" {
            // The pods on the node's network: no CNI in the benchmark's containerd.
            cmd.args(["--runtime", "cri", "--cri-network", "node"])
                .args(["--cri-endpoint", &args.cri_endpoint]);
        } else {
            cmd.args(["--pod-cidr", &format!("127.{}.0.0/16", 110 + n)]);
        }
        agents
            .children
            .push(cmd.spawn().context("starting an agent")?);
        agents.dirs.push(data);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = get(http, format!("http://{}/api/v1/nodes", c.apis[0])).await?;
        let ready = nodes["items"].as_array().map_or(0, |ns| {
            ns.iter()
                .filter(|n| {
                    n["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|x| x["type"] == "Ready" && x["status"] == "True")
                    })
                })
                .count()
        });
        if ready == args.agents {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agents did not register (logs in {})", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut res = StartupResults {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        runtime: args.runtime.clone(),
        agents: args.agents,
        pods: args.pods,
        concurrency: args.concurrency,
        pods_per_node: args.pods_per_node,
        ..Default::default()
    };

    // 1. Startup latency.
    let watch_api = c.apis[1].clone();
    let list = get(
        http,
        format!("http://{watch_api}/api/v1/namespaces/{NS}/pods?limit=1"),
    )
    .await?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let watch = watch_running(http.clone(), watch_api, rv, running.clone(), stop.clone());
    let sent = create_pods(http, &c.apis, "lat", 0..args.pods, args.concurrency).await?;
    {
        let running = running.clone();
        wait_until("every pod to run", Duration::from_secs(300), || {
            running.lock().unwrap().len() >= args.pods
        })
        .await?;
    }
    let seen = running.lock().unwrap().clone();
    let micros: Vec<u64> = sent
        .iter()
        .filter_map(|(name, t)| Some(seen.get(name)?.duration_since(*t).as_micros() as u64))
        .collect();
    res.startup = latency(micros);
    println!(
        "startup ({} runtime, {} pods on {} agents, {} clients): p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        args.runtime, args.pods, args.agents, args.concurrency,
        res.startup.p50_ms, res.startup.p90_ms, res.startup.p99_ms, res.startup.max_ms
    );
    delete_all(http, &c.apis[0]).await?;

    // 2. The agents' cost with pods_per_node pods on every node.
    let total = args.pods_per_node * args.agents;
    running.lock().unwrap().clear();
    create_pods(http, &c.apis, "full", 0..total, args.concurrency).await?;
    {
        let running = running.clone();
        wait_until("every node to be full", Duration::from_secs(600), || {
            running.lock().unwrap().len() >= total
        })
        .await?;
    }
    // Settled: the creation burst is over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pids: Vec<u32> = agents.children.iter().map(Child::id).collect();
    let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(&[*p])).collect();
    let window = Duration::from_secs(30);
    let t = Instant::now();
    let mut peak_rss = vec![0u64; pids.len()];
    while t.elapsed() < window {
        for (i, p) in pids.iter().enumerate() {
            peak_rss[i] = peak_rss[i].max(crate::rss(*p) / 1024);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    res.agent_cpu_percent = pids
        .iter()
        .zip(&before)
        .map(|(p, b)| (cpu_seconds(&[*p]) - b) / secs * 100.0)
        .collect();
    res.agent_rss_mib = peak_rss.iter().map(|k| *k as f64 / 1024.0).collect();
    let shims: Vec<u32> = agents.dirs.iter().flat_map(|d| shim_pids(d)).collect();
    res.shims = shims.len();
    let shim_kib: u64 = shims.iter().map(|p| pss_kib(*p)).sum();
    res.shim_pss_mib_total = shim_kib as f64 / 1024.0;
    res.shim_pss_kib_each = if shims.is_empty() {
        0.0
    } else {
        shim_kib as f64 / shims.len() as f64
    };
    println!(
        "at {} pods per node: agent CPU {:?} % of a core, agent RSS {:?} MiB; {} shims, {:.1} MiB PSS together ({:.0} KiB each)",
        args.pods_per_node,
        res.agent_cpu_percent.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
        res.agent_rss_mib.iter().map(|x| x.round()).collect::<Vec<_>>(),
        res.shims, res.shim_pss_mib_total, res.shim_pss_kib_each
    );
    delete_all(http, &c.apis[0]).await?;
    stop.store(true, Ordering::SeqCst);
    let _ = watch.await;
    drop(agents);
    println!("command: {}", res.command);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&res)?)?;
    }
    Ok(())
}
