//! The cluster DNS server each agent runs (the seed's CoreDNS, `kubernetes` plugin, in
//! its default `pods insecure` mode), answering from the agent's Service/EndpointSlice cache
//! ([`super::services`]) on UDP and TCP, and forwarding every other name to the resolvers of
//! the agent's `--resolv-conf`.
//!
//! Why per agent and not per replica: a pod's queries stay on its node (no hop to the control
//! plane, no load on the replicas that grows with pods), and a node keeps resolving from its
//! cache while replicas fail or the network to them is cut, catching up from any replica
//! afterwards — the reason node-local DNS caches exist in Kubernetes.
//!
//! Names in the cluster domain (`cluster.local` by default), as CoreDNS answers them:
//! - `<svc>.<ns>.svc.<domain>`: A/AAAA of the cluster IPs; for a headless service, of its
//!   ready endpoints (NXDOMAIN when it has none); a CNAME for an ExternalName service; SRV
//!   for every port (headless: one per ready endpoint and port, targets
//!   `<endpoint>.<svc>.<ns>.svc.<domain>` with their addresses as additional records);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>`: SRV of that named port (A/AAAA as the
//!   service);
//! - `<endpoint>.<svc>.<ns>.svc.<domain>`: a headless service's ready endpoint, by
//!   `hostname` or dashed address;
//! - `<a-b-c-d>.<ns>.pod.<domain>`: the address written in the name;
//! - reverse (`in-addr.arpa`, `ip6.arpa`) of a cluster IP or a headless endpoint: PTR;
//!   other reverse names are forwarded.
//!
//! A name that exists with no record of the asked type gets NODATA (NOERROR, empty answer);
//! one that does not exist gets NXDOMAIN; both carry the zone's SOA so resolvers cache the
//! negative answer for [`TTL`] seconds. Until the cache has listed Services and
//! EndpointSlices once, names in the domain get SERVFAIL (never a cached "does not exist").
//!
//! Bounds: forwarded queries in flight ([`MAX_FORWARDS`], beyond it SERVFAIL), TCP
//! connections ([`MAX_TCP`]), idle TCP connections close after [`TCP_IDLE`], an upstream
//! gets [`UPSTREAM_TIMEOUT`] before the next is tried. A UDP answer larger than the
//! client's payload size (512 bytes without EDNS) is sent truncated (TC), so the client
//! retries over TCP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::services::{self, Cache, Service, Tables};

/// Seconds answers (and negative answers) may be cached, as CoreDNS's default.
pub const TTL: u32 = 5;
/// Most forwarded queries in flight.
pub const MAX_FORWARDS: usize = 512;
/// Most open TCP connections.
pub const MAX_TCP: usize = 256;
/// An idle TCP connection is closed after this.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long one upstream gets to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// The payload size this server advertises over EDNS.
const EDNS_PAYLOAD: u16 = 1232;

/// How a query was answered (the `answer` label of `flotilla_agent_dns_queries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A name in the cluster domain, with records.
    Cluster,
    /// A name in the cluster domain that exists, without records of the type.
    NoData,
    /// A name in the cluster domain that does not exist.
    NxDomain,
    /// The cache has not been listed yet.
    NotSynced,
    /// Forwarded upstream and answered.
    Forwarded,
    /// Forwarding failed (no upstream answered, or too many in flight).
    UpstreamFailed,
    /// Not a query this server answers (malformed, not QUERY, not IN, several questions).
    Refused,
}

impl Kind {
    /// Every kind, as metric labels.
    pub const ALL: [Kind; 7] = [
        Kind::Cluster,
        Kind::NoData,
        Kind::NxDomain,
        Kind::NotSynced,
        Kind::Forwarded,
        Kind::UpstreamFailed,
        Kind::Refused,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Cluster => "cluster",
            Kind::NoData => "nodata",
            Kind::NxDomain => "nxdomain",
            Kind::NotSynced => "not_synced",
            Kind::Forwarded => "forwarded",
            Kind::UpstreamFailed => "upstream_failed",
            Kind::Refused => "refused",
        }
    }
}

/// What to do with a query.
#[derive(Debug)]
pub enum Outcome {
    /// Send this answer.
    Answer(Message, Kind),
    /// Not ours: forward it.
    Forward,
}

/// What a name in the zone resolves to: `None` is NXDOMAIN; no answers is NODATA.
#[derive(Default)]
struct Found {
    answers: Vec<Record>,
    additionals: Vec<Record>,
}

/// The DNS server's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The cluster domain, lowercase, without the trailing dot (`cluster.local`).
    pub domain: String,
    /// Upstream resolvers for other names (port 53).
    pub upstreams: Vec<IpAddr>,
}

/// The `nameserver` addresses of a resolv.conf, less `exclude` (this server itself).
pub fn upstreams(resolv_conf: &str, exclude: IpAddr) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .filter(|ip| *ip != exclude)
        .collect()
}

fn fqdn(s: &str) -> Name {
    Name::from_ascii(format!("{s}.")).unwrap_or_else(|_| Name::root())
}

fn address_records(name: &Name, ips: &[IpAddr], qtype: RecordType) -> Vec<Record> {
    ips.iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|r| Record::from_rdata(name.clone(), TTL, r))
        .collect()
}

/// An endpoint's name under its service: its hostname, or its address dashed.
fn endpoint_label(ip: &IpAddr, hostname: &Option<String>) -> String {
    match hostname {
        Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
        _ => ip.to_string().replace([':', '.'], "-"),
    }
}

/// A headless service's ready endpoints as (label, address), each address once.
fn ready_endpoints(t: &Tables, ns: &str, svc: &str) -> Vec<(String, IpAddr)> {
    let mut seen = std::collections::BTreeMap::new();
    for e in t.slices_of(ns, svc).flat_map(|s| &s.endpoints) {
        if e.ready {
            seen.entry(e.ip)
                .or_insert_with(|| endpoint_label(&e.ip, &e.hostname));
        }
    }
    seen.into_iter().map(|(ip, l)| (l, ip)).collect()
}

/// The ports SRV records name for a service: a cluster-IP service's own ports; a headless
/// service's endpoint ports.
fn srv_ports(t: &Tables, ns: &str, svc: &str, s: &Service) -> Vec<services::Port> {
    if !s.headless {
        return s.ports.clone();
    }
    let mut ports: Vec<services::Port> = Vec::new();
    for p in t.slices_of(ns, svc).flat_map(|s| &s.ports) {
        if !ports.contains(p) {
            ports.push(p.clone());
        }
    }
    ports
}

/// A service's own records (its name, or a named port's name for A/AAAA).
fn service_records(
    t: &Tables,
    domain: &str,
    ns: &str,
    svc: &str,
    name: &Name,
    qtype: RecordType,
    port: Option<(&str, &str)>,
) -> Option<Found> {
    let s = t.service(ns, svc)?;
    if let Some(target) = &s.external_name {
        return Some(Found {
            answers: vec![Record::from_rdata(
                name.clone(),
                TTL,
                RData::CNAME(CNAME(fqdn(target))),
            )],
            additionals: Vec::new(),
        });
    }
    let endpoints = if s.headless {
        let e = ready_endpoints(t, ns, svc);
        if e.is_empty() {
            return None;
        }
        e
    } else {
        Vec::new()
    };
    let ports: Vec<services::Port> = srv_ports(t, ns, svc, s)
        .into_iter()
        .filter(|p| match port {
            None => true,
            Some((pname, proto)) => {
                p.name.eq_ignore_ascii_case(pname) && p.protocol.eq_ignore_ascii_case(proto)
            }
        })
        .collect();
    if port.is_some() && ports.is_empty() {
        return None;
    }
    let service_name = format!("{svc}.{ns}.svc.{domain}");
    let mut f = Found::default();
    match qtype {
        RecordType::SRV => {
            let n = if s.headless { endpoints.len() } else { 1 };
            let weight = u16::try_from(100 / n.max(1)).unwrap_or(1).max(1);
            for p in &ports {
                if s.headless {
                    for (label, ip) in &endpoints {
                        let target = fqdn(&format!("{label}.{service_name}"));
                        f.answers.push(Record::from_rdata(
                            name.clone(),
                            TTL,
                            RData::SRV(SRV::new(0, weight, p.port, target.clone())),
                        ));
                        f.additionals
                            .extend(address_records(&target, &[*ip], RecordType::ANY));
                    }
                } else {
                    let target = fqdn(&service_name);
                    f.answers.push(Record::from_rdata(
                        name.clone(),
                        TTL,
                        RData::SRV(SRV::new(0, 100, p.port, target.clone())),
                    ));
                    f.additionals
                        .extend(address_records(&target, &s.cluster_ips, RecordType::ANY));
                }
            }
            // The same target's address once.
            f.additionals.dedup();
        }
        _ => {
            let ips: Vec<IpAddr> = if s.headless {
                endpoints.iter().map(|(_, ip)| *ip).collect()
            } else {
                s.cluster_ips.clone()
            };
            f.answers = address_records(name, &ips, qtype);
        }
    }
    Some(f)
}

/// Parses a dashed address (`10-0-0-1`, or an IPv6 address with `-` for `:`).
fn dashed(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// Resolves `labels` (the name's labels before the domain, last first) in the zone.
fn lookup(
    t: &Tables,
    domain: &str,
    labels: &[&str],
    name: &Name,
    qtype: RecordType,
) -> Option<Found> {
    match labels {
        [] => {
            let mut f = Found::default();
            if qtype == RecordType::SOA {
                f.answers.push(soa(t, domain));
            }
            Some(f)
        }
        ["svc"] | ["pod"] | ["pod", _] => Some(Found::default()),
        ["svc", ns] => t.has_namespace(ns).then(Found::default),
        ["svc", ns, svc] => service_records(t, domain, ns, svc, name, qtype, None),
        ["svc", ns, svc, proto, port] if proto.starts_with('_') && port.starts_with('_') => {
            service_records(
                t,
                domain,
                ns,
                svc,
                name,
                qtype,
                Some((&port[1..], &proto[1..])),
            )
        }
        ["svc", ns, svc, endpoint] if !endpoint.starts_with('_') => {
            let s = t.service(ns, svc)?;
            if !s.headless {
                return None;
            }
            let ips: Vec<IpAddr> = ready_endpoints(t, ns, svc)
                .into_iter()
                .filter(|(l, _)| l == endpoint)
                .map(|(_, ip)| ip)
                .collect();
            if ips.is_empty() {
                return None;
            }
            Some(Found {
                answers: address_records(name, &ips, qtype),
                additionals: Vec::new(),
            })
        }
        ["pod", _ns, addr] => {
            let ip = dashed(addr)?;
            Some(Found {
                answers: address_records(name, &[ip], qtype),
                additionals: Vec::new(),
            })
        }
        _ => None,
    }
}

/// The zone's SOA record.
fn soa(t: &Tables, domain: &str) -> Record {
    Record::from_rdata(
        fqdn(domain),
        TTL,
        RData::SOA(SOA::new(
            fqdn(&format!("ns.dns.{domain}")),
            fqdn(&format!("hostmaster.{domain}")),
            t.version,
            7200,
            1800,
            86400,
            TTL,
        )),
    )
}

/// The PTR target for a cluster IP or a headless service's ready endpoint, if one has it.
/// (A scan of the services: reverse lookups are rare.)
fn reverse(t: &Tables, domain: &str, ip: IpAddr) -> Option<String> {
    for (ns, svc, s) in t.services() {
        if s.cluster_ips.contains(&ip) {
            return Some(format!("{svc}.{ns}.svc.{domain}"));
        }
    }
    for (ns, svc, s) in t.services() {
        if s.headless {
            if let Some((label, _)) = ready_endpoints(t, ns, svc)
                .into_iter()
                .find(|(_, e)| *e == ip)
            {
                return Some(format!("{label}.{svc}.{ns}.svc.{domain}"));
            }
        }
    }
    None
}

/// The response header for `req` (no records yet).
fn response(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::new();
    m.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    m.add_queries(req.queries().iter().cloned());
    if req.extensions().is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(e);
    }
    m
}

/// Decides what to do with a query: the pure core of the server.
pub fn resolve(t: &Tables, domain: &str, req: &Message) -> Outcome {
    let refuse = |code| Outcome::Answer(response(req, code), Kind::Refused);
    if req.message_type() != MessageType::Query {
        return refuse(ResponseCode::FormErr);
    }
    if req.op_code() != OpCode::Query {
        return refuse(ResponseCode::NotImp);
    }
    let [q] = req.queries() else {
        return refuse(ResponseCode::FormErr);
    };
    let name = q.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    if name.ends_with(".in-addr.arpa") || name.ends_with(".ip6.arpa") {
        let target = q
            .name()
            .parse_arpa_name()
            .ok()
            .filter(|net| net.prefix_len() == net.max_prefix_len())
            .and_then(|net| reverse(t, domain, net.addr()));
        return match target {
            Some(target) if q.query_type() == RecordType::PTR => {
                let mut m = response(req, ResponseCode::NoError);
                m.set_authoritative(true);
                m.add_answer(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::PTR(PTR(fqdn(&target))),
                ));
                Outcome::Answer(m, Kind::Cluster)
            }
            Some(_) => {
                let mut m = response(req, ResponseCode::NoError);
                m.add_name_server(soa(t, domain));
                Outcome::Answer(m, Kind::NoData)
            }
            None => Outcome::Forward,
        };
    }
    let labels: Vec<&str> = if name == domain {
        Vec::new()
    } else if let Some(prefix) = name.strip_suffix(domain).and_then(|p| p.strip_suffix('.')) {
        prefix.rsplit('.').collect()
    } else {
        return Outcome::Forward;
    };
    if q.query_class() != DNSClass::IN {
        return refuse(ResponseCode::Refused);
    }
    if !t.synced() {
        return Outcome::Answer(response(req, ResponseCode::ServFail), Kind::NotSynced);
    }
    match lookup(t, domain, &labels, q.name(), q.query_type()) {
        Some(f) => {
            let mut m = response(req, ResponseCode::NoError);
            m.set_authoritative(true);
            let kind = if f.answers.is_empty() {
                m.add_name_server(soa(t, domain));
                Kind::NoData
            } else {
                Kind::Cluster
            };
            m.add_answers(f.answers);
            m.add_additionals(f.additionals);
            Outcome::Answer(m, kind)
        }
        None => {
            let mut m = response(req, ResponseCode::NXDomain);
            m.set_authoritative(true);
            m.add_name_server(soa(t, domain));
            Outcome::Answer(m, Kind::NxDomain)
        }
    }
}

/// Encodes an answer for a UDP client: truncated (TC, no records) if it exceeds the
/// client's payload size.
fn encode_udp(req: &Message, m: &Message) -> Option<Vec<u8>> {
    let limit = match req.extensions() {
        Some(e) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
        None => 512,
    };
    let bytes = m.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    m.truncate().to_vec().ok()
}

/// What a query needs next.
enum Step {
    /// Its answer (`None`: nothing to answer, not even an id).
    Done(Option<Vec<u8>>),
    /// A name outside the cluster: ask an upstream.
    Forward(Message),
}

/// The running server's shared state.
struct Server {
    cache: Cache,
    config: Config,
    forwards: Semaphore,
    queries: prometheus::IntCounterVec,
}

impl Server {
    /// Answers `bytes` (a query): `None` drops it (not even a header to answer).
    async fn handle(&self, bytes: &[u8], tcp: bool) -> Option<Vec<u8>> {
        match self.answer(bytes, tcp) {
            Step::Done(answer) => answer,
            Step::Forward(req) => self.forwarded(&req, bytes, tcp).await,
        }
    }

    /// Answers `bytes` from the cache at once, or says it must be forwarded.
    fn answer(&self, bytes: &[u8], tcp: bool) -> Step {
        let req = match Message::from_vec(bytes) {
            Ok(r) => r,
            Err(_) => {
                self.count(Kind::Refused);
                // Answer FORMERR if at least the id is there.
                let formerr = || {
                    let id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
                    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                        .to_vec()
                        .ok()
                };
                return Step::Done(formerr());
            }
        };
        let outcome = {
            let t = services::read(&self.cache);
            resolve(&t, &self.config.domain, &req)
        };
        match outcome {
            Outcome::Answer(m, kind) => Step::Done(self.encode(&req, &m, kind, tcp)),
            Outcome::Forward => Step::Forward(req),
        }
    }

    /// The upstream's answer to `req` (whose bytes are `bytes`), or SERVFAIL.
    async fn forwarded(&self, req: &Message, bytes: &[u8], tcp: bool) -> Option<Vec<u8>> {
        match self.forward(bytes, tcp).await {
            Some(answer) => {
                self.count(Kind::Forwarded);
                Some(answer)
            }
            None => {
                let m = response(req, ResponseCode::ServFail);
                self.encode(req, &m, Kind::UpstreamFailed, tcp)
            }
        }
    }

    /// Counts an answer and encodes it for its transport.
    fn encode(&self, req: &Message, m: &Message, kind: Kind, tcp: bool) -> Option<Vec<u8>> {
        self.count(kind);
        if tcp {
            m.to_vec().ok()
        } else {
            encode_udp(req, m)
        }
    }

    fn count(&self, kind: Kind) {
        self.queries.with_label_values(&[kind.label()]).inc();
    }

    /// Sends the query to each upstream in turn until one answers.
    async fn forward(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let _permit = self.forwards.try_acquire().ok()?;
        for up in &self.config.upstreams {
            let addr = SocketAddr::new(*up, 53);
            let r = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                if tcp {
                    forward_tcp(addr, query).await
                } else {
                    forward_udp(addr, query).await
                }
            })
            .await;
            match r {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(e)) => tracing::debug!(%addr, %e, "upstream DNS failed"),
                Err(_) => tracing::debug!(%addr, "upstream DNS timed out"),
            }
        }
        None
    }
}

async fn forward_udp(addr: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(addr).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Only the answer to this query (same id).
        if n >= 2 && buf[..2] == query[..2] {
            return Ok(buf[..n].to_vec());
        }
    }
}

async fn forward_tcp(addr: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(query).await?;
    read_frame(&mut s).await
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Binds UDP and TCP on `addr` and serves forever.
pub async fn serve(
    addr: SocketAddr,
    cache: Cache,
    config: Config,
    queries: prometheus::IntCounterVec,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use anyhow::Context;
    let udp = Arc::new(
        UdpSocket::bind(addr)
            .await
            .with_context(|| format!("DNS on udp {addr}"))?,
    );
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("DNS on tcp {addr}"))?;
    let server = Arc::new(Server {
        cache,
        config,
        forwards: Semaphore::new(MAX_FORWARDS),
        queries,
    });
    let udp_loop = {
        let server = server.clone();
        async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let (n, peer) = match udp.recv_from(&mut buf).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(%e, "DNS receive");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Cluster names are answered here, at once; a forwarded one waits on its
                // upstream in its own task (bounded by the forward permits).
                match server.answer(&buf[..n], false) {
                    Step::Done(Some(answer)) => {
                        let _ = udp.send_to(&answer, peer).await;
                    }
                    Step::Done(None) => {}
                    Step::Forward(req) => {
                        let (query, server, udp) = (buf[..n].to_vec(), server.clone(), udp.clone());
                        tokio::spawn(async move {
                            if let Some(answer) = server.forwarded(&req, &query, false).await {
                                let _ = udp.send_to(&answer, peer).await;
                            }
                        });
                    }
                }
            }
        }
    };
    let tcp_loop = async move {
        let connections = Arc::new(Semaphore::new(MAX_TCP));
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                continue; // Dropped: too many connections.
            };
            let server = server.clone();
            tokio::spawn(async move {
                let _permit = permit;
                while let Ok(Ok(query)) =
                    tokio::time::timeout(TCP_IDLE, read_frame(&mut stream)).await
                {
                    let Some(answer) = server.handle(&query, true).await else {
                        return;
                    };
                    let Ok(len) = u16::try_from(answer.len()) else {
                        return;
                    };
                    if stream.write_all(&len.to_be_bytes()).await.is_err()
                        || stream.write_all(&answer).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    };
    Ok(async move {
        tokio::join!(udp_loop, tcp_loop);
    })
}

/// A pod's resolver configuration (its `resolv.conf`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDns {
    /// `nameserver` lines (at most 3).
    pub servers: Vec<String>,
    /// The `search` list (at most 32 domains).
    pub searches: Vec<String>,
    /// `options` (`ndots:5`, ...).
    pub options: Vec<String>,
}

impl PodDns {
    /// The `resolv.conf` text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for s in &self.servers {
            out.push_str(&format!("nameserver {s}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }

    /// Parses a host's resolv.conf (`nameserver`, `search`/`domain`, `options`).
    pub fn parse(text: &str) -> PodDns {
        let mut d = PodDns::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => d.servers.extend(words.next().map(str::to_string)),
                Some("search") | Some("domain") => {
                    d.searches = words.map(str::to_string).collect();
                }
                Some("options") => d.options.extend(words.map(str::to_string)),
                _ => {}
            }
        }
        d
    }
}

/// A pod's DNS configuration, as the kubelet derives it from `dnsPolicy` and `dnsConfig`:
/// `ClusterFirst` (the default) gets the cluster DNS `cluster` (its address and domain) with
/// the search path `<ns>.svc.<domain> svc.<domain> <domain>` and `ndots:5`, falling back to
/// the host's configuration for a `hostNetwork` pod (unless `ClusterFirstWithHostNet`) or
/// when no cluster DNS is configured; `Default` gets the host's (`host`, a resolv.conf's
/// text); `None` only what `dnsConfig` says. `dnsConfig` is merged in: nameservers and
/// search domains appended (de-duplicated, at most 3 and 32), options replaced by name.
pub fn pod_config(pod: &serde_json::Value, cluster: Option<(IpAddr, &str)>, host: &str) -> PodDns {
    use serde_json::Value;
    let spec = pod.get("spec");
    let policy = spec
        .and_then(|s| s.get("dnsPolicy"))
        .and_then(Value::as_str)
        .unwrap_or("ClusterFirst");
    let host_network = spec
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        == Some(true);
    let ns = crate::controllers::owner::namespace(pod).unwrap_or("default");
    let host = PodDns::parse(host);
    let mut d = match (policy, cluster) {
        ("None", _) => PodDns::default(),
        ("ClusterFirst", Some(_)) if host_network => host,
        ("ClusterFirst" | "ClusterFirstWithHostNet", Some((ip, domain))) => PodDns {
            servers: vec![ip.to_string()],
            searches: [
                format!("{ns}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_string(),
            ]
            .into_iter()
            .chain(host.searches)
            .collect(),
            options: vec!["ndots:5".into()],
        },
        _ => host,
    };
    let extra = spec.and_then(|s| s.get("dnsConfig"));
    let strings = |k: &str| -> Vec<String> {
        extra
            .and_then(|c| c.get(k))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    };
    for s in strings("nameservers") {
        if !d.servers.contains(&s) {
            d.servers.push(s);
        }
    }
    for s in strings("searches") {
        if !d.searches.contains(&s) {
            d.searches.push(s);
        }
    }
    d.servers.truncate(3);
    d.searches.truncate(32);
    for o in extra
        .and_then(|c| c.get("options"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = o.get("name").and_then(Value::as_str) else {
            continue;
        };
        let option = match o.get("value").and_then(Value::as_str) {
            Some(v) => format!("{name}:{v}"),
            None => name.to_string(),
        };
        d.options.retain(|x| x.split(':').next() != Some(name));
        d.options.push(option);
    }
    d
}

/// A query for `name` and `qtype` (for tests and tools).
pub fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(fqdn(name.trim_end_matches('.')), qtype));
    m.to_vec().expect("a query encodes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::reflector::Change;
    use serde_json::json;

    fn tables() -> Tables {
        let mut t = Tables::default();
        t.services_changed(Change::Listed(vec![
            json!({"metadata": {"namespace": "default", "name": "web"},
                   "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                      {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
            json!({"metadata": {"namespace": "default", "name": "db"},
                   "spec": {"clusterIP": "None", "clusterIPs": ["None"],
                            "ports": [{"name": "pg", "port": 5432}]}}),
            json!({"metadata": {"namespace": "default", "name": "empty"},
                   "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}),
            json!({"metadata": {"namespace": "default", "name": "ext"},
                   "spec": {"type": "ExternalName", "externalName": "example.org."}}),
        ]));
        t.slices_changed(Change::Listed(vec![json!({
            "metadata": {"namespace": "default", "name": "db-x",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "endpoints": [
                {"addresses": ["10.1.0.1"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": false}}],
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]
        })]));
        t
    }

    fn ask(t: &Tables, name: &str, qtype: RecordType) -> Option<(Message, Kind)> {
        let req = Message::from_vec(&query(7, name, qtype)).unwrap();
        match resolve(t, "cluster.local", &req) {
            Outcome::Answer(m, k) => {
                assert_eq!(m.id(), 7);
                Some((m, k))
            }
            Outcome::Forward => None,
        }
    }

    fn data(m: &Message) -> Vec<String> {
        let mut v: Vec<String> = m.answers().iter().map(|r| r.data().to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn services_resolve_as_coredns_answers() {
        let t = tables();
        let (m, k) = ask(&t, "web.default.svc.cluster.local", RecordType::A).unwrap();
        assert_eq!(
            (k, m.response_code()),
            (Kind::Cluster, ResponseCode::NoError)
        );
        assert!(m.authoritative());
        assert_eq!(data(&m), ["10.96.0.10"]);
        assert_eq!(m.answers()[0].ttl(), TTL);
        // Case is kept in the answer's name (0x20 randomisation).
        let (m, _) = ask(&t, "WeB.default.svc.cluster.local", RecordType::A).unwrap();
        assert_eq!(
            m.answers()[0].name().to_ascii(),
            "WeB.default.svc.cluster.local."
        );
        // Headless: the ready endpoints only.
        let (m, _) = ask(&t, "db.default.svc.cluster.local", RecordType::A).unwrap();
        assert_eq!(data(&m), ["10.1.0.1", "10.1.0.2"]);
        let (m, _) = ask(&t, "db-0.db.default.svc.cluster.local", RecordType::A).unwrap();
        assert_eq!(data(&m), ["10.1.0.1"]);
        let (m, _) = ask(&t, "10-1-0-2.db.default.svc.cluster.local", RecordType::A).unwrap();
        assert_eq!(data(&m), ["10.1.0.2"]);
        let (m, k) = ask(&t, "10-1-0-3.db.default.svc.cluster.local", RecordType::A).unwrap();
        assert_eq!(
            (k, m.response_code()),
            (Kind::NxDomain, ResponseCode::NXDomain),
            "not ready"
        );
        // A headless service without ready endpoints does not exist (CoreDNS).
        let (_, k) = ask(&t, "empty.default.svc.cluster.local", RecordType::A).unwrap();
        assert_eq!(k, Kind::NxDomain);
        // ExternalName: a CNAME whatever the type.
        let (m, _) = ask(&t, "ext.default.svc.cluster.local", RecordType::A).unwrap();
        assert_eq!(data(&m), ["example.org."]);
        assert_eq!(m.answers()[0].record_type(), RecordType::CNAME);
    }

    #[test]
    fn srv_names_ports_and_targets() {
        let t = tables();
        let (m, _) = ask(
            &t,
            "_http._tcp.web.default.svc.cluster.local",
            RecordType::SRV,
        )
        .unwrap();
        assert_eq!(data(&m), ["0 100 80 web.default.svc.cluster.local."]);
        assert_eq!(m.additionals()[0].data().to_string(), "10.96.0.10");
        let (m, _) = ask(
            &t,
            "_dns._udp.web.default.svc.cluster.local",
            RecordType::SRV,
        )
        .unwrap();
        assert_eq!(data(&m), ["0 100 53 web.default.svc.cluster.local."]);
        let (_, k) = ask(
            &t,
            "_dns._tcp.web.default.svc.cluster.local",
            RecordType::SRV,
        )
        .unwrap();
        assert_eq!(k, Kind::NxDomain, "no such port and protocol");
        // A named port's name also answers A, as the service.
        let (m, _) = ask(
            &t,
            "_http._tcp.web.default.svc.cluster.local",
            RecordType::A,
        )
        .unwrap();
        assert_eq!(data(&m), ["10.96.0.10"]);
        // Every port on the service name.
        let (m, _) = ask(&t, "web.default.svc.cluster.local", RecordType::SRV).unwrap();
        assert_eq!(m.answers().len(), 2);
        // Headless: one per ready endpoint, targets named by hostname or address.
        let (m, _) = ask(&t, "_pg._tcp.db.default.svc.cluster.local", RecordType::SRV).unwrap();
        assert_eq!(
            data(&m),
            [
                "0 50 5432 10-1-0-2.db.default.svc.cluster.local.",
                "0 50 5432 db-0.db.default.svc.cluster.local."
            ]
        );
        assert_eq!(m.additionals().len(), 2);
    }

    #[test]
    fn nodata_and_nxdomain_are_told_apart() {
        let t = tables();
        for (name, qtype, kind) in [
            (
                "web.default.svc.cluster.local",
                RecordType::AAAA,
                Kind::NoData,
            ),
            (
                "web.default.svc.cluster.local",
                RecordType::TXT,
                Kind::NoData,
            ),
            ("default.svc.cluster.local", RecordType::A, Kind::NoData),
            ("svc.cluster.local", RecordType::A, Kind::NoData),
            ("cluster.local", RecordType::A, Kind::NoData),
            (
                "nope.default.svc.cluster.local",
                RecordType::A,
                Kind::NxDomain,
            ),
            ("nope.svc.cluster.local", RecordType::A, Kind::NxDomain),
            // The search path's first tries for a short name.
            (
                "web.default.svc.cluster.local.default.svc.cluster.local",
                RecordType::A,
                Kind::NxDomain,
            ),
            ("x.y.z.cluster.local", RecordType::A, Kind::NxDomain),
            (
                "a-b.default.pod.cluster.local",
                RecordType::A,
                Kind::NxDomain,
            ),
        ] {
            let (m, k) = ask(&t, name, qtype).unwrap();
            assert_eq!(k, kind, "{name} {qtype}");
            let code = if kind == Kind::NoData {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            assert_eq!(m.response_code(), code, "{name}");
            assert!(m.answers().is_empty(), "{name}");
            assert_eq!(
                m.name_servers()[0].record_type(),
                RecordType::SOA,
                "{name}: SOA for negative caching"
            );
        }
        let (m, _) = ask(&t, "cluster.local", RecordType::SOA).unwrap();
        assert_eq!(m.answers()[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn pods_reverse_and_forwarding() {
        let t = tables();
        let (m, _) = ask(&t, "10-244-1-7.default.pod.cluster.local", RecordType::A).unwrap();
        assert_eq!(data(&m), ["10.244.1.7"]);
        let (m, _) = ask(&t, "10.0.96.10.in-addr.arpa", RecordType::PTR).unwrap();
        assert_eq!(data(&m), ["web.default.svc.cluster.local."]);
        let (m, _) = ask(&t, "1.0.1.10.in-addr.arpa", RecordType::PTR).unwrap();
        assert_eq!(data(&m), ["db-0.db.default.svc.cluster.local."]);
        assert!(
            ask(&t, "9.9.9.9.in-addr.arpa", RecordType::PTR).is_none(),
            "forwarded"
        );
        assert!(ask(&t, "example.org", RecordType::A).is_none(), "forwarded");
        assert!(
            ask(&t, "notcluster.local", RecordType::A).is_none(),
            "not in the zone"
        );
        // Not synced yet: SERVFAIL, never a negative answer.
        let (m, k) = ask(
            &Tables::default(),
            "web.default.svc.cluster.local",
            RecordType::A,
        )
        .unwrap();
        assert_eq!(
            (k, m.response_code()),
            (Kind::NotSynced, ResponseCode::ServFail)
        );
    }

    #[test]
    fn big_udp_answers_are_truncated() {
        let mut t = tables();
        let endpoints: Vec<_> = (0..100)
            .map(|i| json!({"addresses": [format!("10.2.0.{i}")], "conditions": {"ready": true}}))
            .collect();
        t.slices_changed(Change::Applied(json!({
            "metadata": {"namespace": "default", "name": "db-y",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "endpoints": endpoints, "ports": []})));
        let req =
            Message::from_vec(&query(9, "db.default.svc.cluster.local", RecordType::A)).unwrap();
        let Outcome::Answer(m, _) = resolve(&t, "cluster.local", &req) else {
            panic!("ours");
        };
        assert_eq!(m.answers().len(), 102);
        let udp = Message::from_vec(&encode_udp(&req, &m).unwrap()).unwrap();
        assert!(udp.truncated() && udp.answers().is_empty());
        assert_eq!(udp.id(), 9);
    }

    #[test]
    fn pods_get_the_kubelets_dns_configuration() {
        let host = "search corp.example\nnameserver 192.0.2.1\noptions edns0\n";
        let cluster = Some(("127.53.0.1".parse().unwrap(), "cluster.local"));
        let pod =
            |spec: serde_json::Value| json!({"metadata": {"namespace": "team"}, "spec": spec});
        let d = pod_config(&pod(json!({})), cluster, host);
        assert_eq!(
            d.render(),
            "search team.svc.cluster.local svc.cluster.local cluster.local corp.example\n\
             nameserver 127.53.0.1\noptions ndots:5\n"
        );
        // Host network falls back to the host's, unless ClusterFirstWithHostNet.
        assert_eq!(
            pod_config(&pod(json!({"hostNetwork": true})), cluster, host).render(),
            host
        );
        let d = pod_config(
            &pod(json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"})),
            cluster,
            host,
        );
        assert_eq!(d.servers, ["127.53.0.1"]);
        // No cluster DNS: the host's.
        assert_eq!(pod_config(&pod(json!({})), None, host).render(), host);
        assert_eq!(
            pod_config(&pod(json!({"dnsPolicy": "Default"})), cluster, host).render(),
            host
        );
        // None: dnsConfig alone; options replace by name.
        let d = pod_config(
            &pod(json!({"dnsPolicy": "None", "dnsConfig": {
                "nameservers": ["192.0.2.9"], "searches": ["a.example"],
                "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}]}})),
            cluster,
            host,
        );
        assert_eq!(
            d.render(),
            "search a.example\nnameserver 192.0.2.9\noptions ndots:2 rotate\n"
        );
        let d = pod_config(
            &pod(
                json!({"dnsConfig": {"nameservers": ["127.53.0.1", "192.0.2.9"],
                                      "options": [{"name": "ndots", "value": "1"}]}}),
            ),
            cluster,
            host,
        );
        assert_eq!(d.servers, ["127.53.0.1", "192.0.2.9"], "no duplicate");
        assert_eq!(d.options, ["ndots:1"]);
    }

    #[tokio::test]
    async fn garbage_gets_formerr_and_an_unreachable_outside_gets_servfail() {
        let queries =
            prometheus::IntCounterVec::new(prometheus::Opts::new("q", "q"), &["answer"]).unwrap();
        let server = Server {
            cache: Cache::default(),
            config: Config {
                domain: "cluster.local".into(),
                upstreams: Vec::new(),
            },
            forwards: Semaphore::new(MAX_FORWARDS),
            queries: queries.clone(),
        };
        let formerr =
            Message::from_vec(&server.handle(&[0x12, 0x34, 0xff], false).await.unwrap()).unwrap();
        assert_eq!(
            (formerr.id(), formerr.response_code()),
            (0x1234, ResponseCode::FormErr)
        );
        assert!(
            server.handle(&[0x12], false).await.is_none(),
            "not even an id"
        );
        // No upstream answers (none configured; or every forward permit taken): SERVFAIL.
        let q = query(5, "example.org", RecordType::A);
        let m = Message::from_vec(&server.handle(&q, false).await.unwrap()).unwrap();
        assert_eq!((m.id(), m.response_code()), (5, ResponseCode::ServFail));
        let _all = server
            .forwards
            .acquire_many(MAX_FORWARDS as u32)
            .await
            .unwrap();
        let m = Message::from_vec(&server.handle(&q, true).await.unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::ServFail);
        assert_eq!(queries.with_label_values(&["refused"]).get(), 2);
        assert_eq!(queries.with_label_values(&["upstream_failed"]).get(), 2);
    }

    #[test]
    fn upstreams_come_from_resolv_conf() {
        let conf = "# c\nsearch x\nnameserver 127.0.0.53\nnameserver  10.0.0.2 \noptions ndots:1\nnameserver bad\n";
        assert_eq!(
            upstreams(conf, "127.0.0.53".parse().unwrap()),
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
    }
}
