//! The leader's control loops: the controller manager and the scheduler, started and
//! stopped with Raft leadership.
//!
//! Owns leader-only work. [`run`] follows this replica's leadership: when it becomes leader
//! in term T it passes the read barrier (so its view includes every acknowledged write),
//! then starts the informers, every controller and the scheduler under one cancellation
//! scope; when it stops leading that term, or stops hearing from a quorum, it cancels the
//! scope and waits for all of them to stop.
//!
//! Invariants:
//! - at most one term's control loops run on a replica at a time;
//! - every write they make goes through [`Kube::fenced`]: proposed on this replica only,
//!   refused at apply if its entry lands in any other term than T; on top of that every
//!   update is a compare-and-swap on the resourceVersion read, creations are guarded by
//!   expectations, and a pod is bound only while unbound;
//! - controllers read only from informers, which are caches of this replica's store.
//!
//! Data path of a Deployment: the API stores it → the Deployment controller (this module)
//! creates a ReplicaSet → the ReplicaSet controller creates pods → the scheduler binds each
//! to a node → the node's agent runs it and reports status → the controllers count it
//! ready and available.

pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod gc;
pub mod informer;
pub mod job;
pub mod metrics;
pub mod namespace;
pub mod nodelifecycle;
pub mod owner;
pub mod pod;
pub mod queue;
pub mod rbac;
pub mod replicaset;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use flotilla_raft::Replica;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::resources::{self, Resource};
use crate::api::status::KubeError;
use crate::api::{meta, Call, Kube};
use informer::Informer;
use queue::Queue;

/// How often every object is queued again (a safety net for a missed event).
pub const RESYNC: Duration = Duration::from_secs(30);

/// Events waiting to be written; beyond this, new ones are dropped (they are advisory).
const EVENT_QUEUE: usize = 1024;

/// How long a controller's worker runs reconciles before it lets the runtime's other tasks
/// run (it yields at the first reconcile that ends after this).
const SLICE: Duration = Duration::from_millis(5);

/// Settings of the control loops.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// How long a node may go unheard before it is marked unreachable.
    pub node_grace: Duration,
    /// Nodes per second that may be tainted for eviction.
    pub node_eviction_rate: f64,
    /// The first backoff before a Job replaces a failed pod (doubling after that).
    pub job_backoff: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            node_grace: Duration::from_secs(40),
            node_eviction_rate: 0.1,
            job_backoff: Duration::from_secs(10),
        }
    }
}

/// What every control loop of one term shares.
pub struct Ctx {
    /// The API, with writes fenced to this term.
    pub api: Kube,
    /// The term.
    pub term: u64,
    /// Cancelled when this term's leadership ends.
    pub stop: CancellationToken,
    /// Pods.
    pub pods: Arc<Informer>,
    /// Nodes.
    pub nodes: Arc<Informer>,
    /// ReplicaSets.
    pub replicasets: Arc<Informer>,
    /// Deployments.
    pub deployments: Arc<Informer>,
    /// Leases (node heartbeats live in `kube-node-lease`).
    pub leases: Arc<Informer>,
    /// Jobs.
    pub jobs: Arc<Informer>,
    /// DaemonSets.
    pub daemonsets: Arc<Informer>,
    /// Namespaces.
    pub namespaces: Arc<Informer>,
    /// ServiceAccounts.
    pub serviceaccounts: Arc<Informer>,
    /// Services.
    pub services: Arc<Informer>,
    /// Endpoints.
    pub endpoints: Arc<Informer>,
    /// EndpointSlices.
    pub endpointslices: Arc<Informer>,
    /// ClusterRoles (their aggregation).
    pub clusterroles: Arc<Informer>,
    /// All of the above.
    all: [Arc<Informer>; 13],
    /// The scheduler's view of nodes and what is bound to them, kept on every replica.
    pub scheduling: Arc<crate::scheduler::Warm>,
    /// The garbage collector's owner → dependents index, kept on every replica.
    pub gc_graph: Arc<gc::Graph>,
    /// Settings.
    pub config: Config,
    /// Event recorder.
    pub events: Events,
    /// Metrics.
    pub metrics: metrics::ControlMetrics,
}

fn resource(group: &str, version: &str, plural: &str) -> &'static Resource {
    resources::find(group, version, plural).expect("a served resource")
}

/// The controllers' informers: one per resource they read, running on every replica from
/// start to shutdown (a follower keeps them current from its own store, so a new leader's
/// control loops start on warm caches).
pub struct Informers {
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    replicasets: Arc<Informer>,
    deployments: Arc<Informer>,
    leases: Arc<Informer>,
    jobs: Arc<Informer>,
    daemonsets: Arc<Informer>,
    namespaces: Arc<Informer>,
    serviceaccounts: Arc<Informer>,
    services: Arc<Informer>,
    endpoints: Arc<Informer>,
    endpointslices: Arc<Informer>,
    clusterroles: Arc<Informer>,
    /// The scheduler's cache, kept from the pod and node informers on every replica.
    scheduling: Arc<crate::scheduler::Warm>,
    /// The garbage collector's index, kept from the informers of owners and dependents.
    gc_graph: Arc<gc::Graph>,
    /// The informers' tasks, awaited at shutdown (see [`Informers::stopped`]).
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Informers {
    /// Waits until every informer's task has ended (after the stop token given to
    /// [`Informers::start`] was cancelled): their reads of the store and their handles to it
    /// end before the store closes and the process exits (a read still running on a blocking
    /// thread at exit aborted a replica in CI: RocksDB torn down under it).
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("not poisoned"));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Starts every informer on `objects` (this replica's store) until `stop`.
    pub fn start(
        objects: &crate::api::objects::Objects,
        metrics: &metrics::ControlMetrics,
        stop: &CancellationToken,
    ) -> Arc<Informers> {
        let pods =
            Informer::trimmed_with_indexes(resource("", "v1", "pods"), pod::trim, pod::indexers());
        let nodes = Informer::new(resource("", "v1", "nodes"));
        let replicasets = Informer::new(resource("apps", "v1", "replicasets"));
        let deployments = Informer::new(resource("apps", "v1", "deployments"));
        let jobs = Informer::new(resource("batch", "v1", "jobs"));
        // Subscribed before the informers run, so they hear of every object.
        let scheduling = crate::scheduler::Warm::new(&pods, &nodes);
        let gc_graph = gc::Graph::new(&[&pods, &replicasets, &deployments, &jobs]);
        let i = Arc::new(Informers {
            pods,
            nodes,
            scheduling,
            gc_graph,
            replicasets,
            deployments,
            leases: Informer::new(resource("coordination.k8s.io", "v1", "leases")),
            jobs,
            daemonsets: Informer::new(resource("apps", "v1", "daemonsets")),
            namespaces: Informer::new(resource("", "v1", "namespaces")),
            serviceaccounts: Informer::new(resource("", "v1", "serviceaccounts")),
            services: Informer::new(resource("", "v1", "services")),
            // The controller tells its own Endpoints from hand-made ones by their manager.
            endpoints: Informer::with_managed_fields(resource("", "v1", "endpoints")),
            endpointslices: Informer::new(resource("discovery.k8s.io", "v1", "endpointslices")),
            clusterroles: Informer::new(resource(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
            )),
            tasks: Default::default(),
        });
        for inf in i.all() {
            inf.count_lists(
                metrics
                    .informer_lists
                    .with_label_values(&[inf.resource().plural]),
            );
            let task = tokio::spawn(inf.run(objects.clone(), stop.clone()));
            i.tasks.lock().expect("not poisoned").push(task);
        }
        i
    }

    fn all(&self) -> [Arc<Informer>; 13] {
        [
            self.pods.clone(),
            self.nodes.clone(),
            self.replicasets.clone(),
            self.deployments.clone(),
            self.leases.clone(),
            self.jobs.clone(),
            self.daemonsets.clone(),
            self.namespaces.clone(),
            self.serviceaccounts.clone(),
            self.services.clone(),
            self.endpoints.clone(),
            self.endpointslices.clone(),
            self.clusterroles.clone(),
        ]
    }

    /// Waits until every informer has listed and reflects store revision `rev`; false if
    /// `stop` came first.
    async fn caught_up(&self, rev: i64, stop: &CancellationToken) -> bool {
        for inf in self.all() {
            let synced = tokio::select! {
                _ = stop.cancelled() => false,
                _ = inf.synced() => true,
            };
            if !synced || !inf.caught_up(rev, stop).await {
                return false;
            }
        }
        true
    }
}

impl Ctx {
    fn new(
        api: Kube,
        term: u64,
        stop: CancellationToken,
        events: Events,
        metrics: metrics::ControlMetrics,
        config: Config,
        informers: &Informers,
    ) -> Ctx {
        let i = informers;
        Ctx {
            api,
            term,
            stop,
            pods: i.pods.clone(),
            nodes: i.nodes.clone(),
            replicasets: i.replicasets.clone(),
            deployments: i.deployments.clone(),
            leases: i.leases.clone(),
            jobs: i.jobs.clone(),
            daemonsets: i.daemonsets.clone(),
            namespaces: i.namespaces.clone(),
            serviceaccounts: i.serviceaccounts.clone(),
            services: i.services.clone(),
            endpoints: i.endpoints.clone(),
            endpointslices: i.endpointslices.clone(),
            clusterroles: i.clusterroles.clone(),
            all: i.all(),
            scheduling: i.scheduling.clone(),
            gc_graph: i.gc_graph.clone(),
            config,
            events,
            metrics,
        }
    }

    /// Every informer of this term's control loops.
    fn informers(&self) -> &[Arc<Informer>] {
        &self.all
    }
}

/// The object an Event is about: just the fields the Event records (the whole object is not
/// carried, since recording an Event for every bound pod must not copy every pod).
#[derive(Debug, Clone)]
struct Involved {
    api_version: Value,
    kind: Value,
    name: String,
    namespace: Option<String>,
    uid: String,
    resource_version: String,
}

impl Involved {
    fn of(obj: &Value) -> Involved {
        Involved {
            api_version: obj.get("apiVersion").cloned().unwrap_or(Value::Null),
            kind: obj.get("kind").cloned().unwrap_or(Value::Null),
            name: owner::name(obj).to_string(),
            namespace: owner::namespace(obj).map(str::to_string),
            uid: owner::uid(obj).to_string(),
            resource_version: owner::resource_version(obj).to_string(),
        }
    }
}

/// Records Kubernetes Events for objects, de-duplicated by (object, reason, message) with a
/// count, written in the background (best effort: a full queue drops new events).
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<(Involved, &'static str, &'static str, String)>,
}

impl Events {
    fn start(
        api: Kube,
        component: &'static str,
        stop: CancellationToken,
    ) -> (Events, impl Future<Output = ()>) {
        let (tx, mut rx) =
            mpsc::channel::<(Involved, &'static str, &'static str, String)>(EVENT_QUEUE);
        let task = async move {
            let r = resource("", "v1", "events");
            loop {
                let item = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = rx.recv() => m,
                };
                let Some((obj, kind, reason, message)) = item else {
                    return;
                };
                if let Err(e) = record(&api, r, component, &obj, kind, reason, &message).await {
                    tracing::debug!(%e, reason, "could not record an event");
                }
            }
        };
        (Events { tx }, task)
    }

    /// Queues an event about `obj` (as of `resource_version`, if given); a full queue drops
    /// it before anything is copied.
    fn send(
        &self,
        obj: &Value,
        resource_version: Option<i64>,
        kind: &'static str,
        reason: &'static str,
        message: &str,
    ) {
        let Ok(permit) = self.tx.try_reserve() else {
            return;
        };
        let mut involved = Involved::of(obj);
        if let Some(rv) = resource_version {
            involved.resource_version = rv.to_string();
        }
        permit.send((involved, kind, reason, message.to_string()));
    }

    /// A `Normal` event about `obj`.
    pub fn normal(&self, obj: &Value, reason: &'static str, message: &str) {
        self.send(obj, None, "Normal", reason, message);
    }

    /// A `Normal` event about `obj` as of `resource_version` (a change the caller made
    /// without a copy of the changed object).
    pub fn normal_at(
        &self,
        obj: &Value,
        resource_version: i64,
        reason: &'static str,
        message: &str,
    ) {
        self.send(obj, Some(resource_version), "Normal", reason, message);
    }

    /// A `Warning` event about `obj`.
    pub fn warning(&self, obj: &Value, reason: &'static str, message: &str) {
        self.send(obj, None, "Warning", reason, message);
    }
}

async fn record(
    api: &Kube,
    r: &'static Resource,
    component: &str,
    obj: &Involved,
    kind: &str,
    reason: &str,
    message: &str,
) -> Result<(), KubeError> {
    let ns = obj.namespace.as_deref().unwrap_or("default").to_string();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (obj.uid.as_str(), reason, message).hash(&mut h);
    let name = format!("{}.{:016x}", obj.name, h.finish());
    let now = meta::rfc3339(meta::now_secs());
    let call = Call::internal(r, Some(&ns), Some(&name), None, component);
    if let Some(cur) = api
        .objects()
        .get(
            &r.key(Some(&ns), &name),
            crate::api::objects::Consistency::Local,
        )
        .await?
    {
        let mut next = cur.object;
        let count = next.get("count").and_then(Value::as_i64).unwrap_or(1);
        next["count"] = json!(count + 1);
        next["lastTimestamp"] = json!(now);
        api.update_value(&call, next).await?;
        return Ok(());
    }
    let event = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": ns},
        "involvedObject": {
            "apiVersion": obj.api_version,
            "kind": obj.kind,
            "name": obj.name,
            "namespace": obj.namespace,
            "uid": obj.uid,
            "resourceVersion": obj.resource_version,
        },
        "reason": reason,
        "message": message,
        "type": kind,
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": component},
        "reportingComponent": component,
    });
    let call = Call::internal(r, Some(&ns), None, None, component);
    match api.create_value(&call, event, false).await {
        Err(e) if e.reason == "AlreadyExists" => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Runs `workers` workers on `queue` until `stop`: each takes a key, calls `reconcile`, and
/// on success forgets its failures (queuing it again after the returned delay, if any), on
/// failure retries it with backoff.
pub(crate) fn drive<F, Fut>(
    set: &mut JoinSet<()>,
    name: &'static str,
    queue: Arc<Queue>,
    workers: usize,
    stop: CancellationToken,
    metrics: metrics::ControlMetrics,
    reconcile: F,
) where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Duration>, KubeError>> + Send,
{
    {
        let (queue, stop) = (queue.clone(), stop.clone());
        set.spawn(async move {
            stop.cancelled().await;
            queue.shut_down();
        });
    }
    // When the work queued at start (every object, replayed) is first done: how long a new
    // leader takes to get through its backlog.
    let begun = std::time::Instant::now();
    let drained = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..workers {
        let (queue, reconcile, metrics) = (queue.clone(), reconcile.clone(), metrics.clone());
        let (drained, done) = (drained.clone(), done.clone());
        set.spawn(async move {
            queue.count_adds(metrics.adds.with_label_values(&[name]));
            for outcome in ["ok", "error"] {
                metrics.reconciles.with_label_values(&[name, outcome]);
            }
            let retries = metrics.retries.with_label_values(&[name]);
            let depth = metrics.queue_depth.with_label_values(&[name]);
            let seconds = metrics.reconcile_seconds.with_label_values(&[name]);
            let mut slice = std::time::Instant::now();
            while let Some(key) = queue.next().await {
                depth.set(queue.len() as i64);
                let started = std::time::Instant::now();
                let result = reconcile(key.clone()).await;
                seconds.observe(started.elapsed().as_secs_f64());
                let outcome = if result.is_ok() { "ok" } else { "error" };
                metrics.reconciles.with_label_values(&[name, outcome]).inc();
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if queue.is_empty() && !drained.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!(
                        controller = name,
                        reconciles = n,
                        seconds = begun.elapsed().as_secs_f64(),
                        "first backlog done"
                    );
                }
                match result {
                    Ok(again) => {
                        queue.forget(&key);
                        if let Some(d) = again {
                            queue.add_after(&key, d);
                        }
                    }
                    Err(e) => {
                        retries.inc();
                        let delay = queue.retry(&key);
                        if e.code >= 500 || e.code == 409 {
                            tracing::debug!(controller = name, key, %e, ?delay, "reconcile failed; retrying");
                        } else {
                            tracing::warn!(controller = name, key, %e, ?delay, "reconcile failed; retrying");
                        }
                    }
                }
                queue.done(&key);
                // A queue with work answers at once, so without this a worker would run its
                // whole backlog (1,500 reconciles at a new leader's start) without letting
                // the runtime run anything else on its thread: the Raft tasks a bind or any
                // other write waits on included. Not after every reconcile: on a busy
                // replica each yield waits a turn of every task, and a backlog of cheap
                // reconciles then took a minute.
                if slice.elapsed() >= SLICE {
                    tokio::task::yield_now().await;
                    slice = std::time::Instant::now();
                }
            }
        });
    }
}

/// Queues every key of `informer` into `queue` every [`RESYNC`].
fn resync(
    set: &mut JoinSet<()>,
    informer: Arc<Informer>,
    queue: Arc<Queue>,
    stop: CancellationToken,
) {
    set.spawn(async move {
        let mut tick = tokio::time::interval(RESYNC);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => queue::background(|| {
                    for k in informer.keys() {
                        queue.add(&k);
                    }
                }),
            }
        }
    });
}

/// Follows this replica's leadership and runs the control loops while it leads.
pub async fn run(
    replica: Replica,
    kube: Arc<Kube>,
    informers: Arc<Informers>,
    config: Config,
    metrics: metrics::ControlMetrics,
    shutdown: CancellationToken,
) {
    let mut rx = replica.leadership();
    loop {
        let l = *rx.borrow_and_update();
        if l.is_leader {
            lead(
                &replica, &kube, &informers, config, &metrics, l.term, &shutdown,
            )
            .await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// True while this replica still leads `term` with a quorum.
fn still_leading(replica: &Replica, term: u64) -> bool {
    let l = *replica.leadership().borrow();
    l.is_leader && l.term == term && replica.leads_with_quorum()
}

async fn lead(
    replica: &Replica,
    kube: &Kube,
    informers: &Informers,
    config: Config,
    metrics: &metrics::ControlMetrics,
    term: u64,
    shutdown: &CancellationToken,
) {
    let elected = std::time::Instant::now();
    // The barrier: everything acknowledged before this term is applied here.
    loop {
        if !still_leading(replica, term) || shutdown.is_cancelled() {
            return;
        }
        match replica.read_barrier().await {
            Ok(()) => {
                tracing::info!(
                    term,
                    seconds = elected.elapsed().as_secs_f64(),
                    "leading: read barrier passed"
                );
                break;
            }
            Err(e) => {
                tracing::debug!(%e, term, "leader read barrier failed; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let scope = shutdown.child_token();
    // The informers run all along; the control loops start once they hold everything the
    // barrier made visible here (a stale cache would, say, let a ReplicaSet miss pods the
    // last leader made and create them again).
    let barrier = replica.kv().revision();
    let caught_up = informers.caught_up(barrier, &scope);
    tokio::pin!(caught_up);
    let ready = loop {
        tokio::select! {
            ok = &mut caught_up => break ok,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if !still_leading(replica, term) {
                    break false;
                }
            }
        }
    };
    // A replica restarted with its saved vote can believe it leads an old term until it
    // hears the current leader: check again before starting anything.
    if !ready || !still_leading(replica, term) {
        return;
    }
    tracing::info!(
        term,
        seconds = elected.elapsed().as_secs_f64(),
        "leading: informers caught up"
    );
    let mut set = JoinSet::new();
    let (events, event_task) = Events::start(
        kube.fenced(term),
        "flotilla-controller-manager",
        scope.clone(),
    );
    set.spawn(event_task);
    let ctx = Arc::new(Ctx::new(
        kube.fenced(term),
        term,
        scope.clone(),
        events,
        metrics.clone(),
        config,
        informers,
    ));
    // The replays of every cached object are seconds of work at scale: the worker thread
    // this runs on hands its other tasks (the loops already started, the API) to another.
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        tokio::task::block_in_place(|| start(&ctx, &mut set));
    } else {
        start(&ctx, &mut set);
    }
    metrics
        .start_seconds
        .observe(elected.elapsed().as_secs_f64());
    metrics.leading.set(1);
    metrics.terms.inc();
    tracing::info!(
        term,
        seconds = elected.elapsed().as_secs_f64(),
        "leading: controllers and scheduler started"
    );
    let mut rx = replica.leadership();
    loop {
        tokio::select! {
            _ = scope.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            r = rx.changed() => if r.is_err() { break },
        }
        if !still_leading(replica, term) {
            break;
        }
    }
    scope.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        set.abort_all();
    }
    // This term's handlers hold its queues; the next term subscribes afresh.
    for inf in informers.all() {
        inf.unsubscribe_all();
    }
    // Pods this term's scheduler assumed bound but never saw bound count as they are.
    informers.scheduling.end_term(&informers.pods);
    metrics.leading.set(0);
    tracing::info!(term, "stopped leading: controllers and scheduler stopped");
}

/// Starts the informers, the controllers and the scheduler of one term.
fn start(ctx: &Arc<Ctx>, set: &mut JoinSet<()>) {
    // Each subscriber is first told of every cached object, then of every change; each
    // control loop starts as soon as its own subscriptions are made, so it works on the
    // other core while the next ones replay the caches. The loops a user waits on after a
    // failover (a Deployment scaled, a pod to schedule) come first; the garbage collector,
    // told of every object of every informer (150,000 pods and more), comes last.
    {
        let ctx = ctx.clone();
        set.spawn(async move { ensure_system_namespaces(&ctx).await });
    }
    // How long each control loop's subscriptions took (logged once per term).
    let begun = std::time::Instant::now();
    let mut took: Vec<(&str, u128)> = Vec::new();
    let mut step = |name: &'static str| took.push((name, begun.elapsed().as_millis()));
    macro_rules! controller {
        ($name:literal, $c:expr, $primary:expr, $workers:expr) => {{
            let c = Arc::new($c);
            step($name);
            spawn_controller(
                set,
                ctx,
                $name,
                c.queue.clone(),
                $primary.clone(),
                $workers,
                move |ctx, key| {
                    let c = c.clone();
                    async move { c.reconcile(&ctx, &key).await }
                },
            );
        }};
    }
    controller!(
        "deployment",
        deployment::Controller::new(ctx),
        ctx.deployments,
        2
    );
    controller!(
        "replicaset",
        replicaset::Controller::new(ctx),
        ctx.replicasets,
        4
    );
    let sched = Arc::new(crate::scheduler::Scheduler::new(ctx));
    step("scheduler");
    spawn_synced(set, ctx, move |ctx| sched.run(ctx));
    controller!("job", job::Controller::new(ctx), ctx.jobs, 2);
    controller!(
        "daemonset",
        daemonset::Controller::new(ctx),
        ctx.daemonsets,
        2
    );
    controller!(
        "namespace",
        namespace::Controller::new(ctx),
        ctx.namespaces,
        2
    );
    controller!(
        "serviceaccount",
        namespace::ServiceAccounts::new(ctx),
        ctx.namespaces,
        1
    );
    controller!(
        "clusterrole-aggregation",
        rbac::Aggregation::new(ctx),
        ctx.clusterroles,
        1
    );
    let lifecycle = Arc::new(nodelifecycle::NodeLifecycle::new(ctx));
    step("nodelifecycle");
    spawn_synced(set, ctx, move |ctx| lifecycle.run(ctx));
    controller!(
        "endpoints",
        endpoints::Controller::new(ctx),
        ctx.services,
        4
    );
    controller!("garbage-collector", gc::Collector::new(ctx), ctx.pods, 2);
    tracing::info!(
        term = ctx.term,
        ?took,
        "control loops subscribed (ms since start)"
    );
}

/// Runs a control loop of its own making (not a queue's workers) once the informers have
/// listed, unless the term ends first.
fn spawn_synced<F, Fut>(set: &mut JoinSet<()>, ctx: &Arc<Ctx>, run: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let ctx = ctx.clone();
    set.spawn(async move {
        if wait_synced(&ctx).await {
            run(ctx).await;
        }
    });
}

/// Waits until every informer has listed; false if the term ended first.
async fn wait_synced(ctx: &Ctx) -> bool {
    tokio::select! {
        _ = ctx.stop.cancelled() => false,
        _ = async {
            for inf in ctx.informers() {
                inf.synced().await;
            }
        } => true,
    }
}

/// Runs a controller's workers on `queue` once the informers have listed, with a resync of
/// `primary`'s keys.
fn spawn_controller<F, Fut>(
    set: &mut JoinSet<()>,
    ctx: &Arc<Ctx>,
    name: &'static str,
    queue: Arc<Queue>,
    primary: Arc<Informer>,
    workers: usize,
    reconcile: F,
) where
    F: Fn(Arc<Ctx>, String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Duration>, KubeError>> + Send,
{
    let ctx = ctx.clone();
    set.spawn(async move {
        if !wait_synced(&ctx).await {
            return;
        }
        let mut inner = JoinSet::new();
        let c = ctx.clone();
        drive(
            &mut inner,
            name,
            queue.clone(),
            workers,
            ctx.stop.clone(),
            ctx.metrics.clone(),
            move |key| reconcile(c.clone(), key),
        );
        resync(&mut inner, primary, queue, ctx.stop.clone());
        while inner.join_next().await.is_some() {}
    });
}

/// Makes sure the system namespaces exist.
async fn ensure_system_namespaces(ctx: &Ctx) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match ctx.api.ensure_system_namespaces().await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(%e, "creating the system namespaces; will retry");
                tokio::select! {
                    _ = ctx.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
