//! `flotilla agent`: the node agent (the kubelet's role).
//!
//! It registers its Node (capacity from the machine, `nodeInfo`, addresses, labels, its own
//! endpoint in `daemonEndpoints`), renews its Lease in `kube-node-lease`, and watches the
//! pods bound to it (`spec.nodeName`) on one control-plane replica at a time, failing over
//! to the next with jittered backoff, resuming from its last `resourceVersion` and
//! relisting after a 410. Each pod gets a worker ([`pod::run`]) that runs its containers
//! through the [`runtime::Runtime`] and reports status.
//!
//! Owns: the map from pod uid to its worker (one worker per uid, ever, so a failover or
//! relist never starts a pod twice), and its data directory (pod directories and logs).
//! Several agents on one machine differ in `--node-name`, `--data-dir` and `--listen`.

pub mod api;
pub mod cri;
pub mod dns;
pub mod events;
pub mod exec;
pub mod hollow;
pub mod logs;
pub mod metrics;
pub mod pod;
pub mod probe;
pub mod proxy;
pub mod reflector;
pub mod runtime;
pub mod services;
pub mod shim;
pub mod userspace;
pub mod volumes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::api::meta;
use crate::controllers::owner;
use api::Api;

/// Flags of `flotilla agent`.
#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    /// Control-plane replicas' API addresses (`host:port,...`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    /// This node's name.
    #[arg(long)]
    pub node_name: String,
    /// Where pods keep their directories and logs.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The container runtime: `process` (embedded) or `cri`.
    #[arg(long, default_value = "process")]
    pub runtime: String,
    /// The CRI socket (with `--runtime cri`).
    #[arg(long, default_value = "unix:///run/containerd/containerd.sock")]
    pub cri_endpoint: String,
    /// Where CRI pods that are not `hostNetwork` live: `pod`, a network namespace of their
    /// own with an address from the runtime's CNI (as the kubelet does; the runtime must
    /// have a CNI configuration), or `node`, the node's network like `hostNetwork` pods.
    #[arg(long, default_value = "pod", value_parser = ["pod", "node"])]
    pub cri_network: String,
    /// Extra node labels (`k=v,...`).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// The agent's own HTTP endpoint (`/healthz`, `/metrics`, and the logs and exec the API
    /// server relays to it at the node's InternalIP); port 0 picks one, published in the
    /// Node's `daemonEndpoints`. Default: `--node-ip`, port 0.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The address published as the node's InternalIP (and the pod IP under the process
    /// runtime).
    #[arg(long, default_value = "127.0.0.1")]
    pub node_ip: String,
    /// Pod addresses (process runtime): each pod that is not `hostNetwork` gets its own
    /// address from this IPv4 range, which must be loopback (`127.101.0.0/16`), and its
    /// containers bind it (`status.podIP`). Without it pods share the node's address.
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// Seconds between Lease renewals.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_seconds: u64,
    /// Most pods this node takes.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u64,
    /// A container log's size bound in bytes (like the kubelet's `containerLogMaxSize`): past
    /// it the log is rotated, keeping one rotated file.
    #[arg(long, default_value_t = 10 << 20)]
    pub container_log_max_bytes: u64,
    /// Most processes (and threads) one pod may run, all its containers together (the
    /// kubelet's `podPidsLimit`); -1 for no limit.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub pod_max_pids: i64,
    /// Seconds between rewrites of ConfigMap, Secret and downward API volumes from the API
    /// (the kubelet's `--sync-frequency`).
    #[arg(long, default_value_t = 60)]
    pub volume_sync_seconds: u64,
    /// Resources kept back from pods (`cpu=500m,memory=1Gi,ephemeral-storage=1Gi`, like the
    /// kubelet's `--system-reserved`): allocatable is capacity less these.
    #[arg(long, value_delimiter = ',')]
    pub reserved: Vec<String>,
    /// The cluster DNS: the agent answers DNS for the cluster domain on this address (UDP
    /// and TCP; `IP` alone means port 53), forwarding other names to `--resolv-conf`'s
    /// nameservers, and pods with `dnsPolicy: ClusterFirst` get it as their nameserver (the
    /// kubelet's `--cluster-dns`, with CoreDNS built in). Pods can only use it on port 53.
    /// Unset: no cluster DNS; pods get the host's resolver configuration.
    #[arg(long)]
    pub cluster_dns: Option<String>,
    /// The cluster domain (the kubelet's `--cluster-domain`).
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The host's resolver configuration: pods with `dnsPolicy: Default` get it, and the
    /// cluster DNS forwards names outside the cluster domain to its nameservers (the
    /// kubelet's `--resolv-conf`).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// The service proxy (kube-proxy's role): `iptables` (root) makes traffic to a
    /// Service's cluster IP and port, or to its node port on a local address, reach one of
    /// its ready endpoints, with rules in chains of this agent's own, removed when it
    /// stops; `userspace` (no root needed) listens on each cluster IP and port (which must
    /// be local addresses: a loopback service range) and on the node IP's node ports, and
    /// relays connections; `none` runs no proxy.
    #[arg(long, default_value = "none")]
    pub proxy_mode: String,
    /// Where the service proxy serves node ports (IPv4 ranges `a.b.c.d/n`, kube-proxy's
    /// `--nodeport-addresses`); unset: every local address.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// The cluster CA (PEM): with `--cert-file` and `--key-file` the agent talks to the API
    /// over HTTPS (replicas' certificates checked against it, its own shown as the client
    /// certificate, `system:node:<name>`), and its endpoint is HTTPS too, letting in only
    /// clients with a certificate of this CA; logs and exec only for the replicas'
    /// (`system:flotilla:replicas`).
    #[arg(long, requires_all = ["cert_file", "key_file"])]
    pub ca_file: Option<PathBuf>,
    /// The agent's certificate (`flotilla certs init --agents`).
    #[arg(long, requires = "ca_file")]
    pub cert_file: Option<PathBuf>,
    /// The key of `--cert-file`.
    #[arg(long, requires = "ca_file")]
    pub key_file: Option<PathBuf>,
    /// Run this many hollow nodes (`<node-name>-0`, `-1`, ...) in this process instead of
    /// one real node (Kubernetes' kubemark): the agent's code above the runtime interface,
    /// each node with its own registration, Lease, pod watch and workers, and a runtime that
    /// runs nothing (a container reports running after `--hollow-start-ms`). Data of node
    /// `X` under `--data-dir/X`. For measuring the control plane at scale.
    #[arg(long, default_value_t = 0)]
    pub hollow: usize,
    /// Hollow nodes: how long a container takes to report running, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub hollow_start_ms: u64,
}

/// Hollow nodes registering at once (each a handful of API calls).
const HOLLOW_REGISTRATIONS: usize = 64;

/// `IP` or `IP:PORT` (port 53 by default).
pub fn parse_dns_address(a: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(ip) = a.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    a.parse()
        .map_err(|_| anyhow::anyhow!("--cluster-dns {a:?}: expected IP or IP:PORT"))
}

/// A loopback IPv4 range `a.b.c.d/n` (n from 8 to 30), as its network address and prefix.
pub fn parse_cidr(c: &str) -> anyhow::Result<(std::net::Ipv4Addr, u8)> {
    let (ip, prefix) = c
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--pod-cidr {c:?}: expected address/prefix"))?;
    let ip: std::net::Ipv4Addr = ip
        .parse()
        .map_err(|_| anyhow::anyhow!("--pod-cidr {c:?}: {ip:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| anyhow::anyhow!("--pod-cidr {c:?}: the prefix must be 8 to 30"))?;
    if !ip.is_loopback() {
        bail!("--pod-cidr {c:?}: the process runtime needs a loopback range (in 127.0.0.0/8)");
    }
    let mask = u32::MAX << (32 - prefix as u32);
    Ok((std::net::Ipv4Addr::from(u32::from(ip) & mask), prefix))
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if args.hollow > 0
        && (args.runtime != "process"
            || args.cluster_dns.is_some()
            || args.proxy_mode != "none"
            || args.pod_cidr.is_some())
    {
        bail!("--hollow runs simulated nodes: no --runtime, --cluster-dns, --proxy-mode or --pod-cidr");
    }
    let runtime: Arc<dyn runtime::Runtime> = match args.runtime.as_str() {
        _ if args.hollow > 0 => Arc::new(hollow::HollowRuntime::new(Duration::from_millis(
            args.hollow_start_ms,
        ))),
        "process" => Arc::new(
            runtime::ProcessRuntime::new()
                .context("finding the flotilla executable for the shim")?,
        ),
        "cri" => {
            Arc::new(cri::CriRuntime::connect(&args.cri_endpoint, args.cri_network == "pod").await?)
        }
        other => bail!("unknown runtime {other:?}: process or cri"),
    };
    if args.servers.iter().all(|s| s.trim().is_empty()) {
        bail!("--servers needs at least one host:port");
    }
    if args.node_name.is_empty()
        || args.node_name.len() > 253
        || !args
            .node_name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        bail!(
            "--node-name {:?} is not a valid node name (lowercase letters, digits, '-' and '.')",
            args.node_name
        );
    }
    let pod_cidr = match args.pod_cidr.as_deref() {
        None => None,
        Some(_) if args.runtime != "process" => {
            bail!("--pod-cidr is for the process runtime (cri pods use the node's network)")
        }
        Some(c) => Some(parse_cidr(c)?),
    };
    let cluster_dns = args
        .cluster_dns
        .as_deref()
        .map(parse_dns_address)
        .transpose()?;
    let domain = args
        .cluster_domain
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if domain.is_empty() || domain.split('.').any(|l| l.is_empty() || l.len() > 63) {
        bail!(
            "--cluster-domain {:?} is not a domain name",
            args.cluster_domain
        );
    }
    match args.proxy_mode.as_str() {
        "none" => {}
        "iptables" if !nix::unistd::geteuid().is_root() => {
            bail!("--proxy-mode iptables needs root")
        }
        "iptables" | "userspace" => {}
        other => bail!("--proxy-mode {other:?}: iptables, userspace or none"),
    }
    for c in &args.nodeport_addresses {
        let (ip, bits) = c.split_once('/').unwrap_or((c, ""));
        if ip.parse::<std::net::Ipv4Addr>().is_err() || !bits.parse::<u8>().is_ok_and(|b| b <= 32) {
            bail!("--nodeport-addresses {c:?}: expected an IPv4 range a.b.c.d/n");
        }
    }
    let pods_dir = args.data_dir.join("pods");
    std::fs::create_dir_all(&pods_dir)
        .with_context(|| format!("creating {}", pods_dir.display()))?;
    let listen = match args.listen {
        Some(a) => a,
        None => SocketAddr::new(
            args.node_ip
                .parse()
                .with_context(|| format!("--node-ip {:?} is not an IP address", args.node_ip))?,
            0,
        ),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let port = listener.local_addr()?.port();
    let metrics = Arc::new(metrics::AgentMetrics::new());
    if args.hollow > 0 && args.cert_file.is_some() {
        bail!("--hollow nodes share one process and so cannot each show their own node certificate: run them without --ca-file/--cert-file/--key-file (against replicas without authentication)");
    }
    let (server_tls, client_tls) = match (&args.ca_file, &args.cert_file, &args.key_file) {
        (Some(ca), Some(cert), Some(key)) => {
            let mut server = (*crate::tls::server_config(
                cert,
                key,
                Some(ca),
                crate::tls::ClientCerts::Required,
            )?)
            .clone();
            // The endpoint speaks HTTP/1.1 only (exec upgrades the connection).
            server.alpn_protocols = vec![b"http/1.1".to_vec()];
            // The API's certificate must be a replica's, not just any of the CA's.
            let client = crate::tls::client_config_requiring(
                ca,
                Some((cert, key)),
                crate::certs::REPLICAS_GROUP,
            )?;
            (Some(Arc::new(server)), Some(Arc::new(client)))
        }
        _ => (None, None),
    };
    tokio::spawn(serve(
        listener,
        server_tls,
        pods_dir.clone(),
        metrics.clone(),
        runtime.clone(),
    ));
    let api = Arc::new(Api::with_counter(
        args.servers.clone(),
        Duration::from_secs(10),
        metrics.api_failovers.clone(),
        client_tls,
    ));
    // Services (for pods' environment and the cluster DNS) from any replica.
    let services = services::Cache::default();
    tokio::spawn(services::run(
        api.clone(),
        services.clone(),
        metrics.watch_restarts.clone(),
    ));
    let host_resolv = std::fs::read_to_string(&args.resolv_conf).unwrap_or_else(|e| {
        tracing::warn!(file = %args.resolv_conf.display(), %e, "no host resolver configuration");
        String::new()
    });
    if let Some(addr) = cluster_dns {
        let config = dns::Config {
            domain: domain.clone(),
            upstreams: dns::upstreams(&host_resolv, addr.ip()),
        };
        let server =
            dns::serve(addr, services.clone(), config, metrics.dns_queries.clone()).await?;
        tokio::spawn(server);
        if addr.port() != 53 {
            tracing::warn!(%addr, "the cluster DNS is not on port 53: pods cannot use it");
        }
        tracing::info!(%addr, domain, "serving the cluster DNS");
    }
    let shared = Arc::new(Shared {
        api: api.clone(),
        runtime,
        metrics: metrics.clone(),
        services: services.clone(),
        cluster_dns: cluster_dns
            .filter(|a| a.port() == 53)
            .map(|a| (a.ip(), domain.clone())),
        host_resolv,
        pod_cidr,
        port,
    });
    let nodes = if args.hollow == 0 {
        // One real node: registered before the proxy starts, so a refused registration
        // leaves nothing behind.
        let env = register_node(&args, &shared).await?;
        tokio::spawn(heartbeat(api.clone(), args.clone(), metrics.clone()));
        vec![tokio::spawn(async move { sync_pods(env).await })]
    } else {
        // (`--hollow` refuses the cluster DNS and pod ranges above: `shared` has neither.)
        hollow_nodes(&args, shared)
    };
    let proxy = (args.proxy_mode == "iptables").then(|| {
        let options = proxy::Options {
            prefix: proxy::prefix(&args.node_name, &args.data_dir),
            node_port_addresses: args.nodeport_addresses.clone(),
        };
        tracing::info!(
            prefix = options.prefix,
            "running the service proxy (iptables)"
        );
        if args.runtime == "cri" && args.cri_network == "pod" {
            // A backend's answer to a pod on the same bridge is bridged, not routed: without
            // this it skips the DNAT's conntrack entry and the client drops it.
            let bridged = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables");
            if bridged.ok().as_deref().map(str::trim) != Some("1") {
                tracing::warn!("net.bridge.bridge-nf-call-iptables is not 1 (modprobe br_netfilter; sysctl -w net.bridge.bridge-nf-call-iptables=1): pods on a bridge will not reach Services whose endpoints share it");
            }
        }
        let p = Arc::new(proxy::Proxy::new(options, metrics.clone()));
        let cache = services.clone();
        let runner = p.clone();
        (p, tokio::spawn(async move { runner.run(cache).await }))
    });
    let userspace = (args.proxy_mode == "userspace").then(|| {
        tracing::info!("running the service proxy (userspace)");
        tokio::spawn(userspace::run(
            services.clone(),
            args.node_ip.parse().ok(),
            metrics.clone(),
        ))
    });
    let result = tokio::select! {
        r = futures::future::select_all(nodes) => match r.0 {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("a node's pod sync ended: {e}")),
        },
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    };
    if let Some((p, task)) = proxy {
        task.abort();
        let _ = task.await;
        p.clean_up().await;
    }
    if let Some(task) = userspace {
        task.abort();
    }
    result
}

/// What every node of this process shares.
struct Shared {
    api: Arc<Api>,
    runtime: Arc<dyn runtime::Runtime>,
    metrics: Arc<metrics::AgentMetrics>,
    services: services::Cache,
    cluster_dns: Option<(std::net::IpAddr, String)>,
    host_resolv: String,
    pod_cidr: Option<(std::net::Ipv4Addr, u8)>,
    /// The agent endpoint's port (the Nodes' `daemonEndpoints`).
    port: u16,
}

/// Registers the node `args` describes and returns its pod workers' environment.
async fn register_node(args: &AgentArgs, shared: &Shared) -> anyhow::Result<Arc<pod::Env>> {
    let cap = capacity(args);
    register(
        &shared.api,
        args,
        shared.runtime.as_ref(),
        shared.port,
        &cap,
    )
    .await?;
    tracing::info!(node = args.node_name, port = shared.port, "registered");
    let quantity = |k: &str| {
        cap.get(k)
            .and_then(Value::as_str)
            .and_then(crate::api::quantity::parse_milli)
            .unwrap_or(0)
    };
    let pods_dir = args.data_dir.join("pods");
    std::fs::create_dir_all(&pods_dir)
        .with_context(|| format!("creating {}", pods_dir.display()))?;
    Ok(Arc::new(pod::Env {
        api: shared.api.clone(),
        runtime: shared.runtime.clone(),
        node: args.node_name.clone(),
        node_ip: args.node_ip.clone(),
        pod_cidr: shared.pod_cidr,
        ip_lock: std::sync::Mutex::new(()),
        pods_dir,
        log_max_bytes: args.container_log_max_bytes,
        volume_sync: Duration::from_secs(args.volume_sync_seconds.max(1)),
        pod_pids_limit: u64::try_from(args.pod_max_pids).ok(),
        capacity_cpu_milli: quantity("cpu"),
        capacity_memory_bytes: quantity("memory") / 1000,
        metrics: shared.metrics.clone(),
        events: events::Events::start(shared.api.clone(), args.node_name.clone()),
        steady_tick: Duration::from_secs(if args.hollow > 0 { 5 } else { 1 }),
        services: shared.services.clone(),
        cluster_dns: shared.cluster_dns.clone(),
        host_resolv: shared.host_resolv.clone(),
    }))
}

/// Starts `--hollow` nodes, each registering (at most [`HOLLOW_REGISTRATIONS`] at once),
/// then heartbeating and syncing its pods; a node whose registration fails is logged and
/// left out.
fn hollow_nodes(
    args: &AgentArgs,
    shared: Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(HOLLOW_REGISTRATIONS));
    tracing::info!(nodes = args.hollow, "starting hollow nodes");
    (0..args.hollow)
        .map(|i| {
            let mut node = args.clone();
            node.node_name = format!("{}-{i}", args.node_name);
            node.data_dir = args.data_dir.join(&node.node_name);
            let (gate, shared) = (gate.clone(), shared.clone());
            tokio::spawn(async move {
                let env = {
                    let _permit = gate.acquire().await?;
                    match register_node(&node, &shared).await {
                        Ok(env) => env,
                        Err(e) => {
                            tracing::warn!(node = node.node_name, %e, "a hollow node did not register");
                            // Stays out; the others go on.
                            return std::future::pending().await;
                        }
                    }
                };
                tokio::spawn(heartbeat(shared.api.clone(), node, shared.metrics.clone()));
                sync_pods(env).await
            })
        })
        .collect()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `/healthz`, `/metrics` (`flotilla_agent_up`), `/containerLogs/...` ([`logs::serve`]) and
/// `/exec/...` ([`exec::serve`]).
async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    pods_dir: PathBuf,
    metrics: Arc<metrics::AgentMetrics>,
    runtime: Arc<dyn runtime::Runtime>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (pods_dir, metrics, runtime) = (pods_dir.clone(), metrics.clone(), runtime.clone());
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Some((stream, conn)) = crate::http::accept_tls(stream, acceptor.as_ref()).await
            else {
                return;
            };
            // With TLS every client has a certificate of the cluster; logs and exec are for
            // the replicas' alone (the API server relays them after its own checks).
            let relay_allowed = !conn.tls
                || conn
                    .cert
                    .as_ref()
                    .is_some_and(|c| c.groups.iter().any(|g| g == crate::certs::REPLICAS_GROUP));
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let (pods_dir, metrics, runtime) =
                        (pods_dir.clone(), metrics.clone(), runtime.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let query = req.uri().query().unwrap_or("").to_string();
                        let relay =
                            path.starts_with("/containerLogs/") || path.starts_with("/exec/");
                        let resp = match path.as_str() {
                            _ if relay && !relay_allowed => crate::http::text(
                                http::StatusCode::FORBIDDEN,
                                "forbidden: logs and exec are for the API server's certificate only\n",
                            ),
                            "/healthz" | "/livez" => {
                                crate::http::text(http::StatusCode::OK, "ok\n")
                            }
                            "/readyz" if metrics.synced() => {
                                crate::http::text(http::StatusCode::OK, "ok\n")
                            }
                            "/readyz" => crate::http::text(
                                http::StatusCode::SERVICE_UNAVAILABLE,
                                "not ready: the node is not registered or its pods are not listed yet\n",
                            ),
                            "/metrics/resource" => http::Response::builder()
                                .status(http::StatusCode::OK)
                                .header(http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
                                .body(crate::http::full(metrics.render_resource()))
                                .expect("static response parts are valid"),
                            "/metrics" => http::Response::builder()
                                .status(http::StatusCode::OK)
                                .header(http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
                                .body(crate::http::full(metrics.render()))
                                .expect("static response parts are valid"),
                            p if p.starts_with("/containerLogs/") => {
                                logs::serve(&pods_dir, p, &query)
                            }
                            p if p.starts_with("/exec/") => {
                                exec::serve(req, &pods_dir, runtime)
                            }
                            _ => crate::http::text(http::StatusCode::NOT_FOUND, "not found\n"),
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Capacity from the machine: cpu, memory, pods, ephemeral storage of the data directory.
fn capacity(args: &AgentArgs) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_kib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    let storage = nix::sys::statvfs::statvfs(&args.data_dir)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0);
    json!({"cpu": cpus.to_string(), "memory": format!("{mem_kib}Ki"),
           "pods": args.max_pods.to_string(), "ephemeral-storage": storage.to_string()})
}

/// `capacity` less `reserved` (`name=quantity` pairs), never below zero.
pub fn allocatable(capacity: &Value, reserved: &[String]) -> anyhow::Result<Value> {
    use crate::api::quantity::parse_milli;
    let mut out = capacity.clone();
    for r in reserved.iter().filter(|r| !r.is_empty()) {
        let Some((name, q)) = r.split_once('=') else {
            bail!("--reserved takes name=quantity pairs, not {r:?}");
        };
        let Some(want) = parse_milli(q) else {
            bail!("--reserved {name}: {q:?} is not a quantity");
        };
        let Some(have) = capacity
            .get(name)
            .and_then(Value::as_str)
            .and_then(parse_milli)
        else {
            bail!("--reserved {name}: the node has no such resource");
        };
        let left = (have - want).max(0);
        out[name] = json!(if name == "cpu" {
            format!("{left}m")
        } else {
            ((left + 999) / 1000).to_string()
        });
    }
    Ok(out)
}

fn node_info(runtime: &dyn runtime::Runtime) -> Value {
    let os_image = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    json!({
        "machineID": read("/etc/machine-id"),
        "systemUUID": read("/sys/class/dmi/id/product_uuid"),
        "bootID": read("/proc/sys/kernel/random/boot_id"),
        "kernelVersion": read("/proc/sys/kernel/osrelease"),
        "osImage": os_image,
        "containerRuntimeVersion": runtime.version(),
        "kubeletVersion": "v1.32.0-flotilla",
        "kubeProxyVersion": "",
        "operatingSystem": "linux",
        "architecture": arch,
    })
}

/// Creates the Node if it does not exist, then writes its status.
async fn register(
    api: &Api,
    args: &AgentArgs,
    runtime: &dyn runtime::Runtime,
    port: u16,
    cap: &Value,
) -> anyhow::Result<()> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut labels = json!({"kubernetes.io/hostname": args.node_name,
        "kubernetes.io/os": "linux", "kubernetes.io/arch": arch});
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--labels takes k=v pairs, not {l:?}");
        };
        labels[k] = json!(v);
    }
    let mut node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": args.node_name, "labels": labels}});
    if let Some(c) = &args.pod_cidr {
        node["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
    }
    let wait = Duration::from_secs(120);
    let (code, body) = api
        .call_retrying(
            http::Method::POST,
            "/api/v1/nodes",
            "application/json",
            Some(&node),
            wait,
        )
        .await
        .map_err(|e| anyhow::anyhow!("registering the node: {e}"))?;
    match code {
        201 => {}
        409 => {
            // Registered before: bring the labels up to date.
            let patch = json!({"metadata": {"labels": labels}});
            api.call_retrying(
                http::Method::PATCH,
                &format!("/api/v1/nodes/{}", args.node_name),
                "application/merge-patch+json",
                Some(&patch),
                wait,
            )
            .await
            .map_err(|e| anyhow::anyhow!("updating the node: {e}"))?;
        }
        _ => bail!("registering the node: {code} {body}"),
    }
    let now = meta::rfc3339(meta::now_secs());
    let allocatable = allocatable(cap, &args.reserved)?;
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let status = json!({"status": {
        "capacity": cap,
        "allocatable": allocatable,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": args.node_ip},
                      {"type": "Hostname", "address": args.node_name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": node_info(runtime),
    }});
    let (code, body) = api
        .call_retrying(
            http::Method::PATCH,
            &format!("/api/v1/nodes/{}/status", args.node_name),
            "application/merge-patch+json",
            Some(&status),
            wait,
        )
        .await
        .map_err(|e| anyhow::anyhow!("writing the node status: {e}"))?;
    if code != 200 {
        bail!("writing the node status: {code} {body}");
    }
    Ok(())
}

/// Renews the node's Lease every `--heartbeat-seconds` (creating it when missing).
/// The node's pressure conditions as the kubelet's default eviction thresholds judge them:
/// memory when less than 100 MiB is available, disk when less than 10% of the data
/// directory's filesystem is (as `df` counts: available out of used plus available), PIDs
/// when more than 95% of `pid_max` are in use.
pub fn pressure(data_dir: &std::path::Path) -> [(&'static str, bool); 3] {
    let meminfo = read("/proc/meminfo");
    let available_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok());
    let memory = available_kib.is_some_and(|k| k < 100 * 1024);
    // As `df` counts it: available out of what is in use or available (blocks reserved for
    // root, or never usable on a thin volume, count for neither).
    let disk = nix::sys::statvfs::statvfs(data_dir).ok().is_some_and(|s| {
        let available = s.blocks_available() as f64;
        let used = s.blocks().saturating_sub(s.blocks_free()) as f64;
        used + available > 0.0 && available < 0.10 * (used + available)
    });
    let pid_max = read("/proc/sys/kernel/pid_max").parse::<u64>().unwrap_or(0);
    let procs = read("/proc/loadavg")
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .and_then(|(_, total)| total.parse::<u64>().ok())
        .unwrap_or(0);
    let pids = pid_max > 0 && procs * 100 > pid_max * 95;
    [
        ("MemoryPressure", memory),
        ("DiskPressure", disk),
        ("PIDPressure", pids),
    ]
}

/// The node's four conditions, each with the time it last changed.
fn conditions(current: &[(&str, bool)], since: &HashMap<&'static str, String>, now: &str) -> Value {
    let reasons = |kind: &str, on: bool| match (kind, on) {
        ("MemoryPressure", false) => (
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        ("MemoryPressure", true) => (
            "KubeletHasInsufficientMemory",
            "kubelet has insufficient memory available",
        ),
        ("DiskPressure", false) => ("KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("DiskPressure", true) => ("KubeletHasDiskPressure", "kubelet has disk pressure"),
        ("PIDPressure", false) => (
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        ("PIDPressure", true) => (
            "KubeletHasInsufficientPID",
            "kubelet has insufficient PID available",
        ),
        _ => ("KubeletReady", "kubelet is posting ready status"),
    };
    let mut out: Vec<Value> = current
        .iter()
        .map(|(kind, on)| {
            let (reason, message) = reasons(kind, *on);
            json!({"type": kind, "status": if *on { "True" } else { "False" }, "reason": reason,
                   "message": message, "lastHeartbeatTime": now,
                   "lastTransitionTime": since.get(kind).cloned().unwrap_or_else(|| now.to_string())})
        })
        .collect();
    let (reason, message) = reasons("Ready", true);
    out.push(json!({"type": "Ready", "status": "True", "reason": reason, "message": message,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": since.get("Ready").cloned().unwrap_or_else(|| now.to_string())}));
    json!(out)
}

/// Renews the Lease every `--heartbeat-seconds` (creating it when missing), and writes the
/// node's conditions when a pressure condition changes.
async fn heartbeat(api: Arc<Api>, args: AgentArgs, metrics: Arc<metrics::AgentMetrics>) {
    let path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{}",
        args.node_name
    );
    let period = Duration::from_secs(args.heartbeat_seconds.max(1));
    // Registration wrote every pressure condition False.
    let started = meta::rfc3339(meta::now_secs());
    let mut since: HashMap<&'static str, String> =
        ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
            .into_iter()
            .map(|k| (k, started.clone()))
            .collect();
    let mut reported = [false; 3];
    loop {
        let now_pressure = pressure(&args.data_dir);
        let flags = now_pressure.map(|(_, on)| on);
        if flags != reported {
            let now = meta::rfc3339(meta::now_secs());
            for (i, (kind, on)) in now_pressure.iter().enumerate() {
                if *on != reported[i] {
                    since.insert(kind, now.clone());
                }
            }
            let status = json!({"status": {"conditions": conditions(&now_pressure, &since, &now)}});
            match api
                .call(
                    http::Method::PATCH,
                    &format!("/api/v1/nodes/{}/status", args.node_name),
                    "application/merge-patch+json",
                    Some(&status),
                )
                .await
            {
                Ok((200, _)) => {
                    tracing::info!(?now_pressure, "node conditions changed");
                    reported = flags;
                }
                Ok((code, b)) => tracing::warn!(code, %b, "node conditions not written"),
                Err(e) => tracing::warn!(%e, "node conditions not written"),
            }
        }
        let now = chrono_micro();
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": args.node_name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": args.node_name, "leaseDurationSeconds": 40, "renewTime": now}});
        let renewing = std::time::Instant::now();
        let r = api
            .call(
                http::Method::PATCH,
                &path,
                "application/merge-patch+json",
                Some(&json!({"spec": {"holderIdentity": args.node_name, "renewTime": now}})),
            )
            .await;
        metrics
            .lease_seconds
            .observe(renewing.elapsed().as_secs_f64());
        let in_use = api.server();
        for s in api.servers() {
            metrics
                .api_server
                .with_label_values(&[&s])
                .set(i64::from(s == in_use));
        }
        let ok = matches!(r, Ok((200, _)));
        metrics
            .lease_renewals
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        match r {
            Ok((200, _)) => {}
            Ok((404, _)) => {
                let _ = api
                    .call(
                        http::Method::POST,
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        "application/json",
                        Some(&lease),
                    )
                    .await;
            }
            Ok((code, b)) => tracing::warn!(code, %b, "lease not renewed"),
            Err(e) => tracing::warn!(%e, "lease not renewed"),
        }
        tokio::time::sleep(api::jitter(period)).await;
    }
}

/// A MicroTime (`2026-11-25T10:00:00.123456Z`).
fn chrono_micro() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let base = meta::rfc3339(d.as_secs());
    format!("{}.{:06}Z", base.trim_end_matches('Z'), d.subsec_micros())
}

/// Keeps one worker per pod bound to this node, fed from a list+watch that fails over
/// between replicas.
async fn sync_pods(env: Arc<pod::Env>) -> anyhow::Result<()> {
    let query = format!("fieldSelector=spec.nodeName%3D{}", env.node);
    let mut workers: HashMap<String, watch::Sender<Option<Arc<Value>>>> = HashMap::new();
    let target = reflector::Target {
        path: "/api/v1/pods",
        query: &query,
        resource: "pods",
    };
    reflector::run(
        env.api.clone(),
        target,
        env.metrics.watch_restarts.clone(),
        |change| match change {
            reflector::Change::Listed(items) => {
                let present: std::collections::HashSet<String> =
                    items.iter().map(|p| owner::uid(p).to_string()).collect();
                // Pods gone while we were not watching.
                for (uid, tx) in &workers {
                    if !present.contains(uid) {
                        let _ = tx.send(None);
                    }
                }
                workers.retain(|uid, tx| present.contains(uid) || !tx.is_closed());
                // Pods deleted while the agent was down (or gone while it was not
                // watching) leave directories no worker owns: what still runs there is
                // stopped and removed.
                for dir in std::fs::read_dir(&env.pods_dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let name = dir.file_name().to_string_lossy().into_owned();
                    let Some((_, uid)) = name.rsplit_once('_') else {
                        continue;
                    };
                    if !present.contains(uid) && !workers.contains_key(uid) {
                        tracing::info!(pod = name, "removing a pod that is no longer bound here");
                        let env = env.clone();
                        tokio::spawn(async move { env.runtime.remove_pod(&dir.path()).await });
                    }
                }
                for p in items {
                    update(&env, &mut workers, Arc::new(p));
                }
                env.metrics.set_synced();
            }
            reflector::Change::Applied(p) => update(&env, &mut workers, Arc::new(p)),
            reflector::Change::Deleted(p) => {
                if let Some(tx) = workers.get(owner::uid(&p)) {
                    let _ = tx.send(None);
                }
                workers.retain(|_, tx| !tx.is_closed());
                env.metrics.pods.set(workers.len() as i64);
            }
        },
    )
    .await;
    Ok(())
}

/// Hands the latest version of a pod to its worker, starting one for a new uid.
fn update(
    env: &Arc<pod::Env>,
    workers: &mut HashMap<String, watch::Sender<Option<Arc<Value>>>>,
    p: Arc<Value>,
) {
    let uid = owner::uid(&p).to_string();
    if let Some(tx) = workers.get(&uid) {
        let _ = tx.send(Some(p));
        return;
    }
    // A finished pod that no worker of ours ran (an agent restart): nothing to do but
    // finish a pending deletion.
    let (tx, rx) = watch::channel(Some(p));
    workers.insert(uid, tx);
    env.metrics.pods.set(workers.len() as i64);
    tokio::spawn(pod::run(env.clone(), rx));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_resources_come_off_allocatable() {
        let cap = json!({"cpu": "2", "memory": "1024Ki", "pods": "110"});
        let a = allocatable(&cap, &["cpu=250m".into(), "memory=1Ki".into()]).unwrap();
        assert_eq!(
            a,
            json!({"cpu": "1750m", "memory": "1047552", "pods": "110"})
        );
        assert!(allocatable(&cap, &["gpu=1".into()]).is_err());
        assert!(allocatable(&cap, &["cpu".into()]).is_err());
        assert_eq!(allocatable(&cap, &["cpu=5".into()]).unwrap()["cpu"], "0m");
    }
}
