//! Kubernetes watches, served from this replica's store.
//!
//! `resourceVersion` absent or `0`: the current matching objects first (as `ADDED`), then
//! changes. `N`: every change after revision N, replayed from the store's history, then live
//! changes; N below the compaction point gets 410 `Expired`. Label and field selectors apply
//! to both sides of each change, so an object that stops matching is reported `DELETED` and
//! one that starts matching `ADDED`. `timeoutSeconds` ends the stream; with
//! `allowWatchBookmarks` an idle stream gets `BOOKMARK`s carrying the current revision.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flotilla_store as store;
use http::{header, Response, StatusCode};
use serde_json::{json, Value};

use super::objects;
use super::selector::{FieldSelector, LabelSelector};
use super::status::KubeError;
use super::{field_labels, table, Call, Kube, KubeResult};
use crate::http as h;

/// Idle time after which a bookmark is sent (when allowed).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(10);

/// Store events decoded (and their watch lines serialized) once for every watcher of the
/// replica, not once per watcher: with a thousand watchers on one resource this is most of
/// the work of a write (the Go server's watch cache does the same). Owns a bounded FIFO map
/// from (key, revision) to the decoded event; entries are immutable once made.
#[derive(Default)]
pub(crate) struct EventCache {
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<(Vec<u8>, i64), Arc<Decoded>>,
    order: VecDeque<(Vec<u8>, i64)>,
}

/// Most events kept decoded.
const EVENT_CACHE_ENTRIES: usize = 4096;

/// One store event, decoded as far as its watchers need: the objects are parsed only when a
/// watcher must look inside them (a selector, a table); a plain watch sends the stored JSON
/// with its resourceVersion stamped in ([`objects::json_with_resource_version`]).
pub(crate) struct Decoded {
    /// The object after a put.
    new: Option<Side>,
    /// The object before the event (a delete: with the deletion's resourceVersion, as the
    /// `DELETED` event carries it).
    prev: Option<Side>,
    /// The plain-JSON watch lines made so far, by event type.
    lines: Mutex<HashMap<&'static str, Bytes>>,
}

/// One side of a store event: the stored bytes, the resourceVersion it is sent with, and
/// the object, parsed on first use.
pub(crate) struct Side {
    raw: Vec<u8>,
    revision: i64,
    value: std::sync::OnceLock<Result<Value, KubeError>>,
}

impl Side {
    /// The side of the value stored at `key` (opened if it is encrypted; one that does not
    /// open is logged and serves as an error).
    fn new(key: &[u8], raw: &[u8], revision: i64) -> Side {
        let raw = match super::encryption::open(key, raw) {
            Ok(b) => b.into_owned(),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), %e, "a stored object does not open");
                Vec::new()
            }
        };
        Side {
            raw,
            revision,
            value: std::sync::OnceLock::new(),
        }
    }

    /// The object, with its resourceVersion.
    fn value(&self) -> Result<&Value, KubeError> {
        self.value
            .get_or_init(|| {
                let mut v: Value = serde_json::from_slice(&self.raw)
                    .map_err(|e| KubeError::internal(format!("stored object is not JSON: {e}")))?;
                objects::set_resource_version(&mut v, self.revision);
                Ok(v)
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl Decoded {
    /// The line for `event_type` carrying `side` (made once per type: a store event's
    /// type decides its side).
    fn line(&self, event_type: &'static str, side: &Side) -> Result<Bytes, KubeError> {
        if let Some(l) = self.lines.lock().expect("not poisoned").get(event_type) {
            return Ok(l.clone());
        }
        let l = framed(
            event_type,
            &objects::json_with_resource_version(&side.raw, side.revision)?,
        );
        self.lines
            .lock()
            .expect("not poisoned")
            .insert(event_type, l.clone());
        Ok(l)
    }
}

impl EventCache {
    fn get(&self, e: &store::Event) -> Arc<Decoded> {
        let id = (e.kv.key.clone(), e.kv.mod_revision);
        if let Some(d) = self.inner.lock().expect("not poisoned").map.get(&id) {
            return d.clone();
        }
        let (new, prev) = match e.kind {
            store::EventKind::Put => (
                Some(Side::new(&e.kv.key, &e.kv.value, e.kv.mod_revision)),
                e.prev_kv
                    .as_ref()
                    .map(|p| Side::new(&p.key, &p.value, p.mod_revision)),
            ),
            store::EventKind::Delete => (
                None,
                e.prev_kv
                    .as_ref()
                    .map(|p| Side::new(&p.key, &p.value, e.kv.mod_revision)),
            ),
        };
        let d = Arc::new(Decoded {
            new,
            prev,
            lines: Mutex::new(HashMap::new()),
        });
        let mut inner = self.inner.lock().expect("not poisoned");
        if inner.map.insert(id.clone(), d.clone()).is_none() {
            inner.order.push_back(id);
            while inner.order.len() > EVENT_CACHE_ENTRIES {
                if let Some(old) = inner.order.pop_front() {
                    inner.map.remove(&old);
                }
            }
        }
        d
    }
}

fn line(event_type: &str, object: Value) -> Bytes {
    framed(
        event_type,
        &serde_json::to_vec(&object).expect("JSON serializes"),
    )
}

/// One watch line around an object's JSON: `{"object":…,"type":…}` and a newline (the keys
/// in order, as serde_json writes a map).
fn framed(event_type: &str, object: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(object.len() + 32);
    v.extend_from_slice(b"{\"object\":");
    v.extend_from_slice(object);
    v.extend_from_slice(b",\"type\":");
    serde_json::to_writer(&mut v, event_type).expect("a string serializes");
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

pub(super) async fn serve(kube: Arc<Kube>, call: Call) -> KubeResult {
    let labels = LabelSelector::parse(call.param("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(
        call.param("fieldSelector").unwrap_or(""),
        field_labels(call.r),
    )?;
    let as_table = table::wants_table(&call.accept);
    let include = table::Include::parse(call.param("includeObject"));
    let timeout = match call.param("timeoutSeconds") {
        // (Bounded: a deadline past a year would overflow the clock arithmetic.)
        Some(t) => Some(Duration::from_secs(
            t.parse::<u64>()
                .map_err(|_| KubeError::bad_request(format!("invalid timeoutSeconds {t:?}")))?
                .min(365 * 24 * 3600),
        )),
        None => None,
    };
    let bookmarks = call.param("allowWatchBookmarks") == Some("true");
    let (initial, start_revision) = match call.param("resourceVersion") {
        None | Some("0") => {
            let listing = Call {
                r: call.r,
                namespace: call.namespace.clone(),
                name: None,
                sub: None,
                params: call
                    .params
                    .iter()
                    .filter(|(k, _)| {
                        matches!(
                            k.as_str(),
                            "labelSelector" | "fieldSelector" | "resourceVersion"
                        )
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                accept: String::new(),
                manager: call.manager.clone(),
                user: call.user.clone(),
                authz: call.authz.clone(),
            };
            let (items, rev, _, _) = kube.list_objects(&listing).await?;
            (items, rev + 1)
        }
        Some(rv) => {
            let rv: i64 =
                rv.parse().ok().filter(|v| *v >= 0).ok_or_else(|| {
                    KubeError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?;
            (Vec::new(), rv + 1)
        }
    };
    let (start, end) = Kube::list_range(&call);
    let mut watcher = match kube.objects.replica().kv().watch(store::WatchRequest {
        key: start.into_bytes(),
        range_end: end,
        start_revision,
        prev_kv: true,
    }) {
        Ok(w) => w,
        Err(store::Error::Compacted {
            compact_revision, ..
        }) => return Err(KubeError::expired(start_revision - 1, compact_revision)),
        Err(e) => return Err(e.into()),
    };

    let (tx, body) = h::channel_body(64);
    let r = call.r;
    if let Some(m) = &kube.metrics {
        m.watch_opened();
    }
    tokio::spawn(async move {
        let _open = kube.metrics.as_ref().map(|m| m.watch_guard());
        let wrap = |obj: Value| -> Value {
            if !as_table {
                return obj;
            }
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(json!(""));
            json!({
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": rv},
                "columnDefinitions": [],
                "rows": [table::row(r, &obj, include, super::meta::now_secs())],
            })
        };
        for obj in initial {
            if tx.send(line("ADDED", wrap(obj))).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut idle = tokio::time::interval(BOOKMARK_INTERVAL);
        idle.tick().await;
        loop {
            let msg = tokio::select! {
                _ = kube.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => return,
                _ = idle.tick(), if bookmarks => {
                    watcher.request_progress();
                    continue;
                }
                m = watcher.recv() => m,
            };
            let lines: Vec<Bytes> = match msg {
                Ok(store::WatchMessage::Events(events)) => {
                    idle.reset();
                    let mut out = Vec::new();
                    for e in events {
                        let sent =
                            translate(&kube.events, &e, &labels, &fields).and_then(|w| match w {
                                Some((t, d, side)) if !as_table => {
                                    d.line(t, d.side(side)).map(Some)
                                }
                                Some((t, d, side)) => {
                                    d.side(side).value().map(|v| Some(line(t, wrap(v.clone()))))
                                }
                                None => Ok(None),
                            });
                        match sent {
                            Ok(Some(l)) => out.push(l),
                            Ok(None) => {}
                            Err(err) => {
                                tracing::warn!(%err, "undecodable object in a watch");
                            }
                        }
                    }
                    out
                }
                Ok(store::WatchMessage::Progress(rev)) => vec![line(
                    "BOOKMARK",
                    json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": rev.to_string()}}),
                )],
                Err(store::CancelReason::Compacted {
                    requested,
                    compact_revision,
                }) => {
                    let _ = tx
                        .send(line(
                            "ERROR",
                            KubeError::expired(requested, compact_revision).to_value(),
                        ))
                        .await;
                    return;
                }
                // Slow or closing: end the stream; the client re-watches from its last version.
                Err(_) => return,
            };
            for l in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("static response parts are valid"))
}

/// Which side of a decoded event a watcher sends.
#[derive(Clone, Copy)]
enum Which {
    New,
    Prev,
}

impl Decoded {
    fn side(&self, which: Which) -> &Side {
        match which {
            Which::New => self.new.as_ref(),
            Which::Prev => self.prev.as_ref(),
        }
        .expect("translate picks a side that exists")
    }
}

/// A watch event for one watcher: its type, the decoded store event, and which side of it
/// to send.
type WatchEvent = (&'static str, Arc<Decoded>, Which);

/// The watch event a store event becomes for this watcher, if any. Without selectors every
/// object matches, and neither side is parsed.
fn translate(
    cache: &EventCache,
    e: &store::Event,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Result<Option<WatchEvent>, KubeError> {
    let everything = labels.is_empty() && fields.is_empty();
    let matches = |side: &Side| -> Result<bool, KubeError> {
        if everything {
            return Ok(true);
        }
        let o = side.value()?;
        Ok(labels.matches(o) && fields.matches(o))
    };
    let d = cache.get(e);
    let was = match &d.prev {
        Some(p) => matches(p)?,
        None => false,
    };
    let out = match &d.new {
        Some(new) => match (was, matches(new)?) {
            (true, true) => Some(("MODIFIED", Which::New)),
            (false, true) => Some(("ADDED", Which::New)),
            // It stopped matching: DELETED, carrying the new state (as the Go server).
            (true, false) => Some(("DELETED", Which::New)),
            (false, false) => None,
        },
        None => was.then_some(("DELETED", Which::Prev)),
    };
    Ok(out.map(|(t, side)| (t, d, side)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_line_is_what_serializing_the_event_gives() {
        let object = json!({"kind": "Pod", "metadata": {"name": "p\"q"}, "spec": {}});
        for t in ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"] {
            let mut want = serde_json::to_vec(&json!({"type": t, "object": object})).unwrap();
            want.push(b'\n');
            assert_eq!(&line(t, object.clone())[..], &want[..]);
        }
    }
}
