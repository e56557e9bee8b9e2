//! Flotilla's storage: the only crate that links RocksDB.
//!
//! Two independent RocksDB instances live under a replica's data directory:
//!
//! - [`LogStore`] (`raft/`): the Raft log and the records Raft must not lose (vote,
//!   purge point). Appends are group-committed: many appends, one fsync, and an append is
//!   reported durable only after an fsync that covers it.
//! - [`KvStore`] (`sm/`): the replicated state machine, an MVCC key-value store with etcd's
//!   contract: revisions, ranges at a revision, transactions, watches from any retained
//!   revision, compaction, a size quota, and streaming snapshot export and import.
//!
//! The data path of a write, as this crate sees it:
//!
//! 1. the Raft layer appends the entry with [`LogStore::append`] (synced before it is
//!    acknowledged);
//! 2. once committed, [`KvStore::apply`] runs it as one RocksDB write batch that also records
//!    the entry's log id;
//! 3. the events of that batch go to the watch hub, which hands them to every caught-up
//!    watcher without ever blocking on one.
//!
//! Nothing here knows about openraft, HTTP or the clock: log ids and memberships are opaque
//! bytes, and every decision in apply is a function of the entry and the stored state.

#![warn(missing_docs)]

mod error;
pub mod keys;
mod kv;
mod log;
mod snapshot;
mod types;
mod watch;

pub use error::{Error, Result};
pub use kv::{Applied, AppliedState, ApplyEntry, ApplyOp, KvStore, StoreOptions, StoreStatus};
pub use log::{LogObserver, LogStore, NoLogObserver, OnDurable};
pub use snapshot::{verify as verify_snapshot, ExportInfo};
pub use types::*;
pub use watch::{CancelReason, WatchMessage, WatchRequest, Watcher};
