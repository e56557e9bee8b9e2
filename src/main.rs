//! The `flotilla` command: `server`, `ctl` and `up`.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// mimalloc: cheaper than glibc's allocator for the many small, short-lived allocations of
/// request handling (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flotilla: a Kubernetes-style orchestrator whose control plane embeds a Raft-replicated store.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    /// Log format: `text` (human-readable) or `json` (one object per line).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log filter, e.g. `info` or `debug,openraft=info` (overrides FLOTILLA_LOG and RUST_LOG).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one control-plane replica.
    Server(Box<flotilla::server::ServerArgs>),
    /// Operate a cluster: members, status, keys, snapshots, compaction.
    Ctl(flotilla::ctl::CtlArgs),
    /// Run a node agent: register a Node and run the pods bound to it.
    Agent(Box<flotilla::agent::AgentArgs>),
    /// Run a local cluster as child processes until Ctrl-C.
    Up(flotilla::up::UpArgs),
    /// Make a cluster CA and the certificates of replicas, agents and an admin.
    Certs(flotilla::certs::CertsArgs),
    /// Supervise one container of the process runtime (started by the agent).
    #[command(hide = true)]
    Shim {
        /// The container's spec, written by the agent.
        spec: std::path::PathBuf,
    },
    /// Print a kubeconfig for a cluster.
    Kubeconfig {
        /// The API URL of a replica.
        #[arg(long, default_value = "http://127.0.0.1:6441")]
        server: String,
    },
}

/// Logs go to stderr. The filter comes from `--log-level`, else `FLOTILLA_LOG`, else
/// `RUST_LOG`, else the command's default.
fn init_tracing(level: Option<&str>, json: bool, default: &str) {
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_env("FLOTILLA_LOG")
            .or_else(|_| EnvFilter::try_from_default_env())
            .unwrap_or_else(|_| EnvFilter::new(default)),
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        fmt.json().with_current_span(true).init();
    } else {
        fmt.with_target(false).init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Cmd::Shim { spec } = &cli.command {
        // No async runtime and no logging: the shim is small and outlives the agent.
        return std::process::ExitCode::from(flotilla::agent::shim::run(spec) as u8);
    }
    let (default_log, threads) = match &cli.command {
        // openraft logs every failed replication RPC at error level; the replica logs peer
        // reachability changes itself.
        Cmd::Server(_) => ("info,openraft=warn,openraft::replication=off", 0),
        Cmd::Agent(_) => ("info", 2),
        _ => ("warn", 2),
    };
    init_tracing(
        cli.log_level.as_deref(),
        cli.log_format == "json",
        default_log,
    );
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if threads > 0 {
        rt.worker_threads(threads);
    }
    let rt = rt.build().expect("starting the async runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Cmd::Server(a) => flotilla::server::run(*a).await,
            Cmd::Ctl(a) => flotilla::ctl::run(a).await,
            Cmd::Up(a) => flotilla::up::run(a).await,
            Cmd::Agent(a) => flotilla::agent::run(*a).await,
            Cmd::Certs(a) => flotilla::certs::run(a),
            // Handled above, before the async runtime starts.
            Cmd::Shim { .. } => Ok(()),
            Cmd::Kubeconfig { server } => {
                print!("{}", flotilla::up::kubeconfig(&server));
                Ok(())
            }
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
