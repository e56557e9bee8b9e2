//! The agent's connection to the control plane: JSON requests to one replica at a time,
//! failing over to the next (with jittered backoff) when it does not answer.
//!
//! Owns the index of the replica in use. Invariants: a request that got an HTTP answer is
//! never retried elsewhere here (the caller decides, by status); a request that got no
//! answer moves the agent to the next replica; waits between full rounds are bounded
//! (50 ms doubling to 5 s, with jitter).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::Value;

use crate::client::Client;

/// A failover JSON client for the Kubernetes API.
pub struct Api {
    client: Client,
    current: AtomicUsize,
    /// Moves to another replica (`flotilla_agent_api_failovers_total`).
    failovers: prometheus::IntCounter,
}

/// An answer: status and JSON body (`Null` if it was not JSON).
pub type Answer = (u16, Value);

impl Api {
    /// A client for `servers` (`host:port`), with a per-request deadline.
    pub fn new(servers: Vec<String>, timeout: Duration) -> Api {
        Api::with_counter(
            servers,
            timeout,
            prometheus::IntCounter::new("unregistered", "unregistered").expect("valid metric"),
            None,
        )
    }

    /// A client counting its failovers in `failovers`.
    pub fn with_counter(
        servers: Vec<String>,
        timeout: Duration,
        failovers: prometheus::IntCounter,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Api {
        Api {
            client: Client::with_tls(servers, timeout, tls),
            current: AtomicUsize::new(0),
            failovers,
        }
    }

    /// Every replica it may use.
    pub fn servers(&self) -> Vec<String> {
        self.client.servers().to_vec()
    }

    /// The replica in use.
    pub fn server(&self) -> String {
        let s = self.client.servers();
        s[self.current.load(Ordering::Relaxed) % s.len()].clone()
    }

    /// Moves to the next replica.
    pub fn fail_over(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
        self.failovers.inc();
    }

    /// One request, trying each replica once until one answers.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<Answer, String> {
        let bytes = body
            .map(|b| serde_json::to_vec(b).expect("JSON encodes"))
            .unwrap_or_default();
        let n = self.client.servers().len();
        let mut errors = Vec::new();
        for _ in 0..n {
            let server = self.server();
            match self
                .client
                .send_raw(
                    method.clone(),
                    &server,
                    path,
                    content_type,
                    bytes.clone(),
                    None,
                )
                .await
            {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match resp.into_body().collect().await {
                        Ok(b) => {
                            let v = serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null);
                            // A replica without a quorum cannot serve: try another.
                            if status == 503 {
                                errors.push(format!("{server}: 503"));
                                self.fail_over();
                                continue;
                            }
                            return Ok((status, v));
                        }
                        Err(e) => errors.push(format!("{server}: {e}")),
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
            self.fail_over();
        }
        Err(errors.join("; "))
    }

    /// [`Api::call`], retried with backoff until it gets an answer or `deadline` passes.
    pub async fn call_retrying(
        &self,
        method: http::Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
        deadline: Duration,
    ) -> Result<Answer, String> {
        let until = tokio::time::Instant::now() + deadline;
        let mut wait = Duration::from_millis(50);
        loop {
            match self.call(method.clone(), path, content_type, body).await {
                Ok(a) => return Ok(a),
                Err(e) if tokio::time::Instant::now() + wait >= until => return Err(e),
                Err(e) => {
                    tracing::debug!(%e, ?wait, "no replica answered; backing off");
                    tokio::time::sleep(jitter(wait)).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Opens a watch (`path` includes `watch=true`) on the replica in use.
    pub async fn watch(&self, path: &str) -> Result<http::Response<hyper::body::Incoming>, String> {
        let server = self.server();
        self.client
            .get_stream(&server, path)
            .await
            .map_err(|e| e.to_string())
    }
}

/// `d` ± 20%.
pub fn jitter(d: Duration) -> Duration {
    let f = 0.8 + rand::random::<f64>() * 0.4;
    d.mul_f64(f)
}
