//! A client of the key-value API that talks to any of several replicas, used by
//! `flotilla ctl`, `flotilla up` and the integration tests.
//!
//! Failover: a request goes to the replica that answered last; it moves to the next replica
//! only when the request certainly did not take effect (the connection failed, or the replica
//! answered 503: no leader, no quorum, leader unreachable). A timeout (504) or any other
//! answer is returned as is, because retrying elsewhere could apply a write twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::gateway::json::ErrorBody;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No replica could be reached (or all said they were unavailable).
    #[error("no replica could serve the request: {}", .0.join("; "))]
    Unavailable(Vec<String>),
    /// A replica answered with an error.
    #[error("{server} answered {status}: {}", .body.error)]
    Api {
        /// The replica.
        server: String,
        /// HTTP status.
        status: u16,
        /// The error.
        body: ErrorBody,
    },
    /// No answer in time: a write may or may not have happened.
    #[error(
        "{server} did not answer within {timeout:?}; the request may or may not have taken effect"
    )]
    Timeout {
        /// The replica.
        server: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from {server}: {detail}")]
    Protocol {
        /// The replica.
        server: String,
        /// What was wrong.
        detail: String,
    },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A failover client over a list of replicas' API addresses (`host:port`).
pub struct Client {
    servers: Vec<String>,
    http: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<HttpConnector>,
        Full<Bytes>,
    >,
    /// `https` when the client has a TLS config, else `http`.
    scheme: &'static str,
    /// `Authorization: Bearer` on every request, when set.
    bearer: Option<http::HeaderValue>,
    preferred: AtomicUsize,
    timeout: Duration,
}

impl Client {
    /// A client for `servers`, with a per-request deadline, over plain HTTP.
    pub fn new(servers: Vec<String>, timeout: Duration) -> Client {
        Client::with_tls(servers, timeout, None)
    }

    /// A client for `servers` over HTTPS with `tls` (plain HTTP without).
    pub fn with_tls(
        servers: Vec<String>,
        timeout: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.enforce_http(false);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let tls = tls.map_or_else(
            || {
                // Only `http://` URLs are used without one; the builder wants a config.
                rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            },
            |t| (*t).clone(),
        );
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(connector);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Client {
            servers: servers
                .into_iter()
                .map(|s| {
                    s.trim()
                        .trim_start_matches("http://")
                        .trim_start_matches("https://")
                        .trim_end_matches('/')
                        .to_string()
                })
                .filter(|s| !s.is_empty())
                .collect(),
            http,
            scheme,
            bearer: None,
            preferred: AtomicUsize::new(0),
            timeout,
        }
    }

    /// Sends `token` as a bearer token with every request.
    pub fn with_bearer(mut self, token: &str) -> Client {
        self.bearer = http::HeaderValue::from_str(&format!("Bearer {token}")).ok();
        self
    }

    fn authorize(&self, b: http::request::Builder) -> http::request::Builder {
        match &self.bearer {
            Some(v) => b.header(http::header::AUTHORIZATION, v.clone()),
            None => b,
        }
    }

    /// The replicas this client knows.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// POSTs JSON to one replica and returns the raw response (status and streaming body).
    pub async fn post_raw(
        &self,
        server: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        self.send_raw(
            http::Method::POST,
            server,
            path,
            "application/json",
            body,
            timeout,
        )
        .await
    }

    /// Sends one request with a raw body to one replica (no retry, no failover).
    pub async fn send_raw(
        &self,
        method: http::Method,
        server: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let req = self
            .authorize(http::Request::builder())
            .method(method)
            .uri(format!("{}://{server}{path}", self.scheme))
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Protocol {
                server: server.into(),
                detail: e.to_string(),
            })?;
        let timeout = timeout.unwrap_or(self.timeout);
        match tokio::time::timeout(timeout, self.http.request(req)).await {
            Err(_) => Err(ClientError::Timeout {
                server: server.into(),
                timeout,
            }),
            Ok(Err(e)) if e.is_connect() => {
                Err(ClientError::Unavailable(vec![format!("{server}: {e:?}")]))
            }
            Ok(Err(e)) => Err(ClientError::Protocol {
                server: server.into(),
                detail: e.to_string(),
            }),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// GETs a path from one replica; returns status and body text.
    pub async fn get_text(&self, server: &str, path: &str) -> Result<(u16, String), ClientError> {
        let resp = self.get_stream(server, path).await?;
        let status = resp.status().as_u16();
        let body = read_all(server, resp.into_body(), self.timeout).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// GETs a path from one replica; the body is left to the caller to stream (watches).
    /// The deadline covers the response head only.
    pub async fn get_stream(
        &self,
        server: &str,
        path: &str,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let req = self
            .authorize(http::Request::get(format!(
                "{}://{server}{path}",
                self.scheme
            )))
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Protocol {
                server: server.into(),
                detail: e.to_string(),
            })?;
        let resp = match tokio::time::timeout(self.timeout, self.http.request(req)).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    server: server.into(),
                    timeout: self.timeout,
                })
            }
            Ok(Err(e)) => return Err(ClientError::Unavailable(vec![format!("{server}: {e}")])),
            Ok(Ok(r)) => r,
        };
        Ok(resp)
    }

    /// POSTs `req` to one replica and decodes the JSON answer.
    pub async fn post_to<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        server: &str,
        path: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let body = serde_json::to_vec(req).expect("request types serialize");
        let resp = self.post_raw(server, path, body, None).await?;
        let status = resp.status().as_u16();
        let bytes = read_all(server, resp.into_body(), self.timeout).await?;
        if status != 200 {
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                error: String::from_utf8_lossy(&bytes).into_owned(),
                code: 0,
                message: String::new(),
            });
            return Err(ClientError::Api {
                server: server.into(),
                status,
                body,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            server: server.into(),
            detail: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
        })
    }

    /// POSTs `req` to the preferred replica, failing over while the request certainly did not
    /// take effect.
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let mut failures = Vec::new();
        let n = self.servers.len();
        if n == 0 {
            return Err(ClientError::Unavailable(vec!["no servers given".into()]));
        }
        let start = self.preferred.load(Ordering::Relaxed) % n;
        for i in 0..n {
            let idx = (start + i) % n;
            let server = &self.servers[idx];
            match self.post_to(server, path, req).await {
                Ok(r) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(r);
                }
                Err(ClientError::Unavailable(mut why)) => failures.append(&mut why),
                Err(ClientError::Api {
                    status: 503, body, ..
                }) => failures.push(format!("{server}: {}", body.error)),
                Err(e) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Err(ClientError::Unavailable(failures))
    }
}

/// Reads a whole body within `timeout`.
pub async fn read_all(
    server: &str,
    body: Incoming,
    timeout: Duration,
) -> Result<Bytes, ClientError> {
    match tokio::time::timeout(timeout, body.collect()).await {
        Err(_) => Err(ClientError::Timeout {
            server: server.into(),
            timeout,
        }),
        Ok(Err(e)) => Err(ClientError::Protocol {
            server: server.into(),
            detail: format!("reading the answer: {e}"),
        }),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}
