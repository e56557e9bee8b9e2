//! The agent's `/exec/<namespace>/<pod>/<container>` endpoint: `kubectl exec` over a
//! websocket in Kubernetes' channel protocol (`v5.channel.k8s.io`, or `v4`), which the API
//! server's `pods/exec` proxies here byte for byte.
//!
//! Each binary message starts with its channel: 0 stdin (from the client), 1 stdout, 2
//! stderr, 3 the final `Status` (success, or `NonZeroExitCode` with the exit code, which
//! kubectl exits with), 4 terminal resize (ignored: no TTY); under v5, 255 closes a channel
//! (the client's stdin). The command runs in the container through the runtime: under the
//! process runtime a process with the container's environment and directory, its streams
//! live; under cri `ExecSync` (no stdin), its output sent when it ends.
//!
//! Owns one session per connection; its buffers are bounded (channel of 16 frames, reads of
//! 32 KiB), and the command is killed when the client goes away.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

use super::runtime::{ExecSession, Runtime};
use crate::api::percent_decode;
use crate::http::{text, Body};

/// The final `Status` of a command that ended with `code`.
fn status(code: i32, argv: &[String]) -> Vec<u8> {
    let v = if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {argv:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
    };
    serde_json::to_vec(&v).expect("a status serializes")
}

/// A `Status` for a command that could not start.
fn failure(message: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"metadata": {}, "status": "Failure", "message": message,
        "reason": "InternalError"}),
    )
    .expect("a status serializes")
}

/// A normal closure (kubectl treats a close without a code as an error).
fn normal() -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(Bytes::from(v))
}

/// Serves one exec request (upgrading it to a websocket).
pub fn serve(
    mut req: http::Request<hyper::body::Incoming>,
    pods_dir: &Path,
    runtime: Arc<dyn Runtime>,
) -> http::Response<Body> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [_, ns, pod, container] = parts[..] else {
        return text(
            StatusCode::NOT_FOUND,
            "expected /exec/<namespace>/<pod>/<container>\n",
        );
    };
    let mut argv = Vec::new();
    // `tty` is not honoured: the command's streams are pipes.
    let mut stdin = false;
    for kv in req.uri().query().unwrap_or("").split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "command" => argv.push(percent_decode(v)),
            "stdin" => stdin = matches!(v, "true" | "1"),
            _ => {}
        }
    }
    if argv.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "you must specify at least 1 command\n",
        );
    }
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let key = header("sec-websocket-key");
    if !header("upgrade").eq_ignore_ascii_case("websocket") || key.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "exec needs a websocket upgrade (Sec-WebSocket-Protocol v5.channel.k8s.io or v4.channel.k8s.io)\n",
        );
    }
    let offered = header("sec-websocket-protocol");
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    let Some(protocol) = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.contains(p))
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "exec speaks v5.channel.k8s.io and v4.channel.k8s.io only\n",
        );
    };
    let Some(dir) = super::logs::pod_dir(pods_dir, ns, pod) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} is not running on this node\n"),
        );
    };
    let container = container.to_string();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        session(ws, runtime, &dir, &container, argv, stdin).await;
    });
    http::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header("Sec-WebSocket-Accept", accept)
        .header("Sec-WebSocket-Protocol", protocol)
        .body(crate::http::full(Bytes::new()))
        .expect("static response parts are valid")
}

type Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

async fn session(
    mut ws: Ws,
    runtime: Arc<dyn Runtime>,
    dir: &Path,
    container: &str,
    argv: Vec<String>,
    stdin: bool,
) {
    let started = runtime.exec(dir, container, argv.clone(), stdin).await;
    let code = match started {
        Err(e) => {
            let _ = ws.send(frame(3, &failure(&e))).await;
            finish(ws).await;
            return;
        }
        Ok(ExecSession::Finished {
            stdout,
            stderr,
            code,
        }) => {
            for (ch, data) in [(1u8, stdout), (2, stderr)] {
                for chunk in data.chunks(32 * 1024) {
                    if ws.send(frame(ch, chunk)).await.is_err() {
                        return;
                    }
                }
            }
            code
        }
        Ok(ExecSession::Process(mut child)) => {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(u8, Vec<u8>)>(16);
            for (ch, out) in [
                (
                    1u8,
                    child
                        .stdout
                        .take()
                        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                ),
                (
                    2,
                    child
                        .stderr
                        .take()
                        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                ),
            ] {
                let Some(mut out) = out else { continue };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = out.read(&mut buf).await {
                        if n == 0 || tx.send((ch, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            let mut input = child.stdin.take();
            loop {
                tokio::select! {
                    out = rx.recv() => match out {
                        Some((ch, data)) => {
                            if ws.send(frame(ch, &data)).await.is_err() {
                                let _ = child.start_kill();
                                return;
                            }
                        }
                        // Both streams closed: the command is done (or closed them).
                        None => break,
                    },
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Binary(b))) => match b.first() {
                            Some(0) => {
                                if let Some(i) = input.as_mut() {
                                    if i.write_all(&b[1..]).await.is_err() {
                                        input = None;
                                    }
                                }
                            }
                            // v5: the client closed a channel (its stdin).
                            Some(255) if b.get(1) == Some(&0) => input = None,
                            _ => {}
                        },
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                            let _ = child.start_kill();
                            return;
                        }
                        Some(Ok(_)) => {}
                    },
                }
            }
            drop(input);
            match child.wait().await {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    s.code()
                        .or_else(|| s.signal().map(|n| 128 + n))
                        .unwrap_or(255)
                }
                Err(_) => 255,
            }
        }
    };
    let _ = ws.send(frame(3, &status(code, &argv))).await;
    finish(ws).await;
}

/// Closes the websocket with a normal closure and waits (bounded) for the client's close
/// in return, so the status sent before it is read before the connection goes.
async fn finish(mut ws: Ws) {
    let _ = ws.close(Some(normal())).await;
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_decode_and_statuses_carry_the_exit_code() {
        assert_eq!(percent_decode("%2Ftmp"), "/tmp");
        assert_eq!(percent_decode("a+b%20c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        let s: serde_json::Value = serde_json::from_slice(&status(3, &["false".into()])).unwrap();
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        let ok: serde_json::Value = serde_json::from_slice(&status(0, &[])).unwrap();
        assert_eq!(ok["status"], "Success");
    }
}
