//! `flotilla-chaos`: one seeded chaos run against a real three-replica cluster (see the
//! library's docs and `docs/chaos.md`). Exits 0 when every check passed, 1 on a violation,
//! 2 when the run could not be carried out.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Seeded fault injection against a real Flotilla cluster, with a linearizability checker.
#[derive(Debug, Parser)]
#[command(name = "flotilla-chaos")]
struct Args {
    /// Seeds the fault schedule and the clients' operations (random when not given; the
    /// run prints it).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of workload under faults.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Output folder: cluster data and logs, history.json, report.json, summary.txt
    /// (default: a new folder under the system temp dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Faults to draw from: kill (leader, follower, majority, all), pause (leader,
    /// follower), partition (leader isolated, follower isolated, one-way from the leader,
    /// a bridge replica), loss (20% of packets between replicas), disk-full (a replica's
    /// tmpfs filled), clock-skew (a replica restarted under libfaketime), wipe (a follower
    /// killed, removed, wiped, rejoined as a new member), membership (a running follower
    /// removed, then rejoined as a new member). partition, loss and disk-full need root
    /// (iptables, mount).
    #[arg(
        long,
        default_value = "kill,pause,partition,loss,disk-full,clock-skew,wipe,membership"
    )]
    faults: String,
    /// Workloads: kv (registers with reads, writes and compare-and-swaps), watch (watchers
    /// of the kv keys, resuming through random replicas), k8s (Deployments scaled onto
    /// simulated nodes). kv always runs.
    #[arg(long, default_value = "kv,watch,k8s")]
    workload: String,
    /// Watchers of the watch workload.
    #[arg(long, default_value_t = 3)]
    watchers: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// Keys (registers) the clients share.
    #[arg(long, default_value_t = 4)]
    keys: u32,
    /// Per-request client timeout in milliseconds (a request past it is indeterminate).
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Where the replicas live: netns (each in its own network namespace on a bridge;
    /// root), loopback (each on its own 127.a.b.x address), or auto (netns when namespaces
    /// can be made here, else loopback).
    #[arg(long, default_value = "auto")]
    network: String,
    /// The flotilla binary (default: `flotilla` next to this one).
    #[arg(long)]
    flotilla: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("flotilla-chaos: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let mut watch = false;
    let mut k8s = false;
    for w in args
        .workload
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
    {
        match w {
            "kv" => {}
            "watch" => watch = true,
            "k8s" => k8s = true,
            other => anyhow::bail!("unknown workload {other:?} (this build runs: kv, watch, k8s)"),
        }
    }
    let faults = flotilla_chaos::parse_faults(&args.faults)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let out = args.out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("flotilla-chaos-{seed}-{}", std::process::id()))
    });
    let flotilla = match &args.flotilla {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("flotilla"))
            .ok_or_else(|| anyhow::anyhow!("cannot locate the flotilla binary; pass --flotilla"))?,
    };
    if !flotilla.is_file() {
        anyhow::bail!(
            "no flotilla binary at {} (build the workspace, or pass --flotilla)",
            flotilla.display()
        );
    }
    // Namespaces are made, and this process moved into the clients' one, before the async
    // runtime starts its threads (they inherit the namespace).
    let netns = match args.network.as_str() {
        "loopback" => None,
        "netns" => Some(flotilla_chaos::netns::Netns::create()?),
        "auto" => match flotilla_chaos::netns::Netns::create() {
            Ok(ns) => Some(ns),
            Err(e) => {
                eprintln!("no network namespaces here ({e:#}); replicas use loopback addresses");
                None
            }
        },
        other => anyhow::bail!("unknown --network {other:?} (auto, netns or loopback)"),
    };
    if let Some(ns) = &netns {
        ns.enter_client()?;
    }
    let network = if netns.is_some() { "netns" } else { "loopback" };
    let netns = netns.map(std::sync::Arc::new);
    let command = format!(
        "flotilla-chaos --seed {seed} --duration {} --faults {} --workload {} --clients {} --keys {} --watchers {} --timeout-ms {} --network {network}",
        args.duration, args.faults, args.workload, args.clients, args.keys, args.watchers, args.timeout_ms
    );
    eprintln!(
        "seed {seed}; output in {}\nreproduce: {command}",
        out.display()
    );
    let opts = flotilla_chaos::Options {
        seed,
        duration: Duration::from_secs(args.duration),
        out: out.clone(),
        faults,
        flotilla,
        workload: flotilla_chaos::kv::Workload {
            clients: args.clients,
            keys: args.keys,
            timeout: Duration::from_millis(args.timeout_ms),
        },
        watchers: if watch { args.watchers } else { 0 },
        k8s,
        netns,
        command,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(flotilla_chaos::run(opts))?;
    print!("{}", report.summary());
    println!("output: {}", out.display());
    Ok(report.passed())
}
