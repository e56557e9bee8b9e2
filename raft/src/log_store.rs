//! openraft's log storage over [`flotilla_store::LogStore`].
//!
//! Entries are bincode-encoded `openraft::Entry` values keyed by index. Contracts kept here:
//! - `append` reports through [`LogFlushed`] only after the store's group-commit fsync covers
//!   the entries (the store's flusher thread calls back);
//! - `save_vote` is synced before it returns;
//! - `purge` first makes the state machine durable up to what it has applied, because the
//!   purged entries can no longer be re-applied after a crash.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flotilla_store::{KvStore, LogStore};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};

use crate::types::{decode, encode, Entry, LogId, NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"last_purged";
const COMMITTED: &[u8] = b"committed";
/// Most bytes returned by one read of entries (the leader replicates in batches anyway).
const MAX_READ_BYTES: usize = 16 << 20;

/// Most bytes of recent entries kept decoded in memory.
const CACHE_BYTES: usize = 64 << 20;
/// Most recent entries kept decoded in memory.
const CACHE_ENTRIES: usize = 100_000;

/// The newest entries, decoded: the leader reads each new entry once per follower and once
/// to apply it, and serving those reads from memory saves a RocksDB read and a decode each.
/// Always a contiguous suffix of the log (appends extend it, truncation cuts it).
#[derive(Default)]
struct Cache {
    entries: std::collections::VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Cache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry, size: usize) {
        if let Some((last, _)) = self.entries.back() {
            if last.log_id.index + 1 != entry.log_id.index {
                // Not contiguous (after a restart or a snapshot): start over.
                self.entries.clear();
                self.bytes = 0;
            }
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.bytes > CACHE_BYTES || self.entries.len() > CACHE_ENTRIES {
            match self.entries.pop_front() {
                Some((_, n)) => self.bytes -= n,
                None => break,
            }
        }
    }

    /// Entries `[start, end)` if the cache holds all of them.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.0.log_id.index;
        if start < first || end > last + 1 || start >= end {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    fn truncate(&mut self, from: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= from)
        {
            if let Some((_, n)) = self.entries.pop_back() {
                self.bytes -= n;
            }
        }
    }

    fn purge(&mut self, upto: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= upto)
        {
            if let Some((_, n)) = self.entries.pop_front() {
                self.bytes -= n;
            }
        }
    }
}

/// The log storage handed to openraft; clones share state.
#[derive(Clone)]
pub struct RaftLog {
    log: LogStore,
    kv: KvStore,
    /// Last committed index as openraft reported it (0 = none), for status endpoints.
    committed: Arc<AtomicU64>,
    cache: Arc<std::sync::Mutex<Cache>>,
}

impl RaftLog {
    /// Wraps the stores.
    pub fn new(log: LogStore, kv: KvStore) -> RaftLog {
        let committed = log
            .get_meta(COMMITTED)
            .ok()
            .flatten()
            .and_then(|b| decode::<Option<LogId>>(&b).ok())
            .flatten()
            .map_or(0, |l| l.index);
        RaftLog {
            log,
            kv,
            committed: Arc::new(AtomicU64::new(committed)),
            cache: Arc::default(),
        }
    }

    /// Shared view of the commit index.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }
}

fn read_err(e: flotilla_store::Error) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: flotilla_store::Error) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn decode_err(what: &str, e: String) -> StorageError<NodeId> {
    StorageIOError::new(
        ErrorSubject::Logs,
        ErrorVerb::Read,
        AnyError::error(format!("decoding {what}: {e}")),
    )
    .into()
}

impl RaftLogReader<TypeConfig> for RaftLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let cached = self.cache.lock().expect("not poisoned").get(start, end);
        if let Some(entries) = cached {
            return Ok(entries);
        }
        let mut out = Vec::new();
        let mut next = start;
        while next < end {
            let chunk = self
                .log
                .range(next, end, MAX_READ_BYTES)
                .map_err(read_err)?;
            let Some((last, _)) = chunk.last() else { break };
            next = last + 1;
            for (_, bytes) in chunk {
                out.push(decode::<Entry>(&bytes).map_err(|e| decode_err("a log entry", e))?);
            }
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for RaftLog {
    type LogReader = RaftLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let purged = match self.log.get_meta(PURGED).map_err(read_err)? {
            Some(b) => decode::<Option<LogId>>(&b).map_err(|e| decode_err("the purge point", e))?,
            None => None,
        };
        let last = match self.log.last().map_err(read_err)? {
            Some((_, bytes)) => Some(
                decode::<Entry>(&bytes)
                    .map_err(|e| decode_err("the last entry", e))?
                    .log_id,
            ),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.log
            .put_meta(VOTE, &encode(vote), true)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        match self
            .log
            .get_meta(VOTE)
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)))?
        {
            Some(b) => Ok(Some(decode(&b).map_err(|e| decode_err("the vote", e))?)),
            None => Ok(None),
        }
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not synced: a lost commit index is re-learned from the leader; it only speeds up
        // re-applying after a restart.
        self.log
            .put_meta(COMMITTED, &encode(&committed), false)
            .map_err(write_err)?;
        self.committed
            .store(committed.map_or(0, |l| l.index), Ordering::Release);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        match self.log.get_meta(COMMITTED).map_err(read_err)? {
            Some(b) => Ok(decode(&b).map_err(|e| decode_err("the commit index", e))?),
            None => Ok(None),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        {
            let mut cache = self.cache.lock().expect("not poisoned");
            for e in entries {
                let bytes = encode(&e);
                cache.push(e.clone(), bytes.len());
                encoded.push((e.log_id.index, bytes));
            }
        }
        // Synced by the flusher thread, on a leader and a follower alike: a leader starts
        // replicating at once, and a follower's Raft core is never blocked on the disk (it
        // synced inline once, and a one-second fsync on a loaded CI machine then kept it from
        // hearing its leader: its election timer fired and the cluster changed leader).
        self.log
            .append(
                encoded,
                Box::new(move |result| callback.log_io_completed(result)),
            )
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.cache
            .lock()
            .expect("not poisoned")
            .truncate(log_id.index);
        self.log.truncate(log_id.index).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        // Entries up to `log_id` are applied (openraft purges only applied entries); make the
        // state machine durable before they disappear.
        self.kv
            .sync()
            .map_err(|e| StorageIOError::write_state_machine(AnyError::new(&e)))?;
        self.cache.lock().expect("not poisoned").purge(log_id.index);
        self.log
            .purge(log_id.index, PURGED, &encode(&Some(log_id)))
            .map_err(write_err)
    }
}
