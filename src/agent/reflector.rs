//! The agent's list+watch of one resource (a reflector, as client-go calls it), failing over
//! between replicas.
//!
//! It lists, hands the whole list over, then watches from the list's `resourceVersion`,
//! handing over every change; when a watch ends it resumes from the last revision seen on
//! the next replica that answers, and relists after a 410. The first list is a consistent
//! read; a relist asks for a state not older than the last revision seen
//! (`resourceVersion=N`, as client-go's reflector relists), which a replica serves from its
//! watch cache without a read barrier, or refuses (504, too large) if it is behind: then
//! the agent tries another replica with a consistent list. The consumer keeps what it needs
//! of the objects: the reflector keeps nothing but the revision. Objects are handed over
//! without `metadata.managedFields` (nothing in the agent reads field ownership; on a pod it
//! is nearly half of the parsed object, which the agent keeps for every pod it runs).
//!
//! Invariants: changes are handed over in the order the server sent them, never one older
//! than a list already handed over; a stream silent for longer than the server's bookmark
//! period (a partitioned replica), or on a replica the agent's other requests have given up
//! on, is abandoned; waits between attempts are bounded (100 ms doubling to 5 s, jittered).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::Value;

use super::api::{jitter, Api};

/// One thing a reflector hands over.
pub enum Change {
    /// The whole current state: everything not in it is gone.
    Listed(Vec<Value>),
    /// An object created or changed.
    Applied(Value),
    /// An object deleted (its last state).
    Deleted(Value),
}

/// What a reflector watches.
pub struct Target<'a> {
    /// The collection's path, e.g. `/api/v1/pods`.
    pub path: &'a str,
    /// Query parameters (selectors), without `?`; may be empty.
    pub query: &'a str,
    /// A short name for metrics and logs (`pods`, `services`).
    pub resource: &'static str,
}

/// The longest a watch stream may stay silent (the server sends bookmarks more often).
const SILENCE: Duration = Duration::from_secs(90);
/// Most bytes of one watch line (a bigger one ends the stream, which then resumes).
const MAX_LINE: usize = 16 << 20;

/// Runs forever: lists and watches `target` through `api`, handing each change to `on`.
/// `restarts` counts ended watches by resource and reason.
pub async fn run(
    api: Arc<Api>,
    target: Target<'_>,
    restarts: prometheus::IntCounterVec,
    mut on: impl FnMut(Change),
) {
    let sep = if target.query.is_empty() { "" } else { "&" };
    let restart = |why: &str| restarts.with_label_values(&[target.resource, why]).inc();
    let mut backoff = Duration::from_millis(100);
    // The revision a relist must not be older than (none: a consistent list).
    let mut relist_from: Option<String> = None;
    loop {
        let at = match relist_from.take() {
            Some(rv) => format!("{sep}resourceVersion={rv}"),
            None => String::new(),
        };
        let list = api
            .call_retrying(
                http::Method::GET,
                &format!("{}?{}{at}", target.path, target.query),
                "application/json",
                None,
                Duration::from_secs(3600),
            )
            .await;
        let list = match list {
            Ok((200, list)) => list,
            Ok((status, body)) => {
                // A replica still loading its watch cache (429), or without a quorum (503):
                // another replica may answer.
                if status == 429 || status >= 500 {
                    tracing::debug!(resource = target.resource, status, %body, "list refused; trying another replica");
                    api.fail_over();
                } else {
                    tracing::warn!(resource = target.resource, status, %body, "list refused");
                }
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => {
                tracing::warn!(resource = target.resource, %e, "listing");
                continue;
            }
        };
        let mut rv = list
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("0")
            .to_string();
        let mut items = match list {
            Value::Object(mut m) => match m.remove("items") {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        for item in &mut items {
            if let Some(meta) = item.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("managedFields");
            }
        }
        on(Change::Listed(items));
        // Watch from there until it ends; then resume (or relist after a 410).
        loop {
            let path = format!(
                "{}?{}{sep}watch=true&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=300",
                target.path, target.query
            );
            let resp = match api.watch(&path).await {
                Ok(r) if r.status() == 200 => r,
                Ok(r) if r.status() == 410 => {
                    relist_from = Some(rv);
                    break;
                }
                Ok(r) => {
                    tracing::debug!(
                        resource = target.resource,
                        status = r.status().as_u16(),
                        "watch refused"
                    );
                    api.fail_over();
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(e) => {
                    tracing::debug!(resource = target.resource, %e, "watch failed; trying another replica");
                    api.fail_over();
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            let mut expired = false;
            let watching = api.server();
            let mut last_data = tokio::time::Instant::now();
            'stream: loop {
                let frame = match tokio::time::timeout(Duration::from_secs(1), body.frame()).await {
                    Err(_) if api.server() != watching => {
                        restart("failover");
                        break 'stream;
                    }
                    Err(_) if last_data.elapsed() < SILENCE => continue,
                    other => other,
                };
                last_data = tokio::time::Instant::now();
                let Ok(Some(Ok(frame))) = frame else {
                    restart(if matches!(frame, Ok(None)) {
                        "ended"
                    } else {
                        "error"
                    });
                    api.fail_over();
                    break 'stream;
                };
                if let Some(d) = frame.data_ref() {
                    buf.extend_from_slice(d);
                }
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let Ok(Value::Object(mut ev)) = crate::api::objects::lean_json(&line) else {
                        continue;
                    };
                    let obj = ev.remove("object").unwrap_or(Value::Null);
                    let kind = ev.get("type").and_then(Value::as_str).unwrap_or("");
                    if kind == "ERROR" {
                        expired = obj.get("code").and_then(Value::as_u64) == Some(410);
                        restart(if expired { "expired" } else { "error" });
                        break 'stream;
                    }
                    if let Some(v) = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                    {
                        rv = v.to_string();
                    }
                    match kind {
                        "ADDED" | "MODIFIED" => on(Change::Applied(obj)),
                        "DELETED" => on(Change::Deleted(obj)),
                        _ => {}
                    }
                }
                if buf.len() > MAX_LINE {
                    restart("error");
                    break 'stream;
                }
            }
            if expired {
                relist_from = Some(rv);
                break;
            }
        }
    }
}
