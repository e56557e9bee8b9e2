//! The Raft type configuration and the replicated command set.
//!
//! [`Command`] is what a log entry carries. It is versioned by being an enum: new operations
//! are new variants appended at the end, never reordered (bincode encodes the variant index).

use std::fmt;

use flotilla_store::{TxnRequest, TxnResponse};
use serde::{Deserialize, Serialize};

/// A replica's identity in the cluster.
pub type NodeId = u64;

/// Where a replica can be reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// `host:port` of its peer (Raft) listener.
    pub peer_addr: String,
    /// `host:port` of its client API listener; empty until the replica announces it.
    pub api_addr: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer={} api={}", self.peer_addr, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// Flotilla's Raft types.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A membership as recorded in the log.
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;

/// What one log entry asks the state machine to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// When set, the entry applies only if it was proposed in this Raft term. Controllers
    /// and the scheduler set it to the term they decided in, so a deposed leader's
    /// decisions never land (a forwarded or late proposal lands in another term).
    pub fence_term: Option<u64>,
    /// The operation.
    pub op: Op,
}

impl Command {
    /// An unfenced transaction. Made while serving an API request (inside
    /// [`with_request_id`]), it carries the request's id into the log, so every replica's
    /// apply can say which request it applied.
    pub fn txn(txn: TxnRequest) -> Command {
        let op = match current_request_id() {
            Some(request_id) => Op::TracedTxn { request_id, txn },
            None => Op::Txn(txn),
        };
        Command {
            fence_term: None,
            op,
        }
    }

    /// The request id this command carries, if any.
    pub fn request_id(&self) -> Option<&str> {
        match &self.op {
            Op::TracedTxn { request_id, .. } => Some(request_id),
            _ => None,
        }
    }
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Runs `fut` as the work of the API request `id`: the transactions it makes with
/// [`Command::txn`] carry the id through forwarding into the log and apply.
pub async fn with_request_id<F: std::future::Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// The id of the API request the current task serves, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// The replicated operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A key-value transaction.
    Txn(TxnRequest),
    /// Compact history below a revision.
    Compact {
        /// The new compaction point.
        revision: i64,
    },
    /// Several commands proposed together (the proposer batches concurrent writes into one
    /// entry). Each is fenced and applied on its own, in order, in the entry's one write
    /// batch; batches do not nest.
    Batch(Vec<Command>),
    /// A key-value transaction made by the API request `request_id` (at most 64 plain
    /// characters, see `flotilla::http::request_id`). Applies exactly like [`Op::Txn`]; the
    /// id is only logged. Appended after the others, so logs written before it decode as
    /// they did (a replica without it cannot read entries that carry it: upgrade all
    /// replicas before serving traffic with mixed versions).
    TracedTxn {
        /// The API request's id.
        request_id: String,
        /// The transaction.
        txn: TxnRequest,
    },
}

impl Op {
    /// The transaction this operation runs, if it is one.
    pub fn as_txn(&self) -> Option<&TxnRequest> {
        match self {
            Op::Txn(t) | Op::TracedTxn { txn: t, .. } => Some(t),
            Op::Compact { .. } | Op::Batch(_) => None,
        }
    }
}

/// What applying a [`Command`] produced; identical on every replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub enum CommandResult {
    /// The entry carried no command (blank or membership entries).
    #[default]
    None,
    /// A transaction ran.
    Txn(TxnResponse),
    /// History below this revision is now compacted.
    Compacted {
        /// The new compaction point.
        revision: i64,
    },
    /// The command was refused; nothing but the log position changed.
    Rejected(ApplyError),
    /// The results of an [`Op::Batch`], in order.
    Batch(Vec<CommandResult>),
}

/// Why a command was refused at apply time. Deterministic: every replica refuses alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    /// The revision asked for is compacted.
    #[error(
        "required revision {requested} has been compacted (compact revision is {compact_revision})"
    )]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// The compaction point.
        compact_revision: i64,
    },
    /// The revision asked for does not exist yet.
    #[error("required revision {requested} is a future revision (current revision is {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: i64,
        /// The current revision.
        current: i64,
    },
    /// The command is malformed or over a limit.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The command was decided in another term than the one it was committed in.
    #[error("fenced: decided in term {fence_term}, but proposed in term {entry_term}")]
    Fenced {
        /// The term the proposer decided in.
        fence_term: u64,
        /// The term of the log entry.
        entry_term: u64,
    },
}

impl ApplyError {
    pub(crate) fn from_store(e: flotilla_store::Error) -> ApplyError {
        match e {
            flotilla_store::Error::Compacted {
                requested,
                compact_revision,
            } => ApplyError::Compacted {
                requested,
                compact_revision,
            },
            flotilla_store::Error::FutureRevision { requested, current } => {
                ApplyError::FutureRevision { requested, current }
            }
            other => ApplyError::Invalid(other.to_string()),
        }
    }
}

/// Encodes with the bincode configuration used everywhere in the crate.
///
/// Two passes: the first only counts bytes, so the buffer is allocated once at its final
/// size. Log entries run to megabytes, and growing a buffer by doubling copied each one
/// several times and touched twice its size in fresh pages (a tenth of a replica's CPU went to
/// those copies and page faults under load).
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_sized(value, encoded_len(value))
}

/// [`encode`] when [`encoded_len`] is already known.
pub(crate) fn encode_sized<T: Serialize>(value: &T, size: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(size);
    bincode::serde::encode_into_writer(value, VecWriter(&mut buf), bincode::config::standard())
        .expect("encoding into a Vec cannot fail");
    debug_assert_eq!(buf.len(), size);
    buf
}

/// The length of [`encode`]'s bytes for `value`, without making them.
pub(crate) fn encoded_len<T: Serialize>(value: &T) -> usize {
    let mut size = Counter(0);
    bincode::serde::encode_into_writer(value, &mut size, bincode::config::standard())
        .expect("counting bytes cannot fail");
    size.0
}

/// Counts the bytes an encoding would write.
struct Counter(usize);

impl bincode::enc::write::Writer for &mut Counter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0 += bytes.len();
        Ok(())
    }
}

/// Appends to a Vec (allocated beforehand at the right size).
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Decodes bytes written by [`encode`].
pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Log entries are bincode: a variant's index and the field order are the on-disk
    /// format. Entries written by earlier versions must decode unchanged.
    #[tokio::test]
    async fn the_log_format_of_commands_is_stable() {
        let plain = Command::txn(TxnRequest::put("a", "1"));
        assert_eq!(plain.op, Op::Txn(TxnRequest::put("a", "1")));
        let golden = hex(&encode(&plain));
        let traced = with_request_id("req-1".into(), async {
            Command::txn(TxnRequest::put("a", "1"))
        })
        .await;
        assert_eq!(traced.request_id(), Some("req-1"));
        let bytes = encode(&traced);
        assert_eq!(decode::<Command>(&bytes).unwrap(), traced);
        // The traced variant is appended last (index 3), after the plain transaction (0).
        assert_eq!(
            golden, "0000000101016101310000",
            "a plain transaction encodes as it always did"
        );
        assert_eq!(&hex(&bytes)[..4], "0003", "{}", hex(&bytes));
        assert_eq!(decode::<Command>(&encode(&plain)).unwrap(), plain);
        assert_eq!(current_request_id(), None);
    }
}
