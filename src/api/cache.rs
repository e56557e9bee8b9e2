//! The watch cache: lists and watches of the resources asked for in numbers (pods, nodes,
//! services, endpoints, endpoint slices) served from memory, as kube-apiserver's cacher does.
//!
//! Per resource, once something lists or watches it on this replica, one store watcher feeds
//! a [`WatchCache`] holding the current objects (their stored bytes, shared, not parsed) and
//! a window of the latest changes. Pods are indexed by `spec.nodeName`: a node agent's list
//! touches only its node's pods, and a change wakes only the watchers of the nodes it
//! concerns (the node before and after) and the watchers that are not by node. Without
//! it, every pod change woke one store watcher per node agent, each parsing and filtering
//! (1,000 hollow nodes: 1,000 wake-ups per change), and every relist read every pod from
//! RocksDB.
//!
//! Owns, per resource: the objects, the node index, the window, the registered watchers.
//! Invariants (all under one lock):
//! - every event of the resource up to `rev` has been applied to `objects` and appended to
//!   `history`, and none after it;
//! - `history` holds every event with a revision above `since`, in revision order, and at
//!   most the configured number of events (`--watch-cache-size`);
//! - events are handed to watchers under the lock that applies them, and a watcher is
//!   registered under it with its replay (or its initial objects) read at `rev`, so each
//!   watcher sees exactly the events after its start: no gap, no duplicate;
//! - a watcher's buffer is bounded; a full one is cancelled as slow (its client resumes from
//!   its last resourceVersion, from the window): the feeder never waits for a watcher;
//! - a consistent read (no `resourceVersion`) is served only once `rev` has reached the
//!   replica's revision after a read barrier, so it sees every acknowledged write.
//!
//! A watch with selectors from a revision older than the window of a loaded cache is refused
//! as expired (410), as kube-apiserver's watch cache refuses it: its client relists (from
//! the cache) and watches on. Replaying the store's history instead cost every such watcher
//! a parse of every change since (at 88,000 pods, thousands of node agents resuming watches
//! by node that had fallen out of a window of a few seconds took most of every replica's
//! CPU). One without selectors is replayed from the store (its stored bytes go out as they
//! are, unparsed). A watch from a revision the cache has not reached yet is registered at
//! once and skips the changes up to it as they arrive.
//!
//! While the cache is still loading, a list or watch it would serve gets 429 (clients retry;
//! the node agent tries another replica). Once loaded, a read that names a revision the
//! cache does not reach within [`CATCH_UP`] is refused as 504 "Too large resource version";
//! a consistent read (no `resourceVersion`) that it does not catch up with in time goes to
//! the store, at most [`BEHIND_STORE_LISTS`] at once (429 past that). A page of a list
//! always comes from the store. Both paths give the same bytes. No watch of a cached
//! resource gets a store watcher of its own but one replaying, without selectors, from
//! before the window: a store watcher copies every change of the resource into its buffer,
//! and a replica restarted at 150,000 pods, with a store watcher per reconnecting node agent,
//! grew to 9 GiB.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use flotilla_store as store;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::resources::Resource;
use super::selector::{FieldSelector, LabelSelector};
use super::watch::{Decoded, Nodes, Side};

/// Events kept per resource by default (`--watch-cache-size`).
pub const DEFAULT_WINDOW: usize = 10_000;

/// Messages buffered per watcher (each a batch of one store message's events).
const WATCHER_BUFFER: usize = 1024;

/// Events buffered per watcher, over all its messages: a store message can carry hundreds
/// (a namespace's pods deleted at once), so the bound in messages alone let one slow watcher
/// hold on to a few hundred thousand events, each with its stored bytes. As many as the
/// window holds: a watcher further behind resumes from a relist anyway.
const WATCHER_EVENTS: usize = DEFAULT_WINDOW;

/// Keys read per chunk while (re)loading a resource.
const LOAD_CHUNK: i64 = 5_000;

/// How long a read waits for the cache to catch up (as kube-apiserver's watch cache waits)
/// before a consistent list goes to the store and one that named a `resourceVersion` is
/// refused as too large.
const CATCH_UP: Duration = Duration::from_secs(3);

/// Most consistent lists served from the store at once because the cache was behind: each
/// reads the whole range (at 150,000 pods, a few hundred MB), so a replica catching up
/// after a restart, serving hundreds of them at once for reconnecting node agents, fell
/// further behind and ran out of memory. Past it, 429 (client-go retries after
/// `Retry-After`; the node agent tries another replica).
const BEHIND_STORE_LISTS: usize = 2;

/// The resources kept in memory, by (group, plural): the ones node agents and controllers
/// list and watch in numbers. Secrets stay out (they are encrypted at rest; the cache would
/// hold them in the clear).
fn cached(r: &Resource) -> bool {
    matches!(
        (r.group, r.plural),
        ("", "pods" | "nodes" | "services" | "endpoints") | ("discovery.k8s.io", "endpointslices")
    )
}

/// This replica's watch caches, one per resource, made on first use.
pub(crate) struct Caches {
    kv: store::KvStore,
    shutdown: CancellationToken,
    window: usize,
    map: Mutex<HashMap<String, Arc<WatchCache>>>,
    /// The feeders, awaited at shutdown (see [`Caches::stopped`]).
    feeders: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Permits for consistent lists served from the store while a cache is behind.
    behind: Arc<tokio::sync::Semaphore>,
}

impl Caches {
    /// Caches over `kv` keeping `window` events per resource (0: no cache).
    pub(crate) fn new(kv: store::KvStore, shutdown: CancellationToken, window: usize) -> Caches {
        Caches {
            kv,
            shutdown,
            window,
            map: Mutex::new(HashMap::new()),
            feeders: Mutex::default(),
            behind: Arc::new(tokio::sync::Semaphore::new(BEHIND_STORE_LISTS)),
        }
    }

    /// Leave to serve a consistent list from the store because the cache that would serve
    /// it is behind (held while it is read); `None` when [`BEHIND_STORE_LISTS`] are.
    pub(crate) fn behind_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.behind.clone().try_acquire_owned().ok()
    }

    /// Waits until every feeder has ended (after the shutdown token was cancelled): a load
    /// still reading the store on a blocking thread when the process exits aborts it
    /// (RocksDB torn down under the read: "pthread lock: Invalid argument").
    pub(crate) async fn stopped(&self) {
        let feeders = std::mem::take(&mut *self.feeders.lock().expect("not poisoned"));
        for f in feeders {
            let _ = f.await;
        }
    }

    /// The cache of `r`, started if this is its first use; `None` if `r` is not cached.
    pub(crate) fn get(&self, r: &'static Resource) -> Option<Arc<WatchCache>> {
        if self.window == 0 || !cached(r) || super::encryption::may_encrypt(r.prefix().as_bytes()) {
            return None;
        }
        let prefix = r.prefix();
        let mut map = self.map.lock().expect("not poisoned");
        if let Some(c) = map.get(&prefix) {
            return Some(c.clone());
        }
        let c = Arc::new(WatchCache::new(
            prefix.clone().into_bytes(),
            r.plural == "pods" && r.group.is_empty(),
            self.window,
        ));
        map.insert(prefix, c.clone());
        let feeder = tokio::spawn(feed(c.clone(), self.kv.clone(), self.shutdown.clone()));
        self.feeders.lock().expect("not poisoned").push(feeder);
        Some(c)
    }
}

/// An object as the cache holds it.
#[derive(Clone)]
struct Obj {
    raw: Bytes,
    revision: i64,
    node: Option<Arc<str>>,
}

/// One change in the window.
struct Change {
    key: Vec<u8>,
    revision: i64,
    /// `spec.nodeName` after and before the change (pods only).
    nodes: Nodes,
    event: Arc<Decoded>,
}

/// What a watcher wants: keys in `[start, end)`, and with `node`, only changes of objects
/// on that node (before or after the change).
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    pub(crate) start: Vec<u8>,
    pub(crate) end: Vec<u8>,
    pub(crate) node: Option<String>,
}

impl Filter {
    fn wants_key(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    fn wants(&self, c: &Change) -> bool {
        self.wants_key(&c.key)
            && self
                .node
                .as_deref()
                .is_none_or(|n| c.nodes.0.as_deref() == Some(n) || c.nodes.1.as_deref() == Some(n))
    }
}

struct Registered {
    filter: Filter,
    /// Changes up to this revision are not the watcher's (it started from a revision the
    /// cache had not reached yet).
    after: i64,
    tx: mpsc::Sender<Vec<Arc<Decoded>>>,
    /// Events sent and not yet taken (at most [`WATCHER_EVENTS`]).
    pending: Arc<std::sync::atomic::AtomicUsize>,
    reason: Arc<OnceLock<store::CancelReason>>,
}

#[derive(Default)]
struct Inner {
    /// Loaded and following the store.
    ready: bool,
    rev: i64,
    since: i64,
    objects: BTreeMap<Vec<u8>, Obj>,
    /// Keys by `spec.nodeName` (pods).
    by_node: HashMap<Arc<str>, HashSet<Vec<u8>>>,
    history: VecDeque<Change>,
    watchers: HashMap<u64, Registered>,
    /// Watchers by node, and the ones that are not by node.
    node_watchers: HashMap<Arc<str>, HashSet<u64>>,
    others: HashSet<u64>,
    next_id: u64,
}

/// One resource's objects and recent changes, kept by one feeder task.
pub(crate) struct WatchCache {
    prefix: Vec<u8>,
    index_nodes: bool,
    window: usize,
    inner: Mutex<Inner>,
    /// Wakes readers waiting for `rev` to advance.
    advanced: tokio::sync::watch::Sender<i64>,
    /// Asks the feeder for a progress notification (the store's revision).
    want_progress: Notify,
}

/// A list answer: the objects (stored bytes and mod revision) and the revision read at.
pub(crate) type Listed = (Vec<(Bytes, i64)>, i64);

impl WatchCache {
    fn new(prefix: Vec<u8>, index_nodes: bool, window: usize) -> WatchCache {
        WatchCache {
            prefix,
            index_nodes,
            window: window.max(1),
            inner: Mutex::new(Inner::default()),
            advanced: tokio::sync::watch::channel(0).0,
            want_progress: Notify::new(),
        }
    }

    /// The filter of a request for keys in `[start, end)` with these selectors (by node
    /// only where this cache indexes nodes), and whether the index alone decides what
    /// matches (the selectors are `spec.nodeName=X` and nothing else).
    pub(crate) fn filter(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Filter, bool) {
        let node = fields.node_name().filter(|_| self.index_nodes);
        let by_index = node.is_some() && labels.is_empty() && fields.only_node_name().is_some();
        (
            Filter {
                start,
                end,
                node: node.map(String::from),
            },
            by_index,
        )
    }

    /// Waits until the cache is loaded and holds every change up to `revision`; false if
    /// that takes longer than the catch-up bound.
    pub(crate) async fn wait_for(&self, revision: i64) -> bool {
        let mut rx = self.advanced.subscribe();
        let until = tokio::time::Instant::now() + CATCH_UP;
        loop {
            {
                let inner = self.inner.lock().expect("not poisoned");
                if inner.ready && inner.rev >= revision {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            self.want_progress.notify_one();
            let tick = (tokio::time::Instant::now() + Duration::from_millis(50)).min(until);
            let _ = tokio::time::timeout_at(tick, rx.changed()).await;
        }
    }

    /// Whether the cache has been loaded (and is following the store).
    pub(crate) fn loaded(&self) -> bool {
        self.inner.lock().expect("not poisoned").ready
    }

    /// The revision the cache holds every change up to.
    pub(crate) fn revision(&self) -> i64 {
        self.inner.lock().expect("not poisoned").rev
    }

    /// The objects `filter` selects, at the cache's revision (`None` while not loaded).
    pub(crate) fn list(&self, filter: &Filter) -> Option<Listed> {
        let inner = self.inner.lock().expect("not poisoned");
        if !inner.ready {
            return None;
        }
        Some((inner.select(filter, self.index_nodes), inner.rev))
    }

    /// Registers a watcher of the changes after `after`, replaying those already in the
    /// window. `after` may be newer than the cache (a client resuming on this replica from
    /// a revision another replica served, or from a list read from the store): the changes
    /// up to it are skipped as they arrive, and no progress is reported before it, as
    /// kube-apiserver's watch cache does. `Ok(None)` while the cache is not loaded.
    /// `Err(since)` when `after` is older than the window of a loaded cache (the caller
    /// refuses the watch as expired or replays the store's history; see the module docs).
    pub(crate) fn watch_from(
        self: &Arc<Self>,
        filter: Filter,
        after: i64,
    ) -> Result<Option<Subscription>, i64> {
        let mut inner = self.inner.lock().expect("not poisoned");
        if !inner.ready {
            return Ok(None);
        }
        if after < inner.since {
            return Err(inner.since);
        }
        let replay: VecDeque<Arc<Decoded>> = inner
            .history
            .iter()
            .filter(|c| c.revision > after && filter.wants(c))
            .map(|c| c.event.clone())
            .collect();
        Ok(Some(self.register(&mut inner, filter, after, replay)))
    }

    /// The objects `filter` selects and a watcher of every change after them, both at the
    /// cache's revision (`None` while not loaded).
    pub(crate) fn list_and_watch(
        self: &Arc<Self>,
        filter: Filter,
    ) -> Option<(Listed, Subscription)> {
        let mut inner = self.inner.lock().expect("not poisoned");
        if !inner.ready {
            return None;
        }
        let listed = (inner.select(&filter, self.index_nodes), inner.rev);
        let at = inner.rev;
        Some((
            listed,
            self.register(&mut inner, filter, at, VecDeque::new()),
        ))
    }

    fn register(
        self: &Arc<Self>,
        inner: &mut Inner,
        filter: Filter,
        after: i64,
        replay: VecDeque<Arc<Decoded>>,
    ) -> Subscription {
        let id = inner.next_id;
        inner.next_id += 1;
        let (tx, rx) = mpsc::channel(WATCHER_BUFFER);
        let pending: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let reason = Arc::new(OnceLock::new());
        match filter.node.as_deref().filter(|_| self.index_nodes) {
            Some(n) => {
                inner
                    .node_watchers
                    .entry(Arc::from(n))
                    .or_default()
                    .insert(id);
            }
            None => {
                inner.others.insert(id);
            }
        }
        inner.watchers.insert(
            id,
            Registered {
                filter,
                after,
                tx,
                pending: pending.clone(),
                reason: reason.clone(),
            },
        );
        Subscription {
            cache: self.clone(),
            id,
            rx,
            pending,
            replay,
            reason,
            after,
            want_progress: false,
        }
    }

    fn remove(&self, id: u64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.unregister(id);
    }

    /// Replaces the contents with a fresh load at `revision` (the feeder's first step, and
    /// every resynchronisation).
    fn install(&self, objects: Vec<(Vec<u8>, Bytes, i64)>, revision: i64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.objects.clear();
        inner.by_node.clear();
        inner.history.clear();
        for (key, raw, rev) in objects {
            let node = self.node_of(&raw);
            if let Some(n) = &node {
                inner
                    .by_node
                    .entry(n.clone())
                    .or_default()
                    .insert(key.clone());
            }
            inner.objects.insert(
                key,
                Obj {
                    raw,
                    revision: rev,
                    node,
                },
            );
        }
        inner.rev = revision;
        inner.since = revision;
        inner.ready = true;
        drop(inner);
        self.advanced.send_replace(revision);
    }

    /// Stops serving and ends every watcher (the feeder lost the store's stream). The
    /// watchers' clients resume from their last resourceVersion, from the store until the
    /// cache is loaded again.
    fn reset(&self, reason: store::CancelReason) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.ready = false;
        inner.objects.clear();
        inner.by_node.clear();
        inner.history.clear();
        for (_, w) in inner.watchers.drain() {
            let _ = w.reason.set(reason.clone());
        }
        inner.node_watchers.clear();
        inner.others.clear();
    }

    /// Every event up to `revision` has been seen (a store progress notification).
    fn advance(&self, revision: i64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        if revision > inner.rev {
            inner.rev = revision;
            drop(inner);
            self.advanced.send_replace(revision);
        }
    }

    /// Applies one store message's events (whole revisions, in order) and hands each to
    /// the watchers it concerns.
    fn apply(&self, events: Vec<store::Event>) {
        let mut out: HashMap<u64, (i64, Vec<Arc<Decoded>>)> = HashMap::new();
        let mut inner = self.inner.lock().expect("not poisoned");
        let mut last = inner.rev;
        for e in events {
            let key = e.kv.key;
            let revision = e.kv.mod_revision;
            last = last.max(revision);
            let prev = match e.kind {
                store::EventKind::Put => {
                    let raw = Bytes::from(e.kv.value);
                    let node = self.node_of(&raw);
                    inner.insert(
                        key.clone(),
                        Obj {
                            raw,
                            revision,
                            node,
                        },
                    )
                }
                store::EventKind::Delete => inner.delete(&key),
            };
            let new = inner
                .objects
                .get(&key)
                .filter(|_| e.kind == store::EventKind::Put);
            let nodes = (
                new.and_then(|o| o.node.clone()),
                prev.as_ref().and_then(|o| o.node.clone()),
            );
            let event = Arc::new(Decoded::from_cache(
                new.map(|o| Side::shared(o.raw.clone(), revision)),
                prev.map(|p| {
                    // A delete carries the deletion's revision (as the `DELETED` event does).
                    let at = if e.kind == store::EventKind::Delete {
                        revision
                    } else {
                        p.revision
                    };
                    Side::shared(p.raw, at)
                }),
                self.index_nodes.then(|| nodes.clone()),
            ));
            let change = Change {
                key,
                revision,
                nodes,
                event,
            };
            inner.dispatch(&change, &mut out);
            inner.history.push_back(change);
            while inner.history.len() > self.window {
                if let Some(old) = inner.history.pop_front() {
                    inner.since = old.revision;
                }
            }
        }
        inner.rev = last;
        let mut slow = Vec::new();
        for (id, (first, batch)) in out {
            if let Some(w) = inner.watchers.get(&id) {
                use std::sync::atomic::Ordering::Relaxed;
                // Counted before it is sent (the watcher may take it at once); one batch
                // larger than the bound still goes to a watcher that has nothing waiting.
                let n = batch.len();
                let before = w.pending.fetch_add(n, Relaxed);
                let room = before == 0 || before + n <= WATCHER_EVENTS;
                if !(room && w.tx.try_send(batch).is_ok()) {
                    w.pending.fetch_sub(n, Relaxed);
                    let _ = w.reason.set(store::CancelReason::Slow {
                        resume_revision: first,
                    });
                    slow.push(id);
                }
            }
        }
        for id in slow {
            inner.unregister(id);
        }
        drop(inner);
        self.advanced.send_replace(last);
    }

    /// `spec.nodeName` of a stored pod (pods only; an object that does not parse has none).
    fn node_of(&self, raw: &[u8]) -> Option<Arc<str>> {
        if !self.index_nodes {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Pod {
            spec: Option<Spec>,
        }
        #[derive(serde::Deserialize)]
        struct Spec {
            #[serde(rename = "nodeName")]
            node_name: Option<String>,
        }
        serde_json::from_slice::<Pod>(raw)
            .ok()
            .and_then(|p| p.spec?.node_name)
            .filter(|n| !n.is_empty())
            .map(Arc::from)
    }
}

impl Inner {
    /// Stores `obj` at `key`; returns what it replaced.
    fn insert(&mut self, key: Vec<u8>, obj: Obj) -> Option<Obj> {
        if let Some(n) = &obj.node {
            self.by_node
                .entry(n.clone())
                .or_default()
                .insert(key.clone());
        }
        let prev = self.objects.insert(key.clone(), obj);
        let new_node = self.objects.get(&key).and_then(|o| o.node.clone());
        if let Some(p) = prev.as_ref().and_then(|p| p.node.as_ref()) {
            if new_node.as_ref() != Some(p) {
                self.unindex(p, &key);
            }
        }
        prev
    }

    fn delete(&mut self, key: &[u8]) -> Option<Obj> {
        let prev = self.objects.remove(key)?;
        if let Some(n) = &prev.node {
            self.unindex(n, key);
        }
        Some(prev)
    }

    fn unindex(&mut self, node: &Arc<str>, key: &[u8]) {
        if let Some(keys) = self.by_node.get_mut(node) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// The objects `filter` selects, in key order.
    fn select(&self, filter: &Filter, indexed: bool) -> Vec<(Bytes, i64)> {
        let take = |o: &Obj| (o.raw.clone(), o.revision);
        match filter.node.as_deref().filter(|_| indexed) {
            Some(n) => {
                let mut keys: Vec<&Vec<u8>> = self
                    .by_node
                    .get(n)
                    .map(|ks| ks.iter().filter(|k| filter.wants_key(k)).collect())
                    .unwrap_or_default();
                keys.sort();
                keys.into_iter()
                    .filter_map(|k| self.objects.get(k).map(take))
                    .collect()
            }
            None => {
                let range = match filter.end.is_empty() {
                    true => self.objects.range(filter.start.clone()..),
                    false => self.objects.range(filter.start.clone()..filter.end.clone()),
                };
                range.map(|(_, o)| take(o)).collect()
            }
        }
    }

    /// Adds `c` to the batch of every watcher it concerns.
    fn dispatch(&self, c: &Change, out: &mut HashMap<u64, (i64, Vec<Arc<Decoded>>)>) {
        let mut to = |id: &u64| {
            if let Some(w) = self.watchers.get(id) {
                if c.revision > w.after && w.filter.wants(c) {
                    out.entry(*id)
                        .or_insert_with(|| (c.revision, Vec::new()))
                        .1
                        .push(c.event.clone());
                }
            }
        };
        self.others.iter().for_each(&mut to);
        let (after, before) = &c.nodes;
        if let Some(ids) = after.as_ref().and_then(|n| self.node_watchers.get(n)) {
            ids.iter().for_each(&mut to);
        }
        if before != after {
            if let Some(ids) = before.as_ref().and_then(|n| self.node_watchers.get(n)) {
                ids.iter().for_each(&mut to);
            }
        }
    }

    fn unregister(&mut self, id: u64) {
        let Some(w) = self.watchers.remove(&id) else {
            return;
        };
        self.others.remove(&id);
        if let Some(n) = w.filter.node.as_deref() {
            if let Some(ids) = self.node_watchers.get_mut(n) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.node_watchers.remove(n);
                }
            }
        }
    }
}

/// A watcher registered with a cache. Dropping it deregisters it.
pub(crate) struct Subscription {
    cache: Arc<WatchCache>,
    id: u64,
    rx: mpsc::Receiver<Vec<Arc<Decoded>>>,
    /// Events in `rx` (shared with the feeder, which bounds it).
    pending: Arc<std::sync::atomic::AtomicUsize>,
    replay: VecDeque<Arc<Decoded>>,
    reason: Arc<OnceLock<store::CancelReason>>,
    /// The revision the watcher started after (no progress is reported below it).
    after: i64,
    want_progress: bool,
}

/// What a [`Subscription`] yields.
pub(crate) enum Message {
    /// Changes, in revision order.
    Events(Vec<Arc<Decoded>>),
    /// Every change up to this revision has been yielded.
    Progress(i64),
}

/// Most replayed events handed over at once.
const REPLAY_BATCH: usize = 256;

impl Subscription {
    /// The next changes, or why the watch ended.
    pub(crate) async fn recv(&mut self) -> Result<Message, store::CancelReason> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(REPLAY_BATCH);
            return Ok(Message::Events(self.replay.drain(..n).collect()));
        }
        if self.want_progress {
            // Every change up to `rev` was queued before `rev` could be read; an empty
            // queue after reading it means all of them have been yielded.
            let rev = self.cache.inner.lock().expect("not poisoned").rev;
            if self.rx.is_empty() && rev >= self.after {
                self.want_progress = false;
                return Ok(Message::Progress(rev));
            }
        }
        match self.rx.recv().await {
            Some(batch) => {
                self.pending
                    .fetch_sub(batch.len(), std::sync::atomic::Ordering::Relaxed);
                Ok(Message::Events(batch))
            }
            None => Err(self
                .reason
                .get()
                .cloned()
                .unwrap_or(store::CancelReason::Closed)),
        }
    }

    /// Asks for a [`Message::Progress`] (yielded once the queue is drained).
    pub(crate) fn request_progress(&mut self) {
        self.want_progress = true;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cache.remove(self.id);
    }
}

/// Keeps `cache` following the store: load, watch from the load's revision, apply; if the
/// feeder falls behind, resume from where it was; on any other break of the stream
/// (compaction past it, a snapshot install), reset and load again.
async fn feed(cache: Arc<WatchCache>, kv: store::KvStore, shutdown: CancellationToken) {
    let end = super::objects::prefix_end(&cache.prefix);
    let mut backoff = Duration::from_millis(100);
    loop {
        if shutdown.is_cancelled() {
            cache.reset(store::CancelReason::Closed);
            return;
        }
        let loaded = {
            let kv = kv.clone();
            let (start, end) = (cache.prefix.clone(), end.clone());
            tokio::task::spawn_blocking(move || load(&kv, start, end)).await
        };
        let (objects, revision) = match loaded {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::warn!(prefix = %String::from_utf8_lossy(&cache.prefix), %e, "watch cache: loading failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => {
                tracing::warn!(%e, "watch cache: the loading task failed");
                return;
            }
        };
        let mut watcher = match kv.watch(store::WatchRequest {
            key: cache.prefix.clone(),
            range_end: end.clone(),
            start_revision: revision + 1,
            prev_kv: false,
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(%e, "watch cache: watching failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        cache.install(objects, revision);
        backoff = Duration::from_millis(100);
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break store::CancelReason::Closed,
                _ = cache.want_progress.notified() => {
                    watcher.request_progress();
                }
                m = watcher.recv() => match m {
                    Ok(store::WatchMessage::Events(events)) => cache.apply(events),
                    Ok(store::WatchMessage::Progress(rev)) => cache.advance(rev),
                    // Fell behind the store's live stream: go on from the first revision
                    // not received (replayed from disk), keeping the objects and every
                    // watcher; a reload would end all of them at once, and under the load
                    // that made the feeder slow, every client would list again.
                    Err(store::CancelReason::Slow { resume_revision }) => {
                        match kv.watch(store::WatchRequest {
                            key: cache.prefix.clone(),
                            range_end: end.clone(),
                            start_revision: resume_revision,
                            prev_kv: false,
                        }) {
                            Ok(w) => {
                                tracing::info!(prefix = %String::from_utf8_lossy(&cache.prefix), resume_revision, "watch cache: fell behind the store; resuming");
                                watcher = w;
                            }
                            Err(e) => break store::CancelReason::Failed(e.to_string()),
                        }
                    }
                    Err(reason) => break reason,
                },
            }
        };
        tracing::info!(prefix = %String::from_utf8_lossy(&cache.prefix), %reason, "watch cache: reloading");
        cache.reset(reason);
    }
}

/// Every object under `[start, end)` at one revision, read in chunks.
#[allow(clippy::type_complexity)]
fn load(
    kv: &store::KvStore,
    start: Vec<u8>,
    end: Vec<u8>,
) -> store::Result<(Vec<(Vec<u8>, Bytes, i64)>, i64)> {
    let mut out = Vec::new();
    let mut cursor = start;
    let mut at = 0;
    loop {
        let resp = kv.range(&store::RangeRequest {
            key: cursor,
            range_end: end.clone(),
            revision: at,
            limit: LOAD_CHUNK,
            ..store::RangeRequest::default()
        })?;
        at = resp.revision;
        let more = resp.more;
        let mut last = None;
        for kv in resp.kvs {
            last = Some(kv.key.clone());
            out.push((kv.key, Bytes::from(kv.value), kv.mod_revision));
        }
        match (more, last) {
            (true, Some(mut k)) => {
                k.push(0);
                cursor = k;
            }
            _ => return Ok((out, at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, node: &str, rev: i64) -> store::Event {
        store::Event {
            kind: store::EventKind::Put,
            kv: store::KeyValue {
                key: key.as_bytes().to_vec(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                value: format!(r#"{{"metadata":{{"name":"x"}},"spec":{{"nodeName":"{node}"}}}}"#)
                    .into_bytes(),
            },
            prev_kv: None,
        }
    }

    /// How many events `sub` yields before it ends, and why it ended.
    async fn drained(sub: &mut Subscription) -> (usize, store::CancelReason) {
        let mut got = 0;
        loop {
            match sub.recv().await {
                Ok(Message::Events(e)) => got += e.len(),
                Ok(Message::Progress(_)) => {}
                Err(r) => return (got, r),
            }
        }
    }

    fn all(node: Option<&str>) -> Filter {
        Filter {
            start: b"/registry/pods/".to_vec(),
            end: b"/registry/pods0".to_vec(),
            node: node.map(String::from),
        }
    }

    #[tokio::test]
    async fn a_watcher_that_does_not_read_is_cut_off_and_the_others_go_on() {
        let cache = Arc::new(WatchCache::new(b"/registry/pods/".to_vec(), true, 100));
        cache.install(Vec::new(), 10);
        let (_, mut stalled) = cache.list_and_watch(all(None)).unwrap();
        let (_, mut reader) = cache.list_and_watch(all(Some("n1"))).unwrap();
        let (_, mut elsewhere) = cache.list_and_watch(all(Some("n2"))).unwrap();
        // One message per store batch: the stalled watcher's buffer fills.
        for i in 0..=WATCHER_BUFFER as i64 {
            cache.apply(vec![put(&format!("/registry/pods/ns/p{i}"), "n1", 11 + i)]);
            match reader.recv().await {
                Ok(Message::Events(e)) => assert_eq!(e.len(), 1),
                _ => panic!("the reading watcher was cut off"),
            }
        }
        // The stalled one gets what was buffered, then why it ended.
        let (got, reason) = drained(&mut stalled).await;
        assert_eq!(got, WATCHER_BUFFER);
        assert_eq!(
            reason,
            store::CancelReason::Slow {
                resume_revision: 11 + WATCHER_BUFFER as i64
            }
        );
        // A watcher of another node was handed nothing, and is still registered.
        elsewhere.request_progress();
        assert!(
            matches!(elsewhere.recv().await, Ok(Message::Progress(r)) if r == 11 + WATCHER_BUFFER as i64)
        );
        assert_eq!(cache.inner.lock().unwrap().watchers.len(), 2);
        // The window serves a watcher starting in it; one from before it is refused.
        assert_eq!(cache.inner.lock().unwrap().history.len(), 100);
        let since = cache.inner.lock().unwrap().since;
        assert_eq!(
            cache.watch_from(all(None), 10).err(),
            Some(since),
            "older than the window: refused as expired"
        );
        let mut late = cache
            .watch_from(all(None), 11 + WATCHER_BUFFER as i64 - 3)
            .unwrap()
            .unwrap();
        match late.recv().await {
            Ok(Message::Events(e)) => assert_eq!(e.len(), 3),
            _ => panic!("no replay"),
        }
        // One from a revision the cache has not reached is registered at once; the changes
        // up to it are skipped as they arrive, and no progress is reported below it.
        let head = cache.revision();
        let mut ahead = cache.watch_from(all(None), head + 2).unwrap().unwrap();
        ahead.request_progress();
        let early = tokio::time::timeout(Duration::from_millis(100), ahead.recv()).await;
        assert!(early.is_err(), "nothing yet, not even progress");
        for r in head + 1..=head + 3 {
            cache.apply(vec![put(&format!("/registry/pods/ns/a{r}"), "n1", r)]);
        }
        match ahead.recv().await {
            Ok(Message::Events(e)) => assert_eq!(e.len(), 1, "only the change after the start"),
            _ => panic!("the change after the start did not come"),
        }
        assert!(matches!(ahead.recv().await, Ok(Message::Progress(r)) if r == head + 3));
    }

    #[tokio::test]
    async fn lists_from_the_store_while_a_cache_is_behind_are_bounded_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let kv = store::KvStore::open(dir.path(), store::StoreOptions::default()).unwrap();
        let caches = Caches::new(kv, CancellationToken::new(), DEFAULT_WINDOW);
        let mut held: Vec<_> = (0..BEHIND_STORE_LISTS)
            .map(|_| caches.behind_permit().expect("a permit within the bound"))
            .collect();
        assert!(caches.behind_permit().is_none(), "one past the bound");
        held.pop();
        let again = caches.behind_permit();
        assert!(again.is_some(), "a list that ended gives its permit back");
        assert!(caches.behind_permit().is_none(), "and only its own");
    }

    #[test]
    fn a_cache_not_yet_loaded_says_so_and_its_refusal_asks_for_a_retry() {
        let cache = Arc::new(WatchCache::new(b"/registry/pods/".to_vec(), true, 100));
        assert!(!cache.loaded());
        assert!(cache.list(&all(None)).is_none());
        let refusal = crate::api::status::KubeError::initializing().response();
        assert_eq!(refusal.status(), 429);
        assert_eq!(refusal.headers()[http::header::RETRY_AFTER], "1");
        cache.install(Vec::new(), 10);
        assert!(cache.loaded());
    }

    #[tokio::test]
    async fn a_watcher_holds_at_most_a_windows_worth_of_events_however_they_are_batched() {
        let cache = Arc::new(WatchCache::new(b"/registry/pods/".to_vec(), true, 100));
        cache.install(Vec::new(), 10);
        let (_, mut stalled) = cache.list_and_watch(all(None)).unwrap();
        let (_, mut reader) = cache.list_and_watch(all(None)).unwrap();
        // Store messages of 1,000 events each (a namespace's pods deleted at once): far
        // fewer messages than the buffer's, more events than the bound.
        let batch = 1000;
        let batches = WATCHER_EVENTS / batch + 1;
        let mut rev = 11;
        for _ in 0..batches {
            let events: Vec<store::Event> = (0..batch)
                .map(|i| {
                    rev += 1;
                    put(&format!("/registry/pods/ns/p{i}"), "n1", rev - 1)
                })
                .collect();
            cache.apply(events);
            let mut n = 0;
            while n < batch {
                match reader.recv().await {
                    Ok(Message::Events(e)) => n += e.len(),
                    _ => panic!("the reading watcher was cut off"),
                }
            }
        }
        let (got, reason) = drained(&mut stalled).await;
        assert_eq!(got, WATCHER_EVENTS, "what it held when it was cut off");
        assert_eq!(
            reason,
            store::CancelReason::Slow {
                resume_revision: 11 + WATCHER_EVENTS as i64
            }
        );
        // A batch larger than the bound still goes to a watcher with nothing waiting.
        let (_, mut fresh) = cache.list_and_watch(all(None)).unwrap();
        let big: Vec<store::Event> = (0..WATCHER_EVENTS + 1)
            .map(|i| put(&format!("/registry/pods/ns/q{i}"), "n1", rev + i as i64))
            .collect();
        cache.apply(big);
        match fresh.recv().await {
            Ok(Message::Events(e)) => assert_eq!(e.len(), WATCHER_EVENTS + 1),
            _ => panic!("a watcher with nothing waiting was cut off"),
        }
    }
}
