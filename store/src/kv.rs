//! The MVCC state machine: etcd's key-value contract on RocksDB.
//!
//! [`KvStore`] owns one *generation*: a RocksDB instance under `<dir>/gen-<n>` named by the
//! file `<dir>/CURRENT`. Installing a snapshot builds generation `n + 1` beside it and then
//! switches `CURRENT` with an atomic rename, so a crash during an install leaves the old state
//! machine intact (see [`KvStore::install`]).
//!
//! Invariants:
//! - Only [`KvStore::apply`] changes keys, and only from the Raft apply path (one caller at a
//!   time: the writer lock). Each log entry is one `WriteBatch` that also records the entry's
//!   log id, so a crash never leaves half an entry applied or the applied index behind the data.
//! - The revision grows by exactly one for each transaction that changes at least one key; all
//!   writes of that transaction share it.
//! - Reads take a RocksDB snapshot and read the revision from it, so the revision a read
//!   reports is exactly the state it saw.
//! - Writes are not synced here: the Raft log is the durable record, and a replica that
//!   crashes re-applies from its last durable applied id. [`KvStore::sync`] makes everything
//!   applied so far durable; the log store calls it before purging entries.
//! - Compaction is logical at apply time (reads and watches below it fail from then on) and
//!   physical in a background thread that removes superseded versions and their index rows.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBRawIteratorWithThreadMode, Options, ReadOptions,
    WriteBatch, WriteOptions, DB,
};

use crate::error::{Error, Result};
use crate::keys::{self, meta, Version};
use crate::snapshot;
use crate::types::*;
use crate::watch::{Hub, WatchRequest, Watcher};

const CF_KV: &str = "kv";
const CF_REV: &str = "rev";
const CF_META: &str = "meta";

/// Tunables of the state machine.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Bytes of key-value data (the `kv` and `rev` column families) above which puts are refused.
    pub quota_bytes: u64,
    /// Capacity, in messages, of each watcher's buffer; a live watcher that lets it fill is
    /// cancelled as too slow.
    pub watch_buffer: usize,
    /// Most events sent in one message while a watcher catches up from disk.
    pub watch_batch_events: usize,
    /// Most `rev` rows the compactor removes in one write batch.
    pub compaction_batch: usize,
    /// Bytes of recently written values kept in memory, so apply rarely has to look up a
    /// key's previous version in RocksDB (a seek through the memtables and level-0 files,
    /// where a hit is a hash lookup). The default,
    /// 256 MiB, holds every pod of a 50,000-pod cluster; with 64 MiB a follower spent 9%
    /// of its CPU in these seeks while a backlog of 50,000 pods was bound.
    pub latest_cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            quota_bytes: 8 * 1024 * 1024 * 1024,
            watch_buffer: 1024,
            watch_batch_events: 1000,
            compaction_batch: 1000,
            latest_cache_bytes: 256 << 20,
        }
    }
}

/// One operation to apply, decoded from a Raft entry by the caller.
#[derive(Debug, Clone)]
pub enum ApplyOp {
    /// Nothing but the log id (blank and membership entries, and rejected commands).
    None,
    /// A transaction.
    Txn(TxnRequest),
    /// Compact history below a revision.
    Compact(i64),
    /// Several operations of one entry, applied in order in the entry's one write batch;
    /// each sees the effects of the ones before it, and each write takes its own revision.
    Batch(Vec<ApplyOp>),
}

/// One Raft entry's worth of work for [`KvStore::apply`].
#[derive(Debug, Clone)]
pub struct ApplyEntry {
    /// The entry's log id, opaque to the store; recorded in the same batch.
    pub applied: Vec<u8>,
    /// A membership to record with it, opaque to the store.
    pub membership: Option<Vec<u8>>,
    /// The work.
    pub op: ApplyOp,
}

/// The outcome of one applied entry.
#[derive(Debug)]
pub enum Applied {
    /// The entry carried no operation.
    None,
    /// A transaction ran.
    Txn(TxnResponse),
    /// Compaction was recorded; the revision is the new compaction point.
    Compact(i64),
    /// The operation was refused (a request error); it changed nothing.
    Rejected(Error),
    /// The outcomes of an [`ApplyOp::Batch`], in order.
    Batch(Vec<Applied>),
}

/// The last applied log id and the last membership, as recorded by apply (opaque bytes).
pub type AppliedState = (Option<Vec<u8>>, Option<Vec<u8>>);

/// A point-in-time summary of the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// Current revision.
    pub revision: i64,
    /// Reads below this revision fail.
    pub compact_revision: i64,
    /// Live keys.
    pub keys: i64,
    /// Bytes of key-value data on disk and in memtables (what the quota counts).
    pub db_size: u64,
    /// Configured quota.
    pub quota_bytes: u64,
    /// Open watchers.
    pub watchers: usize,
}

/// The MVCC key-value state machine. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct KvStore {
    // Declared first, so dropped first: the last handle stops and joins the compactor before
    // its own reference to the store goes.
    owner: Arc<Owner>,
    shared: Arc<Shared>,
}

/// Held by every [`KvStore`] handle and by nothing else (not the compactor, not watchers).
/// When the last handle goes it stops the compactor and waits for its thread, so the
/// compactor never holds the last reference: the database then closes on the thread that
/// dropped the last handle, before that thread can go on (to exit the process, say).
/// Otherwise a compaction step in progress as a program dropped its store closed the
/// database on the compactor's thread while the main thread exited, and RocksDB aborted
/// ("pthread lock: Invalid argument", seen at the end of a store test).
struct Owner {
    signal: Arc<CompactorSignal>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Owner {
    fn stop(&self) {
        self.signal.stop();
        let handle = self.thread.lock().expect("not poisoned").take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) struct Shared {
    /// `<data-dir>/sm`.
    root: PathBuf,
    /// The live generation. Readers clone the `Arc` and release the lock at once.
    current: RwLock<Arc<Generation>>,
    /// Serialises everything that writes revisions (apply and install), and holds what only
    /// that path uses: the cache of live values.
    writer: Mutex<LatestCache>,
    pub(crate) hub: Hub,
    options: StoreOptions,
    compactor: Arc<CompactorSignal>,
}

impl Shared {
    /// The revision below which history is compacted away.
    pub(crate) fn compact_revision(&self) -> i64 {
        let gen = self.current.read().expect("not poisoned").clone();
        gen.compact_revision.load(Ordering::Acquire)
    }

    /// Reads events of `[start, ...]` from disk, whole revisions only, at most about
    /// `max_events` of them. Returns the events and the next revision to read.
    pub(crate) fn read_events(
        &self,
        req: &WatchRequest,
        start: i64,
        max_events: usize,
    ) -> Result<(Vec<Event>, i64)> {
        let gen = self.current.read().expect("not poisoned").clone();
        read_events(&gen, req, start, max_events)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The compactor holds only a weak reference; let it exit.
        self.compactor.stop();
    }
}

/// One RocksDB instance holding a complete state machine.
pub(crate) struct Generation {
    pub(crate) db: DB,
    number: u64,
    dir: PathBuf,
    /// Current revision.
    pub(crate) revision: AtomicI64,
    /// Logical compaction point.
    pub(crate) compact_revision: AtomicI64,
    /// Live keys.
    keys: AtomicI64,
    /// Set when replaced by a newer generation: the directory is removed on drop.
    obsolete: AtomicBool,
}

impl Drop for Generation {
    fn drop(&mut self) {
        // RocksDB's background jobs run on process-wide threads that can outlive the handle;
        // one still running when the process exits aborts it ("pthread lock: Invalid
        // argument", facebook/rocksdb#11349: seen once in a test binary). Wait for them.
        self.db.cancel_all_background_work(true);
        if self.obsolete.load(Ordering::Acquire) {
            // The DB handle closes when `db` drops, after this body; removing the files
            // first is fine on Linux and the directory is never reopened.
            if let Err(err) = fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), %err, "could not remove an old state machine generation");
            }
        }
    }
}

impl Generation {
    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn open(dir: &Path, number: u64) -> Result<Generation> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(3);
        let mut kv_opts = Options::default();
        kv_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_KV, kv_opts),
            ColumnFamilyDescriptor::new(CF_REV, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let gen = Generation {
            db,
            number,
            dir: dir.to_path_buf(),
            revision: AtomicI64::new(0),
            compact_revision: AtomicI64::new(0),
            keys: AtomicI64::new(0),
            obsolete: AtomicBool::new(false),
        };
        gen.reload_counters()?;
        Ok(gen)
    }

    fn db_size(&self) -> u64 {
        let mut total = 0;
        for cf in [CF_KV, CF_REV] {
            for prop in [
                "rocksdb.total-sst-files-size",
                "rocksdb.size-all-mem-tables",
            ] {
                total += self
                    .db
                    .property_int_value_cf(self.cf(cf), prop)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
        }
        total
    }
}

impl KvStore {
    /// Opens (or creates) the state machine under `dir` and starts its compactor.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<KvStore> {
        let root = dir.as_ref().to_path_buf();
        fs::create_dir_all(&root)?;
        let number = match fs::read_to_string(root.join("CURRENT")) {
            Ok(s) => s
                .trim()
                .strip_prefix("gen-")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| Error::Corrupt(format!("bad CURRENT file: {s:?}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_current(&root, 0)?;
                0
            }
            Err(e) => return Err(e.into()),
        };
        // Leftovers of an install that crashed, and generations already replaced.
        for entry in fs::read_dir(&root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("gen-") && name != format!("gen-{number}") {
                fs::remove_dir_all(entry.path())?;
            }
        }
        let gen = Generation::open(&root.join(format!("gen-{number}")), number)?;
        let revision = gen.revision.load(Ordering::Acquire);
        let signal = Arc::new(CompactorSignal::default());
        let shared = Arc::new(Shared {
            root,
            current: RwLock::new(Arc::new(gen)),
            writer: Mutex::new(LatestCache::new(options.latest_cache_bytes)),
            hub: Hub::new(revision, options.watch_buffer, options.watch_batch_events),
            options,
            compactor: signal.clone(),
        });
        let weak = Arc::downgrade(&shared);
        let thread_signal = signal.clone();
        let handle = thread::Builder::new()
            .name("kv-compactor".into())
            .spawn(move || compactor_loop(weak, thread_signal))?;
        let owner = Arc::new(Owner {
            signal,
            thread: Mutex::new(Some(handle)),
        });
        shared.compactor.wake();
        Ok(KvStore { owner, shared })
    }

    pub(crate) fn generation(&self) -> Arc<Generation> {
        self.shared.current.read().expect("not poisoned").clone()
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.generation().revision.load(Ordering::Acquire)
    }

    /// The compaction point: reads and watches below it fail with [`Error::Compacted`].
    pub fn compact_revision(&self) -> i64 {
        self.shared.compact_revision()
    }

    /// A summary for status endpoints and metrics.
    pub fn status(&self) -> StoreStatus {
        let gen = self.generation();
        StoreStatus {
            revision: gen.revision.load(Ordering::Acquire),
            compact_revision: gen.compact_revision.load(Ordering::Acquire),
            keys: gen.keys.load(Ordering::Acquire),
            db_size: gen.db_size(),
            quota_bytes: self.shared.options.quota_bytes,
            watchers: self.shared.hub.len(),
        }
    }

    /// Refuses a transaction that could put while the store is over its quota. Checked by the
    /// leader before proposing (not at apply, where every replica must decide alike).
    pub fn check_quota(&self, txn: &TxnRequest) -> Result<()> {
        match self.over_quota() {
            Some(e) if txn.has_puts() => Err(e),
            _ => Ok(()),
        }
    }

    /// The [`Error::NoSpace`] to answer puts with, if the store is over its quota.
    pub fn over_quota(&self) -> Option<Error> {
        let used = self.generation().db_size();
        (used > self.shared.options.quota_bytes).then_some(Error::NoSpace {
            used,
            quota: self.shared.options.quota_bytes,
        })
    }

    /// The last applied log id and membership recorded by [`KvStore::apply`], opaque bytes.
    pub fn applied_state(&self) -> Result<AppliedState> {
        let gen = self.generation();
        let cf = gen.cf(CF_META);
        Ok((
            gen.db.get_cf(cf, meta::APPLIED)?,
            gen.db.get_cf(cf, meta::MEMBERSHIP)?,
        ))
    }

    /// Forgets the applied log id and membership, keeping the data and revisions: used by
    /// `snapshot restore`, which seeds a new cluster whose Raft log starts from scratch.
    pub fn forget_raft_state(&self) -> Result<()> {
        let _writer = self.shared.writer.lock().expect("not poisoned");
        let gen = self.generation();
        let mut batch = WriteBatch::default();
        batch.delete_cf(gen.cf(CF_META), meta::APPLIED);
        batch.delete_cf(gen.cf(CF_META), meta::MEMBERSHIP);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        gen.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Makes everything applied so far durable.
    pub fn sync(&self) -> Result<()> {
        self.generation().db.flush_wal(true)?;
        Ok(())
    }

    /// Reads a range at a revision.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        let gen = self.generation();
        let snap = gen.db.snapshot();
        let read_meta = |key: &[u8]| -> Result<i64> {
            let mut ro = ReadOptions::default();
            ro.set_snapshot(&snap);
            match gen.db.get_cf_opt(gen.cf(CF_META), key, &ro)? {
                Some(raw) => keys::decode_i64(&raw),
                None => Ok(0),
            }
        };
        let current = read_meta(meta::REVISION)?;
        let compact = read_meta(meta::COMPACT_REVISION)?;
        let at = if req.revision <= 0 {
            current
        } else {
            req.revision
        };
        if at > current {
            return Err(Error::FutureRevision {
                requested: at,
                current,
            });
        }
        if at < compact {
            return Err(Error::Compacted {
                requested: at,
                compact_revision: compact,
            });
        }
        if req.key.is_empty() {
            return Err(Error::InvalidRequest("key is not provided".into()));
        }
        if req.limit < 0 {
            return Err(Error::InvalidRequest("limit must not be negative".into()));
        }
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        if let Some(upper) = upper_bound(&req.key, &req.range_end) {
            ro.set_iterate_upper_bound(upper);
        }
        let mut it = gen.db.raw_iterator_cf_opt(gen.cf(CF_KV), ro);
        let (kvs, count, more) = scan(&mut it, req, at)?;
        Ok(RangeResponse {
            revision: at,
            kvs,
            more,
            count,
        })
    }

    /// Opens a watch. A start revision of 0 means "from the next revision"; one below the
    /// compaction point fails with [`Error::Compacted`]; one in the future waits for it.
    /// Must be called inside a Tokio runtime (history is replayed by a task).
    pub fn watch(&self, req: WatchRequest) -> Result<Watcher> {
        Hub::watch(&self.shared, req)
    }

    /// Applies Raft entries in order, one write batch each. The outer error is a storage
    /// failure (fatal for this replica); request errors come back as [`Applied::Rejected`].
    pub fn apply(&self, entries: Vec<ApplyEntry>) -> Result<Vec<Applied>> {
        let mut cache = self.shared.writer.lock().expect("not poisoned");
        let gen = self.generation();
        let mut out = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        let first_rev = gen.revision.load(Ordering::Acquire);
        let mut compacted = false;
        let meta_cf = gen.cf(CF_META);
        for entry in entries {
            let mut batch = WriteBatch::default();
            let mut state = EntryState {
                revision: gen.revision.load(Ordering::Acquire),
                compact_revision: gen.compact_revision.load(Ordering::Acquire),
                keys: gen.keys.load(Ordering::Acquire),
                overlay: BTreeMap::new(),
                cache: &mut cache,
            };
            let start = state.clone_counters();
            let outcome = apply_op(&gen, entry.op, &mut state, &mut batch, &mut events)?;
            if state.revision != start.0 {
                batch.put_cf(meta_cf, meta::REVISION, state.revision.to_le_bytes());
            }
            if state.keys != start.2 {
                batch.put_cf(meta_cf, meta::KEYS, state.keys.to_le_bytes());
            }
            if state.compact_revision != start.1 {
                batch.put_cf(
                    meta_cf,
                    meta::COMPACT_REVISION,
                    state.compact_revision.to_le_bytes(),
                );
                compacted = true;
            }
            batch.put_cf(meta_cf, meta::APPLIED, &entry.applied);
            if let Some(m) = &entry.membership {
                batch.put_cf(meta_cf, meta::MEMBERSHIP, m);
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(false);
            gen.db.write_opt(batch, &wo)?;
            // Publish only after the batch is in RocksDB, so readers never see a revision
            // whose data is missing.
            gen.compact_revision
                .store(state.compact_revision, Ordering::Release);
            gen.keys.store(state.keys, Ordering::Release);
            gen.revision.store(state.revision, Ordering::Release);
            // The entry's final values are now in RocksDB; the cache may serve them.
            let EntryState { overlay, cache, .. } = state;
            for (key, value) in overlay {
                cache.insert(key, value);
            }
            out.push(outcome);
        }
        let last_rev = gen.revision.load(Ordering::Acquire);
        if last_rev != first_rev {
            self.shared.hub.notify(events, last_rev);
        }
        if compacted {
            self.shared.compactor.wake();
        }
        Ok(out)
    }

    /// Writes a consistent point-in-time copy of the state machine to `out`, and returns the
    /// applied log id and membership it contains.
    pub fn export(&self, out: &mut dyn Write) -> Result<snapshot::ExportInfo> {
        let gen = self.generation();
        snapshot::export(&gen, out)
    }

    /// Replaces the whole state machine with the snapshot read from `input`.
    ///
    /// The snapshot is imported into a new generation directory, flushed to disk, and only
    /// then made current by an atomic rename of `CURRENT`. Watchers are moved onto the new
    /// generation; those whose position is older than its compaction point are cancelled as
    /// compacted.
    pub fn install(&self, input: &mut dyn Read) -> Result<snapshot::ExportInfo> {
        let mut cache = self.shared.writer.lock().expect("not poisoned");
        cache.clear();
        let old = self.generation();
        let number = old.number + 1;
        let dir = self.shared.root.join(format!("gen-{number}"));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        let gen = Generation::open(&dir, number)?;
        let info = match snapshot::import(&gen, input) {
            Ok(info) => info,
            Err(e) => {
                gen.obsolete.store(true, Ordering::Release);
                return Err(e);
            }
        };
        // The import wrote without the write-ahead log: its rows are durable only once every
        // column family's memtable is flushed. (`DB::flush` flushes the default family alone:
        // a process killed after the switch below used to come back with the snapshot's
        // meta and data gone while later entries, logged, survived: a diverged replica.
        // Found by the chaos suite.)
        for name in [CF_KV, CF_REV, CF_META] {
            gen.db.flush_cf(gen.cf(name))?;
        }
        gen.db.flush_wal(true)?;
        let (revision, _, _) = gen.reload_counters()?;
        write_current(&self.shared.root, number)?;
        {
            let mut current = self.shared.current.write().expect("not poisoned");
            old.obsolete.store(true, Ordering::Release);
            *current = Arc::new(gen);
        }
        drop(old);
        self.shared.hub.reset(&self.shared, revision);
        self.shared.compactor.wake();
        tracing::info!(
            generation = number,
            revision,
            "installed state machine snapshot"
        );
        Ok(info)
    }

    /// Stops the compactor and cancels every watcher. Called on shutdown.
    pub fn close(&self) {
        self.shared.hub.close();
        self.owner.stop();
    }

    /// Runs the compactor until physical compaction has reached the logical compaction point.
    /// For tests and `ctl compact --physical`.
    pub fn wait_compacted(&self) -> Result<()> {
        loop {
            let gen = self.generation();
            let target = gen.compact_revision.load(Ordering::Acquire);
            if compacted_upto(&gen)? >= target {
                return Ok(());
            }
            self.shared.compactor.wake();
            thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Generation {
    /// Loads the cached counters from meta; returns (revision, compact revision, keys).
    fn reload_counters(&self) -> Result<(i64, i64, i64)> {
        let gen = self;
        let read = |key: &[u8]| -> Result<i64> {
            match gen.db.get_cf(gen.cf(CF_META), key)? {
                Some(raw) => keys::decode_i64(&raw),
                None => Ok(0),
            }
        };
        let r = (
            read(meta::REVISION)?,
            read(meta::COMPACT_REVISION)?,
            read(meta::KEYS)?,
        );
        gen.revision.store(r.0, Ordering::Release);
        gen.compact_revision.store(r.1, Ordering::Release);
        gen.keys.store(r.2, Ordering::Release);
        Ok(r)
    }
}

fn write_current(root: &Path, number: u64) -> Result<()> {
    let tmp = root.join("CURRENT.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(format!("gen-{number}\n").as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, root.join("CURRENT"))?;
    fs::File::open(root)?.sync_all()?;
    Ok(())
}

/// The exclusive upper bound, in `kv` key space, of etcd's range `[key, range_end)`.
fn upper_bound(key: &[u8], range_end: &[u8]) -> Option<Vec<u8>> {
    if range_end.is_empty() {
        Some(keys::after_versions(key))
    } else if range_end == [0] {
        None
    } else {
        Some(keys::escaped(range_end))
    }
}

/// Scans the newest version at or below `at` of each key in the request's range.
/// The iterator must be bounded above by [`upper_bound`].
fn scan<D: rocksdb::DBAccess>(
    it: &mut DBRawIteratorWithThreadMode<'_, D>,
    req: &RangeRequest,
    at: i64,
) -> Result<(Vec<KeyValue>, i64, bool)> {
    let mut kvs = Vec::new();
    let mut count = 0i64;
    let mut more = false;
    let limit = req.limit.max(0) as usize;
    it.seek(keys::escaped(&req.key));
    while it.valid() {
        let raw_key = it.key().expect("valid iterator has a key");
        let (key, rev) = keys::decode_version_key(raw_key)?;
        if rev > at {
            it.seek(keys::version_key(&key, at));
            continue;
        }
        let v = Version::decode(
            it.value().expect("valid iterator has a value"),
            req.keys_only || req.count_only,
        )?;
        if !v.tombstone {
            count += 1;
            if !req.count_only {
                if limit == 0 || kvs.len() < limit {
                    kvs.push(KeyValue {
                        key: key.clone(),
                        create_revision: v.create_revision,
                        mod_revision: rev,
                        version: v.version,
                        value: v.value,
                    });
                } else {
                    more = true;
                }
            }
        }
        skip_versions(it, &key)?;
    }
    it.status()?;
    Ok((kvs, count, more))
}

/// Moves the iterator past every remaining version of `key`: a few `next`s (most keys have
/// one version), then a seek.
fn skip_versions<D: rocksdb::DBAccess>(
    it: &mut DBRawIteratorWithThreadMode<'_, D>,
    key: &[u8],
) -> Result<()> {
    let prefix = keys::escaped(key);
    for _ in 0..3 {
        it.next();
        match it.key() {
            Some(k) if k.len() == prefix.len() + 8 && k.starts_with(&prefix) => continue,
            _ => return Ok(()),
        }
    }
    it.seek(keys::after_versions(key));
    Ok(())
}

/// The newest version of `key` at or below `at` (tombstones included), with its revision.
fn version_at(gen: &Generation, key: &[u8], at: i64) -> Result<Option<(i64, Version)>> {
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(keys::after_versions(key));
    let mut it = gen.db.raw_iterator_cf_opt(gen.cf(CF_KV), ro);
    it.seek(keys::version_key(key, at));
    if !it.valid() {
        it.status()?;
        return Ok(None);
    }
    let (_, rev) = keys::decode_version_key(it.key().expect("valid"))?;
    let v = Version::decode(it.value().expect("valid"), false)?;
    Ok(Some((rev, v)))
}

/// The live value of `key` now: `None` if absent or deleted.
fn latest(gen: &Generation, key: &[u8]) -> Result<Option<KeyValue>> {
    Ok(match version_at(gen, key, i64::MAX)? {
        Some((rev, v)) if !v.tombstone => Some(KeyValue {
            key: key.to_vec(),
            create_revision: v.create_revision,
            mod_revision: rev,
            version: v.version,
            value: v.value,
        }),
        _ => None,
    })
}

fn compare_holds(c: &Compare, kv: Option<&KeyValue>) -> bool {
    use std::cmp::Ordering as O;
    let ord = match (&c.target, kv) {
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
        (CompareTarget::Version(n), kv) => kv.map_or(0, |k| k.version).cmp(n),
        (CompareTarget::CreateRevision(n), kv) => kv.map_or(0, |k| k.create_revision).cmp(n),
        (CompareTarget::ModRevision(n), kv) => kv.map_or(0, |k| k.mod_revision).cmp(n),
    };
    match c.result {
        CompareResult::Equal => ord == O::Equal,
        CompareResult::NotEqual => ord != O::Equal,
        CompareResult::Greater => ord == O::Greater,
        CompareResult::Less => ord == O::Less,
    }
}

/// What one log entry has done so far: the counters it will publish and the keys it has
/// written (`None`: deleted), so later operations of the same entry read their effects.
struct EntryState<'a> {
    revision: i64,
    compact_revision: i64,
    keys: i64,
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    cache: &'a mut LatestCache,
}

impl EntryState<'_> {
    fn clone_counters(&self) -> (i64, i64, i64) {
        (self.revision, self.compact_revision, self.keys)
    }

    /// The live value of `key` as this entry sees it: its own writes, then the cache of
    /// earlier entries' writes, then RocksDB.
    fn latest(&mut self, gen: &Generation, key: &[u8]) -> Result<Option<KeyValue>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.cache.get(key) {
            return Ok(v);
        }
        let v = latest(gen, key)?;
        self.cache.insert(key.to_vec(), v.clone());
        Ok(v)
    }
}

/// Live values (or "absent") of recently written or read keys, bounded in bytes. Only the
/// writer uses it; it is cleared when a snapshot replaces the state. When full, arbitrary
/// entries are dropped: any entry is correct, so only the hit rate depends on which.
pub(crate) struct LatestCache {
    map: std::collections::HashMap<Vec<u8>, Option<KeyValue>>,
    bytes: usize,
    budget: usize,
}

impl LatestCache {
    fn new(budget: usize) -> LatestCache {
        LatestCache {
            map: std::collections::HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    fn cost(key: &[u8], value: &Option<KeyValue>) -> usize {
        2 * key.len() + value.as_ref().map_or(0, |v| v.value.len()) + 64
    }

    fn get(&self, key: &[u8]) -> Option<Option<KeyValue>> {
        self.map.get(key).cloned()
    }

    fn insert(&mut self, key: Vec<u8>, value: Option<KeyValue>) {
        if self.budget == 0 {
            return;
        }
        let cost = Self::cost(&key, &value);
        if let Some(old) = self.map.get(&key) {
            self.bytes -= Self::cost(&key, old);
        }
        self.bytes += cost;
        self.map.insert(key, value);
        if self.bytes > self.budget {
            // Drop about a quarter, in the map's (arbitrary) order.
            let target = self.budget - self.budget / 4;
            let mut doomed = Vec::new();
            let mut freed = 0;
            for (k, v) in &self.map {
                if self.bytes - freed <= target {
                    break;
                }
                freed += Self::cost(k, v);
                doomed.push(k.clone());
            }
            for k in doomed {
                self.map.remove(&k);
            }
            self.bytes -= freed;
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

/// Applies one operation of an entry into `batch`. A refused operation (a request error)
/// adds nothing to the batch and changes no state.
fn apply_op(
    gen: &Generation,
    op: ApplyOp,
    state: &mut EntryState,
    batch: &mut WriteBatch,
    events: &mut Vec<Event>,
) -> Result<Applied> {
    Ok(match op {
        ApplyOp::None => Applied::None,
        ApplyOp::Txn(txn) => match apply_txn(gen, &txn, state, batch, events) {
            Ok(resp) => Applied::Txn(resp),
            Err(e) if e.is_request_error() => Applied::Rejected(e),
            Err(e) => return Err(e),
        },
        ApplyOp::Compact(rev) => {
            if rev <= state.compact_revision {
                Applied::Rejected(Error::Compacted {
                    requested: rev,
                    compact_revision: state.compact_revision,
                })
            } else if rev > state.revision {
                Applied::Rejected(Error::FutureRevision {
                    requested: rev,
                    current: state.revision,
                })
            } else {
                state.compact_revision = rev;
                Applied::Compact(rev)
            }
        }
        ApplyOp::Batch(ops) => {
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                if matches!(op, ApplyOp::Batch(_)) {
                    out.push(Applied::Rejected(Error::InvalidRequest(
                        "nested batches are not allowed".into(),
                    )));
                    continue;
                }
                out.push(apply_op(gen, op, state, batch, events)?);
            }
            Applied::Batch(out)
        }
    })
}

/// Runs one transaction into `batch`. Validation comes first, so a refused transaction adds
/// nothing to the batch.
fn apply_txn(
    gen: &Generation,
    txn: &TxnRequest,
    state: &mut EntryState,
    batch: &mut WriteBatch,
    events: &mut Vec<Event>,
) -> Result<TxnResponse> {
    txn.validate(&Limits::default())?;
    let current = state.revision;
    let mut succeeded = true;
    for c in &txn.compare {
        let current = state.latest(gen, &c.key)?;
        if !compare_holds(c, current.as_ref()) {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let rev = current + 1;
    let mut sub = 0u32;
    let mut responses = Vec::with_capacity(ops.len());
    let kv_cf = gen.cf(CF_KV);
    let rev_cf = gen.cf(CF_REV);
    for op in ops {
        match op {
            RequestOp::Range(r) => {
                responses.push(ResponseOp::Range(range_with_overlay(
                    gen,
                    r,
                    current,
                    &state.overlay,
                )?));
            }
            RequestOp::Put(p) => {
                let prev = state.latest(gen, &p.key)?;
                let kv = KeyValue {
                    key: p.key.clone(),
                    create_revision: prev.as_ref().map_or(rev, |k| k.create_revision),
                    mod_revision: rev,
                    version: prev.as_ref().map_or(1, |k| k.version + 1),
                    value: p.value.clone(),
                };
                let record = Version {
                    tombstone: false,
                    create_revision: kv.create_revision,
                    version: kv.version,
                    value: p.value.clone(),
                };
                batch.put_cf(kv_cf, keys::version_key(&p.key, rev), record.encode());
                batch.put_cf(rev_cf, keys::rev_key(rev, sub), &p.key);
                sub += 1;
                if prev.is_none() {
                    state.keys += 1;
                }
                events.push(Event {
                    kind: EventKind::Put,
                    kv: kv.clone(),
                    prev_kv: prev.clone(),
                });
                state.overlay.insert(p.key.clone(), Some(kv));
                responses.push(ResponseOp::Put(PutResponse {
                    prev_kv: if p.prev_kv { prev } else { None },
                }));
            }
            RequestOp::DeleteRange(d) => {
                let live = range_with_overlay(
                    gen,
                    &RangeRequest {
                        key: d.key.clone(),
                        range_end: d.range_end.clone(),
                        ..RangeRequest::default()
                    },
                    current,
                    &state.overlay,
                )?;
                let mut prev_kvs = Vec::new();
                for prev in live.kvs {
                    let record = Version {
                        tombstone: true,
                        create_revision: 0,
                        version: 0,
                        value: Vec::new(),
                    };
                    batch.put_cf(kv_cf, keys::version_key(&prev.key, rev), record.encode());
                    batch.put_cf(rev_cf, keys::rev_key(rev, sub), &prev.key);
                    sub += 1;
                    state.keys -= 1;
                    events.push(Event {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key: prev.key.clone(),
                            mod_revision: rev,
                            ..KeyValue::default()
                        },
                        prev_kv: Some(prev.clone()),
                    });
                    state.overlay.insert(prev.key.clone(), None);
                    if d.prev_kv {
                        prev_kvs.push(prev);
                    }
                }
                responses.push(ResponseOp::DeleteRange(DeleteRangeResponse {
                    deleted: live.count,
                    prev_kvs,
                }));
            }
        }
    }
    if sub > 0 {
        state.revision = rev;
    }
    Ok(TxnResponse {
        succeeded,
        responses,
        revision: state.revision,
    })
}

/// A range at `current` as modified by the transaction's own earlier writes.
fn range_with_overlay(
    gen: &Generation,
    req: &RangeRequest,
    current: i64,
    overlay: &BTreeMap<Vec<u8>, Option<KeyValue>>,
) -> Result<RangeResponse> {
    let mut ro = ReadOptions::default();
    if let Some(upper) = upper_bound(&req.key, &req.range_end) {
        ro.set_iterate_upper_bound(upper);
    }
    let mut it = gen.db.raw_iterator_cf_opt(gen.cf(CF_KV), ro);
    let unlimited = RangeRequest {
        limit: 0,
        count_only: false,
        ..req.clone()
    };
    let (kvs, _, _) = scan(&mut it, &unlimited, current)?;
    let mut merged: BTreeMap<Vec<u8>, KeyValue> =
        kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    for (k, v) in overlay {
        if in_range(k, &req.key, &req.range_end) {
            match v {
                Some(kv) => {
                    let mut kv = kv.clone();
                    if req.keys_only {
                        kv.value.clear();
                    }
                    merged.insert(k.clone(), kv);
                }
                None => {
                    merged.remove(k);
                }
            }
        }
    }
    let count = merged.len() as i64;
    let limit = req.limit.max(0) as usize;
    let more = limit > 0 && merged.len() > limit;
    let kvs = if req.count_only {
        Vec::new()
    } else if limit > 0 {
        merged.into_values().take(limit).collect()
    } else {
        merged.into_values().collect()
    };
    Ok(RangeResponse {
        revision: current,
        kvs,
        more,
        count,
    })
}

/// Events of revisions `start..` in the watch's range, read from one snapshot. Stops after
/// the revision during which `max_events` was reached. Returns `(events, next_revision)`.
fn read_events(
    gen: &Generation,
    req: &WatchRequest,
    start: i64,
    max_events: usize,
) -> Result<(Vec<Event>, i64)> {
    let snap = gen.db.snapshot();
    let mut ro = ReadOptions::default();
    ro.set_snapshot(&snap);
    let meta_cf = gen.cf(CF_META);
    let get_i64 = |key: &[u8]| -> Result<i64> {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        match gen.db.get_cf_opt(meta_cf, key, &ro)? {
            Some(raw) => keys::decode_i64(&raw),
            None => Ok(0),
        }
    };
    let current = get_i64(meta::REVISION)?;
    let compact = get_i64(meta::COMPACT_REVISION)?;
    if start < compact {
        return Err(Error::Compacted {
            requested: start,
            compact_revision: compact,
        });
    }
    let mut events = Vec::new();
    let mut it = snap.raw_iterator_cf_opt(gen.cf(CF_REV), ro);
    it.seek(keys::rev_key(start, 0));
    // Every revision below `next` has been read.
    let mut next = start;
    let mut scanned = 0usize;
    while it.valid() {
        let (rev, _) = keys::decode_rev_key(it.key().expect("valid"))?;
        if rev > current {
            break;
        }
        if rev >= next && (events.len() >= max_events || scanned >= max_events * 16) {
            // The previous revision is complete; stop at this boundary.
            it.status()?;
            return Ok((events, rev));
        }
        next = rev + 1;
        scanned += 1;
        let key = it.value().expect("valid").to_vec();
        if in_range(&key, &req.key, &req.range_end) {
            events.push(event_at(gen, &snap, key, rev, req.prev_kv)?);
        }
        it.next();
    }
    it.status()?;
    Ok((events, start.max(current + 1)))
}

/// The event of `key` at `rev`, read from `snap`.
fn event_at(
    gen: &Generation,
    snap: &rocksdb::SnapshotWithThreadMode<'_, DB>,
    key: Vec<u8>,
    rev: i64,
    with_prev: bool,
) -> Result<Event> {
    let mut ro = ReadOptions::default();
    ro.set_snapshot(snap);
    let raw = gen
        .db
        .get_cf_opt(gen.cf(CF_KV), keys::version_key(&key, rev), &ro)?
        .ok_or_else(|| Error::Corrupt(format!("revision {rev} indexes a missing version")))?;
    let v = Version::decode(&raw, false)?;
    let prev_kv = if with_prev {
        let mut pro = ReadOptions::default();
        pro.set_snapshot(snap);
        pro.set_iterate_upper_bound(keys::after_versions(&key));
        let mut pit = gen.db.raw_iterator_cf_opt(gen.cf(CF_KV), pro);
        pit.seek(keys::version_key(&key, rev - 1));
        if pit.valid() {
            let (_, prev_rev) = keys::decode_version_key(pit.key().expect("valid"))?;
            let pv = Version::decode(pit.value().expect("valid"), false)?;
            (!pv.tombstone).then(|| KeyValue {
                key: key.clone(),
                create_revision: pv.create_revision,
                mod_revision: prev_rev,
                version: pv.version,
                value: pv.value,
            })
        } else {
            pit.status()?;
            None
        }
    } else {
        None
    };
    Ok(if v.tombstone {
        Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key,
                mod_revision: rev,
                ..KeyValue::default()
            },
            prev_kv,
        }
    } else {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key,
                create_revision: v.create_revision,
                mod_revision: rev,
                version: v.version,
                value: v.value,
            },
            prev_kv,
        }
    })
}

fn compacted_upto(gen: &Generation) -> Result<i64> {
    match gen.db.get_cf(gen.cf(CF_META), meta::COMPACTED_UPTO)? {
        Some(raw) => keys::decode_i64(&raw),
        None => Ok(0),
    }
}

#[derive(Default)]
struct CompactorSignal {
    state: Mutex<(bool, bool)>, // (woken, stopped)
    cv: Condvar,
}

impl CompactorSignal {
    fn wake(&self) {
        self.state.lock().expect("not poisoned").0 = true;
        self.cv.notify_one();
    }
    fn stop(&self) {
        self.state.lock().expect("not poisoned").1 = true;
        self.cv.notify_one();
    }
    /// Waits for a wake-up; false when stopped.
    fn wait(&self) -> bool {
        let mut st = self.state.lock().expect("not poisoned");
        while !st.0 && !st.1 {
            st = self.cv.wait(st).expect("not poisoned");
        }
        st.0 = false;
        !st.1
    }
    fn stopped(&self) -> bool {
        self.state.lock().expect("not poisoned").1
    }
}

/// Physical compaction: for each key written below the compaction point, removes every
/// version older than its newest version at the compaction point (and that one too if it is
/// a tombstone below the point), then the index rows below the point, in bounded batches that each
/// record their progress. Idempotent, so a crash midway is harmless.
fn compactor_loop(shared: std::sync::Weak<Shared>, signal: Arc<CompactorSignal>) {
    while signal.wait() {
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if signal.stopped() {
                return;
            }
            let gen = shared.current.read().expect("not poisoned").clone();
            match compact_step(&gen, shared.options.compaction_batch) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(err) => {
                    tracing::error!(%err, "physical compaction failed; will retry on the next compaction");
                    break;
                }
            }
        }
    }
}

/// One batch of physical compaction. Returns true if there is more to do.
fn compact_step(gen: &Generation, batch_rows: usize) -> Result<bool> {
    let target = gen.compact_revision.load(Ordering::Acquire);
    let done = compacted_upto(gen)?;
    if done >= target {
        return Ok(false);
    }
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(keys::rev_key(target, 0).to_vec());
    let mut it = gen.db.raw_iterator_cf_opt(gen.cf(CF_REV), ro);
    it.seek(keys::rev_key(done, 0));
    let mut batch = WriteBatch::default();
    let mut rows = 0;
    let mut progress = target;
    while it.valid() {
        let raw = it.key().expect("valid").to_vec();
        let (rev, _) = keys::decode_rev_key(&raw)?;
        if rows >= batch_rows {
            // Resume at this revision; rows of it already removed are gone from the index.
            progress = rev;
            break;
        }
        let key = it.value().expect("valid").to_vec();
        if let Some((newest, v)) = version_at(gen, &key, target)? {
            // Every version older than the newest one at the compaction point is superseded,
            // including versions an earlier compaction kept; so is a tombstone below it.
            let from = if v.tombstone && newest < target {
                newest
            } else {
                newest - 1
            };
            batch.delete_range_cf(
                gen.cf(CF_KV),
                keys::version_key(&key, from),
                keys::after_versions(&key),
            );
        }
        batch.delete_cf(gen.cf(CF_REV), &raw);
        rows += 1;
        it.next();
    }
    it.status()?;
    batch.put_cf(
        gen.cf(CF_META),
        meta::COMPACTED_UPTO,
        progress.to_le_bytes(),
    );
    gen.db.write(batch)?;
    Ok(progress < target)
}
