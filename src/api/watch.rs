//! Kubernetes watches, served from this replica's store.
//!
//! `resourceVersion` absent or `0`: the current matching objects first (as `ADDED`), then
//! changes. `N`: every change after revision N, replayed from the store's history (or from
//! the watch cache's window, for the resources it keeps; an N the cache has not reached yet
//! is waited for as the changes arrive), then live changes; N below the
//! compaction point gets 410 `Expired`, and so does a watch with selectors from below the
//! window of a loaded watch cache (the client relists, as kube-apiserver's clients do).
//! Label and field selectors apply
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

use super::cache;
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
    /// `spec.nodeName` after and before the change, when the watch cache knows them (then
    /// a watcher by node alone needs no parsing).
    nodes: Option<Nodes>,
}

/// `spec.nodeName` of a change's new and previous object.
pub(crate) type Nodes = (Option<Arc<str>>, Option<Arc<str>>);

/// One side of a store event: the stored bytes, the resourceVersion it is sent with, and
/// what selectors read of the object, parsed on first use and shared by every watcher the
/// event goes to. Only that part is kept: an event lives on in the watch cache's window
/// (10,000 per resource), and a whole parsed pod is several times its stored bytes.
pub(crate) struct Side {
    raw: Bytes,
    revision: i64,
    selectable: std::sync::OnceLock<Result<Value, KubeError>>,
}

impl Side {
    /// The side of the value stored at `key` (opened if it is encrypted; one that does not
    /// open is logged and serves as an error).
    fn new(key: &[u8], raw: &[u8], revision: i64) -> Side {
        let raw = match super::encryption::open(key, raw) {
            Ok(b) => Bytes::from(b.into_owned()),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), %e, "a stored object does not open");
                Bytes::new()
            }
        };
        Side::shared(raw, revision)
    }

    /// The side of plain stored bytes (shared with the watch cache).
    pub(crate) fn shared(raw: Bytes, revision: i64) -> Side {
        Side {
            raw,
            revision,
            selectable: std::sync::OnceLock::new(),
        }
    }

    /// The object, with its resourceVersion (parsed on every call).
    fn parse(&self) -> Result<Value, KubeError> {
        objects::parse(&self.raw, self.revision)
    }

    /// What selectors read of the object: see [`selectable_part`] (`paths`: the fields its
    /// resource is selected by; the same for every watcher of one resource).
    fn selectable(&self, paths: &[&str]) -> Result<&Value, KubeError> {
        self.selectable
            .get_or_init(|| self.parse().map(|o| selectable_part(&o, paths)))
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Puts `v` at the path `segs` in `dst`, making the objects on the way (a path through
/// something else is left alone).
fn insert_at(dst: &mut Value, segs: &[&str], v: Value) {
    let Some(map) = dst.as_object_mut() else {
        return;
    };
    match segs {
        [] => {}
        [last] => {
            map.insert(last.to_string(), v);
        }
        [first, rest @ ..] => insert_at(
            map.entry(*first)
                .or_insert_with(|| Value::Object(Default::default())),
            rest,
            v,
        ),
    }
}

/// What label and field selectors read of `o`: its name, namespace and labels, and the
/// fields its resource can be selected by (`paths`, dotted), at the same places.
fn selectable_part(o: &Value, paths: &[&str]) -> Value {
    let mut out = Value::Object(Default::default());
    let always = ["metadata.name", "metadata.namespace", "metadata.labels"];
    for path in always.iter().chain(paths) {
        let Some(v) = path.split('.').try_fold(o, |v, seg| v.get(seg)) else {
            continue;
        };
        let segs: Vec<&str> = path.split('.').collect();
        insert_at(&mut out, &segs, v.clone());
    }
    out
}

impl Decoded {
    /// A change as the watch cache saw it.
    pub(crate) fn from_cache(
        new: Option<Side>,
        prev: Option<Side>,
        nodes: Option<Nodes>,
    ) -> Decoded {
        Decoded {
            new,
            prev,
            lines: Mutex::new(HashMap::new()),
            nodes,
        }
    }

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
            nodes: None,
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

/// Where a watch's changes come from: the resource's watch cache, or a store watcher of
/// its own (resources not cached, or a start the cache cannot serve).
enum Feed {
    Store(store::Watcher),
    Cache(cache::Subscription),
}

/// What a [`Feed`] yields.
enum Message {
    Events(Vec<Arc<Decoded>>),
    Progress(i64),
}

impl Feed {
    async fn recv(&mut self, decoded: &EventCache) -> Result<Message, store::CancelReason> {
        match self {
            Feed::Store(w) => Ok(match w.recv().await? {
                store::WatchMessage::Events(events) => {
                    Message::Events(events.iter().map(|e| decoded.get(e)).collect())
                }
                store::WatchMessage::Progress(rev) => Message::Progress(rev),
            }),
            Feed::Cache(s) => Ok(match s.recv().await? {
                cache::Message::Events(events) => Message::Events(events),
                cache::Message::Progress(rev) => Message::Progress(rev),
            }),
        }
    }

    fn request_progress(&mut self) {
        match self {
            Feed::Store(w) => {
                w.request_progress();
            }
            Feed::Cache(s) => s.request_progress(),
        }
    }
}

/// How a watch presents objects: as they are, or as one-row Tables.
#[derive(Clone, Copy)]
struct Presentation {
    r: &'static super::resources::Resource,
    as_table: bool,
    include: table::Include,
}

impl Presentation {
    fn wrap(&self, obj: Value) -> Value {
        if !self.as_table {
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
            "rows": [table::row(self.r, &obj, self.include, super::meta::now_secs())],
        })
    }
}

/// The `ADDED` line of an object the watch cache listed, if the selectors take it.
fn initial_line(
    raw: &[u8],
    revision: i64,
    labels: &LabelSelector,
    fields: &FieldSelector,
    by_index: bool,
    p: Presentation,
) -> Result<Option<Bytes>, KubeError> {
    let selected = (labels.is_empty() && fields.is_empty()) || by_index;
    if selected && !p.as_table {
        return Ok(Some(framed(
            "ADDED",
            &objects::json_with_resource_version(raw, revision)?,
        )));
    }
    let v = objects::parse(raw, revision)?;
    if !(selected || labels.matches(&v) && fields.matches(&v)) {
        return Ok(None);
    }
    Ok(Some(line("ADDED", p.wrap(v))))
}

pub(super) async fn serve(kube: Arc<Kube>, call: Call) -> KubeResult {
    let labels = LabelSelector::parse(call.param("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(
        call.param("fieldSelector").unwrap_or(""),
        field_labels(call.r),
    )?;
    let p = Presentation {
        r: call.r,
        as_table: table::wants_table(&call.accept),
        include: table::Include::parse(call.param("includeObject")),
    };
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
    let from: Option<i64> =
        match call.param("resourceVersion") {
            None | Some("0") => None,
            Some(rv) => Some(rv.parse().ok().filter(|v| *v >= 0).ok_or_else(|| {
                KubeError::bad_request(format!("invalid resourceVersion {rv:?}"))
            })?),
        };
    let (start, end) = Kube::list_range(&call);
    let mut initial: Vec<Bytes> = Vec::new();
    let mut feed = None;
    if let Some(c) = kube.caches.get(call.r) {
        let (filter, by_index) =
            c.filter(start.clone().into_bytes(), end.clone(), &labels, &fields);
        match from {
            None => {
                // Without a resourceVersion the list is a consistent read.
                let target = kube.cache_target(call.consistency()).await?;
                let ready = c.wait_for(target).await;
                if !ready && !c.loaded() {
                    return Err(KubeError::initializing());
                }
                if ready {
                    if let Some(((objs, _), sub)) = c.list_and_watch(filter) {
                        for (raw, rev) in objs {
                            if let Some(l) = initial_line(&raw, rev, &labels, &fields, by_index, p)?
                            {
                                initial.push(l);
                            }
                        }
                        feed = Some(Feed::Cache(sub));
                    }
                } else {
                    // Behind: the list from the store (bounded), the changes after it
                    // from the cache as it catches up.
                    let _permit = kube
                        .caches
                        .behind_permit()
                        .ok_or_else(|| KubeError::too_many_requests(BEHIND_MESSAGE.into()))?;
                    let (items, rev) = kube.list_from_store(&listing_of(&call)).await?;
                    initial = items
                        .into_iter()
                        .map(|o| line("ADDED", p.wrap(o)))
                        .collect();
                    match c.watch_from(filter, rev) {
                        Ok(Some(sub)) => feed = Some(Feed::Cache(sub)),
                        Ok(None) => return Err(KubeError::initializing()),
                        // The window moved past the list while it was read: the client
                        // starts over.
                        Err(since) => return Err(KubeError::expired(rev, since)),
                    }
                }
            }
            Some(rv) => {
                // Only a cache still loading is waited for: a loaded one registers the
                // watcher at once, even from a revision it has not reached (the changes
                // up to it are skipped as they arrive), as kube-apiserver's does. A
                // store watcher per resuming client cost each one a copy of every change
                // (thousands of node agents reconnecting to a restarted replica).
                if !c.wait_for(0).await {
                    return Err(KubeError::initializing());
                }
                feed = match c.watch_from(filter, rv) {
                    Ok(sub) => sub.map(Feed::Cache),
                    // Older than the window: a replay from the store would parse every
                    // change since for a watcher with selectors (a node agent's, by
                    // `spec.nodeName`): it is refused, and the client relists. Without
                    // selectors the stored bytes go out as they are: replayed.
                    Err(since) if !(labels.is_empty() && fields.is_empty()) => {
                        return Err(KubeError::expired(rv, since));
                    }
                    Err(_) => None,
                };
            }
        }
    }
    if let Some(m) = &kube.metrics {
        m.watch_cache_served(
            "watch",
            if matches!(feed, Some(Feed::Cache(_))) {
                "cache"
            } else {
                "store"
            },
        );
    }
    let mut feed = match feed {
        Some(f) => f,
        None => {
            let start_revision = match from {
                Some(rv) => rv + 1,
                None => {
                    let (items, rev) = kube.list_from_store(&listing_of(&call)).await?;
                    initial = items
                        .into_iter()
                        .map(|o| line("ADDED", p.wrap(o)))
                        .collect();
                    rev + 1
                }
            };
            match kube.objects.replica().kv().watch(store::WatchRequest {
                key: start.into_bytes(),
                range_end: end,
                start_revision,
                prev_kv: true,
            }) {
                Ok(w) => Feed::Store(w),
                Err(store::Error::Compacted {
                    compact_revision, ..
                }) => return Err(KubeError::expired(start_revision - 1, compact_revision)),
                Err(e) => return Err(e.into()),
            }
        }
    };

    let (tx, body) = h::channel_body(64);
    let r = call.r;
    if let Some(m) = &kube.metrics {
        m.watch_opened();
    }
    tokio::spawn(async move {
        let _open = kube.metrics.as_ref().map(|m| m.watch_guard());
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let node_only = match labels.is_empty() {
            true => fields.only_node_name(),
            false => None,
        };
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut idle = tokio::time::interval(BOOKMARK_INTERVAL);
        idle.tick().await;
        loop {
            let msg = tokio::select! {
                _ = kube.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => return,
                _ = idle.tick(), if bookmarks => {
                    feed.request_progress();
                    continue;
                }
                m = feed.recv(&kube.events) => m,
            };
            let lines: Vec<Bytes> = match msg {
                Ok(Message::Events(events)) => {
                    idle.reset();
                    let mut out = Vec::new();
                    for d in events {
                        let sent = translate(d, &labels, &fields, node_only, field_labels(r))
                            .and_then(|w| match w {
                                Some((t, d, side)) if !p.as_table => {
                                    d.line(t, d.side(side)).map(Some)
                                }
                                Some((t, d, side)) => {
                                    d.side(side).parse().map(|v| Some(line(t, p.wrap(v))))
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
                Ok(Message::Progress(rev)) => vec![line(
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

/// Why a consistent list or watch is refused while a cache is behind.
pub(crate) const BEHIND_MESSAGE: &str =
    "the watch cache is behind and this replica is already serving as many lists from its store as it may";

/// The list a watch without a `resourceVersion` starts with: its selectors (and
/// `resourceVersion`) only.
fn listing_of(call: &Call) -> Call {
    Call {
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
    }
}

/// A watch event for one watcher: its type, the decoded store event, and which side of it
/// to send.
type WatchEvent = (&'static str, Arc<Decoded>, Which);

/// The watch event a change becomes for this watcher, if any. Without selectors every
/// object matches, and neither side is parsed; with `spec.nodeName=X` alone and a change
/// from the watch cache (which knows each side's node), neither is parsed either.
fn translate(
    d: Arc<Decoded>,
    labels: &LabelSelector,
    fields: &FieldSelector,
    node_only: Option<&str>,
    paths: &[&str],
) -> Result<Option<WatchEvent>, KubeError> {
    let everything = labels.is_empty() && fields.is_empty();
    let (was, is) = match (node_only, &d.nodes) {
        (Some(n), Some((after, before))) => (
            d.prev.is_some() && before.as_deref() == Some(n),
            d.new.is_some() && after.as_deref() == Some(n),
        ),
        _ => {
            let matches = |side: &Side| -> Result<bool, KubeError> {
                if everything {
                    return Ok(true);
                }
                let o = side.selectable(paths)?;
                Ok(labels.matches(o) && fields.matches(o))
            };
            let was = match &d.prev {
                Some(p) => matches(p)?,
                None => false,
            };
            let is = match &d.new {
                Some(new) => matches(new)?,
                None => false,
            };
            (was, is)
        }
    };
    let out = match (&d.new, was, is) {
        (Some(_), true, true) => Some(("MODIFIED", Which::New)),
        (Some(_), false, true) => Some(("ADDED", Which::New)),
        // It stopped matching: DELETED, carrying the new state (as the Go server).
        (Some(_), true, false) => Some(("DELETED", Which::New)),
        (Some(_), false, false) => None,
        (None, was, _) => was.then_some(("DELETED", Which::Prev)),
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

    #[test]
    fn selectors_judge_the_kept_part_of_an_event_as_the_whole_object() {
        let pods = super::super::resources::find("", "v1", "pods").unwrap();
        let paths = field_labels(pods);
        let pod = |name: &str, app: &str, node: Option<&str>, phase: &str| {
            let mut p = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "a", "labels": {"app": app, "tier": "x"},
                    "managedFields": [{"manager": "m"}], "annotations": {"k": "v"}},
                "spec": {"containers": [{"name": "c", "image": "i"}], "restartPolicy": "Always"},
                "status": {"phase": phase, "conditions": [{"type": "Ready"}]}});
            if let Some(n) = node {
                p["spec"]["nodeName"] = json!(n);
            }
            Side::shared(Bytes::from(serde_json::to_vec(&p).unwrap()), 7)
        };
        let before = pod("p", "web", None, "Pending");
        // Kept: name, namespace, labels and the fields pods are selected by; not the rest.
        assert_eq!(
            before.selectable(paths).unwrap(),
            &json!({"metadata": {"name": "p", "namespace": "a", "labels": {"app": "web", "tier": "x"}},
                "spec": {"restartPolicy": "Always"}, "status": {"phase": "Pending"}})
        );
        let after = pod("p", "db", Some("n1"), "Running");
        let event = || {
            Arc::new(Decoded::from_cache(
                Some(pod("p", "db", Some("n1"), "Running")),
                Some(pod("p", "web", None, "Pending")),
                None,
            ))
        };
        // Every selector decides on the kept part as on the whole object.
        for (l, f) in [
            ("app=web", ""),
            ("app=db", ""),
            ("tier in (x,y),app!=web", ""),
            ("", "spec.nodeName=n1"),
            ("", "status.phase=Running,metadata.namespace=a"),
            ("", "metadata.name=q"),
            ("app", "spec.restartPolicy=Always"),
        ] {
            let labels = LabelSelector::parse(l).unwrap();
            let fields = FieldSelector::parse(f, paths).unwrap();
            let whole = |s: &Side| {
                let o = s.parse().unwrap();
                labels.matches(&o) && fields.matches(&o)
            };
            let want = match (whole(&before), whole(&after)) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            };
            let got = translate(event(), &labels, &fields, None, paths)
                .unwrap()
                .map(|(t, _, _)| t);
            assert_eq!(got, want, "labels {l:?}, fields {f:?}");
        }
    }
}
