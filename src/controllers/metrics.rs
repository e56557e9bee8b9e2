//! Metrics of the leader's control loops: whether this replica runs them, reconciles by
//! controller and result, work-queue depth, and the scheduler's placements and latency
//! (pod created → bound), pending pods and binding conflicts; the informers' full lists and
//! how long a new leader takes to start its control loops.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Buckets from 1 ms to 60 s.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The control loops' metrics.
#[derive(Clone)]
pub struct ControlMetrics {
    /// 1 while this replica runs the control loops (leader of a term, with a quorum).
    pub leading: IntGauge,
    /// Terms this replica started its control loops in.
    pub terms: IntCounter,
    /// Reconciles by controller and result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Reconcile duration by controller.
    pub reconcile_seconds: HistogramVec,
    /// Keys waiting per controller.
    pub queue_depth: IntGaugeVec,
    /// Keys added to a controller's queue (de-duplicated adds included).
    pub adds: IntCounterVec,
    /// Failed reconciles queued again with backoff, by controller.
    pub retries: IntCounterVec,
    /// Scheduling outcomes (`bound`, `unschedulable`, `error`).
    pub scheduled: IntCounterVec,
    /// From a pod's creation to its binding.
    pub schedule_seconds: Histogram,
    /// Pods waiting for the scheduler, by queue (`active`: to be decided; `unschedulable`:
    /// fit nowhere, waiting for a change or their backoff).
    pub pending: IntGaugeVec,
    /// Binds refused because the pod changed or was bound meanwhile (409).
    pub binding_conflicts: IntCounter,
    /// Full lists by the controllers' informers, by resource (one at start, then one per
    /// watch that ended: a new leader does not list again).
    pub informer_lists: IntCounterVec,
    /// From this replica's election to its control loops running (barrier passed, informers
    /// caught up).
    pub start_seconds: Histogram,
}

impl ControlMetrics {
    /// Creates the metrics and registers them in `r`.
    pub fn new(r: &Registry) -> ControlMetrics {
        let m = ControlMetrics {
            leading: IntGauge::new(
                "flotilla_controllers_leading",
                "1 while this replica runs the controllers and the scheduler",
            )
            .expect("valid metric"),
            terms: IntCounter::new(
                "flotilla_controllers_started_total",
                "Times this replica started its control loops (once per term it led)",
            )
            .expect("valid metric"),
            reconciles: IntCounterVec::new(
                Opts::new(
                    "flotilla_controller_reconciles_total",
                    "Reconciles by controller and result",
                ),
                &["controller", "result"],
            )
            .expect("valid metric"),
            reconcile_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "flotilla_controller_reconcile_seconds",
                    "Reconcile duration",
                )
                .buckets(SECONDS.to_vec()),
                &["controller"],
            )
            .expect("valid metric"),
            queue_depth: IntGaugeVec::new(
                Opts::new(
                    "flotilla_controller_queue_depth",
                    "Keys waiting in a controller's work queue",
                ),
                &["controller"],
            )
            .expect("valid metric"),
            adds: IntCounterVec::new(
                Opts::new(
                    "flotilla_controller_adds_total",
                    "Keys added to a controller's work queue",
                ),
                &["controller"],
            )
            .expect("valid metric"),
            retries: IntCounterVec::new(
                Opts::new(
                    "flotilla_controller_retries_total",
                    "Failed reconciles queued again with backoff",
                ),
                &["controller"],
            )
            .expect("valid metric"),
            scheduled: IntCounterVec::new(
                Opts::new("flotilla_scheduler_pods_total", "Scheduling outcomes"),
                &["result"],
            )
            .expect("valid metric"),
            schedule_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "flotilla_scheduler_pod_scheduling_seconds",
                    "From a pod's creation to its binding",
                )
                .buckets(SECONDS.to_vec()),
            )
            .expect("valid metric"),
            pending: IntGaugeVec::new(
                Opts::new(
                    "flotilla_scheduler_pending_pods",
                    "Pods waiting for the scheduler, by queue",
                ),
                &["queue"],
            )
            .expect("valid metric"),
            binding_conflicts: IntCounter::new(
                "flotilla_scheduler_binding_conflicts_total",
                "Binds refused because the pod changed or was bound meanwhile",
            )
            .expect("valid metric"),
            informer_lists: IntCounterVec::new(
                Opts::new(
                    "flotilla_informer_lists_total",
                    "Full lists by the controllers' informers, by resource",
                ),
                &["resource"],
            )
            .expect("valid metric"),
            start_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "flotilla_controllers_start_seconds",
                    "From this replica's election to its control loops running",
                )
                .buckets(SECONDS.to_vec()),
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.leading.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.terms.clone()),
            Box::new(m.reconciles.clone()),
            Box::new(m.reconcile_seconds.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.scheduled.clone()),
            Box::new(m.schedule_seconds.clone()),
            Box::new(m.adds.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.pending.clone()),
            Box::new(m.binding_conflicts.clone()),
            Box::new(m.informer_lists.clone()),
            Box::new(m.start_seconds.clone()),
        ] {
            r.register(c).expect("metric names are unique");
        }
        // Known label values start at zero, so queries and alerts see the series at once.
        for result in ["bound", "unschedulable", "error"] {
            m.scheduled.with_label_values(&[result]);
        }
        for queue in ["active", "unschedulable"] {
            m.pending.with_label_values(&[queue]);
        }
        m
    }
}
