//! The key-value API every replica serves for operators, tests and benchmarks, modelled on
//! etcd's v3 JSON gateway (`POST /v3/kv/range` and friends), plus health, metrics and the
//! cluster endpoints.
//!
//! Reads are linearizable unless the request asks for `serializable`: the handler passes the
//! replica's read barrier first. Writes go to the leader through [`Replica::write`]. Every
//! failure is answered with etcd's error shape (`{"error", "code", "message"}`) and an HTTP
//! status that says what kind of failure it was; see [`ApiError`].

pub mod fair;
pub mod json;
mod watch;

use std::sync::Arc;

use bytes::Bytes;
use flotilla_raft::{ApplyError, Command, CommandResult, Node, Op, Replica};
use flotilla_store as store;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;

use crate::http::{self as h, Body};
use crate::metrics::Metrics;
use json::*;

/// Largest request body: a 1.5 MiB value, base64-encoded, in JSON, with room to spare.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What the API handlers share.
pub struct Api {
    /// The replica.
    pub replica: Replica,
    /// The Kubernetes API, served on the same listener.
    pub kube: Arc<crate::api::Kube>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled on shutdown (ends watch streams).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Bounds on Kubernetes API requests being handled at once.
    pub inflight: InFlight,
    /// Who requests come from.
    pub auth: crate::auth::Authenticator,
    /// Per-client limits (with authentication on).
    pub fair: fair::Fair,
    /// The longest a Kubernetes API request other than a watch, a followed log or an exec
    /// may take before it is answered 504.
    pub request_timeout: std::time::Duration,
    /// The audit log, when on.
    pub audit: Option<crate::audit::Auditor>,
}

/// Bounds on Kubernetes API requests being handled at once (kube-apiserver's
/// `--max-requests-inflight` and `--max-mutating-requests-inflight`): beyond them a request
/// is answered 429 `TooManyRequests` with `Retry-After: 1` at once, before any work, so an
/// overloaded replica sheds load instead of queueing it without bound. A watch or a followed
/// log holds its permit only until its stream starts. `None`: no bound.
pub struct InFlight {
    /// Reads (GET, HEAD, OPTIONS).
    pub readonly: Option<tokio::sync::Semaphore>,
    /// Writes.
    pub mutating: Option<tokio::sync::Semaphore>,
}

impl InFlight {
    /// Bounds of `readonly` and `mutating` requests; 0 means none.
    pub fn new(readonly: usize, mutating: usize) -> InFlight {
        let bound = |n: usize| (n > 0).then(|| tokio::sync::Semaphore::new(n));
        InFlight {
            readonly: bound(readonly),
            mutating: bound(mutating),
        }
    }
}

/// A failed request, by kind.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid request.
    #[error("{0}")]
    BadRequest(String),
    /// Body too large.
    #[error("{0}")]
    TooLarge(String),
    /// No such endpoint.
    #[error("no endpoint {0}")]
    NotFound(String),
    /// Wrong method.
    #[error("method {0} is not allowed here; use POST")]
    Method(String),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Replication failed or refused.
    #[error(transparent)]
    Raft(#[from] flotilla_raft::Error),
}

impl ApiError {
    /// HTTP status and gRPC code (etcd's gateway reports both).
    fn status(&self) -> (StatusCode, i32) {
        use flotilla_raft::Error as R;
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, 3),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, 8),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, 12),
            ApiError::Method(_) => (StatusCode::METHOD_NOT_ALLOWED, 12),
            ApiError::Store(e) => match e {
                store::Error::Compacted { .. } => (StatusCode::GONE, 11),
                store::Error::FutureRevision { .. } => (StatusCode::BAD_REQUEST, 11),
                store::Error::InvalidRequest(_) => (StatusCode::BAD_REQUEST, 3),
                store::Error::NoSpace { .. } => (StatusCode::INSUFFICIENT_STORAGE, 8),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, 13),
            },
            ApiError::Raft(e) => match e {
                R::NoLeader { .. }
                | R::NoQuorum { .. }
                | R::NotLeader { .. }
                | R::Unreachable { .. }
                | R::Stopped(_) => (StatusCode::SERVICE_UNAVAILABLE, 14),
                R::Timeout { .. } | R::QuorumLost { .. } | R::Interrupted(_) => {
                    (StatusCode::GATEWAY_TIMEOUT, 4)
                }
                R::Apply(ApplyError::Compacted { .. }) => (StatusCode::GONE, 11),
                R::Apply(ApplyError::FutureRevision { .. }) => (StatusCode::BAD_REQUEST, 11),
                R::Apply(ApplyError::Invalid(_)) | R::Invalid(_) => (StatusCode::BAD_REQUEST, 3),
                R::Apply(ApplyError::Fenced { .. }) => (StatusCode::CONFLICT, 9),
                R::NoSpace(_) => (StatusCode::INSUFFICIENT_STORAGE, 8),
                R::InvalidCluster(m) if m.starts_with("unknown member") => {
                    (StatusCode::NOT_FOUND, 5)
                }
                R::InvalidCluster(_) => (StatusCode::BAD_REQUEST, 9),
                R::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, 8),
                R::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, 13),
            },
        }
    }

    fn into_response(self) -> Response<Body> {
        let (status, code) = self.status();
        let msg = self.to_string();
        h::json(
            status,
            &ErrorBody {
                error: msg.clone(),
                code,
                message: msg,
            },
        )
    }
}

type ApiResult = Result<Response<Body>, ApiError>;

fn decode<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("malformed request body: {e}")))
}

/// The audit record of a request being handled, written when it is dropped.
struct AuditPending<'a> {
    audit: &'a crate::audit::Auditor,
    id: String,
    verb: String,
    uri: String,
    who: Option<crate::auth::User>,
    source: Option<std::net::SocketAddr>,
    user_agent: String,
    streaming: bool,
    received: std::time::SystemTime,
    /// The response code; `None`: the request ended without one (499).
    code: Option<u16>,
}

impl Drop for AuditPending<'_> {
    fn drop(&mut self) {
        self.audit.record(&crate::audit::Record {
            id: &self.id,
            verb: &self.verb,
            uri: &self.uri,
            user: self.who.as_ref(),
            source: self.source,
            user_agent: &self.user_agent,
            code: self.code.unwrap_or(499),
            streaming: self.streaming,
            received: self.received,
        });
    }
}

impl Api {
    /// Routes one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let Some(audit) = self.audit.as_ref() else {
            return self.clone().serve(req, &mut None).await;
        };
        // What the audit log needs, taken before the request is consumed.
        let received = std::time::SystemTime::now();
        // Path and query (an HTTP/2 request's URI carries the scheme and authority too).
        let uri = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |pq| pq.to_string());
        let path = req.uri().path().to_string();
        let verb = if crate::api::Kube::serves(&path) {
            crate::api::Kube::labels(req.method(), &path, req.uri().query()).0
        } else {
            "other"
        };
        let verb = match (verb, req.method()) {
            ("other" | "get", m) if !crate::api::Kube::serves(&path) => {
                m.as_str().to_ascii_lowercase()
            }
            (v, _) => v.to_string(),
        };
        let user_agent = req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let id = req
            .extensions()
            .get::<crate::http::RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let source = req
            .extensions()
            .get::<crate::tls::Conn>()
            .and_then(|c| c.remote);
        let streaming = crate::api::Kube::serves(&path)
            && crate::api::Kube::long_running(req.method(), &path, req.uri().query());
        // Recorded when the handler answers, or (code 499) if the request is dropped first:
        // a client that resets the stream after its write was proposed is still audited.
        let mut pending = AuditPending {
            audit,
            id,
            verb,
            uri,
            who: None,
            source,
            user_agent,
            streaming,
            received,
            code: None,
        };
        let resp = self.clone().serve(req, &mut pending.who).await;
        pending.code = Some(resp.status().as_u16());
        drop(pending);
        resp
    }

    /// Handles one request; `who` is set to the requester once known (for the audit log).
    async fn serve(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        who: &mut Option<crate::auth::User>,
    ) -> Response<Body> {
        let timer = self.metrics.start_request();
        let path = req.uri().path().to_string();
        use crate::auth::Outcome;
        let outcome = self.auth.authenticate(
            &path,
            req.headers(),
            req.extensions().get::<crate::tls::Conn>(),
        );
        match outcome {
            Outcome::Unauthorized => {
                self.metrics.auth_failures.inc();
                let (verb, resource) = if crate::api::Kube::serves(&path) {
                    crate::api::Kube::labels(req.method(), &path, req.uri().query())
                } else {
                    labels(&path)
                };
                timer.finish(verb, resource, 401);
                return crate::api::status::KubeError::unauthorized().response();
            }
            // The key-value API is the raw store (every Secret in it): administrators only.
            Outcome::User(ref u)
                if !crate::api::Kube::serves(&path)
                    && path.starts_with("/v3/")
                    && !u.in_group("system:masters") =>
            {
                let (verb, resource) = labels(&path);
                timer.finish(verb, resource, 403);
                return crate::api::status::KubeError::forbidden_path(format!(
                    "User {:?} cannot use the key-value API {path}: it is for system:masters only",
                    u.name
                ))
                .response();
            }
            Outcome::User(u) => {
                // A ServiceAccount token holds only while its account exists, with the uid
                // the token names (deleting the account revokes its tokens).
                if let Some(rest) = u.name.strip_prefix("system:serviceaccount:") {
                    let (ns, name) = rest.split_once(':').unwrap_or(("", ""));
                    let r =
                        crate::api::resources::find("", "v1", "serviceaccounts").expect("served");
                    let live = self
                        .kube
                        .objects()
                        .get(
                            &r.key(Some(ns), name),
                            crate::api::objects::Consistency::Local,
                        )
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|s| {
                            s.object
                                .pointer("/metadata/uid")
                                .and_then(serde_json::Value::as_str)
                                == Some(u.uid.as_str())
                        });
                    if !live {
                        self.metrics.auth_failures.inc();
                        timer.finish("other", "other", 401);
                        return crate::api::status::KubeError::unauthorized().response();
                    }
                }
                *who = Some(u.clone());
                req.extensions_mut().insert(u);
            }
            // Authorization decides what the anonymous user may see (RBAC's
            // system:public-info-viewer: health and version).
            Outcome::Anonymous => {
                let anonymous = crate::auth::User {
                    name: "system:anonymous".into(),
                    uid: String::new(),
                    groups: vec!["system:unauthenticated".into()],
                };
                *who = Some(anonymous.clone());
                req.extensions_mut().insert(anonymous);
            }
            Outcome::Off => {}
        }
        // The server's own paths (metrics, and anything else not health, the key-value API
        // or the Kubernetes API): a non-resource permission, as kube-apiserver's /metrics.
        if !crate::api::Kube::serves(&path)
            && !crate::auth::anonymous_path(&path)
            && !path.starts_with("/v3/")
        {
            if let (Some(az), Some(u)) = (
                self.kube.authz.as_ref(),
                req.extensions().get::<crate::auth::User>(),
            ) {
                let verb = req.method().as_str().to_ascii_lowercase();
                let a = crate::api::rbac::Attributes {
                    user: u,
                    verb: &verb,
                    resource: None,
                    path: &path,
                };
                if let Err(why) = az.authorize(&a).await {
                    let (verb, resource) = labels(&path);
                    timer.finish(verb, resource, 403);
                    return crate::api::status::KubeError::forbidden_path(format!(
                        "forbidden: {why}"
                    ))
                    .response();
                }
            }
        }
        if crate::api::Kube::serves(&path) {
            let (verb, resource) = crate::api::Kube::labels(req.method(), &path, req.uri().query());
            let bound = match *req.method() {
                Method::GET | Method::HEAD | Method::OPTIONS => &self.inflight.readonly,
                _ => &self.inflight.mutating,
            };
            let watching = verb == "watch";
            let long_running =
                crate::api::Kube::long_running(req.method(), &path, req.uri().query());
            // Per client first: one client over its share is refused without taking a
            // replica-wide slot.
            let mut admitted = None;
            if let Some(u) = req
                .extensions()
                .get::<crate::auth::User>()
                .filter(|u| self.auth.enabled() && !u.in_group(crate::api::rbac::MASTERS))
            {
                match self.fair.admit(&u.name, watching) {
                    Ok(a) => admitted = Some(a),
                    Err(refusal) => {
                        self.metrics.rejected(refusal.label());
                        timer.finish(verb, resource, 429);
                        let mut resp = crate::api::status::KubeError::too_many_requests(
                            refusal.message(&u.name),
                        )
                        .response();
                        resp.headers_mut().insert(
                            http::header::RETRY_AFTER,
                            http::HeaderValue::from_static("1"),
                        );
                        return resp;
                    }
                }
            }
            let permit = match bound.as_ref().map(|s| s.try_acquire()) {
                Some(Err(_)) => {
                    self.metrics.rejected("inflight");
                    let mut resp = crate::api::status::KubeError::too_many_requests(
                        "Too many requests, please try again later.".into(),
                    )
                    .response();
                    resp.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from_static("1"),
                    );
                    timer.finish(verb, resource, 429);
                    return resp;
                }
                Some(Ok(p)) => Some(p),
                None => None,
            };
            let handled = self.kube.clone().handle(req);
            let mut resp = if long_running {
                handled.await
            } else {
                match tokio::time::timeout(self.request_timeout, handled).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.metrics.rejected("timeout");
                        crate::api::status::KubeError::timeout(format!(
                            "request did not complete within {:?}",
                            self.request_timeout
                        ))
                        .response()
                    }
                }
            };
            drop(permit);
            if let Some(a) = admitted {
                drop(a.inflight);
                // A watch holds its client's watch permit for as long as it streams.
                if let Some(w) = a.watch {
                    resp = resp.map(|b| http_body_util::BodyExt::boxed(fair::Guarded::new(b, w)));
                }
            }
            timer.finish(verb, resource, resp.status().as_u16());
            return resp;
        }
        let (verb, resource) = labels(&path);
        let resp = match self.route(req).await {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, ApiError::Store(ref s) if !s.is_request_error()) {
                    tracing::error!(%e, path, "request failed");
                }
                e.into_response()
            }
        };
        timer.finish(verb, resource, resp.status().as_u16());
        resp
    }

    fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: 0,
            member_id: self.replica.id(),
            revision,
            raft_term: self.replica.leadership().borrow().term,
        }
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>) -> ApiResult {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz" | "/livez") => return Ok(h::text(StatusCode::OK, "ok")),
            (&Method::GET, "/readyz") => return Ok(self.readyz(query.contains("verbose"))),
            (&Method::GET, "/metrics") => return Ok(self.metrics.render(&self.replica)),
            (&Method::POST, _) => {}
            (m, p) if p.starts_with("/v3/") => return Err(ApiError::Method(m.to_string())),
            _ => return Err(ApiError::NotFound(path)),
        }
        let body = h::read_body(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|e| match e {
                h::BodyError::TooLarge(_) => ApiError::TooLarge(e.to_string()),
                h::BodyError::Read(m) => ApiError::BadRequest(m),
            })?;
        match path.as_str() {
            "/v3/kv/range" => self.range(decode(&body)?).await,
            "/v3/kv/put" => {
                let r: PutRequest = decode(&body)?;
                let txn = r.to_store().map_err(ApiError::BadRequest)?;
                let resp = self.txn(txn).await?;
                let prev_kv = match resp.responses.into_iter().next() {
                    Some(store::ResponseOp::Put(p)) => p.prev_kv.map(Into::into),
                    _ => None,
                };
                Ok(h::json(
                    StatusCode::OK,
                    &PutResponse {
                        header: self.header(resp.revision),
                        prev_kv,
                    },
                ))
            }
            "/v3/kv/deleterange" => {
                let r: DeleteRangeRequest = decode(&body)?;
                let resp = self.txn(r.to_store()).await?;
                let (deleted, prev_kvs) = match resp.responses.into_iter().next() {
                    Some(store::ResponseOp::DeleteRange(d)) => (d.deleted, d.prev_kvs),
                    _ => (0, Vec::new()),
                };
                Ok(h::json(
                    StatusCode::OK,
                    &DeleteRangeResponse {
                        header: self.header(resp.revision),
                        deleted,
                        prev_kvs: prev_kvs.into_iter().map(Into::into).collect(),
                    },
                ))
            }
            "/v3/kv/txn" => {
                let r: TxnRequest = decode(&body)?;
                let txn = r.to_store().map_err(ApiError::BadRequest)?;
                let resp = self.txn(txn).await?;
                let header = self.header(resp.revision);
                Ok(h::json(
                    StatusCode::OK,
                    &TxnResponse::from_store(header, resp),
                ))
            }
            "/v3/kv/compaction" => {
                let r: CompactionRequest = decode(&body)?;
                if r.revision <= 0 {
                    return Err(ApiError::BadRequest("revision must be positive".into()));
                }
                let current = self.replica.kv().revision();
                if r.revision > current {
                    // Refuse before proposing; apply would refuse too.
                    return Err(store::Error::FutureRevision {
                        requested: r.revision,
                        current,
                    }
                    .into());
                }
                let result = self
                    .replica
                    .write(Command {
                        fence_term: None,
                        op: Op::Compact {
                            revision: r.revision,
                        },
                    })
                    .await?;
                if r.physical {
                    let kv = self.replica.kv().clone();
                    tokio::task::spawn_blocking(move || kv.wait_compacted())
                        .await
                        .map_err(|e| ApiError::BadRequest(e.to_string()))??;
                }
                let rev = match result {
                    CommandResult::Compacted { revision } => revision,
                    _ => r.revision,
                };
                Ok(h::json(
                    StatusCode::OK,
                    &serde_json::json!({ "header": self.header(rev) }),
                ))
            }
            "/v3/watch" => watch::open(self.clone(), decode(&body)?).await,
            "/v3/cluster/member/list" => Ok(self.member_list()),
            "/v3/cluster/member/add" => {
                let r: MemberAddRequest = decode(&body)?;
                let peer = r
                    .peer_urls
                    .first()
                    .map(|u| strip_scheme(u))
                    .ok_or_else(|| {
                        ApiError::BadRequest(
                            "peerURLs must name the new member's peer address".into(),
                        )
                    })?;
                if r.id == 0 {
                    return Err(ApiError::BadRequest("ID must be a non-zero integer".into()));
                }
                self.replica
                    .add_member(
                        r.id,
                        Node {
                            peer_addr: peer,
                            api_addr: String::new(),
                        },
                        !r.is_learner,
                    )
                    .await?;
                self.member_list_after_change().await
            }
            "/v3/cluster/member/remove" => {
                let r: MemberIdRequest = decode(&body)?;
                self.replica.remove_member(r.id).await?;
                self.member_list_after_change().await
            }
            "/v3/cluster/member/promote" => {
                let r: MemberIdRequest = decode(&body)?;
                self.replica.promote(r.id).await?;
                self.member_list_after_change().await
            }
            "/v3/maintenance/status" => Ok(h::json(StatusCode::OK, &self.status())),
            "/v3/maintenance/transfer-leadership" => {
                let r: TransferLeadershipRequest = decode(&body)?;
                self.replica.transfer_leader(r.target_id).await?;
                Ok(h::json(
                    StatusCode::OK,
                    &serde_json::json!({ "header": self.header(self.replica.kv().revision()) }),
                ))
            }
            "/v3/maintenance/snapshot" => Ok(self.snapshot()),
            _ => Err(ApiError::NotFound(path)),
        }
    }

    async fn txn(&self, txn: store::TxnRequest) -> Result<store::TxnResponse, ApiError> {
        // Refuse bad input here, with the store's message, before it costs a Raft round.
        txn.validate(&store::Limits::default())?;
        match self.replica.write(Command::txn(txn)).await? {
            CommandResult::Txn(r) => Ok(r),
            other => Err(ApiError::Raft(flotilla_raft::Error::Internal(format!(
                "unexpected apply result {other:?}"
            )))),
        }
    }

    async fn range(&self, r: RangeRequest) -> ApiResult {
        // The chaos suite's planted bug (see Cargo.toml): no barrier, stale reads.
        if !r.serializable && !cfg!(feature = "chaos-bug-stale-read") {
            self.replica.read_barrier().await?;
        }
        let req = r.to_store();
        let kv = self.replica.kv().clone();
        let resp = if req.range_end.is_empty() {
            kv.range(&req)?
        } else {
            tokio::task::spawn_blocking(move || kv.range(&req))
                .await
                .map_err(|e| ApiError::BadRequest(e.to_string()))??
        };
        let header = self.header(resp.revision);
        Ok(h::json(
            StatusCode::OK,
            &RangeResponse::from_store(header, resp),
        ))
    }

    /// The member list once this replica has applied a change made through the leader.
    async fn member_list_after_change(&self) -> ApiResult {
        self.replica.read_barrier().await?;
        Ok(self.member_list())
    }

    fn member_list(&self) -> Response<Body> {
        let status = self.replica.status();
        let members = status
            .members
            .iter()
            .map(|m| Member {
                id: m.id,
                name: m.id.to_string(),
                peer_urls: vec![format!("http://{}", m.node.peer_addr)],
                client_urls: if m.node.api_addr.is_empty() {
                    vec![]
                } else {
                    vec![format!("http://{}", m.node.api_addr)]
                },
                is_learner: !m.voter,
            })
            .collect();
        h::json(
            StatusCode::OK,
            &MemberListResponse {
                header: self.header(status.revision),
                members,
            },
        )
    }

    fn status(&self) -> StatusResponse {
        let s = self.replica.status();
        let mut errors = Vec::new();
        if s.leader.is_none() {
            errors.push("no leader".to_string());
        }
        if s.db_size > s.quota_bytes {
            errors.push("database space exceeded".to_string());
        }
        StatusResponse {
            header: ResponseHeader {
                cluster_id: 0,
                member_id: s.id,
                revision: s.revision,
                raft_term: s.term,
            },
            version: env!("CARGO_PKG_VERSION").into(),
            db_size: s.db_size,
            db_quota: s.quota_bytes,
            leader: s.leader.unwrap_or(0),
            raft_index: s.last_log_index,
            raft_term: s.term,
            raft_commit_index: s.commit_index,
            raft_applied_index: s.applied_index,
            state: s.state.clone(),
            compact_revision: s.compact_revision,
            keys: s.keys,
            watchers: s.watchers as u64,
            is_learner: s.state == "learner",
            errors,
        }
    }

    /// Ready = the store is open, a quorum is reachable (this replica follows a known leader,
    /// or leads and hears from a majority), and it has applied everything it knows committed.
    fn readyz(&self, verbose: bool) -> Response<Body> {
        let s = self.replica.status();
        let quorum_limit = self.replica.quorum_timeout().as_millis() as u64;
        let quorum = match (s.state.as_str(), s.leader, s.millis_since_quorum_ack) {
            ("leader", _, Some(ms)) if ms <= quorum_limit => {
                (true, format!("leading; a majority answered {ms} ms ago"))
            }
            ("leader", _, ms) => (
                false,
                format!("leading, but no majority has answered for {ms:?} ms"),
            ),
            (_, Some(l), _) => (true, format!("following leader {l}")),
            (_, None, _) => (false, "no leader".to_string()),
        };
        let checks = [
            ("store", true, format!("revision {}", s.revision)),
            ("quorum", quorum.0, quorum.1),
            (
                "caught-up",
                s.applied_index >= s.commit_index,
                format!(
                    "applied {} of {} committed",
                    s.applied_index, s.commit_index
                ),
            ),
        ];
        let ok = checks.iter().all(|c| c.1);
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        if !verbose {
            return h::text(status, if ok { "ok" } else { "not ready" });
        }
        let mut out = String::new();
        for (name, pass, detail) in checks {
            out.push_str(&format!(
                "[{}] {name} {detail}\n",
                if pass { "+" } else { "-" }
            ));
        }
        out.push_str(if ok {
            "readyz check passed\n"
        } else {
            "readyz check failed\n"
        });
        h::text(status, out)
    }

    /// Streams a consistent export of the store (`flotilla ctl snapshot save`).
    fn snapshot(&self) -> Response<Body> {
        let (tx, body) = h::channel_body(16);
        let kv = self.replica.kv().clone();
        tokio::task::spawn_blocking(move || {
            let mut w = ChannelWriter {
                tx,
                buf: Vec::with_capacity(1 << 20),
            };
            match kv.export(&mut w) {
                Ok(info) => tracing::info!(
                    revision = info.revision,
                    rows = info.rows,
                    "streamed a snapshot"
                ),
                // The client sees a truncated stream, which `snapshot restore` rejects.
                Err(e) => tracing::warn!(%e, "snapshot stream failed"),
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .expect("static response parts are valid")
    }
}

/// Adapts the blocking export to a streamed body, 1 MiB at a time.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(1 << 20),
        ));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

fn strip_scheme(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

/// Bounded metric labels (verb, resource) for a path: known endpoints by name, everything
/// else as "other".
fn labels(path: &str) -> (&'static str, &'static str) {
    match path {
        "/v3/kv/range" => ("range", "kv"),
        "/v3/kv/put" => ("put", "kv"),
        "/v3/kv/deleterange" => ("deleterange", "kv"),
        "/v3/kv/txn" => ("txn", "kv"),
        "/v3/kv/compaction" => ("compact", "kv"),
        "/v3/watch" => ("watch", "kv"),
        "/v3/cluster/member/list" => ("list", "member"),
        "/v3/cluster/member/add" => ("add", "member"),
        "/v3/cluster/member/remove" => ("remove", "member"),
        "/v3/cluster/member/promote" => ("promote", "member"),
        "/v3/maintenance/status" => ("status", "maintenance"),
        "/v3/maintenance/transfer-leadership" => ("transfer_leadership", "maintenance"),
        "/v3/maintenance/snapshot" => ("snapshot", "maintenance"),
        "/healthz" | "/livez" | "/readyz" => ("get", "health"),
        "/metrics" => ("get", "metrics"),
        _ => ("other", "other"),
    }
}
