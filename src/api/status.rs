//! Kubernetes `Status` errors, encoded byte for byte as the Go API server encodes them:
//! fields in the order `kind, apiVersion, metadata, status, message, reason,
//! details{name, group, kind, causes}, code`, empty fields left out, compact, ending in `\n`
//! (clients compare the text).
//!
//! This is the only place where failures become HTTP answers for the Kubernetes API.

use http::{Response, StatusCode};
use serde::Serialize;

use super::resources::Resource;
use crate::http::{full, Body};

/// One cause of an `Invalid` (or other) failure.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Cause {
    /// Machine-readable reason (`FieldValueRequired`, `FieldValueInvalid`, ...).
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// The field path (`metadata.name`); left out when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub field: String,
}

#[derive(Serialize)]
struct Details<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    group: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    kind: &'a str,
    #[serde(skip_serializing_if = "<[Cause]>::is_empty")]
    causes: &'a [Cause],
    #[serde(rename = "retryAfterSeconds", skip_serializing_if = "is_zero")]
    retry_after_seconds: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct Wire<'a> {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: serde_json::Map<String, serde_json::Value>,
    status: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details<'a>>,
    code: u16,
}

/// A failed Kubernetes API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeError {
    /// HTTP status.
    pub code: u16,
    /// `reason` (`NotFound`, `Conflict`, ...); empty for none.
    pub reason: &'static str,
    /// `message`.
    pub message: String,
    /// `details` (boxed: errors travel through many `Result`s and should stay small).
    pub details: Box<ErrorDetails>,
}

/// The `details` of a Status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorDetails {
    /// `details.name`.
    pub name: String,
    /// `details.group`.
    pub group: String,
    /// `details.kind` (the plural resource for most errors, the Kind for `Invalid`).
    pub kind: String,
    /// `details.causes`.
    pub causes: Vec<Cause>,
    /// `details.retryAfterSeconds` (0: left out).
    pub retry_after_seconds: u32,
}

impl std::fmt::Display for KubeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl KubeError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> KubeError {
        KubeError {
            code,
            reason,
            message: message.into(),
            details: Box::default(),
        }
    }

    fn about(mut self, r: &Resource, name: &str) -> KubeError {
        self.details.name = name.to_string();
        self.details.group = r.group.to_string();
        self.details.kind = r.plural.to_string();
        self
    }

    /// 403 about an object.
    pub fn forbidden(r: &Resource, name: &str, message: String) -> KubeError {
        KubeError::new(403, "Forbidden", message).about(r, name)
    }

    /// 422 for a patch that does not apply.
    pub fn invalid_patch(message: String) -> KubeError {
        KubeError::new(
            422,
            "Invalid",
            format!("the server rejected our request due to an error in our request: {message}"),
        )
    }

    /// 404 for an object.
    pub fn not_found(r: &Resource, name: &str) -> KubeError {
        KubeError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        )
        .about(r, name)
    }

    /// 404 for a path the server does not serve.
    pub fn no_route() -> KubeError {
        KubeError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// 409 on create.
    pub fn already_exists(r: &Resource, name: &str) -> KubeError {
        KubeError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", r.qualified()),
        )
        .about(r, name)
    }

    /// 409 on a stale `resourceVersion`.
    pub fn conflict(r: &Resource, name: &str) -> KubeError {
        KubeError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                r.qualified()
            ),
        )
        .about(r, name)
    }

    /// 422 for invalid request options (`PatchOptions`, `CreateOptions`, ...), as the Go
    /// server reports them.
    pub fn invalid_options(kind: &str, field: &str, message: &str) -> KubeError {
        let mut e = KubeError::new(
            422,
            "Invalid",
            format!("{kind}.meta.k8s.io \"\" is invalid: {field}: {message}"),
        );
        e.details.group = "meta.k8s.io".into();
        e.details.kind = kind.into();
        e.details.causes = vec![Cause {
            reason: if message.starts_with("Forbidden") {
                "FieldValueForbidden".into()
            } else {
                "FieldValueInvalid".into()
            },
            message: message.into(),
            field: field.into(),
        }];
        e
    }

    /// 409 for a server-side apply that would change fields other managers own (details
    /// carry only the causes, as the Go server's `NewApplyConflict`).
    pub fn apply_conflict(message: String, causes: Vec<Cause>) -> KubeError {
        let mut e = KubeError::new(409, "Conflict", message);
        e.details.causes = causes;
        e
    }

    /// 422 with causes; `details.kind` is the Kind.
    pub fn invalid(r: &Resource, name: &str, causes: Vec<Cause>) -> KubeError {
        let list = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect::<Vec<_>>();
        let summary = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        KubeError {
            code: 422,
            reason: "Invalid",
            message: format!("{} \"{name}\" is invalid: {summary}", r.kind),
            details: Box::new(ErrorDetails {
                name: name.to_string(),
                group: r.group.to_string(),
                kind: r.kind.to_string(),
                causes,
                retry_after_seconds: 0,
            }),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> KubeError {
        KubeError::new(400, "BadRequest", message)
    }

    /// 410 for a compacted `resourceVersion`.
    pub fn expired(requested: i64, current: i64) -> KubeError {
        KubeError::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({current})"),
        )
    }

    /// 413.
    pub fn too_large(limit: usize) -> KubeError {
        KubeError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// 415.
    pub fn unsupported_media(got: &str, accepted: &[&str]) -> KubeError {
        KubeError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {} (got {got:?}; protobuf is read only for Namespace, ServiceAccount, ConfigMap, Secret, Service, Deployment and Job: send JSON, e.g. kubectl create -f FILE)",
                accepted.join(", ")
            ),
        )
    }

    /// 401: no credentials, or ones that do not authenticate (Kubernetes' body exactly).
    pub fn unauthorized() -> KubeError {
        KubeError::new(401, "Unauthorized", "Unauthorized")
    }

    /// 403 for a request as a whole (a path, not an object).
    pub fn forbidden_path(message: impl Into<String>) -> KubeError {
        KubeError::new(403, "Forbidden", message)
    }

    /// 429: too much work queued; retry later.
    pub fn too_many_requests(message: String) -> KubeError {
        KubeError::new(429, "TooManyRequests", message)
    }

    /// 405.
    pub fn method_not_allowed(method: &str) -> KubeError {
        KubeError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    /// 503 (no leader, no quorum).
    pub fn unavailable(message: impl Into<String>) -> KubeError {
        KubeError::new(503, "ServiceUnavailable", message)
    }

    /// 504 (outcome unknown).
    pub fn timeout(message: impl Into<String>) -> KubeError {
        KubeError::new(504, "Timeout", message)
    }

    /// 504 for a read that asked for a `resourceVersion` newer than this replica holds,
    /// after waiting for it (as kube-apiserver's watch cache answers; client-go's reflector
    /// then relists, and the node agent tries another replica).
    pub fn too_large_resource_version(requested: i64, current: i64) -> KubeError {
        let mut e = KubeError::new(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {requested}, current: {current}"),
        );
        e.details.causes.push(Cause {
            reason: "ResourceVersionTooLarge".into(),
            message: "Too large resource version".into(),
            field: String::new(),
        });
        e.details.retry_after_seconds = 1;
        e
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> KubeError {
        KubeError::new(500, "InternalError", message)
    }

    /// 507 (store over quota).
    pub fn no_space(message: impl Into<String>) -> KubeError {
        KubeError::new(507, "InternalError", message)
    }

    /// The Status object as bytes (with the trailing newline).
    pub fn body(&self) -> Vec<u8> {
        let d = &self.details;
        let details = (!d.name.is_empty()
            || !d.group.is_empty()
            || !d.kind.is_empty()
            || !d.causes.is_empty()
            || d.retry_after_seconds != 0)
            .then_some(Details {
                name: &d.name,
                group: &d.group,
                kind: &d.kind,
                causes: &d.causes,
                retry_after_seconds: d.retry_after_seconds,
            });
        let wire = Wire {
            kind: "Status",
            api_version: "v1",
            metadata: serde_json::Map::new(),
            status: "Failure",
            message: &self.message,
            reason: self.reason,
            details,
            code: self.code,
        };
        let mut out = serde_json::to_vec(&wire).expect("status serializes");
        out.push(b'\n');
        out
    }

    /// The HTTP answer.
    pub fn response(&self) -> Response<Body> {
        let mut b = Response::builder()
            .status(StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header(http::header::CONTENT_TYPE, "application/json");
        // client-go waits this long and retries a 429 by itself; kube-apiserver also sends
        // the header with any Status that carries `retryAfterSeconds`.
        if self.code == 429 {
            b = b.header(http::header::RETRY_AFTER, "1");
        } else if self.details.retry_after_seconds > 0 {
            b = b.header(
                http::header::RETRY_AFTER,
                self.details.retry_after_seconds.to_string(),
            );
        }
        b.body(full(self.body()))
            .expect("static response parts are valid")
    }

    /// 429 for a list or watch the resource's watch cache would serve, while it is still
    /// loading on this replica (as kube-apiserver's cacher answers): served from the store
    /// instead, each of thousands of node agents reconnecting to a restarted replica read
    /// and parsed every pod, and the replica ran out of memory.
    pub fn initializing() -> KubeError {
        KubeError::too_many_requests("storage is (re)initializing".into())
    }

    /// The Status object as JSON, for watch `ERROR` events.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body()).expect("status is JSON")
    }
}

impl From<flotilla_raft::Error> for KubeError {
    fn from(e: flotilla_raft::Error) -> KubeError {
        use flotilla_raft::Error as R;
        match &e {
            R::NoLeader { .. }
            | R::NoQuorum { .. }
            | R::NotLeader { .. }
            | R::Unreachable { .. }
            | R::Stopped(_) => KubeError::unavailable(e.to_string()),
            R::Timeout { .. } | R::QuorumLost { .. } | R::Interrupted(_) => {
                KubeError::timeout(e.to_string())
            }
            R::Apply(flotilla_raft::ApplyError::Compacted {
                requested,
                compact_revision,
            }) => KubeError::expired(*requested, *compact_revision),
            R::NoSpace(m) => KubeError::no_space(m.clone()),
            R::Invalid(m) => KubeError::bad_request(m.clone()),
            R::Busy(m) => KubeError::too_many_requests(m.clone()),
            // Leader-only writes from a term that is over: nothing was written.
            R::Apply(flotilla_raft::ApplyError::Fenced { .. }) => {
                KubeError::new(409, "Conflict", e.to_string())
            }
            _ => KubeError::internal(e.to_string()),
        }
    }
}

impl From<flotilla_store::Error> for KubeError {
    fn from(e: flotilla_store::Error) -> KubeError {
        match e {
            flotilla_store::Error::Compacted {
                requested,
                compact_revision,
            } => KubeError::expired(requested, compact_revision),
            flotilla_store::Error::FutureRevision { requested, current } => KubeError::new(
                504,
                "Timeout",
                format!("Too large resource version: {requested}, current: {current}"),
            ),
            flotilla_store::Error::InvalidRequest(m) => KubeError::bad_request(m),
            other => KubeError::internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::find;

    #[test]
    fn not_found_is_encoded_exactly_as_the_go_server_does() {
        let pods = find("", "v1", "configmaps").unwrap();
        let body = String::from_utf8(KubeError::not_found(pods, "nope").body()).unwrap();
        assert_eq!(
            body,
            "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\"message\":\"configmaps \\\"nope\\\" not found\",\"reason\":\"NotFound\",\"details\":{\"name\":\"nope\",\"kind\":\"configmaps\"},\"code\":404}\n"
        );
    }

    #[test]
    fn invalid_names_the_kind_and_lists_causes() {
        let cm = find("", "v1", "configmaps").unwrap();
        let e = KubeError::invalid(
            cm,
            "",
            vec![Cause {
                reason: "FieldValueRequired".into(),
                message: "Required value: name or generateName is required".into(),
                field: "metadata.name".into(),
            }],
        );
        assert_eq!(
            e.message,
            "ConfigMap \"\" is invalid: metadata.name: Required value: name or generateName is required"
        );
        let body = String::from_utf8(e.body()).unwrap();
        assert!(body.contains("\"details\":{\"kind\":\"ConfigMap\",\"causes\":[{\"reason\":\"FieldValueRequired\""), "{body}");
    }

    #[test]
    fn too_large_resource_version_is_encoded_as_the_go_server_does_and_asks_for_a_retry() {
        let e = KubeError::too_large_resource_version(3047, 3044);
        let body = String::from_utf8(e.body()).unwrap();
        assert_eq!(
            body,
            "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\"message\":\"Timeout: Too large resource version: 3047, current: 3044\",\"reason\":\"Timeout\",\"details\":{\"causes\":[{\"reason\":\"ResourceVersionTooLarge\",\"message\":\"Too large resource version\"}],\"retryAfterSeconds\":1},\"code\":504}\n"
        );
        let resp = e.response();
        assert_eq!(resp.status(), 504);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
        // Without retryAfterSeconds, no header (but for 429).
        let plain = KubeError::timeout("slow").response();
        assert!(plain.headers().get(http::header::RETRY_AFTER).is_none());
    }
}
