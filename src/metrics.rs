//! Prometheus metrics of a replica, exposed at `/metrics`.
//!
//! Names follow `flotilla_<subsystem>_<name>_<unit>` with `_total` counters and `_seconds` /
//! `_bytes` units. Labels are bounded: verbs and resources from fixed lists, HTTP codes, peer
//! ids (one per member), never keys or object names. Raft and store gauges are read from the
//! replica's status at scrape time, so they cannot drift from the truth. Events are counted
//! with atomics inside the `prometheus` types: nothing here takes a lock on a hot path.

use std::sync::Arc;
use std::time::Instant;

use flotilla_raft::{
    CallError, NodeId, PeerObserver, Replica, ReplicaObserver, SnapshotObserver, Status,
};
use http::{header, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::http::{full, Body};

/// Latency buckets from 100 µs to 10 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The registry and every metric of a replica.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    in_flight: IntGauge,
    watches_open: IntGauge,
    watch_events: IntCounter,
    slow_watchers: IntCounter,
    /// Gauges read from the replica's status at scrape time.
    status_gauges: Vec<(Gauge, ReadStatus)>,
    peer_lag: IntGaugeVec,
    peer_errors: IntCounterVec,
    snapshots_built: IntCounter,
    snapshot_build_seconds: Histogram,
    snapshots_installed: IntCounter,
    snapshot_install_seconds: Histogram,
    log_entries: IntCounter,
    log_bytes: IntCounter,
    fsync_seconds: Histogram,
    fsync_appends: Histogram,
    proposals: IntCounterVec,
    proposed_commands: IntCounter,
    forwarded_commands: IntCounter,
    read_barrier_seconds: HistogramVec,
    leader_changes: IntCounter,
    /// Requests refused with 401.
    pub auth_failures: IntCounter,
    /// Requests refused by a limit (429) or cut off by the request timeout (504), by reason.
    rejected_requests: IntCounterVec,
    /// Lists and watches of cached resources, by where they were served from.
    watch_cache_requests: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).expect("valid metric"))
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid metric"),
    )
}

impl Metrics {
    /// Counts a list or watch of a cached resource served from `from` (cache or store).
    pub fn watch_cache_served(&self, verb: &str, from: &str) {
        self.watch_cache_requests
            .with_label_values(&[verb, from])
            .inc();
    }

    /// Counts a request refused by a limit or cut off by the request timeout.
    pub fn rejected(&self, reason: &str) {
        self.rejected_requests.with_label_values(&[reason]).inc();
    }

    /// The registry (other subsystems register their metrics in it).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Creates and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let build = register(
            &r,
            IntGaugeVec::new(
                Opts::new("flotilla_build_info", "Build information; always 1."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process metrics register once");
        let m = Arc::new(Metrics {
            requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "flotilla_api_requests_total",
                        "API requests by verb, resource and HTTP status code.",
                    ),
                    &["verb", "resource", "code"],
                )
                .expect("valid metric"),
            ),
            request_seconds: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "flotilla_api_request_duration_seconds",
                        "API request latency by verb and resource.",
                    )
                    .buckets(SECONDS.to_vec()),
                    &["verb", "resource"],
                )
                .expect("valid metric"),
            ),
            in_flight: register(
                &r,
                IntGauge::new(
                    "flotilla_api_requests_in_flight",
                    "API requests being served (watch streams count while they open).",
                )
                .expect("valid metric"),
            ),
            watches_open: register(
                &r,
                IntGauge::new("flotilla_api_watches_open", "Open watch streams.")
                    .expect("valid metric"),
            ),
            watch_cache_requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "flotilla_api_watch_cache_requests_total",
                        "Lists and watches of resources the watch cache keeps, by verb and by where they were served from (cache, or store: a consistent list the cache did not catch up with in time, a watch without selectors from before the cache's window). Refusals (429 while a cache loads, 504 too large) are counted by code in flotilla_api_requests_total.",
                    ),
                    &["verb", "served_from"],
                )
                .expect("valid metric"),
            ),
            rejected_requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "flotilla_api_rejected_requests_total",
                        "Kubernetes API requests refused by a limit (429: inflight, client_rate, client_inflight, client_watches) or cut off by the request timeout (504: timeout).",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            auth_failures: counter(
                &r,
                "flotilla_api_authentication_failures_total",
                "API requests refused with 401: no credentials, or ones that do not authenticate.",
            ),
            watch_events: counter(
                &r,
                "flotilla_store_watch_events_sent_total",
                "Watch events sent to clients.",
            ),
            slow_watchers: counter(
                &r,
                "flotilla_store_slow_watcher_cancellations_total",
                "Watchers cancelled for falling behind.",
            ),
            status_gauges: status_gauges(&r),
            peer_lag: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "flotilla_raft_peer_replication_lag_entries",
                        "On the leader: entries each member has yet to replicate.",
                    ),
                    &["peer"],
                )
                .expect("valid metric"),
            ),
            peer_errors: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "flotilla_raft_peer_rpc_errors_total",
                        "Failed peer RPCs by peer and RPC.",
                    ),
                    &["peer", "rpc"],
                )
                .expect("valid metric"),
            ),
            snapshots_built: counter(
                &r,
                "flotilla_raft_snapshots_built_total",
                "Snapshots built.",
            ),
            snapshot_build_seconds: histogram(
                &r,
                "flotilla_raft_snapshot_build_duration_seconds",
                "Time to build a snapshot.",
                SECONDS,
            ),
            snapshots_installed: counter(
                &r,
                "flotilla_raft_snapshots_installed_total",
                "Snapshots installed.",
            ),
            snapshot_install_seconds: histogram(
                &r,
                "flotilla_raft_snapshot_install_duration_seconds",
                "Time to install a snapshot.",
                SECONDS,
            ),
            log_entries: counter(
                &r,
                "flotilla_raft_log_appended_entries_total",
                "Entries written to the Raft log.",
            ),
            log_bytes: counter(
                &r,
                "flotilla_raft_log_appended_bytes_total",
                "Bytes written to the Raft log.",
            ),
            fsync_seconds: histogram(
                &r,
                "flotilla_raft_log_fsync_duration_seconds",
                "Duration of one sync of the Raft log's write-ahead log.",
                SECONDS,
            ),
            fsync_appends: histogram(
                &r,
                "flotilla_raft_log_fsync_appends",
                "Appends made durable by one sync (group commit).",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            ),
            proposals: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "flotilla_raft_proposals_total",
                        "Raft entries proposed by this replica, by result.",
                    ),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            proposed_commands: counter(
                &r,
                "flotilla_raft_proposed_commands_total",
                "Commands carried by the entries this replica proposed.",
            ),
            forwarded_commands: counter(
                &r,
                "flotilla_raft_forwarded_commands_total",
                "Commands this replica forwarded to the leader.",
            ),
            read_barrier_seconds: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "flotilla_api_read_barrier_duration_seconds",
                        "Time for a linearizable read barrier, by result.",
                    )
                    .buckets(SECONDS.to_vec()),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            leader_changes: counter(
                &r,
                "flotilla_raft_leader_changes_total",
                "Changes of leader seen by this replica.",
            ),
            registry: r,
        });
        // Known label values exist from the start, so dashboards and rate() see zeros
        // rather than absent series.
        for result in ["committed", "failed"] {
            m.proposals.with_label_values(&[result]);
        }
        for result in ["ok", "failed"] {
            m.read_barrier_seconds.with_label_values(&[result]);
        }
        m
    }

    /// Counts an API request from its start to its answer; call [`RequestTimer::finish`].
    pub fn start_request(self: &Arc<Self>) -> RequestTimer {
        self.in_flight.inc();
        RequestTimer {
            metrics: self.clone(),
            started: Instant::now(),
            done: false,
        }
    }

    /// A watch stream opened; pair with [`Metrics::watch_guard`].
    pub fn watch_opened(&self) {
        self.watches_open.inc();
    }

    /// Decrements the open-watch gauge when dropped.
    pub fn watch_guard(self: &Arc<Self>) -> impl Drop {
        struct Guard(Arc<Metrics>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.watches_open.dec();
            }
        }
        Guard(self.clone())
    }

    /// Events delivered to a watch stream.
    pub fn watch_events(&self, n: usize) {
        self.watch_events.inc_by(n as u64);
    }

    /// A watcher was cancelled as too slow.
    pub fn slow_watcher(&self) {
        self.slow_watchers.inc();
    }

    /// The text exposition, with Raft and store gauges refreshed from `replica`.
    pub fn render(&self, replica: &Replica) -> Response<Body> {
        let s = replica.status();
        for (gauge, read) in &self.status_gauges {
            gauge.set(read(&s));
        }
        // Every other member's RPC error series exists from the start (at zero), so a rate
        // over it is defined before the first failure.
        for m in s.members.iter().filter(|m| m.id != s.id) {
            for rpc in ["/raft/append", "/raft/vote", "/raft/snapshot"] {
                self.peer_errors
                    .with_label_values(&[&m.id.to_string(), rpc]);
            }
        }
        self.peer_lag.reset();
        if s.state == "leader" {
            for (peer, matched) in &s.replication {
                self.peer_lag
                    .with_label_values(&[&peer.to_string()])
                    .set(s.last_log_index.saturating_sub(*matched) as i64);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
            .body(full(out))
            .expect("static response parts are valid")
    }
}

/// Measures one API request; dropped unfinished (a cancelled request), it still leaves the
/// in-flight gauge.
pub struct RequestTimer {
    metrics: Arc<Metrics>,
    started: Instant,
    done: bool,
}

impl RequestTimer {
    /// Records the request under its labels.
    pub fn finish(mut self, verb: &str, resource: &str, code: u16) {
        self.done = true;
        let m = &self.metrics;
        m.in_flight.dec();
        m.requests
            .with_label_values(&[verb, resource, &code.to_string()])
            .inc();
        m.request_seconds
            .with_label_values(&[verb, resource])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.in_flight.dec();
        }
    }
}

impl PeerObserver for Metrics {
    fn failed(&self, target: NodeId, rpc: &'static str, _error: &CallError) {
        self.peer_errors
            .with_label_values(&[&target.to_string(), rpc])
            .inc();
    }
}

impl SnapshotObserver for Metrics {
    fn built(&self, seconds: f64, _bytes: u64) {
        self.snapshots_built.inc();
        self.snapshot_build_seconds.observe(seconds);
    }
    fn installed(&self, seconds: f64) {
        self.snapshots_installed.inc();
        self.snapshot_install_seconds.observe(seconds);
    }
}

impl ReplicaObserver for Metrics {
    fn proposed(&self, commands: usize, ok: bool) {
        self.proposals
            .with_label_values(&[if ok { "committed" } else { "failed" }])
            .inc();
        self.proposed_commands.inc_by(commands as u64);
    }
    fn forwarded(&self, commands: usize) {
        self.forwarded_commands.inc_by(commands as u64);
    }
    fn read_barrier(&self, seconds: f64, ok: bool) {
        self.read_barrier_seconds
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .observe(seconds);
    }
    fn leader_changed(&self, _term: u64, _leader: Option<NodeId>) {
        self.leader_changes.inc();
    }
}

impl flotilla_store::LogObserver for Metrics {
    fn observe_sync(&self, appends: usize, sync: &mut dyn FnMut()) {
        let started = Instant::now();
        sync();
        self.fsync_seconds.observe(started.elapsed().as_secs_f64());
        self.fsync_appends.observe(appends as f64);
    }
    fn appended(&self, entries: usize, bytes: usize) {
        self.log_entries.inc_by(entries as u64);
        self.log_bytes.inc_by(bytes as u64);
    }
}

/// Reads one figure from a replica's status.
type ReadStatus = fn(&Status) -> f64;

fn status_gauges(r: &Registry) -> Vec<(Gauge, ReadStatus)> {
    let defs: [(&str, &str, ReadStatus); 16] = [
        ("flotilla_raft_term", "Current Raft term.", |s| {
            s.term as f64
        }),
        (
            "flotilla_raft_is_leader",
            "1 if this replica is the leader.",
            |s| f64::from(u8::from(s.state == "leader")),
        ),
        (
            "flotilla_raft_leader_id",
            "The leader this replica knows (0: none).",
            |s| s.leader.unwrap_or(0) as f64,
        ),
        (
            "flotilla_raft_last_log_index",
            "Index of the last log entry.",
            |s| s.last_log_index as f64,
        ),
        (
            "flotilla_raft_commit_index",
            "Highest index known committed.",
            |s| s.commit_index as f64,
        ),
        (
            "flotilla_raft_applied_index",
            "Highest index applied to the state machine.",
            |s| s.applied_index as f64,
        ),
        (
            "flotilla_raft_apply_lag_entries",
            "Committed entries not yet applied.",
            |s| s.commit_index.saturating_sub(s.applied_index) as f64,
        ),
        (
            "flotilla_raft_snapshot_index",
            "Index covered by the newest snapshot.",
            |s| s.snapshot_index as f64,
        ),
        (
            "flotilla_raft_members",
            "Members in the configuration.",
            |s| s.members.len() as f64,
        ),
        (
            "flotilla_raft_quorum_ack_age_seconds",
            "On the leader: time since a majority last answered (-1 elsewhere).",
            |s| {
                s.millis_since_quorum_ack
                    .map_or(-1.0, |m| m as f64 / 1000.0)
            },
        ),
        ("flotilla_store_revision", "Current store revision.", |s| {
            s.revision as f64
        }),
        (
            "flotilla_store_compact_revision",
            "Store compaction point.",
            |s| s.compact_revision as f64,
        ),
        ("flotilla_store_keys", "Live keys.", |s| s.keys as f64),
        (
            "flotilla_store_db_size_bytes",
            "Bytes of key-value data.",
            |s| s.db_size as f64,
        ),
        (
            "flotilla_store_quota_bytes",
            "Configured store quota.",
            |s| s.quota_bytes as f64,
        ),
        ("flotilla_store_watchers", "Open store watchers.", |s| {
            s.watchers as f64
        }),
    ];
    defs.into_iter()
        .map(|(name, help, read)| {
            (
                register(r, Gauge::new(name, help).expect("valid metric")),
                read,
            )
        })
        .collect()
}
