//! Flotilla's replication: the only crate that imports openraft.
//!
//! It owns the Raft type configuration and the replicated [`Command`] set, the adapters that
//! give openraft durable log storage ([`log_store`]) and a state machine with file snapshots
//! ([`state_machine`]) over `flotilla-store`, the peer transport over HTTP/2 with bincode
//! bodies ([`network`] and the peer service), and [`Replica`]: bootstrap, write forwarding,
//! the read barrier, membership changes, leader transfer and the leadership signal.
//!
//! Invariants kept here:
//! - a log append is reported persisted only after an fsync that covers it;
//! - a command's fate is never guessed: a request is retried only when it was certainly not
//!   applied, and otherwise reported as [`Error::Timeout`];
//! - a command carrying a fence term applies only in that term.

#![warn(missing_docs)]

mod error;
pub mod log_store;
pub mod network;
mod proposer;
mod read_index;
mod replica;
mod service;
pub mod state_machine;
mod types;

pub use error::{Error, StartError};
pub use network::{CallError, PeerObserver};
pub use replica::{
    Config, IsPeer, Leadership, Member, Observer, PeerTls, Replica, ReplicaObserver, Status,
};
pub use state_machine::{NoObserver, SnapshotObserver, StateMachine};
pub use types::{
    current_request_id, with_request_id, ApplyError, Command, CommandResult, Node, NodeId, Op,
    TypeConfig,
};
