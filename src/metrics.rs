//! Prometheus metrics of a replica, exposed at `/metrics`.
//!
//! Names follow `flotilla_<subsystem>_<name>_<unit>`; labels are bounded (endpoint names and
//! status codes, never keys or object names). Raft and store gauges are read from the
//! replica's status at scrape time, so they cannot drift from the truth.

use std::sync::Arc;
use std::time::Duration;

use flotilla_raft::{CallError, NodeId, PeerObserver, Replica, SnapshotObserver, Status};
use http::{header, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::http::{full, Body};

/// The registry and every metric of a replica.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    watches_open: IntGauge,
    watch_events: IntCounter,
    slow_watchers: IntCounter,
    /// Gauges read from the replica's status at scrape time.
    status_gauges: Vec<(IntGauge, ReadStatus)>,
    peer_errors: IntCounterVec,
    snapshots_built: IntCounter,
    snapshot_build_seconds: Histogram,
    snapshots_installed: IntCounter,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let build = register(
            &r,
            IntGaugeVec::new(
                Opts::new("flotilla_build_info", "Build information; always 1."),
                &["version"],
            )
            .expect("valid"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Arc::new(Metrics {
            requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "flotilla_api_requests_total",
                        "API requests by endpoint and HTTP status code.",
                    ),
                    &["endpoint", "code"],
                )
                .expect("valid"),
            ),
            request_seconds: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "flotilla_api_request_duration_seconds",
                        "API request latency by endpoint.",
                    )
                    .buckets(buckets.clone()),
                    &["endpoint"],
                )
                .expect("valid"),
            ),
            watches_open: register(
                &r,
                IntGauge::new("flotilla_api_watches_open", "Open watch streams.").expect("valid"),
            ),
            watch_events: register(
                &r,
                IntCounter::new(
                    "flotilla_store_watch_events_sent_total",
                    "Watch events sent to clients.",
                )
                .expect("valid"),
            ),
            slow_watchers: register(
                &r,
                IntCounter::new(
                    "flotilla_store_slow_watcher_cancellations_total",
                    "Watchers cancelled for falling behind.",
                )
                .expect("valid"),
            ),
            status_gauges: status_gauges(&r),
            peer_errors: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "flotilla_raft_peer_rpc_errors_total",
                        "Failed peer RPCs by peer and RPC.",
                    ),
                    &["peer", "rpc"],
                )
                .expect("valid"),
            ),
            snapshots_built: register(
                &r,
                IntCounter::new("flotilla_raft_snapshots_built_total", "Snapshots built.")
                    .expect("valid"),
            ),
            snapshot_build_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "flotilla_raft_snapshot_build_duration_seconds",
                        "Time to build a snapshot.",
                    )
                    .buckets(buckets),
                )
                .expect("valid"),
            ),
            snapshots_installed: register(
                &r,
                IntCounter::new(
                    "flotilla_raft_snapshots_installed_total",
                    "Snapshots installed.",
                )
                .expect("valid"),
            ),
            registry: r,
        })
    }

    /// Counts one API request.
    pub fn observe_request(&self, endpoint: &str, code: u16, took: Duration) {
        self.requests
            .with_label_values(&[endpoint, &code.to_string()])
            .inc();
        self.request_seconds
            .with_label_values(&[endpoint])
            .observe(took.as_secs_f64());
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
    fn installed(&self, _seconds: f64) {
        self.snapshots_installed.inc();
    }
}

/// Reads one figure from a replica's status.
type ReadStatus = fn(&Status) -> i64;

fn status_gauges(r: &Registry) -> Vec<(IntGauge, ReadStatus)> {
    let defs: [(&str, &str, ReadStatus); 15] = [
        ("flotilla_raft_term", "Current Raft term.", |s| {
            s.term as i64
        }),
        (
            "flotilla_raft_is_leader",
            "1 if this replica is the leader.",
            |s| i64::from(s.state == "leader"),
        ),
        (
            "flotilla_raft_leader_id",
            "The leader this replica knows (0: none).",
            |s| s.leader.unwrap_or(0) as i64,
        ),
        (
            "flotilla_raft_last_log_index",
            "Index of the last log entry.",
            |s| s.last_log_index as i64,
        ),
        (
            "flotilla_raft_commit_index",
            "Highest index known committed.",
            |s| s.commit_index as i64,
        ),
        (
            "flotilla_raft_applied_index",
            "Highest index applied to the state machine.",
            |s| s.applied_index as i64,
        ),
        (
            "flotilla_raft_apply_lag_entries",
            "Committed entries not yet applied.",
            |s| s.commit_index.saturating_sub(s.applied_index) as i64,
        ),
        (
            "flotilla_raft_snapshot_index",
            "Index covered by the newest snapshot.",
            |s| s.snapshot_index as i64,
        ),
        (
            "flotilla_raft_members",
            "Members in the configuration.",
            |s| s.members.len() as i64,
        ),
        ("flotilla_store_revision", "Current store revision.", |s| {
            s.revision
        }),
        (
            "flotilla_store_compact_revision",
            "Store compaction point.",
            |s| s.compact_revision,
        ),
        ("flotilla_store_keys", "Live keys.", |s| s.keys),
        (
            "flotilla_store_db_size_bytes",
            "Bytes of key-value data.",
            |s| s.db_size as i64,
        ),
        (
            "flotilla_store_quota_bytes",
            "Configured store quota.",
            |s| s.quota_bytes as i64,
        ),
        ("flotilla_store_watchers", "Open store watchers.", |s| {
            s.watchers as i64
        }),
    ];
    defs.into_iter()
        .map(|(name, help, read)| (register(r, IntGauge::new(name, help).expect("valid")), read))
        .collect()
}
