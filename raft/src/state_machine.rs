//! openraft's state machine over [`flotilla_store::KvStore`], and snapshot files.
//!
//! A snapshot is a file in `<data-dir>/snapshots/`: the store's streaming export followed by
//! a trailer holding the Raft snapshot metadata:
//!
//! ```text
//! store export | bincode(SnapshotMeta) | le32(meta length) | "FLORAFT1"
//! ```
//!
//! Files are written under a temporary name, fsynced and renamed, so a crash never leaves a
//! half snapshot under a final name; only the newest snapshot is kept. Building and
//! installing stream through the file: the store is never held in memory.

use std::collections::HashMap;
use std::fs;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_store::{Applied, ApplyEntry, ApplyOp, KvStore};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageError,
    StorageIOError,
};

use crate::types::{
    decode, encode, ApplyError, Command, CommandResult, Entry, LogId, NodeId, Op, SnapshotMeta,
    StoredMembership, TypeConfig,
};

const TRAILER_MAGIC: &[u8; 8] = b"FLORAFT1";

/// Observes snapshot activity (for metrics); all methods have empty defaults.
pub trait SnapshotObserver: Send + Sync + 'static {
    /// A snapshot was built in `seconds`.
    fn built(&self, _seconds: f64, _bytes: u64) {}
    /// A snapshot was installed in `seconds`.
    fn installed(&self, _seconds: f64) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl SnapshotObserver for NoObserver {}

/// The state machine handed to openraft.
#[derive(Clone)]
pub struct StateMachine {
    kv: KvStore,
    snapshots: Arc<SnapshotDir>,
}

struct SnapshotDir {
    dir: PathBuf,
    counter: AtomicU64,
    /// Files being received, by descriptor, so install can give them their final name.
    receiving: Mutex<HashMap<i32, PathBuf>>,
    observer: Arc<dyn SnapshotObserver>,
}

fn sm_err(verb: ErrorVerb, e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

fn snap_err(verb: ErrorVerb, e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

impl StateMachine {
    /// Wraps `kv`, keeping snapshot files in `snapshot_dir` (created if missing; leftovers of
    /// interrupted builds and transfers are removed).
    pub fn open(
        kv: KvStore,
        snapshot_dir: impl AsRef<Path>,
        observer: Arc<dyn SnapshotObserver>,
    ) -> std::io::Result<StateMachine> {
        let dir = snapshot_dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path)?;
            }
        }
        Ok(StateMachine {
            kv,
            snapshots: Arc::new(SnapshotDir {
                dir,
                counter: AtomicU64::new(0),
                receiving: Mutex::new(HashMap::new()),
                observer,
            }),
        })
    }

    /// The store underneath.
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }
}

impl SnapshotDir {
    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{what}-{}-{n}.tmp", std::process::id()))
    }

    /// The newest finished snapshot file.
    fn newest(&self) -> std::io::Result<Option<PathBuf>> {
        let mut best: Option<(u64, PathBuf)> = None;
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "snap") {
                continue;
            }
            let modified = fs::metadata(&path)?
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            if best.as_ref().is_none_or(|(m, _)| modified >= *m) {
                best = Some((modified, path));
            }
        }
        Ok(best.map(|(_, p)| p))
    }

    /// Gives `tmp` its final name, syncs the directory and removes older snapshots.
    fn publish(&self, tmp: &Path, meta: &SnapshotMeta) -> std::io::Result<PathBuf> {
        let name = self.dir.join(format!("{}.snap", meta.snapshot_id));
        fs::rename(tmp, &name)?;
        fs::File::open(&self.dir)?.sync_all()?;
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path != name && path.extension().is_some_and(|e| e == "snap") {
                fs::remove_file(&path)?;
            }
        }
        Ok(name)
    }
}

/// Reads the metadata trailer of a snapshot file; returns it and the length of the store part.
fn read_trailer(file: &mut fs::File) -> Result<(SnapshotMeta, u64), String> {
    let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if len < 12 {
        return Err("snapshot file too short".into());
    }
    let mut tail = [0u8; 12];
    file.seek(SeekFrom::Start(len - 12))
        .map_err(|e| e.to_string())?;
    file.read_exact(&mut tail).map_err(|e| e.to_string())?;
    if &tail[4..] != TRAILER_MAGIC {
        return Err("snapshot file has no Flotilla trailer".into());
    }
    let meta_len = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if meta_len + 12 > len {
        return Err("snapshot trailer length is out of range".into());
    }
    let data_len = len - 12 - meta_len;
    let mut raw = vec![0u8; meta_len as usize];
    file.seek(SeekFrom::Start(data_len))
        .map_err(|e| e.to_string())?;
    file.read_exact(&mut raw).map_err(|e| e.to_string())?;
    let meta = decode::<SnapshotMeta>(&raw)?;
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    Ok((meta, data_len))
}

fn decode_applied(
    applied: Option<Vec<u8>>,
    membership: Option<Vec<u8>>,
) -> Result<(Option<LogId>, StoredMembership), String> {
    let applied = match applied {
        Some(b) => Some(decode::<LogId>(&b)?),
        None => None,
    };
    let membership = match membership {
        Some(b) => decode::<StoredMembership>(&b)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// Bytes of a snapshot being built between syncs of what was written so far.
const SYNC_EVERY: u64 = 16 << 20;

/// A snapshot file's writer that syncs every [`SYNC_EVERY`] bytes (RocksDB's
/// `bytes_per_sync`): a snapshot of a large store is gigabytes, and left to one sync at the
/// end its dirty pages queue every Raft log append's fsync behind their writeback (in a
/// density run, at about 50,000 pods, appends timed out while all three replicas wrote
/// 0.9 GB snapshots at once, and 5,000 nodes' leases went with them).
struct SyncEvery<'a> {
    file: &'a fs::File,
    unsynced: u64,
}

impl<'a> SyncEvery<'a> {
    fn new(file: &'a fs::File) -> Self {
        SyncEvery { file, unsynced: 0 }
    }
}

impl Write for SyncEvery<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = (&mut &*self.file).write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&mut &*self.file).flush()
    }
}

/// Builds snapshot files from the store.
pub struct SnapshotBuilder {
    sm: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let sm = self.sm.clone();
        let started = std::time::Instant::now();
        let (meta, path) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let tmp = sm.snapshots.tmp_path("build");
            let file = fs::File::create(&tmp).map_err(|e| e.to_string())?;
            let mut w = BufWriter::with_capacity(1 << 20, SyncEvery::new(&file));
            let info = sm.kv.export(&mut w).map_err(|e| e.to_string())?;
            let (last_log_id, last_membership) = decode_applied(info.applied, info.membership)?;
            let n = sm.snapshots.counter.fetch_add(1, Ordering::Relaxed);
            let snapshot_id = match &last_log_id {
                Some(l) => format!("{}-{}-{n}", l.leader_id.term, l.index),
                None => format!("0-0-{n}"),
            };
            let meta = SnapshotMeta {
                last_log_id,
                last_membership,
                snapshot_id,
            };
            let raw = encode(&meta);
            w.write_all(&raw).map_err(|e| e.to_string())?;
            w.write_all(&(raw.len() as u32).to_le_bytes())
                .map_err(|e| e.to_string())?;
            w.write_all(TRAILER_MAGIC).map_err(|e| e.to_string())?;
            w.flush().map_err(|e| e.to_string())?;
            drop(w);
            file.sync_all().map_err(|e| e.to_string())?;
            let path = sm
                .snapshots
                .publish(&tmp, &meta)
                .map_err(|e| e.to_string())?;
            Ok((meta, path))
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?
        .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        self.sm
            .snapshots
            .observer
            .built(started.elapsed().as_secs_f64(), bytes);
        tracing::info!(snapshot_id = %meta.snapshot_id, bytes, "built snapshot");
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), StorageError<NodeId>> {
        let (applied, membership) = self
            .kv
            .applied_state()
            .map_err(|e| sm_err(ErrorVerb::Read, e))?;
        decode_applied(applied, membership).map_err(|e| sm_err(ErrorVerb::Read, e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut batch = Vec::new();
        let mut fences = Vec::new();
        // Per entry: its index and the request ids of its commands, leaf by leaf (logged once
        // applied, when debug logging is on for this module).
        let trace = tracing::enabled!(tracing::Level::DEBUG);
        let mut traced: Vec<(usize, u64, Vec<Option<String>>)> = Vec::new();
        for entry in entries {
            let applied = encode(&entry.log_id);
            let term = entry.log_id.leader_id.term;
            let (membership, (op, fence)) = match entry.payload {
                EntryPayload::Blank => (None, (ApplyOp::None, Fence::Open)),
                EntryPayload::Membership(m) => (
                    Some(encode(&StoredMembership::new(Some(entry.log_id), m))),
                    (ApplyOp::None, Fence::Open),
                ),
                EntryPayload::Normal(cmd) => {
                    if trace {
                        let mut ids = Vec::new();
                        request_ids(&cmd, &mut ids);
                        traced.push((batch.len(), entry.log_id.index, ids));
                    }
                    (None, to_apply_op(cmd, term, true))
                }
            };
            fences.push(fence);
            batch.push(ApplyEntry {
                applied,
                membership,
                op,
            });
        }
        // RocksDB writes without sync are memtable inserts: cheap enough to run inline.
        let results = self
            .kv
            .apply(batch)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let results: Vec<CommandResult> = results
            .into_iter()
            .zip(fences)
            .map(|(r, f)| to_result(r, f))
            .collect();
        if trace {
            log_applied(&traced, &results);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let path = self.snapshots.tmp_path("receive");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.snapshots
            .receiving
            .lock()
            .expect("not poisoned")
            .insert(file.as_raw_fd(), path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let fd = snapshot.as_raw_fd();
        let path = self
            .snapshots
            .receiving
            .lock()
            .expect("not poisoned")
            .remove(&fd);
        let mut file = snapshot.into_std().await;
        let sm = self.clone();
        let want = meta.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            file.sync_all().map_err(|e| e.to_string())?;
            let (found, data_len) = read_trailer(&mut file)?;
            if found.last_log_id != want.last_log_id {
                return Err(format!(
                    "snapshot file is for {:?}, but Raft is installing {:?}",
                    found.last_log_id, want.last_log_id
                ));
            }
            let mut reader = BufReader::with_capacity(1 << 20, (&mut file).take(data_len));
            let info = sm.kv.install(&mut reader).map_err(|e| e.to_string())?;
            let (applied, _) = decode_applied(info.applied, info.membership)?;
            if applied != want.last_log_id {
                return Err(format!(
                    "snapshot data is at {applied:?}, its metadata says {:?}",
                    want.last_log_id
                ));
            }
            // Keep the received file as this replica's current snapshot. A file that did not
            // come from `begin_receiving_snapshot` is copied into the snapshot directory.
            let path = match path {
                Some(p) => p,
                None => {
                    let tmp = sm.snapshots.tmp_path("copy");
                    let mut out = fs::File::create(&tmp).map_err(|e| e.to_string())?;
                    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
                    std::io::copy(&mut file, &mut out).map_err(|e| e.to_string())?;
                    out.sync_all().map_err(|e| e.to_string())?;
                    tmp
                }
            };
            sm.snapshots
                .publish(&path, &want)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?
        .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.snapshots
            .observer
            .installed(started.elapsed().as_secs_f64());
        tracing::info!(snapshot_id = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let snapshots = self.snapshots.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let Some(path) = snapshots.newest().map_err(|e| e.to_string())? else {
                return Ok(None);
            };
            let mut file = fs::File::open(&path).map_err(|e| e.to_string())?;
            let (meta, _) = read_trailer(&mut file)?;
            Ok(Some((meta, file)))
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Read, e))?
        .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(found.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

impl crate::network::PeerObserver for NoObserver {}

/// Which commands of an entry were fenced off (decided in another term than the entry's).
enum Fence {
    /// Not fenced.
    Open,
    /// Refused: the command becomes a no-op.
    Fenced(ApplyError),
    /// Per command of a batch.
    Batch(Vec<Fence>),
}

/// The store operation for a command proposed in `term`, and what fencing decided. A command
/// fenced to another term becomes a no-op, so every replica refuses it alike.
fn to_apply_op(cmd: Command, term: u64, top: bool) -> (ApplyOp, Fence) {
    if let Some(t) = cmd.fence_term {
        if t != term {
            let e = ApplyError::Fenced {
                fence_term: t,
                entry_term: term,
            };
            return (ApplyOp::None, Fence::Fenced(e));
        }
    }
    match cmd.op {
        Op::Txn(t) | Op::TracedTxn { txn: t, .. } => (ApplyOp::Txn(t), Fence::Open),
        Op::Compact { revision } => (ApplyOp::Compact(revision), Fence::Open),
        Op::Batch(cmds) if top => {
            let (ops, fences) = cmds
                .into_iter()
                .map(|c| to_apply_op(c, term, false))
                .unzip();
            (ApplyOp::Batch(ops), Fence::Batch(fences))
        }
        Op::Batch(_) => (
            ApplyOp::None,
            Fence::Fenced(ApplyError::Invalid("nested batches are not allowed".into())),
        ),
    }
}

/// The request ids of `cmd`'s commands, one per leaf (a batch's members in order).
fn request_ids(cmd: &Command, out: &mut Vec<Option<String>>) {
    match &cmd.op {
        Op::Batch(cmds) => cmds.iter().for_each(|c| request_ids(c, out)),
        _ => out.push(cmd.request_id().map(str::to_string)),
    }
}

/// Logs, per applied command that an API request made, its request id, log index and
/// outcome, so one request can be followed from the replica that took it to every apply.
fn log_applied(traced: &[(usize, u64, Vec<Option<String>>)], results: &[CommandResult]) {
    fn leaves<'a>(r: &'a CommandResult, out: &mut Vec<&'a CommandResult>) {
        match r {
            CommandResult::Batch(rs) => rs.iter().for_each(|r| leaves(r, out)),
            other => out.push(other),
        }
    }
    for (position, index, ids) in traced {
        if ids.iter().all(Option::is_none) {
            continue;
        }
        let Some(result) = results.get(*position) else {
            continue;
        };
        let mut outs = Vec::new();
        leaves(result, &mut outs);
        for (id, out) in ids.iter().zip(outs) {
            let Some(id) = id else { continue };
            match out {
                CommandResult::Txn(t) => tracing::debug!(
                    request_id = %id,
                    index,
                    revision = t.revision,
                    succeeded = t.succeeded,
                    "applied"
                ),
                CommandResult::Rejected(e) => {
                    tracing::debug!(request_id = %id, index, %e, "apply refused")
                }
                _ => {}
            }
        }
    }
}

/// The command result of an applied operation.
fn to_result(applied: Applied, fence: Fence) -> CommandResult {
    match (fence, applied) {
        (Fence::Fenced(e), _) => CommandResult::Rejected(e),
        (Fence::Batch(fences), Applied::Batch(results)) => CommandResult::Batch(
            results
                .into_iter()
                .zip(fences)
                .map(|(r, f)| to_result(r, f))
                .collect(),
        ),
        (_, Applied::None) => CommandResult::None,
        (_, Applied::Txn(t)) => CommandResult::Txn(t),
        (_, Applied::Compact(revision)) => CommandResult::Compacted { revision },
        (_, Applied::Rejected(e)) => CommandResult::Rejected(ApplyError::from_store(e)),
        (_, Applied::Batch(results)) => CommandResult::Batch(
            results
                .into_iter()
                .map(|r| to_result(r, Fence::Open))
                .collect(),
        ),
    }
}
