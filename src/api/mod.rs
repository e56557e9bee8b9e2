//! The Kubernetes API: the REST subset kubectl and the client libraries use, served by every
//! replica over the replicated store.
//!
//! One request, step by step:
//! 1. [`Kube::handle`] parses the path into a [`Route`] (discovery, `/version`, OpenAPI, or a
//!    resource with optional namespace, name and subresource) and checks the method. This is
//!    the one place where authentication and authorization will go.
//! 2. Reads pass the replica's read barrier (linearizable) unless they ask for
//!    `resourceVersion=0`, then read the local store. Lists page with `limit`/`continue` at
//!    one revision and filter by label and field selectors. Watches replay history from the
//!    store ([`watch`]).
//! 3. Writes validate and default the object ([`meta`]), then go through Raft as one
//!    compare-and-swap transaction on the key's revision ([`objects`]): a create needs the key
//!    absent, an update or delete needs the revision it read. Optimistic concurrency, 409
//!    `Conflict` and `AlreadyExists` follow from that.
//! 4. Failures become `Status` objects in exactly one place ([`status`]).

pub mod authz;
mod cache;
pub mod discovery;
pub mod encryption;
pub mod kinds;
pub mod managed;
pub mod meta;
pub mod objects;
pub mod patch;
pub mod proto;
pub mod quantity;
pub mod rbac;
pub mod resources;
pub mod satoken;
pub mod selector;
pub mod services;
pub mod status;
pub mod table;
mod watch;

use crate::api::meta::Ptr;
use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::http::{full, Body};
use objects::{Consistency, Objects, Stored};
use resources::Resource;
use selector::{FieldSelector, LabelSelector};
use status::{Cause, KubeError};

/// Largest object body (Kubernetes' limit).
pub const MAX_BODY_BYTES: usize = 1536 * 1024;

/// Namespaces that always exist and cannot be deleted (`kube-node-lease` can be recreated).
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Retries of a read-modify-write that lost a race to another writer.
const MAX_CAS_RETRIES: usize = 8;

type KubeResult = Result<Response<Body>, KubeError>;

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/version`.
    Version,
    /// `/api` or `/apis`.
    Root {
        /// `/api` (core) or `/apis`.
        core: bool,
    },
    /// `/apis/<group>`.
    Group(String),
    /// `/api/v1` or `/apis/<group>/<version>`.
    GroupVersion(String, String),
    /// `/openapi/v3`.
    OpenApiIndex,
    /// `/openapi/v3/<gv path>`.
    OpenApiDoc(String),
    /// A resource collection or object.
    Resource {
        /// The resource.
        r: &'static Resource,
        /// Namespace from the URL.
        namespace: Option<String>,
        /// Object name.
        name: Option<String>,
        /// Subresource.
        sub: Option<String>,
    },
}

/// Parses a request path.
pub fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::Root { core: true }),
        ["apis"] => return Some(Route::Root { core: false }),
        ["openapi", "v3"] => return Some(Route::OpenApiIndex),
        ["openapi", "v3", rest @ ..] => return Some(Route::OpenApiDoc(rest.join("/"))),
        ["api", v] => return Some(Route::GroupVersion(String::new(), v.to_string())),
        ["apis", g] => return Some(Route::Group(g.to_string())),
        ["apis", g, v] => return Some(Route::GroupVersion(g.to_string(), v.to_string())),
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return None,
    };
    let res = |plural: &str| resources::find(group, version, plural);
    let owned = |s: &&str| s.to_string();
    match rest {
        // namespaces/<ns>/<plural>[/<name>[/<sub>]] when <plural> is a namespaced resource
        ["namespaces", ns, plural, tail @ ..]
            if res(plural).is_some_and(|r| r.namespaced) && tail.len() <= 2 =>
        {
            Some(Route::Resource {
                r: res(plural)?,
                namespace: Some(ns.to_string()),
                name: tail.first().map(owned),
                sub: tail.get(1).map(owned),
            })
        }
        [plural, tail @ ..] if tail.len() <= 2 => Some(Route::Resource {
            r: res(plural)?,
            namespace: None,
            name: tail.first().map(owned),
            sub: tail.get(1).map(owned),
        }),
        _ => None,
    }
}

/// Decodes `%XX` escapes and `+` in a query component.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters (the last value of a repeated name wins).
pub fn query_params(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// The Kubernetes API of one replica.
pub struct Kube {
    pub(crate) objects: Objects,
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
    /// Where Service addresses come from.
    pub(crate) ranges: services::Ranges,
    /// Store events decoded once for every watcher of this replica.
    pub(crate) events: watch::EventCache,
    /// Lists and watches of the resources asked for in numbers, served from memory.
    pub(crate) caches: Arc<cache::Caches>,
    /// Where open watch streams are counted (`flotilla_api_watches_open`).
    pub(crate) metrics: Option<Arc<crate::metrics::Metrics>>,
    /// How logs and exec reach agents: TLS with this config (the replica's client
    /// certificate, the agents' CA), else plain TCP.
    pub(crate) agent_tls: Option<Arc<rustls::ClientConfig>>,
    /// Authorization of authenticated requests (none: everything is allowed).
    pub(crate) authz: Option<Arc<authz::Authorizer>>,
    /// The ServiceAccount token issuer (none: no TokenRequest).
    pub(crate) issuer: Option<Arc<satoken::Issuer>>,
}

/// What [`Kube::cached_list`] decided.
enum FromCache {
    /// Served from the cache (and whether the node index applied the selectors).
    Served(cache::Listed, bool),
    /// For the store to serve, with the permit to hold while it does if the cache was
    /// behind.
    Store(Option<tokio::sync::OwnedSemaphorePermit>),
}

/// A parsed request: what handlers need besides the body.
#[derive(Clone)]
pub(crate) struct Call {
    pub(crate) r: &'static Resource,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) params: HashMap<String, String>,
    pub(crate) accept: String,
    /// The subresource (`status`, `binding`), if any.
    pub(crate) sub: Option<String>,
    /// Who writes: `fieldManager`, else the client's user-agent name (as the Go server).
    pub(crate) manager: String,
    /// Who asks, when authentication is on (`None`: the server itself, or no
    /// authentication).
    pub(crate) user: Option<Arc<crate::auth::User>>,
    /// The authorizer, for the checks that need the object written (RBAC escalation).
    pub(crate) authz: Option<Arc<authz::Authorizer>>,
}

impl Call {
    /// A call made by the server itself (controllers, scheduler), recorded as `manager`.
    pub(crate) fn internal(
        r: &'static Resource,
        namespace: Option<&str>,
        name: Option<&str>,
        sub: Option<&str>,
        manager: &str,
    ) -> Call {
        Call {
            r,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            params: HashMap::new(),
            accept: String::new(),
            sub: sub.map(str::to_string),
            manager: manager.to_string(),
            user: None,
            authz: None,
        }
    }

    fn param(&self, k: &str) -> Option<&str> {
        self.params
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// How a read is served: `resourceVersion` absent, a consistent read; `0`, any state
    /// this replica has; `N`, a state not older than N.
    fn consistency(&self) -> Consistency {
        match self.param("resourceVersion") {
            Some("0") => Consistency::Local,
            Some(rv) => match rv.parse::<i64>() {
                Ok(n) if n > 0 => Consistency::AtLeast(n),
                _ => Consistency::Linearizable,
            },
            None => Consistency::Linearizable,
        }
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    fn key(&self) -> String {
        self.r.key(self.namespace.as_deref(), self.name())
    }

    /// The writer recorded in `managedFields`.
    fn writer(&self) -> managed::Writer<'_> {
        managed::Writer {
            manager: &self.manager,
            subresource: self.sub.as_deref(),
            api_version: self.r.api_version(),
            time: meta::rfc3339(meta::now_secs()),
        }
    }
}

/// The manager a write is recorded under: `fieldManager`, else the user agent up to its
/// first `/` (as the Go server does), else `unknown`.
/// The authorization verb of a request (kube-apiserver's mapping).
fn verb_of(method: &Method, named: bool, watching: bool, sub: Option<&str>) -> &'static str {
    match (method, named, sub) {
        // Exec upgrades a GET; what it does is create a session.
        (_, _, Some("exec" | "attach" | "portforward")) => "create",
        (&Method::GET | &Method::HEAD, _, _) if watching => "watch",
        (&Method::GET | &Method::HEAD, true, _) => "get",
        (&Method::GET | &Method::HEAD, false, _) => "list",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::PATCH, _, _) => "patch",
        (&Method::DELETE, true, _) => "delete",
        (&Method::DELETE, false, _) => "deletecollection",
        _ => "unknown",
    }
}

fn manager_of(
    params: &HashMap<String, String>,
    user_agent: &str,
    options_kind: &str,
) -> Result<String, KubeError> {
    let manager = match params.get("fieldManager").filter(|m| !m.is_empty()) {
        Some(m) => m.clone(),
        None => {
            let ua: String = user_agent
                .split('/')
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_control())
                .take(managed::MAX_MANAGER_LEN)
                .collect();
            if ua.is_empty() {
                "unknown".to_string()
            } else {
                ua
            }
        }
    };
    if manager.len() > managed::MAX_MANAGER_LEN || manager.chars().any(char::is_control) {
        return Err(KubeError::invalid_options(
            options_kind,
            "fieldManager",
            "Invalid value: must be at most 128 printable characters",
        ));
    }
    Ok(manager)
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(value).expect("JSON serializes")))
        .expect("static response parts are valid")
}

/// Field paths each kind allows in field selectors (besides the metadata ones).
fn field_labels(r: &Resource) -> &'static [&'static str] {
    match r.kind {
        "Namespace" => &["status.phase"],
        "Secret" => &["type"],
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "Node" => &["spec.unschedulable"],
        "Event" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "Service" => &["spec.clusterIP", "spec.type"],
        "Job" => &["status.successful"],
        "ReplicaSet" => &["status.replicas"],
        _ => &[],
    }
}

/// A JSON list written once into its body: `{"kind":…,"apiVersion":…,"metadata":{…},
/// "items":[…]}`. The list metadata comes last in what the caller learns (a page's
/// `continue`), so the items go into the body first and the head is spliced in before them
/// at the end: one buffer, never a second copy of every item (a list of 150,000 pods is
/// ~600 MB).
struct ListBody {
    /// Room for the head, then the items, comma-separated.
    body: Vec<u8>,
    items: usize,
}

/// Bytes kept free before the items for the list's head.
const LIST_HEAD_ROOM: usize = 512;

impl ListBody {
    /// A list body with room for `capacity` bytes of items.
    fn with_capacity(capacity: usize) -> ListBody {
        let mut body = Vec::with_capacity(LIST_HEAD_ROOM + capacity + 2);
        body.resize(LIST_HEAD_ROOM, b' ');
        ListBody { body, items: 0 }
    }

    /// The buffer to write the next item's JSON into (after its comma).
    fn next_item(&mut self) -> &mut Vec<u8> {
        if self.items > 0 {
            self.body.push(b',');
        }
        self.items += 1;
        &mut self.body
    }

    /// The response: the head written in front of the items (in the room kept, or, for a
    /// head that does not fit, by moving the items once).
    fn finish(
        mut self,
        r: &Resource,
        rv: i64,
        token: Option<String>,
        remaining: Option<i64>,
    ) -> Response<Body> {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if let Some(t) = token {
            metadata["continue"] = json!(t);
        }
        if let Some(n) = remaining {
            metadata["remainingItemCount"] = json!(n);
        }
        let head = json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": r.api_version(),
            "metadata": metadata,
        });
        let mut head = serde_json::to_vec(&head).expect("JSON serializes");
        head.pop();
        head.extend_from_slice(b",\"items\":[");
        self.body.extend_from_slice(b"]}");
        let body = if head.len() <= LIST_HEAD_ROOM {
            let start = LIST_HEAD_ROOM - head.len();
            self.body[start..LIST_HEAD_ROOM].copy_from_slice(&head);
            Bytes::from(self.body).slice(start..)
        } else {
            head.extend_from_slice(&self.body[LIST_HEAD_ROOM..]);
            Bytes::from(head)
        };
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(body))
            .expect("static response parts are valid")
    }
}

impl Kube {
    /// A Kubernetes API over `objects`.
    pub fn new(
        objects: Objects,
        shutdown: tokio_util::sync::CancellationToken,
        ranges: services::Ranges,
    ) -> Kube {
        let caches = Arc::new(cache::Caches::new(
            objects.replica().kv().clone(),
            shutdown.clone(),
            cache::DEFAULT_WINDOW,
        ));
        Kube {
            objects,
            shutdown,
            ranges,
            events: watch::EventCache::default(),
            caches,
            metrics: None,
            agent_tls: None,
            authz: None,
            issuer: None,
        }
    }

    /// Counts this API's open watch streams in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Kube {
        self.metrics = Some(metrics);
        self
    }

    /// Keeps `window` changes per cached resource in memory (`--watch-cache-size`; 0: lists
    /// and watches are all served from the store).
    pub fn with_watch_cache(mut self, window: usize) -> Kube {
        self.caches = Arc::new(cache::Caches::new(
            self.objects.replica().kv().clone(),
            self.shutdown.clone(),
            window,
        ));
        self
    }

    /// Issues ServiceAccount tokens with `issuer`.
    pub fn with_token_issuer(mut self, issuer: Option<Arc<satoken::Issuer>>) -> Kube {
        self.issuer = issuer;
        self
    }

    /// `POST serviceaccounts/<name>/token` (`kubectl create token`): a signed token for
    /// the account, valid `spec.expirationSeconds` (600 s to 48 h, default 1 h), for
    /// `spec.audiences` (the API's by default). Stored nowhere.
    async fn token_request(&self, call: &Call, body: Value) -> KubeResult {
        let Some(issuer) = &self.issuer else {
            return Err(KubeError::bad_request(
                "ServiceAccount tokens are not enabled (--service-account-signing-key-file)",
            ));
        };
        let main = Call {
            sub: None,
            ..call.clone()
        };
        let sa = self
            .objects
            .get(&main.key(), Consistency::Linearizable)
            .await?
            .ok_or_else(|| KubeError::not_found(call.r, call.name()))?
            .object;
        let spec = match body.get("spec") {
            None | Some(Value::Null) => json!({}),
            Some(s @ Value::Object(_)) => s.clone(),
            Some(_) => return Err(KubeError::bad_request("spec must be an object")),
        };
        let audiences: Vec<String> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        let seconds = spec
            .get("expirationSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(satoken::DEFAULT_SECONDS);
        if seconds < satoken::MIN_SECONDS {
            return Err(KubeError::invalid(
                call.r,
                call.name(),
                vec![status::Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!(
                        "Invalid value: {seconds}: may not specify a duration less than {} seconds",
                        satoken::MIN_SECONDS
                    ),
                    field: "spec.expirationSeconds".into(),
                }],
            ));
        }
        let seconds = seconds.min(satoken::MAX_SECONDS);
        let uid = sa
            .ptr("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("");
        let (token, exp) = issuer
            .issue(
                call.namespace.as_deref().unwrap_or(""),
                call.name(),
                uid,
                &audiences,
                seconds,
            )
            .map_err(|e| KubeError::internal(e.to_string()))?;
        let mut spec = spec;
        spec["expirationSeconds"] = json!(seconds);
        if audiences.is_empty() {
            spec["audiences"] = json!([issuer.issuer]);
        }
        Ok(json_response(
            StatusCode::CREATED,
            &json!({
                "kind": "TokenRequest",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": call.name(), "namespace": call.namespace, "creationTimestamp": meta::rfc3339(meta::now_secs())},
                "spec": spec,
                "status": {"token": token, "expirationTimestamp": meta::rfc3339(exp.max(0) as u64)},
            }),
        ))
    }

    /// Authorizes every authenticated request with `authz`.
    pub fn with_authorizer(mut self, authz: Option<Arc<authz::Authorizer>>) -> Kube {
        self.authz = authz;
        self
    }

    /// Waits until the API's background tasks (the watch caches' feeders, the node
    /// authorizer's caches) have ended, once the shutdown token has been cancelled.
    pub async fn stopped(&self) {
        self.caches.stopped().await;
        if let Some(a) = &self.authz {
            a.stopped().await;
        }
    }

    /// `POST selfsubjectaccessreviews` (`kubectl auth can-i`): whether the asking user may
    /// do what the review describes, answered at once and stored nowhere.
    async fn self_subject_access_review(&self, call: &Call, body: Value) -> KubeResult {
        let spec = body.get("spec").cloned().unwrap_or(Value::Null);
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let res = spec.get("resourceAttributes");
        let non = spec.get("nonResourceAttributes");
        if res.is_some() == non.is_some() {
            return Err(KubeError::invalid(
                call.r,
                "",
                vec![status::Cause {
                    reason: "FieldValueRequired".into(),
                    message: "Required value: exactly one of nonResourceAttributes or resourceAttributes must be specified".into(),
                    field: "spec.resourceAttributes".into(),
                }],
            ));
        }
        let user = call.user.as_deref();
        let (verb, attrs) = match (res, non) {
            (Some(r), _) => (
                text(r, "verb"),
                Some([
                    text(r, "group"),
                    text(r, "resource"),
                    text(r, "subresource"),
                    text(r, "namespace"),
                    text(r, "name"),
                ]),
            ),
            (None, Some(n)) => (text(n, "verb"), None),
            (None, None) => unreachable!("checked above"),
        };
        let path = non.map(|n| text(n, "path")).unwrap_or_default();
        let decision = match (&self.authz, user) {
            (Some(az), Some(u)) => {
                let a = rbac::Attributes {
                    user: u,
                    verb: &verb,
                    resource: attrs
                        .as_ref()
                        .map(|[g, r, s, ns, n]| rbac::ResourceAttributes {
                            group: g,
                            resource: r,
                            subresource: s,
                            namespace: ns,
                            name: n,
                        }),
                    path: &path,
                };
                az.authorize(&a).await
            }
            // No authentication, no authorization: everything is allowed.
            _ => Ok("no authorization configured".to_string()),
        };
        let mut out = json!({
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": {"allowed": decision.is_ok()},
        });
        // As kube-apiserver: the reason of an allow; a denial by RBAC has none (kubectl
        // prints "no" alone).
        if let Ok(why) = decision {
            out["status"]["reason"] = json!(why);
        }
        Ok(json_response(StatusCode::CREATED, &out))
    }

    /// Reaches agents over TLS with `tls`.
    pub fn with_agent_tls(mut self, tls: Option<Arc<rustls::ClientConfig>>) -> Kube {
        self.agent_tls = tls;
        self
    }

    /// A copy of this API whose writes are fenced to `term` (proposed on this replica only,
    /// refused at apply in any other term): what leader-only work writes through.
    pub fn fenced(&self, term: u64) -> Kube {
        Kube {
            objects: self.objects.fenced(term),
            shutdown: self.shutdown.clone(),
            ranges: self.ranges,
            events: watch::EventCache::default(),
            caches: self.caches.clone(),
            metrics: None,
            agent_tls: self.agent_tls.clone(),
            authz: self.authz.clone(),
            issuer: self.issuer.clone(),
        }
    }

    /// The objects layer (reads for leader-only work).
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Replaces an object (PUT semantics: a compare-and-swap on the body's
    /// `metadata.resourceVersion`), through `call.sub` if set (`status`).
    pub(crate) async fn update_value(&self, call: &Call, body: Value) -> Result<Value, KubeError> {
        let want_rv = body
            .ptr("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        self.modify_object(call, want_rv, false, move |_| Ok(body.clone()))
            .await
    }

    /// Writes `change` applied to the current stored state of the object `call` names (a
    /// read-modify-write that retries on a concurrent write; with `want_rv`, 409 unless the
    /// object is still at that version). For controllers whose cache holds only part of an
    /// object (the pod informer keeps a projection of bound pods): writing back a cached
    /// copy, as a PUT does, would drop the rest.
    pub(crate) async fn update_with<F>(
        &self,
        call: &Call,
        want_rv: Option<String>,
        change: F,
    ) -> Result<Value, KubeError>
    where
        F: Fn(&Value) -> Result<Value, KubeError>,
    {
        self.modify_object(call, want_rv, false, change).await
    }

    /// Bounded metric labels (verb, resource) for a request.
    /// Whether a request streams for as long as the client wants (a watch, a followed log,
    /// an exec session): exempt from the request timeout, recorded when it starts.
    pub fn long_running(method: &Method, path: &str, query: Option<&str>) -> bool {
        let params = query_params(query);
        Self::labels(method, path, query).0 == "watch"
            || path.ends_with("/exec")
            || (path.ends_with("/log") && params.get("follow").map(String::as_str) == Some("true"))
    }

    pub fn labels(
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> (&'static str, &'static str) {
        match route(path) {
            Some(Route::Resource { r, name, sub, .. }) => {
                // Decoded as the handler decodes it (`wat%63h=%74rue` is a watch too): the
                // per-client watch cap and the audit log rely on this.
                let watching = matches!(
                    query_params(query).get("watch").map(String::as_str),
                    Some("true" | "1")
                );
                let verb = match (method, name.is_some()) {
                    (&Method::GET, _) if watching => "watch",
                    (&Method::GET, true) => "get",
                    (&Method::GET, false) => "list",
                    (&Method::POST, _) => "create",
                    (&Method::PUT, _) => "update",
                    (&Method::PATCH, _) => "patch",
                    (&Method::DELETE, true) => "delete",
                    (&Method::DELETE, false) => "deletecollection",
                    _ => "other",
                };
                (
                    verb,
                    if sub.is_some() {
                        "subresource"
                    } else {
                        r.plural
                    },
                )
            }
            Some(_) => ("get", "discovery"),
            None => ("other", "other"),
        }
    }

    /// True for paths this API serves.
    pub fn serves(path: &str) -> bool {
        path == "/version"
            || path == "/api"
            || path == "/apis"
            || path.starts_with("/api/")
            || path.starts_with("/apis/")
            || path.starts_with("/openapi/")
    }

    /// Handles one request; every failure is a `Status`.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match self.dispatch(req).await {
            Ok(r) => r,
            Err(e) => {
                if e.code >= 500 && e.code != 503 && e.code != 504 {
                    tracing::warn!(code = e.code, message = %e.message, "kubernetes API request failed");
                }
                e.response()
            }
        }
    }

    async fn dispatch(self: &Arc<Self>, req: Request<Incoming>) -> KubeResult {
        let method = req.method().clone();
        // Who asks (set by the gateway when authentication is on) and who decides.
        let user = req
            .extensions()
            .get::<crate::auth::User>()
            .cloned()
            .map(Arc::new);
        let authz = self.authz.clone().filter(|_| user.is_some());
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let route = route(req.uri().path()).ok_or_else(KubeError::no_route)?;
        let params = query_params(req.uri().query());
        let get_only = |resp: KubeResult| -> KubeResult {
            if method == Method::GET {
                resp
            } else {
                Err(KubeError::method_not_allowed(method.as_str()))
            }
        };
        if let (Some(u), Some(az), false) = (&user, &authz, matches!(route, Route::Resource { .. }))
        {
            let a = rbac::Attributes {
                user: u,
                verb: &method.as_str().to_ascii_lowercase(),
                resource: None,
                path: req.uri().path(),
            };
            az.authorize(&a)
                .await
                .map_err(|why| KubeError::forbidden_path(format!("forbidden: {why}")))?;
        }
        match route {
            Route::Version => get_only(Ok(discovery::version())),
            Route::Root { core } => get_only(Ok(discovery::root(core, &accept))),
            Route::Group(g) => get_only(discovery::group(&g)),
            Route::GroupVersion(g, v) => get_only(discovery::group_version(&g, &v)),
            Route::OpenApiIndex => get_only(Ok(discovery::openapi_index())),
            Route::OpenApiDoc(p) => get_only(discovery::openapi_doc(&p)),
            Route::Resource {
                r,
                namespace,
                name,
                sub,
            } => {
                if namespace.is_some() && !r.namespaced {
                    return Err(KubeError::no_route());
                }
                if let Some(sub) = &sub {
                    if !r.subresources.contains(&sub.as_str()) {
                        return Err(KubeError::no_route());
                    }
                }
                let content_type = req
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let user_agent = req
                    .headers()
                    .get(header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let options_kind = match method {
                    Method::POST => "CreateOptions",
                    Method::PUT => "UpdateOptions",
                    Method::PATCH => "PatchOptions",
                    _ => "DeleteOptions",
                };
                let manager = manager_of(&params, user_agent, options_kind)?;
                let call = Call {
                    r,
                    namespace,
                    name,
                    params,
                    accept,
                    sub,
                    manager,
                    user,
                    authz,
                };
                let watching = matches!(call.param("watch"), Some("true" | "1"));
                if let (Some(u), Some(az)) = (&call.user, &call.authz) {
                    let verb = verb_of(&method, call.name.is_some(), watching, call.sub.as_deref());
                    let a = rbac::Attributes {
                        user: u,
                        verb,
                        resource: Some(rbac::ResourceAttributes {
                            group: r.group,
                            resource: r.plural,
                            subresource: call.sub.as_deref().unwrap_or(""),
                            namespace: call.namespace.as_deref().unwrap_or(""),
                            name: call.name.as_deref().unwrap_or(""),
                        }),
                        path: "",
                    };
                    if let Err(why) = az.authorize(&a).await {
                        return Err(KubeError::forbidden(
                            r,
                            call.name.as_deref().unwrap_or(""),
                            format!(
                                "{} is forbidden: {why}",
                                match &call.name {
                                    Some(n) => format!("{} {n:?}", r.qualified()),
                                    None => r.qualified(),
                                }
                            ),
                        ));
                    }
                }
                if resources::is_review(r) {
                    return match (&method, call.name.is_some()) {
                        (&Method::POST, false) => {
                            let body =
                                read_json(req.into_body(), &content_type, JSON_OR_YAML).await?;
                            self.self_subject_access_review(&call, body).await
                        }
                        (m, _) => Err(KubeError::method_not_allowed(m.as_str())),
                    };
                }
                match (&method, call.name.is_some(), call.sub.as_deref()) {
                    (&Method::POST, true, Some("binding")) => {
                        let body = read_json(req.into_body(), &content_type, JSON_OR_YAML).await?;
                        self.bind(&call, body).await
                    }
                    (_, _, Some("binding")) => Err(KubeError::method_not_allowed(method.as_str())),
                    (&Method::POST, true, Some("token")) => {
                        let body = read_json(req.into_body(), &content_type, JSON_OR_YAML).await?;
                        self.token_request(&call, body).await
                    }
                    (_, _, Some("token")) => Err(KubeError::method_not_allowed(method.as_str())),
                    (&Method::POST, true, Some("eviction")) => {
                        let body = read_json(req.into_body(), &content_type, JSON_OR_YAML).await?;
                        self.evict(&call, body).await
                    }
                    (_, _, Some("eviction")) => Err(KubeError::method_not_allowed(method.as_str())),
                    (&Method::GET | &Method::POST, true, Some("exec")) => {
                        self.pod_exec(&call, req).await
                    }
                    (_, _, Some("exec")) => Err(KubeError::method_not_allowed(method.as_str())),
                    (&Method::GET, true, Some("log")) => self.pod_log(&call).await,
                    (_, _, Some("log")) => Err(KubeError::method_not_allowed(method.as_str())),
                    (&Method::GET, true, Some("scale")) => self.scale(&call, None).await,
                    (&Method::PUT, true, Some("scale")) => {
                        let body = read_json(req.into_body(), &content_type, JSON_OR_YAML).await?;
                        self.scale(&call, Some((None, body))).await
                    }
                    (&Method::PATCH, true, Some("scale")) => {
                        let kind = patch_kind(&content_type)?;
                        let body = read_json(req.into_body(), patch_media(kind), &[]).await?;
                        self.scale(&call, Some((Some(kind), body))).await
                    }
                    (_, _, Some("scale")) => Err(KubeError::method_not_allowed(method.as_str())),
                    (&Method::GET, true, _) if watching => {
                        Err(KubeError::method_not_allowed("GET"))
                    }
                    (&Method::GET, true, _) => self.get(&call).await,
                    (&Method::GET, false, _) if watching => watch::serve(self.clone(), call).await,
                    (&Method::GET, false, _) => self.list(&call).await,
                    (&Method::POST, false, _) => {
                        let body = read_json(req.into_body(), &content_type, JSON_OR_YAML).await?;
                        self.create(&call, body).await
                    }
                    (&Method::PUT, true, _) => {
                        let body = read_json(req.into_body(), &content_type, JSON_OR_YAML).await?;
                        self.update(&call, body).await
                    }
                    (&Method::PATCH, true, _) => {
                        let kind = patch_kind(&content_type)?;
                        let body = read_json(req.into_body(), patch_media(kind), &[]).await?;
                        self.patch(&call, kind, body).await
                    }
                    (&Method::DELETE, true, None) => {
                        let body = read_optional_json(req.into_body()).await?;
                        let options = delete_options(&call, body)?;
                        self.delete(&call, options).await
                    }
                    (&Method::DELETE, false, None) => self.delete_collection(&call).await,
                    (m, _, _) => Err(KubeError::method_not_allowed(m.as_str())),
                }
            }
        }
    }

    // ---- reads ----

    async fn get(&self, call: &Call) -> KubeResult {
        let stored = self
            .objects
            .get(&call.key(), call.consistency())
            .await?
            .ok_or_else(|| KubeError::not_found(call.r, call.name()))?;
        Ok(self.render_one(call, &stored))
    }

    fn render_one(&self, call: &Call, stored: &Stored) -> Response<Body> {
        if table::wants_table(&call.accept) {
            let include = table::Include::parse(call.param("includeObject"));
            let rv = stored.revision.to_string();
            return json_response(
                StatusCode::OK,
                &table::table(
                    call.r,
                    std::slice::from_ref(&stored.object),
                    include,
                    &rv,
                    None,
                ),
            );
        }
        json_response(StatusCode::OK, &stored.object)
    }

    /// The key range of a list: one namespace, or all of them.
    fn list_range(call: &Call) -> (String, Vec<u8>) {
        let start = match &call.namespace {
            Some(ns) => format!("{}{ns}/", call.r.prefix()),
            None => call.r.prefix(),
        };
        let end = objects::prefix_end(start.as_bytes());
        (start, end)
    }

    /// Lists matching objects at one revision. Returns them, the revision, and the continue
    /// token if `limit` cut the list short.
    pub(crate) async fn list_objects(
        &self,
        call: &Call,
    ) -> Result<(Vec<Value>, i64, Option<String>, Option<i64>), KubeError> {
        let mut items = Vec::new();
        let (rev, token, remaining) = self.list_each(call, true, |o| items.push(o)).await?;
        Ok((items, rev, token, remaining))
    }

    /// Lists matching objects at one revision from the store, never the watch cache (what
    /// a watch the cache could not serve starts from).
    pub(crate) async fn list_from_store(
        &self,
        call: &Call,
    ) -> Result<(Vec<Value>, i64), KubeError> {
        let mut items = Vec::new();
        let (rev, _, _) = self.list_each(call, false, |o| items.push(o)).await?;
        Ok((items, rev))
    }

    /// The revision a read from a watch cache must wait for: none for `resourceVersion=0`,
    /// N for `resourceVersion=N`, else the replica's revision after a read barrier (every
    /// acknowledged write).
    pub(crate) async fn cache_target(&self, c: Consistency) -> Result<i64, KubeError> {
        Ok(match c {
            Consistency::Local => 0,
            Consistency::AtLeast(rv) => rv,
            Consistency::Linearizable => {
                self.objects.replica().read_barrier().await?;
                self.objects.replica().kv().revision()
            }
        })
    }

    /// A whole list (no `limit`, no `continue`) from the resource's watch cache, once the
    /// cache holds what the request's consistency requires (without `resourceVersion`:
    /// every write acknowledged before it; with N: revision N). Also says whether the node
    /// index already applied the selectors (nothing left to check). `Store`: the store
    /// serves it (not cached, a page, or a consistent list the cache did not catch up with
    /// in time: then with one of the bounded permits for that, held while it is read).
    /// Refused: a cache still loading (429), a `resourceVersion` the cache did not reach in
    /// time (504, too large), no permit left (429).
    async fn cached_list(
        &self,
        call: &Call,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<FromCache, KubeError> {
        if call.param("limit").is_some_and(|l| l != "0") || call.param("continue").is_some() {
            return Ok(FromCache::Store(None));
        }
        let Some(c) = self.caches.get(call.r) else {
            return Ok(FromCache::Store(None));
        };
        let target = self.cache_target(call.consistency()).await?;
        let (mut start, mut end) = Self::list_range(call);
        if let Some(name) = fields.name() {
            if call.namespace.is_some() || !call.r.namespaced {
                start = call.r.key(call.namespace.as_deref(), name);
                // [key, key + NUL): the key alone.
                end = format!("{start}\u{0}").into_bytes();
            }
        }
        let (filter, by_index) = c.filter(start.into_bytes(), end, labels, fields);
        let listed = match c.wait_for(target).await {
            true => c.list(&filter),
            false => None,
        };
        let decided = match listed {
            Some(l) => Ok(FromCache::Served(l, by_index)),
            None if !c.loaded() => Err(KubeError::initializing()),
            None => match call.consistency() {
                Consistency::AtLeast(rv) => {
                    Err(KubeError::too_large_resource_version(rv, c.revision()))
                }
                _ => match self.caches.behind_permit() {
                    Some(p) => Ok(FromCache::Store(Some(p))),
                    None => Err(KubeError::too_many_requests(watch::BEHIND_MESSAGE.into())),
                },
            },
        };
        // Refusals are counted by their status code, not here.
        if let (Some(m), Ok(d)) = (&self.metrics, &decided) {
            let from = match d {
                FromCache::Served(..) => "cache",
                FromCache::Store(_) => "store",
            };
            m.watch_cache_served("list", from);
        }
        decided
    }

    /// Hands each matching object of a list to `sink`, reading the store in chunks of at
    /// most [`LIST_CHUNK`] keys at one revision, so a large list never holds more than a
    /// chunk of decoded objects. Returns the revision, the continue token if `limit` cut the
    /// list short, and the count of the rest when known.
    async fn list_each<F: FnMut(Value)>(
        &self,
        call: &Call,
        use_cache: bool,
        mut sink: F,
    ) -> Result<(i64, Option<String>, Option<i64>), KubeError> {
        let labels = LabelSelector::parse(call.param("labelSelector").unwrap_or(""))?;
        let fields = FieldSelector::parse(
            call.param("fieldSelector").unwrap_or(""),
            field_labels(call.r),
        )?;
        let mut _permit = None;
        if use_cache {
            match self.cached_list(call, &labels, &fields).await? {
                FromCache::Served((items, rev), _) => {
                    for (raw, at) in items {
                        let o = objects::parse(&raw, at)?;
                        if labels.matches(&o) && fields.matches(&o) {
                            sink(o);
                        }
                    }
                    return Ok((rev, None, None));
                }
                FromCache::Store(p) => _permit = p,
            }
        }
        let limit: i64 = match call.param("limit") {
            Some(l) => l
                .parse()
                .ok()
                .filter(|l: &i64| *l >= 0)
                .ok_or_else(|| KubeError::bad_request(format!("invalid limit {l:?}")))?,
            None => 0,
        };
        let (mut start, end) = Self::list_range(call);
        // A field selector that pins the name narrows the range to one key.
        let mut end = end;
        if let Some(name) = fields.name() {
            if call.namespace.is_some() || !call.r.namespaced {
                start = call.r.key(call.namespace.as_deref(), name);
                end = Vec::new();
            }
        }
        let mut revision = 0;
        let mut consistency = call.consistency();
        if let Some(token) = call.param("continue") {
            let (rv, from) = decode_continue(token)?;
            if !from.starts_with(&start) {
                return Err(KubeError::bad_request(
                    "continue token does not belong to this list",
                ));
            }
            revision = rv;
            start = from;
            consistency = Consistency::Local;
        }
        let filtered = !labels.is_empty() || fields != FieldSelector::default();
        // A whole list by node name (what every node agent asks for) decodes only the
        // objects whose bytes can match. Pages (`limit`) keep the plain path, whose
        // counting of examined objects the continue token relies on.
        let needle = if limit == 0 { fields.prefilter() } else { None };
        // Unfiltered, one read of `limit` keys is the page; filtered, read in chunks until
        // `limit` objects match or the range ends. Never more than LIST_CHUNK keys at once.
        let chunk = match (filtered, limit) {
            (_, 0) => LIST_CHUNK,
            (true, l) => l.max(100),
            (false, l) => l,
        }
        .min(LIST_CHUNK);
        let mut sent: i64 = 0;
        let mut at = revision;
        let mut cursor = start.into_bytes();
        loop {
            let (batch, rev, remaining, last_read) = self
                .objects
                .range_containing(&cursor, &end, at, chunk, consistency, needle.as_deref())
                .await
                .map_err(|e| match e.code {
                    410 if revision > 0 => KubeError {
                        message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results.".into(),
                        ..e
                    },
                    _ => e,
                })?;
            at = rev;
            consistency = Consistency::Local;
            let n = batch.len();
            let mut last_key = None;
            let mut examined = 0;
            for s in batch {
                examined += 1;
                if needle.is_none() {
                    last_key = Some(objects_key(&s, call));
                }
                if labels.matches(&s.object) && fields.matches(&s.object) {
                    sink(s.object);
                    sent += 1;
                    if limit > 0 && sent == limit {
                        break;
                    }
                }
            }
            if needle.is_some() {
                // Objects were skipped unread: go on from the last key read.
                last_key = last_read.map(|k| String::from_utf8_lossy(&k).into_owned());
            }
            let Some(last_key) = last_key else {
                return Ok((at, None, None));
            };
            if limit > 0 && sent == limit {
                let more = examined < n || remaining > 0;
                let token = more.then(|| encode_continue(at, &format!("{last_key}\u{0}")));
                // Unfiltered, the rest is what the store counted past this chunk plus the part
                // of the chunk not sent.
                let count = (more && !filtered).then_some(remaining + (n - examined) as i64);
                return Ok((at, token, count));
            }
            if remaining == 0 {
                return Ok((at, None, None));
            }
            cursor = format!("{last_key}\u{0}").into_bytes();
        }
    }

    async fn list(&self, call: &Call) -> KubeResult {
        if table::wants_table(&call.accept) {
            let include = table::Include::parse(call.param("includeObject"));
            let now = meta::now_secs();
            let mut rows = Vec::new();
            let r = call.r;
            let (rv, token, _) = self
                .list_each(call, true, |o| rows.push(table::row(r, &o, include, now)))
                .await?;
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if let Some(t) = token {
                metadata["continue"] = json!(t);
            }
            let table = json!({
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "columnDefinitions": table::columns(r),
                "rows": Value::Array(rows),
            });
            return Ok(json_response(StatusCode::OK, &table));
        }
        let labels = LabelSelector::parse(call.param("labelSelector").unwrap_or(""))?;
        let fields = FieldSelector::parse(
            call.param("fieldSelector").unwrap_or(""),
            field_labels(call.r),
        )?;
        // From the watch cache, an object the selectors need not look into is sent as
        // stored (its resourceVersion stamped in), unparsed.
        let _permit = match self.cached_list(call, &labels, &fields).await? {
            FromCache::Store(p) => p,
            FromCache::Served((listed, rev), by_index) => {
                let unfiltered = by_index || (labels.is_empty() && fields.is_empty());
                // Sent whole, the items are about their stored size (plus resourceVersions).
                let capacity = match unfiltered {
                    true => listed.iter().map(|(raw, _)| raw.len() + 40).sum(),
                    false => 0,
                };
                let mut list = ListBody::with_capacity(capacity);
                for (raw, at) in listed {
                    let json = match unfiltered {
                        true => objects::json_with_resource_version(&raw, at)?,
                        false => {
                            let o = objects::parse(&raw, at)?;
                            if !(labels.matches(&o) && fields.matches(&o)) {
                                continue;
                            }
                            serde_json::to_vec(&o)
                                .map_err(|e| KubeError::internal(format!("encoding a list: {e}")))?
                        }
                    };
                    list.next_item().extend_from_slice(&json);
                }
                return Ok(list.finish(call.r, rev, None, None));
            }
        };
        // Items are serialized as they are read, so the list costs its encoded size, not a
        // decoded copy of every object. (The cache has had its say: the store serves it.)
        let mut list = ListBody::with_capacity(0);
        let mut failed = None;
        let (rv, token, remaining) = self
            .list_each(call, false, |o| {
                if let Err(e) = serde_json::to_writer(list.next_item(), &o) {
                    failed = Some(e);
                }
            })
            .await?;
        if let Some(e) = failed {
            return Err(KubeError::internal(format!("encoding a list: {e}")));
        }
        Ok(list.finish(call.r, rv, token, remaining))
    }

    // ---- writes ----

    /// Checks that the namespace of a namespaced write exists and is not terminating.
    async fn check_namespace(&self, call: &Call) -> Result<(), KubeError> {
        let Some(ns) = call.namespace.as_deref().filter(|_| call.r.namespaced) else {
            return Ok(());
        };
        let ns_res = resources::find("", "v1", "namespaces").expect("namespaces are served");
        let key = ns_res.key(None, ns);
        // This replica's copy first; a miss is confirmed by a linearizable read (as the
        // NamespaceLifecycle plugin's live lookup), so a namespace whose create was just
        // acknowledged, through another replica, is never reported missing.
        let stored = match self.objects.get(&key, Consistency::Local).await? {
            Some(s) => s,
            None => self
                .objects
                .get(&key, Consistency::Linearizable)
                .await?
                .ok_or_else(|| KubeError::not_found(ns_res, ns))?,
        };
        if stored.object.ptr("/status/phase").and_then(Value::as_str) == Some("Terminating") {
            return Err(KubeError::forbidden(
                call.r,
                call.name(),
                format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    call.r.qualified(),
                    call.name()
                ),
            ));
        }
        Ok(())
    }

    async fn create(&self, call: &Call, body: Value) -> KubeResult {
        self.create_object(call, body, false).await
    }

    /// Creates an object; `applied` when it comes from a server-side apply, which has
    /// recorded its managed fields already.
    async fn create_object(&self, call: &Call, body: Value, applied: bool) -> KubeResult {
        let obj = self.create_value(call, body, applied).await?;
        Ok(json_response(StatusCode::CREATED, &obj))
    }

    /// Creates an object; returns it as stored.
    pub(crate) async fn create_value(
        &self,
        call: &Call,
        body: Value,
        applied: bool,
    ) -> Result<Value, KubeError> {
        let mut obj = body;
        let strict = call.param("fieldValidation") == Some("Strict");
        normalize_new(call, &mut obj, strict)?;
        if !applied {
            managed::record_update(None, &mut obj, &call.writer())?;
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let call = Call {
            name: Some(name.clone()),
            params: call.params.clone(),
            namespace: call.namespace.clone(),
            accept: call.accept.clone(),
            r: call.r,
            sub: None,
            manager: call.manager.clone(),
            user: None,
            authz: None,
        };
        self.check_namespace(&call).await?;
        let stored = if call.r.kind == "Service" {
            self.create_service(&call, &name, obj).await?
        } else {
            self.objects
                .create(call.r, &call.key(), &name, &obj)
                .await?
        };
        Ok(stored.object)
    }

    /// Creates a Service with its cluster IP and node ports taken in the same transaction;
    /// randomly drawn addresses that turn out taken are drawn again.
    async fn create_service(
        &self,
        call: &Call,
        name: &str,
        body: Value,
    ) -> Result<Stored, KubeError> {
        for _ in 0..32 {
            let mut obj = body.clone();
            let requested = services::assign(&mut obj, None, &self.ranges)
                .map_err(|causes| KubeError::invalid(call.r, name, causes))?;
            let claims = objects::Claims {
                take: services::claims_of(&obj),
                release: vec![],
            };
            match self
                .objects
                .create_claiming(&call.key(), &obj, &claims)
                .await?
            {
                Ok(s) => return Ok(s),
                Err(objects::Refused::Exists(_)) => {
                    return Err(KubeError::already_exists(call.r, name))
                }
                Err(objects::Refused::Taken(k)) => {
                    if was_requested(&requested, &k) {
                        return Err(services::taken(call.r, name, &k));
                    }
                }
            }
        }
        Err(KubeError::internal(
            "could not find a free service address after 32 draws",
        ))
    }

    /// Ensures the system namespaces exist (run by the leader after it is elected).
    pub async fn ensure_system_namespaces(&self) -> Result<(), KubeError> {
        // The default roles first: a cluster whose namespaces exist has them.
        self.ensure_default_rbac().await?;
        let ns = resources::find("", "v1", "namespaces").expect("served");
        for name in SYSTEM_NAMESPACES {
            let mut obj =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            let call = Call {
                r: ns,
                namespace: None,
                name: None,
                params: HashMap::new(),
                accept: String::new(),
                sub: None,
                manager: "flotilla".into(),
                user: None,
                authz: None,
            };
            normalize_new(&call, &mut obj, false)?;
            managed::record_update(None, &mut obj, &call.writer())?;
            match self
                .objects
                .create(ns, &ns.key(None, name), name, &obj)
                .await
            {
                Ok(_) => {}
                Err(e) if e.reason == "AlreadyExists" => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Creates the default ClusterRoles and ClusterRoleBindings that are missing (never
    /// changing one that exists: an administrator's edits stand).
    pub async fn ensure_default_rbac(&self) -> Result<(), KubeError> {
        // All at once: the proposals share a few Raft rounds instead of one each.
        let creates = rbac::defaults_aggregated()
            .into_iter()
            .map(|mut obj| async move {
                let plural = match obj["kind"].as_str() {
                    Some("ClusterRole") => "clusterroles",
                    _ => "clusterrolebindings",
                };
                let r = resources::find(rbac::GROUP, "v1", plural).expect("served");
                let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
                let call = Call::internal(r, None, None, None, "flotilla");
                normalize_new(&call, &mut obj, false)?;
                managed::record_update(None, &mut obj, &call.writer())?;
                match self
                    .objects
                    .create(r, &r.key(None, &name), &name, &obj)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.reason == "AlreadyExists" => Ok(()),
                    Err(e) => Err(e),
                }
            });
        for r in futures::future::join_all(creates).await {
            r?;
        }
        Ok(())
    }

    async fn update(&self, call: &Call, body: Value) -> KubeResult {
        let strict = call.param("fieldValidation") == Some("Strict");
        let want_rv = body
            .ptr("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let body_name = body
            .ptr("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if body_name != call.name() {
            return Err(KubeError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({})",
                call.name()
            )));
        }
        self.modify(call, want_rv, strict, move |_current| Ok(body.clone()))
            .await
    }

    async fn patch(&self, call: &Call, kind: PatchKind, patch: Value) -> KubeResult {
        let strict = call.param("fieldValidation") == Some("Strict");
        if kind == PatchKind::Apply {
            if call.param("fieldManager").is_none() {
                return Err(KubeError::invalid(
                    call.r,
                    call.name(),
                    vec![Cause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value: is required for apply patch".into(),
                        field: "fieldManager".into(),
                    }],
                ));
            }
            return self.apply(call, patch, strict).await;
        }
        if call.param("force").is_some() {
            return Err(KubeError::invalid_options(
                "PatchOptions",
                "force",
                "Forbidden: may not be specified for non-apply patch",
            ));
        }
        let want_rv = patch
            .ptr("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        self.modify(call, want_rv, strict, move |current| {
            let mut next = current.clone();
            match kind {
                PatchKind::Merge => patch::merge(&mut next, &patch),
                PatchKind::Strategic | PatchKind::Apply => patch::strategic(&mut next, &patch),
                PatchKind::Json => patch::json_patch(&mut next, &patch)
                    .map_err(|e| KubeError::invalid_patch(e.to_string()))?,
            }
            Ok(next)
        })
        .await
    }

    /// Server-side apply: the configuration is merged into the object (created if absent)
    /// with field ownership and conflict detection ([`managed::apply`]).
    async fn apply(&self, call: &Call, config: Value, strict: bool) -> KubeResult {
        let Some(map) = config.as_object() else {
            return Err(KubeError::bad_request("an apply patch must be an object"));
        };
        check_kind(call.r, map)?;
        if map
            .get("kind")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            || map
                .get("apiVersion")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            return Err(KubeError::bad_request(
                "an apply patch must set apiVersion and kind",
            ));
        }
        match config.ptr("/metadata/name").and_then(Value::as_str) {
            Some(n) if n == call.name() => {}
            Some(n) => {
                return Err(KubeError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({})",
                    call.name()
                )))
            }
            None => {
                return Err(KubeError::bad_request(
                    "an apply patch must name the object",
                ))
            }
        }
        let force = matches!(call.param("force"), Some("true" | "1"));
        let want_rv = config
            .ptr("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        for _ in 0..MAX_CAS_RETRIES {
            let exists = self
                .objects
                .get(&call.key(), Consistency::Linearizable)
                .await?
                .is_some();
            if !exists {
                if want_rv.is_some() {
                    return Err(KubeError::not_found(call.r, call.name()));
                }
                let mut obj = managed::apply(None, &config, &call.writer(), force)?;
                if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                match self.create_object(call, obj, true).await {
                    Err(e) if e.reason == "AlreadyExists" => continue,
                    other => return other,
                }
            }
            let writer = call.writer();
            let result = self
                .modify_object_as(call, want_rv.clone(), strict, false, |current| {
                    managed::apply(Some(current), &config, &writer, force)
                })
                .await;
            match result {
                Err(e) if e.reason == "NotFound" && want_rv.is_none() => continue,
                other => return Ok(json_response(StatusCode::OK, &other?)),
            }
        }
        Err(KubeError::conflict(call.r, call.name()))
    }

    /// Read-modify-write with a compare-and-swap on the revision read, retried when another
    /// writer got in between (unless the caller pinned a resourceVersion).
    async fn modify<F>(
        &self,
        call: &Call,
        want_rv: Option<String>,
        strict: bool,
        change: F,
    ) -> KubeResult
    where
        F: Fn(&Value) -> Result<Value, KubeError>,
    {
        let obj = self.modify_object(call, want_rv, strict, change).await?;
        Ok(json_response(StatusCode::OK, &obj))
    }

    /// The read-modify-write behind [`Kube::modify`]; returns the resulting object.
    async fn modify_object<F>(
        &self,
        call: &Call,
        want_rv: Option<String>,
        strict: bool,
        change: F,
    ) -> Result<Value, KubeError>
    where
        F: Fn(&Value) -> Result<Value, KubeError>,
    {
        self.modify_object_as(call, want_rv, strict, true, change)
            .await
    }

    /// [`Kube::modify_object`], recording the write in `managedFields` as an update when
    /// `record` (an apply records its own).
    async fn modify_object_as<F>(
        &self,
        call: &Call,
        want_rv: Option<String>,
        strict: bool,
        record: bool,
        change: F,
    ) -> Result<Value, KubeError>
    where
        F: Fn(&Value) -> Result<Value, KubeError>,
    {
        let key = call.key();
        let mut current = self
            .objects
            .get(&key, Consistency::Linearizable)
            .await?
            .ok_or_else(|| KubeError::not_found(call.r, call.name()))?;
        for _ in 0..MAX_CAS_RETRIES {
            if let Some(rv) = &want_rv {
                if *rv != current.revision.to_string() {
                    return Err(KubeError::conflict(call.r, call.name()));
                }
            }
            let mut next = change(&current.object)?;
            normalize_update(call, &current.object, &mut next, strict)?;
            if record {
                managed::record_update(Some(&current.object), &mut next, &call.writer())?;
            }
            let mut claims = objects::Claims::default();
            let mut requested = services::Requested::default();
            if call.r.kind == "Service" && call.sub.is_none() {
                requested = services::assign(&mut next, Some(&current.object), &self.ranges)
                    .map_err(|causes| KubeError::invalid(call.r, call.name(), causes))?;
                let before = services::claims_of(&current.object);
                let after = services::claims_of(&next);
                claims.take = after
                    .iter()
                    .filter(|k| !before.contains(k))
                    .cloned()
                    .collect();
                claims.release = before
                    .iter()
                    .filter(|k| !after.contains(k))
                    .cloned()
                    .collect();
            }
            if next == current.object && !current.stale {
                // Nothing changed: no write, no new revision, no event (unless the stored
                // bytes need rewriting under the current encryption key).
                return Ok(current.object);
            }
            // The last finalizer of an object being deleted went: the object goes.
            let finalize = is_deleting(&next)
                && all_finalizers(&next).is_empty()
                && !all_finalizers(&current.object).is_empty();
            if finalize {
                let release = release_keys(call.r, &current.object);
                match self
                    .objects
                    .delete_releasing(&key, current.revision, &release)
                    .await?
                {
                    Ok(()) => return Ok(next),
                    Err(Some(now)) => current = now,
                    Err(None) => return Err(KubeError::not_found(call.r, call.name())),
                }
                continue;
            }
            match self
                .objects
                .replace_claiming(&key, current.revision, next, &claims)
                .await?
            {
                Ok(stored) => return Ok(stored.object),
                Err(objects::Refused::Exists(Some(now))) => current = now,
                Err(objects::Refused::Exists(None)) => {
                    return Err(KubeError::not_found(call.r, call.name()))
                }
                Err(objects::Refused::Taken(k)) => {
                    if was_requested(&requested, &k) {
                        return Err(services::taken(call.r, call.name(), &k));
                    }
                }
            }
        }
        Err(KubeError::conflict(call.r, call.name()))
    }

    async fn delete(&self, call: &Call, options: Option<Value>) -> KubeResult {
        let obj = self.delete_value(call, options).await?;
        Ok(json_response(StatusCode::OK, &obj))
    }

    /// Deletes (or marks for deletion) one object; returns it as it was last stored.
    pub(crate) async fn delete_value(
        &self,
        call: &Call,
        options: Option<Value>,
    ) -> Result<Value, KubeError> {
        let key = call.key();
        if call.r.kind == "Namespace"
            && ["default", "kube-system", "kube-public"].contains(&call.name())
        {
            return Err(KubeError::forbidden(
                call.r,
                call.name(),
                format!(
                    "namespaces \"{}\" is forbidden: this namespace may not be deleted",
                    call.name()
                ),
            ));
        }
        let preconditions = options
            .as_ref()
            .and_then(|o| o.get("preconditions"))
            .cloned();
        let mut current = self
            .objects
            .get(&key, Consistency::Linearizable)
            .await?
            .ok_or_else(|| KubeError::not_found(call.r, call.name()))?;
        for _ in 0..MAX_CAS_RETRIES {
            check_preconditions(call, &current.object, preconditions.as_ref())?;
            if call.r.kind == "Namespace" {
                return self.delete_namespace(call, current).await;
            }
            if let Some(grace) = pod_grace(&current.object, options.as_ref()) {
                // Graceful pod deletion: the pod is marked and stays until its node's agent
                // has stopped it (and deletes it with grace 0). A shorter grace period may
                // shorten a deletion already under way; nothing lengthens it.
                let now = meta::now_secs();
                let already = current
                    .object
                    .ptr("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_i64);
                if already.is_some_and(|g| g <= grace) {
                    return Ok(current.object.clone());
                }
                let mut next = current.object.clone();
                next["metadata"]["deletionTimestamp"] = json!(meta::rfc3339(now + grace as u64));
                next["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                match self.objects.replace(&key, current.revision, next).await? {
                    Ok(stored) => return Ok(stored.object),
                    Err(Some(now)) => current = now,
                    Err(None) => return Err(KubeError::not_found(call.r, call.name())),
                }
                continue;
            }
            if let Some(f) = propagation_finalizer(options.as_ref())? {
                // Foreground: the garbage collector deletes the dependents first, then
                // removes the finalizer. Orphan: it releases them, then removes it.
                if is_deleting(&current.object) {
                    return Ok(current.object.clone());
                }
                let mut next = current.object.clone();
                let mut fins = finalizers(&next);
                if !fins.contains(&json!(f)) {
                    fins.push(json!(f));
                }
                next["metadata"]["finalizers"] = json!(fins);
                next["metadata"]["deletionTimestamp"] = json!(meta::rfc3339(meta::now_secs()));
                next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                match self.objects.replace(&key, current.revision, next).await? {
                    Ok(stored) => return Ok(stored.object),
                    Err(Some(now)) => current = now,
                    Err(None) => return Err(KubeError::not_found(call.r, call.name())),
                }
                continue;
            }
            if !finalizers(&current.object).is_empty() {
                // Kubernetes semantics: mark for deletion; the object goes when its finalizers do.
                if is_deleting(&current.object) {
                    return Ok(current.object.clone());
                }
                let mut next = current.object.clone();
                next["metadata"]["deletionTimestamp"] = json!(meta::rfc3339(meta::now_secs()));
                next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                match self.objects.replace(&key, current.revision, next).await? {
                    Ok(stored) => return Ok(stored.object),
                    Err(Some(now)) => current = now,
                    Err(None) => return Err(KubeError::not_found(call.r, call.name())),
                }
                continue;
            }
            let release = release_keys(call.r, &current.object);
            match self
                .objects
                .delete_releasing(&key, current.revision, &release)
                .await?
            {
                Ok(()) => return Ok(current.object.clone()),
                Err(Some(now)) => current = now,
                Err(None) => return Err(KubeError::not_found(call.r, call.name())),
            }
        }
        Err(KubeError::conflict(call.r, call.name()))
    }

    /// Marks the namespace `Terminating`: new content is refused from then on, and the
    /// namespace controller (on the leader) deletes everything in it and then removes its
    /// `kubernetes` finalizer, which deletes the namespace. A namespace without finalizers
    /// goes at once.
    async fn delete_namespace(&self, call: &Call, current: Stored) -> Result<Value, KubeError> {
        let key = call.key();
        let name = call.name().to_string();
        if all_finalizers(&current.object).is_empty() {
            return match self.objects.delete(&key, current.revision).await? {
                Ok(()) => Ok(current.object),
                Err(_) => Err(KubeError::conflict(call.r, &name)),
            };
        }
        if is_deleting(&current.object) {
            return Ok(current.object);
        }
        let mut marked = current.object.clone();
        marked["status"]["phase"] = json!("Terminating");
        marked["metadata"]["deletionTimestamp"] = json!(meta::rfc3339(meta::now_secs()));
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        match self.objects.replace(&key, current.revision, marked).await? {
            Ok(s) => Ok(s.object),
            Err(_) => Err(KubeError::conflict(call.r, &name)),
        }
    }

    /// `POST pods/<name>/eviction` (policy/v1 Eviction): a delete that disruption budgets may
    /// refuse (none are served yet, so none refuse), with the eviction's `deleteOptions`.
    async fn evict(&self, call: &Call, body: Value) -> KubeResult {
        if let Some(k) = body.get("kind").and_then(Value::as_str) {
            if k != "Eviction" {
                return Err(KubeError::bad_request(format!(
                    "the body must be an Eviction, not {k:?}"
                )));
            }
        }
        if let Some(n) = body.ptr("/metadata/name").and_then(Value::as_str) {
            if !n.is_empty() && n != call.name() {
                return Err(KubeError::bad_request(format!(
                    "name in URL does not match name in Eviction object: {n:?} != {:?}",
                    call.name()
                )));
            }
        }
        let options = match body.get("deleteOptions") {
            None | Some(Value::Null) => None,
            Some(o @ Value::Object(_)) => Some(o.clone()),
            Some(_) => return Err(KubeError::bad_request("deleteOptions must be an object")),
        };
        let main = Call {
            sub: None,
            ..call.clone()
        };
        self.delete(&main, options).await?;
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        ))
    }

    /// `GET pods/<name>/log`: the container's output, proxied from the agent of the pod's
    /// node (its InternalIP and `daemonEndpoints` port), streamed as it comes (`follow`).
    /// The container a `pods/log` or `pods/exec` call is about, and the address of the agent
    /// of the pod's node.
    async fn agent_of(&self, call: &Call) -> Result<(String, String), KubeError> {
        let main = Call {
            sub: None,
            ..call.clone()
        };
        let pod = self
            .objects
            .get(&main.key(), Consistency::Linearizable)
            .await?
            .ok_or_else(|| KubeError::not_found(call.r, call.name()))?
            .object;
        let names = |k: &str| -> Vec<String> {
            pod.ptr(&format!("/spec/{k}"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
                .collect()
        };
        let (mains, inits) = (names("containers"), names("initContainers"));
        let container = match call.param("container") {
            Some(c) if mains.iter().chain(&inits).any(|n| n == c) => c.to_string(),
            Some(c) => {
                return Err(KubeError::bad_request(format!(
                    "container {c} is not valid for pod {}",
                    call.name()
                )))
            }
            None if mains.len() == 1 => mains[0].clone(),
            None => {
                return Err(KubeError::bad_request(format!(
                    "a container name must be specified for pod {}, choose one of: [{}]",
                    call.name(),
                    mains.join(" ")
                )))
            }
        };
        let waiting = || {
            KubeError::bad_request(format!(
                "container \"{container}\" in pod \"{}\" is waiting to start: ContainerCreating",
                call.name()
            ))
        };
        let Some(node_name) = pod.ptr("/spec/nodeName").and_then(Value::as_str) else {
            return Err(waiting());
        };
        let nodes = resources::find("", "v1", "nodes").expect("served");
        let node = self
            .objects
            .get(&nodes.key(None, node_name), Consistency::Local)
            .await?
            .map(|s| s.object)
            .unwrap_or(Value::Null);
        let ip = node
            .ptr("/status/addresses")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .find(|x| x.get("type").and_then(Value::as_str) == Some("InternalIP"))
            })
            .and_then(|x| x.get("address").and_then(Value::as_str));
        let port = node
            .ptr("/status/daemonEndpoints/kubeletEndpoint/Port")
            .and_then(Value::as_u64)
            .filter(|p| *p > 0);
        let (Some(ip), Some(port)) = (ip, port) else {
            return Err(KubeError::bad_request(format!(
                "node {node_name:?} publishes no agent endpoint"
            )));
        };
        Ok((container, format!("{ip}:{port}")))
    }

    /// `pods/exec`: a websocket upgrade (`v5.channel.k8s.io` or `v4`) relayed byte for byte
    /// to the agent of the pod's node, which runs the command and speaks the channel
    /// protocol. SPDY (kubectl's fallback) is refused with a 400 that says so.
    async fn pod_exec(&self, call: &Call, mut req: Request<Incoming>) -> KubeResult {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let header = |k: &str| {
            req.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        if !header("upgrade").eq_ignore_ascii_case("websocket") {
            return Err(KubeError::bad_request(
                "exec needs a websocket upgrade (Sec-WebSocket-Protocol v5.channel.k8s.io or v4.channel.k8s.io); SPDY is not supported",
            ));
        }
        let (container, agent) = self.agent_of(call).await?;
        // The agent's endpoint takes the same query (command, stdin, stdout, stderr, tty).
        let query = req.uri().query().unwrap_or("").to_string();
        let path = format!(
            "/exec/{}/{}/{container}?{query}",
            call.namespace.as_deref().unwrap_or(""),
            call.name()
        );
        let unreachable = |e: std::io::Error| {
            KubeError::internal(format!("exec through the agent at {agent}: {e}"))
        };
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::net::TcpStream::connect(&agent),
        )
        .await
        .map_err(|_| KubeError::internal(format!("exec: the agent at {agent} did not answer")))?
        .map_err(unreachable)?;
        // Over TLS when agents serve it: the agent's certificate checked against their CA,
        // this replica's shown to the agent.
        let mut conn = match &self.agent_tls {
            None => tokio_util::either::Either::Left(tcp),
            Some(tls) => {
                let name = crate::tls::server_name(crate::tls::host_of(&agent))
                    .map_err(|e| KubeError::internal(format!("exec: {e}")))?;
                // The upgrade below is HTTP/1.1: no h2 in the ALPN offer.
                let mut config = (**tls).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let s = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
                )
                .await
                .map_err(|_| {
                    KubeError::internal(format!("exec: the agent at {agent} did not answer"))
                })?
                .map_err(unreachable)?;
                tokio_util::either::Either::Right(s)
            }
        };
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {agent}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            header("sec-websocket-key"),
            header("sec-websocket-protocol")
        );
        conn.write_all(head.as_bytes()).await.map_err(unreachable)?;
        // The agent's answer head (bounded), and whatever came after it.
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err(KubeError::internal("exec: the agent's answer is too long"));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut chunk))
                .await
                .map_err(|_| {
                    KubeError::internal(format!("exec: the agent at {agent} did not answer"))
                })?
                .map_err(unreachable)?;
            if n == 0 {
                return Err(KubeError::internal("exec: the agent closed the connection"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let text = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let code: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |k: &str| headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
        if code != 101 {
            // The agent's reason, read to its Content-Length (bounded).
            let want = get("content-length")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(0)
                .min(16 * 1024);
            let mut body = buf[end..].to_vec();
            while body.len() < want {
                let mut chunk = [0u8; 4096];
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut chunk))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            body.truncate(want);
            return Err(KubeError::bad_request(
                String::from_utf8_lossy(&body).trim().to_string(),
            ));
        }
        let early = buf[end..].to_vec();
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut client = hyper_util::rt::TokioIo::new(upgraded);
            if !early.is_empty() && client.write_all(&early).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut conn).await;
        });
        let mut resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket");
        for k in ["sec-websocket-accept", "sec-websocket-protocol"] {
            if let Some(v) = get(k) {
                resp = resp.header(k, v);
            }
        }
        Ok(resp
            .body(crate::http::full(bytes::Bytes::new()))
            .expect("static response parts are valid"))
    }

    async fn pod_log(&self, call: &Call) -> KubeResult {
        use http_body_util::BodyExt;
        let (container, agent) = self.agent_of(call).await?;
        let mut query = Vec::new();
        for k in [
            "follow",
            "tailLines",
            "timestamps",
            "limitBytes",
            "previous",
            "sinceSeconds",
            "sinceTime",
        ] {
            if let Some(v) = call.param(k) {
                query.push(format!("{k}={v}"));
            }
        }
        let path = format!(
            "/containerLogs/{}/{}/{container}?{}",
            call.namespace.as_deref().unwrap_or(""),
            call.name(),
            query.join("&")
        );
        let client = crate::client::Client::with_tls(
            Vec::new(),
            std::time::Duration::from_secs(10),
            self.agent_tls.clone(),
        );
        let resp = client.get_stream(&agent, &path).await.map_err(|e| {
            KubeError::internal(format!("reading the log from the agent at {agent}: {e}"))
        })?;
        if resp.status() != StatusCode::OK {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
                .unwrap_or_default();
            // Not started yet, or no longer there: the Kubernetes answer is a 400.
            return Err(KubeError::bad_request(body));
        }
        let (tx, body) = crate::http::channel_body(16);
        let mut incoming = resp.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = incoming.frame().await {
                if let Ok(data) = frame.into_data() {
                    if tx.send(data).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(body)
            .expect("static response parts are valid"))
    }

    /// `POST pods/<name>/binding`: assigns an unbound pod to a node, once. A pod already bound
    /// gets 409, so two schedulers (or a deposed leader) can never bind it twice.
    async fn bind(&self, call: &Call, body: Value) -> KubeResult {
        let target = Self::binding_target(call, &body)?;
        self.bind_value(call, &target, None).await?;
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        ))
    }

    fn binding_target(call: &Call, body: &Value) -> Result<String, KubeError> {
        let target = body
            .ptr("/target/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                KubeError::invalid(
                    call.r,
                    call.name(),
                    vec![Cause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value".into(),
                        field: "target.name".into(),
                    }],
                )
            })?
            .to_string();
        if let Some(n) = body.ptr("/metadata/name").and_then(Value::as_str) {
            if n != call.name() {
                return Err(KubeError::bad_request(format!(
                    "the name of the binding ({n}) does not match the pod ({})",
                    call.name()
                )));
            }
        }
        Ok(target)
    }

    /// Why `pod` cannot be bound: it is bound already, or being deleted (409 either way).
    fn unbindable(call: &Call, pod: &Value) -> Option<KubeError> {
        if let Some(node) = pod
            .ptr("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            return Some(KubeError {
                message: format!(
                    "Operation cannot be fulfilled on pods/binding \"{}\": pod {} is already assigned to node \"{node}\"",
                    call.name(),
                    call.name()
                ),
                ..KubeError::conflict(call.r, call.name())
            });
        }
        if is_deleting(pod) {
            return Some(KubeError {
                message: format!(
                    "pod {} is being deleted, cannot be assigned to a host",
                    call.name()
                ),
                ..KubeError::conflict(call.r, call.name())
            });
        }
        None
    }

    /// The pod's conditions with `PodScheduled=True` (replacing any earlier one).
    fn scheduled_conditions(pod: &Value) -> Value {
        let now = meta::rfc3339(meta::now_secs());
        let mut conditions: Vec<Value> = pod
            .ptr("/status/conditions")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        conditions.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now}));
        Value::Array(conditions)
    }

    /// Binds an unbound pod to `target`, once: a compare-and-swap on the pod's revision that
    /// fails with 409 if the pod is bound (or being deleted). `known` is the pod as the
    /// caller last saw it (the scheduler's cache), saving a read when it is current.
    pub(crate) async fn bind_value(
        &self,
        call: &Call,
        target: &str,
        known: Option<Stored>,
    ) -> Result<Stored, KubeError> {
        let key = call.key();
        let mut current = match known {
            Some(k) => k,
            None => self
                .objects
                .get(&key, Consistency::Linearizable)
                .await?
                .ok_or_else(|| KubeError::not_found(call.r, call.name()))?,
        };
        for _ in 0..MAX_CAS_RETRIES {
            if let Some(e) = Self::unbindable(call, &current.object) {
                return Err(e);
            }
            let conditions = Self::scheduled_conditions(&current.object);
            let mut next = std::mem::take(&mut current.object);
            next["spec"]["nodeName"] = json!(target);
            next["status"]["conditions"] = conditions;
            // As in Kubernetes, a binding is written straight to storage: it records no
            // managedFields entry (and so costs no field-set computation per pod).
            match self.objects.replace(&key, current.revision, next).await? {
                Ok(stored) => return Ok(stored),
                Err(Some(now)) => current = now,
                Err(None) => return Err(KubeError::not_found(call.r, call.name())),
            }
        }
        Err(KubeError::conflict(call.r, call.name()))
    }

    /// [`Kube::bind_value`] for a pod the caller holds (the scheduler's informer) at
    /// `revision`, without copying it: the stored bytes are written from a view of `pod`
    /// with `spec.nodeName` and the condition set. If the pod changed in between, binds its
    /// current state as `bind_value` does. Returns the bound pod's revision.
    pub(crate) async fn bind_seen(
        &self,
        call: &Call,
        target: &str,
        pod: &Value,
        revision: i64,
    ) -> Result<i64, KubeError> {
        if let Some(e) = Self::unbindable(call, pod) {
            return Err(e);
        }
        let node = Value::String(target.to_string());
        let conditions = Self::scheduled_conditions(pod);
        let bytes = objects::encode_with(
            pod,
            &[
                ("spec", "nodeName", &node),
                ("status", "conditions", &conditions),
            ],
        )?;
        match self
            .objects
            .replace_encoded(&call.key(), revision, bytes)
            .await?
        {
            Ok(revision) => Ok(revision),
            Err(Some(now)) => Ok(self.bind_value(call, target, Some(now)).await?.revision),
            Err(None) => Err(KubeError::not_found(call.r, call.name())),
        }
    }

    /// The `scale` subresource (autoscaling/v1 Scale): reads and writes `spec.replicas` of a
    /// Deployment or ReplicaSet, with the same concurrency rules as the object.
    async fn scale(&self, call: &Call, write: Option<(Option<PatchKind>, Value)>) -> KubeResult {
        let main = Call {
            sub: None,
            ..call.clone()
        };
        let obj = match write {
            None => {
                self.objects
                    .get(&main.key(), call.consistency())
                    .await?
                    .ok_or_else(|| KubeError::not_found(call.r, call.name()))?
                    .object
            }
            Some((kind, body)) => {
                let want_rv = match kind {
                    None => body
                        .ptr("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                    Some(_) => None,
                };
                let r = call.r;
                let name = call.name().to_string();
                self.modify_object(&main, want_rv, false, move |cur| {
                    let mut scale = to_scale(cur);
                    match kind {
                        None => scale = body.clone(),
                        Some(PatchKind::Merge) => patch::merge(&mut scale, &body),
                        Some(PatchKind::Strategic | PatchKind::Apply) => {
                            patch::strategic(&mut scale, &body)
                        }
                        Some(PatchKind::Json) => patch::json_patch(&mut scale, &body)
                            .map_err(|e| KubeError::invalid_patch(e.to_string()))?,
                    }
                    let replicas = scale
                        .ptr("/spec/replicas")
                        .and_then(Value::as_i64)
                        .filter(|n| *n >= 0)
                        .ok_or_else(|| {
                            KubeError::invalid(
                                r,
                                &name,
                                vec![Cause {
                                    reason: "FieldValueInvalid".into(),
                                    message: "Invalid value: must be a non-negative integer".into(),
                                    field: "spec.replicas".into(),
                                }],
                            )
                        })?;
                    let mut next = cur.clone();
                    next["spec"]["replicas"] = json!(replicas);
                    Ok(next)
                })
                .await?
            }
        };
        Ok(json_response(StatusCode::OK, &to_scale(&obj)))
    }

    async fn delete_collection(&self, call: &Call) -> KubeResult {
        let (items, _, _, _) = self.list_objects(call).await?;
        for obj in items {
            let name = obj
                .ptr("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let one = Call {
                r: call.r,
                namespace: obj
                    .ptr("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| call.namespace.clone()),
                name: Some(name),
                params: HashMap::new(),
                accept: String::new(),
                sub: None,
                manager: call.manager.clone(),
                user: None,
                authz: None,
            };
            match self.delete(&one, None).await {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        ))
    }
}

/// The autoscaling/v1 Scale view of a Deployment or ReplicaSet.
fn to_scale(obj: &Value) -> Value {
    let m = obj.get("metadata").cloned().unwrap_or_else(|| json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m.get("name"),
            "namespace": m.get("namespace"),
            "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"),
            "creationTimestamp": m.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.ptr("/spec/replicas").and_then(Value::as_i64).unwrap_or(0)},
        "status": {
            "replicas": obj.ptr("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": table::selector_string(obj.ptr("/spec/selector")),
        },
    })
}

/// The finalizer a delete's propagation policy asks for: `foregroundDeletion` or `orphan`
/// (also the legacy `orphanDependents: true`); none for `Background` (the default).
fn propagation_finalizer(options: Option<&Value>) -> Result<Option<&'static str>, KubeError> {
    let Some(o) = options else { return Ok(None) };
    match o.get("propagationPolicy").and_then(Value::as_str) {
        Some("Foreground") => Ok(Some("foregroundDeletion")),
        Some("Orphan") => Ok(Some("orphan")),
        Some("Background") => Ok(None),
        Some(other) => Err(KubeError::invalid_options(
            "DeleteOptions",
            "propagationPolicy",
            &format!("Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""),
        )),
        None if o.get("orphanDependents").and_then(Value::as_bool) == Some(true) => {
            Ok(Some("orphan"))
        }
        None => Ok(None),
    }
}

/// DeleteOptions from the body, with `gracePeriodSeconds` and `propagationPolicy` also
/// accepted as query parameters (as the Go server does; the body wins).
fn delete_options(call: &Call, body: Option<Value>) -> Result<Option<Value>, KubeError> {
    let mut options = body.unwrap_or_else(|| json!({}));
    if !options.is_object() {
        return Err(KubeError::bad_request(
            "DeleteOptions must be a JSON object",
        ));
    }
    if let Some(g) = call.param("gracePeriodSeconds") {
        let g: i64 = g.parse().map_err(|_| {
            KubeError::bad_request(format!("invalid gracePeriodSeconds {g:?}: not an integer"))
        })?;
        if let Some(o) = options.as_object_mut() {
            o.entry("gracePeriodSeconds").or_insert(json!(g));
        }
    }
    if let Some(p) = call.param("propagationPolicy") {
        if let Some(o) = options.as_object_mut() {
            o.entry("propagationPolicy").or_insert(json!(p));
        }
    }
    Ok(Some(options))
}

/// The grace period of a pod deletion that must wait for the node's agent, or `None` when
/// the pod goes at once: it was never bound, it has finished, or the grace period is 0.
fn pod_grace(pod: &Value, options: Option<&Value>) -> Option<i64> {
    if pod.get("kind").and_then(Value::as_str) != Some("Pod") {
        return None;
    }
    let bound = pod
        .ptr("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let finished = matches!(
        pod.ptr("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    let grace = options
        .and_then(|o| o.get("gracePeriodSeconds"))
        .and_then(Value::as_i64)
        .or_else(|| {
            pod.ptr("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30);
    (bound && !finished && grace > 0).then_some(grace)
}

/// Whether an allocation key was one the user asked for (then it fails instead of being drawn
/// again).
fn was_requested(req: &services::Requested, key: &str) -> bool {
    (req.ip && key.starts_with("/registry/ranges/serviceips/"))
        || req.ports.iter().any(|p| key == services::port_key(*p))
}

/// Allocation keys an object holds, released when it is deleted.
fn release_keys(r: &Resource, obj: &Value) -> Vec<String> {
    if r.kind == "Service" {
        services::claims_of(obj)
    } else {
        Vec::new()
    }
}

fn objects_key(s: &Stored, call: &Call) -> String {
    let name = s
        .object
        .ptr("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let ns = s.object.ptr("/metadata/namespace").and_then(Value::as_str);
    call.r.key(ns, name)
}

fn encode_continue(rv: i64, start: &str) -> String {
    B64URL.encode(serde_json::to_vec(&json!({"rv": rv, "start": start})).expect("JSON serializes"))
}

fn decode_continue(token: &str) -> Result<(i64, String), KubeError> {
    let bad = || {
        KubeError::bad_request("continue key is not valid: the token is not one this server issued")
    };
    let raw = B64URL
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    Ok((
        v.get("rv").and_then(Value::as_i64).ok_or_else(bad)?,
        v.get("start")
            .and_then(Value::as_str)
            .ok_or_else(bad)?
            .to_string(),
    ))
}

fn is_deleting(obj: &Value) -> bool {
    obj.ptr("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

fn finalizers(obj: &Value) -> Vec<Value> {
    obj.ptr("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// `metadata.finalizers`, and for a Namespace its `spec.finalizers` too: an object being
/// deleted goes when the last of them does.
fn all_finalizers(obj: &Value) -> Vec<Value> {
    let mut all = finalizers(obj);
    if obj.get("kind").and_then(Value::as_str) == Some("Namespace") {
        if let Some(f) = obj.ptr("/spec/finalizers").and_then(Value::as_array) {
            all.extend(f.iter().cloned());
        }
    }
    all
}

fn check_preconditions(call: &Call, obj: &Value, pre: Option<&Value>) -> Result<(), KubeError> {
    let Some(pre) = pre else { return Ok(()) };
    if let Some(uid) = pre.get("uid").and_then(Value::as_str) {
        let have = obj
            .ptr("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("");
        if uid != have {
            return Err(KubeError {
                message: format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"
                ),
                ..KubeError::conflict(call.r, call.name())
            });
        }
    }
    if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str) {
        let have = obj
            .ptr("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if rv != have {
            return Err(KubeError {
                message: format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}"
                ),
                ..KubeError::conflict(call.r, call.name())
            });
        }
    }
    Ok(())
}

/// Kind-specific validation of a whole object; returns the causes of failure.
fn validate(r: &Resource, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = obj
        .ptr("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if name.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired".into(),
            message: "Required value: name or generateName is required".into(),
            field: "metadata.name".into(),
        });
    } else if let Some(c) = if r.kind == "Namespace" {
        meta::check_dns1123_label("metadata.name", name)
    } else if r.group == rbac::GROUP {
        // RBAC names are path segments (`system:node`, say), as Kubernetes checks them.
        (name == "." || name == ".." || name.contains('/') || name.contains('%')).then(|| Cause {
            reason: "FieldValueInvalid".into(),
            message: format!(
                "Invalid value: {name:?}: may not be '.' or '..' and may not contain '/' or '%'"
            ),
            field: "metadata.name".into(),
        })
    } else {
        meta::check_dns1123_subdomain("metadata.name", name)
    } {
        causes.push(c);
    }
    if let Some(m) = obj.get("metadata").and_then(Value::as_object) {
        causes.extend(meta::check_labels(m));
    }
    let config_key = |k: &str| {
        !k.is_empty()
            && k.len() <= 253
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    };
    match r.kind {
        "Pod" => causes.extend(kinds::validate_pod(obj)),
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => {
            causes.extend(rbac::validate(r.kind, obj))
        }
        "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" | "Service" | "EndpointSlice" => {
            causes.extend(kinds::validate_workload(r.kind, obj))
        }
        "ConfigMap" => {
            for field in ["data", "binaryData"] {
                if let Some(v) = obj.get(field) {
                    match v.as_object() {
                        Some(m) => {
                            for (k, val) in m {
                                if !config_key(k) {
                                    causes.push(Cause {
                                        reason: "FieldValueInvalid".into(),
                                        message: format!("Invalid value: \"{k}\": a valid config key must consist of alphanumeric characters, '-', '_' or '.'"),
                                        field: format!("{field}[{k}]"),
                                    });
                                }
                                let ok = if field == "data" {
                                    val.is_string()
                                } else {
                                    val.as_str().is_some_and(|s| B64.decode(s).is_ok())
                                };
                                if !ok {
                                    causes.push(Cause {
                                        reason: "FieldValueInvalid".into(),
                                        message: format!(
                                            "Invalid value: {field} values must be {}",
                                            if field == "data" {
                                                "strings"
                                            } else {
                                                "base64 strings"
                                            }
                                        ),
                                        field: format!("{field}[{k}]"),
                                    });
                                }
                            }
                        }
                        None if v.is_null() => {}
                        None => causes.push(Cause {
                            reason: "FieldValueInvalid".into(),
                            message: "Invalid value: must be a map".into(),
                            field: field.into(),
                        }),
                    }
                }
            }
        }
        "Secret" => {
            if let Some(m) = obj.get("data").and_then(Value::as_object) {
                for (k, val) in m {
                    if !config_key(k) || val.as_str().is_none_or(|s| B64.decode(s).is_err()) {
                        causes.push(Cause {
                            reason: "FieldValueInvalid".into(),
                            message: format!("Invalid value: \"{k}\": secret data must map valid keys to base64 strings"),
                            field: format!("data[{k}]"),
                        });
                    }
                }
            }
        }
        _ => {}
    }
    causes
}

/// Kinds whose `metadata.generation` counts spec changes (those with a spec a controller
/// acts on); Kubernetes leaves it out on the others.
fn has_generation(r: &Resource) -> bool {
    matches!(
        r.kind,
        "Pod" | "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" | "Service" | "Node"
    )
}

/// Checks and defaults an object being created.
fn normalize_new(call: &Call, obj: &mut Value, strict: bool) -> Result<(), KubeError> {
    let r = call.r;
    let Some(map) = obj.as_object_mut() else {
        return Err(KubeError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    check_kind(r, map)?;
    if strict {
        if let Some(f) = meta::unknown_field(r.kind, map) {
            return Err(KubeError::bad_request(format!(
                "strict decoding error: unknown field \"{f}\""
            )));
        }
    }
    map.insert("apiVersion".into(), json!(r.api_version()));
    map.insert("kind".into(), json!(r.kind));
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    let Some(m) = meta.as_object_mut() else {
        return Err(KubeError::bad_request("metadata must be an object"));
    };
    if m.get("resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(KubeError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let name = m
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        if let Some(prefix) = m
            .get("generateName")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
        {
            m.insert(
                "name".into(),
                json!(format!("{prefix}{}", meta::name_suffix())),
            );
        }
    }
    match (&call.namespace, r.namespaced) {
        (Some(ns), true) => {
            if let Some(body_ns) = m
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                if body_ns != ns {
                    return Err(KubeError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
            m.insert("namespace".into(), json!(ns));
        }
        (None, true) => {
            return Err(KubeError::bad_request(format!(
                "{} must be created in a namespace (POST to /{}/namespaces/<namespace>/{})",
                r.plural,
                if r.group.is_empty() {
                    "api/v1".to_string()
                } else {
                    format!("apis/{}/{}", r.group, r.version)
                },
                r.plural
            )))
        }
        (_, false) => {
            m.remove("namespace");
        }
    }
    m.insert("uid".into(), json!(meta::uid()));
    m.insert(
        "creationTimestamp".into(),
        json!(meta::rfc3339(meta::now_secs())),
    );
    if has_generation(r) {
        m.insert("generation".into(), json!(1));
    } else {
        m.remove("generation");
    }
    m.remove("resourceVersion");
    m.remove("deletionTimestamp");
    m.remove("deletionGracePeriodSeconds");
    m.remove("selfLink");
    if r.subresources.contains(&"status") {
        // Status is the subresource's to set; what a create sends is ignored.
        map.remove("status");
        // The status fields Kubernetes always encodes (not `omitempty` in Go), which typed
        // clients require.
        let zeros: &[&str] = match r.kind {
            "ReplicaSet" => &["replicas"],
            "DaemonSet" => &[
                "currentNumberScheduled",
                "numberMisscheduled",
                "desiredNumberScheduled",
                "numberReady",
            ],
            _ => &[],
        };
        if !zeros.is_empty() {
            map.insert(
                "status".into(),
                Value::Object(zeros.iter().map(|k| (k.to_string(), json!(0))).collect()),
            );
        }
    }
    default_kind(r, map);
    let name = obj
        .ptr("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let causes = validate(r, obj);
    if !causes.is_empty() {
        return Err(KubeError::invalid(r, &name, causes));
    }
    admit(call, obj, &name, None)
}

/// The checks on who writes what, past authorization: a node creates only its own Node and
/// Lease (NodeRestriction), and nobody grants RBAC permissions they do not hold.
fn admit(call: &Call, obj: &Value, name: &str, current: Option<&Value>) -> Result<(), KubeError> {
    let Some(user) = &call.user else {
        return Ok(());
    };
    authz::node_admits(user, call.r.kind, obj, current).map_err(|why| {
        KubeError::forbidden(
            call.r,
            name,
            format!("{} {name:?} is forbidden: {why}", call.r.qualified()),
        )
    })?;
    if let Some(az) = &call.authz {
        if call.r.group == rbac::GROUP {
            az.may_write_rbac(user, call.r.kind, obj).map_err(|why| {
                KubeError::forbidden(
                    call.r,
                    name,
                    format!("{} {name:?} is forbidden: {why}", call.r.qualified()),
                )
            })?;
        }
    }
    Ok(())
}

fn check_kind(r: &Resource, map: &serde_json::Map<String, Value>) -> Result<(), KubeError> {
    if let Some(k) = map
        .get("kind")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
    {
        if k != r.kind {
            return Err(KubeError::bad_request(format!(
                "the object's kind {k:?} does not match the resource {} (kind {:?})",
                r.qualified(),
                r.kind
            )));
        }
    }
    if let Some(v) = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    {
        if v != r.api_version() {
            return Err(KubeError::bad_request(format!(
                "the object's apiVersion {v:?} does not match {:?}",
                r.api_version()
            )));
        }
    }
    Ok(())
}

/// Kind defaults, as the Kubernetes API server applies them.
fn default_kind(r: &Resource, map: &mut serde_json::Map<String, Value>) {
    match r.kind {
        "Pod" => kinds::default_pod(map),
        "Node" => kinds::default_node(map),
        "Deployment" | "ReplicaSet" | "DaemonSet" | "Service" => {
            kinds::default_workload(r.kind, map)
        }
        "Job" => {
            kinds::default_workload(r.kind, map);
            kinds::default_job_selector(map);
        }
        "Namespace" => {
            let spec = map.entry("spec").or_insert_with(|| json!({}));
            if spec.get("finalizers").is_none() {
                spec["finalizers"] = json!(["kubernetes"]);
            }
            map.insert("status".into(), json!({"phase": "Active"}));
        }
        "Secret" => {
            if map
                .get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                map.insert("type".into(), json!("Opaque"));
            }
            // stringData is write-only: it is merged into data and not stored.
            if let Some(Value::Object(sd)) = map.remove("stringData") {
                let data = map.entry("data").or_insert_with(|| json!({}));
                if let Some(d) = data.as_object_mut() {
                    for (k, v) in sd {
                        if let Some(s) = v.as_str() {
                            d.insert(k, json!(B64.encode(s.as_bytes())));
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Checks a replacement object and carries over what an update may not change.
fn normalize_update(
    call: &Call,
    current: &Value,
    next: &mut Value,
    strict: bool,
) -> Result<(), KubeError> {
    let r = call.r;
    // A uid in the new object is a precondition (the kubelet's status patches carry one, so
    // a pod deleted and created again under the same name is never written to by mistake).
    let want_uid = next
        .ptr("/metadata/uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty());
    let have_uid = current
        .ptr("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(uid) = want_uid.filter(|u| *u != have_uid) {
        return Err(KubeError {
            message: format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {have_uid}"
            ),
            ..KubeError::conflict(r, call.name())
        });
    }
    let status_part = call.sub.as_deref() == Some("status");
    if status_part {
        // The status subresource changes status and nothing else.
        let mut merged = current.clone();
        match next.get("status").cloned() {
            Some(st) => merged["status"] = st,
            None => {
                if let Some(o) = merged.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        *next = merged;
    }
    let Some(map) = next.as_object_mut() else {
        return Err(KubeError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    check_kind(r, map)?;
    if strict {
        if let Some(f) = meta::unknown_field(r.kind, map) {
            return Err(KubeError::bad_request(format!(
                "strict decoding error: unknown field \"{f}\""
            )));
        }
    }
    map.insert("apiVersion".into(), json!(r.api_version()));
    map.insert("kind".into(), json!(r.kind));
    if !map.get("metadata").is_some_and(Value::is_object) {
        map.insert("metadata".into(), json!({}));
    }
    if let Some(ns) = &call.namespace {
        let body_ns = map["metadata"]
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        if body_ns.is_some_and(|b| b != ns) {
            return Err(KubeError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    let cur_meta = current
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let m = map["metadata"]
        .as_object_mut()
        .expect("made an object above");
    if m.get("name").and_then(Value::as_str) != cur_meta.get("name").and_then(Value::as_str) {
        return Err(KubeError::invalid(
            r,
            call.name(),
            vec![Cause {
                reason: "FieldValueInvalid".into(),
                message: "Invalid value: field is immutable".into(),
                field: "metadata.name".into(),
            }],
        ));
    }
    for k in [
        "uid",
        "creationTimestamp",
        "namespace",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match cur_meta.get(k) {
            Some(v) => {
                m.insert(k.into(), v.clone());
            }
            None => {
                m.remove(k);
            }
        }
    }
    m.insert(
        "resourceVersion".into(),
        cur_meta
            .get("resourceVersion")
            .cloned()
            .unwrap_or(Value::Null),
    );
    m.remove("selfLink");
    // generation counts changes of everything but metadata and status.
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("metadata");
            o.remove("status");
        }
        v
    };
    if has_generation(r) {
        let generation = cur_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let changed = strip(current) != strip(&Value::Object(map.clone()));
        map["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
    } else if let Some(m) = map["metadata"].as_object_mut() {
        m.remove("generation");
    }
    if !status_part && r.subresources.contains(&"status") {
        // The main resource ignores status; the status subresource sets it.
        match current.get("status") {
            Some(st) => {
                map.insert("status".into(), st.clone());
            }
            None => {
                map.remove("status");
            }
        }
    }
    if !status_part && r.kind == "Pod" {
        kinds::check_pod_update(call, current, map)?;
    }
    if !status_part {
        kinds::check_workload_update(call, current, map)?;
        if matches!(
            r.kind,
            "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" | "Service"
        ) {
            // Fill defaults a replacement left out (status was carried over above).
            kinds::default_workload(r.kind, map);
        }
    }
    match r.kind {
        "Namespace" if map.get("spec").is_none() => {
            map.insert(
                "spec".into(),
                current.get("spec").cloned().unwrap_or_else(|| json!({})),
            );
        }
        "Secret" => default_kind(r, map),
        "RoleBinding" | "ClusterRoleBinding" if current.get("roleRef") != map.get("roleRef") => {
            return Err(KubeError::invalid(
                r,
                call.name(),
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: "Invalid value: cannot change roleRef".into(),
                    field: "roleRef".into(),
                }],
            ));
        }
        _ => {}
    }
    if (r.kind == "ConfigMap" || r.kind == "Secret")
        && current.get("immutable") == Some(&json!(true))
    {
        let data_of = |v: &Value| {
            (
                v.get("data").cloned(),
                v.get("binaryData").cloned(),
                v.get("immutable").cloned(),
            )
        };
        if data_of(current) != data_of(next) {
            return Err(KubeError::invalid(
                r,
                call.name(),
                vec![Cause {
                    reason: "FieldValueForbidden".into(),
                    message: "Forbidden: field is immutable when `immutable` is set".into(),
                    field: "data".into(),
                }],
            ));
        }
    }
    let causes = validate(r, next);
    if !causes.is_empty() {
        return Err(KubeError::invalid(r, call.name(), causes));
    }
    admit(call, next, call.name(), Some(current))
}

/// Most keys a list reads from the store (and decodes) at once.
const LIST_CHUNK: i64 = 500;

/// The kinds of patch the API accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/json-patch+json`.
    Json,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

/// Media types accepted for object bodies.
const JSON_OR_YAML: &[&str] = &["application/json", "application/yaml"];

/// The media type a patch body is decoded as.
fn patch_media(kind: PatchKind) -> &'static str {
    match kind {
        PatchKind::Apply => "application/apply-patch+yaml",
        _ => "application/json",
    }
}

const PATCH_TYPES: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
];

fn patch_kind(content_type: &str) -> Result<PatchKind, KubeError> {
    let base = content_type.split(';').next().unwrap_or("").trim();
    match base {
        "application/merge-patch+json" => Ok(PatchKind::Merge),
        "application/strategic-merge-patch+json" => Ok(PatchKind::Strategic),
        "application/json-patch+json" => Ok(PatchKind::Json),
        "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchKind::Apply),
        other => Err(KubeError::unsupported_media(other, PATCH_TYPES)),
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, KubeError> {
    crate::http::read_body(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| match e {
            crate::http::BodyError::TooLarge(limit) => KubeError::too_large(limit),
            crate::http::BodyError::Read(m) => KubeError::bad_request(m),
        })
}

/// Reads a JSON body. A missing Content-Type is JSON (the Python client sends none);
/// protobuf and other types are refused with 415.
async fn read_json(
    body: Incoming,
    content_type: &str,
    accepted: &[&str],
) -> Result<Value, KubeError> {
    let base = content_type.split(';').next().unwrap_or("").trim();
    if base == "application/vnd.kubernetes.protobuf" && accepted == JSON_OR_YAML {
        // kubectl's imperative `create namespace|configmap|secret` send protobuf; those
        // kinds are read, anything else gets the 415 that asks for JSON.
        let bytes = read_body(body).await?;
        return proto::decode(&bytes).ok_or_else(|| {
            KubeError::unsupported_media(base, &["application/json", "application/yaml"])
        });
    }
    if !base.is_empty() && !accepted.is_empty() && !accepted.contains(&base) {
        return Err(KubeError::unsupported_media(
            base,
            &["application/json", "application/yaml"],
        ));
    }
    let bytes = read_body(body).await?;
    decode_body(&bytes, base)
}

/// JSON, or YAML for the YAML media types (`application/yaml`, server-side apply's
/// `application/apply-patch+yaml`; JSON is tried first, as kubectl sends JSON there).
fn decode_body(bytes: &[u8], media_type: &str) -> Result<Value, KubeError> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Ok(v),
        Err(_) if media_type.ends_with("yaml") => {
            serde_yaml::from_slice::<Value>(bytes).map_err(|e| {
                KubeError::bad_request(format!(
                    "the body of the request could not be decoded as YAML: {e}"
                ))
            })
        }
        Err(e) => Err(KubeError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))),
    }
}

/// DELETE bodies are optional `DeleteOptions`.
async fn read_optional_json(body: Incoming) -> Result<Option<Value>, KubeError> {
    let bytes = read_body(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        KubeError::bad_request(format!("DeleteOptions could not be decoded as JSON: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body of a list built with [`ListBody`], parsed.
    async fn listed(items: &[Value], token: Option<String>, remaining: Option<i64>) -> Value {
        use http_body_util::BodyExt;
        let pods = resources::find("", "v1", "pods").unwrap();
        let mut list = ListBody::with_capacity(if items.len() > 1 { 16 } else { 0 });
        for i in items {
            serde_json::to_writer(list.next_item(), i).unwrap();
        }
        let resp = list.finish(pods, 42, token, remaining);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).expect("a list body is JSON")
    }

    #[tokio::test]
    async fn a_list_body_carries_its_head_and_every_item_once() {
        let items: Vec<Value> = (0..3)
            .map(|i| json!({"metadata": {"name": format!("p{i}")}}))
            .collect();
        assert_eq!(
            listed(&items, None, None).await,
            json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": "42"}, "items": items})
        );
        assert_eq!(listed(&[], None, None).await["items"], json!([]));
        // A head longer than the room kept for it (a long continue token) moves the items.
        let token = "c".repeat(2 * LIST_HEAD_ROOM);
        let got = listed(&items, Some(token.clone()), Some(7)).await;
        assert_eq!(got["metadata"]["continue"], json!(token));
        assert_eq!(got["metadata"]["remainingItemCount"], json!(7));
        assert_eq!(got["items"], json!(items));
    }

    #[test]
    fn paths_route_to_resources_namespaces_and_subresources() {
        let r = |p: &str| route(p);
        assert_eq!(r("/version"), Some(Route::Version));
        assert_eq!(r("/api"), Some(Route::Root { core: true }));
        assert_eq!(
            r("/api/v1"),
            Some(Route::GroupVersion(String::new(), "v1".into()))
        );
        match r("/api/v1/namespaces/default/configmaps/cm1").unwrap() {
            Route::Resource {
                r,
                namespace,
                name,
                sub,
            } => {
                assert_eq!(r.plural, "configmaps");
                assert_eq!(namespace.as_deref(), Some("default"));
                assert_eq!(name.as_deref(), Some("cm1"));
                assert_eq!(sub, None);
            }
            other => panic!("{other:?}"),
        }
        match r("/api/v1/namespaces/default").unwrap() {
            Route::Resource {
                r, namespace, name, ..
            } => {
                assert_eq!(
                    (r.plural, namespace, name.as_deref()),
                    ("namespaces", None, Some("default"))
                );
            }
            other => panic!("{other:?}"),
        }
        match r("/api/v1/namespaces/x/status").unwrap() {
            Route::Resource { r, name, sub, .. } => {
                assert_eq!(
                    (r.plural, name.as_deref(), sub.as_deref()),
                    ("namespaces", Some("x"), Some("status"))
                );
            }
            other => panic!("{other:?}"),
        }
        match r("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases").unwrap() {
            Route::Resource {
                r, namespace, name, ..
            } => {
                assert_eq!(
                    (r.plural, namespace.as_deref(), name),
                    ("leases", Some("kube-node-lease"), None)
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r("/api/v1/widgets"), None);
        assert_eq!(r("/apis/nope/v1/things"), None);
    }

    #[test]
    fn query_parameters_are_percent_decoded() {
        let q = query_params(Some("labelSelector=app%3Dweb%2Ctier&limit=5&watch=true"));
        assert_eq!(q["labelSelector"], "app=web,tier");
        assert_eq!(q["limit"], "5");
        let t = encode_continue(42, "/registry/configmaps/default/b\u{0}");
        assert_eq!(
            decode_continue(&t).unwrap(),
            (42, "/registry/configmaps/default/b\u{0}".to_string())
        );
        assert!(decode_continue("garbage!").is_err());
    }
}
