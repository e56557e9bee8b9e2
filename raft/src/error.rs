//! Errors of the replication layer, as the API sees them.
//!
//! Serializable, because a follower relays the leader's answer to a forwarded request.

use serde::{Deserialize, Serialize};

use crate::types::{ApplyError, NodeId};

/// Why a write, read barrier or cluster operation did not happen (or may not have).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// No leader is known: an election is under way, or a quorum is unreachable.
    #[error("no leader: a quorum of replicas is not reachable (last known term {term})")]
    NoLeader {
        /// The highest term this replica knows.
        term: u64,
    },
    /// This replica leads but has not heard from a quorum recently.
    #[error("no quorum: the leader has not heard from a majority of replicas for {millis} ms")]
    NoQuorum {
        /// Time since a majority last acknowledged the leader.
        millis: u64,
    },
    /// This replica is not the leader (for requests that must run there).
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader {
        /// The leader this replica knows of.
        leader: Option<NodeId>,
    },
    /// The leader lost contact with a quorum while the request was in flight: it may or may
    /// not be applied later.
    #[error("lost contact with a quorum for {millis} ms while the request was in flight; it may or may not have been applied")]
    QuorumLost {
        /// Time since a majority last answered.
        millis: u64,
    },
    /// The request was sent but its outcome is unknown: it may or may not have been applied.
    #[error("request timed out after {millis} ms; it may or may not have been applied")]
    Timeout {
        /// How long we waited.
        millis: u64,
    },
    /// The leader could not be reached; the request was not sent.
    #[error("leader {leader} is unreachable: {reason}")]
    Unreachable {
        /// The leader we tried.
        leader: NodeId,
        /// Transport detail.
        reason: String,
    },
    /// The command was refused at apply time.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A membership change or leader transfer is invalid.
    #[error("invalid cluster operation: {0}")]
    InvalidCluster(String),
    /// The replica is shutting down or its Raft core stopped.
    #[error("replica is shutting down: {0}")]
    Stopped(String),
    /// The request is malformed or over a limit; it was not proposed.
    #[error("{0}")]
    Invalid(String),
    /// The store is over its size quota; only deletes and compaction are accepted.
    #[error("{0}")]
    NoSpace(String),
    /// Too much work is queued; the request was refused before doing anything.
    #[error("too busy: {0}")]
    Busy(String),
    /// Unexpected internal failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// The replica stopped (a fatal storage error, a shutdown) after the request was
    /// proposed: it may have been replicated and committed by the next leader, so its
    /// outcome is unknown. Never `503`, which promises nothing was applied.
    #[error("{0}; the request may or may not have been applied")]
    Interrupted(String),
}

impl Error {
    /// True if retrying the same request later may succeed without risk of applying it
    /// twice (the request was certainly not applied).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NoLeader { .. }
                | Error::NoQuorum { .. }
                | Error::Unreachable { .. }
                | Error::NotLeader { .. }
                | Error::Busy(_)
        )
    }
}

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);
