//! kubectl 1.32, run against one replica of a test cluster with its own cache and HOME, and
//! raw requests to the Kubernetes API.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::Value;

use super::Cluster;

/// The kubectl the tests drive (the dispatcher at /usr/bin/kubectl picks it for 1.32).
pub const KUBECTL: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32";

/// kubectl pointed at one replica.
pub struct Kubectl {
    /// `http://host:port` of the replica.
    pub server: String,
    /// kubectl's discovery cache.
    pub cache: PathBuf,
    /// HOME and where `file` writes.
    pub dir: PathBuf,
    /// A kubeconfig (credentials, CA) to use, if any.
    pub kubeconfig: Option<PathBuf>,
}

impl Kubectl {
    /// kubectl for replica `id` of `c`.
    pub fn new(c: &Cluster, id: u64) -> Kubectl {
        Kubectl {
            server: format!("http://{}", c.replica(id).api()),
            cache: c.dir.path().join(format!("kube-cache-{id}")),
            dir: c.dir.path().to_path_buf(),
            kubeconfig: None,
        }
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(KUBECTL);
        if let Some(k) = &self.kubeconfig {
            cmd.arg(format!("--kubeconfig={}", k.display()));
        }
        let out = cmd
            .arg(format!("--server={}", self.server))
            .arg(format!("--cache-dir={}", self.cache.display()))
            .args(args)
            .env("HOME", &self.dir)
            .output()
            .expect("kubectl 1.32 is installed");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl, which must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "kubectl {args:?} failed:\n{out}{err}");
        out
    }

    /// Runs kubectl, which must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(!ok, "kubectl {args:?} should fail:\n{out}{err}");
        err
    }

    /// Writes `content` to `name` in the cluster's directory; returns its path.
    pub fn file(&self, name: &str, content: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }
}

/// Sends one request to the first of `servers` that answers; returns status and JSON body
/// (`Null` if it was not JSON; status 0 if none answered).
pub async fn req(
    servers: &[String],
    method: http::Method,
    path: &str,
    ctype: &str,
    body: &Value,
) -> (u16, Value) {
    req_tls(None, servers, method, path, ctype, body).await
}

/// [`req`] over HTTPS with `tls` (plain HTTP without).
pub async fn req_tls(
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    servers: &[String],
    method: http::Method,
    path: &str,
    ctype: &str,
    body: &Value,
) -> (u16, Value) {
    let client = flotilla::client::Client::with_tls(servers.to_vec(), Duration::from_secs(5), tls);
    req_with(&client, servers, method, path, ctype, body).await
}

/// [`req`] as `client` (its TLS identity or bearer token).
pub async fn req_with(
    client: &flotilla::client::Client,
    servers: &[String],
    method: http::Method,
    path: &str,
    ctype: &str,
    body: &Value,
) -> (u16, Value) {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).unwrap()
    };
    for server in servers {
        if let Ok(resp) = client
            .send_raw(method.clone(), server, path, ctype, bytes.clone(), None)
            .await
        {
            let status = resp.status().as_u16();
            let b = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return (status, serde_json::from_slice(&b).unwrap_or(Value::Null));
        }
    }
    (0, Value::Null)
}
