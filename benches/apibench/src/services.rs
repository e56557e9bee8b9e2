//! The services numbers (issue 10): the cluster DNS and the service proxy of one agent.
//!
//! `--scenario services` starts the three replicas (service IPs from `127.97.0.0/16`) and
//! backends inside this process (TCP servers on `127.98.0.1-3:8080`, each answering its own
//! name, or streaming bytes), published through selector-less Services whose EndpointSlices
//! this program writes, then for each proxy mode (`iptables`, `userspace`) a real
//! `flotilla agent` with the cluster DNS on `127.53.9.1`:
//! 1. **DNS**: `--concurrency` clients each asking for a service's A record in a loop for
//!    10 s (UDP): answers/s and latency; the same load against dnsmasq (Debian's, if
//!    installed) answering the same name from its configuration, side by side.
//! 2. **Proxy connection setup**: one client doing connect + request + answer + close 2,000
//!    times to the backends directly, then through the cluster IP (latency), and
//!    `--concurrency` clients for 5 s (connections/s).
//! 3. **Proxy throughput**: one connection streaming 1 GiB, direct and through the proxy.
//! 4. **Change propagation**: 20 times, an EndpointSlice's endpoint is switched (PATCH) and
//!    the time from the API's answer to the first connection through the cluster IP that
//!    reaches the new backend is taken; the same for a headless service's DNS answer.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::{latency, ok, send, Args, Cluster, Http, Latency};

/// Where the agent serves the cluster DNS (and dnsmasq, for comparison, the next address).
const DNS: &str = "127.53.9.1";
const DNSMASQ: &str = "127.53.9.2";
const BACKENDS: [&str; 3] = ["127.98.0.1", "127.98.0.2", "127.98.0.3"];
/// The backend measured directly: an address of its own, so no connection to it shares a
/// conntrack reply tuple with a proxied one.
const DIRECT: &str = "127.98.0.4";
const NAME: &str = "bench-tcp.default.svc.cluster.local";

#[derive(Debug, Default, Serialize)]
struct DnsFigures {
    server: String,
    clients: usize,
    answers_per_sec: f64,
    latency: Latency,
}

#[derive(Debug, Default, Serialize)]
struct ProxyFigures {
    path: String,
    /// One client, sequential: connect + request + answer + close.
    connection: Latency,
    /// `clients` clients for 5 s.
    connections_per_sec: f64,
    clients: usize,
    /// One connection streaming 1 GiB.
    throughput_mib_per_sec: f64,
    /// Connections that failed or took over 2 s (not in the figures).
    failed: usize,
}

#[derive(Debug, Default, Serialize)]
struct ChangeFigures {
    mode: String,
    /// EndpointSlice PATCH answered → a connection through the cluster IP reaches the new
    /// backend.
    proxy: Latency,
    /// The same → the headless service's DNS answer names the new address.
    dns: Latency,
}

#[derive(Debug, Default, Serialize)]
struct ServicesResults {
    command: String,
    dns: Vec<DnsFigures>,
    proxy: Vec<ProxyFigures>,
    changes: Vec<ChangeFigures>,
}

/// A backend: answers `name\n` to a line `hello`, or streams the number of bytes asked
/// for by a line `stream N`.
async fn backend(addr: SocketAddr, name: &'static str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' && line.len() < 64 {
                    line.push(b[0]);
                }
                let line = String::from_utf8_lossy(&line).into_owned();
                if let Some(n) = line
                    .strip_prefix("stream ")
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    let chunk = vec![7u8; 1 << 16];
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(chunk.len());
                        if s.write_all(&chunk[..k]).await.is_err() {
                            return;
                        }
                        left -= k;
                    }
                } else {
                    let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                }
            });
        }
    });
    Ok(())
}

/// connect + `hello` + the answer: the backend's name.
async fn hello(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    s.set_nodelay(true)?;
    s.write_all(b"hello\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await??;
    Ok(out.trim().to_string())
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(
        Name::from_ascii(format!("{name}.")).expect("a name"),
        RecordType::A,
    ));
    m.to_vec().expect("encodes")
}

/// The A records of `name` at `server`.
async fn resolve(sock: &UdpSocket, server: SocketAddr, name: &str) -> anyhow::Result<Vec<IpAddr>> {
    let id = rand_id();
    sock.send_to(&query(id, name), server).await?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) =
            tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await??;
        let m = Message::from_vec(&buf[..n])?;
        if m.id() != id {
            continue;
        }
        return Ok(m
            .answers()
            .iter()
            .filter_map(|r| r.data().ip_addr())
            .collect());
    }
}

fn rand_id() -> u16 {
    static N: AtomicUsize = AtomicUsize::new(1);
    (N.fetch_add(1, Ordering::Relaxed) & 0xffff) as u16
}

/// `clients` clients resolving `name` at `server` for `seconds`.
async fn dns_load(
    server: SocketAddr,
    name: &str,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<(f64, Latency)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (stop, name) = (stop.clone(), name.to_string());
        tasks.push(tokio::spawn(async move {
            let sock = UdpSocket::bind("127.0.0.1:0").await?;
            let mut micros = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ips = resolve(&sock, server, &name).await?;
                if ips.is_empty() {
                    bail!("{name}: no answer from {server}");
                }
                micros.push(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok(micros)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, latency(all)))
}

/// [`dns_load`] on `NAME` at `server` for 10 s, labelled `label`.
async fn dns_figures(
    label: &str,
    server: SocketAddr,
    clients: usize,
) -> anyhow::Result<DnsFigures> {
    let (answers_per_sec, latency) = dns_load(server, NAME, clients, 10).await?;
    Ok(DnsFigures {
        server: label.into(),
        clients,
        answers_per_sec,
        latency,
    })
}

/// Connection setup to `addr`: sequential latency, then `clients` clients' rate, and how
/// many connections failed.
async fn connections(addr: SocketAddr, clients: usize) -> anyhow::Result<(Latency, f64, usize)> {
    let mut micros = Vec::new();
    let failed = Arc::new(AtomicUsize::new(0));
    for _ in 0..2000 {
        let t = Instant::now();
        match hello(addr).await {
            Ok(_) => micros.push(t.elapsed().as_micros() as u64),
            Err(_) => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match hello(addr).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    Ok((latency(micros), rate, failed.load(Ordering::Relaxed)))
}

/// Connection setup and throughput to `addr`, labelled `path`.
async fn measure(path: String, addr: SocketAddr, clients: usize) -> anyhow::Result<ProxyFigures> {
    let (connection, connections_per_sec, failed) = connections(addr, clients).await?;
    Ok(ProxyFigures {
        path,
        connection,
        connections_per_sec,
        clients,
        throughput_mib_per_sec: throughput(addr).await?,
        failed,
    })
}

/// MiB/s of one connection streaming 1 GiB from `addr`.
async fn throughput(addr: SocketAddr) -> anyhow::Result<f64> {
    const N: usize = 1 << 30;
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("stream {N}\n").as_bytes()).await?;
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got != N {
        bail!("streamed {got} bytes of {N}");
    }
    Ok(N as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64())
}

fn service(name: &str, headless: bool) -> serde_json::Value {
    let mut spec = json!({"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]});
    if headless {
        spec["clusterIP"] = json!("None");
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
}

fn slice(service: &str, ips: &[&str]) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// The agent under test, stopped with SIGTERM (its rules go with it) when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A dnsmasq answering `NAME` with the address the cluster DNS gives it.
struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn until<F, Fut>(what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub(crate) async fn services(
    args: &Args,
    c: &Cluster,
    http: &Http,
    dir: &Path,
) -> anyhow::Result<()> {
    let api = format!("http://{}", c.apis[0]);
    until("the API", || async {
        matches!(
            send(
                http,
                Method::GET,
                format!("{api}/api/v1/namespaces/default"),
                "application/json",
                "application/json",
                vec![]
            )
            .await,
            Ok((StatusCode::OK, _))
        )
    })
    .await?;
    for (i, ip) in BACKENDS.iter().enumerate() {
        backend(format!("{ip}:8080").parse()?, ["b1", "b2", "b3"][i]).await?;
    }
    backend(format!("{DIRECT}:8080").parse()?, "direct").await?;
    let post = |path: &'static str, body: serde_json::Value| {
        let api = api.clone();
        async move {
            ok(
                http,
                Method::POST,
                format!("{api}{path}"),
                "application/json",
                serde_json::to_vec(&body)?,
            )
            .await
        }
    };
    let services_path = "/api/v1/namespaces/default/services";
    let slices_path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
    post(services_path, service("bench-tcp", false)).await?;
    post(slices_path, slice("bench-tcp", &BACKENDS)).await?;
    post(services_path, service("bench-switch", false)).await?;
    post(slices_path, slice("bench-switch", &BACKENDS[..1])).await?;
    post(services_path, service("bench-headless", true)).await?;
    post(slices_path, slice("bench-headless", &BACKENDS[..1])).await?;
    let ip_of = |name: &'static str| {
        let api = api.clone();
        async move {
            let b = ok(
                http,
                Method::GET,
                format!("{api}{services_path}/{name}"),
                "application/json",
                vec![],
            )
            .await?;
            let v: serde_json::Value = serde_json::from_slice(&b)?;
            anyhow::Ok(v["spec"]["clusterIP"].as_str().unwrap_or("").to_string())
        }
    };
    let vip: SocketAddr = format!("{}:80", ip_of("bench-tcp").await?).parse()?;
    let switch: SocketAddr = format!("{}:80", ip_of("bench-switch").await?).parse()?;
    let dns: SocketAddr = format!("{DNS}:53").parse()?;
    let mut res = ServicesResults {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ..Default::default()
    };
    // Direct, for reference.
    let direct: SocketAddr = format!("{DIRECT}:8080").parse()?;
    res.proxy
        .push(measure("direct".into(), direct, args.concurrency).await?);
    for (round, mode) in ["iptables", "userspace"].into_iter().enumerate() {
        let data = dir.join(format!("agent-{mode}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::File::create(dir.join(format!("agent-{mode}.log")))?;
        let agent = Agent(
            Command::new(&args.flotilla)
                .args([
                    "agent",
                    "--servers",
                    &c.apis.join(","),
                    "--node-name",
                    "bench-1",
                ])
                .arg("--data-dir")
                .arg(&data)
                .args(["--cluster-dns", DNS, "--proxy-mode", mode])
                .args(["--nodeport-addresses", "127.0.0.1/32"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        until("the cluster DNS", || async {
            resolve(&sock, dns, NAME)
                .await
                .is_ok_and(|ips| ips == [vip.ip()])
        })
        .await?;
        until("the proxy", || async { hello(vip).await.is_ok() }).await?;
        if round == 0 {
            res.dns
                .push(dns_figures("flotilla agent", dns, args.concurrency).await?);
            match Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--user=root",
                ])
                .arg(format!("--listen-address={DNSMASQ}"))
                .arg(format!("--address=/{NAME}/{}", vip.ip()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(child) => {
                    let _d = Dnsmasq(child);
                    let other: SocketAddr = format!("{DNSMASQ}:53").parse()?;
                    until("dnsmasq", || async {
                        resolve(&sock, other, NAME).await.is_ok()
                    })
                    .await?;
                    let figures =
                        dns_figures("dnsmasq 2.90 (static record)", other, args.concurrency);
                    res.dns.push(figures.await?);
                }
                Err(e) => eprintln!("no dnsmasq to compare with: {e}"),
            }
        }
        // Direct again, with the agent running (the machine's noise in the same conditions).
        let path = format!("direct ({mode} agent up)");
        res.proxy
            .push(measure(path, direct, args.concurrency).await?);
        let path = format!("cluster IP ({mode})");
        res.proxy.push(measure(path, vip, args.concurrency).await?);
        // Change propagation.
        let mut proxy_delays = Vec::new();
        let mut dns_delays = Vec::new();
        for i in 0..20 {
            let (ip, name) = if i % 2 == 0 {
                (BACKENDS[1], "b2")
            } else {
                (BACKENDS[0], "b1")
            };
            for (service, delays) in [
                ("bench-switch", &mut proxy_delays),
                ("bench-headless", &mut dns_delays),
            ] {
                let patch =
                    json!({"endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]});
                ok(
                    http,
                    Method::PATCH,
                    format!("{api}{slices_path}/{service}-1"),
                    "application/merge-patch+json",
                    serde_json::to_vec(&patch)?,
                )
                .await?;
                let t = Instant::now();
                let want: IpAddr = ip.parse()?;
                loop {
                    let done = if service == "bench-switch" {
                        hello(switch).await.is_ok_and(|n| n == name)
                    } else {
                        resolve(&sock, dns, "bench-headless.default.svc.cluster.local")
                            .await
                            .is_ok_and(|ips| ips == [want])
                    };
                    if done {
                        break;
                    }
                    if t.elapsed() > Duration::from_secs(30) {
                        bail!("{service} did not follow its EndpointSlice in 30 s");
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                delays.push(t.elapsed().as_micros() as u64);
            }
        }
        res.changes.push(ChangeFigures {
            mode: mode.into(),
            proxy: latency(proxy_delays),
            dns: latency(dns_delays),
        });
        drop(agent);
    }
    println!(
        "DNS ({} clients, 10 s, UDP, one A record):",
        args.concurrency
    );
    for d in &res.dns {
        println!(
            "  {:<30} {:>9.0} answers/s  p50 {:.3} ms  p99 {:.3} ms",
            d.server, d.answers_per_sec, d.latency.p50_ms, d.latency.p99_ms
        );
    }
    println!(
        "Connections (connect + request + answer + close; 1 client sequential, then {} clients):",
        args.concurrency
    );
    for p in &res.proxy {
        println!(
            "  {:<28} p50 {:.3} ms  p99 {:.3} ms  {:>7.0} conn/s  stream {:>6.0} MiB/s  failed {}",
            p.path,
            p.connection.p50_ms,
            p.connection.p99_ms,
            p.connections_per_sec,
            p.throughput_mib_per_sec,
            p.failed
        );
    }
    println!("EndpointSlice change (PATCH answered) → followed:");
    for ch in &res.changes {
        println!(
            "  {:<10} proxy p50 {:.1} ms max {:.1} ms   DNS p50 {:.1} ms max {:.1} ms",
            ch.mode, ch.proxy.p50_ms, ch.proxy.max_ms, ch.dns.p50_ms, ch.dns.max_ms
        );
    }
    println!("\ncommand: {}", res.command);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&res)?)?;
    }
    Ok(())
}
