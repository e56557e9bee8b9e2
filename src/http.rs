//! HTTP plumbing shared by the API server and the CLI: a response body type that can be
//! whole or streamed, bounded request bodies, JSON answers, and an accept loop with graceful
//! shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{header, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A response body: whole or streamed.
pub type Body = BoxBody<Bytes, Infallible>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A streamed body fed by a bounded channel; dropping the sender ends it.
pub fn channel_body(capacity: usize) -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let stream = tokio_stream_from(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("response types serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("static response parts are valid")
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(body.into()))
        .expect("static response parts are valid")
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// It exceeded the limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The connection failed while reading it.
    #[error("reading the request body: {0}")]
    Read(String),
}

/// Reads a whole request body of at most `limit` bytes.
pub async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if out.len() + data.len() > limit {
            // The rest is read and dropped (bounded, briefly), so that a client still
            // sending gets the 413 instead of a reset connection.
            let mut dropped = out.len() + data.len();
            let drain = async {
                while let Some(Ok(f)) = body.frame().await {
                    dropped += f.data_ref().map_or(0, |d| d.len());
                    if dropped > DRAIN_LIMIT {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
            return Err(BodyError::TooLarge(limit));
        }
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

/// How much of an oversized body is read and dropped before the 413.
const DRAIN_LIMIT: usize = 64 << 20;

/// The id of the request being handled (a request extension).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The request's id: the client's `X-Request-Id` when it is short and plain (letters,
/// digits, `-`, `_`, `.`; at most 64), else 16 new hex digits.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections a listener queues before it accepts them (the kernel caps it at
/// `net.core.somaxconn`, 4096 here). The default of 128 overflowed when thousands of node
/// agents reconnected at once: their connects timed out in the queue and were retried,
/// and the server then spent its time accepting connections their clients had given up on.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with a backlog of [`LISTEN_BACKLOG`] (as Go's `net.Listen`,
/// which kube-apiserver and etcd use, takes `somaxconn`).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Finishes the TLS handshake of an accepted connection (when `tls`), and says what the
/// connection tells of its client. `None`: the handshake failed (logged).
pub async fn accept_tls(
    stream: tokio::net::TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Option<(
    tokio_util::either::Either<
        tokio::net::TcpStream,
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    >,
    crate::tls::Conn,
)> {
    use tokio_util::either::Either;
    let remote = stream.peer_addr().ok();
    let Some(acceptor) = tls else {
        return Some((
            Either::Left(stream),
            crate::tls::Conn {
                remote,
                ..Default::default()
            },
        ));
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => {
            let cert = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(crate::tls::identity);
            Some((
                Either::Right(s),
                crate::tls::Conn {
                    tls: true,
                    cert,
                    remote,
                },
            ))
        }
        Ok(Err(e)) => {
            tracing::debug!(%e, "TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// Serves connections from `listener` with `handler` until `shutdown`, then gives open
/// connections `grace` to finish. With `tls`, connections are TLS (a failed handshake is
/// dropped) and each request carries a [`crate::tls::Conn`] extension saying what the
/// client's certificate proved.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    handler: H,
    shutdown: CancellationToken,
    grace: Duration,
) where
    H: Fn(http::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let tracker = tokio_util::task::TaskTracker::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let token = shutdown.clone();
        let acceptor = acceptor.clone();
        tracker.spawn(async move {
            let Some((stream, conn_info)) = accept_tls(stream, acceptor.as_ref()).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(conn_info.clone());
                // Every request runs in a span carrying its id (the client's `X-Request-Id`,
                // or a new one), so whatever it logs on this replica (forwarding to the
                // leader included) says which request it was; the response carries the id.
                let id = request_id(req.headers());
                req.extensions_mut().insert(RequestId(id.clone()));
                let span = tracing::info_span!(
                    "request",
                    id = %id,
                    method = %req.method(),
                    path = %req.uri().path()
                );
                // The id also rides with the writes the request makes (into the Raft log:
                // every replica's apply logs it).
                let fut =
                    flotilla_raft::with_request_id(id.clone(), span.in_scope(|| handler(req)));
                let started = std::time::Instant::now();
                async move {
                    let mut resp = fut.await;
                    tracing::debug!(
                        status = resp.status().as_u16(),
                        micros = started.elapsed().as_micros() as u64,
                        "request served"
                    );
                    if let Ok(v) = http::HeaderValue::from_str(&id) {
                        resp.headers_mut().insert("x-request-id", v);
                    }
                    Ok::<_, Infallible>(resp)
                }
                .instrument(span)
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(hyper_util::rt::TokioTimer::new());
            builder.http2().timer(hyper_util::rt::TokioTimer::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(%e, "connection ended");
                },
                _ = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(grace, tracker.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of connections far beyond the old backlog (128) all get in while nothing
    /// accepts: none waits out a dropped SYN.
    #[tokio::test]
    async fn a_burst_of_connections_queues_without_being_accepted() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // The kernel caps the backlog at `net.core.somaxconn` (4096 on current kernels).
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let mut held = Vec::new();
        for i in 0..1000.min(cap) {
            let c = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not queued"))
            .unwrap();
            held.push(c);
        }
        drop(listener);
    }
}
