//! The durable Raft log: entries and the few records Raft needs to survive a crash.
//!
//! A separate RocksDB instance (`<data-dir>/raft`), so the log's fsyncs never wait on state
//! machine writes, as TiKV keeps its raft engine apart from its kv engine. Entries are opaque
//! bytes keyed by big-endian index.
//!
//! Durability, in write order:
//! 1. [`LogStore::append`] writes the entries in one batch (visible to readers at once, so
//!    the leader can replicate them while they are being synced) and queues its callback;
//! 2. the flusher thread takes every queued callback, syncs the WAL once (`FlushWAL(sync)`:
//!    group commit) and only then runs the callbacks: an entry is reported persisted only
//!    after an fsync that covers it;
//! 3. [`LogStore::put_meta`] with `sync` (the vote) writes synchronously before returning.
//!
//! Truncation and purge are ordinary writes ordered before any later append in the same WAL,
//! so the next synced append makes them durable too.

use std::io;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::error::{Error, Result};

const CF_LOG: &str = "log";
const CF_META: &str = "meta";

/// Called once the entries of one append are durable (or the sync failed).
pub type OnDurable = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Watches the log's I/O (for metrics). The store has no clock: an observer that wants
/// durations times the closure it is handed.
pub trait LogObserver: Send + Sync + 'static {
    /// Runs one sync of the write-ahead log, which makes `appends` appends durable.
    fn observe_sync(&self, _appends: usize, sync: &mut dyn FnMut()) {
        sync()
    }
    /// `entries` entries of `bytes` bytes in all were written.
    fn appended(&self, _entries: usize, _bytes: usize) {}
}

/// An observer that watches nothing.
pub struct NoLogObserver;
impl LogObserver for NoLogObserver {}

/// Most appends waiting for one sync; a full queue makes `append` wait (backpressure).
const MAX_PENDING_SYNCS: usize = 4096;

/// The Raft log store. Cheap to clone; the database closes when the last clone drops.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    observer: Arc<dyn LogObserver>,
    /// `None` only while dropping.
    flusher: Option<mpsc::SyncSender<OnDurable>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the flusher once it has synced what is queued; joining it
        // releases its handle on the database, so the directory can be reopened at once.
        self.flusher.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // As for the state machine (`kv::Generation`): no background job outlives the log.
        self.db.cancel_all_background_work(true);
    }
}

impl LogStore {
    /// Opens (or creates) the log under `dir` and starts its flusher thread.
    pub fn open(dir: impl AsRef<Path>) -> Result<LogStore> {
        LogStore::open_observed(dir, Arc::new(NoLogObserver))
    }

    /// [`LogStore::open`], reporting I/O to `observer`.
    pub fn open_observed(
        dir: impl AsRef<Path>,
        observer: Arc<dyn LogObserver>,
    ) -> Result<LogStore> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(3);
        opts.set_max_background_jobs(1);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&opts, dir.as_ref(), cfs)?);
        let (tx, rx) = mpsc::sync_channel::<OnDurable>(MAX_PENDING_SYNCS);
        let flusher_db = db.clone();
        let flusher_observer = observer.clone();
        let thread = thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || flusher_loop(flusher_db, rx, flusher_observer))?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                db,
                observer,
                flusher: Some(tx),
                thread: Some(thread),
            }),
        })
    }

    fn db(&self) -> &DB {
        &self.inner.db
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db()
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Writes `entries` (index, bytes) and calls `on_durable` after they are synced.
    pub fn append(&self, entries: Vec<(u64, Vec<u8>)>, on_durable: OnDurable) -> Result<()> {
        let batch = self.batch(&entries);
        self.db().write(batch)?;
        self.inner
            .flusher
            .as_ref()
            .expect("present until drop")
            .send(on_durable)
            .map_err(|_| Error::Io(io::Error::other("raft log flusher has stopped")))?;
        Ok(())
    }

    /// One write batch holding `entries`; reports them to the observer.
    fn batch(&self, entries: &[(u64, Vec<u8>)]) -> WriteBatch {
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_LOG);
        let mut bytes = 0;
        for (index, data) in entries {
            batch.put_cf(cf, index.to_be_bytes(), data);
            bytes += data.len();
        }
        self.inner.observer.appended(entries.len(), bytes);
        batch
    }

    /// Entries with index in `[start, end)`, in order: from the first one present (entries
    /// before it may be purged), stopping at the next gap or once `max_bytes` is exceeded
    /// (always at least one entry when one exists).
    pub fn range(&self, start: u64, end: u64, max_bytes: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_be_bytes().to_vec());
        let mut it = self.db().raw_iterator_cf_opt(self.cf(CF_LOG), ro);
        it.seek(start.to_be_bytes());
        let mut expect = None;
        let mut bytes = 0usize;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let index = decode_index(k)?;
            if expect.is_some_and(|e| e != index) {
                break;
            }
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            out.push((index, v.to_vec()));
            expect = Some(index + 1);
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The entry with the highest index.
    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let mut it = self.db().raw_iterator_cf(self.cf(CF_LOG));
        it.seek_to_last();
        match (it.key(), it.value()) {
            (Some(k), Some(v)) => Ok(Some((decode_index(k)?, v.to_vec()))),
            _ => {
                it.status()?;
                Ok(None)
            }
        }
    }

    /// Deletes every entry with index `>= from`.
    pub fn truncate(&self, from: u64) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG), from.to_be_bytes(), u64::MAX.to_be_bytes());
        // u64::MAX itself is never an index in practice; delete it explicitly anyway.
        batch.delete_cf(self.cf(CF_LOG), u64::MAX.to_be_bytes());
        self.db().write(batch)?;
        Ok(())
    }

    /// Deletes every entry with index `<= upto` and records `meta_key = meta_value` in the
    /// same batch (the caller's record of what was purged).
    pub fn purge(&self, upto: u64, meta_key: &[u8], meta_value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_LOG),
            0u64.to_be_bytes(),
            (upto + 1).to_be_bytes(),
        );
        batch.put_cf(self.cf(CF_META), meta_key, meta_value);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db().write_opt(batch, &wo)?;
        Ok(())
    }

    /// Stores a small record; with `sync` it is durable when this returns.
    pub fn put_meta(&self, key: &[u8], value: &[u8], sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db().put_cf_opt(self.cf(CF_META), key, value, &wo)?;
        Ok(())
    }

    /// Reads a record stored with [`LogStore::put_meta`].
    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db().get_cf(self.cf(CF_META), key)?)
    }
}

fn decode_index(raw: &[u8]) -> Result<u64> {
    raw.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Corrupt(format!("log key has {} bytes, want 8", raw.len())))
}

fn flusher_loop(db: Arc<DB>, rx: mpsc::Receiver<OnDurable>, observer: Arc<dyn LogObserver>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let mut result = Ok(());
        observer.observe_sync(waiting.len(), &mut || result = db.flush_wal(true));
        for cb in waiting {
            cb(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::other(format!("syncing the raft log: {e}"))),
            });
        }
        if let Err(err) = result {
            // A failed fsync leaves the page cache in an unknown state (fsyncgate): stop
            // reporting anything as durable. Raft treats the error as fatal.
            tracing::error!(%err, "raft log sync failed; no further appends will be acknowledged");
            for cb in rx.iter() {
                cb(Err(io::Error::other("raft log sync failed earlier")));
            }
            return;
        }
    }
}
