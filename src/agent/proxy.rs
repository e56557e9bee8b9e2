//! The service proxy each agent runs with `--proxy-mode iptables` (kube-proxy's iptables
//! mode): traffic to a Service's cluster IP and port, or to a node port on any local
//! address, is DNAT-ed by the kernel to one of the Service's ready endpoints, chosen at
//! random (`statistic`), or kept on the client's previous endpoint with `sessionAffinity:
//! ClientIP` (`recent`). A service port without ready endpoints is rejected (connection
//! refused) instead of hanging.
//!
//! Owns the iptables chains named after this agent (`FL<6 hex>-...`: a hash of its node
//! name and data directory, so several agents on one machine never touch each other's
//! rules), hooked from `nat` `OUTPUT`, `PREROUTING` and `POSTROUTING` and `filter` `INPUT`,
//! `FORWARD` and `OUTPUT` (so pods on a bridge are proxied as the node's own processes are).
//! A connection DNAT-ed back to the pod it came from (a pod reaching itself through its
//! Service) is masqueraded, as kube-proxy's hairpin rule does: its packets carry the mark
//! [`HAIRPIN_MARK`] from the endpoint chain to `POSTROUTING`. Invariants:
//! - the rules are a pure function of the Service/EndpointSlice cache ([`plan`]); a sync
//!   replaces every chain of this agent in one `iptables-restore` per table (atomic: a
//!   connection sees the old rules or the new ones), deleting chains no longer planned;
//! - only ready endpoints are in the rules, so an endpoint that turns not ready gets no new
//!   connection once the rules are synced (established ones keep their conntrack entry, as
//!   with kube-proxy);
//! - a cache change starts a sync at once (one `iptables-restore` for both tables); every
//!   [`RESYNC`] the rules are written again whatever changed and the hooks checked
//!   (repairing a flush by hand);
//! - on a clean stop every rule and chain of this agent is removed.
//!
//! IPv4 only: IPv6 cluster IPs are not programmed.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::services::{self, Cache, Port, Tables};

/// How soon a failed sync is tried again.
pub const RETRY: Duration = Duration::from_secs(1);
/// How often the rules are rewritten even without a change.
pub const RESYNC: Duration = Duration::from_secs(60);
/// The longest one iptables command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A stable 64-bit hash (FNV-1a) for chain names.
fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// This agent's chain prefix: `FL` and 6 hex digits of its node name and data directory.
pub fn prefix(node: &str, data_dir: &std::path::Path) -> String {
    format!(
        "FL{:06x}",
        hash(&format!("{node}\0{}", data_dir.display())) & 0xff_ffff
    )
}

/// The rules for one table: the chains (each flushed and refilled) and their rules.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    /// Every chain of this agent in the table.
    pub chains: BTreeSet<String>,
    /// `-A` lines.
    pub rules: Vec<String>,
}

/// The whole rule set: `nat` and `filter`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// DNAT to endpoints.
    pub nat: Table,
    /// REJECT of service ports without endpoints.
    pub filter: Table,
}

/// The entry chain of a table.
pub fn services_chain(prefix: &str) -> String {
    format!("{prefix}-SVCS")
}

/// The `nat` `POSTROUTING` chain: masquerades hairpin connections.
fn postrouting_chain(prefix: &str) -> String {
    format!("{prefix}-POST")
}

/// The packet mark bit of a hairpin connection (kube-proxy's masquerade mark is 0x4000).
pub const HAIRPIN_MARK: &str = "0x2000";

fn nodeports_chain(prefix: &str) -> String {
    format!("{prefix}-NODEPORTS")
}

/// The ready endpoints (address, target port) of a service port, sorted, each once: the
/// slice port with the service port's name and protocol gives the number.
pub fn endpoints(t: &Tables, ns: &str, svc: &str, port: &Port) -> Vec<(IpAddr, u16)> {
    let mut out = BTreeSet::new();
    for s in t.slices_of(ns, svc) {
        let Some(p) = s
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol.eq_ignore_ascii_case(&port.protocol))
        else {
            continue;
        };
        for e in s.endpoints.iter().filter(|e| e.ready) {
            out.insert((e.ip, p.port));
        }
    }
    out.into_iter().collect()
}

/// What the rules are made for.
#[derive(Debug, Clone)]
pub struct Options {
    /// This agent's chain prefix ([`prefix`]).
    pub prefix: String,
    /// Where node ports are served (`a.b.c.d/n`, kube-proxy's `--nodeport-addresses`);
    /// empty: every local address.
    pub node_port_addresses: Vec<String>,
}

/// The match of a node port's destination: each configured range, or any local address.
fn node_port_destinations(o: &Options) -> Vec<String> {
    if o.node_port_addresses.is_empty() {
        vec!["-m addrtype --dst-type LOCAL".to_string()]
    } else {
        o.node_port_addresses
            .iter()
            .map(|c| format!("-d {c}"))
            .collect()
    }
}

/// The rules for the cache's state: the pure core of the proxy.
pub fn plan(t: &Tables, o: &Options) -> Plan {
    let prefix = o.prefix.as_str();
    let local = node_port_destinations(o);
    let mut nat = Table::default();
    let mut filter = Table::default();
    let svcs = services_chain(prefix);
    let nodeports = nodeports_chain(prefix);
    nat.chains.insert(svcs.clone());
    nat.chains.insert(nodeports.clone());
    let post = postrouting_chain(prefix);
    nat.chains.insert(post.clone());
    nat.rules.extend([
        format!("-A {post} -m mark ! --mark {HAIRPIN_MARK}/{HAIRPIN_MARK} -j RETURN"),
        format!("-A {post} -j MARK --xor-mark {HAIRPIN_MARK}"),
        format!("-A {post} -m comment --comment \"hairpin to a service\" -j MASQUERADE"),
    ]);
    filter.chains.insert(svcs.clone());
    let mut services: Vec<(&str, &str, &services::Service)> = t.services().collect();
    services.sort_by_key(|(ns, name, _)| (*ns, *name));
    let mut node_port_rules = Vec::new();
    for (ns, name, s) in services {
        let ips: Vec<IpAddr> = s
            .cluster_ips
            .iter()
            .copied()
            .filter(IpAddr::is_ipv4)
            .collect();
        if s.headless || s.external_name.is_some() || ips.is_empty() {
            continue;
        }
        for port in &s.ports {
            let proto = port.protocol.to_ascii_lowercase();
            let comment = format!("{ns}/{name}:{}", port.name);
            let eps = endpoints(t, ns, name, port);
            if eps.is_empty() {
                for ip in &ips {
                    filter.rules.push(format!(
                        "-A {svcs} -d {ip}/32 -p {proto} -m {proto} --dport {} -m comment --comment \"{comment} has no endpoints\" -j REJECT --reject-with icmp-port-unreachable",
                        port.port
                    ));
                }
                if let Some(np) = port.node_port {
                    for dst in &local {
                        filter.rules.push(format!(
                            "-A {svcs} {dst} -p {proto} -m {proto} --dport {np} -m comment --comment \"{comment} has no endpoints\" -j REJECT --reject-with icmp-port-unreachable"
                        ));
                    }
                }
                continue;
            }
            let key = format!("{ns}/{name}/{}/{proto}", port.name);
            let chain = format!("{prefix}-S-{:012x}", hash(&key) & 0xffff_ffff_ffff);
            nat.chains.insert(chain.clone());
            for ip in &ips {
                nat.rules.push(format!(
                    "-A {svcs} -d {ip}/32 -p {proto} -m {proto} --dport {} -m comment --comment \"{comment}\" -j {chain}",
                    port.port
                ));
            }
            if let Some(np) = port.node_port {
                node_port_rules.push(format!(
                    "-A {nodeports} -p {proto} -m {proto} --dport {np} -m comment --comment \"{comment}\" -j {chain}"
                ));
            }
            let seps: Vec<(String, String)> = eps
                .iter()
                .map(|(ip, p)| {
                    let dest = format!("{ip}:{p}");
                    let sep = format!(
                        "{prefix}-E-{:012x}",
                        hash(&format!("{key}\0{dest}")) & 0xffff_ffff_ffff
                    );
                    (sep, dest)
                })
                .collect();
            let mut chain_rules = Vec::new();
            if let Some(seconds) = s.affinity_seconds {
                for (sep, _) in &seps {
                    chain_rules.push(format!(
                        "-A {chain} -m recent --name {sep} --mask 255.255.255.255 --rsource --rcheck --seconds {seconds} --reap -j {sep}"
                    ));
                }
            }
            let n = seps.len();
            for (i, (sep, dest)) in seps.iter().enumerate() {
                nat.chains.insert(sep.clone());
                if i + 1 < n {
                    chain_rules.push(format!(
                        "-A {chain} -m statistic --mode random --probability {:.10} -j {sep}",
                        1.0 / (n - i) as f64
                    ));
                } else {
                    chain_rules.push(format!("-A {chain} -j {sep}"));
                }
                // An endpoint reaching itself through the service is masqueraded, so the
                // answer comes back through the DNAT.
                let ep_ip = dest.rsplit_once(':').map_or(dest.as_str(), |(ip, _)| ip);
                chain_rules.push(format!(
                    "-A {sep} -s {ep_ip}/32 -j MARK --set-xmark {HAIRPIN_MARK}/{HAIRPIN_MARK}"
                ));
                let mut rule = format!("-A {sep} -p {proto} -m comment --comment \"{comment}\"");
                if s.affinity_seconds.is_some() {
                    let _ = write!(
                        rule,
                        " -m recent --name {sep} --mask 255.255.255.255 --rsource --set"
                    );
                }
                let _ = write!(rule, " -j DNAT --to-destination {dest}");
                chain_rules.push(rule);
            }
            nat.rules.extend(chain_rules);
        }
    }
    // Node ports last: on the node port addresses.
    for dst in &local {
        nat.rules.push(format!("-A {svcs} {dst} -j {nodeports}"));
    }
    nat.rules.extend(node_port_rules);
    Plan { nat, filter }
}

/// The `iptables-restore --noflush` input that makes `table` hold exactly `want` among the
/// chains with `prefix` (`have`: those that exist now).
pub fn restore_input(name: &str, want: &Table, have: &BTreeSet<String>) -> String {
    let mut out = format!("*{name}\n");
    for c in &want.chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    // Chains to delete are flushed first (declared), then deleted after the rules that
    // referenced them are gone.
    let stale: Vec<&String> = have.difference(&want.chains).collect();
    for c in &stale {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for r in &want.rules {
        out.push_str(r);
        out.push('\n');
    }
    for c in &stale {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    out
}

/// Runs a command with `input` on stdin; its stderr on failure.
async fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| format!("{program}: writing its input: {e}"))?;
    }
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} {args:?} took over {COMMAND_TIMEOUT:?}"))?
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The chains with `prefix` that exist in `table`.
async fn existing(table: &str, prefix: &str) -> Result<BTreeSet<String>, String> {
    let text = run("iptables-save", &["-t", table], None).await?;
    let ours = format!("{prefix}-");
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with(&ours))
        .map(str::to_string)
        .collect())
}

/// Where this agent's chains are hooked: (table, built-in chain, this agent's chain).
fn hooks(prefix: &str) -> [(&'static str, &'static str, String); 6] {
    let svcs = services_chain(prefix);
    [
        ("nat", "OUTPUT", svcs.clone()),
        ("nat", "PREROUTING", svcs.clone()),
        ("nat", "POSTROUTING", postrouting_chain(prefix)),
        ("filter", "INPUT", svcs.clone()),
        ("filter", "FORWARD", svcs.clone()),
        ("filter", "OUTPUT", svcs),
    ]
}

/// The proxy of one agent.
pub struct Proxy {
    options: Options,
    prefix: String,
    metrics: std::sync::Arc<super::metrics::AgentMetrics>,
}

impl Proxy {
    /// A proxy owning the chains with `options.prefix`.
    pub fn new(options: Options, metrics: std::sync::Arc<super::metrics::AgentMetrics>) -> Proxy {
        Proxy {
            prefix: options.prefix.clone(),
            options,
            metrics,
        }
    }

    /// Writes `plan`, replacing every chain of this agent, in one `iptables-restore` for
    /// both tables. `have` holds the chains of this agent that exist per table (nat,
    /// filter), read from the kernel when unknown or on a `full` sync, which also checks
    /// the hooks into the built-in chains.
    async fn apply(
        &self,
        plan: &Plan,
        have: &mut Option<(BTreeSet<String>, BTreeSet<String>)>,
        full: bool,
    ) -> Result<(), String> {
        let (nat, filter) = match have.take() {
            Some(h) if !full => h,
            _ => (
                existing("nat", &self.prefix).await?,
                existing("filter", &self.prefix).await?,
            ),
        };
        let input =
            restore_input("nat", &plan.nat, &nat) + &restore_input("filter", &plan.filter, &filter);
        run("iptables-restore", &["-w", "5", "--noflush"], Some(&input)).await?;
        *have = Some((plan.nat.chains.clone(), plan.filter.chains.clone()));
        if full {
            for (table, hook, entry) in hooks(&self.prefix) {
                let rule = ["-w", "5", "-t", table, "-C", hook, "-j", &entry];
                if run("iptables", &rule, None).await.is_err() {
                    let insert = ["-w", "5", "-t", table, "-I", hook, "1", "-j", &entry];
                    run("iptables", &insert, None).await?;
                }
            }
        }
        Ok(())
    }

    /// Removes every rule and chain of this agent.
    pub async fn clean_up(&self) {
        for (table, hook, entry) in hooks(&self.prefix) {
            let rule = ["-w", "5", "-t", table, "-D", hook, "-j", &entry];
            while run("iptables", &rule, None).await.is_ok() {}
        }
        for table in ["nat", "filter"] {
            let Ok(have) = existing(table, &self.prefix).await else {
                continue;
            };
            let input = restore_input(table, &Table::default(), &have);
            if let Err(e) = run("iptables-restore", &["-w", "5", "--noflush"], Some(&input)).await {
                tracing::warn!(%e, table, "removing the proxy's chains");
            }
        }
        tracing::info!(prefix = self.prefix, "removed the service proxy's rules");
    }

    /// Keeps the rules in step with `cache` until cancelled: a sync as soon as the cache
    /// changes (changes during a sync are taken together by the next), and a full one
    /// every [`RESYNC`].
    pub async fn run(&self, cache: Cache) {
        let mut changes = cache.subscribe();
        let mut applied: Option<Plan> = None;
        let mut have = None;
        let mut last_full: Option<Instant> = None;
        loop {
            let full = last_full.is_none_or(|t| t.elapsed() >= RESYNC);
            let started = Instant::now();
            let plan = {
                let t = services::read(&cache);
                t.synced().then(|| plan(&t, &self.options))
            };
            let mut failed = false;
            if let Some(plan) = plan.filter(|p| full || applied.as_ref() != Some(p)) {
                match self.apply(&plan, &mut have, full).await {
                    Ok(()) => {
                        self.metrics.proxy_syncs.with_label_values(&["ok"]).inc();
                        self.metrics
                            .proxy_sync_seconds
                            .observe(started.elapsed().as_secs_f64());
                        self.metrics
                            .proxy_rules
                            .set((plan.nat.rules.len() + plan.filter.rules.len()) as i64);
                        applied = Some(plan);
                        if full {
                            last_full = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        self.metrics.proxy_syncs.with_label_values(&["error"]).inc();
                        tracing::warn!(%e, "syncing the service proxy's rules");
                        have = None;
                        last_full = None;
                        failed = true;
                    }
                }
            }
            let wait = if failed {
                RETRY
            } else {
                RESYNC.saturating_sub(last_full.map_or(Duration::ZERO, |t| t.elapsed()))
            };
            services::changed(&mut changes, wait.max(Duration::from_millis(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::reflector::Change;
    use serde_json::json;

    fn tables(ready: [bool; 3]) -> Tables {
        let mut t = Tables::default();
        t.services_changed(Change::Listed(vec![
            json!({"metadata": {"namespace": "default", "name": "web"},
                   "spec": {"clusterIP": "10.96.0.10", "type": "NodePort",
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}}),
            json!({"metadata": {"namespace": "default", "name": "sticky"},
                   "spec": {"clusterIP": "10.96.0.11", "sessionAffinity": "ClientIP",
                            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                            "ports": [{"port": 53, "protocol": "UDP"}]}}),
            json!({"metadata": {"namespace": "default", "name": "empty"},
                   "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 1}]}}),
            json!({"metadata": {"namespace": "default", "name": "headless"},
                   "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}),
        ]));
        let eps: Vec<_> = ready
            .iter()
            .enumerate()
            .map(|(i, r)| json!({"addresses": [format!("10.1.0.{}", i + 1)], "conditions": {"ready": r}}))
            .collect();
        t.slices_changed(Change::Listed(vec![
            json!({"metadata": {"namespace": "default", "name": "web-a",
                                "labels": {"kubernetes.io/service-name": "web"}},
                   "endpoints": eps,
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
            json!({"metadata": {"namespace": "default", "name": "sticky-a",
                                "labels": {"kubernetes.io/service-name": "sticky"}},
                   "endpoints": [{"addresses": ["10.1.0.9"]}],
                   "ports": [{"name": "", "port": 5353, "protocol": "UDP"}]}),
        ]));
        t
    }

    fn options() -> Options {
        Options {
            prefix: "FLabc123".into(),
            node_port_addresses: Vec::new(),
        }
    }

    #[test]
    fn ready_endpoints_share_the_traffic_and_empty_services_reject() {
        let p = plan(&tables([true, true, true]), &options());
        let rules = p.nat.rules.join("\n");
        // Three endpoints: 1/3, then 1/2, then the rest.
        assert!(rules.contains("--probability 0.3333333333"), "{rules}");
        assert!(rules.contains("--probability 0.5000000000"), "{rules}");
        for i in 1..=3 {
            assert!(
                rules.contains(&format!("--to-destination 10.1.0.{i}:8080")),
                "{rules}"
            );
        }
        assert!(
            rules.contains("-d 10.96.0.10/32 -p tcp -m tcp --dport 80"),
            "{rules}"
        );
        assert!(
            rules.contains("-A FLabc123-NODEPORTS -p tcp -m tcp --dport 30080"),
            "{rules}"
        );
        // ClientIP affinity: the previous endpoint first, recorded on the way in.
        assert!(rules.contains("--rcheck --seconds 60 --reap"), "{rules}");
        assert!(
            rules.contains("--set -j DNAT --to-destination 10.1.0.9:5353"),
            "{rules}"
        );
        assert!(rules.contains("-p udp -m udp --dport 53"), "{rules}");
        // No endpoints: refused, not DNAT-ed; headless services have no rules.
        let filter = p.filter.rules.join("\n");
        assert!(
            filter.contains("-d 10.96.0.12/32 -p tcp -m tcp --dport 1"),
            "{filter}"
        );
        assert!(filter.contains("REJECT"), "{filter}");
        assert!(
            !rules.contains("10.96.0.12") && !rules.contains("headless"),
            "{rules}"
        );
        // Every chain a rule jumps to is declared.
        for r in p.nat.rules.iter() {
            if let Some(target) = r.rsplit("-j ").next().filter(|t| t.starts_with("FL")) {
                assert!(p.nat.chains.contains(target), "{target} undeclared");
            }
        }
        // Deterministic.
        assert_eq!(p, plan(&tables([true, true, true]), &options()));
        // Node ports on the configured addresses only.
        let o = Options {
            node_port_addresses: vec!["127.0.0.0/8".into()],
            ..options()
        };
        let rules = plan(&tables([true, true, true]), &o).nat.rules.join("\n");
        assert!(
            rules.contains("-A FLabc123-SVCS -d 127.0.0.0/8 -j FLabc123-NODEPORTS"),
            "{rules}"
        );
        assert!(!rules.contains("addrtype"), "{rules}");
    }

    #[test]
    fn not_ready_endpoints_leave_the_rules() {
        let p = plan(&tables([true, false, true]), &options());
        let rules = p.nat.rules.join("\n");
        assert!(!rules.contains("10.1.0.2:8080"), "{rules}");
        assert!(rules.contains("--probability 0.5000000000"), "{rules}");
        let none = plan(&tables([false, false, false]), &options());
        assert!(none
            .filter
            .rules
            .iter()
            .any(|r| r.contains("10.96.0.10/32")));
        assert!(none
            .filter
            .rules
            .iter()
            .any(|r| r.contains("--dport 30080")));
    }

    #[test]
    fn a_restore_replaces_this_agents_chains_only() {
        let p = plan(&tables([true, true, true]), &options());
        let have: BTreeSet<String> = ["FLabc123-S-000000000000".to_string()].into();
        let input = restore_input("nat", &p.nat, &have);
        assert!(input.starts_with("*nat\n:FLabc123-"));
        assert!(
            input.ends_with("-X FLabc123-S-000000000000\nCOMMIT\n"),
            "{input}"
        );
        assert!(
            input.contains(":FLabc123-S-000000000000 - [0:0]"),
            "stale chains are flushed first"
        );
        assert_eq!(prefix("n1", "/a".as_ref()), prefix("n1", "/a".as_ref()));
        assert_ne!(prefix("n1", "/a".as_ref()), prefix("n1", "/b".as_ref()));
        assert_eq!(prefix("n1", "/a".as_ref()).len(), 8);
    }
}
