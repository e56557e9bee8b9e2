//! The chaos suite: seeded fault injection against a real three-replica Flotilla cluster,
//! with recorded histories and checkers.
//!
//! A run ([`run`]) starts the cluster ([`cluster`], on loopback addresses or in network
//! namespaces of [`netns`]), runs the key-value register workload ([`kv`]) from many
//! clients and the watch workload ([`watch`]) through random replicas while the nemesis
//! injects faults ([`Fault`]; network ones through [`net`]) from a schedule drawn from the
//! seed, heals, waits for the cluster to recover (the three replicas voters again), reads
//! every key from every replica, and checks:
//! - **linearizability** of each key's history ([`linearizability`]), the final reads
//!   included, so an acknowledged write that was lost, a stale read and a write applied
//!   twice are all caught;
//! - **identical state**: every replica holds the same keys, values and revisions at one
//!   revision;
//! - **watch guarantees**: every watcher's events, across its reconnections, equal the
//!   reference history (ordered, unique, atomic per revision, no gaps, nothing missed);
//! - **Kubernetes invariants** of the [`k8s`] workload: no pod bound twice, no node over
//!   capacity, one controller leader per term, Deployments converging after recovery.
//!
//! The seed fixes the fault schedule and each client's operation stream (timing still
//! varies from run to run). Every run writes its history, a JSON report and a summary with
//! the fault timeline to its output folder and prints the command that reproduces it.

pub mod cluster;
pub mod k8s;
pub mod kv;
pub mod linearizability;
pub mod net;
pub mod netns;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla::client::Client;
use flotilla::gateway::json::{RangeRequest, RangeResponse};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use cluster::Cluster;
use linearizability::{Input, Operation, Output, Verdict};

/// The faults this build can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// `kill -9` of the leader, restarted at heal.
    KillLeader,
    /// `kill -9` of a follower, restarted at heal.
    KillFollower,
    /// `kill -9` of two replicas (the cluster stops until heal).
    KillMajority,
    /// `kill -9` of all three replicas at once, restarted together at heal.
    KillAll,
    /// SIGSTOP of the leader (SIGCONT at heal): a leader that comes back believing it leads.
    PauseLeader,
    /// SIGSTOP of a follower.
    PauseFollower,
    /// The leader cut off from both followers (clients still reach it).
    IsolateLeader,
    /// One follower cut off from the other two.
    IsolateFollower,
    /// Packets from the leader to the followers dropped; theirs still reach it.
    OneWayFromLeader,
    /// Two replicas cut off from each other; the third (the bridge) still sees both.
    Bridge,
    /// 20% of the packets between every two replicas dropped at random.
    Loss,
    /// One replica's disk (its tmpfs) filled: its writes fail with ENOSPC.
    DiskFull,
    /// One replica restarted with its wall clock skewed (libfaketime).
    ClockSkew,
    /// A follower killed, removed from the membership and its data wiped; at heal it
    /// rejoins as a new member (`--join`, `member add`).
    Wipe,
    /// A running follower removed from the membership (it keeps running, no longer a
    /// member); at heal it is stopped, wiped and added back as a new member.
    Membership,
}

impl Fault {
    fn is_network(self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader
                | Fault::IsolateFollower
                | Fault::OneWayFromLeader
                | Fault::Bridge
                | Fault::Loss
        )
    }
}

/// The `--faults` names this build implements, and the faults each selects.
pub const FAULT_NAMES: &[(&str, &[Fault])] = &[
    (
        "kill",
        &[
            Fault::KillLeader,
            Fault::KillFollower,
            Fault::KillMajority,
            Fault::KillAll,
        ],
    ),
    ("pause", &[Fault::PauseLeader, Fault::PauseFollower]),
    (
        "partition",
        &[
            Fault::IsolateLeader,
            Fault::IsolateFollower,
            Fault::OneWayFromLeader,
            Fault::Bridge,
        ],
    ),
    ("loss", &[Fault::Loss]),
    ("disk-full", &[Fault::DiskFull]),
    ("clock-skew", &[Fault::ClockSkew]),
    ("wipe", &[Fault::Wipe]),
    ("membership", &[Fault::Membership]),
];

const BUILT: &str = "kill, pause, partition, loss, disk-full, clock-skew, wipe, membership";

/// Parses a `--faults` list.
pub fn parse_faults(list: &str) -> anyhow::Result<Vec<Fault>> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((_, fs)) = FAULT_NAMES.iter().find(|(n, _)| *n == name) {
            out.extend_from_slice(fs);
        } else {
            anyhow::bail!("unknown fault {name:?} (this build injects: {BUILT})");
        }
    }
    if out.is_empty() {
        anyhow::bail!("no faults selected");
    }
    Ok(out)
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seeds the fault schedule and the clients' operations.
    pub seed: u64,
    /// How long the workload runs under faults.
    pub duration: Duration,
    /// Where the cluster's data, logs, the history and the report go.
    pub out: PathBuf,
    /// The faults to draw from.
    pub faults: Vec<Fault>,
    /// The `flotilla` binary.
    pub flotilla: PathBuf,
    /// The workload's knobs.
    pub workload: kv::Workload,
    /// Watchers of the `watch` workload (0: no watch workload).
    pub watchers: u32,
    /// Whether the Kubernetes workload runs (Deployments scaled onto simulated nodes).
    pub k8s: bool,
    /// The run's network namespaces (`--network netns`; the caller has already moved the
    /// process into the clients' namespace); `None`: loopback addresses.
    pub netns: Option<Arc<netns::Netns>>,
    /// The command line that reproduces the run.
    pub command: String,
}

/// What one watcher did.
#[derive(Debug, Clone, Serialize)]
pub struct WatcherSummary {
    /// Streams opened (1 + reconnections).
    pub streams: u32,
    /// Events received.
    pub events: usize,
}

/// One line of the fault timeline.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEvent {
    /// Milliseconds since the workload started.
    pub at_ms: u64,
    /// What happened.
    pub event: String,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The command that reproduces the run.
    pub command: String,
    /// Seconds of workload under faults.
    pub duration_seconds: f64,
    /// Faults injected and healed.
    pub timeline: Vec<TimelineEvent>,
    /// Request outcomes.
    pub requests: kv::Counts,
    /// Operations in the checked history (final reads included).
    pub operations: usize,
    /// Per key: the checker's verdict.
    pub verdicts: BTreeMap<String, Verdict>,
    /// Whether all replicas held the same state at one revision.
    pub state_identical: bool,
    /// The watch workload, if it ran: per watcher, streams opened and events received.
    pub watchers: Vec<WatcherSummary>,
    /// Events in the reference history the watchers were checked against.
    pub watch_reference_events: usize,
    /// The Kubernetes workload, if it ran.
    pub k8s: Option<k8s::Summary>,
    /// Everything that went wrong; empty on a passing run.
    pub violations: Vec<String>,
}

impl Report {
    /// True when nothing went wrong.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// A human-readable summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "flotilla-chaos: seed {} — {}\n",
            self.seed,
            if self.passed() { "PASSED" } else { "FAILED" }
        );
        s += &format!("reproduce: {}\n\n", self.command);
        s += &format!(
            "{:.0} s of workload: {} answered, {} refused (no effect), {} indeterminate; {} operations checked\n\n",
            self.duration_seconds,
            self.requests.ok,
            self.requests.refused,
            self.requests.indeterminate,
            self.operations
        );
        s += "timeline:\n";
        for e in &self.timeline {
            s += &format!("  {:>8.3} s  {}\n", e.at_ms as f64 / 1000.0, e.event);
        }
        s += "\nkeys:\n";
        for (k, v) in &self.verdicts {
            s += &format!("  {k}: {v:?}\n");
        }
        s += &format!("\nreplica state identical: {}\n", self.state_identical);
        if let Some(k) = &self.k8s {
            s += &format!(
                "kubernetes: {} scales answered, {} pod lists, {} pods seen, at most {} on a node, {} terms with a controller leader\n",
                k.scales, k.lists, k.pods_seen, k.max_pods_on_a_node, k.terms_with_a_controller_leader
            );
        }
        if !self.watchers.is_empty() {
            s += &format!(
                "watchers: {} against a reference of {} events: {}\n",
                self.watchers.len(),
                self.watch_reference_events,
                self.watchers
                    .iter()
                    .map(|w| format!("{} events over {} streams", w.events, w.streams))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        if !self.violations.is_empty() {
            s += "\nviolations:\n";
            for v in &self.violations {
                s += &format!("  - {v}\n");
            }
        }
        s
    }
}

fn describe(f: Fault, ids: &[u64]) -> String {
    let who = ids
        .iter()
        .map(|i| format!("replica {i}"))
        .collect::<Vec<_>>()
        .join(", ");
    match f {
        Fault::KillLeader => format!("kill -9 leader ({who})"),
        Fault::KillFollower => format!("kill -9 follower ({who})"),
        Fault::KillMajority => format!("kill -9 majority ({who})"),
        Fault::KillAll => format!("kill -9 all ({who})"),
        Fault::PauseLeader => format!("SIGSTOP leader ({who})"),
        Fault::PauseFollower => format!("SIGSTOP follower ({who})"),
        Fault::IsolateLeader => format!("partition: leader isolated ({who})"),
        Fault::IsolateFollower => format!("partition: follower isolated ({who})"),
        Fault::OneWayFromLeader => {
            format!("partition: leader's packets to the followers dropped ({who})")
        }
        Fault::Bridge => {
            format!("partition: bridge ({who} cut from each other, the third sees both)")
        }
        Fault::Loss => "20% packet loss between all replicas".to_string(),
        Fault::DiskFull => format!("disk full ({who})"),
        Fault::ClockSkew => format!("clock skewed ({who})"),
        Fault::Wipe => format!("kill -9, member remove and data wiped ({who})"),
        Fault::Membership => format!("member remove of a running follower ({who})"),
    }
}

/// Runs one seeded chaos run and returns its report (also written to `opts.out`).
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let tmpfs = opts.faults.contains(&Fault::DiskFull);
    // Simulated nodes send no heartbeats: their grace period outlasts the run.
    let extra: &[&str] = if opts.k8s {
        &["--node-monitor-grace-period", "100000"]
    } else {
        &[]
    };
    let mut cluster = Cluster::start(
        &opts.flotilla,
        &opts.out,
        tmpfs,
        opts.netns.as_deref(),
        extra,
    )?;
    // Network faults need iptables: checked (and, on loopback, rules of dead runs swept)
    // before the workload starts.
    let mut net = if opts.faults.iter().any(|f| f.is_network()) {
        Some(match cluster.namespaces() {
            Some(map) => net::Net::in_namespaces(map)?,
            None => net::Net::new()?,
        })
    } else {
        None
    };
    let admin = Client::new(cluster.apis(), Duration::from_secs(2));
    cluster
        .wait_healthy(&admin, Duration::from_secs(60))
        .await
        .context("the cluster did not start")?;
    if opts.k8s {
        k8s::setup(&cluster.apis())
            .await
            .context("setting up the Kubernetes workload")?;
    }

    let rec = Arc::new(kv::Recorder::default());
    let start = Instant::now();
    let until = start + opts.duration;
    let clients: Vec<_> = (0..opts.workload.clients)
        .map(|id| {
            tokio::spawn(kv::run_client(
                id,
                opts.seed,
                opts.workload.clone(),
                cluster.apis(),
                start,
                until,
                rec.clone(),
            ))
        })
        .collect();
    let k8s_tasks = opts.k8s.then(|| {
        (
            tokio::spawn(k8s::run_scaler(opts.seed, cluster.apis(), until)),
            tokio::spawn(k8s::observe(cluster.apis(), until)),
        )
    });
    let watchers: Vec<_> = (0..opts.watchers)
        .map(|id| {
            tokio::spawn(watch::run_watcher(
                id,
                opts.seed,
                cluster.apis(),
                until,
                opts.workload.timeout,
            ))
        })
        .collect();

    // The nemesis: healthy for 1–3 s, then one fault for 1–4 s, healed, and again.
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut timeline = Vec::new();
    let mut note = |event: String| {
        tracing::info!(%event, "nemesis");
        timeline.push(TimelineEvent {
            at_ms: start.elapsed().as_millis() as u64,
            event,
        });
    };
    loop {
        let calm = Duration::from_millis(rng.gen_range(1000..3000));
        let hold = Duration::from_millis(rng.gen_range(1000..4000));
        if Instant::now() + calm + hold >= until {
            break;
        }
        tokio::time::sleep(calm).await;
        let fault = *opts.faults.choose(&mut rng).expect("faults are not empty");
        let leader = cluster.leader(&admin).await;
        let mut ids: Vec<u64> = cluster.ids();
        ids.shuffle(&mut rng);
        let leader = leader.unwrap_or(ids[0]);
        let followers: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();
        let victims: Vec<u64> = match fault {
            Fault::KillLeader
            | Fault::PauseLeader
            | Fault::IsolateLeader
            | Fault::OneWayFromLeader => vec![leader],
            Fault::KillFollower
            | Fault::PauseFollower
            | Fault::IsolateFollower
            | Fault::Wipe
            | Fault::Membership => vec![followers[0]],
            Fault::KillMajority => vec![leader, followers[0]],
            Fault::KillAll | Fault::Loss => cluster.ids(),
            Fault::DiskFull | Fault::ClockSkew => vec![ids[0]],
            // Two replicas that lose each other; the remaining one is the bridge.
            Fault::Bridge => vec![ids[0], ids[1]],
        };
        let ip = |id: u64| cluster.ip(id);
        let all = cluster.ids();
        // A member removed now and added back, as a new member, at heal.
        let mut rejoin = None;
        match fault {
            Fault::DiskFull | Fault::ClockSkew => {}
            Fault::Wipe => {
                cluster.kill(victims[0]);
                remove_member(&admin, &cluster.apis(), victims[0]).await?;
                rejoin = Some(victims[0]);
            }
            Fault::Membership => {
                remove_member(&admin, &cluster.apis(), victims[0]).await?;
                rejoin = Some(victims[0]);
            }
            Fault::PauseLeader | Fault::PauseFollower => {
                victims.iter().for_each(|&v| cluster.pause(v))
            }
            Fault::KillLeader | Fault::KillFollower | Fault::KillMajority | Fault::KillAll => {
                victims.iter().for_each(|&v| cluster.kill(v))
            }
            Fault::IsolateLeader | Fault::IsolateFollower => {
                let n = net.as_mut().expect("network faults have iptables");
                for &other in all.iter().filter(|i| **i != victims[0]) {
                    n.cut(&ip(victims[0]), &ip(other))?;
                }
            }
            Fault::OneWayFromLeader => {
                let n = net.as_mut().expect("network faults have iptables");
                for f in &followers {
                    n.cut_one_way(&ip(leader), &ip(*f))?;
                }
            }
            Fault::Bridge => {
                let n = net.as_mut().expect("network faults have iptables");
                n.cut(&ip(victims[0]), &ip(victims[1]))?;
            }
            Fault::Loss => {
                let n = net.as_mut().expect("network faults have iptables");
                for (i, a) in all.iter().enumerate() {
                    for b in &all[i + 1..] {
                        n.lossy(&ip(*a), &ip(*b), 0.2)?;
                    }
                }
            }
        }
        let mut what = describe(fault, &victims);
        match fault {
            Fault::DiskFull => cluster.fill_disk(victims[0])?,
            Fault::ClockSkew => {
                let offset = *["+90s", "-90s", "+2h", "-2h", "+1d"]
                    .choose(&mut rng)
                    .expect("not empty");
                cluster.restart_skewed(victims[0], offset)?;
                what = format!("{what} by {offset}");
            }
            _ => {}
        }
        note(what);
        tokio::time::sleep(hold).await;
        if let Some(n) = net.as_mut() {
            n.heal();
        }
        if let Some(old) = rejoin {
            cluster.kill(old);
            let (new_id, peer) = cluster.wipe_for_rejoin(old)?;
            cluster.launch(new_id)?;
            add_member(&admin, &cluster.apis(), new_id, &peer).await?;
            note(format!("replica {old} rejoined, wiped, as member {new_id}"));
        }
        for found in cluster.heal()? {
            note(found);
        }
        note("healed".into());
    }
    let left = until.saturating_duration_since(Instant::now());
    tokio::time::sleep(left).await;
    if let Some(n) = net.as_mut() {
        n.heal();
    }
    for found in cluster.heal()? {
        note(found);
    }
    for c in clients {
        c.await.context("a workload client panicked")?;
    }
    let mut watched = Vec::new();
    for w in watchers {
        watched.push(w.await.context("a watcher panicked")?);
    }
    let k8s_results = match k8s_tasks {
        Some((scaler, observer)) => Some((
            scaler.await.context("the scaler panicked")?,
            observer.await.context("the observer panicked")?,
        )),
        None => None,
    };
    let duration_seconds = start.elapsed().as_secs_f64();

    let mut violations = Vec::new();
    let recovered = cluster.wait_healthy(&admin, Duration::from_secs(60)).await;
    note(match &recovered {
        Ok(l) => format!("recovered: replica {l} leads, every replica caught up"),
        Err(e) => format!("not recovered: {e}"),
    });
    if let Err(e) = &recovered {
        violations.push(e.to_string());
    }

    // Final reads: every key from every replica, in turn; they join the history, so an
    // acknowledged write missing at the end is a linearizability violation.
    let mut ops = std::mem::take(&mut *rec.ops.lock().expect("not poisoned"));
    if recovered.is_ok() {
        for k in 0..opts.workload.keys {
            let key = format!("{}{k}", kv::PREFIX);
            for r in &cluster.replicas {
                let call_us = kv::micros(start);
                match final_read(&admin, &r.api(), &key).await {
                    Ok(v) => ops.push(Operation {
                        client: 10_000 + r.id as u32,
                        server: r.api(),
                        key: key.clone(),
                        input: Input::Read,
                        call_us,
                        return_us: Some(kv::micros(start)),
                        output: Output::Read(v),
                    }),
                    Err(e) => {
                        violations.push(format!("final read of {key} from replica {}: {e}", r.id))
                    }
                }
            }
        }
    }
    let verdicts = linearizability::check(&ops);
    for (k, v) in &verdicts {
        match v {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable {
                longest_prefix,
                stuck_at,
            } => {
                // Name the operations none of which could come next (indices are into the
                // key's operations in history order).
                let key_ops: Vec<&Operation> = ops.iter().filter(|o| &o.key == k).collect();
                let stuck: Vec<String> = stuck_at
                    .iter()
                    .take(6)
                    .filter_map(|i| key_ops.get(*i))
                    .map(|o| {
                        format!(
                            "client {} via {} {:?} → {:?} [{} µs, {}]",
                            o.client,
                            o.server,
                            o.input,
                            o.output,
                            o.call_us,
                            o.return_us
                                .map(|r| format!("{r} µs"))
                                .unwrap_or_else(|| "no answer".into())
                        )
                    })
                    .collect();
                violations.push(format!(
                    "the history of {k} is not linearizable: the longest linearizable prefix has {longest_prefix} of its {} operations; none of these could come next: {}",
                    key_ops.len(),
                    stuck.join("; ")
                ))
            }
            Verdict::Unknown => violations.push(format!(
                "the checker could not decide {k} within its step budget"
            )),
        }
    }
    let state_identical = recovered.is_ok()
        && match same_state(&admin, &cluster.apis()).await {
            Ok(()) => true,
            Err(e) => {
                violations.push(format!("replica state differs: {e}"));
                false
            }
        };

    // Watches: each watcher reads on to the head revision, and is compared with the
    // reference history read from revision 1.
    let mut watcher_summaries = Vec::new();
    let mut watch_reference_events = 0;
    if !watched.is_empty() && recovered.is_ok() {
        let head = match kv::head_revision(&admin, &cluster.apis()[0]).await {
            Ok(h) => h,
            Err(e) => {
                violations.push(format!("reading the head revision: {e}"));
                0
            }
        };
        match watch::reference(&cluster.apis(), head).await {
            Err(e) => violations.push(format!("reading the reference history: {e}")),
            Ok(truth) => {
                watch_reference_events = truth.len();
                for (id, (mut got, next)) in watched.into_iter().enumerate() {
                    let id = id as u32;
                    if let Err(e) = watch::catch_up(
                        &cluster.apis(),
                        &mut got,
                        next,
                        head,
                        Duration::from_secs(30),
                    )
                    .await
                    {
                        violations.push(format!("watcher {id}: {e}"));
                    }
                    violations.extend(watch::check(id, &got, &truth, head));
                    watcher_summaries.push(WatcherSummary {
                        streams: got.streams,
                        events: got.events.len(),
                    });
                }
            }
        }
    }

    // Kubernetes: the Deployments converge, and nothing the observer saw was wrong.
    let k8s_summary = match k8s_results {
        Some((scales, mut obs)) => {
            if recovered.is_ok() {
                if let Err(e) = k8s::converge(&cluster.apis(), &mut obs).await {
                    violations.push(e);
                }
            }
            violations.append(&mut obs.violations);
            Some(k8s::Summary {
                scales,
                ..obs.summary()
            })
        }
        None => None,
    };

    let requests = rec.counts.lock().expect("not poisoned").clone();
    let report = Report {
        seed: opts.seed,
        command: opts.command.clone(),
        duration_seconds,
        timeline,
        requests,
        operations: ops.len(),
        verdicts,
        state_identical,
        watchers: watcher_summaries,
        watch_reference_events,
        k8s: k8s_summary,
        violations,
    };
    std::fs::write(opts.out.join("history.json"), serde_json::to_vec(&ops)?)?;
    std::fs::write(
        opts.out.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(opts.out.join("summary.txt"), report.summary())?;
    Ok(report)
}

/// Removes member `id` through any replica, retrying while refused (within 30 s).
async fn remove_member(client: &Client, apis: &[String], id: u64) -> anyhow::Result<()> {
    member_change(
        client,
        apis,
        "/v3/cluster/member/remove",
        serde_json::json!({ "ID": id.to_string() }),
    )
    .await
    .with_context(|| format!("member remove {id}"))
}

/// Adds member `id` (a voter once caught up) through any replica, retrying while refused.
async fn add_member(client: &Client, apis: &[String], id: u64, peer: &str) -> anyhow::Result<()> {
    member_change(
        client,
        apis,
        "/v3/cluster/member/add",
        serde_json::json!({ "ID": id.to_string(), "peerURLs": [peer] }),
    )
    .await
    .with_context(|| format!("member add {id}"))
}

async fn member_change(
    client: &Client,
    apis: &[String],
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        let api = &apis[i % apis.len()];
        i += 1;
        match client
            .post_to::<_, serde_json::Value>(api, path, &body)
            .await
        {
            Ok(_) => return Ok(()),
            // An earlier try that timed out had applied it: the member is gone.
            Err(flotilla::client::ClientError::Api { status: 404, .. })
                if path.ends_with("/remove") && i > 1 =>
            {
                return Ok(())
            }
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A linearizable read, retried while refused (the cluster just recovered).
async fn final_read(client: &Client, server: &str, key: &str) -> anyhow::Result<Option<String>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match kv::read(client, server, key).await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A key, the revision that last changed it, and its value.
type Entry = (Vec<u8>, i64, Vec<u8>);

/// Compares every replica's whole keyspace at one revision (local reads).
async fn same_state(client: &Client, apis: &[String]) -> anyhow::Result<()> {
    let all = |revision: i64, serializable: bool| RangeRequest {
        key: vec![0],
        range_end: vec![0],
        revision,
        serializable,
        ..Default::default()
    };
    let head: RangeResponse = client
        .post_to(&apis[0], "/v3/kv/range", &all(0, false))
        .await?;
    let revision = head.header.revision;
    let mut first: Option<Vec<Entry>> = None;
    for api in apis {
        let deadline = Instant::now() + Duration::from_secs(10);
        let resp: RangeResponse = loop {
            match client
                .post_to(api, "/v3/kv/range", &all(revision, true))
                .await
            {
                Ok(r) => break r,
                Err(e) if Instant::now() > deadline => {
                    anyhow::bail!("{api} could not serve revision {revision}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let kvs: Vec<_> = resp
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.mod_revision, kv.value))
            .collect();
        match &first {
            None => first = Some(kvs),
            Some(f) if *f != kvs => {
                anyhow::bail!(
                    "{api} holds {} keys at revision {revision}, differing from {}'s {}",
                    kvs.len(),
                    apis[0],
                    f.len()
                )
            }
            Some(_) => {}
        }
    }
    Ok(())
}
