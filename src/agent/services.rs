//! The agent's view of Services and their EndpointSlices, kept by two reflectors; what the
//! cluster DNS ([`super::dns`]) answers from and what a pod's `<SVC>_SERVICE_HOST`
//! environment is built from.
//!
//! Owns the cache and nothing else: it is written only by the reflectors' callbacks and read
//! under a short lock (never across an `.await`). Invariants: a service's slices are
//! indexed under the name in their `kubernetes.io/service-name` label; a relist replaces a
//! whole table, so nothing deleted while the agent was not watching survives it; until both
//! tables have been listed once the cache reports itself unsynced, and its readers answer
//! "not yet" rather than "does not exist".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use super::api::Api;
use super::reflector::{self, Change, Target};
use crate::controllers::owner;

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Its name (may be empty for a service's only port).
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// The port number.
    pub port: u16,
    /// A service port's node port, if it has one.
    pub node_port: Option<u16>,
}

/// What the agent keeps of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Its cluster IPs (empty for a headless or ExternalName service).
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    /// `type: ExternalName`: the name it aliases.
    pub external_name: Option<String>,
    /// Its ports.
    pub ports: Vec<Port>,
    /// `sessionAffinity: ClientIP`: how long a client sticks to its endpoint, seconds.
    pub affinity_seconds: Option<u32>,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its address.
    pub ip: IpAddr,
    /// `hostname` (a StatefulSet pod's), if set.
    pub hostname: Option<String>,
    /// `conditions.ready` (unset counts as ready).
    pub ready: bool,
}

/// What the agent keeps of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// The service it belongs to.
    pub service: String,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Its ports (target ports, by service port name).
    pub ports: Vec<Port>,
}

/// Services and slices by namespace and name.
#[derive(Debug, Default)]
pub struct Tables {
    services: HashMap<(String, String), Service>,
    slices: HashMap<(String, String), Slice>,
    /// (namespace, service) → its slices' names.
    by_service: HashMap<(String, String), BTreeSet<String>>,
    /// Namespaces with at least one service, with how many.
    namespaces: HashMap<String, usize>,
    services_listed: bool,
    slices_listed: bool,
    /// Bumped on every change (the DNS zone's SOA serial).
    pub version: u32,
}

impl Tables {
    /// Both tables have been listed once.
    pub fn synced(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// A service.
    pub fn service(&self, ns: &str, name: &str) -> Option<&Service> {
        self.services.get(&(ns.to_string(), name.to_string()))
    }

    /// Whether any service lives in `ns`.
    pub fn has_namespace(&self, ns: &str) -> bool {
        self.namespaces.contains_key(ns)
    }

    /// The services of a namespace, by name.
    pub fn services_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = (&'a str, &'a Service)> {
        self.services
            .iter()
            .filter(move |((n, _), _)| n == ns)
            .map(|((_, name), s)| (name.as_str(), s))
    }

    /// Every service, as (namespace, name, service).
    pub fn services(&self) -> impl Iterator<Item = (&str, &str, &Service)> {
        self.services
            .iter()
            .map(|((ns, name), s)| (ns.as_str(), name.as_str(), s))
    }

    /// The slices of a service.
    pub fn slices_of<'a>(&'a self, ns: &'a str, service: &str) -> impl Iterator<Item = &'a Slice> {
        self.by_service
            .get(&(ns.to_string(), service.to_string()))
            .into_iter()
            .flatten()
            .filter_map(move |s| self.slices.get(&(ns.to_string(), s.clone())))
    }

    fn put_service(&mut self, ns: String, name: String, s: Option<Service>) {
        let key = (ns, name);
        let had = match s {
            Some(s) => self.services.insert(key.clone(), s).is_some(),
            None => {
                let had = self.services.remove(&key).is_some();
                if had {
                    self.forget_namespace(&key.0);
                }
                self.version = self.version.wrapping_add(1);
                return;
            }
        };
        if !had {
            *self.namespaces.entry(key.0).or_default() += 1;
        }
        self.version = self.version.wrapping_add(1);
    }

    fn forget_namespace(&mut self, ns: &str) {
        if let Some(n) = self.namespaces.get_mut(ns) {
            *n -= 1;
            if *n == 0 {
                self.namespaces.remove(ns);
            }
        }
    }

    fn put_slice(&mut self, ns: String, name: String, s: Option<Slice>) {
        let key = (ns, name);
        if let Some(old) = self.slices.remove(&key) {
            let owner = (key.0.clone(), old.service);
            if let Some(set) = self.by_service.get_mut(&owner) {
                set.remove(&key.1);
                if set.is_empty() {
                    self.by_service.remove(&owner);
                }
            }
        }
        if let Some(s) = s {
            self.by_service
                .entry((key.0.clone(), s.service.clone()))
                .or_default()
                .insert(key.1.clone());
            self.slices.insert(key, s);
        }
        self.version = self.version.wrapping_add(1);
    }

    /// Applies a change to the services table.
    pub fn services_changed(&mut self, change: Change) {
        match change {
            Change::Listed(items) => {
                self.services.clear();
                self.namespaces.clear();
                for o in &items {
                    let (ns, name) = key(o);
                    self.put_service(ns, name, Some(service(o)));
                }
                self.services_listed = true;
            }
            Change::Applied(o) => {
                let (ns, name) = key(&o);
                self.put_service(ns, name, Some(service(&o)));
            }
            Change::Deleted(o) => {
                let (ns, name) = key(&o);
                self.put_service(ns, name, None);
            }
        }
    }

    /// Applies a change to the slices table.
    pub fn slices_changed(&mut self, change: Change) {
        match change {
            Change::Listed(items) => {
                self.slices.clear();
                self.by_service.clear();
                for o in &items {
                    let (ns, name) = key(o);
                    self.put_slice(ns, name, slice(o));
                }
                self.slices_listed = true;
            }
            Change::Applied(o) => {
                let (ns, name) = key(&o);
                self.put_slice(ns, name, slice(&o));
            }
            Change::Deleted(o) => {
                let (ns, name) = key(&o);
                self.put_slice(ns, name, None);
            }
        }
    }
}

fn key(o: &Value) -> (String, String) {
    (
        owner::namespace(o).unwrap_or("default").to_string(),
        owner::name(o).to_string(),
    )
}

fn ports(list: Option<&Value>) -> Vec<Port> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(Port {
                name: p
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                protocol: p
                    .get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_string(),
                port: u16::try_from(p.get("port")?.as_u64()?).ok()?,
                node_port: p
                    .get("nodePort")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n > 0),
            })
        })
        .collect()
}

/// What the agent keeps of a Service object.
pub fn service(o: &Value) -> Service {
    let spec = o.get("spec");
    let field = |k: &str| spec.and_then(|s| s.get(k));
    let mut ips: Vec<String> = field("clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    if ips.is_empty() {
        ips.extend(
            field("clusterIP")
                .and_then(Value::as_str)
                .map(str::to_string),
        );
    }
    let headless = ips.iter().any(|ip| ip == "None");
    let external_name = (field("type").and_then(Value::as_str) == Some("ExternalName"))
        .then(|| field("externalName").and_then(Value::as_str))
        .flatten()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
    Service {
        cluster_ips: ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
        headless,
        external_name,
        ports: ports(field("ports")),
        affinity_seconds: (field("sessionAffinity").and_then(Value::as_str) == Some("ClientIP"))
            .then(|| {
                spec.and_then(|s| s.pointer("/sessionAffinityConfig/clientIP/timeoutSeconds"))
                    .and_then(Value::as_u64)
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(10800)
            }),
    }
}

/// What the agent keeps of an EndpointSlice object (`None` without its service label).
pub fn slice(o: &Value) -> Option<Slice> {
    let service = o
        .pointer("/metadata/labels/kubernetes.io~1service-name")
        .and_then(Value::as_str)?
        .to_string();
    let endpoints = o
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|e| {
            let ready = e.pointer("/conditions/ready").and_then(Value::as_bool) != Some(false);
            let hostname = e
                .get("hostname")
                .and_then(Value::as_str)
                .map(str::to_string);
            e.get("addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str()?.parse().ok())
                .map(move |ip| Endpoint {
                    ip,
                    hostname: hostname.clone(),
                    ready,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    Some(Slice {
        service,
        endpoints,
        ports: ports(o.get("ports")),
    })
}

/// The tables, shared by their writers (the reflectors) and readers, with a change
/// signal readers can wait on.
pub struct Shared {
    tables: RwLock<Tables>,
    changes: tokio::sync::watch::Sender<()>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            tables: RwLock::default(),
            changes: tokio::sync::watch::channel(()).0,
        }
    }
}

impl Shared {
    /// A receiver that turns changed after each change of the tables.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    fn apply(&self, f: impl FnOnce(&mut Tables)) {
        f(&mut self.tables.write().unwrap_or_else(|p| p.into_inner()));
        self.changes.send_replace(());
    }
}

/// The shared cache.
pub type Cache = Arc<Shared>;

/// Runs the two reflectors that keep `cache` (forever).
pub async fn run(api: Arc<Api>, cache: Cache, restarts: prometheus::IntCounterVec) {
    let services = {
        let cache = cache.clone();
        reflector::run(
            api.clone(),
            Target {
                path: "/api/v1/services",
                query: "",
                resource: "services",
            },
            restarts.clone(),
            move |c| cache.apply(|t| t.services_changed(c)),
        )
    };
    let slices = reflector::run(
        api,
        Target {
            path: "/apis/discovery.k8s.io/v1/endpointslices",
            query: "",
            resource: "endpointslices",
        },
        restarts,
        move |c| cache.apply(|t| t.slices_changed(c)),
    );
    tokio::join!(services, slices);
}

/// Waits for the next change signalled on `rx` (one that happened since it last waited
/// counts), or `timeout`.
pub async fn changed(rx: &mut tokio::sync::watch::Receiver<()>, timeout: std::time::Duration) {
    match tokio::time::timeout(timeout, rx.changed()).await {
        Ok(Ok(())) | Err(_) => {}
        // The cache is gone (the agent is stopping): nothing will change again.
        Ok(Err(_)) => tokio::time::sleep(timeout).await,
    }
}

/// The cache, for reading (a panicked writer's state is still the last consistent one:
/// each change is applied whole before the lock is released).
pub fn read(cache: &Cache) -> std::sync::RwLockReadGuard<'_, Tables> {
    cache.tables.read().unwrap_or_else(|p| p.into_inner())
}

/// The Kubernetes service environment of a pod in `ns` (what the kubelet sets when
/// `enableServiceLinks` is on): for each service of the namespace with a cluster IP,
/// `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT`, `<NAME>_SERVICE_PORT_<PORT NAME>` and the
/// Docker-link style `<NAME>_PORT*` variables; `None` until the services have been listed.
pub fn environment(t: &Tables, ns: &str) -> Option<Vec<(String, String)>> {
    if !t.services_listed {
        return None;
    }
    let sorted: BTreeMap<&str, &Service> = t.services_in(ns).collect();
    let mut env = Vec::new();
    for (name, s) in sorted {
        let Some(ip) = s.cluster_ips.first() else {
            continue;
        };
        let Some(first) = s.ports.first() else {
            continue;
        };
        let prefix = name.to_ascii_uppercase().replace('-', "_");
        env.push((format!("{prefix}_SERVICE_HOST"), ip.to_string()));
        env.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for p in &s.ports {
            if !p.name.is_empty() {
                env.push((
                    format!(
                        "{prefix}_SERVICE_PORT_{}",
                        p.name.to_ascii_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        let host = match ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        let proto = first.protocol.to_ascii_lowercase();
        env.push((
            format!("{prefix}_PORT"),
            format!("{proto}://{host}:{}", first.port),
        ));
        for p in &s.ports {
            let proto = p.protocol.to_ascii_lowercase();
            let var = format!(
                "{prefix}_PORT_{}_{}",
                p.port,
                p.protocol.to_ascii_uppercase()
            );
            env.push((var.clone(), format!("{proto}://{host}:{}", p.port)));
            env.push((format!("{var}_PROTO"), proto));
            env.push((format!("{var}_PORT"), p.port.to_string()));
            env.push((format!("{var}_ADDR"), ip.to_string()));
        }
    }
    Some(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ns: &str, name: &str, ip: &str, ports: Value) -> Value {
        json!({"metadata": {"namespace": ns, "name": name},
               "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports}})
    }

    #[test]
    fn environment_follows_the_kubelet() {
        let mut t = Tables::default();
        assert_eq!(environment(&t, "default"), None, "not listed yet");
        t.services_changed(Change::Listed(vec![
            svc(
                "default",
                "web-front",
                "10.96.0.5",
                json!([{"name": "http", "port": 80, "protocol": "TCP"},
                       {"name": "dns-udp", "port": 53, "protocol": "UDP"}]),
            ),
            svc("default", "headless", "None", json!([{"port": 80}])),
            svc("other", "db", "10.96.0.9", json!([{"port": 5432}])),
        ]));
        let env = environment(&t, "default").unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("WEB_FRONT_SERVICE_HOST"), Some("10.96.0.5"));
        assert_eq!(get("WEB_FRONT_SERVICE_PORT"), Some("80"));
        assert_eq!(get("WEB_FRONT_SERVICE_PORT_HTTP"), Some("80"));
        assert_eq!(get("WEB_FRONT_SERVICE_PORT_DNS_UDP"), Some("53"));
        assert_eq!(get("WEB_FRONT_PORT"), Some("tcp://10.96.0.5:80"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP"), Some("udp://10.96.0.5:53"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP_PROTO"), Some("udp"));
        assert_eq!(get("WEB_FRONT_PORT_80_TCP_ADDR"), Some("10.96.0.5"));
        assert!(get("HEADLESS_SERVICE_HOST").is_none(), "no cluster IP");
        assert!(get("DB_SERVICE_HOST").is_none(), "another namespace");
    }

    #[test]
    fn slices_index_under_their_service_and_relists_replace() {
        let mut t = Tables::default();
        let sl = |name: &str, svc: &str, ip: &str, ready: bool| {
            json!({"metadata": {"namespace": "ns", "name": name,
                                "labels": {"kubernetes.io/service-name": svc}},
                   "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}],
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
        };
        t.slices_changed(Change::Listed(vec![
            sl("web-a", "web", "127.0.0.2", true),
            sl("web-b", "web", "127.0.0.3", false),
        ]));
        assert!(!t.synced(), "services not listed yet");
        let eps: Vec<_> = t
            .slices_of("ns", "web")
            .flat_map(|s| &s.endpoints)
            .collect();
        assert_eq!(eps.len(), 2);
        assert!(
            !eps.iter()
                .find(|e| e.ip.to_string() == "127.0.0.3")
                .unwrap()
                .ready
        );
        // A slice moving to another service leaves the first one's index.
        t.slices_changed(Change::Applied(sl("web-b", "api", "127.0.0.3", true)));
        assert_eq!(t.slices_of("ns", "web").count(), 1);
        assert_eq!(t.slices_of("ns", "api").count(), 1);
        t.slices_changed(Change::Deleted(sl("web-a", "web", "127.0.0.2", true)));
        assert_eq!(t.slices_of("ns", "web").count(), 0);
        t.slices_changed(Change::Listed(vec![]));
        assert_eq!(t.slices_of("ns", "api").count(), 0, "a relist replaces all");
        t.services_changed(Change::Listed(vec![svc(
            "ns",
            "web",
            "10.0.0.1",
            json!([]),
        )]));
        assert!(t.synced());
        assert!(t.has_namespace("ns"));
        t.services_changed(Change::Deleted(svc("ns", "web", "10.0.0.1", json!([]))));
        assert!(!t.has_namespace("ns"));
    }
}
