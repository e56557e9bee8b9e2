//! Informers: a cache of one resource, kept current from this replica's store, that tells
//! its subscribers what changed (kube-runtime's watcher + reflector).
//!
//! Owns the cache of one resource's objects, keyed by store key (ordered: a namespace's
//! objects are one key range, so a reconcile reads its namespace, not the whole cache).
//! Invariants:
//! - the cache is a state of the store at some revision: it is filled by a list at one
//!   revision, then moved forward by the watch from the next revision, event by event, in
//!   order; a watch that ends (compaction, a slow watcher cut off) makes it list again;
//! - subscribers are called after the cache reflects the change, on the informer's task, with
//!   the object before and after; they must only enqueue work (no `.await`, no blocking);
//! - a subscriber that joins a running informer is first told of every cached object (as a
//!   creation), in key order, a chunk at a time: between chunks the informer goes on
//!   changing the cache and telling every subscriber (a new leader's replays of 150,000
//!   pods must not hold back the pod its scheduler waits for). The joining subscriber hears
//!   of a change only once its replay has passed the changed key; a change beyond that is
//!   told by the replay itself, as the object then is. A change and its telling are one
//!   step to a replay (both under the handlers' lock), so a subscriber hears of each object
//!   first as a creation and then of each later change once, in order;
//! - `synced` turns true after the first list and never back; `revision` only grows and the
//!   cache holds every change up to it;
//! - cached objects have no `metadata.managedFields` unless the informer was built
//!   [`Informer::with_managed_fields`] (skipped while parsing: nearly half of a pod's
//!   parsed size, on every replica, read by nothing);
//! - an informer built with a [`Trim`] keeps of each object what the trim says: a
//!   projection (the pod informer keeps this of bound pods: what its readers read), or the
//!   whole object with its `managedFields` (pods not yet bound, which the scheduler writes
//!   back as it has them). A projected object is never written back: writers edit the
//!   stored object ([`crate::api::Kube::update_with`]).
//!
//! The controllers' informers run on every replica, leader or not, so a new leader starts
//! its control loops on caches that are already current (once they have caught up with the
//! revision after its read barrier) instead of listing every object again.
//! The leader's control loops read their world only from informers, and write through the
//! API (fenced to their term); the compare-and-swap on every write catches a stale cache.

use crate::api::meta::Ptr;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_store as store;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::api::objects::{self, prefix_end, Objects};
use crate::api::resources::Resource;

/// One change seen by an informer.
pub struct Change<'a> {
    /// The store key.
    pub key: &'a str,
    /// The object before (absent for a creation).
    pub old: Option<&'a Arc<Value>>,
    /// The object after (absent for a deletion).
    pub new: Option<&'a Arc<Value>>,
    /// Not a change: a new subscriber told of an object already cached. A handler that only
    /// queues an owner its controller is told of anyway may ignore these.
    pub replay: bool,
}

type Handler = Box<dyn Fn(&Change<'_>) + Send + Sync>;

/// The values an object is indexed under (see [`Informer::with_indexes`]).
pub type IndexFn = fn(&Value) -> Vec<String>;

/// Index name → value → store keys.
type Index = std::collections::HashMap<
    &'static str,
    std::collections::HashMap<String, std::collections::BTreeSet<String>>,
>;

/// One subscriber.
struct Subscriber {
    f: Handler,
    /// Tells subscribers apart (a replay finds its own between chunks).
    id: u64,
    /// While its replay runs: the last key replayed (`Some(None)`: none yet). It hears of
    /// changes to keys up to there; the replay tells it of the others. `None` once replayed.
    joining: Option<Option<String>>,
}

impl Subscriber {
    fn hears(&self, key: &str) -> bool {
        match &self.joining {
            None => true,
            Some(None) => false,
            Some(Some(last)) => key <= last.as_str(),
        }
    }
}

/// Who hears of changes: the replica's lasting subscribers first, then the current term's.
#[derive(Default)]
struct Handlers {
    lasting: Vec<Subscriber>,
    term: Vec<Subscriber>,
    next_id: u64,
}

/// How long a replay holds the handlers' lock at a time: a change waits at most about this
/// long behind a replay. (Each hand-over costs the replay a wake-up, a few milliseconds
/// on a saturated machine: chunks of a fixed 512 objects made a cheap replay of 150,000
/// pods take 0.85 s instead of tens of milliseconds.)
const REPLAY_HOLD: Duration = Duration::from_millis(2);

/// A cache of one resource.
pub struct Informer {
    r: &'static Resource,
    cache: parking_lot::RwLock<BTreeMap<String, Arc<Value>>>,
    /// Held (shared) by the informer from before it changes the cache until it has told
    /// every subscriber, and (exclusive) by a replay for each chunk, released fairly
    /// between chunks: a change waiting goes before the next chunk. Taken before `cache`.
    handlers: parking_lot::RwLock<Handlers>,
    synced: watch::Sender<bool>,
    /// The store revision the cache reflects.
    revision: watch::Sender<i64>,
    /// Asks the running informer to learn its watch's current revision.
    progress: Notify,
    /// What is kept of each object (all of it without one; see [`Trim`]).
    trim: Option<Trim>,
    /// Whether objects keep `metadata.managedFields` (left out unless a controller reads
    /// them: nearly half of a pod's parsed size, which no controller or the scheduler reads).
    managed_fields: bool,
    /// Counts full lists, if set.
    lists: std::sync::OnceLock<prometheus::IntCounter>,
    /// Secondary indexes: name and what an object is indexed under.
    indexers: Vec<(&'static str, IndexFn)>,
    /// Kept with the cache: written under the cache's write lock (cache, then index).
    index: RwLock<Index>,
}

/// What an informer keeps of an object: `Ok(part)`, a projection of it (what its readers
/// read), or `Err(whole)`, given back, to keep all of it, `metadata.managedFields` included
/// (an object its readers write back as they have it).
pub type Trim = fn(Value) -> Result<Value, Value>;

/// Keys read from the store at once while listing.
const LIST_CHUNK: i64 = 1000;

impl Informer {
    /// An informer of `r` (not yet running).
    pub fn new(r: &'static Resource) -> Arc<Informer> {
        Self::build(r, None, Vec::new())
    }

    /// An informer of `r` that keeps what `trim` says of each object (the node authorizer's
    /// pods: their node and references only); subscribers see what is kept.
    pub fn trimmed(r: &'static Resource, trim: Trim) -> Arc<Informer> {
        Self::build(r, Some(trim), Vec::new())
    }

    /// An informer of `r` whose objects keep `metadata.managedFields` (the others leave it
    /// out: see [`objects::parse_lean`]).
    pub fn with_managed_fields(r: &'static Resource) -> Arc<Informer> {
        let mut i = Self::build(r, None, Vec::new());
        Arc::get_mut(&mut i).expect("just made").managed_fields = true;
        i
    }

    /// An informer of `r` that also indexes each object under the values `indexers` give
    /// (client-go's indexers): [`Informer::by_index`] then reads one value's objects
    /// without a scan.
    pub fn with_indexes(
        r: &'static Resource,
        indexers: Vec<(&'static str, IndexFn)>,
    ) -> Arc<Informer> {
        Self::build(r, None, indexers)
    }

    /// An informer of `r` with indexes (as [`Informer::with_indexes`]) that keeps what
    /// `trim` says of each object; indexes and subscribers see what is kept.
    pub fn trimmed_with_indexes(
        r: &'static Resource,
        trim: Trim,
        indexers: Vec<(&'static str, IndexFn)>,
    ) -> Arc<Informer> {
        Self::build(r, Some(trim), indexers)
    }

    fn build(
        r: &'static Resource,
        trim: Option<Trim>,
        indexers: Vec<(&'static str, IndexFn)>,
    ) -> Arc<Informer> {
        Arc::new(Informer {
            r,
            cache: parking_lot::RwLock::new(BTreeMap::new()),
            handlers: parking_lot::RwLock::new(Handlers::default()),
            synced: watch::channel(false).0,
            revision: watch::channel(0).0,
            progress: Notify::new(),
            trim,
            managed_fields: false,
            lists: std::sync::OnceLock::new(),
            indexers,
            index: RwLock::new(Index::new()),
        })
    }

    /// Caches `new` under `key` (and indexes it); returns what it replaced.
    fn put(&self, key: &str, new: Arc<Value>) -> Option<Arc<Value>> {
        let mut cache = self.cache.write();
        let old = cache.insert(key.to_string(), new.clone());
        self.reindex(key, old.as_deref(), Some(&new));
        old
    }

    /// Drops `key` from the cache and the indexes; returns what it held.
    fn remove(&self, key: &str) -> Option<Arc<Value>> {
        let mut cache = self.cache.write();
        let old = cache.remove(key);
        self.reindex(key, old.as_deref(), None);
        old
    }

    /// Moves `key` in the indexes from `old`'s values to `new`'s.
    fn reindex(&self, key: &str, old: Option<&Value>, new: Option<&Value>) {
        if self.indexers.is_empty() {
            return;
        }
        let mut index = self.index.write().expect("not poisoned");
        for (name, f) in &self.indexers {
            let before = old.map(f).unwrap_or_default();
            let after = new.map(f).unwrap_or_default();
            if before == after {
                continue;
            }
            let values = index.entry(name).or_default();
            for v in before.iter().filter(|v| !after.contains(v)) {
                if let Some(keys) = values.get_mut(v) {
                    keys.remove(key);
                    if keys.is_empty() {
                        values.remove(v);
                    }
                }
            }
            for v in after.into_iter().filter(|v| !before.contains(v)) {
                values.entry(v).or_default().insert(key.to_string());
            }
        }
    }

    /// The cached objects indexed under `value` by index `name`, in key order.
    pub fn by_index(&self, name: &str, value: &str) -> Vec<Arc<Value>> {
        let keys: Vec<String> = self
            .index
            .read()
            .expect("not poisoned")
            .get(name)
            .and_then(|values| values.get(value))
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default();
        let cache = self.cache.read();
        keys.iter().filter_map(|k| cache.get(k).cloned()).collect()
    }

    /// How many cached objects are indexed under `value` by index `name`.
    pub fn index_len(&self, name: &str, value: &str) -> usize {
        self.index
            .read()
            .expect("not poisoned")
            .get(name)
            .and_then(|values| values.get(value))
            .map_or(0, |keys| keys.len())
    }

    /// Every value index `name` holds objects under.
    pub fn index_values(&self, name: &str) -> Vec<String> {
        self.index
            .read()
            .expect("not poisoned")
            .get(name)
            .map(|values| values.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Counts this informer's full lists in `c` (set once; later calls are ignored).
    pub fn count_lists(&self, c: prometheus::IntCounter) {
        let _ = self.lists.set(c);
    }

    /// What is kept of `object`, parsed whole (with `metadata.managedFields`).
    fn keep(&self, mut object: Value) -> Arc<Value> {
        if let Some(trim) = self.trim {
            return Arc::new(trim(object).unwrap_or_else(|whole| whole));
        }
        if !self.managed_fields {
            if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("managedFields");
            }
        }
        Arc::new(object)
    }

    /// The resource.
    pub fn resource(&self) -> &'static Resource {
        self.r
    }

    /// Calls `f` for every object already cached (as a creation), then for every change from
    /// now on. The replay goes in key order, [`REPLAY_HOLD`] at a time holding the
    /// handlers' lock; meanwhile `f` hears of changes to keys already replayed, and the
    /// replay tells it of the others as they then are.
    pub fn subscribe(&self, f: impl Fn(&Change<'_>) + Send + Sync + 'static) {
        self.subscribe_to(false, f)
    }

    /// [`Informer::subscribe`], for the replica's lifetime: [`Informer::unsubscribe_all`]
    /// leaves it, and it hears every change before a term's subscribers do. For state kept
    /// warm on every replica (the scheduler's cache), so a new leader need not rebuild it.
    pub fn subscribe_lasting(&self, f: impl Fn(&Change<'_>) + Send + Sync + 'static) {
        self.subscribe_to(true, f)
    }

    fn subscribe_to(&self, lasting: bool, f: impl Fn(&Change<'_>) + Send + Sync + 'static) {
        let id = {
            let mut handlers = self.handlers.write();
            let id = handlers.next_id;
            handlers.next_id += 1;
            let sub = Subscriber {
                f: Box::new(f),
                id,
                joining: Some(None),
            };
            if lasting {
                handlers.lasting.push(sub);
            } else {
                handlers.term.push(sub);
            }
            id
        };
        loop {
            let mut handlers = self.handlers.write();
            let Handlers { lasting, term, .. } = &mut *handlers;
            // Gone if the term's subscribers were dropped meanwhile.
            let Some(sub) = lasting
                .iter_mut()
                .chain(term.iter_mut())
                .find(|s| s.id == id)
            else {
                return;
            };
            let from = match &sub.joining {
                Some(Some(last)) => Bound::Excluded(last.clone()),
                _ => Bound::Unbounded,
            };
            let last = {
                let cache = self.cache.read();
                let held = std::time::Instant::now();
                // What the replay queues waits behind what changes meanwhile (a new leader's
                // backlog of every object must not delay its answer to a change).
                super::queue::background(|| {
                    let mut last = None;
                    let objects = cache.range::<String, _>((from, Bound::Unbounded));
                    for (i, (key, object)) in objects.enumerate() {
                        if i % 64 == 63 && held.elapsed() >= REPLAY_HOLD {
                            break;
                        }
                        (sub.f)(&Change {
                            key,
                            old: None,
                            new: Some(object),
                            replay: true,
                        });
                        last = Some(key);
                    }
                    last.cloned()
                })
            };
            let done = last.is_none();
            sub.joining = last.map(Some);
            // A notification waiting for the lock goes before the next chunk.
            parking_lot::RwLockWriteGuard::unlock_fair(handlers);
            if done {
                return;
            }
        }
    }

    /// Drops every subscriber of a term (its control loops, once they have stopped); the
    /// lasting ones stay.
    pub fn unsubscribe_all(&self) {
        self.handlers.write().term.clear();
    }

    /// Waits until the cache reflects store revision `rev` (or `stop`); false if stopped.
    pub async fn caught_up(&self, rev: i64, stop: &CancellationToken) -> bool {
        let mut rx = self.revision.subscribe();
        loop {
            if *rx.borrow_and_update() >= rev {
                return true;
            }
            // The watch's progress report says how far it is even when nothing of this
            // resource changed since.
            self.progress.notify_one();
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    fn advance(&self, rev: i64) {
        self.revision.send_if_modified(|r| {
            let moved = rev > *r;
            if moved {
                *r = rev;
            }
            moved
        });
    }

    /// One object by store key.
    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.cache.read().get(key).cloned()
    }

    /// Every cached object.
    pub fn list(&self) -> Vec<Arc<Value>> {
        self.cache.read().values().cloned().collect()
    }

    /// Every cached object for which `f` holds.
    pub fn filter(&self, f: impl Fn(&Value) -> bool) -> Vec<Arc<Value>> {
        self.cache
            .read()
            .values()
            .filter(|v| f(v))
            .cloned()
            .collect()
    }

    /// Every cached object in namespace `ns` (for a cluster-scoped resource, or `None`,
    /// every object), read as one key range: what a reconcile of a namespaced owner needs,
    /// without a scan of every object of the resource (at 30,000 pods, scanning them per
    /// reconcile was most of the leader's work).
    pub fn in_namespace(&self, ns: Option<&str>) -> Vec<Arc<Value>> {
        let Some(ns) = ns.filter(|_| self.r.namespaced) else {
            return self.list();
        };
        let start = format!("{}{ns}/", self.r.prefix());
        let end = format!("{}{ns}0", self.r.prefix()); // '0' follows '/'
        self.cache
            .read()
            .range(start..end)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every cached key.
    pub fn keys(&self) -> Vec<String> {
        self.cache.read().keys().cloned().collect()
    }

    /// Waits until the first list is in the cache.
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Tells `handlers` (held since before the cache changed) of a change.
    fn notify(handlers: &Handlers, key: &str, old: Option<&Arc<Value>>, new: Option<&Arc<Value>>) {
        let change = Change {
            key,
            old,
            new,
            replay: false,
        };
        for h in handlers.lasting.iter().chain(handlers.term.iter()) {
            if h.hears(key) {
                (h.f)(&change);
            }
        }
    }

    /// Keeps the cache current until `stop`.
    pub async fn run(self: Arc<Self>, objects: Objects, stop: CancellationToken) {
        let prefix = self.r.prefix();
        let end = prefix_end(prefix.as_bytes());
        loop {
            let revision = match self.relist(&objects, prefix.as_bytes(), &end).await {
                Ok(rev) => rev,
                Err(e) => {
                    tracing::warn!(resource = self.r.plural, %e, "informer list failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            };
            self.advance(revision);
            self.synced.send_replace(true);
            let mut watcher = match objects.replica().kv().watch(store::WatchRequest {
                key: prefix.clone().into_bytes(),
                range_end: end.clone(),
                start_revision: revision + 1,
                prev_kv: false,
            }) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(resource = self.r.plural, %e, "informer watch failed; relisting");
                    continue;
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.progress.notified() => {
                        watcher.request_progress();
                        continue;
                    }
                    m = watcher.recv() => m,
                };
                match msg {
                    Ok(store::WatchMessage::Events(events)) => {
                        let last = events.last().map(|e| e.kv.mod_revision);
                        for e in events {
                            self.apply_event(&e);
                        }
                        if let Some(rev) = last {
                            self.advance(rev);
                        }
                    }
                    Ok(store::WatchMessage::Progress(rev)) => self.advance(rev),
                    Err(reason) => {
                        tracing::info!(
                            resource = self.r.plural,
                            ?reason,
                            "informer watch ended; relisting"
                        );
                        break;
                    }
                }
            }
        }
    }

    pub(crate) fn apply_event(&self, e: &store::Event) {
        let key = String::from_utf8_lossy(&e.kv.key).into_owned();
        match e.kind {
            store::EventKind::Put => match if self.managed_fields {
                objects::decode(&e.kv).map(|s| self.keep(s.object))
            } else if let Some(trim) = self.trim {
                // Parsed lean (most objects are trimmed); one kept whole is parsed again with
                // its field ownership.
                objects::decode_lean(&e.kv).and_then(|s| match trim(s.object) {
                    Ok(part) => Ok(Arc::new(part)),
                    Err(_) => objects::decode(&e.kv).map(|s| Arc::new(s.object)),
                })
            } else {
                objects::decode_lean(&e.kv).map(|s| self.keep(s.object))
            } {
                Ok(new) => {
                    let handlers = self.handlers.read();
                    let old = self.put(&key, new.clone());
                    Self::notify(&handlers, &key, old.as_ref(), Some(&new));
                }
                Err(err) => tracing::warn!(key, %err, "undecodable object"),
            },
            store::EventKind::Delete => {
                let handlers = self.handlers.read();
                let old = self.remove(&key);
                if old.is_some() {
                    Self::notify(&handlers, &key, old.as_ref(), None);
                }
            }
        }
    }

    /// Replaces the cache with a list at one revision, telling subscribers what differs.
    async fn relist(&self, objects: &Objects, start: &[u8], end: &[u8]) -> Result<i64, String> {
        if let Some(c) = self.lists.get() {
            c.inc();
        }
        let mut fresh: BTreeMap<String, Arc<Value>> = BTreeMap::new();
        let mut cursor = start.to_vec();
        let mut at = 0;
        loop {
            let (batch, rev, remaining) = objects
                .range(&cursor, end, at, LIST_CHUNK, objects::Consistency::Local)
                .await
                .map_err(|e| e.to_string())?;
            at = rev;
            let mut last = None;
            for s in batch {
                let name = s
                    .object
                    .ptr("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let ns = s
                    .object
                    .ptr("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let key = self.r.key(ns.as_deref(), &name);
                last = Some(key.clone());
                fresh.insert(key, self.keep(s.object));
            }
            match last {
                Some(k) if remaining > 0 => {
                    cursor = k.into_bytes();
                    cursor.push(0);
                }
                _ => break,
            }
        }
        let handlers = self.handlers.read();
        let old = {
            let mut cache = self.cache.write();
            if !self.indexers.is_empty() {
                *self.index.write().expect("not poisoned") = Index::new();
                for (k, v) in &fresh {
                    self.reindex(k, None, Some(v));
                }
            }
            std::mem::replace(&mut *cache, fresh.clone())
        };
        for (k, v) in &fresh {
            match old.get(k) {
                Some(o) if o == v => {}
                o => Self::notify(&handlers, k, o, Some(v)),
            }
        }
        for (k, o) in &old {
            if !fresh.contains_key(k) {
                Self::notify(&handlers, k, Some(o), None);
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources;
    use crate::controllers::pod;
    use serde_json::json;

    #[test]
    fn objects_are_kept_without_field_ownership_unless_asked_for() {
        let pods = resources::find("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"namespace": "a", "name": "p",
            "managedFields": [{"manager": "m", "operation": "Update"}]}, "spec": {}});
        let event = store::Event {
            kind: store::EventKind::Put,
            kv: store::KeyValue {
                key: pods.key(Some("a"), "p").into_bytes(),
                create_revision: 3,
                mod_revision: 4,
                version: 1,
                value: serde_json::to_vec(&pod).unwrap(),
            },
            prev_kv: None,
        };
        let lean = Informer::new(pods);
        lean.apply_event(&event);
        let got = lean.get(&pods.key(Some("a"), "p")).expect("cached");
        assert_eq!(
            *got,
            json!({"metadata": {"namespace": "a", "name": "p", "resourceVersion": "4"},
                "spec": {}})
        );
        let full = Informer::with_managed_fields(pods);
        full.apply_event(&event);
        let got = full.get(&pods.key(Some("a"), "p")).expect("cached");
        assert_eq!(
            got["metadata"]["managedFields"],
            pod["metadata"]["managedFields"]
        );
        // A list keeps the same as a watch.
        assert_eq!(
            *lean.keep(pod.clone()),
            json!({"metadata": {"namespace": "a", "name": "p"}, "spec": {}})
        );
    }

    /// A store event for pod `name` in namespace `a` at revision `rev` (a deletion if not `put`).
    fn pod_event(name: &str, rev: i64, put: bool) -> store::Event {
        let pods = resources::find("", "v1", "pods").unwrap();
        store::Event {
            kind: if put {
                store::EventKind::Put
            } else {
                store::EventKind::Delete
            },
            kv: store::KeyValue {
                key: pods.key(Some("a"), name).into_bytes(),
                create_revision: 1,
                mod_revision: rev,
                version: 1,
                value: if put {
                    serde_json::to_vec(&json!({"metadata": {"namespace": "a", "name": name}}))
                        .unwrap()
                } else {
                    Vec::new()
                },
            },
            prev_kv: None,
        }
    }

    #[test]
    fn a_joining_subscriber_hears_changes_during_its_replay_and_misses_none() {
        let pods = resources::find("", "v1", "pods").unwrap();
        let inf = Informer::new(pods);
        let n = 4096;
        let name = |i: usize| format!("p{i:06}");
        for i in 0..n {
            inf.apply_event(&pod_event(&name(i), 10, true));
        }
        // What the subscriber hears: key, replay, had an old object, the new one's version.
        type Heard = (String, bool, bool, Option<String>);
        let heard: Arc<std::sync::Mutex<Vec<Heard>>> = Arc::default();
        let (go, started) = std::sync::mpsc::channel::<()>();
        let go = std::sync::Mutex::new(Some(go));
        // Meanwhile another thread changes objects already replayed and not yet replayed.
        let changer = {
            let inf = inf.clone();
            let (last, gone, early) = (name(n - 1), name(n - 2), name(0));
            std::thread::spawn(move || {
                started.recv().expect("the replay started");
                inf.apply_event(&pod_event(&last, 20, true));
                inf.apply_event(&pod_event(&gone, 21, false));
                inf.apply_event(&pod_event("q-new", 22, true));
                inf.apply_event(&pod_event(&early, 23, true));
            })
        };
        {
            let heard = heard.clone();
            inf.subscribe(move |c| {
                let rv = c
                    .new
                    .and_then(|v| v.ptr("/metadata/resourceVersion"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                heard
                    .lock()
                    .unwrap()
                    .push((c.key.to_string(), c.replay, c.old.is_some(), rv));
                if let Some(go) = go.lock().unwrap().take() {
                    go.send(()).unwrap();
                }
                // A replay slow enough (about half a second) for the other thread to come
                // and wait on the locks it holds, even on a busy machine.
                if c.replay {
                    std::thread::sleep(Duration::from_micros(50));
                }
            });
        }
        changer.join().unwrap();
        let all = heard;
        let heard = all.lock().unwrap().clone();
        // Changes were told while the replay ran, not held back until it ended.
        let last_replay = heard.iter().rposition(|h| h.1).expect("a replay");
        let first_change = heard.iter().position(|h| !h.1).expect("a change heard");
        assert!(
            first_change < last_replay,
            "a change was told only after the whole replay ({first_change} vs {last_replay})"
        );
        // It hears of each object first as a creation, then of each change once.
        let mut known: std::collections::HashMap<String, String> = Default::default();
        for (key, _, old, rv) in &heard {
            if *old {
                let last = known.get(key);
                assert!(last.is_some(), "{key} changed before it was told of it");
                assert_ne!(last, rv.as_ref(), "{key}: one change told twice");
            } else {
                assert!(!known.contains_key(key), "{key} created twice");
            }
            match rv {
                Some(rv) => known.insert(key.clone(), rv.clone()),
                None => known.remove(key),
            };
        }
        // And what it heard, in order, adds up to the cache: nothing missed.
        let mut state: BTreeMap<String, String> = BTreeMap::new();
        for (key, _, _, rv) in heard {
            match rv {
                Some(rv) => state.insert(key, rv),
                None => state.remove(&key),
            };
        }
        let cached: BTreeMap<String, String> = inf
            .cache
            .read()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
            .collect();
        assert_eq!(state.len(), n);
        assert_eq!(state, cached);
        assert_eq!(state[&pods.key(Some("a"), &name(0))], "23");
        assert_eq!(state[&pods.key(Some("a"), &name(n - 1))], "20");
        assert!(state.contains_key(&pods.key(Some("a"), "q-new")));
        // Once joined, it hears every change.
        inf.apply_event(&pod_event(&name(5), 30, true));
        let h = all.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            h,
            (
                pods.key(Some("a"), &name(5)),
                false,
                true,
                Some("30".into())
            )
        );
    }

    #[test]
    fn indexes_follow_every_change_and_deletion() {
        let pods = resources::find("", "v1", "pods").unwrap();
        let inf = Informer::with_indexes(pods, pod::indexers());
        let p = |name: &str, owner: Option<&str>, app: &str, node: Option<&str>| {
            let mut v = json!({"metadata": {"namespace": "a", "name": name, "labels": {"app": app}},
                "spec": {}});
            if let Some(u) = owner {
                v["metadata"]["ownerReferences"] =
                    json!([{"uid": u, "controller": true, "kind": "ReplicaSet", "name": "rs"}]);
            }
            if let Some(n) = node {
                v["spec"]["nodeName"] = json!(n);
            }
            Arc::new(v)
        };
        let names = |v: Vec<Arc<Value>>| -> Vec<String> {
            v.iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
                .collect()
        };
        let key = |n: &str| pods.key(Some("a"), n);
        inf.put(&key("p1"), p("p1", Some("u1"), "web", None));
        inf.put(&key("p2"), p("p2", Some("u1"), "web", Some("n1")));
        inf.put(&key("p3"), p("p3", None, "db", Some("n1")));
        let own = |uid: &str| {
            names(inf.by_index(pod::BY_CONTROLLER, &pod::controller_index(Some("a"), uid)))
        };
        assert_eq!(own("u1"), ["p1", "p2"]);
        assert_eq!(own(""), ["p3"]);
        assert_eq!(
            names(inf.by_index(pod::BY_LABEL, &pod::label_index(Some("a"), "app", "web"))),
            ["p1", "p2"]
        );
        assert_eq!(
            inf.index_len(pod::BY_LABEL, &pod::label_index(Some("b"), "app", "web")),
            0
        );
        assert_eq!(names(inf.by_index(pod::BY_NODE, "n1")), ["p2", "p3"]);
        // A change moves the key: p1 bound, relabelled and adopted by u2.
        inf.put(&key("p1"), p("p1", Some("u2"), "db", Some("n2")));
        assert_eq!(own("u1"), ["p2"]);
        assert_eq!(own("u2"), ["p1"]);
        assert_eq!(
            names(inf.by_index(pod::BY_LABEL, &pod::label_index(Some("a"), "app", "db"))),
            ["p1", "p3"]
        );
        let mut nodes = inf.index_values(pod::BY_NODE);
        nodes.sort();
        assert_eq!(nodes, ["n1", "n2"]);
        // A deletion leaves nothing behind, not even an empty value.
        inf.remove(&key("p2"));
        inf.remove(&key("p3"));
        assert!(own("u1").is_empty());
        assert_eq!(inf.index_values(pod::BY_NODE), ["n2"]);
        assert_eq!(
            inf.index_len(pod::BY_CONTROLLER, &pod::controller_index(Some("a"), "")),
            0
        );
    }

    #[test]
    fn a_namespace_is_its_own_objects_only() {
        let pods = resources::find("", "v1", "pods").unwrap();
        let inf = Informer::new(pods);
        for (ns, name) in [
            ("a", "p1"),
            ("a", "p2"),
            ("ab", "p3"),
            ("a-b", "p4"),
            ("b", "p5"),
        ] {
            inf.cache.write().insert(
                pods.key(Some(ns), name),
                Arc::new(json!({"metadata": {"namespace": ns, "name": name}})),
            );
        }
        let names = |ns: Option<&str>| -> Vec<String> {
            let mut v: Vec<String> = inf
                .in_namespace(ns)
                .iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(Some("a")), ["p1", "p2"]);
        assert_eq!(names(Some("ab")), ["p3"]);
        assert_eq!(names(Some("b")), ["p5"]);
        assert!(names(Some("c")).is_empty());
        assert_eq!(names(None).len(), 5);
    }
}
