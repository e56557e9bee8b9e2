//! The peer transport, server side: one HTTP listener per replica for Raft RPCs and
//! forwarded requests. Bodies are bincode and bounded; every handler answers in bincode, with
//! errors as values, so a peer never has to parse an HTTP error page.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::network::MAX_PEER_BODY;
use crate::replica::{ForwardRequest, ForwardResponse, Replica};
use crate::types::{decode, encode, TypeConfig};

/// How long a peer has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts peer connections until `shutdown`; with `tls`, only those that complete a
/// handshake with it (which requires a client certificate of the cluster).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<(std::sync::Arc<rustls::ServerConfig>, crate::replica::IsPeer)>,
    replica: Replica,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(|(config, is_peer)| (tokio_rustls::TlsAcceptor::from(config), is_peer));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(%e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let replica = replica.clone();
        let token = shutdown.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let stream = match acceptor {
                None => tokio_util::either::Either::Left(stream),
                Some((a, is_peer)) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(stream)).await {
                        Ok(Ok(s)) => {
                            // Only replicas: the CA also signs agents' and administrators'.
                            let leaf = s.get_ref().1.peer_certificates().and_then(|c| c.first());
                            if !leaf.is_some_and(|c| is_peer(c.as_ref())) {
                                tracing::warn!(
                                    "peer connection refused: not a replica's certificate"
                                );
                                return;
                            }
                            tokio_util::either::Either::Right(s)
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%e, "peer TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!("peer TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let svc = hyper::service::service_fn(move |req| handle(replica.clone(), req));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(8 << 20)
                .max_concurrent_streams(4096);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = token.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(%e, "peer connection ended");
                },
            }
        });
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/x-bincode")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn handle(
    replica: Replica,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::POST {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, b"POST only".to_vec()));
    }
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), MAX_PEER_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                e.to_string().into_bytes(),
            ))
        }
    };
    let raft = replica.raft().clone();
    let bad = |e: String| {
        reply(
            StatusCode::BAD_REQUEST,
            format!("undecodable request: {e}").into_bytes(),
        )
    };
    let resp = match path.as_str() {
        "/raft/append" => match decode::<AppendEntriesRequest<TypeConfig>>(&body) {
            Ok(rpc) => reply(StatusCode::OK, encode(&raft.append_entries(rpc).await)),
            Err(e) => bad(e),
        },
        "/raft/vote" => match decode::<VoteRequest<u64>>(&body) {
            Ok(rpc) => reply(StatusCode::OK, encode(&raft.vote(rpc).await)),
            Err(e) => bad(e),
        },
        "/raft/snapshot" => match decode::<InstallSnapshotRequest<TypeConfig>>(&body) {
            Ok(rpc) => reply(StatusCode::OK, encode(&raft.install_snapshot(rpc).await)),
            Err(e) => bad(e),
        },
        "/raft/forward" => match decode::<ForwardRequest>(&body) {
            Ok(fwd) => {
                let deadline = Instant::now() + replica.request_timeout();
                let result: Result<ForwardResponse, Error> =
                    replica.handle_local(fwd, deadline).await;
                reply(StatusCode::OK, encode(&result))
            }
            Err(e) => bad(e),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            format!("no peer endpoint {path}").into_bytes(),
        ),
    };
    Ok(resp)
}
