//! The userspace service proxy (`--proxy-mode userspace`, for an agent without root, as
//! kube-proxy's old userspace mode): the agent itself listens on each Service's cluster IP
//! and port (and node port, on the node's address) and relays every TCP connection, or UDP
//! flow, to one of the Service's ready endpoints.
//!
//! A cluster IP must be an address of this machine to be listened on: with a loopback
//! service range (`flotilla up`'s) every one is. A listener that cannot bind is retried at
//! each sync and counted (`flotilla_agent_proxy_syncs_total{result="error"}`).
//!
//! Owns its listeners, one task each, keyed by (address, protocol). Invariants:
//! - a listener exists only while its service port has ready endpoints, so a port without
//!   any refuses connections (as the iptables mode rejects them);
//! - endpoint lists are swapped in place on every change: a new connection goes to a ready
//!   endpoint of the latest sync, one already relayed keeps its backend;
//! - a backend that refuses a connection is skipped for the next ready one (at most
//!   [`TRIES`] tries); with `sessionAffinity: ClientIP` a client keeps its backend while it
//!   stays ready and comes back within the timeout;
//! - relayed TCP connections ([`MAX_CONNECTIONS`]) and UDP flows ([`MAX_FLOWS`], each ended
//!   after [`UDP_IDLE`] without traffic) are bounded.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::proxy::RETRY;
use super::services::{self, Cache, Tables};

/// Backends tried for one TCP connection.
pub const TRIES: usize = 3;
/// A backend's time to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most relayed TCP connections at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most UDP flows (client address → backend) at once.
pub const MAX_FLOWS: usize = 4096;
/// A UDP flow without traffic for this long ends.
pub const UDP_IDLE: Duration = Duration::from_secs(30);

/// A listening address and protocol (`tcp`, `udp`).
pub type Key = (SocketAddr, String);

/// Where a listener sends traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Ready endpoints, sorted.
    pub endpoints: Vec<SocketAddr>,
    /// `sessionAffinity: ClientIP` timeout, seconds.
    pub affinity_seconds: Option<u32>,
}

/// The listeners the cache's state calls for: each service port with ready endpoints, on
/// its cluster IPs and, for a node port, on `node_ip`.
pub fn plan(t: &Tables, node_ip: Option<IpAddr>) -> BTreeMap<Key, Target> {
    let mut out = BTreeMap::new();
    for (ns, name, s) in t.services() {
        if s.headless || s.external_name.is_some() {
            continue;
        }
        for port in &s.ports {
            let proto = port.protocol.to_ascii_lowercase();
            if proto != "tcp" && proto != "udp" {
                continue;
            }
            let endpoints: Vec<SocketAddr> = super::proxy::endpoints(t, ns, name, port)
                .into_iter()
                .map(|(ip, p)| SocketAddr::new(ip, p))
                .collect();
            if endpoints.is_empty() {
                continue;
            }
            let target = Target {
                endpoints,
                affinity_seconds: s.affinity_seconds,
            };
            for ip in &s.cluster_ips {
                out.insert(
                    (SocketAddr::new(*ip, port.port), proto.clone()),
                    target.clone(),
                );
            }
            if let (Some(np), Some(node)) = (port.node_port, node_ip) {
                out.insert((SocketAddr::new(node, np), proto.clone()), target.clone());
            }
        }
    }
    out
}

/// A listener's current target, shared with its task.
struct Shared {
    target: RwLock<Target>,
    /// Client address → (backend, last use), for ClientIP affinity.
    affinity: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// The backends to try for `client`, in order: its affine one first, then the others
    /// from a rotating start.
    fn choose(&self, client: IpAddr) -> Vec<SocketAddr> {
        let t = self
            .target
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let n = t.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        let mut order: Vec<SocketAddr> = (0..n).map(|i| t.endpoints[(start + i) % n]).collect();
        if let Some(seconds) = t.affinity_seconds {
            let mut a = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
            let timeout = Duration::from_secs(u64::from(seconds));
            a.retain(|_, (_, used)| used.elapsed() < timeout);
            if let Some((b, _)) = a.get(&client) {
                if let Some(i) = order.iter().position(|x| x == b) {
                    order.swap(0, i);
                }
            }
        }
        order.truncate(TRIES);
        order
    }

    fn used(&self, client: IpAddr, backend: SocketAddr) {
        let affine = self
            .target
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .affinity_seconds
            .is_some();
        if affine {
            self.affinity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(client, (backend, Instant::now()));
        }
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, connections: Arc<Semaphore>) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue; // Dropped: too many connections relayed.
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            for backend in shared.choose(peer.ip()) {
                let connected =
                    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await;
                if let Ok(Ok(mut upstream)) = connected {
                    shared.used(peer.ip(), backend);
                    let mut client = client;
                    // Relayed bytes go out as they come (no Nagle delay on either leg).
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return;
                }
            }
        });
    }
}

async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>) {
    let socket = Arc::new(socket);
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let existing = flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .cloned();
        let upstream = match existing {
            Some(u) => u,
            None => {
                if flows.lock().unwrap_or_else(|p| p.into_inner()).len() >= MAX_FLOWS {
                    continue;
                }
                let Some(backend) = shared.choose(peer.ip()).into_iter().next() else {
                    continue;
                };
                let local: SocketAddr = if backend.is_ipv4() {
                    "0.0.0.0:0".parse().expect("valid")
                } else {
                    "[::]:0".parse().expect("valid")
                };
                let Ok(u) = UdpSocket::bind(local).await else {
                    continue;
                };
                if u.connect(backend).await.is_err() {
                    continue;
                }
                shared.used(peer.ip(), backend);
                let u = Arc::new(u);
                flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(peer, u.clone());
                // Replies go back to the client from the service's address until the flow
                // is idle.
                let (u2, socket, flows) = (u.clone(), socket.clone(), flows.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65535];
                    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, u2.recv(&mut buf)).await {
                        let _ = socket.send_to(&buf[..n], peer).await;
                    }
                    flows
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&peer);
                });
                u
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// A running listener.
struct Listener {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// Keeps the listeners in step with `cache` until cancelled (dropping the task stops
/// every listener).
pub async fn run(
    cache: Cache,
    node_ip: Option<IpAddr>,
    metrics: Arc<super::metrics::AgentMetrics>,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut listeners: BTreeMap<Key, Listener> = BTreeMap::new();
    // Aborts every listener task when this future is dropped.
    struct AbortAll<'a>(&'a mut BTreeMap<Key, Listener>);
    impl Drop for AbortAll<'_> {
        fn drop(&mut self) {
            for l in self.0.values() {
                l.task.abort();
            }
        }
    }
    let guard = AbortAll(&mut listeners);
    let mut changes = cache.subscribe();
    let mut failed = false;
    loop {
        let synced = services::read(&cache).synced();
        if synced {
            let started = Instant::now();
            let want = {
                let t = services::read(&cache);
                plan(&t, node_ip)
            };
            guard.0.retain(|k, l| {
                let keep = want.contains_key(k);
                if !keep {
                    l.task.abort();
                }
                keep
            });
            failed = false;
            for (key, target) in want {
                if let Some(l) = guard.0.get(&key) {
                    *l.shared.target.write().unwrap_or_else(|p| p.into_inner()) = target;
                    continue;
                }
                let shared = Arc::new(Shared {
                    target: RwLock::new(target),
                    affinity: Mutex::default(),
                    next: std::sync::atomic::AtomicUsize::new(rand::random::<usize>()),
                });
                let task = match key.1.as_str() {
                    "tcp" => match TcpListener::bind(key.0).await {
                        Ok(l) => tokio::spawn(serve_tcp(l, shared.clone(), connections.clone())),
                        Err(e) => {
                            tracing::debug!(addr = %key.0, %e, "cannot listen for a service");
                            failed = true;
                            continue;
                        }
                    },
                    _ => match UdpSocket::bind(key.0).await {
                        Ok(s) => tokio::spawn(serve_udp(s, shared.clone())),
                        Err(e) => {
                            tracing::debug!(addr = %key.0, %e, "cannot listen for a service");
                            failed = true;
                            continue;
                        }
                    },
                };
                guard.0.insert(key, Listener { shared, task });
            }
            let result = if failed { "error" } else { "ok" };
            metrics.proxy_syncs.with_label_values(&[result]).inc();
            metrics
                .proxy_sync_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.proxy_rules.set(guard.0.len() as i64);
        }
        // A listener that could not bind is tried again after a while, else at the next
        // change.
        let wait = if failed {
            RETRY
        } else {
            Duration::from_secs(3600)
        };
        services::changed(&mut changes, wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::reflector::Change;
    use serde_json::json;

    #[test]
    fn listeners_follow_ready_endpoints() {
        let mut t = Tables::default();
        t.services_changed(Change::Listed(vec![
            json!({"metadata": {"namespace": "a", "name": "web"},
                   "spec": {"clusterIP": "127.96.0.5", "type": "NodePort", "sessionAffinity": "ClientIP",
                            "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                                      {"name": "dns", "port": 53, "protocol": "UDP"},
                                      {"name": "sctp", "port": 9, "protocol": "SCTP"}]}}),
            json!({"metadata": {"namespace": "a", "name": "idle"},
                   "spec": {"clusterIP": "127.96.0.6", "ports": [{"port": 80}]}}),
        ]));
        t.slices_changed(Change::Listed(vec![json!({
            "metadata": {"namespace": "a", "name": "web-1",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": ["127.101.0.2"]},
                          {"addresses": ["127.101.0.3"], "conditions": {"ready": false}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}]})]));
        let p = plan(&t, Some("127.0.0.1".parse().unwrap()));
        let keys: Vec<String> = p.keys().map(|(a, proto)| format!("{proto} {a}")).collect();
        assert_eq!(
            keys,
            [
                "tcp 127.0.0.1:30080",
                "udp 127.96.0.5:53",
                "tcp 127.96.0.5:80"
            ]
        );
        let web = &p[&("127.96.0.5:80".parse().unwrap(), "tcp".into())];
        assert_eq!(
            web.endpoints,
            ["127.101.0.2:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(web.affinity_seconds, Some(10800));
        // Affinity: the same client keeps its backend.
        let shared = Shared {
            target: RwLock::new(Target {
                endpoints: vec![
                    "127.0.0.2:1".parse().unwrap(),
                    "127.0.0.3:1".parse().unwrap(),
                ],
                affinity_seconds: Some(60),
            }),
            affinity: Mutex::default(),
            next: std::sync::atomic::AtomicUsize::new(0),
        };
        let client: IpAddr = "127.9.9.9".parse().unwrap();
        let first = shared.choose(client)[0];
        shared.used(client, first);
        for _ in 0..5 {
            assert_eq!(shared.choose(client)[0], first);
        }
        // Another client rotates.
        let other: IpAddr = "127.9.9.8".parse().unwrap();
        let picks: std::collections::BTreeSet<_> =
            (0..4).map(|_| shared.choose(other)[0]).collect();
        assert_eq!(picks.len(), 2);
    }
}
