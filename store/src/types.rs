//! The store's request and response types: etcd's v3 KV contract, as plain Rust data.
//!
//! These travel inside Raft log entries (bincode), so they use plain derives only: no
//! `untagged`, no `skip_serializing_if`, nothing that needs a self-describing format. Byte
//! fields go through `serde_bytes`, so bincode copies them whole instead of element by
//! element. The HTTP layer has its own JSON shapes and converts.
//!
//! Revisions are `i64`, as in etcd: the first write makes revision 1, and each write
//! transaction that changes anything takes the next one.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyValue {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Revision of the write that created the key (since its last deletion).
    pub create_revision: i64,
    /// Revision of the write that produced this version.
    pub mod_revision: i64,
    /// Number of writes since creation: 1 for a new key; 0 in a delete event.
    pub version: i64,
    /// The value (empty when the caller asked for keys only, and in delete events).
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The key was created or updated.
    Put,
    /// The key was deleted.
    Delete,
}

/// A change to one key at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The new version (for a delete: the key and the deleting revision).
    pub kv: KeyValue,
    /// The version before this change, when the watcher asked for it and it still exists.
    pub prev_kv: Option<KeyValue>,
}

/// Read the keys in a range at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeRequest {
    /// First key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// End of the range, exclusive. Empty: just `key`. `[0]`: every key from `key` on.
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    /// Maximum number of keys to return; 0 means no limit.
    pub limit: i64,
    /// Revision to read at; 0 or less means the current revision.
    pub revision: i64,
    /// Return keys and metadata without values.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
}

/// The result of a range read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeResponse {
    /// The revision the read was served at.
    pub revision: i64,
    /// The keys, in key order (empty when `count_only`).
    pub kvs: Vec<KeyValue>,
    /// True when `limit` cut the result short.
    pub more: bool,
    /// Number of keys in the range, regardless of `limit`.
    pub count: i64,
}

/// Set a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutRequest {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The new value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Return the previous version in the response.
    pub prev_kv: bool,
}

/// The result of a put.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutResponse {
    /// The previous version, when asked for and the key existed.
    pub prev_kv: Option<KeyValue>,
}

/// Delete the keys in a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeleteRangeRequest {
    /// First key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// End of the range, as in [`RangeRequest::range_end`].
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    /// Return the deleted versions in the response.
    pub prev_kv: bool,
}

/// The result of a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeleteRangeResponse {
    /// Number of keys deleted.
    pub deleted: i64,
    /// The deleted versions, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// What a [`Compare`] looks at, with the operand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The key's version (0 when absent).
    Version(i64),
    /// The key's create revision (0 when absent).
    CreateRevision(i64),
    /// The key's mod revision (0 when absent).
    ModRevision(i64),
    /// The key's value (a compare on an absent key's value is always false).
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// How a [`Compare`] relates the key's field to the operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    /// field == operand
    Equal,
    /// field > operand
    Greater,
    /// field < operand
    Less,
    /// field != operand
    NotEqual,
}

/// A guard of a transaction on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// The key compared.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The relation that must hold.
    pub result: CompareResult,
    /// The field and operand.
    pub target: CompareTarget,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    /// Read a range (seeing the transaction's own earlier writes).
    Range(RangeRequest),
    /// Set a key.
    Put(PutRequest),
    /// Delete a range.
    DeleteRange(DeleteRangeRequest),
}

/// The result of one operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    /// Result of [`RequestOp::Range`].
    Range(RangeResponse),
    /// Result of [`RequestOp::Put`].
    Put(PutResponse),
    /// Result of [`RequestOp::DeleteRange`].
    DeleteRange(DeleteRangeResponse),
}

/// If every compare holds, run `success`, else `failure`; atomically, under one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnRequest {
    /// The guards; all must hold.
    pub compare: Vec<Compare>,
    /// Operations run when every compare holds.
    pub success: Vec<RequestOp>,
    /// Operations run otherwise.
    pub failure: Vec<RequestOp>,
}

/// The result of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnResponse {
    /// Whether the compares held.
    pub succeeded: bool,
    /// One response per operation of the branch that ran.
    pub responses: Vec<ResponseOp>,
    /// The store revision after the transaction (its own revision if it wrote anything).
    pub revision: i64,
}

impl TxnRequest {
    /// A transaction that puts one key unconditionally.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> TxnRequest {
        TxnRequest {
            success: vec![RequestOp::Put(PutRequest {
                key: key.into(),
                value: value.into(),
                prev_kv: false,
            })],
            ..TxnRequest::default()
        }
    }

    /// A transaction that deletes a range unconditionally.
    pub fn delete(key: impl Into<Vec<u8>>, range_end: impl Into<Vec<u8>>) -> TxnRequest {
        TxnRequest {
            success: vec![RequestOp::DeleteRange(DeleteRangeRequest {
                key: key.into(),
                range_end: range_end.into(),
                prev_kv: false,
            })],
            ..TxnRequest::default()
        }
    }

    /// True if some branch can write (used by the quota: read-only and delete-only
    /// transactions are always admitted).
    pub fn has_puts(&self) -> bool {
        self.success
            .iter()
            .chain(self.failure.iter())
            .any(|op| matches!(op, RequestOp::Put(_)))
    }

    /// Checks the request against `limits` and etcd's rules (non-empty keys, no key written
    /// twice in one branch). Called before proposing and again when applying.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        let ops = self.compare.len() + self.success.len().max(self.failure.len());
        if ops > limits.max_txn_ops {
            return Err(Error::InvalidRequest(format!(
                "too many operations in txn request: {ops} (limit {})",
                limits.max_txn_ops
            )));
        }
        let mut total = 0usize;
        for c in &self.compare {
            check_key(&c.key, limits)?;
            total += c.key.len();
            if let CompareTarget::Value(v) = &c.target {
                check_value(v, limits)?;
                total += v.len();
            }
        }
        for branch in [&self.success, &self.failure] {
            total += validate_branch(branch, limits)?;
        }
        if total > limits.max_request_bytes {
            return Err(Error::InvalidRequest(format!(
                "request is too large: {total} bytes of keys and values (limit {})",
                limits.max_request_bytes
            )));
        }
        Ok(())
    }
}

fn check_key(key: &[u8], limits: &Limits) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidRequest("key is not provided".into()));
    }
    if key.len() > limits.max_key_bytes {
        return Err(Error::InvalidRequest(format!(
            "key is too large: {} bytes (limit {})",
            key.len(),
            limits.max_key_bytes
        )));
    }
    Ok(())
}

fn check_value(value: &[u8], limits: &Limits) -> Result<()> {
    if value.len() > limits.max_value_bytes {
        return Err(Error::InvalidRequest(format!(
            "value is too large: {} bytes (limit {})",
            value.len(),
            limits.max_value_bytes
        )));
    }
    Ok(())
}

/// Validates one branch; returns its byte size.
fn validate_branch(ops: &[RequestOp], limits: &Limits) -> Result<usize> {
    let mut total = 0;
    let mut puts: Vec<&[u8]> = Vec::new();
    let mut deletes: Vec<(&[u8], &[u8])> = Vec::new();
    for op in ops {
        match op {
            RequestOp::Range(r) => {
                check_key(&r.key, limits)?;
                if r.limit < 0 {
                    return Err(Error::InvalidRequest("limit must not be negative".into()));
                }
                total += r.key.len() + r.range_end.len();
            }
            RequestOp::Put(p) => {
                check_key(&p.key, limits)?;
                check_value(&p.value, limits)?;
                total += p.key.len() + p.value.len();
                puts.push(&p.key);
            }
            RequestOp::DeleteRange(d) => {
                check_key(&d.key, limits)?;
                total += d.key.len() + d.range_end.len();
                deletes.push((&d.key, &d.range_end));
            }
        }
    }
    puts.sort_unstable();
    if puts.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::InvalidRequest(
            "duplicate key given in txn request".into(),
        ));
    }
    for (start, end) in &deletes {
        if puts.iter().any(|k| in_range(k, start, end)) {
            return Err(Error::InvalidRequest(
                "duplicate key given in txn request".into(),
            ));
        }
    }
    Ok(total)
}

/// True if `key` lies in etcd's range `[start, end)` (see [`RangeRequest::range_end`]).
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

/// Size limits on requests. Enforced before proposing and again, with the same defaults, when
/// applying: apply must decide identically on every replica, so the limits used there are
/// never taken from one replica's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest key.
    pub max_key_bytes: usize,
    /// Largest value (Kubernetes' object size limit is 1.5 MiB).
    pub max_value_bytes: usize,
    /// Most compares plus operations in one branch of a transaction.
    pub max_txn_ops: usize,
    /// Largest sum of keys and values in one transaction.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_key_bytes: 32 * 1024,
            max_value_bytes: 1536 * 1024,
            max_txn_ops: 128,
            max_request_bytes: 4 * 1024 * 1024,
        }
    }
}
