//! One replica: the Raft node, its stores, its peer listener, and the operations the API
//! layer needs (write, read barrier, cluster changes, status, leadership).
//!
//! Write path (numbered as in the README):
//! 1. [`Replica::write`] on any replica finds the leader from Raft's metrics; a follower
//!    forwards the command over the peer transport, batched with other pending writes
//!    ([`crate::proposer`]);
//! 2. the leader checks it still hears from a quorum, validates the command and checks the
//!    quota, then proposes it with `client_write`;
//! 3. openraft appends it (synced), replicates it, and on commit every replica applies it
//!    through [`crate::StateMachine`];
//! 4. the leader answers with the apply result (the new revision).
//!
//! Retries: a request is retried (within its deadline) only when it was certainly not applied
//! (not leader, leader unreachable at connect). A request whose fate is unknown returns
//! [`Error::Timeout`], never a silent retry that could apply it twice.
//!
//! Read barrier: on the leader, openraft's ReadIndex (`get_read_log_id`, which confirms
//! leadership with a quorum) then a wait for local apply; on a follower, the read index comes
//! from the leader over the peer transport and the wait is local.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_store::{KvStore, LogStore, StoreOptions};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, StartError};
use crate::log_store::RaftLog;
use crate::network::{CallError, Network, PeerClient, PeerObserver};
use crate::proposer::{Outcome, Proposer};
use crate::read_index::ReadQueue;
use crate::service;
use crate::state_machine::{SnapshotObserver, StateMachine};
use crate::types::{Command, CommandResult, Node, NodeId, Raft};

/// Everything a replica needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// This replica's id (non-zero, unique in the cluster).
    pub id: NodeId,
    /// Data directory: `raft/` (log), `sm/` (state machine), `snapshots/`.
    pub data_dir: PathBuf,
    /// Address the peer listener binds.
    pub listen_peer: SocketAddr,
    /// Peer address other replicas dial (normally the same as `listen_peer`).
    pub advertise_peer: String,
    /// Client API address announced in the membership.
    pub advertise_api: String,
    /// The initial members, id → peer address. Used only to bootstrap a pristine replica.
    pub initial_cluster: BTreeMap<NodeId, String>,
    /// Never bootstrap: wait to be added to an existing cluster.
    pub join: bool,
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Minimum election timeout (the maximum is twice this).
    pub election_timeout_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_logs: u64,
    /// Entries kept in the log behind a snapshot, for followers that lag slightly.
    pub keep_logs: u64,
    /// Deadline of a write or read barrier.
    pub request_timeout: Duration,
    /// Store tunables.
    pub store: StoreOptions,
    /// Mutual TLS on the peer transport: `None` is plaintext.
    pub tls: Option<PeerTls>,
}

/// Whether a verified client certificate (DER, the leaf) is a replica's.
pub type IsPeer = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Mutual TLS between replicas: the listener accepts only clients whose certificate the
/// server config's verifier accepts (the cluster CA's), and dials peers with the client
/// config (the cluster CA as the only root, this replica's certificate as its identity).
#[derive(Clone)]
pub struct PeerTls {
    /// The listener's config; it must require client certificates.
    pub server: Arc<rustls::ServerConfig>,
    /// The dialer's config (its verifier must accept replicas' certificates only).
    pub client: Arc<rustls::ClientConfig>,
    /// Whether a verified client certificate (DER, the leaf) is a replica's: a certificate
    /// of the cluster's CA is not enough (node agents and administrators have those too).
    pub is_peer: IsPeer,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

impl Config {
    /// Defaults for everything but identity and addresses.
    pub fn new(id: NodeId, data_dir: PathBuf, listen_peer: SocketAddr) -> Config {
        Config {
            id,
            data_dir,
            listen_peer,
            advertise_peer: listen_peer.to_string(),
            advertise_api: String::new(),
            initial_cluster: BTreeMap::new(),
            join: false,
            heartbeat_ms: 50,
            election_timeout_ms: 100,
            snapshot_logs: 100_000,
            keep_logs: 1_000,
            request_timeout: Duration::from_secs(5),
            store: StoreOptions::default(),
            tls: None,
        }
    }

    fn election_max(&self) -> Duration {
        Duration::from_millis(self.election_timeout_ms * 2)
    }

    /// A leader that has not heard from a quorum for this long answers "no quorum" (1 s with
    /// the default timeouts). Safety does not depend on it (a write commits only on a quorum;
    /// a linearizable read waits for a ReadIndex round): it decides how soon a cut-off leader
    /// says so, and a short one turned CPU or fsync stalls on a loaded machine into spurious
    /// 503s (seen at 400 ms on two cores running six clusters).
    fn quorum_timeout(&self) -> Duration {
        self.election_max() * 5
    }
}

/// Who leads, as this replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leadership {
    /// The current term.
    pub term: u64,
    /// The leader of the term, if known.
    pub leader: Option<NodeId>,
    /// True if this replica is the leader.
    pub is_leader: bool,
}

/// A member as listed by [`Replica::status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its addresses.
    pub node: Node,
    /// True for a voter, false for a learner.
    pub voter: bool,
}

/// A replica's view of itself and the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// This replica.
    pub id: NodeId,
    /// "leader", "follower", "candidate", "learner" or "shutdown".
    pub state: String,
    /// Current term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Index of the last log entry.
    pub last_log_index: u64,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied to the state machine.
    pub applied_index: u64,
    /// Index covered by the newest snapshot.
    pub snapshot_index: u64,
    /// Highest purged index.
    pub purged_index: u64,
    /// The store's revision.
    pub revision: i64,
    /// The store's compaction point.
    pub compact_revision: i64,
    /// Live keys.
    pub keys: i64,
    /// Bytes of key-value data.
    pub db_size: u64,
    /// The quota in bytes.
    pub quota_bytes: u64,
    /// Open watchers.
    pub watchers: usize,
    /// On the leader: milliseconds since a quorum acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
    /// On the leader: each member's replicated index.
    pub replication: BTreeMap<NodeId, u64>,
    /// The membership.
    pub members: Vec<Member>,
}

/// Requests a follower sends to the leader (or to a transfer target).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardRequest {
    /// Propose commands (a follower's batch of pending writes).
    WriteBatch(Vec<Command>),
    /// Confirm leadership and return the read index.
    ReadIndex,
    /// Add a learner, optionally promoting it to voter once caught up.
    AddMember { id: NodeId, node: Node, voter: bool },
    /// Promote a learner.
    Promote { id: NodeId },
    /// Remove a member.
    RemoveMember { id: NodeId },
    /// Update a member's addresses (same peer address; the API address changes).
    SetNode { id: NodeId, node: Node },
    /// Move leadership to `to`.
    TransferLeader { to: NodeId },
    /// (to the transfer target) start an election now.
    Elect,
}

/// Answers to [`ForwardRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardResponse {
    WriteBatch(Vec<Outcome>),
    ReadIndex(u64),
    Done,
}

pub(crate) struct Inner {
    pub(crate) cfg: Config,
    pub(crate) raft: Raft,
    pub(crate) kv: KvStore,
    peers: PeerClient,
    committed: Arc<AtomicU64>,
    acks: Arc<PeerAcks>,
    proposer: Proposer,
    reads: Arc<ReadQueue>,
    pub(crate) observer: Arc<dyn ReplicaObserver>,
    leadership: watch::Receiver<Leadership>,
    shutdown: CancellationToken,
    /// Raft's own threads (see `Replica::start`); stopped when the replica is dropped.
    runtime: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self
            .runtime
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }
}

/// A running replica. Cheap to clone.
#[derive(Clone)]
pub struct Replica {
    pub(crate) inner: Arc<Inner>,
}

/// Hooks for metrics; every method has an empty default.
pub trait Observer:
    PeerObserver + SnapshotObserver + ReplicaObserver + flotilla_store::LogObserver
{
}
impl<T: PeerObserver + SnapshotObserver + ReplicaObserver + flotilla_store::LogObserver> Observer
    for T
{
}

/// Hooks for metrics of the replica's own work; every method has an empty default.
pub trait ReplicaObserver: Send + Sync + 'static {
    /// An entry carrying `commands` commands was proposed; `ok` is false if its outcome was
    /// an error (timeout, quorum lost, leadership lost).
    fn proposed(&self, _commands: usize, _ok: bool) {}
    /// `commands` commands were forwarded to the leader.
    fn forwarded(&self, _commands: usize) {}
    /// A read barrier finished after `seconds`.
    fn read_barrier(&self, _seconds: f64, _ok: bool) {}
    /// The leader changed, as this replica sees it.
    fn leader_changed(&self, _term: u64, _leader: Option<NodeId>) {}
}

impl ReplicaObserver for crate::state_machine::NoObserver {}
impl flotilla_store::LogObserver for crate::state_machine::NoObserver {}

/// When each peer last answered an RPC, and since when it has been failing: the leader's
/// live view of whether it still reaches a quorum (openraft's own figure is refreshed only
/// when its metrics change).
#[derive(Default)]
struct PeerAcks {
    peers: std::sync::Mutex<BTreeMap<NodeId, PeerContact>>,
    /// When this replica last became leader.
    leader_since: std::sync::Mutex<Option<Instant>>,
}

#[derive(Clone, Copy, Default)]
struct PeerContact {
    /// The last answer (any answer, an error from the peer's Raft included).
    ok: Option<Instant>,
    /// The first failed RPC (refused, timed out, broken) since that answer.
    failing_since: Option<Instant>,
    /// The last failure was a refused connection: nothing listens there (the process is
    /// gone), not a peer that may just be slow to answer.
    refused: bool,
}

impl PeerAcks {
    fn ack(&self, peer: NodeId) {
        let mut peers = self.peers.lock().expect("not poisoned");
        let c = peers.entry(peer).or_default();
        c.ok = Some(Instant::now());
        c.failing_since = None;
        c.refused = false;
    }

    fn failed(&self, peer: NodeId, refused: bool) {
        let mut peers = self.peers.lock().expect("not poisoned");
        let c = peers.entry(peer).or_default();
        c.failing_since.get_or_insert_with(Instant::now);
        c.refused = refused;
    }

    /// How long ago a majority of `voters` (counting `me` as always current) last answered.
    fn quorum_age(&self, me: NodeId, voters: &BTreeSet<NodeId>, now: Instant) -> Duration {
        let peers = self.peers.lock().expect("not poisoned");
        majority_age(voters, |v| {
            if v == me {
                return Duration::ZERO;
            }
            peers
                .get(&v)
                .and_then(|c| c.ok)
                .map_or(Duration::MAX, |t| now.saturating_duration_since(t))
        })
    }

    /// How long a majority of `voters` has been out of contact, counting a peer as out of
    /// contact only on evidence: it has not answered for `limit` and its RPCs have kept
    /// failing for half of that (or it has not answered at all for three times `limit`).
    /// Silence alone is not evidence: a leader whose own threads or disk stalled sent
    /// nothing and heard nothing, and its next heartbeat round finds the peers well (CI on
    /// two shared cores saw such a stall fail an in-flight write with "lost contact with a
    /// quorum for 1001 ms" while every replica ran). With `refused_only`, only peers whose
    /// connections are refused count.
    fn quorum_lost_for(
        &self,
        me: NodeId,
        voters: &BTreeSet<NodeId>,
        limit: Duration,
        refused_only: bool,
        now: Instant,
    ) -> Duration {
        let peers = self.peers.lock().expect("not poisoned");
        majority_age(voters, |v| {
            if v == me {
                return Duration::ZERO;
            }
            let c = peers.get(&v).copied().unwrap_or_default();
            let silent =
                c.ok.map_or(Duration::MAX, |t| now.saturating_duration_since(t));
            let failing = c
                .failing_since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            if refused_only && !c.refused {
                Duration::ZERO
            } else if silent > limit && (failing >= limit / 2 || silent > limit * 3) {
                silent
            } else {
                Duration::ZERO
            }
        })
    }
}

/// The age that a majority of `voters` is within, given each voter's age.
fn majority_age(voters: &BTreeSet<NodeId>, age: impl Fn(NodeId) -> Duration) -> Duration {
    let mut ages: Vec<Duration> = voters.iter().map(|v| age(*v)).collect();
    ages.sort();
    let majority = voters.len() / 2 + 1;
    ages.get(majority - 1).copied().unwrap_or(Duration::MAX)
}

/// Logs a peer becoming unreachable or reachable once, not on every heartbeat, and records
/// answers in [`PeerAcks`].
struct LoggingObserver<O> {
    down: std::sync::Mutex<BTreeSet<NodeId>>,
    acks: Arc<PeerAcks>,
    next: Arc<O>,
}

impl<O: Observer> PeerObserver for LoggingObserver<O> {
    fn ok(&self, target: NodeId) {
        self.acks.ack(target);
        if self.down.lock().expect("not poisoned").remove(&target) {
            tracing::info!(peer = target, "peer is reachable again");
        }
        self.next.ok(target);
    }
    fn failed(&self, target: NodeId, rpc: &'static str, error: &CallError) {
        self.acks
            .failed(target, matches!(error, CallError::Connect(_)));
        if self.down.lock().expect("not poisoned").insert(target) {
            tracing::warn!(peer = target, rpc, %error, "peer is unreachable");
        }
        self.next.failed(target, rpc, error);
    }
}

impl Replica {
    /// A handle to Raft's threads.
    fn raft_runtime(&self) -> tokio::runtime::Handle {
        self.inner
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.handle().clone())
            .unwrap_or_else(tokio::runtime::Handle::current)
    }

    /// Opens the stores, starts Raft and the peer listener, and bootstraps the cluster if this
    /// replica is pristine and part of `initial_cluster` (idempotent: a replica that has any
    /// Raft state never bootstraps again).
    pub async fn start<O: Observer>(cfg: Config, observer: Arc<O>) -> Result<Replica, StartError> {
        let kv = KvStore::open(cfg.data_dir.join("sm"), cfg.store.clone())
            .map_err(|e| StartError(format!("opening the state machine: {e}")))?;
        let log = LogStore::open_observed(cfg.data_dir.join("raft"), observer.clone())
            .map_err(|e| StartError(format!("opening the raft log: {e}")))?;
        let log = RaftLog::new(log, kv.clone());
        let committed = log.committed_index();
        let sm = StateMachine::open(kv.clone(), cfg.data_dir.join("snapshots"), observer.clone())
            .map_err(|e| StartError(format!("opening the snapshot directory: {e}")))?;

        let raft_cfg = openraft::Config {
            cluster_name: "flotilla".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms,
            election_timeout_max: cfg.election_timeout_ms * 2,
            install_snapshot_timeout: 60_000,
            max_payload_entries: 512,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            snapshot_max_chunk_size: 2 << 20,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError(format!("raft configuration: {e}")))?;

        let local_ip = Some(cfg.listen_peer.ip());
        let peers = PeerClient::new(local_ip, cfg.tls.as_ref().map(|t| t.client.clone()));
        let acks = Arc::new(PeerAcks::default());
        let replica_observer: Arc<dyn ReplicaObserver> = observer.clone();
        let net_observer: Arc<dyn PeerObserver> = Arc::new(LoggingObserver {
            down: Default::default(),
            acks: acks.clone(),
            next: observer,
        });
        // Raft runs on threads of its own: its core, replication streams, apply and the peer
        // listener are never queued behind the API's tasks, so on a loaded machine heartbeats
        // and votes still go out on time (sharing the API's two worker threads, a busy
        // replica missed its 50 ms heartbeats and the cluster kept electing). Its peer
        // connections are its own too: a connection is driven by the runtime that made it.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("raft")
            .enable_all()
            .build()
            .map_err(|e| StartError(format!("starting raft's threads: {e}")))?;
        let raft_peers = PeerClient::new(local_ip, cfg.tls.as_ref().map(|t| t.client.clone()));
        let network = Network::new(cfg.id, raft_peers, net_observer);
        let raft_cfg = Arc::new(raft_cfg);
        let id = cfg.id;
        let raft = runtime
            .spawn(async move { Raft::new(id, raft_cfg, network, log, sm).await })
            .await
            .map_err(|e| StartError(format!("starting raft: {e}")))?
            .map_err(|e| StartError(format!("starting raft: {e}")))?;

        let (tx, rx) = watch::channel(Leadership::default());
        let shutdown = CancellationToken::new();
        let inner = Arc::new_cyclic(|weak| Inner {
            cfg: cfg.clone(),
            raft: raft.clone(),
            kv,
            peers,
            committed,
            acks,
            proposer: Proposer::start(weak.clone()),
            reads: Arc::new(ReadQueue::default()),
            observer: replica_observer,
            leadership: rx,
            shutdown: shutdown.clone(),
            runtime: std::sync::Mutex::new(Some(runtime)),
        });
        let replica = Replica { inner };

        // Leadership signal, derived from Raft's metrics.
        let mut metrics = raft.metrics();
        let token = shutdown.clone();
        let id = cfg.id;
        let acks = replica.inner.acks.clone();
        let observer = replica.inner.observer.clone();
        tokio::spawn(async move {
            loop {
                let (l, voters) = {
                    let m = metrics.borrow_and_update();
                    let l = Leadership {
                        term: m.current_term,
                        leader: m.current_leader,
                        is_leader: m.current_leader == Some(id) && m.state == ServerState::Leader,
                    };
                    (l, m.membership_config.voter_ids().collect::<Vec<_>>())
                };
                tx.send_if_modified(|cur| {
                    if *cur != l {
                        if cur.leader != l.leader {
                            tracing::info!(term = l.term, leader = ?l.leader, "leader changed");
                            observer.leader_changed(l.term, l.leader);
                        }
                        if l.is_leader && !cur.is_leader {
                            // A new leader (possibly restored from its saved vote after a
                            // restart, without an election) gets one quorum timeout of grace
                            // before it counts its followers as silent.
                            for v in &voters {
                                acks.ack(*v);
                            }
                            *acks.leader_since.lock().expect("not poisoned") = Some(Instant::now());
                        }
                        *cur = l;
                        true
                    } else {
                        false
                    }
                });
                tokio::select! {
                    _ = token.cancelled() => return,
                    r = metrics.changed() => if r.is_err() { return },
                }
            }
        });

        // Bound here (so a taken address fails the start), served on Raft's threads.
        let listener = std::net::TcpListener::bind(cfg.listen_peer)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| {
                StartError(format!("binding the peer address {}: {e}", cfg.listen_peer))
            })?;
        let serving = (
            cfg.tls
                .as_ref()
                .map(|t| (t.server.clone(), t.is_peer.clone())),
            replica.clone(),
            shutdown.clone(),
        );
        replica.raft_runtime().spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => service::serve(l, serving.0, serving.1, serving.2).await,
                Err(e) => tracing::error!(%e, "the peer listener"),
            }
        });

        if !cfg.join && !cfg.initial_cluster.is_empty() {
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| StartError(format!("raft stopped: {e}")))?;
            if !initialized {
                if !cfg.initial_cluster.contains_key(&cfg.id) {
                    return Err(StartError(format!(
                        "--initial-cluster does not name this replica (id {})",
                        cfg.id
                    )));
                }
                // Every member bootstraps with the same membership (API addresses are filled
                // in later by each member), so the first entry is identical everywhere.
                let nodes: BTreeMap<NodeId, Node> = cfg
                    .initial_cluster
                    .iter()
                    .map(|(id, peer)| {
                        (
                            *id,
                            Node {
                                peer_addr: peer.clone(),
                                api_addr: String::new(),
                            },
                        )
                    })
                    .collect();
                match raft.initialize(nodes).await {
                    Ok(()) => tracing::info!(
                        members = cfg.initial_cluster.len(),
                        "bootstrapped a new cluster"
                    ),
                    Err(RaftError::APIError(e)) => {
                        tracing::info!(%e, "cluster already initialized")
                    }
                    Err(e) => return Err(StartError(format!("bootstrapping: {e}"))),
                }
            }
        }

        tokio::spawn(announce_api_addr(replica.clone()));
        Ok(replica)
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.inner.cfg.id
    }

    /// The state machine (for reads and watches).
    pub fn kv(&self) -> &KvStore {
        &self.inner.kv
    }

    /// Subscribes to leadership changes.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.inner.leadership.clone()
    }

    /// The raw openraft handle (metrics, waiting in tests).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// A leader that has not heard from a majority for this long answers "no quorum".
    pub fn quorum_timeout(&self) -> Duration {
        self.inner.cfg.quorum_timeout()
    }

    /// The configured request deadline.
    pub fn request_timeout(&self) -> Duration {
        self.inner.cfg.request_timeout
    }

    /// Stops Raft, the peer listener and the store.
    /// Resolves when Raft has stopped on a fatal error, such as a storage write that failed
    /// (a full disk), with that error. A replica in that state serves nothing and never
    /// recovers by itself: its process should exit, so it is restarted once the cause is
    /// fixed (etcd exits likewise).
    pub async fn fatal(&self) -> String {
        let mut metrics = self.inner.raft.metrics();
        loop {
            if let Err(e) = &metrics.borrow_and_update().running_state {
                return e.to_string();
            }
            if metrics.changed().await.is_err() {
                return "raft stopped".into();
            }
        }
    }

    /// Stops Raft and closes the store.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(%e, "raft shutdown");
        }
        let _ = self.inner.kv.sync();
        self.inner.kv.close();
        // Raft's threads are stopped and waited for here, not left to finish in the
        // background when the replica is dropped: a task of theirs still holding the raft
        // log (its last handle, closing it) when the process exits aborts the process in
        // RocksDB ("pthread lock: Invalid argument", seen at exit in CI).
        let rt = self
            .inner
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rt) = rt {
            let stopped =
                tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(10)));
            if let Err(e) = stopped.await {
                tracing::warn!(%e, "stopping raft's threads");
            }
        }
    }

    /// Waits (up to a few election timeouts, within `deadline`) for a known leader.
    async fn leader(&self, deadline: Instant) -> Result<NodeId, Error> {
        let mut rx = self.inner.leadership.clone();
        let give_up = (Instant::now() + self.inner.cfg.election_max() * 3).min(deadline);
        loop {
            let l = *rx.borrow_and_update();
            if let Some(leader) = l.leader {
                return Ok(leader);
            }
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::NoLeader { term: l.term });
            }
            if tokio::time::timeout(left, rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return Err(Error::Stopped("leadership signal closed".into()));
            }
        }
    }

    /// True if this replica leads and has heard from a quorum within the quorum timeout
    /// (leader-only work stops when this turns false).
    pub fn leads_with_quorum(&self) -> bool {
        self.check_leading().is_ok()
    }

    /// Fails fast if this replica is not a leader that hears from a quorum.
    pub(crate) fn check_leading(&self) -> Result<(), Error> {
        let m = self.inner.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Err(Error::NotLeader {
                leader: m.current_leader,
            });
        }
        let age = self.quorum_lost_for(self.inner.cfg.quorum_timeout(), false);
        if !age.is_zero() {
            return Err(Error::NoQuorum {
                millis: age.as_millis().min(u128::from(u64::MAX)) as u64,
            });
        }
        Ok(())
    }

    /// Time since a majority of voters last answered this replica.
    fn quorum_age(&self) -> Duration {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        self.inner
            .acks
            .quorum_age(self.id(), &voters, Instant::now())
    }

    /// How long a majority of voters has been out of contact past `limit` (see
    /// [`PeerAcks::quorum_lost_for`]); zero if not.
    fn quorum_lost_for(&self, limit: Duration, refused_only: bool) -> Duration {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        self.inner
            .acks
            .quorum_lost_for(self.id(), &voters, limit, refused_only, Instant::now())
    }

    /// Resolves once the quorum has been out of contact (checked every heartbeat) for one
    /// quorum timeout if the peers refuse connections (their processes are gone), or for
    /// three if their RPCs time out: an in-flight write gives up on a cut-off leader well
    /// before the request timeout, but not on followers whose disk stalled for a second or
    /// two (their answers come once it recovers, and the write commits). A request not yet
    /// proposed is refused after one quorum timeout either way (`check_leading`): that
    /// refusal says for certain that nothing was applied.
    async fn quorum_lost(&self) -> Duration {
        let mut tick = tokio::time::interval(Duration::from_millis(self.inner.cfg.heartbeat_ms));
        let limit = self.inner.cfg.quorum_timeout();
        loop {
            tick.tick().await;
            let age = self
                .quorum_lost_for(limit, true)
                .max(self.quorum_lost_for(limit * 3, false));
            if !age.is_zero() {
                return age;
            }
        }
    }

    fn peer_addr(&self, id: NodeId) -> Option<String> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.peer_addr.clone())
    }

    /// Sends `req` to `to`; maps transport failures to errors that say whether it was sent.
    async fn forward(
        &self,
        to: NodeId,
        req: &ForwardRequest,
        deadline: Instant,
    ) -> Result<ForwardResponse, Error> {
        let term = self.inner.leadership.borrow().term;
        let addr = self.peer_addr(to).ok_or(Error::NoLeader { term })?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self
            .inner
            .peers
            .rpc::<_, Result<ForwardResponse, Error>>(&addr, "/raft/forward", req, timeout)
            .await
        {
            Ok(r) => r,
            Err(CallError::Connect(reason)) => Err(Error::Unreachable { leader: to, reason }),
            Err(CallError::Timeout(d)) => Err(Error::Timeout {
                millis: d.as_millis() as u64,
            }),
            Err(CallError::Other(reason)) => Err(Error::Timeout {
                millis: {
                    tracing::debug!(%reason, "forwarded request failed after sending");
                    timeout.as_millis() as u64
                },
            }),
        }
    }

    /// Runs `req` on the leader, forwarding if needed, retrying while it certainly was not
    /// applied.
    async fn on_leader(&self, req: ForwardRequest) -> Result<ForwardResponse, Error> {
        let deadline = Instant::now() + self.inner.cfg.request_timeout;
        let mut attempt = 0u32;
        loop {
            let leader = self.leader(deadline).await?;
            let result = if leader == self.id() {
                self.handle_local(req.clone(), deadline).await
            } else {
                self.forward(leader, &req, deadline).await
            };
            match result {
                Err(e @ (Error::NotLeader { .. } | Error::Unreachable { .. })) => {
                    attempt += 1;
                    let pause = Duration::from_millis(10 * u64::from(attempt.min(20)));
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(%e, attempt, "retrying on the leader");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    /// Proposes a command through the leader and returns its apply result. Retried (within
    /// the request deadline) while it was certainly not applied.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, Error> {
        let deadline = Instant::now() + self.inner.cfg.request_timeout;
        let mut attempt = 0u32;
        loop {
            self.leader(deadline).await?;
            let result = self
                .inner
                .proposer
                .submit(vec![cmd.clone()], false)
                .await
                .and_then(|mut v| {
                    v.pop()
                        .ok_or_else(|| Error::Internal("no outcome".into()))?
                });
            match result {
                Err(
                    e @ (Error::NotLeader { .. }
                    | Error::Unreachable { .. }
                    | Error::NoLeader { .. }),
                ) => {
                    attempt += 1;
                    let pause = Duration::from_millis(10 * u64::from(attempt.min(20)));
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(%e, attempt, "retrying a write");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    /// Proposes `cmd` on this replica only, fenced to `term`: the leader-only work
    /// (controllers, scheduler) writes this way. It is never forwarded and never retried: if
    /// this replica does not lead, it fails with [`Error::NotLeader`]; if the entry lands in
    /// another term than `term` (a deposed leader's late proposal), apply refuses it with
    /// [`ApplyError::Fenced`](crate::ApplyError::Fenced) on every replica alike.
    pub async fn write_fenced(&self, term: u64, mut cmd: Command) -> Result<CommandResult, Error> {
        cmd.fence_term = Some(term);
        let current = *self.leadership().borrow();
        if !current.is_leader || current.term != term {
            return Err(Error::NotLeader {
                leader: current.leader,
            });
        }
        self.inner
            .proposer
            .submit(vec![cmd], true)
            .await
            .and_then(|mut v| {
                v.pop()
                    .ok_or_else(|| Error::Internal("no outcome".into()))?
            })
    }

    /// Proposes one entry on this replica (the leader) and waits for its apply result. Once
    /// proposed, a failure leaves the outcome unknown: a timeout or the loss of the quorum
    /// is reported as such, never retried here.
    pub(crate) async fn client_write(&self, entry: Command) -> Result<CommandResult, Error> {
        let timeout = self.inner.cfg.request_timeout;
        let rx = self
            .inner
            .raft
            .client_write_ff(entry)
            .await
            .map_err(|e| Error::Stopped(e.to_string()))?;
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, rx) => r,
            age = self.quorum_lost() => return Err(Error::QuorumLost {
                millis: age.as_millis().min(u128::from(u64::MAX)) as u64,
            }),
        };
        match result {
            Err(_) => Err(Error::Timeout {
                millis: timeout.as_millis() as u64,
            }),
            // Proposed, then Raft stopped before answering (found by the chaos suite: a
            // leader whose disk filled died after replicating the entry, and the next
            // leader committed it). Not "stopped", which would promise it was not applied.
            Ok(Err(_)) => Err(Error::Interrupted(
                "raft stopped after the request was proposed".into(),
            )),
            Ok(Ok(Ok(resp))) => Ok(resp.data),
            Ok(Ok(Err(e))) => Err(map_write_error(RaftError::APIError(e))),
        }
    }

    /// Sends a follower's batch of writes to `leader`.
    pub(crate) async fn forward_writes(
        &self,
        leader: NodeId,
        cmds: Vec<Command>,
    ) -> Result<Vec<Outcome>, Error> {
        let n = cmds.len();
        self.inner.observer.forwarded(n);
        let deadline = Instant::now() + self.inner.cfg.request_timeout;
        match self
            .forward(leader, &ForwardRequest::WriteBatch(cmds), deadline)
            .await?
        {
            ForwardResponse::WriteBatch(outcomes) if outcomes.len() == n => Ok(outcomes),
            other => Err(Error::Internal(format!(
                "unexpected answer to {n} forwarded writes: {other:?}"
            ))),
        }
    }

    /// The quota error, if the store is over its quota.
    pub(crate) fn over_quota(&self) -> Option<String> {
        self.inner.kv.over_quota().map(|e| e.to_string())
    }

    /// Returns once this replica's state machine reflects every write acknowledged before the
    /// call (a linearizable read may follow).
    pub async fn read_barrier(&self) -> Result<(), Error> {
        let started = Instant::now();
        let result = async {
            // One round (on the leader, or forwarded to it) serves every read waiting when
            // it starts.
            let this = self.clone();
            let index = self
                .inner
                .reads
                .read_index(move || {
                    let this = this.clone();
                    async move {
                        match this.on_leader(ForwardRequest::ReadIndex).await? {
                            ForwardResponse::ReadIndex(i) => Ok(i),
                            other => Err(Error::Internal(format!("unexpected answer {other:?}"))),
                        }
                    }
                })
                .await?;
            self.wait_applied(index, self.inner.cfg.request_timeout)
                .await
        }
        .await;
        self.inner
            .observer
            .read_barrier(started.elapsed().as_secs_f64(), result.is_ok());
        result
    }

    /// Waits until the local state machine has applied `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), Error> {
        let applied = self
            .inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        if applied >= index {
            return Ok(());
        }
        self.inner
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(..) => Error::Timeout {
                    millis: timeout.as_millis() as u64,
                },
                openraft::metrics::WaitError::ShuttingDown => {
                    Error::Stopped("shutting down".into())
                }
            })
    }

    /// Adds a member as a learner, then (with `voter`) promotes it once it has caught up.
    pub async fn add_member(&self, id: NodeId, node: Node, voter: bool) -> Result<(), Error> {
        self.on_leader(ForwardRequest::AddMember { id, node, voter })
            .await
            .map(|_| ())
    }

    /// Promotes a learner to voter.
    pub async fn promote(&self, id: NodeId) -> Result<(), Error> {
        self.on_leader(ForwardRequest::Promote { id })
            .await
            .map(|_| ())
    }

    /// Removes a member (voter or learner).
    pub async fn remove_member(&self, id: NodeId) -> Result<(), Error> {
        self.on_leader(ForwardRequest::RemoveMember { id })
            .await
            .map(|_| ())
    }

    /// Moves leadership to `to`.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), Error> {
        self.on_leader(ForwardRequest::TransferLeader { to })
            .await
            .map(|_| ())
    }

    /// Handles a request on this replica (the leader, except for `Elect`).
    pub(crate) async fn handle_local(
        &self,
        req: ForwardRequest,
        deadline: Instant,
    ) -> Result<ForwardResponse, Error> {
        let raft = &self.inner.raft;
        match req {
            ForwardRequest::Elect => {
                raft.trigger()
                    .elect()
                    .await
                    .map_err(|e| Error::Stopped(e.to_string()))?;
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::WriteBatch(cmds) => {
                // Merged with this leader's other pending writes; never forwarded again.
                crate::proposer::trace_ids("forwarded writes received", &cmds);
                let outcomes = self.inner.proposer.submit(cmds, true).await?;
                Ok(ForwardResponse::WriteBatch(outcomes))
            }
            ForwardRequest::ReadIndex => {
                // openraft confirms leadership with one heartbeat round whose RPCs time out
                // after a heartbeat interval; under load a round can miss the quorum while
                // the peers are fine. Such a round is retried (a read changes nothing) as
                // long as the peers keep answering; a real loss of quorum fails fast in
                // `check_leading`.
                let mut attempt = 0u32;
                loop {
                    self.check_leading()?;
                    let limit = self
                        .inner
                        .cfg
                        .quorum_timeout()
                        .min(deadline.saturating_duration_since(Instant::now()));
                    match tokio::time::timeout(limit, raft.get_read_log_id()).await {
                        Err(_) => {
                            return Err(Error::NoQuorum {
                                millis: limit.as_millis() as u64,
                            })
                        }
                        Ok(Ok((read, _))) => {
                            return Ok(ForwardResponse::ReadIndex(read.map_or(0, |l| l.index)))
                        }
                        Ok(Err(RaftError::APIError(
                            openraft::error::CheckIsLeaderError::ForwardToLeader(f),
                        ))) => {
                            return Err(Error::NotLeader {
                                leader: f.leader_id,
                            })
                        }
                        Ok(Err(RaftError::APIError(
                            openraft::error::CheckIsLeaderError::QuorumNotEnough(q),
                        ))) => {
                            attempt += 1;
                            let pause = Duration::from_millis(5 * u64::from(attempt.min(10)));
                            if Instant::now() + pause >= deadline {
                                return Err(Error::NoQuorum {
                                    millis: self.quorum_age().as_millis() as u64,
                                });
                            }
                            tracing::debug!(%q, attempt, "read index round missed the quorum; retrying");
                            tokio::time::sleep(pause).await;
                        }
                        Ok(Err(RaftError::Fatal(f))) => return Err(Error::Stopped(f.to_string())),
                    }
                }
            }
            ForwardRequest::AddMember { id, node, voter } => {
                self.check_leading()?;
                if id == 0 {
                    return Err(Error::InvalidCluster("member id must be non-zero".into()));
                }
                let m = raft.metrics().borrow().membership_config.clone();
                if m.membership().get_node(&id).is_some() {
                    return Err(Error::InvalidCluster(format!("member {id} already exists")));
                }
                self.change_membership(
                    ChangeMembers::AddNodes(BTreeMap::from([(id, node)])),
                    true,
                    deadline,
                )
                .await?;
                if voter {
                    self.wait_caught_up(id, deadline).await?;
                    self.change_membership(
                        ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                        false,
                        deadline,
                    )
                    .await?;
                }
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::Promote { id } => {
                self.check_leading()?;
                self.require_member(id)?;
                self.wait_caught_up(id, deadline).await?;
                self.change_membership(
                    ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                    false,
                    deadline,
                )
                .await?;
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::RemoveMember { id } => {
                self.check_leading()?;
                self.require_member(id)?;
                let m = raft.metrics().borrow().membership_config.clone();
                let voters: BTreeSet<NodeId> = m.voter_ids().collect();
                if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(Error::InvalidCluster("cannot remove the last voter".into()));
                    }
                    self.change_membership(
                        ChangeMembers::RemoveVoters(BTreeSet::from([id])),
                        false,
                        deadline,
                    )
                    .await?;
                } else {
                    self.change_membership(
                        ChangeMembers::RemoveNodes(BTreeSet::from([id])),
                        false,
                        deadline,
                    )
                    .await?;
                }
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::SetNode { id, node } => {
                self.check_leading()?;
                let m = raft.metrics().borrow().membership_config.clone();
                match m.membership().get_node(&id) {
                    Some(cur) if cur.peer_addr == node.peer_addr => {}
                    Some(_) => {
                        return Err(Error::InvalidCluster(
                            "a member's peer address cannot change; remove and re-add it".into(),
                        ))
                    }
                    None => return Err(Error::InvalidCluster(format!("unknown member {id}"))),
                }
                self.change_membership(
                    ChangeMembers::SetNodes(BTreeMap::from([(id, node)])),
                    true,
                    deadline,
                )
                .await?;
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::TransferLeader { to } => {
                self.check_leading()?;
                if to == self.id() {
                    return Ok(ForwardResponse::Done);
                }
                let m = raft.metrics().borrow().membership_config.clone();
                if !m.voter_ids().any(|v| v == to) {
                    return Err(Error::InvalidCluster(format!("member {to} is not a voter")));
                }
                self.transfer_to(to, deadline).await?;
                Ok(ForwardResponse::Done)
            }
        }
    }

    /// A membership change, retried while another change is still in progress (openraft
    /// allows one at a time; members announcing their API addresses make overlaps common).
    async fn change_membership(
        &self,
        changes: ChangeMembers<NodeId, Node>,
        retain: bool,
        deadline: Instant,
    ) -> Result<(), Error> {
        loop {
            match self
                .inner
                .raft
                .change_membership(changes.clone(), retain)
                .await
            {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(p),
                ))) => {
                    if Instant::now() + Duration::from_millis(20) >= deadline {
                        return Err(Error::InvalidCluster(p.to_string()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(map_write_error(e)),
            }
        }
    }

    fn require_member(&self, id: NodeId) -> Result<(), Error> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        if m.membership().get_node(&id).is_none() {
            return Err(Error::InvalidCluster(format!("unknown member {id}")));
        }
        Ok(())
    }

    /// Waits until `id` has replicated the leader's last log entry.
    async fn wait_caught_up(&self, id: NodeId, deadline: Instant) -> Result<(), Error> {
        let mut rx = self.inner.raft.metrics();
        loop {
            {
                let m = rx.borrow_and_update();
                let last = m.last_log_index.unwrap_or(0);
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map_or(0, |l| l.index);
                if matched >= last {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return Err(Error::Timeout {
                    millis: self.inner.cfg.request_timeout.as_millis() as u64,
                });
            }
        }
    }

    /// Leader transfer: once `to` holds the whole log, it starts an election; this leader
    /// (whose own lease does not block it) votes for it. Retried until the deadline, because
    /// a write landing in between makes the candidate's log short.
    async fn transfer_to(&self, to: NodeId, deadline: Instant) -> Result<(), Error> {
        let addr = self
            .peer_addr(to)
            .ok_or_else(|| Error::InvalidCluster(format!("unknown member {to}")))?;
        // openraft refuses votes while the voter's leader lease (the maximum election timeout)
        // runs; this leader's lease started when it was elected. Wait it out, or the target's
        // election fails and only disrupts.
        let since = *self.inner.acks.leader_since.lock().expect("not poisoned");
        if let Some(since) = since {
            let lease = self.inner.cfg.election_max() + Duration::from_millis(20);
            let wait = lease.saturating_sub(since.elapsed());
            tokio::time::sleep(wait).await;
        }
        let mut rx = self.inner.leadership.clone();
        while Instant::now() < deadline {
            let l = *rx.borrow();
            if l.leader == Some(to) {
                return Ok(());
            }
            if !l.is_leader {
                // A failed attempt can cost this replica its leadership; let the caller
                // retry on whoever leads now.
                return Err(Error::NotLeader { leader: l.leader });
            }
            self.wait_caught_up(to, deadline).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self
                .inner
                .peers
                .rpc::<_, Result<ForwardResponse, Error>>(
                    &addr,
                    "/raft/forward",
                    &ForwardRequest::Elect,
                    left,
                )
                .await;
            let wait_until = (Instant::now() + self.inner.cfg.election_max() * 2).min(deadline);
            loop {
                if rx.borrow_and_update().leader == Some(to) {
                    tracing::info!(to, "leadership transferred");
                    return Ok(());
                }
                let left = wait_until.saturating_duration_since(Instant::now());
                if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                    break;
                }
            }
        }
        Err(Error::Timeout {
            millis: self.inner.cfg.request_timeout.as_millis() as u64,
        })
    }

    /// A snapshot of this replica's state.
    pub fn status(&self) -> Status {
        let m = self.inner.raft.metrics().borrow().clone();
        let store = self.inner.kv.status();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                node: node.clone(),
                voter: voters.contains(id),
            })
            .collect();
        Status {
            id: self.id(),
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_string(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: self.inner.committed.load(Ordering::Acquire),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            revision: store.revision,
            compact_revision: store.compact_revision,
            keys: store.keys,
            db_size: store.db_size,
            quota_bytes: store.quota_bytes,
            watchers: store.watchers,
            millis_since_quorum_ack: (m.state == ServerState::Leader)
                .then(|| self.quorum_age().as_millis().min(u128::from(u64::MAX)) as u64),
            replication: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
            members,
        }
    }
}

fn map_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Error::InvalidCluster(c.to_string())
        }
        RaftError::Fatal(f) => Error::Stopped(f.to_string()),
    }
}

/// Keeps this replica's API address in the membership up to date (members bootstrap with
/// empty API addresses; each fills in its own).
async fn announce_api_addr(replica: Replica) {
    let cfg = &replica.inner.cfg;
    if cfg.advertise_api.is_empty() {
        return;
    }
    let mut rx = replica.inner.raft.metrics();
    let mut backoff = Duration::from_millis(50);
    loop {
        let current = {
            let m = rx.borrow_and_update();
            if m.current_leader.is_some() {
                m.membership_config.membership().get_node(&cfg.id).cloned()
            } else {
                None
            }
        };
        if let Some(node) = current {
            if node.api_addr != cfg.advertise_api {
                let want = Node {
                    peer_addr: node.peer_addr.clone(),
                    api_addr: cfg.advertise_api.clone(),
                };
                match replica
                    .on_leader(ForwardRequest::SetNode {
                        id: cfg.id,
                        node: want,
                    })
                    .await
                {
                    Ok(_) => {
                        tracing::info!(api = %cfg.advertise_api, "announced API address");
                        backoff = Duration::from_millis(50);
                    }
                    Err(e) => {
                        tracing::debug!(%e, "announcing API address failed; will retry");
                        tokio::select! {
                            _ = replica.inner.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
        }
        tokio::select! {
            _ = replica.inner.shutdown.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(1000);

    fn acks(contacts: &[(NodeId, Option<u64>, Option<u64>)], now: Instant) -> PeerAcks {
        acks_refused(contacts, false, now)
    }

    fn acks_refused(
        contacts: &[(NodeId, Option<u64>, Option<u64>)],
        refused: bool,
        now: Instant,
    ) -> PeerAcks {
        let acks = PeerAcks::default();
        let ago = |ms: Option<u64>| ms.map(|ms| now - Duration::from_millis(ms));
        for (id, ok, failing) in contacts {
            acks.peers.lock().unwrap().insert(
                *id,
                PeerContact {
                    ok: ago(*ok),
                    failing_since: ago(*failing),
                    refused,
                },
            );
        }
        acks
    }

    #[test]
    fn silence_without_failed_rpcs_is_not_a_lost_quorum() {
        let now = Instant::now() + Duration::from_secs(10);
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        // The leader stalled for 1.5 s: nothing sent, nothing heard, nothing failed.
        let stalled = acks(&[(2, Some(1500), None), (3, Some(1500), None)], now);
        assert_eq!(
            stalled.quorum_age(1, &voters, now),
            Duration::from_millis(1500)
        );
        assert_eq!(
            stalled.quorum_lost_for(1, &voters, LIMIT, false, now),
            Duration::ZERO
        );
        // Just after the stall, one heartbeat timed out (its timer ran out during it).
        let resumed = acks(&[(2, Some(1500), Some(10)), (3, Some(1500), Some(10))], now);
        assert_eq!(
            resumed.quorum_lost_for(1, &voters, LIMIT, false, now),
            Duration::ZERO
        );
        // No answer at all for three limits counts even without failures (a hung stream).
        let hung = acks(&[(2, Some(3500), None), (3, Some(3500), None)], now);
        assert_eq!(
            hung.quorum_lost_for(1, &voters, LIMIT, false, now),
            Duration::from_millis(3500)
        );
    }

    #[test]
    fn peers_that_keep_failing_are_out_of_contact_once_a_majority_is() {
        let now = Instant::now() + Duration::from_secs(10);
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        // Partitioned: both peers silent for 1.2 s and failing for 1.1 s.
        let cut = acks(
            &[(2, Some(1200), Some(1100)), (3, Some(1200), Some(1100))],
            now,
        );
        assert_eq!(
            cut.quorum_lost_for(1, &voters, LIMIT, false, now),
            Duration::from_millis(1200)
        );
        // One peer still answers: the quorum (leader + that peer) holds.
        let one = acks(&[(2, Some(1200), Some(1100)), (3, Some(20), None)], now);
        assert_eq!(
            one.quorum_lost_for(1, &voters, LIMIT, false, now),
            Duration::ZERO
        );
        // Failing, but answered within the limit: not yet.
        let recent = acks(&[(2, Some(800), Some(700)), (3, Some(800), Some(700))], now);
        assert_eq!(
            recent.quorum_lost_for(1, &voters, LIMIT, false, now),
            Duration::ZERO
        );
        // Timing out is not refusing: only peers whose processes are gone count as refused.
        assert_eq!(
            cut.quorum_lost_for(1, &voters, LIMIT, true, now),
            Duration::ZERO
        );
        let gone = acks_refused(
            &[(2, Some(1200), Some(1100)), (3, Some(1200), Some(1100))],
            true,
            now,
        );
        assert_eq!(
            gone.quorum_lost_for(1, &voters, LIMIT, true, now),
            Duration::from_millis(1200)
        );
        // Never heard from at all.
        let never = acks(&[], now);
        assert_eq!(
            never.quorum_lost_for(1, &voters, LIMIT, false, now),
            Duration::MAX
        );
    }
}
