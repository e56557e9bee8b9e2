//! The `flotilla` command: `server`, `ctl` and `up`.

use clap::{Parser, Subcommand};

/// mimalloc: cheaper than glibc's allocator for the many small, short-lived allocations of
/// request handling (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

/// Flotilla: a Kubernetes-style orchestrator whose control plane embeds a Raft-replicated store.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one control-plane replica.
    Server(flotilla::server::ServerArgs),
    /// Operate a cluster: members, status, keys, snapshots, compaction.
    Ctl(flotilla::ctl::CtlArgs),
    /// Run a local cluster as child processes until Ctrl-C.
    Up(flotilla::up::UpArgs),
}

fn init_tracing(default: &str) {
    let filter =
        EnvFilter::try_from_env("FLOTILLA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (default_log, threads) = match &cli.command {
        // openraft logs every failed replication RPC at error level; the replica logs peer
        // reachability changes itself.
        Cmd::Server(_) => ("info,openraft=warn,openraft::replication=off", 0),
        _ => ("warn", 2),
    };
    init_tracing(default_log);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if threads > 0 {
        rt.worker_threads(threads);
    }
    let rt = rt.build().expect("starting the async runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Cmd::Server(a) => flotilla::server::run(a).await,
            Cmd::Ctl(a) => flotilla::ctl::run(a).await,
            Cmd::Up(a) => flotilla::up::run(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
