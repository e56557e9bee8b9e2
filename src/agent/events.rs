//! Events the agent records about its pods (the kubelet's `Started`, `Killing`,
//! `Unhealthy`, `BackOff`, `Failed`), so `kubectl describe pod` shows them.
//!
//! Owns a bounded queue and one writer task. Best effort: a full queue drops the event, a
//! failed write is not retried. A repeat of the same (pod, reason, message) bumps the
//! existing Event's `count` and `lastTimestamp` instead of writing a new one.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::Api;
use crate::api::meta;
use crate::controllers::owner;

/// Events waiting to be written, at most.
const QUEUE: usize = 1024;
/// Distinct events remembered for de-duplication, at most.
const REMEMBERED: usize = 4096;

/// One event to record.
struct Record {
    pod: Arc<Value>,
    container: Option<String>,
    warning: bool,
    reason: &'static str,
    message: String,
}

/// A handle to the event writer.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Record>,
}

impl Events {
    /// Starts the writer for node `node`.
    pub fn start(api: Arc<Api>, node: String) -> Events {
        let (tx, mut rx) = mpsc::channel::<Record>(QUEUE);
        tokio::spawn(async move {
            // (pod uid, reason, message) → (namespace, event name, count)
            let mut seen: HashMap<(String, &'static str, String), (String, String, u64)> =
                HashMap::new();
            while let Some(r) = rx.recv().await {
                let ns = owner::namespace(&r.pod).unwrap_or("default").to_string();
                let key = (owner::uid(&r.pod).to_string(), r.reason, r.message.clone());
                let now = meta::rfc3339(meta::now_secs());
                if let Some((ns, name, count)) = seen.get_mut(&key) {
                    *count += 1;
                    let patch = json!({"count": *count, "lastTimestamp": now});
                    let _ = api
                        .call(
                            http::Method::PATCH,
                            &format!("/api/v1/namespaces/{ns}/events/{name}"),
                            "application/merge-patch+json",
                            Some(&patch),
                        )
                        .await;
                    continue;
                }
                let mut involved = json!({"apiVersion": "v1", "kind": "Pod", "namespace": ns,
                    "name": owner::name(&r.pod), "uid": owner::uid(&r.pod)});
                if let Some(c) = &r.container {
                    involved["fieldPath"] = json!(format!("spec.containers{{{c}}}"));
                }
                let event = json!({"apiVersion": "v1", "kind": "Event",
                    "metadata": {"generateName": format!("{}.", owner::name(&r.pod)), "namespace": ns},
                    "involvedObject": involved,
                    "reason": r.reason, "message": r.message,
                    "type": if r.warning { "Warning" } else { "Normal" },
                    "source": {"component": "kubelet", "host": node},
                    "reportingComponent": "kubelet", "reportingInstance": node,
                    "firstTimestamp": now, "lastTimestamp": now, "count": 1});
                if let Ok((201, made)) = api
                    .call(
                        http::Method::POST,
                        &format!("/api/v1/namespaces/{ns}/events"),
                        "application/json",
                        Some(&event),
                    )
                    .await
                {
                    if seen.len() >= REMEMBERED {
                        seen.clear();
                    }
                    seen.insert(key, (ns, owner::name(&made).to_string(), 1));
                }
            }
        });
        Events { tx }
    }

    /// Records a Normal event about `pod` (and `container`).
    pub fn normal(
        &self,
        pod: &Arc<Value>,
        container: Option<&str>,
        reason: &'static str,
        message: String,
    ) {
        self.send(pod, container, false, reason, message);
    }

    /// Records a Warning event about `pod` (and `container`).
    pub fn warning(
        &self,
        pod: &Arc<Value>,
        container: Option<&str>,
        reason: &'static str,
        message: String,
    ) {
        self.send(pod, container, true, reason, message);
    }

    fn send(
        &self,
        pod: &Arc<Value>,
        container: Option<&str>,
        warning: bool,
        reason: &'static str,
        message: String,
    ) {
        let _ = self.tx.try_send(Record {
            pod: pod.clone(),
            container: container.map(str::to_string),
            warning,
            reason,
            message,
        });
    }
}
