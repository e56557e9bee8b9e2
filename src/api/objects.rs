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
    /// From this replica's state once it holds revision N (`resourceVersion=N`: not older
    /// than N, kube-apiserver's default match): after a read barrier only if it does not
    /// yet; a revision past every committed one is refused as too large.
    AtLeast(i64),
}

/// An object as read: its JSON with `resourceVersion` filled in, and its revision.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The object.
    pub object: Value,
    /// Its mod revision.
    pub revision: i64,
    /// Its stored bytes are not what a write would store now (encrypted with a key that is
    /// no longer the first, or not encrypted where encryption is configured): an update
    /// that changes nothing still rewrites it.
    pub stale: bool,
}

/// Decodes a stored value and stamps its resourceVersion.
pub fn decode(kv: &KeyValue) -> Result<Stored, KubeError> {
    decode_with(kv, parse)
}

/// [`decode`], parsing with `parse`.
fn decode_with(
    kv: &KeyValue,
    parse: fn(&[u8], i64) -> Result<Value, KubeError>,
) -> Result<Stored, KubeError> {
    let bytes = super::encryption::open(&kv.key, &kv.value)?;
    let object = parse(&bytes, kv.mod_revision)?;
    Ok(Stored {
        object,
        revision: kv.mod_revision,
        stale: super::encryption::stale(&kv.key, &kv.value),
    })
}

/// The JSON of a stored value with its resourceVersion stamped in, without decoding it:
/// only the top level and `metadata` are split into fields; every other value is copied as
/// it was stored. The bytes are those `serde_json::to_vec` gives for [`decode`]'s object
/// (stored values are written by serde_json, compact, with sorted keys), at a fraction of
/// the cost: a watch sends every change of every object it covers.
pub fn json_with_resource_version(raw: &[u8], revision: i64) -> Result<Vec<u8>, KubeError> {
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;
    let bad = |e: serde_json::Error| KubeError::internal(format!("stored object is not JSON: {e}"));
    let top: BTreeMap<String, &RawValue> = serde_json::from_slice(raw).map_err(bad)?;
    let rv = format!("\"{revision}\"");
    let rv = RawValue::from_string(rv).expect("a quoted number is JSON");
    let mut out = Vec::with_capacity(raw.len() + 40);
    out.push(b'{');
    for (i, (k, v)) in top.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k).map_err(bad)?;
        out.push(b':');
        if k == "metadata" {
            let Ok(mut meta) = serde_json::from_str::<BTreeMap<String, &RawValue>>(v.get()) else {
                // Not an object: nothing to stamp, as in `set_resource_version`.
                out.extend_from_slice(v.get().as_bytes());
                continue;
            };
            meta.insert("resourceVersion".into(), &rv);
            serde_json::to_writer(&mut out, &meta).map_err(bad)?;
        } else {
            out.extend_from_slice(v.get().as_bytes());
        }
    }
    out.push(b'}');
    Ok(out)
}

/// Stored (plain) bytes parsed into the object, with `revision` as its resourceVersion.
pub fn parse(raw: &[u8], revision: i64) -> Result<Value, KubeError> {
    let mut object: Value = serde_json::from_slice(raw)
        .map_err(|e| KubeError::internal(format!("stored object is not JSON: {e}")))?;
    set_resource_version(&mut object, revision);
    Ok(object)
}

/// Stored (plain) bytes parsed into the object without its `metadata.managedFields`, with
/// `revision` as its resourceVersion: what a cache that never reads field ownership keeps
/// (client-go's informers in the scheduler and controller manager trim them too). Field
/// ownership is often nearly half of an object's JSON, and more of its parsed size; here it
/// is skipped while parsing, not parsed and dropped.
pub fn parse_lean(raw: &[u8], revision: i64) -> Result<Value, KubeError> {
    let mut object = lean_json(raw)
        .map_err(|e| KubeError::internal(format!("stored object is not JSON: {e}")))?;
    set_resource_version(&mut object, revision);
    Ok(object)
}

/// [`decode`], without `metadata.managedFields` ([`parse_lean`]).
pub fn decode_lean(kv: &KeyValue) -> Result<Stored, KubeError> {
    decode_with(kv, parse_lean)
}

/// Parses JSON as `serde_json::from_slice` does, but leaves out `metadata.managedFields` of
/// the top-level object, and of the object of a watch event (`{"type", "object"}`).
pub fn lean_json(raw: &[u8]) -> serde_json::Result<Value> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(raw);
    let v = Lean::Object.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// Where [`lean_json`] is in the document.
#[derive(Clone, Copy)]
enum Lean {
    /// An object (or a watch event holding one under `object`).
    Object,
    /// Its `metadata`.
    Metadata,
}

impl<'de> serde::de::DeserializeSeed<'de> for Lean {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Lean {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = m.next_key::<String>()? {
            let v = match (self, k.as_str()) {
                (Lean::Object, "metadata") => m.next_value_seed(Lean::Metadata)?,
                (Lean::Object, "object") => m.next_value_seed(Lean::Object)?,
                (Lean::Metadata, "managedFields") => {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
                _ => m.next_value::<Value>()?,
            };
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = s.next_element::<Value>()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
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

/// The bytes stored for `object`: without `resourceVersion`. Serialized through a view that
/// skips that one field, so a write does not copy the object first.
fn encode(object: &Value) -> Vec<u8> {
    match object.as_object() {
        Some(top) => serde_json::to_vec(&Overlay::top(top, &[])),
        None => serde_json::to_vec(object),
    }
    .expect("JSON values serialize")
}

/// A metadata map without `resourceVersion`.
struct MetadataView<'a>(&'a serde_json::Map<String, Value>);

impl serde::Serialize for MetadataView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let fields = self.0.iter().filter(|(k, _)| *k != "resourceVersion");
        let mut map = s.serialize_map(None)?;
        for (k, v) in fields {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A map serialized with some fields set to other values (one level down: `(field,
/// subfield, value)`), keys in order: what the stored bytes of a changed copy would be,
/// without making the copy. At the top level `metadata.resourceVersion` is left out.
struct Overlay<'a> {
    map: Option<&'a serde_json::Map<String, Value>>,
    /// `(field, value)` at this level, sorted by field.
    set: Vec<(&'a str, &'a Value)>,
    /// `(field, subfield, value)`: fields whose own fields change, sorted by field.
    nested: &'a [(&'a str, &'a str, &'a Value)],
    top: bool,
}

impl<'a> Overlay<'a> {
    fn top(
        map: &'a serde_json::Map<String, Value>,
        nested: &'a [(&'a str, &'a str, &'a Value)],
    ) -> Self {
        Overlay {
            map: Some(map),
            set: Vec::new(),
            nested,
            top: true,
        }
    }

    fn entry<M: serde::ser::SerializeMap>(
        &self,
        m: &mut M,
        k: &str,
        v: Option<&Value>,
    ) -> Result<(), M::Error> {
        if let Some((_, value)) = self.set.iter().find(|(f, _)| *f == k) {
            return m.serialize_entry(k, value);
        }
        let sub: Vec<(&str, &Value)> = self
            .nested
            .iter()
            .filter(|(f, _, _)| *f == k)
            .map(|(_, sf, v)| (*sf, *v))
            .collect();
        match v {
            Some(Value::Object(meta)) if self.top && k == "metadata" && sub.is_empty() => {
                m.serialize_entry(k, &MetadataView(meta))
            }
            _ if !sub.is_empty() => m.serialize_entry(
                k,
                &Overlay {
                    map: v.and_then(Value::as_object),
                    set: sub,
                    nested: &[],
                    top: false,
                },
            ),
            Some(v) => m.serialize_entry(k, v),
            None => Ok(()),
        }
    }
}

impl serde::Serialize for Overlay<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        // The fields present, and the ones the overlay adds, in key order.
        let mut extra: Vec<&str> = self
            .set
            .iter()
            .map(|(f, _)| *f)
            .chain(self.nested.iter().map(|(f, _, _)| *f))
            .filter(|f| !self.map.is_some_and(|map| map.contains_key(*f)))
            .collect();
        extra.sort_unstable();
        extra.dedup();
        let mut extra = extra.into_iter().peekable();
        for (k, v) in self.map.into_iter().flatten() {
            while let Some(e) = extra.next_if(|e| *e < k.as_str()) {
                self.entry(&mut m, e, None)?;
            }
            self.entry(&mut m, k, Some(v))?;
        }
        for e in extra {
            self.entry(&mut m, e, None)?;
        }
        m.end()
    }
}

/// The bytes stored for `object` with `(field, subfield)` set to each value given (e.g.
/// `("spec", "nodeName", …)`), as [`encode`] of a copy changed that way would give.
pub fn encode_with(object: &Value, set: &[(&str, &str, &Value)]) -> Result<Vec<u8>, KubeError> {
    let top = object
        .as_object()
        .ok_or_else(|| KubeError::internal("the object is not a JSON object".to_string()))?;
    Ok(serde_json::to_vec(&Overlay::top(top, set)).expect("JSON values serialize"))
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
        match c {
            Consistency::Local => {}
            Consistency::Linearizable => self.replica.read_barrier().await?,
            Consistency::AtLeast(rv) => {
                if self.replica.kv().revision() < rv {
                    self.replica.read_barrier().await?;
                    let now = self.replica.kv().revision();
                    if now < rv {
                        return Err(KubeError::too_large_resource_version(rv, now));
                    }
                }
            }
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
        let (items, rev, remaining, _) = self
            .range_containing(start, end, revision, limit, c, None)
            .await?;
        Ok((items, rev, remaining))
    }

    /// [`Objects::range`], decoding only the objects whose stored bytes contain `needle`
    /// (all of them without one), and also returning the last key read, decoded or not.
    pub async fn range_containing(
        &self,
        start: &[u8],
        end: &[u8],
        revision: i64,
        limit: i64,
        c: Consistency,
        needle: Option<&[u8]>,
    ) -> Result<(Vec<Stored>, i64, i64, Option<Vec<u8>>), KubeError> {
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
        let remaining = resp.count - resp.kvs.len() as i64;
        let last = resp.kvs.last().map(|kv| kv.key.clone());
        let items = resp
            .kvs
            .iter()
            // Encrypted values cannot be searched: every one is decoded.
            .filter(|kv| {
                needle
                    .filter(|_| !super::encryption::may_encrypt(start))
                    .is_none_or(|n| kv.value.windows(n.len()).any(|w| w == n))
            })
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((items, resp.revision, remaining, last))
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
        let mut success = vec![put(&k, super::encryption::seal(&k, encode(object))?)];
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
                stale: false,
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
        object: Value,
    ) -> Result<Result<Stored, Option<Stored>>, KubeError> {
        Ok(self
            .replace_claiming(key, revision, object, &Claims::default())
            .await?
            .map_err(|r| match r {
                Refused::Exists(cur) => cur,
                Refused::Taken(_) => None,
            }))
    }

    /// Writes `bytes` (made by [`encode_with`]) over an object if it is still at `revision`:
    /// the new revision, or `Err(current)` as [`Objects::replace`].
    pub async fn replace_encoded(
        &self,
        key: &str,
        revision: i64,
        bytes: Vec<u8>,
    ) -> Result<Result<i64, Option<Stored>>, KubeError> {
        let k = key.as_bytes().to_vec();
        let t = self
            .txn(TxnRequest {
                compare: vec![at_revision(&k, revision)],
                success: vec![put(&k, super::encryption::seal(&k, bytes)?)],
                failure: vec![read(&k)],
            })
            .await?;
        if t.succeeded {
            return Ok(Ok(t.revision));
        }
        match refusal(&t, &Claims::default())? {
            Refused::Exists(cur) => Ok(Err(cur)),
            Refused::Taken(_) => Ok(Err(None)),
        }
    }

    /// [`Objects::replace`], also taking and releasing `claims` in the same transaction.
    /// `Exists(current)` means the object changed or vanished; `Taken(k)` that claim `k` is
    /// someone else's.
    pub async fn replace_claiming(
        &self,
        key: &str,
        revision: i64,
        mut object: Value,
        claims: &Claims,
    ) -> Result<Result<Stored, Refused>, KubeError> {
        let k = key.as_bytes().to_vec();
        let mut compare = vec![at_revision(&k, revision)];
        compare.extend(claims.take.iter().map(|c| absent(c.as_bytes())));
        let mut success = vec![put(&k, super::encryption::seal(&k, encode(&object))?)];
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
            set_resource_version(&mut object, t.revision);
            return Ok(Ok(Stored {
                object,
                revision: t.revision,
                stale: false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lean_json_leaves_out_only_the_objects_own_field_ownership() {
        use serde_json::json;
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "managedFields": [
                {"manager": "kubectl", "fieldsV1": {"f:spec": {"f:containers": {}}}}]},
            "spec": {"template": {"metadata": {"managedFields": [1]}},
                     "n": [1, -2, 2.5, true, null, "s", {"managedFields": 3}]},
        });
        let mut want = pod.clone();
        want["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        let raw = serde_json::to_vec(&pod).unwrap();
        assert_eq!(lean_json(&raw).unwrap(), want);
        // A watch event's object too.
        let event = serde_json::to_vec(&json!({"type": "ADDED", "object": pod})).unwrap();
        assert_eq!(
            lean_json(&event).unwrap(),
            json!({"type": "ADDED", "object": want})
        );
        // Stored bytes: the same object as `parse` gives, less the field ownership.
        let mut full = parse(&raw, 7).unwrap();
        full["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        assert_eq!(parse_lean(&raw, 7).unwrap(), full);
        assert_eq!(decode_lean(&kv(&raw, 7)).unwrap().object, full);
        // Anything else parses as serde_json parses it; bad JSON is an error.
        for other in [
            "[1,{\"metadata\":2}]",
            "3",
            "\"x\"",
            "null",
            "{\"metadata\":[1]}",
        ] {
            assert_eq!(
                lean_json(other.as_bytes()).unwrap(),
                serde_json::from_str::<Value>(other).unwrap()
            );
        }
        for bad in ["{", "{\"metadata\": {\"managedFields\": [}}", "{} x", ""] {
            assert!(lean_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    fn kv(value: &[u8], rev: i64) -> KeyValue {
        KeyValue {
            key: b"k".to_vec(),
            create_revision: 1,
            mod_revision: rev,
            version: 1,
            value: value.to_vec(),
        }
    }

    #[test]
    fn the_stamped_json_is_what_decoding_and_encoding_give() {
        let objects = [
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default", "labels": {"a": "b\"c"},
                             "uid": "u", "resourceVersion": "9"},
                "spec": {"containers": [{"name": "c", "image": "i", "args": ["x", "\u{00e9}\n"]}]},
                "status": {"phase": "Pending", "conditions": []}}),
            serde_json::json!({"kind": "Event", "metadata": {}, "count": 3, "z": null}),
            serde_json::json!({"kind": "NoMeta", "a": [1, 2.5, -3]}),
            serde_json::json!({"metadata": "not an object"}),
        ];
        for o in objects {
            let stored = encode(&o);
            let want = serde_json::to_vec(&decode(&kv(&stored, 42)).unwrap().object).unwrap();
            let got = json_with_resource_version(&stored, 42).unwrap();
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
        assert!(json_with_resource_version(b"{not json", 1).is_err());
    }

    #[test]
    fn an_overlay_encodes_what_the_changed_copy_would() {
        let pods = [
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "resourceVersion": "3"},
                "spec": {"containers": [], "schedulerName": "s"},
                "status": {"phase": "Pending", "conditions": [{"type": "X"}]}}),
            serde_json::json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"nodeName": "old", "a": 1}}),
            serde_json::json!({"metadata": {"name": "p"}, "spec": 5}),
            serde_json::json!({}),
        ];
        let node = serde_json::json!("n1");
        let conds = serde_json::json!([{"type": "PodScheduled", "status": "True"}]);
        for pod in pods {
            let mut copy = pod.clone();
            if !copy["spec"].is_object() {
                copy["spec"] = serde_json::json!({});
            }
            copy["spec"]["nodeName"] = node.clone();
            if !copy["status"].is_object() {
                copy["status"] = serde_json::json!({});
            }
            copy["status"]["conditions"] = conds.clone();
            let got = encode_with(
                &pod,
                &[
                    ("spec", "nodeName", &node),
                    ("status", "conditions", &conds),
                ],
            )
            .unwrap();
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(encode(&copy)).unwrap()
            );
        }
        assert!(encode_with(&serde_json::json!([1]), &[]).is_err());
    }

    #[test]
    fn a_stored_object_leaves_out_its_resource_version_only() {
        let o = serde_json::json!({"metadata": {"name": "n", "resourceVersion": "5"},
                                   "spec": {"resourceVersion": "kept"}});
        let stored: Value = serde_json::from_slice(&encode(&o)).unwrap();
        assert_eq!(
            stored,
            serde_json::json!({"metadata": {"name": "n"}, "spec": {"resourceVersion": "kept"}})
        );
    }
}
