//! The watch hub: ordered, gap-free, duplicate-free event streams from any revision.
//!
//! A watcher is *synced* (it has seen every revision up to the hub's last notified one and
//! receives new events from [`Hub::notify`], called by apply) or *unsynced* (a catch-up task
//! replays history from disk into its buffer). Each watcher's `next_rev` is the first revision
//! it has not been sent; every send filters on it, so the hand-over from disk to live can
//! overlap without duplicating anything:
//!
//! 1. the catch-up task reads revisions `next_rev..=R` from a RocksDB snapshot and sends them;
//! 2. under the hub lock it compares with the last notified revision `N`: if `N < next_rev`,
//!    every notified revision was covered by disk, and the watcher becomes synced; otherwise
//!    it reads again from `next_rev` (apply writes before it notifies, so those revisions are
//!    on disk).
//!
//! Buffers are bounded. A synced watcher whose buffer is full is cancelled with
//! [`CancelReason::Slow`] and the revision to resume from; writers never wait for watchers.
//! Events of one revision always travel in one message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::kv::Shared;
use crate::types::{in_range, Event};

/// What to watch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchRequest {
    /// First key.
    pub key: Vec<u8>,
    /// End of the range, as in [`crate::RangeRequest::range_end`].
    pub range_end: Vec<u8>,
    /// First revision to deliver; 0 means the next one.
    pub start_revision: i64,
    /// Include each key's previous version in events.
    pub prev_kv: bool,
}

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// Events of one or more whole revisions, in revision order.
    Events(Vec<Event>),
    /// Every event up to this revision has been delivered (answer to a progress request).
    Progress(i64),
}

/// Why a watch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelReason {
    /// The next revision to deliver has been compacted away.
    Compacted {
        /// The revision the watcher needed.
        requested: i64,
        /// The oldest revision still available.
        compact_revision: i64,
    },
    /// The watcher did not keep up with live events; resume from `resume_revision`.
    Slow {
        /// First revision not delivered.
        resume_revision: i64,
    },
    /// The store is shutting down.
    Closed,
    /// Reading history failed.
    Failed(String),
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelReason::Compacted {
                requested,
                compact_revision,
            } => write!(
                f,
                "required revision {requested} has been compacted (compact revision is {compact_revision})"
            ),
            CancelReason::Slow { resume_revision } => write!(
                f,
                "watcher was too slow and fell behind; resume from revision {resume_revision}"
            ),
            CancelReason::Closed => write!(f, "store is shutting down"),
            CancelReason::Failed(e) => write!(f, "reading watch history failed: {e}"),
        }
    }
}

/// A live watch. Dropping it deregisters it.
pub struct Watcher {
    id: u64,
    rx: mpsc::Receiver<WatchMessage>,
    reason: Arc<OnceLock<CancelReason>>,
    hub: Weak<Shared>,
}

impl Watcher {
    /// The next message, or why the watch ended (after every buffered message was received).
    pub async fn recv(&mut self) -> std::result::Result<WatchMessage, CancelReason> {
        match self.rx.recv().await {
            Some(m) => Ok(m),
            None => Err(self.reason.get().cloned().unwrap_or(CancelReason::Closed)),
        }
    }

    /// Asks for a [`WatchMessage::Progress`]; it is sent only once the watcher is synced.
    /// Returns false if it could not be queued (not synced yet, or the buffer is full).
    pub fn request_progress(&self) -> bool {
        match self.hub.upgrade() {
            Some(shared) => shared.hub.progress(self.id),
            None => false,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(shared) = self.hub.upgrade() {
            shared.hub.remove(self.id);
        }
    }
}

struct Entry {
    req: WatchRequest,
    next_rev: i64,
    synced: bool,
    tx: mpsc::Sender<WatchMessage>,
    reason: Arc<OnceLock<CancelReason>>,
}

struct Inner {
    watchers: HashMap<u64, Entry>,
    /// The last revision passed to `notify` (or installed).
    notified: i64,
    next_id: u64,
    closed: bool,
}

/// Registry of watchers; see the module docs.
pub(crate) struct Hub {
    inner: Mutex<Inner>,
    buffer: usize,
    batch_events: usize,
}

impl Hub {
    pub(crate) fn new(revision: i64, buffer: usize, batch_events: usize) -> Hub {
        Hub {
            inner: Mutex::new(Inner {
                watchers: HashMap::new(),
                notified: revision,
                next_id: 1,
                closed: false,
            }),
            buffer: buffer.max(1),
            batch_events: batch_events.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.inner.lock().expect("not poisoned").watchers.len()
    }

    pub(crate) fn watch(shared: &Arc<Shared>, req: WatchRequest) -> Result<Watcher> {
        if req.key.is_empty() {
            return Err(Error::InvalidRequest("key is not provided".into()));
        }
        let hub = &shared.hub;
        let compact = shared.compact_revision();
        let mut inner = hub.inner.lock().expect("not poisoned");
        if inner.closed {
            return Err(Error::InvalidRequest("store is shutting down".into()));
        }
        let start = if req.start_revision <= 0 {
            inner.notified + 1
        } else {
            req.start_revision
        };
        if start < compact {
            return Err(Error::Compacted {
                requested: start,
                compact_revision: compact,
            });
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (tx, rx) = mpsc::channel(hub.buffer);
        let reason = Arc::new(OnceLock::new());
        let synced = start > inner.notified;
        inner.watchers.insert(
            id,
            Entry {
                req,
                next_rev: start,
                synced,
                tx: tx.clone(),
                reason: reason.clone(),
            },
        );
        drop(inner);
        if !synced {
            tokio::spawn(catch_up(Arc::downgrade(shared), id, tx));
        }
        Ok(Watcher {
            id,
            rx,
            reason,
            hub: Arc::downgrade(shared),
        })
    }

    /// Delivers the events of revisions up to `revision` (all of them, in order) to synced
    /// watchers. Never blocks on a watcher.
    pub(crate) fn notify(&self, events: Vec<Event>, revision: i64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.notified = revision;
        let mut cancelled = Vec::new();
        for (id, entry) in inner.watchers.iter_mut() {
            if !entry.synced || entry.next_rev > revision {
                continue;
            }
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| {
                    e.kv.mod_revision >= entry.next_rev
                        && in_range(&e.kv.key, &entry.req.key, &entry.req.range_end)
                })
                .map(|e| {
                    let mut e = e.clone();
                    if !entry.req.prev_kv {
                        e.prev_kv = None;
                    }
                    e
                })
                .collect();
            if !mine.is_empty() {
                match entry.tx.try_send(WatchMessage::Events(mine)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let _ = entry.reason.set(CancelReason::Slow {
                            resume_revision: entry.next_rev,
                        });
                        cancelled.push(*id);
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        cancelled.push(*id);
                        continue;
                    }
                }
            }
            entry.next_rev = revision + 1;
        }
        for id in cancelled {
            inner.watchers.remove(&id);
        }
    }

    fn progress(&self, id: u64) -> bool {
        let inner = self.inner.lock().expect("not poisoned");
        match inner.watchers.get(&id) {
            Some(entry) if entry.synced => {
                let rev = inner.notified.max(entry.next_rev - 1);
                entry.tx.try_send(WatchMessage::Progress(rev)).is_ok()
            }
            _ => false,
        }
    }

    fn remove(&self, id: u64) {
        self.inner
            .lock()
            .expect("not poisoned")
            .watchers
            .remove(&id);
    }

    /// After a snapshot install: every synced watcher goes back to catching up from disk
    /// (the new generation), which cancels those whose position is compacted away.
    pub(crate) fn reset(&self, shared: &Arc<Shared>, revision: i64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.notified = revision;
        let mut restart = Vec::new();
        for (id, entry) in inner.watchers.iter_mut() {
            if entry.synced && entry.next_rev <= revision {
                entry.synced = false;
                restart.push((*id, entry.tx.clone()));
            }
        }
        drop(inner);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for (id, tx) in restart {
                rt.spawn(catch_up(Arc::downgrade(shared), id, tx));
            }
        } else {
            for (id, _) in restart {
                self.cancel(
                    id,
                    CancelReason::Failed("no runtime to replay history".into()),
                );
            }
        }
    }

    fn cancel(&self, id: u64, reason: CancelReason) {
        let mut inner = self.inner.lock().expect("not poisoned");
        if let Some(entry) = inner.watchers.remove(&id) {
            let _ = entry.reason.set(reason);
        }
    }

    /// Cancels every watcher; no new ones are accepted.
    pub(crate) fn close(&self) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.closed = true;
        for (_, entry) in inner.watchers.drain() {
            let _ = entry.reason.set(CancelReason::Closed);
        }
    }
}

/// Replays history from disk for one watcher until it can switch to live events.
async fn catch_up(shared: Weak<Shared>, id: u64, tx: mpsc::Sender<WatchMessage>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let (req, next) = {
            let inner = strong.hub.inner.lock().expect("not poisoned");
            match inner.watchers.get(&id) {
                Some(e) => (e.req.clone(), e.next_rev),
                None => return,
            }
        };
        let batch = strong.hub.batch_events;
        let store = strong;
        let read = tokio::task::spawn_blocking(move || {
            let r = store.read_events(&req, next, batch);
            (store, r)
        })
        .await;
        let (store, result) = match read {
            Ok(x) => x,
            Err(e) => {
                if let Some(s) = shared.upgrade() {
                    s.hub.cancel(id, CancelReason::Failed(e.to_string()));
                }
                return;
            }
        };
        let (events, new_next) = match result {
            Ok(x) => x,
            Err(Error::Compacted {
                requested,
                compact_revision,
            }) => {
                store.hub.cancel(
                    id,
                    CancelReason::Compacted {
                        requested,
                        compact_revision,
                    },
                );
                return;
            }
            Err(e) => {
                store.hub.cancel(id, CancelReason::Failed(e.to_string()));
                return;
            }
        };
        drop(store);
        if !events.is_empty() && tx.send(WatchMessage::Events(events)).await.is_err() {
            return; // the watcher was dropped
        }
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let mut inner = strong.hub.inner.lock().expect("not poisoned");
        let notified = inner.notified;
        match inner.watchers.get_mut(&id) {
            Some(e) => {
                e.next_rev = new_next;
                if notified < new_next {
                    e.synced = true;
                    return;
                }
            }
            None => return,
        }
    }
}
