//! The store's error type.
//!
//! Two families live here: *request errors* (bad input, compacted or future revisions, quota)
//! which are deterministic and safe to return to a client, and *storage errors* (RocksDB or
//! file I/O, corruption) which mean this replica cannot continue safely.

use std::io;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested revision is below the compaction point: history there is gone.
    #[error(
        "required revision {requested} has been compacted (compact revision is {compact_revision})"
    )]
    Compacted {
        /// The revision the caller asked for.
        requested: i64,
        /// The oldest revision still readable.
        compact_revision: i64,
    },
    /// The requested revision has not been written yet.
    #[error("required revision {requested} is a future revision (current revision is {current})")]
    FutureRevision {
        /// The revision the caller asked for.
        requested: i64,
        /// The newest revision this replica has applied.
        current: i64,
    },
    /// The request is malformed or exceeds a limit; nothing was changed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The store is over its size quota: only deletes and compaction are accepted.
    #[error("database space exceeded: {used} bytes used of a {quota} byte quota; delete keys and compact to free space")]
    NoSpace {
        /// Bytes in use.
        used: u64,
        /// The configured quota.
        quota: u64,
    },
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A file operation failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// Stored bytes did not decode: the data directory is damaged or from another version.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

impl Error {
    /// True for errors caused by the request itself, which leave the store unchanged and
    /// healthy; false for storage failures.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            Error::Compacted { .. }
                | Error::FutureRevision { .. }
                | Error::InvalidRequest(_)
                | Error::NoSpace { .. }
        )
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
