//! The peer transport, client side: Raft RPCs and forwarded requests over HTTP/2.
//!
//! One multiplexed HTTP/2 connection per peer (hyper's pool), bincode bodies, a deadline on
//! every call. Connections originate from this replica's own peer address, so firewall rules
//! that partition loopback addresses see the right source. Errors say whether the request
//! may have reached the peer: only a failed connect is certainly "not sent".

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{decode, encode, encode_sized, encoded_len, Node, NodeId, TypeConfig};

/// Largest response body accepted from a peer.
pub(crate) const MAX_PEER_BODY: usize = 64 << 20;
/// An append-entries request larger than this is split (openraft retries with fewer
/// entries). openraft 0.9 gives an append the heartbeat interval (50 ms by default) and drops
/// it after that; a follower that gets no append for an election timeout starts an
/// election. Multi-megabyte appends on a loaded machine ran over and cost the leader its
/// term (a 14 s stall of a 50,000-pod scheduling benchmark), so an append stays small enough
/// to be sent, decoded and synced well inside that window.
const MAX_APPEND_BYTES: usize = 2 << 20;

/// How a peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Could not connect: the request was not sent.
    #[error("connect: {0}")]
    Connect(String),
    /// No answer before the deadline: the request may have been processed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Another failure after sending: the request may have been processed.
    #[error("{0}")]
    Other(String),
}

/// A shared HTTP/2 client for every peer of this replica.
#[derive(Clone)]
pub struct PeerClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `https` with TLS, else `http`.
    scheme: &'static str,
}

impl PeerClient {
    /// A client whose connections originate from `local_ip` (when given), over TLS with
    /// `tls` (when given).
    pub fn new(local_ip: Option<IpAddr>, tls: Option<Arc<rustls::ClientConfig>>) -> PeerClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_local_address(local_ip.filter(|ip| !ip.is_unspecified()));
        connector.enforce_http(false);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let tls = tls.unwrap_or_else(|| {
            // Never used for `http://` URLs; the builder wants a config.
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
        });
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .build(connector);
        PeerClient { client, scheme }
    }

    /// POSTs `body` to `http://{addr}{path}` and returns the response body.
    pub async fn call(
        &self,
        addr: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let req = http::Request::post(format!("{}://{addr}{path}", self.scheme))
            .header(http::header::CONTENT_TYPE, "application/x-bincode")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CallError::Other(e.to_string()))?;
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    CallError::Connect(format!("{e:?}"))
                } else {
                    CallError::Other(e.to_string())
                }
            })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_PEER_BODY)
                .collect()
                .await
                .map_err(|e| CallError::Other(format!("reading response: {e}")))?
                .to_bytes();
            if !status.is_success() {
                return Err(CallError::Other(format!(
                    "peer answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
            Ok(body)
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }

    /// A typed bincode call.
    pub async fn rpc<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let body = self.call(addr, path, encode(req), timeout).await?;
        decode(&body).map_err(|e| CallError::Other(format!("decoding peer response: {e}")))
    }
}

/// Tracks peers' reachability so a dead peer is logged once, not on every heartbeat.
pub trait PeerObserver: Send + Sync + 'static {
    /// A call to `target` succeeded.
    fn ok(&self, _target: NodeId) {}
    /// A call to `target` failed.
    fn failed(&self, _target: NodeId, _rpc: &'static str, _error: &CallError) {}
}

/// openraft's network factory: one [`PeerConnection`] per target.
#[derive(Clone)]
pub struct Network {
    source: NodeId,
    client: PeerClient,
    observer: Arc<dyn PeerObserver>,
}

impl Network {
    /// A factory sharing `client`.
    pub fn new(source: NodeId, client: PeerClient, observer: Arc<dyn PeerObserver>) -> Network {
        Network {
            source,
            client,
            observer,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        PeerConnection {
            source: self.source,
            client: self.client.clone(),
            target,
            addr: node.peer_addr.clone(),
            observer: self.observer.clone(),
        }
    }
}

/// The RPC client for one peer.
pub struct PeerConnection {
    source: NodeId,
    client: PeerClient,
    target: NodeId,
    addr: String,
    observer: Arc<dyn PeerObserver>,
}

impl PeerConnection {
    async fn send<Req, Resp, E>(
        &self,
        path: &'static str,
        action: openraft::RPCTypes,
        req: &Req,
        body: Option<Vec<u8>>,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = body.unwrap_or_else(|| encode(req));
        let result = match self.client.call(&self.addr, path, body, ttl).await {
            Ok(bytes) => decode::<Result<Resp, RaftError<NodeId, E>>>(&bytes)
                .map_err(|e| CallError::Other(format!("decoding peer response: {e}"))),
            Err(e) => Err(e),
        };
        match result {
            Ok(Ok(resp)) => {
                self.observer.ok(self.target);
                Ok(resp)
            }
            Ok(Err(remote)) => {
                self.observer.ok(self.target);
                Err(RPCError::RemoteError(RemoteError::new(self.target, remote)))
            }
            Err(e) => {
                self.observer.failed(self.target, path, &e);
                Err(match e {
                    CallError::Connect(_) => RPCError::Unreachable(Unreachable::new(&e)),
                    CallError::Timeout(d) => RPCError::Timeout(Timeout {
                        action,
                        id: self.source,
                        target: self.target,
                        timeout: d,
                    }),
                    CallError::Other(_) => RPCError::Network(NetworkError::new(&e)),
                })
            }
        }
    }
}

/// How many of `n` entries to send when their append would take `size` bytes: `None` if it
/// fits under `max` (or cannot be split), else as many as fit at their average size, at
/// least one and fewer than `n` (openraft retries with that many).
fn entries_that_fit(n: u64, size: usize, max: usize) -> Option<u64> {
    if size <= max || n <= 1 {
        return None;
    }
    let fit = (n as u128 * max as u128 / size as u128) as u64;
    Some(fit.clamp(1, n - 1))
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        // Measured before encoding: a refused payload costs no encoding.
        let size = encoded_len(&rpc);
        if let Some(fit) = entries_that_fit(rpc.entries.len() as u64, size, MAX_APPEND_BYTES) {
            return Err(RPCError::PayloadTooLarge(
                openraft::error::PayloadTooLarge::new_entries_hint(fit),
            ));
        }
        let body = encode_sized(&rpc, size);
        self.send(
            "/raft/append",
            openraft::RPCTypes::AppendEntries,
            &(),
            Some(body),
            option.hard_ttl(),
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(
            "/raft/snapshot",
            openraft::RPCTypes::InstallSnapshot,
            &rpc,
            None,
            option.hard_ttl(),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.send(
            "/raft/vote",
            openraft::RPCTypes::Vote,
            &rpc,
            None,
            option.hard_ttl(),
        )
        .await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[cfg(test)]
mod tests {
    use super::entries_that_fit;

    #[test]
    fn an_oversized_append_is_cut_to_the_entries_that_fit() {
        // Fits, or a single entry (which cannot be split): sent as it is.
        assert_eq!(entries_that_fit(10, 2 << 20, 2 << 20), None);
        assert_eq!(entries_that_fit(1, 64 << 20, 2 << 20), None);
        // 100 entries of 1 MiB against 2 MiB: two fit.
        assert_eq!(entries_that_fit(100, 100 << 20, 2 << 20), Some(2));
        // Twice the limit: half of them.
        assert_eq!(entries_that_fit(10, 4 << 20, 2 << 20), Some(5));
        // Never zero (one entry may be over the limit alone), never all of them.
        assert_eq!(entries_that_fit(3, 100 << 20, 2 << 20), Some(1));
        assert_eq!(entries_that_fit(2, (2 << 20) + 1, 2 << 20), Some(1));
    }
}
