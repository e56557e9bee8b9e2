//! Kubernetes objects in the replicated store.
//!
//! An object is stored as JSON under [`Resource::key`], without `metadata.resourceVersion`:
//! its resourceVersion *is* the store's mod revision, written into the object whenever it is
//! read (as the Kubernetes API server does over etcd). Every write is one store transaction
//! guarded by a compare on the key's revision, so concurrent writers cannot lose updates:
//! creates require the key to be absent, updates and deletes require the revision they read.

use flotilla_raft::{Command, CommandResult, Replica};
use flotilla_store::{
    Compare, CompareResult, CompareTarget, DeleteRangeRequest, KeyValue, PutRequest, RangeRequest,
    RequestOp, ResponseOp, TxnRequest, TxnResponse,
};
use serde_json::Value;

use super::resources::Resource;
use super::status::KubeError;

/// How a read should be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// After the read barrier (the default).
    Linearizable,
    /// From this replica's state (`resourceVersion=0`).
    Local,
}

/// An object as read: its JSON with `resourceVersion` filled in, and its revision.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The object.
    pub object: Value,
    /// Its mod revision.
    pub revision: i64,
}

/// Decodes a stored value and stamps its resourceVersion.
pub fn decode(kv: &KeyValue) -> Result<Stored, KubeError> {
    let mut object: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| KubeError::internal(format!("stored object is not JSON: {e}")))?;
    set_resource_version(&mut object, kv.mod_revision);
    Ok(Stored {
        object,
        revision: kv.mod_revision,
    })
}

/// Writes `metadata.resourceVersion`.
pub fn set_resource_version(object: &mut Value, revision: i64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
}

/// The bytes stored for `object`: without `resourceVersion`.
fn encode(object: &Value) -> Vec<u8> {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    serde_json::to_vec(&o).expect("JSON values serialize")
}

/// The end of the key range of every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Reads and writes objects through a replica.
#[derive(Clone)]
pub struct Objects {
    replica: Replica,
    /// For leader-only work: the term writes are fenced to (proposed on this replica only,
    /// refused at apply if they land in another term).
    fence: Option<u64>,
}

impl Objects {
    /// Objects stored through `replica`.
    pub fn new(replica: Replica) -> Objects {
        Objects {
            replica,
            fence: None,
        }
    }

    /// The same store, with every write fenced to `term` (see [`Replica::write_fenced`]).
    pub fn fenced(&self, term: u64) -> Objects {
        Objects {
            replica: self.replica.clone(),
            fence: Some(term),
        }
    }

    /// The term writes are fenced to, if any.
    pub fn fence(&self) -> Option<u64> {
        self.fence
    }

    /// The replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    async fn barrier(&self, c: Consistency) -> Result<(), KubeError> {
        if c == Consistency::Linearizable {
            self.replica.read_barrier().await?;
        }
        Ok(())
    }

    /// One object, or `None`.
    pub async fn get(&self, key: &str, c: Consistency) -> Result<Option<Stored>, KubeError> {
        self.barrier(c).await?;
        let resp = self.replica.kv().range(&RangeRequest {
            key: key.as_bytes().to_vec(),
            ..RangeRequest::default()
        })?;
        resp.kvs.first().map(decode).transpose()
    }

    /// Objects with keys in `[start, end)` at `revision` (0: current), at most `limit` (0: no
    /// limit). Returns them, the revision read at, and how many more the range holds.
    pub async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        revision: i64,
        limit: i64,
        c: Consistency,
    ) -> Result<(Vec<Stored>, i64, i64), KubeError> {
        self.barrier(c).await?;
        let kv = self.replica.kv().clone();
        let req = RangeRequest {
            key: start.to_vec(),
            range_end: end.to_vec(),
            revision,
            limit,
            ..RangeRequest::default()
        };
        let resp = tokio::task::spawn_blocking(move || kv.range(&req))
            .await
            .map_err(|e| KubeError::internal(e.to_string()))??;
        let items = resp.kvs.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        let remaining = resp.count - items.len() as i64;
        Ok((items, resp.revision, remaining))
    }

    async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, KubeError> {
        let result = match self.fence {
            Some(term) => self.replica.write_fenced(term, Command::txn(txn)).await?,
            None => self.replica.write(Command::txn(txn)).await?,
        };
        match result {
            CommandResult::Txn(t) => Ok(t),
            other => Err(KubeError::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    /// Stores a new object; fails with `AlreadyExists` if the key is taken.
    pub async fn create(
        &self,
        r: &Resource,
        key: &str,
        name: &str,
        object: &Value,
    ) -> Result<Stored, KubeError> {
        match self
            .create_claiming(key, object, &Claims::default())
            .await?
        {
            Ok(s) => Ok(s),
            Err(_) => Err(KubeError::already_exists(r, name)),
        }
    }

    /// Stores a new object and takes `claims` in the same transaction. Fails (changing
    /// nothing) with `Exists(None)` if the object's key is taken, `Taken(k)` if claim `k` is.
    pub async fn create_claiming(
        &self,
        key: &str,
        object: &Value,
        claims: &Claims,
    ) -> Result<Result<Stored, Refused>, KubeError> {
        let k = key.as_bytes().to_vec();
        let mut compare = vec![absent(&k)];
        compare.extend(claims.take.iter().map(|c| absent(c.as_bytes())));
        let mut success = vec![put(&k, encode(object))];
        success.extend(claims.take.iter().map(|c| put(c.as_bytes(), k.clone())));
        success.extend(claims.release.iter().map(|c| remove(c.as_bytes())));
        let mut failure = vec![read(&k)];
        failure.extend(claims.take.iter().map(|c| read(c.as_bytes())));
        let t = self
            .txn(TxnRequest {
                compare,
                success,
                failure,
            })
            .await?;
        if t.succeeded {
            let mut object = object.clone();
            set_resource_version(&mut object, t.revision);
            return Ok(Ok(Stored {
                object,
                revision: t.revision,
            }));
        }
        Ok(Err(refusal(&t, claims)?))
    }

    /// Replaces an object if it is still at `revision`. Returns the new object, or `Err(None)`
    /// when the object changed (`Some(current)`) or vanished (`None`) in between.
    pub async fn replace(
        &self,
        key: &str,
        revision: i64,
        object: &Value,
    ) -> Result<Result<Stored, Option<Stored>>, KubeError> {
        Ok(self
            .replace_claiming(key, revision, object, &Claims::default())
            .await?
            .map_err(|r| match r {
                Refused::Exists(cur) => cur,
                Refused::Taken(_) => None,
            }))
    }

    /// [`Objects::replace`], also taking and releasing `claims` in the same transaction.
    /// `Exists(current)` means the object changed or vanished; `Taken(k)` that claim `k` is
    /// someone else's.
    pub async fn replace_claiming(
        &self,
        key: &str,
        revision: i64,
        object: &Value,
        claims: &Claims,
    ) -> Result<Result<Stored, Refused>, KubeError> {
        let k = key.as_bytes().to_vec();
        let mut compare = vec![at_revision(&k, revision)];
        compare.extend(claims.take.iter().map(|c| absent(c.as_bytes())));
        let mut success = vec![put(&k, encode(object))];
        success.extend(claims.take.iter().map(|c| put(c.as_bytes(), k.clone())));
        success.extend(claims.release.iter().map(|c| remove(c.as_bytes())));
        let mut failure = vec![read(&k)];
        failure.extend(claims.take.iter().map(|c| read(c.as_bytes())));
        let t = self
            .txn(TxnRequest {
                compare,
                success,
                failure,
            })
            .await?;
        if t.succeeded {
            let mut object = object.clone();
            set_resource_version(&mut object, t.revision);
            return Ok(Ok(Stored {
                object,
                revision: t.revision,
            }));
        }
        match refusal(&t, claims)? {
            // The object is there: whether it changed decides between the two outcomes.
            Refused::Exists(Some(cur)) if cur.revision == revision => Ok(Err(refusal_of_claims(
                &t, claims,
            )
            .unwrap_or(Refused::Exists(Some(cur))))),
            other => Ok(Err(other)),
        }
    }

    /// Deletes an object if it is still at `revision`; same outcomes as [`Objects::replace`].
    pub async fn delete(
        &self,
        key: &str,
        revision: i64,
    ) -> Result<Result<(), Option<Stored>>, KubeError> {
        self.delete_releasing(key, revision, &[]).await
    }

    /// [`Objects::delete`], also releasing `claims` in the same transaction.
    pub async fn delete_releasing(
        &self,
        key: &str,
        revision: i64,
        release: &[String],
    ) -> Result<Result<(), Option<Stored>>, KubeError> {
        let k = key.as_bytes().to_vec();
        let mut success = vec![remove(&k)];
        success.extend(release.iter().map(|c| remove(c.as_bytes())));
        let t = self
            .txn(TxnRequest {
                compare: vec![at_revision(&k, revision)],
                success,
                failure: vec![read(&k)],
            })
            .await?;
        if t.succeeded {
            return Ok(Ok(()));
        }
        Ok(Err(current_of(&t)?))
    }
}

/// Side keys a write takes (they must be free) or releases, in the same transaction: the
/// allocation records of service IPs and node ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// Keys to take.
    pub take: Vec<String>,
    /// Keys to release.
    pub release: Vec<String>,
}

/// Why a guarded write was refused.
#[derive(Debug, Clone)]
pub enum Refused {
    /// The object's key is not as expected: it exists (create), or it changed or vanished
    /// (replace: the current object, if any).
    Exists(Option<Stored>),
    /// A claim is held by another object.
    Taken(String),
}

fn absent(key: &[u8]) -> Compare {
    Compare {
        key: key.to_vec(),
        result: CompareResult::Equal,
        target: CompareTarget::CreateRevision(0),
    }
}

fn at_revision(key: &[u8], revision: i64) -> Compare {
    Compare {
        key: key.to_vec(),
        result: CompareResult::Equal,
        target: CompareTarget::ModRevision(revision),
    }
}

fn put(key: &[u8], value: Vec<u8>) -> RequestOp {
    RequestOp::Put(PutRequest {
        key: key.to_vec(),
        value,
        prev_kv: false,
    })
}

fn remove(key: &[u8]) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest {
        key: key.to_vec(),
        range_end: vec![],
        prev_kv: false,
    })
}

fn read(key: &[u8]) -> RequestOp {
    RequestOp::Range(RangeRequest {
        key: key.to_vec(),
        ..RangeRequest::default()
    })
}

/// The first taken claim in a failed transaction's reads (after the object's own read).
fn refusal_of_claims(t: &TxnResponse, claims: &Claims) -> Option<Refused> {
    t.responses
        .iter()
        .skip(1)
        .zip(&claims.take)
        .find(|(resp, _)| matches!(resp, ResponseOp::Range(r) if !r.kvs.is_empty()))
        .map(|(_, k)| Refused::Taken(k.clone()))
}

/// Why a create was refused: the object exists, else a claim is taken.
fn refusal(t: &TxnResponse, claims: &Claims) -> Result<Refused, KubeError> {
    let current = current_of(t)?;
    if current.is_some() {
        return Ok(Refused::Exists(current));
    }
    Ok(refusal_of_claims(t, claims).unwrap_or(Refused::Exists(None)))
}

/// The object a failed guard saw (from the failure branch's range).
fn current_of(t: &TxnResponse) -> Result<Option<Stored>, KubeError> {
    match t.responses.first() {
        Some(ResponseOp::Range(r)) => r.kvs.first().map(decode).transpose(),
        _ => Ok(None),
    }
}
