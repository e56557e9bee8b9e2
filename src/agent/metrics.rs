//! The agent's Prometheus metrics, served at `/metrics` on its `--listen` address.
//!
//! Owns one registry per agent process. Counters are updated where the events happen (the
//! sync loop, the heartbeat, the pod workers); nothing here blocks.

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every agent metric.
pub struct AgentMetrics {
    registry: Registry,
    /// Pods with a worker on this node.
    pub pods: IntGauge,
    /// Containers started, by result (`ok`, `error`).
    pub container_starts: IntCounterVec,
    /// Containers that ended, by reason (`Completed`, `Error`, `OOMKilled`).
    pub container_exits: IntCounterVec,
    /// Probe tries, by probe and result.
    pub probes: IntCounterVec,
    /// Pod watches that ended and were reopened, by why (`ended`, `error`, `expired`).
    pub watch_restarts: IntCounterVec,
    /// Lease renewals, by result.
    pub lease_renewals: IntCounterVec,
    /// Cluster DNS queries, by how they were answered.
    pub dns_queries: IntCounterVec,
    /// Pod status writes, by result.
    pub status_writes: IntCounterVec,
    /// From a pod's worker starting to all its containers running.
    pub pod_start_seconds: Histogram,
    /// Containers by state (`running`, `waiting`, `terminated`).
    pub containers: IntGaugeVec,
    /// Runtime operations (`start`, `exec`, `remove_pod`) by how long they took.
    pub runtime_seconds: HistogramVec,
    /// Runtime operations that failed.
    pub runtime_errors: IntCounterVec,
    /// Lease renewals by how long they took.
    pub lease_seconds: Histogram,
    /// Service proxy rule syncs, by result.
    pub proxy_syncs: IntCounterVec,
    /// Service proxy rule syncs by how long they took (from the cache change seen to the
    /// rules written).
    pub proxy_sync_seconds: Histogram,
    /// Service proxy rules in place.
    pub proxy_rules: IntGauge,
    /// Moves from one control-plane replica to the next.
    pub api_failovers: IntCounter,
    /// The replica in use (1) among those it was given (0).
    pub api_server: IntGaugeVec,
    /// Per-container resource use, served apart at `/metrics/resource` (as the kubelet
    /// does, for metrics-server), so `/metrics` keeps no per-object labels.
    resource_registry: Registry,
    /// CPU used by each running container (namespace, pod, container), from its runtime.
    pub container_cpu: CounterVec,
    /// Each running container's memory working set, bytes.
    pub container_memory: GaugeVec,
    /// The node is registered and its pods have been listed once (what `/readyz` reports).
    synced: std::sync::atomic::AtomicBool,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

impl Default for AgentMetrics {
    fn default() -> AgentMetrics {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// A fresh registry with every metric (and the process collector).
    pub fn new() -> AgentMetrics {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once");
        let pods = IntGauge::new("flotilla_agent_pods", "Pods with a worker on this node.")
            .expect("valid metric");
        registry
            .register(Box::new(pods.clone()))
            .expect("registered once");
        let pod_start_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "flotilla_agent_pod_start_seconds",
                "From a pod's worker starting to all its containers running.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(pod_start_seconds.clone()))
            .expect("registered once");
        let labels = ["namespace", "pod", "container"];
        let resource_registry = Registry::new();
        let container_cpu = CounterVec::new(
            Opts::new(
                "container_cpu_usage_seconds_total",
                "Cumulative cpu time consumed by the container in core-seconds",
            ),
            &labels,
        )
        .expect("valid metric");
        resource_registry
            .register(Box::new(container_cpu.clone()))
            .expect("registered once");
        let container_memory = GaugeVec::new(
            Opts::new(
                "container_memory_working_set_bytes",
                "Current working set of the container in bytes",
            ),
            &labels,
        )
        .expect("valid metric");
        resource_registry
            .register(Box::new(container_memory.clone()))
            .expect("registered once");
        let containers = IntGaugeVec::new(
            Opts::new("flotilla_agent_containers", "Containers by state."),
            &["state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(containers.clone()))
            .expect("registered once");
        let runtime_seconds = HistogramVec::new(
            HistogramOpts::new(
                "flotilla_agent_runtime_operation_seconds",
                "Container runtime operations by how long they took.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["operation"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(runtime_seconds.clone()))
            .expect("registered once");
        let lease_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "flotilla_agent_lease_renew_seconds",
                "Lease renewals (heartbeats) by how long they took.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(lease_seconds.clone()))
            .expect("registered once");
        let proxy_sync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "flotilla_agent_proxy_sync_seconds",
                "Service proxy rule syncs by how long they took, from the change seen to the rules written.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(proxy_sync_seconds.clone()))
            .expect("registered once");
        let proxy_rules = IntGauge::new(
            "flotilla_agent_proxy_rules",
            "Service proxy iptables rules in place.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(proxy_rules.clone()))
            .expect("registered once");
        let api_failovers = IntCounter::new(
            "flotilla_agent_api_failovers_total",
            "Moves from one control-plane replica to the next.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(api_failovers.clone()))
            .expect("registered once");
        let api_server = IntGaugeVec::new(
            Opts::new(
                "flotilla_agent_api_server",
                "1 for the control-plane replica in use, 0 for the others it was given.",
            ),
            &["server"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(api_server.clone()))
            .expect("registered once");
        let m = AgentMetrics {
            runtime_errors: counter(
                &registry,
                "flotilla_agent_runtime_errors_total",
                "Container runtime operations that failed.",
                &["operation"],
            ),
            containers,
            runtime_seconds,
            lease_seconds,
            proxy_sync_seconds,
            proxy_rules,
            proxy_syncs: counter(
                &registry,
                "flotilla_agent_proxy_syncs_total",
                "Service proxy rule syncs, by result.",
                &["result"],
            ),
            api_failovers,
            api_server,
            resource_registry,
            container_cpu,
            container_memory,
            container_starts: counter(
                &registry,
                "flotilla_agent_container_starts_total",
                "Containers started, by result.",
                &["result"],
            ),
            container_exits: counter(
                &registry,
                "flotilla_agent_container_exits_total",
                "Containers that ended, by reason.",
                &["reason"],
            ),
            probes: counter(
                &registry,
                "flotilla_agent_probes_total",
                "Probe tries, by probe and result.",
                &["probe", "result"],
            ),
            dns_queries: counter(
                &registry,
                "flotilla_agent_dns_queries_total",
                "Cluster DNS queries, by how they were answered (cluster, nodata, nxdomain, not_synced, forwarded, upstream_failed, refused).",
                &["answer"],
            ),
            watch_restarts: counter(
                &registry,
                "flotilla_agent_watch_restarts_total",
                "Watches (of pods, services, endpoint slices) that ended and were reopened, by why.",
                &["resource", "reason"],
            ),
            lease_renewals: counter(
                &registry,
                "flotilla_agent_lease_renewals_total",
                "Lease renewals, by result.",
                &["result"],
            ),
            status_writes: counter(
                &registry,
                "flotilla_agent_pod_status_writes_total",
                "Pod status writes, by result.",
                &["result"],
            ),
            pods,
            pod_start_seconds,
            registry,
            synced: std::sync::atomic::AtomicBool::new(false),
        };
        // Known label values start at zero, so queries and alerts see the series at once.
        for result in ["ok", "error"] {
            m.container_starts.with_label_values(&[result]);
            m.lease_renewals.with_label_values(&[result]);
            m.status_writes.with_label_values(&[result]);
        }
        for reason in ["Completed", "Error", "OOMKilled"] {
            m.container_exits.with_label_values(&[reason]);
        }
        for state in super::pod::STATES {
            m.containers.with_label_values(&[state]);
        }
        for kind in super::dns::Kind::ALL {
            m.dns_queries.with_label_values(&[kind.label()]);
        }
        for why in ["ended", "error", "expired"] {
            m.watch_restarts.with_label_values(&["pods", why]);
        }
        m
    }

    /// Marks the agent ready (registered, pods listed).
    pub fn set_synced(&self) {
        self.synced
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the agent is ready.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        encode(&self.registry)
    }

    /// The per-container resource exposition (`/metrics/resource`).
    pub fn render_resource(&self) -> String {
        encode(&self.resource_registry)
    }
}

fn encode(r: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&r.gather(), &mut out)
        .expect("encoding into a Vec cannot fail");
    String::from_utf8(out).expect("the exposition is UTF-8")
}

impl AgentMetrics {}
