//! `flotilla server`: one control-plane replica.
//!
//! Start-up order: bind the API address (so a port clash fails before anything else), open
//! the stores and start Raft (which binds the peer address and bootstraps a pristine
//! cluster), then serve the API. SIGTERM or SIGINT stops the API, then Raft, then syncs and
//! closes the store.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use flotilla_raft::{Config, Replica};
use flotilla_store::StoreOptions;
use tokio_util::sync::CancellationToken;

use crate::gateway::Api;
use crate::metrics::Metrics;

/// Flags of `flotilla server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// This replica's id: a positive integer, unique in the cluster.
    #[arg(long)]
    pub id: u64,
    /// Directory for the Raft log, the state machine and snapshots.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address of the client API (the key-value API, health, metrics). Port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:6441")]
    pub listen_api: SocketAddr,
    /// Address of the peer (Raft) listener.
    #[arg(long, default_value = "127.0.0.1:7441")]
    pub listen_peer: SocketAddr,
    /// The initial members as `id=host:port` peer addresses, comma-separated. Used only
    /// when the data directory is empty; a restarted replica rejoins with its stored state.
    #[arg(long, value_delimiter = ',')]
    pub initial_cluster: Vec<String>,
    /// API address to announce to clients (default: the bound --listen-api address).
    #[arg(long)]
    pub advertise_api: Option<String>,
    /// Peer address to announce (default: --listen-peer).
    #[arg(long)]
    pub advertise_peer: Option<String>,
    /// Join an existing cluster instead of bootstrapping (after `flotilla ctl member add`).
    #[arg(long)]
    pub join: bool,
    /// Leader heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_interval_ms: u64,
    /// Minimum election timeout in milliseconds (the maximum is twice this).
    #[arg(long, default_value_t = 100)]
    pub election_timeout_ms: u64,
    /// Build a snapshot (and allow log purging) every this many applied entries (etcd's
    /// `--snapshot-count`, whose default is the same: a snapshot is a copy of the whole
    /// store, gigabytes at scale).
    #[arg(long, default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Entries kept behind a snapshot so briefly lagging followers catch up from the log.
    #[arg(long, default_value_t = 1_000)]
    pub snapshot_catchup_entries: u64,
    /// Deadline, in milliseconds, of a write or linearizable read.
    #[arg(long, default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// Most Kubernetes API reads handled at once (kube-apiserver's flag); beyond it a read
    /// gets 429 with `Retry-After`. 0: no bound.
    #[arg(long, default_value_t = 400)]
    pub max_requests_inflight: usize,
    /// Most Kubernetes API writes handled at once; 0: no bound.
    #[arg(long, default_value_t = 200)]
    pub max_mutating_requests_inflight: usize,
    /// CIDR Service cluster IPs are drawn from.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: String,
    /// Range Service node ports are drawn from.
    #[arg(long, default_value = "30000-32767")]
    pub service_node_port_range: String,
    /// How long a node may go without renewing its lease (or posting status) before the
    /// leader marks it `Ready=Unknown` and taints it unreachable, in seconds.
    #[arg(long, default_value_t = 40.0)]
    pub node_monitor_grace_period: f64,
    /// Nodes per second the leader may taint for eviction (NoExecute); no eviction at all
    /// while every node is unreachable.
    #[arg(long, default_value_t = 0.1)]
    pub node_eviction_rate: f64,
    /// Seconds a Job waits before replacing its first failed pod (doubling for each further
    /// failure, up to 6 minutes); 0 replaces at once.
    #[arg(long, default_value_t = 10)]
    pub job_backoff_seconds: u64,
    /// Seconds a new pod tolerates a not-ready node before eviction (added as a toleration).
    #[arg(long, default_value_t = 300)]
    pub default_not_ready_toleration_seconds: i64,
    /// Seconds a new pod tolerates an unreachable node before eviction.
    #[arg(long, default_value_t = 300)]
    pub default_unreachable_toleration_seconds: i64,
    /// Store size above which puts are refused (deletes and compaction still work).
    #[arg(long, default_value_t = 8 * 1024 * 1024 * 1024)]
    pub quota_bytes: u64,
    /// The API's certificate (PEM): with `--tls-private-key-file`, the API is HTTPS only.
    #[arg(long, requires = "tls_private_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The key of `--tls-cert-file`.
    #[arg(long, requires = "tls_cert_file")]
    pub tls_private_key_file: Option<PathBuf>,
    /// Client certificates signed by this CA authenticate API requests (CN = user, O =
    /// groups). Needs `--tls-cert-file`.
    #[arg(long, requires = "tls_cert_file")]
    pub client_ca_file: Option<PathBuf>,
    /// Bearer tokens that authenticate API requests: `token,user,uid[,"group1,group2"]` per
    /// line, as kube-apiserver's static token file.
    #[arg(long)]
    pub token_auth_file: Option<PathBuf>,
    /// With authentication on, anonymous requests may read `/livez`, `/readyz`, `/healthz`
    /// and `/version` (everything else is 401 without credentials).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub anonymous_auth: bool,
    /// The peer listener's certificate, also presented to peers this replica dials: with
    /// `--peer-key-file` and `--peer-trusted-ca-file` the peer transport is mutual TLS.
    #[arg(long, requires_all = ["peer_key_file", "peer_trusted_ca_file"])]
    pub peer_cert_file: Option<PathBuf>,
    /// The key of `--peer-cert-file`.
    #[arg(long, requires = "peer_cert_file")]
    pub peer_key_file: Option<PathBuf>,
    /// The CA peers' certificates must be signed by (for both directions).
    #[arg(long, requires = "peer_cert_file")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// The client certificate the API presents to node agents (logs, exec).
    #[arg(long, requires_all = ["kubelet_client_key", "kubelet_certificate_authority"])]
    pub kubelet_client_certificate: Option<PathBuf>,
    /// The key of `--kubelet-client-certificate`.
    #[arg(long, requires = "kubelet_client_certificate")]
    pub kubelet_client_key: Option<PathBuf>,
    /// The CA the agents' endpoint certificates must be signed by: with it, the API reaches
    /// agents over TLS only.
    #[arg(long, requires = "kubelet_client_certificate")]
    pub kubelet_certificate_authority: Option<PathBuf>,
    /// Per client (with authentication on; `system:masters` exempt): Kubernetes API
    /// requests per second, sustained (0: no bound); beyond it 429 with `Retry-After`.
    #[arg(long, default_value_t = 200.0)]
    pub client_qps: f64,
    /// Per client: requests allowed at once above `--client-qps`.
    #[arg(long, default_value_t = 400.0)]
    pub client_burst: f64,
    /// Per client: Kubernetes API requests handled at once (0: no bound).
    #[arg(long, default_value_t = 100)]
    pub max_requests_inflight_per_client: usize,
    /// Per client: watches open at once (0: no bound).
    #[arg(long, default_value_t = 200)]
    pub max_watches_per_client: usize,
    /// Changes kept in memory per cached resource (pods, nodes, services, endpoints,
    /// endpoint slices) for watches to start from; a watch from an older resourceVersion is
    /// served from the store. 0 turns the watch cache off: every list and watch reads the
    /// store (kube-apiserver's `--watch-cache=false`).
    #[arg(long, default_value_t = 10_000)]
    pub watch_cache_size: usize,
    /// The longest a Kubernetes API request may take (watches, followed logs and exec
    /// excepted) before it is answered 504 (kube-apiserver's `--request-timeout`).
    #[arg(long, default_value_t = 60.0)]
    pub api_request_timeout_seconds: f64,
    /// ServiceAccount tokens: the ECDSA P-256 key (PKCS#8 PEM; `flotilla certs init` writes
    /// `sa.key`) that signs them (`serviceaccounts/<name>/token`, `kubectl create token`)
    /// and verifies them; the same file on every replica.
    #[arg(long)]
    pub service_account_signing_key_file: Option<PathBuf>,
    /// The tokens' issuer (`iss`), also the audience the API accepts.
    #[arg(long, default_value = "https://kubernetes.default.svc.cluster.local")]
    pub service_account_issuer: String,
    /// The audit log: one JSON line (an `audit.k8s.io/v1` Event at the Metadata level) per
    /// API request: who, what, and the response code. Unset: no audit log.
    #[arg(long)]
    pub audit_log_path: Option<PathBuf>,
    /// The audit log's size in megabytes past which it is rotated.
    #[arg(long, default_value_t = 100)]
    pub audit_log_maxsize: u64,
    /// Rotated audit logs kept (`<path>.1` the newest).
    #[arg(long, default_value_t = 1)]
    pub audit_log_maxbackup: usize,
    /// Encryption at rest: a Kubernetes `EncryptionConfiguration` (`aesgcm` and `identity`
    /// providers) naming the resources stored encrypted (Secrets, say). Every replica needs
    /// the same keys.
    #[arg(long)]
    pub encryption_provider_config: Option<PathBuf>,
}

/// The TLS and authentication of `args`: the API listener's config, the authenticator,
/// the peer transport's configs and the client config for agents.
#[allow(clippy::type_complexity)]
fn security(
    args: &ServerArgs,
) -> anyhow::Result<(
    Option<Arc<rustls::ServerConfig>>,
    crate::auth::Authenticator,
    Option<flotilla_raft::PeerTls>,
    Option<Arc<rustls::ClientConfig>>,
    Option<Arc<crate::api::satoken::Issuer>>,
)> {
    use crate::tls::{server_config, ClientCerts};
    let api_tls = match (&args.tls_cert_file, &args.tls_private_key_file) {
        (Some(cert), Some(key)) => {
            let mode = if args.client_ca_file.is_some() {
                ClientCerts::Optional
            } else {
                ClientCerts::Ignored
            };
            Some(server_config(
                cert,
                key,
                args.client_ca_file.as_deref(),
                mode,
            )?)
        }
        _ => None,
    };
    let tokens = match &args.token_auth_file {
        Some(f) => {
            let t = crate::auth::read_tokens(f)?;
            if t.is_empty() {
                bail!("the token file {} holds no token", f.display());
            }
            t
        }
        None => Default::default(),
    };
    if !tokens.is_empty() && api_tls.is_none() {
        tracing::warn!("--token-auth-file without --tls-cert-file: tokens travel in plain text");
    }
    let issuer = match &args.service_account_signing_key_file {
        Some(f) => Some(Arc::new(crate::api::satoken::Issuer::load(
            f,
            &args.service_account_issuer,
        )?)),
        None => None,
    };
    let auth =
        crate::auth::Authenticator::new(args.client_ca_file.is_some(), tokens, args.anonymous_auth)
            .with_issuer(issuer.clone());
    let peer = match (
        &args.peer_cert_file,
        &args.peer_key_file,
        &args.peer_trusted_ca_file,
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(flotilla_raft::PeerTls {
            server: server_config(cert, key, Some(ca), ClientCerts::Required)?,
            // Replicas only, both ways: the CA also signs agents and administrators.
            client: Arc::new(crate::tls::client_config_requiring(
                ca,
                Some((cert, key)),
                crate::certs::REPLICAS_GROUP,
            )?),
            is_peer: Arc::new(|der: &[u8]| crate::tls::in_group(der, crate::certs::REPLICAS_GROUP)),
        }),
        _ => None,
    };
    let agents = match (
        &args.kubelet_client_certificate,
        &args.kubelet_client_key,
        &args.kubelet_certificate_authority,
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(Arc::new(crate::tls::client_config_requiring(
            ca,
            Some((cert, key)),
            crate::certs::NODES_GROUP,
        )?)),
        _ => None,
    };
    Ok((api_tls, auth, peer, agents, issuer))
}

/// Parses `1=127.0.0.1:7441,2=...`.
pub fn parse_initial_cluster(items: &[String]) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for item in items.iter().filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .with_context(|| format!("--initial-cluster entry {item:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("--initial-cluster id {id:?} is not a number"))?;
        if id == 0 {
            bail!("--initial-cluster ids must be positive");
        }
        let addr = addr.trim().trim_start_matches("http://").to_string();
        if !addr.contains(':') {
            bail!("--initial-cluster address {addr:?} has no port");
        }
        if out.insert(id, addr).is_some() {
            bail!("--initial-cluster names id {id} twice");
        }
    }
    Ok(out)
}

/// Runs a replica until SIGTERM or SIGINT.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    if args.id == 0 {
        bail!("--id must be positive");
    }
    if args.heartbeat_interval_ms == 0 || args.election_timeout_ms <= args.heartbeat_interval_ms {
        bail!(
            "--election-timeout-ms must be larger than --heartbeat-interval-ms (and both positive)"
        );
    }
    let initial_cluster = parse_initial_cluster(&args.initial_cluster)?;
    if !args.join && initial_cluster.is_empty() {
        tracing::warn!(
            "no --initial-cluster: this replica starts only if it already has cluster state"
        );
    }
    let (api_tls, auth, peer_tls, agent_tls, issuer) = security(&args)?;
    if let Some(path) = &args.encryption_provider_config {
        crate::api::encryption::install(crate::api::encryption::load(path)?)?;
        tracing::info!(config = %path.display(), "encrypting at rest");
    }
    let api_listener = crate::http::listen(args.listen_api)
        .with_context(|| format!("binding the API address {}", args.listen_api))?;
    let api_addr = api_listener.local_addr()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;

    let mut cfg = Config::new(args.id, args.data_dir.clone(), args.listen_peer);
    cfg.advertise_peer = args
        .advertise_peer
        .clone()
        .unwrap_or_else(|| args.listen_peer.to_string());
    cfg.advertise_api = args
        .advertise_api
        .clone()
        .unwrap_or_else(|| api_addr.to_string());
    cfg.initial_cluster = initial_cluster;
    cfg.join = args.join;
    cfg.heartbeat_ms = args.heartbeat_interval_ms;
    cfg.election_timeout_ms = args.election_timeout_ms;
    cfg.snapshot_logs = args.snapshot_count.max(1);
    cfg.keep_logs = args.snapshot_catchup_entries;
    cfg.request_timeout = Duration::from_millis(args.request_timeout_ms.max(1));
    cfg.store = StoreOptions {
        quota_bytes: args.quota_bytes,
        ..StoreOptions::default()
    };
    cfg.tls = peer_tls;

    let metrics = Metrics::new();
    let replica = Replica::start(cfg, metrics.clone()).await?;
    tracing::info!(id = args.id, api = %api_addr, peer = %args.listen_peer, "replica started");

    let shutdown = CancellationToken::new();
    let ranges = crate::api::services::Ranges::parse(
        &args.service_cluster_ip_range,
        &args.service_node_port_range,
    )
    .map_err(anyhow::Error::msg)?;
    let kube = Arc::new(
        crate::api::Kube::new(
            crate::api::objects::Objects::new(replica.clone()),
            shutdown.clone(),
            ranges,
        )
        .with_metrics(metrics.clone())
        .with_watch_cache(args.watch_cache_size)
        .with_agent_tls(agent_tls)
        .with_token_issuer(issuer)
        .with_authorizer(auth.enabled().then(|| {
            crate::api::authz::Authorizer::start(
                crate::api::objects::Objects::new(replica.clone()),
                shutdown.clone(),
            )
        })),
    );
    // The leader's control loops (controllers, scheduler, system namespaces).
    crate::api::kinds::set_default_toleration_seconds(
        args.default_not_ready_toleration_seconds,
        args.default_unreachable_toleration_seconds,
    );
    if !(args.node_monitor_grace_period > 0.0 && args.node_monitor_grace_period.is_finite()) {
        bail!("--node-monitor-grace-period must be a positive number of seconds");
    }
    let control_config = crate::controllers::Config {
        node_grace: Duration::from_secs_f64(args.node_monitor_grace_period),
        node_eviction_rate: args.node_eviction_rate.max(0.0),
        job_backoff: Duration::from_secs(args.job_backoff_seconds.min(360)),
    };
    let control_metrics = crate::controllers::metrics::ControlMetrics::new(metrics.registry());
    let audit = match &args.audit_log_path {
        Some(path) => {
            let dropped = prometheus::IntCounter::new(
                "flotilla_audit_events_dropped_total",
                "Audit events dropped because the audit log writer was behind.",
            )?;
            metrics.registry().register(Box::new(dropped.clone()))?;
            Some(crate::audit::Auditor::start(
                path.clone(),
                args.audit_log_maxsize.saturating_mul(1 << 20),
                args.audit_log_maxbackup,
                dropped,
            )?)
        }
        None => None,
    };
    let informers =
        crate::controllers::Informers::start(kube.objects(), &control_metrics, &shutdown);
    let control = tokio::spawn(crate::controllers::run(
        replica.clone(),
        kube.clone(),
        informers.clone(),
        control_config,
        control_metrics,
        shutdown.clone(),
    ));
    let api = Arc::new(Api {
        replica: replica.clone(),
        kube: kube.clone(),
        metrics,
        shutdown: shutdown.clone(),
        inflight: crate::gateway::InFlight::new(
            args.max_requests_inflight,
            args.max_mutating_requests_inflight,
        ),
        auth,
        fair: crate::gateway::fair::Fair::new(crate::gateway::fair::Limits {
            qps: args.client_qps.max(0.0),
            burst: args.client_burst.max(1.0),
            inflight: args.max_requests_inflight_per_client,
            watches: args.max_watches_per_client,
        }),
        request_timeout: Duration::from_secs_f64(
            args.api_request_timeout_seconds.clamp(0.1, 3600.0),
        ),
        audit,
    });
    let server = tokio::spawn(crate::http::serve(
        api_listener,
        api_tls,
        move |req| api.clone().handle(req),
        shutdown.clone(),
        Duration::from_secs(2),
    ));

    // A fatal Raft error (a storage write failed: a full disk, an I/O error) leaves the
    // replica unable to serve or recover; it exits non-zero so it is restarted once the
    // cause is fixed, rather than lingering half-alive.
    let fatal = tokio::select! {
        _ = wait_for_signal() => None,
        e = replica.fatal() => Some(e),
    };
    match &fatal {
        None => tracing::info!("shutting down"),
        Some(e) => tracing::error!(error = %e, "raft stopped on a fatal error; exiting"),
    }
    shutdown.cancel();
    let _ = control.await;
    let _ = server.await;
    informers.stopped().await;
    kube.stopped().await;
    replica.shutdown().await;
    if let Some(e) = fatal {
        bail!("raft stopped on a fatal error: {e}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
