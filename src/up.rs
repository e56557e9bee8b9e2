//! `flotilla up`: a local cluster for trying Flotilla out. Starts `--replicas` replicas as
//! child processes on loopback (each with its data under `--data-dir/<id>` and its log in
//! `--data-dir/<id>/server.log`), waits for a leader, prints the endpoints and a live status
//! line, and stops every child cleanly on Ctrl-C. A second run reuses the data. It also
//! runs `--agents` node agents (default 1: node `node-1`, process runtime), so pods run.
//!
//! Services work out of the box when it runs as root: each agent serves the cluster DNS on
//! an address of the `--host` block (last octet + 200 + agent index) and runs the iptables
//! service proxy, with node ports on `--host` only; cluster IPs come from a loopback range
//! (`--service-cidr`), so nothing of the local cluster is reachable from, or routed to, the
//! network. Without root there is no cluster DNS (port 53) and the proxy runs in userspace
//! (the agent listens on the cluster IPs).
//!
//! Secure by default: `flotilla certs init` into `--data-dir/pki` (the CA is kept across
//! runs, the leaf certificates renewed), HTTPS and client-certificate authentication on
//! every replica's API, mutual TLS between replicas and from replicas to agents, agents
//! authenticated by their `system:node:<name>` certificates, and `--data-dir/kubeconfig`
//! with the admin's certificate; Secrets are encrypted at rest with a key made once in
//! `--data-dir/pki/encryption.yaml`. `--insecure` runs it all over plain HTTP, unencrypted.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::client::Client;
use crate::gateway::json::StatusResponse;

/// Flags of `flotilla up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of control-plane replicas.
    #[arg(long, default_value_t = 3)]
    pub replicas: u64,
    /// Where the replicas keep their data.
    #[arg(long, default_value = "./flotilla-data")]
    pub data_dir: PathBuf,
    /// Replica N serves its API on port base+N-1 and its peer port on base+1000+N-1.
    #[arg(long, default_value_t = 6441)]
    pub base_port: u16,
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Node agents to run (nodes `node-1`, `node-2`, ...; process runtime, data under
    /// `--data-dir/agent-N`, agent N's endpoint on port base+2000+N-1).
    #[arg(long, default_value_t = 1)]
    pub agents: u64,
    /// Where Services' cluster IPs come from (a loopback range keeps them on this machine).
    #[arg(long, default_value = "127.96.0.0/16")]
    pub service_cidr: String,
    /// Plain HTTP and no authentication anywhere (the default is TLS with certificates from
    /// `--data-dir/pki`).
    #[arg(long)]
    pub insecure: bool,
}

/// Where `up` keeps the cluster's certificates.
fn pki(args: &UpArgs) -> PathBuf {
    args.data_dir.join("pki")
}

/// The security flags of replica `id` (none with `--insecure`).
fn replica_security(args: &UpArgs, id: u64) -> Vec<String> {
    if args.insecure {
        return Vec::new();
    }
    let pki = pki(args);
    let f = |name: &str| pki.join(name).display().to_string();
    let (crt, key) = (
        f(&format!("replica-{id}.crt")),
        f(&format!("replica-{id}.key")),
    );
    let ca = f("ca.crt");
    [
        ("--tls-cert-file", &crt),
        ("--tls-private-key-file", &key),
        ("--client-ca-file", &ca),
        ("--peer-cert-file", &crt),
        ("--peer-key-file", &key),
        ("--peer-trusted-ca-file", &ca),
        ("--kubelet-client-certificate", &crt),
        ("--kubelet-client-key", &key),
        ("--kubelet-certificate-authority", &ca),
        ("--encryption-provider-config", &f("encryption.yaml")),
        ("--service-account-signing-key-file", &f("sa.key")),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .collect()
}

/// Secrets encrypted at rest: an `EncryptionConfiguration` with one random AES-256 key,
/// made once (a later run keeps it: the stored Secrets need it).
fn encryption_config(path: &Path) -> anyhow::Result<()> {
    use base64::Engine;
    if path.exists() {
        return Ok(());
    }
    let key: [u8; 32] = rand::random();
    let text = format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n    - aesgcm:\n        keys:\n        - name: key1\n          secret: {}\n    - identity: {{}}\n",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    crate::certs::write_private(path, &text)
}

/// The security flags of agent `n` (none with `--insecure`).
fn agent_security(args: &UpArgs, n: u64) -> Vec<String> {
    if args.insecure {
        return Vec::new();
    }
    let pki = pki(args);
    let f = |name: &str| pki.join(name).display().to_string();
    vec![
        "--ca-file".into(),
        f("ca.crt"),
        "--cert-file".into(),
        f(&format!("agent-node-{n}.crt")),
        "--key-file".into(),
        f(&format!("agent-node-{n}.key")),
    ]
}

/// Agent `n`'s cluster DNS address: `--host` with 200 + n - 1 added to its last octet, if
/// that stays a valid address and up runs as root (port 53).
pub fn dns_address(host: &str, n: u64) -> Option<std::net::Ipv4Addr> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let ip: std::net::Ipv4Addr = host.parse().ok()?;
    let [a, b, c, d] = ip.octets();
    let last = u64::from(d) + 200 + n - 1;
    (last <= 254).then(|| std::net::Ipv4Addr::new(a, b, c, last as u8))
}

struct Replica {
    id: u64,
    api: String,
    child: Option<Child>,
}

fn spawn(exe: &Path, args: &UpArgs, id: u64, cluster: &str) -> anyhow::Result<Child> {
    let dir = args.data_dir.join(id.to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    let api_port = args.base_port + (id - 1) as u16;
    let peer_port = args.base_port + 1000 + (id - 1) as u16;
    Command::new(exe)
        .arg("server")
        .args(["--id", &id.to_string()])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen-api", &format!("{}:{api_port}", args.host)])
        .args(["--listen-peer", &format!("{}:{peer_port}", args.host)])
        .args(["--initial-cluster", cluster])
        .args(["--service-cluster-ip-range", &args.service_cidr])
        .args(replica_security(args, id))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting replica {id}"))
}

fn spawn_agent(exe: &Path, args: &UpArgs, n: u64, servers: &str) -> anyhow::Result<Child> {
    let dir = args.data_dir.join(format!("agent-{n}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))?;
    let mut services: Vec<String> = vec!["--proxy-mode".into(), "userspace".into()];
    if let Some(dns) = dns_address(&args.host, n) {
        services = vec![
            "--cluster-dns".into(),
            dns.to_string(),
            "--proxy-mode".into(),
            "iptables".into(),
            "--nodeport-addresses".into(),
            format!("{}/32", args.host),
        ];
    }
    Command::new(exe)
        .arg("agent")
        .args(["--servers", servers])
        .args(&services)
        .args(["--node-name", &format!("node-{n}")])
        .arg("--data-dir")
        .arg(&dir)
        .args([
            "--listen",
            &format!("{}:{}", args.host, args.base_port + 2000 + (n - 1) as u16),
        ])
        .args(["--node-ip", &args.host])
        // Each pod its own loopback address, so pods of one node can serve the same port.
        .args(["--pod-cidr", &format!("127.{}.0.0/16", 100 + n)])
        .args(agent_security(args, n))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting agent {n}"))
}

/// A kubeconfig for the cluster whose API is at `server` (plain HTTP, no credentials yet).
pub fn kubeconfig(server: &str) -> String {
    let server = if server.starts_with("http://") || server.starts_with("https://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: flotilla\n  cluster:\n    server: {server}\ncontexts:\n- name: flotilla\n  context:\n    cluster: flotilla\n    namespace: default\ncurrent-context: flotilla\nusers: []\n"
    )
}

/// Runs the local cluster until Ctrl-C.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.replicas == 0 || args.replicas > 9 {
        bail!("--replicas must be between 1 and 9");
    }
    let exe = std::env::current_exe()?;
    let scheme = if args.insecure { "http" } else { "https" };
    let tls = if args.insecure {
        None
    } else {
        // The CA is kept; the leaf certificates are made anew (for the current --host).
        crate::certs::init(&crate::certs::InitArgs {
            dir: pki(&args),
            replicas: (1..=args.replicas)
                .map(|id| format!("{id}={}", args.host))
                .collect(),
            agents: (1..=args.agents)
                .map(|n| format!("node-{n}={}", args.host))
                .collect(),
            server: Some(format!("{scheme}://{}:{}", args.host, args.base_port)),
        })
        .context("making the cluster's certificates")?;
        let pki = pki(&args);
        encryption_config(&pki.join("encryption.yaml"))?;
        Some(std::sync::Arc::new(crate::tls::client_config(
            &pki.join("ca.crt"),
            Some((&pki.join("admin.crt"), &pki.join("admin.key"))),
        )?))
    };
    let cluster = (1..=args.replicas)
        .map(|id| {
            format!(
                "{id}={}:{}",
                args.host,
                args.base_port + 1000 + (id - 1) as u16
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut replicas = Vec::new();
    for id in 1..=args.replicas {
        let child = spawn(&exe, &args, id, &cluster)?;
        replicas.push(Replica {
            id,
            api: format!("{}:{}", args.host, args.base_port + (id - 1) as u16),
            child: Some(child),
        });
    }
    let servers: Vec<String> = replicas.iter().map(|r| r.api.clone()).collect();
    let client = Client::with_tls(servers.clone(), Duration::from_millis(500), tls);
    let mut agents = Vec::new();
    for n in 1..=args.agents {
        match spawn_agent(&exe, &args, n, &servers.join(",")) {
            Ok(c) => agents.push(Replica {
                id: n,
                api: String::new(),
                child: Some(c),
            }),
            Err(e) => {
                stop(&mut agents, "agents");
                stop(&mut replicas, "replicas");
                return Err(e);
            }
        }
    }

    let result = supervise(&args, &mut replicas, &client).await;
    // Agents first (their pods' processes keep running, as a kubelet's containers do, and
    // a restarted agent stops them), then the replicas.
    stop(&mut agents, "agents");
    stop(&mut replicas, "replicas");
    result
}

async fn statuses(client: &Client, replicas: &[Replica]) -> Vec<Result<StatusResponse, String>> {
    let mut out = Vec::new();
    for r in replicas {
        out.push(
            client
                .post_to::<_, StatusResponse>(
                    &r.api,
                    "/v3/maintenance/status",
                    &serde_json::json!({}),
                )
                .await
                .map_err(|e| e.to_string()),
        );
    }
    out
}

async fn supervise(args: &UpArgs, replicas: &mut [Replica], client: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        // Up means usable: a leader, and the system objects it makes (the default
        // namespace, the default roles) in place.
        let leader = statuses(client, replicas)
            .await
            .iter()
            .flatten()
            .find_map(|s| (s.leader != 0).then_some(s.leader));
        if let Some(l) = leader {
            let ready = match client.servers().first() {
                Some(server) => matches!(
                    client
                        .get_text(server, "/api/v1/namespaces/default/serviceaccounts/default")
                        .await,
                    Ok((200, _))
                ),
                None => true,
            };
            if ready {
                break l;
            }
        }
        for r in replicas.iter_mut() {
            if let Some(Some(status)) = r.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "replica {} exited with {status} before the cluster formed; see {}",
                    r.id,
                    args.data_dir
                        .join(r.id.to_string())
                        .join("server.log")
                        .display()
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster is not ready after 60 s (no leader, or no system namespaces yet); see the server.log files under {}",
                args.data_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "Flotilla is up: {} replicas, leader is {leader}.",
        replicas.len()
    );
    for r in replicas.iter() {
        println!(
            "  replica {}: api {}://{}  data {}",
            r.id,
            if args.insecure { "http" } else { "https" },
            r.api,
            args.data_dir.join(r.id.to_string()).display()
        );
    }
    for n in 1..=args.agents {
        let dns = match dns_address(&args.host, n) {
            Some(ip) => format!("  cluster DNS {ip}, service proxy on"),
            None => "  userspace service proxy; no cluster DNS (port 53 needs root)".into(),
        };
        println!(
            "  agent {n}: node node-{n}  data {}{dns}",
            args.data_dir.join(format!("agent-{n}")).display()
        );
    }
    let kubeconfig_path = args.data_dir.join("kubeconfig");
    if args.insecure {
        std::fs::write(&kubeconfig_path, kubeconfig(&replicas[0].api))?;
    } else {
        // The admin's credentials: readable by this user only.
        let pki = std::fs::canonicalize(pki(args))?;
        let text = crate::certs::kubeconfig(
            &format!("https://{}", replicas[0].api),
            Some(&pki.join("ca.crt")),
            Some((&pki.join("admin.crt"), &pki.join("admin.key"))),
        );
        crate::certs::write_private(&kubeconfig_path, &text)?;
    }
    let kubeconfig_path = std::fs::canonicalize(&kubeconfig_path).unwrap_or(kubeconfig_path);
    println!("Kubeconfig: {}", kubeconfig_path.display());
    println!(
        "  export KUBECONFIG={}; kubectl get namespaces",
        kubeconfig_path.display()
    );
    if args.insecure {
        println!(
            "Try: flotilla ctl --servers {} status",
            client.servers().join(",")
        );
    } else {
        let pki = std::fs::canonicalize(pki(args))?;
        println!(
            "Try: flotilla ctl --servers {} --cacert {} --cert {} --key {} status",
            client.servers().join(","),
            pki.join("ca.crt").display(),
            pki.join("admin.crt").display(),
            pki.join("admin.key").display()
        );
    }
    println!("Press Ctrl-C to stop.");

    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut signal = Box::pin(crate::server::wait_for_signal());
    loop {
        tokio::select! {
            _ = &mut signal => {
                if tty { println!(); }
                println!("stopping...");
                return Ok(());
            }
            _ = tick.tick() => {}
        }
        let st = statuses(client, replicas).await;
        let mut parts = Vec::new();
        for (r, s) in replicas.iter_mut().zip(&st) {
            let exited = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            parts.push(match (exited, s) {
                (Some(code), _) => format!("r{}: exited ({code})", r.id),
                (None, Ok(s)) => format!(
                    "r{}: {} t{} applied {} rev {}",
                    r.id, s.state, s.raft_term, s.raft_applied_index, s.header.revision
                ),
                (None, Err(_)) => format!("r{}: unreachable", r.id),
            });
        }
        let line = parts.join(" | ");
        if tty {
            print!("\r\x1b[2K{line}");
            std::io::stdout().flush()?;
        } else if line != last {
            println!("{line}");
        }
        last = line;
    }
}

/// SIGTERM every child, wait up to 10 s, then SIGKILL what is left.
fn stop(replicas: &mut [Replica], what: &str) {
    for r in replicas.iter() {
        if let Some(c) = &r.child {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for r in replicas.iter_mut() {
        let Some(mut c) = r.child.take() else {
            continue;
        };
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
    println!("stopped {} {what}", replicas.len());
}
