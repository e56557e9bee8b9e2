//! JSON shapes of the key-value API, modelled on etcd's v3 JSON gateway: bytes are base64,
//! 64-bit integers are written as strings (and accepted as strings or numbers), field names
//! are etcd's. Conversions to and from the store's types live here too, so the server and
//! `flotilla ctl` agree on one definition.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use flotilla_store as store;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Base64 bytes.
pub mod b64 {
    use super::*;

    /// Serializes bytes as base64.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    /// Deserializes base64 (a missing field is empty).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = Option::<String>::deserialize(d)?.unwrap_or_default();
        B64.decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// An `i64` written as a string, read from a string or a number (protobuf's JSON mapping).
pub mod int {
    use super::*;

    /// Serializes as a decimal string.
    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    /// Accepts `"12"`, `12` or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            S(String),
            N(i64),
        }
        match Option::<Either>::deserialize(d)? {
            None => Ok(0),
            Some(Either::N(n)) => Ok(n),
            Some(Either::S(s)) => s
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("not an integer: {s:?}"))),
        }
    }
}

/// A `u64` written as a string, read from a string or a number.
pub mod uint {
    use super::*;

    /// Serializes as a decimal string.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    /// Accepts `"12"`, `12` or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let n = super::int::deserialize(d)?;
        u64::try_from(n).map_err(|_| serde::de::Error::custom("must not be negative"))
    }
}

/// Every response's header.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Always 0: one cluster per deployment.
    #[serde(with = "uint", default)]
    pub cluster_id: u64,
    /// The replica that answered.
    #[serde(with = "uint", default)]
    pub member_id: u64,
    /// The store revision the answer reflects.
    #[serde(with = "int", default)]
    pub revision: i64,
    /// The replica's Raft term.
    #[serde(with = "uint", default)]
    pub raft_term: u64,
}

/// A key's version.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    #[serde(with = "b64", default)]
    pub key: Vec<u8>,
    /// Revision that created it.
    #[serde(with = "int", default)]
    pub create_revision: i64,
    /// Revision of this version.
    #[serde(with = "int", default)]
    pub mod_revision: i64,
    /// Writes since creation.
    #[serde(with = "int", default)]
    pub version: i64,
    /// The value.
    #[serde(with = "b64", default)]
    pub value: Vec<u8>,
}

impl From<store::KeyValue> for KeyValue {
    fn from(kv: store::KeyValue) -> KeyValue {
        KeyValue {
            key: kv.key,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: kv.value,
        }
    }
}

/// `POST /v3/kv/range`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RangeRequest {
    /// First key.
    #[serde(with = "b64", default)]
    pub key: Vec<u8>,
    /// End of the range (exclusive); `AA==` (a zero byte) means "to the end".
    #[serde(with = "b64", default)]
    pub range_end: Vec<u8>,
    /// Maximum keys returned (0: no limit).
    #[serde(with = "int", default)]
    pub limit: i64,
    /// Revision to read at (0: current).
    #[serde(with = "int", default)]
    pub revision: i64,
    /// Serve from this replica without the read barrier (may be stale).
    #[serde(default)]
    pub serializable: bool,
    /// Omit values.
    #[serde(default)]
    pub keys_only: bool,
    /// Only count.
    #[serde(default)]
    pub count_only: bool,
}

impl RangeRequest {
    /// The store's form.
    pub fn to_store(&self) -> store::RangeRequest {
        store::RangeRequest {
            key: self.key.clone(),
            range_end: self.range_end.clone(),
            limit: self.limit,
            revision: self.revision,
            keys_only: self.keys_only,
            count_only: self.count_only,
        }
    }
}

/// Answer to a range.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RangeResponse {
    /// Header.
    #[serde(default)]
    pub header: ResponseHeader,
    /// The keys.
    #[serde(default)]
    pub kvs: Vec<KeyValue>,
    /// True if `limit` cut the answer short.
    #[serde(default)]
    pub more: bool,
    /// Keys in the range.
    #[serde(with = "int", default)]
    pub count: i64,
}

impl RangeResponse {
    /// From the store's answer.
    pub fn from_store(header: ResponseHeader, r: store::RangeResponse) -> RangeResponse {
        RangeResponse {
            header,
            kvs: r.kvs.into_iter().map(Into::into).collect(),
            more: r.more,
            count: r.count,
        }
    }
}

/// `POST /v3/kv/put`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PutRequest {
    /// The key.
    #[serde(with = "b64", default)]
    pub key: Vec<u8>,
    /// The value.
    #[serde(with = "b64", default)]
    pub value: Vec<u8>,
    /// Return the previous version.
    #[serde(default)]
    pub prev_kv: bool,
    /// Leases are not supported; must be 0.
    #[serde(with = "int", default)]
    pub lease: i64,
}

/// Answer to a put.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PutResponse {
    /// Header.
    #[serde(default)]
    pub header: ResponseHeader,
    /// The previous version, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_kv: Option<KeyValue>,
}

/// `POST /v3/kv/deleterange`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeleteRangeRequest {
    /// First key.
    #[serde(with = "b64", default)]
    pub key: Vec<u8>,
    /// End of the range.
    #[serde(with = "b64", default)]
    pub range_end: Vec<u8>,
    /// Return the deleted versions.
    #[serde(default)]
    pub prev_kv: bool,
}

/// Answer to a delete.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DeleteRangeResponse {
    /// Header.
    #[serde(default)]
    pub header: ResponseHeader,
    /// Keys deleted.
    #[serde(with = "int", default)]
    pub deleted: i64,
    /// The deleted versions, when asked for.
    #[serde(default)]
    pub prev_kvs: Vec<KeyValue>,
}

/// A transaction guard.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    /// EQUAL (default), GREATER, LESS or NOT_EQUAL.
    #[serde(default)]
    pub result: Option<String>,
    /// VERSION (default), CREATE, MOD or VALUE.
    #[serde(default)]
    pub target: Option<String>,
    /// The key.
    #[serde(with = "b64", default)]
    pub key: Vec<u8>,
    /// Operand for VERSION.
    #[serde(with = "int", default)]
    pub version: i64,
    /// Operand for CREATE.
    #[serde(with = "int", default)]
    pub create_revision: i64,
    /// Operand for MOD.
    #[serde(with = "int", default)]
    pub mod_revision: i64,
    /// Operand for VALUE.
    #[serde(with = "b64", default)]
    pub value: Vec<u8>,
}

/// One operation of a transaction: exactly one field set.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RequestOp {
    /// A range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_range: Option<RangeRequest>,
    /// A put.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_put: Option<PutRequest>,
    /// A delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_delete_range: Option<DeleteRangeRequest>,
}

/// `POST /v3/kv/txn`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TxnRequest {
    /// Guards.
    #[serde(default)]
    pub compare: Vec<Compare>,
    /// Operations if every guard holds.
    #[serde(default)]
    pub success: Vec<RequestOp>,
    /// Operations otherwise.
    #[serde(default)]
    pub failure: Vec<RequestOp>,
}

/// One result of a transaction.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ResponseOp {
    /// Result of a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_range: Option<RangeResponse>,
    /// Result of a put.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_put: Option<PutResponse>,
    /// Result of a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_delete_range: Option<DeleteRangeResponse>,
}

/// Answer to a transaction.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TxnResponse {
    /// Header.
    #[serde(default)]
    pub header: ResponseHeader,
    /// Whether the guards held.
    #[serde(default)]
    pub succeeded: bool,
    /// One result per operation of the branch that ran.
    #[serde(default)]
    pub responses: Vec<ResponseOp>,
}

fn put_to_store(p: &PutRequest) -> Result<store::PutRequest, String> {
    if p.lease != 0 {
        return Err("leases are not supported".into());
    }
    Ok(store::PutRequest {
        key: p.key.clone(),
        value: p.value.clone(),
        prev_kv: p.prev_kv,
    })
}

fn delete_to_store(d: &DeleteRangeRequest) -> store::DeleteRangeRequest {
    store::DeleteRangeRequest {
        key: d.key.clone(),
        range_end: d.range_end.clone(),
        prev_kv: d.prev_kv,
    }
}

impl PutRequest {
    /// A one-operation store transaction.
    pub fn to_store(&self) -> Result<store::TxnRequest, String> {
        Ok(store::TxnRequest {
            success: vec![store::RequestOp::Put(put_to_store(self)?)],
            ..store::TxnRequest::default()
        })
    }
}

impl DeleteRangeRequest {
    /// A one-operation store transaction.
    pub fn to_store(&self) -> store::TxnRequest {
        store::TxnRequest {
            success: vec![store::RequestOp::DeleteRange(delete_to_store(self))],
            ..store::TxnRequest::default()
        }
    }
}

impl TxnRequest {
    /// The store's form; an unknown compare result or target, or an operation with no (or
    /// more than one) field set, is an error.
    pub fn to_store(&self) -> Result<store::TxnRequest, String> {
        let ops = |ops: &[RequestOp]| -> Result<Vec<store::RequestOp>, String> {
            ops.iter()
                .map(|op| match (&op.request_range, &op.request_put, &op.request_delete_range) {
                    (Some(r), None, None) => {
                        if r.serializable {
                            return Err("serializable ranges are not allowed inside a txn".into());
                        }
                        Ok(store::RequestOp::Range(r.to_store()))
                    }
                    (None, Some(p), None) => Ok(store::RequestOp::Put(put_to_store(p)?)),
                    (None, None, Some(d)) => Ok(store::RequestOp::DeleteRange(delete_to_store(d))),
                    _ => Err("each txn operation must set exactly one of request_range, request_put, request_delete_range".into()),
                })
                .collect()
        };
        let compare = self
            .compare
            .iter()
            .map(|c| {
                let result = match c.result.as_deref().unwrap_or("EQUAL") {
                    "EQUAL" => store::CompareResult::Equal,
                    "GREATER" => store::CompareResult::Greater,
                    "LESS" => store::CompareResult::Less,
                    "NOT_EQUAL" => store::CompareResult::NotEqual,
                    other => return Err(format!("unknown compare result {other:?}")),
                };
                let target = match c.target.as_deref().unwrap_or("VERSION") {
                    "VERSION" => store::CompareTarget::Version(c.version),
                    "CREATE" => store::CompareTarget::CreateRevision(c.create_revision),
                    "MOD" => store::CompareTarget::ModRevision(c.mod_revision),
                    "VALUE" => store::CompareTarget::Value(c.value.clone()),
                    other => return Err(format!("unknown compare target {other:?}")),
                };
                Ok(store::Compare {
                    key: c.key.clone(),
                    result,
                    target,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(store::TxnRequest {
            compare,
            success: ops(&self.success)?,
            failure: ops(&self.failure)?,
        })
    }
}

impl TxnResponse {
    /// From the store's answer.
    pub fn from_store(header: ResponseHeader, r: store::TxnResponse) -> TxnResponse {
        let responses = r
            .responses
            .into_iter()
            .map(|op| match op {
                store::ResponseOp::Range(rr) => ResponseOp {
                    response_range: Some(RangeResponse::from_store(header.clone(), rr)),
                    ..ResponseOp::default()
                },
                store::ResponseOp::Put(p) => ResponseOp {
                    response_put: Some(PutResponse {
                        header: header.clone(),
                        prev_kv: p.prev_kv.map(Into::into),
                    }),
                    ..ResponseOp::default()
                },
                store::ResponseOp::DeleteRange(d) => ResponseOp {
                    response_delete_range: Some(DeleteRangeResponse {
                        header: header.clone(),
                        deleted: d.deleted,
                        prev_kvs: d.prev_kvs.into_iter().map(Into::into).collect(),
                    }),
                    ..ResponseOp::default()
                },
            })
            .collect();
        TxnResponse {
            header,
            succeeded: r.succeeded,
            responses,
        }
    }
}

/// `POST /v3/kv/compaction`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CompactionRequest {
    /// New compaction point.
    #[serde(with = "int", default)]
    pub revision: i64,
    /// Wait until this replica has physically removed the history.
    #[serde(default)]
    pub physical: bool,
}

/// `POST /v3/watch` body.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    /// What to watch.
    pub create_request: WatchCreateRequest,
}

/// The watch to create.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WatchCreateRequest {
    /// First key.
    #[serde(with = "b64", default)]
    pub key: Vec<u8>,
    /// End of the range.
    #[serde(with = "b64", default)]
    pub range_end: Vec<u8>,
    /// First revision (0: next).
    #[serde(with = "int", default)]
    pub start_revision: i64,
    /// Send periodic progress notifications while idle.
    #[serde(default)]
    pub progress_notify: bool,
    /// Include previous versions.
    #[serde(default)]
    pub prev_kv: bool,
}

/// One event.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct Event {
    /// "PUT" or "DELETE".
    #[serde(rename = "type", default = "put_type")]
    pub kind: String,
    /// The new version (for DELETE: key and revision).
    pub kv: KeyValue,
    /// The previous version, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_kv: Option<KeyValue>,
}

fn put_type() -> String {
    "PUT".into()
}

impl From<store::Event> for Event {
    fn from(e: store::Event) -> Event {
        Event {
            kind: match e.kind {
                store::EventKind::Put => "PUT",
                store::EventKind::Delete => "DELETE",
            }
            .into(),
            kv: e.kv.into(),
            prev_kv: e.prev_kv.map(Into::into),
        }
    }
}

/// One line of a watch stream: `{"result": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct WatchLine {
    /// The message.
    pub result: WatchResponse,
}

/// A watch stream message.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct WatchResponse {
    /// Header; for events, the revision of the last event; for progress, everything up to it
    /// has been delivered.
    #[serde(default)]
    pub header: ResponseHeader,
    /// Always 0 (one watch per stream).
    #[serde(with = "int", default)]
    pub watch_id: i64,
    /// The first message of a stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub created: bool,
    /// The last message of a cancelled stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canceled: bool,
    /// When cancelled because of compaction: the oldest revision available.
    #[serde(with = "int", default)]
    pub compact_revision: i64,
    /// Why the watch was cancelled.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cancel_reason: String,
    /// Events of whole revisions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

/// A member as listed by `/v3/cluster/member/list`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    #[serde(rename = "ID", with = "uint", default)]
    pub id: u64,
    /// Its name (the id).
    #[serde(default)]
    pub name: String,
    /// Its peer URL.
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    /// Its client (API) URL, once announced.
    #[serde(rename = "clientURLs", default)]
    pub client_urls: Vec<String>,
    /// True for a learner.
    #[serde(rename = "isLearner", default)]
    pub is_learner: bool,
}

/// Answer to a member list.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct MemberListResponse {
    /// Header.
    #[serde(default)]
    pub header: ResponseHeader,
    /// The members.
    #[serde(default)]
    pub members: Vec<Member>,
}

/// `POST /v3/cluster/member/add`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MemberAddRequest {
    /// The new member's id (the `--id` it was started with).
    #[serde(rename = "ID", with = "uint", default)]
    pub id: u64,
    /// Its peer URL (`http://host:port` or `host:port`).
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    /// Add as a learner only (do not promote).
    #[serde(rename = "isLearner", default)]
    pub is_learner: bool,
}

/// `POST /v3/cluster/member/remove` and `/promote`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MemberIdRequest {
    /// The member.
    #[serde(rename = "ID", with = "uint", default)]
    pub id: u64,
}

/// `POST /v3/maintenance/transfer-leadership`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TransferLeadershipRequest {
    /// The new leader.
    #[serde(rename = "targetID", with = "uint", default)]
    pub target_id: u64,
}

/// `POST /v3/maintenance/status`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StatusResponse {
    /// Header.
    #[serde(default)]
    pub header: ResponseHeader,
    /// Server version.
    #[serde(default)]
    pub version: String,
    /// Bytes of key-value data.
    #[serde(rename = "dbSize", with = "uint", default)]
    pub db_size: u64,
    /// The quota.
    #[serde(rename = "dbQuota", with = "uint", default)]
    pub db_quota: u64,
    /// The leader (0 if none).
    #[serde(with = "uint", default)]
    pub leader: u64,
    /// Last log index.
    #[serde(rename = "raftIndex", with = "uint", default)]
    pub raft_index: u64,
    /// Term.
    #[serde(rename = "raftTerm", with = "uint", default)]
    pub raft_term: u64,
    /// Highest committed index.
    #[serde(rename = "raftCommitIndex", with = "uint", default)]
    pub raft_commit_index: u64,
    /// Highest applied index.
    #[serde(rename = "raftAppliedIndex", with = "uint", default)]
    pub raft_applied_index: u64,
    /// Raft role.
    #[serde(default)]
    pub state: String,
    /// Compaction point.
    #[serde(rename = "compactRevision", with = "int", default)]
    pub compact_revision: i64,
    /// Live keys.
    #[serde(with = "int", default)]
    pub keys: i64,
    /// Open watchers.
    #[serde(with = "uint", default)]
    pub watchers: u64,
    /// True if the replica is a learner.
    #[serde(rename = "isLearner", default)]
    pub is_learner: bool,
    /// Errors worth an operator's attention.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// An error answer, as etcd's gateway writes it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ErrorBody {
    /// The message.
    pub error: String,
    /// gRPC status code.
    #[serde(default)]
    pub code: i32,
    /// The message again (etcd sets both).
    #[serde(default)]
    pub message: String,
}
