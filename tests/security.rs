//! TLS and authentication (`flotilla certs init`, HTTPS on the API, mutual TLS between
//! replicas and to the agents' endpoints, client certificates and bearer tokens), against
//! a three-replica cluster, a real agent and the real kubectl.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::agent::Agent;
use common::*;
use serde_json::{json, Value};

/// The files `flotilla certs init` wrote for this cluster (replicas on `prefix.1`–`.3`, the
/// agent `s1` on `prefix.10`).
fn certs(dir: &Path, prefix: &str) -> PathBuf {
    let out = dir.join("pki");
    let run = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["certs", "init", "--dir"])
        .arg(&out)
        .arg("--replicas")
        .arg(format!("1={prefix}.1,2={prefix}.2,3={prefix}.3"))
        .args(["--agents", &format!("s1={prefix}.10")])
        .args(["--server", &format!("https://{prefix}.2:6441")])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    out
}

fn client_tls(pki: &Path, who: Option<&str>) -> Arc<rustls::ClientConfig> {
    let identity = who.map(|w| (pki.join(format!("{w}.crt")), pki.join(format!("{w}.key"))));
    Arc::new(
        flotilla::tls::client_config(
            &pki.join("ca.crt"),
            identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .unwrap(),
    )
}

/// GET `path` from `server` as `client`; (status, body).
async fn get(client: &flotilla::client::Client, server: &str, path: &str) -> (u16, String) {
    client
        .get_text(server, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// A TLS handshake with `addr` using `config`: Ok when it completes and the server takes a
/// request on it.
async fn handshake(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = flotilla::tls::server_name(flotilla::tls::host_of(addr)).unwrap();
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3: a refused client certificate shows on the first read.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    if buf.starts_with(b"HTTP/1.1") {
        Ok(())
    } else {
        Err(format!(
            "no HTTP answer: {:?}",
            String::from_utf8_lossy(&buf)
        ))
    }
}

/// A three-replica cluster with everything on: HTTPS, client certificates, the token file
/// `tokens`, mutual TLS between replicas and to agents. The harness's own requests go as
/// the administrator. Returns the cluster and its certificates' directory.
async fn secure_cluster(tokens: &str, extra: &[&str]) -> (Cluster, PathBuf) {
    let mut c = Cluster::new(3, &[]);
    let prefix = c.prefix.clone();
    let pki = certs(c.dir.path(), &prefix);
    let token_file = c.dir.path().join("tokens.csv");
    std::fs::write(&token_file, tokens).unwrap();
    let ca = pki.join("ca.crt");
    let path = |p: &Path| p.display().to_string();
    c.args = vec![
        "--client-ca-file".into(),
        path(&ca),
        "--token-auth-file".into(),
        path(&token_file),
        "--peer-trusted-ca-file".into(),
        path(&ca),
        "--kubelet-certificate-authority".into(),
        path(&ca),
    ];
    c.args.extend([
        "--service-account-signing-key-file".into(),
        path(&pki.join("sa.key")),
    ]);
    c.args.extend(extra.iter().map(|s| s.to_string()));
    for id in 1..=3u64 {
        let (crt, key) = (
            path(&pki.join(format!("replica-{id}.crt"))),
            path(&pki.join(format!("replica-{id}.key"))),
        );
        c.launch(
            id,
            &[
                "--tls-cert-file",
                &crt,
                "--tls-private-key-file",
                &key,
                "--peer-cert-file",
                &crt,
                "--peer-key-file",
                &key,
                "--kubelet-client-certificate",
                &crt,
                "--kubelet-client-key",
                &key,
                "--audit-log-path",
                &path(&c.replica(id).data_dir.with_extension("audit.log")),
            ],
        );
    }
    c.tls = Some(client_tls(&pki, Some("admin")));
    c.wait_leader().await;
    c.wait_bootstrapped().await;
    (c, pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_clusters_certificates_and_tokens_get_in() {
    let (mut c, pki) = secure_cluster(
        "t0ken-alice,alice,1001,\"dev\"\nt0ken-root,root,0,system:masters\n",
        &[],
    )
    .await;
    let prefix = c.prefix.clone();
    let ca = pki.join("ca.crt");
    let path = |p: &Path| p.display().to_string();
    let api = c.replica(2).api();

    // Without credentials: 401 with Kubernetes' Status, except the health and version
    // paths; a wrong token is a 401 even there.
    let nobody = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&pki, None)),
    );
    let (code, body) = get(&nobody, &api, "/api/v1/namespaces/default/pods").await;
    assert_eq!(code, 401, "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["reason"], "Unauthorized", "{body}");
    assert_eq!(status["code"], 401, "{body}");
    for p in ["/metrics", "/v3/maintenance/status", "/apis"] {
        assert_eq!(get(&nobody, &api, p).await.0, 401, "{p}");
    }
    for p in ["/version", "/livez", "/readyz", "/healthz"] {
        assert_eq!(get(&nobody, &api, p).await.0, 200, "{p}");
    }
    let wrong = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&pki, None)),
    )
    .with_bearer("not-a-token");
    assert_eq!(get(&wrong, &api, "/version").await.0, 401);
    // Plain HTTP to the HTTPS port gets nothing useful.
    let plain = flotilla::client::Client::new(vec![], Duration::from_secs(5));
    let plain_answer = plain.get_text(&api, "/api/v1/namespaces").await;
    assert!(
        !matches!(plain_answer, Ok((200, _))),
        "plain HTTP was served: {plain_answer:?}"
    );
    // A server certificate the client does not trust: refused by the client.
    let other = c.dir.path().join("other-pki");
    let made = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["certs", "init", "--dir"])
        .arg(&other)
        .args(["--replicas", &format!("1={prefix}.1")])
        .output()
        .unwrap();
    assert!(made.status.success());
    let stranger = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&other, Some("admin"))),
    );
    assert!(stranger.get_text(&api, "/version").await.is_err());

    // A token authenticates (alice has no RBAC grant: authenticated, then forbidden); a
    // user outside system:masters may not use the raw store.
    let alice = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&pki, None)),
    )
    .with_bearer("t0ken-alice");
    let (code, body) = get(&alice, &api, "/api/v1/namespaces").await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(r#"User \"alice\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"#),
        "{body}"
    );
    let (code, body) = get(&alice, &api, "/v3/maintenance/status").await;
    assert_eq!(code, 403, "{body}");
    let root = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&pki, None)),
    )
    .with_bearer("t0ken-root");
    assert_eq!(get(&root, &api, "/metrics").await.0, 200);

    // The peer port: only certificates of the cluster's CA complete a handshake; plain
    // HTTP gets no answer.
    let peer = c.replica(1).peer();
    handshake(&peer, client_tls(&pki, Some("replica-2")))
        .await
        .expect("a replica's certificate gets in");
    for (who, config) in [
        ("no certificate", client_tls(&pki, None)),
        // The cluster's CA signed these, but they are not replicas'.
        (
            "a node agent's certificate",
            client_tls(&pki, Some("agent-s1")),
        ),
        (
            "the administrator's certificate",
            client_tls(&pki, Some("admin")),
        ),
        ("the admin of another CA", {
            // Trusts this cluster's CA for the server, shows another CA's certificate.
            Arc::new(
                flotilla::tls::client_config(
                    &ca,
                    Some((&other.join("admin.crt"), &other.join("admin.key"))),
                )
                .unwrap(),
            )
        }),
    ] {
        let r = handshake(&peer, config).await;
        assert!(r.is_err(), "{who} got through to the peer port");
    }
    let plain_peer = plain.get_text(&peer, "/raft/vote").await;
    assert!(
        !matches!(plain_peer, Ok((200, _))),
        "plain HTTP on the peer port: {plain_peer:?}"
    );

    // kubectl with the kubeconfig `certs init` wrote (admin's certificate), through the
    // dispatcher too (its /version is anonymous).
    let mut k = Kubectl::new(&c, 2);
    k.server = format!("https://{api}");
    k.kubeconfig = Some(pki.join("admin.kubeconfig"));
    assert!(k.ok(&["get", "namespaces"]).contains("kube-system"));
    let dispatched = Command::new("/usr/bin/kubectl")
        .arg(format!(
            "--kubeconfig={}",
            pki.join("admin.kubeconfig").display()
        ))
        .args(["get", "namespace", "default", "-o", "name"])
        .env("HOME", c.dir.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&dispatched.stdout).trim(),
        "namespace/default",
        "{}",
        String::from_utf8_lossy(&dispatched.stderr)
    );
    // kubectl with a token the server does not know is refused (with none at all it would
    // prompt for a user name).
    let mut anon = Kubectl::new(&c, 2);
    anon.server = format!("https://{api}");
    let err = anon.fails(&[
        "--certificate-authority",
        &path(&ca),
        "--token",
        "not-a-token",
        "get",
        "pods",
    ]);
    assert!(err.contains("You must be logged in"), "{err}");

    // An agent with its certificate: registers, runs a pod; logs and exec reach it
    // through the API server's certificate.
    let data = c.dir.path().join("agent-s1");
    let _agent = Agent::start(
        &c,
        "s1",
        &data,
        &[
            "--node-ip",
            &format!("{prefix}.10"),
            "--ca-file",
            &path(&ca),
            "--cert-file",
            &path(&pki.join("agent-s1.crt")),
            "--key-file",
            &path(&pki.join("agent-s1.key")),
        ],
    );
    let manifest = c.dir.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: talk\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: busybox\n    command: [\"sh\", \"-c\", \"echo hello over tls; exec sleep 600\"]\n",
    )
    .unwrap();
    k.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    wait_for(Duration::from_secs(60), "the pod to run on s1", || async {
        let (code, p) = req_tls(&c, "/api/v1/namespaces/default/pods/talk").await;
        (code == 200 && p["status"]["phase"] == "Running" && p["spec"]["nodeName"] == "s1")
            .then_some(())
    })
    .await;
    let logs = wait_for(Duration::from_secs(30), "the pod's log", || async {
        let (ok, out, _) = k.run(&["logs", "talk"]);
        (ok && out.contains("hello")).then_some(out)
    })
    .await;
    assert_eq!(logs.trim(), "hello over tls");
    assert_eq!(
        k.ok(&["exec", "talk", "--", "echo", "exec over tls"])
            .trim(),
        "exec over tls"
    );
    // The agent's endpoint: only the cluster's certificates get a connection, and logs
    // only for the replicas'.
    let (_, node) = req_tls(&c, "/api/v1/nodes/s1").await;
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap();
    let agent_addr = format!("{prefix}.10:{port}");
    let logs_path = "/containerLogs/default/talk/c";
    let as_admin = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&pki, Some("admin"))),
    );
    let (code, body) = get(&as_admin, &agent_addr, logs_path).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(get(&as_admin, &agent_addr, "/healthz").await.0, 200);
    let as_replica = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&pki, Some("replica-1"))),
    );
    let (code, body) = get(&as_replica, &agent_addr, logs_path).await;
    assert_eq!((code, body.trim()), (200, "hello over tls"));
    assert!(handshake(&agent_addr, client_tls(&pki, None))
        .await
        .is_err());

    // Raft over mutual TLS survives losing its leader: a new one, and writes go on.
    let leader = c.wait_leader().await;
    c.kill(leader);
    let survivor = (1..=3).find(|&i| i != leader).unwrap();
    let mut k2 = Kubectl::new(&c, survivor);
    k2.server = format!("https://{}", c.replica(survivor).api());
    k2.kubeconfig = Some(pki.join("admin.kubeconfig"));
    wait_for(
        Duration::from_secs(30),
        "a write after the leader died",
        || async {
            let (ok, _, _) = k2.run(&["create", "configmap", "after-failover"]);
            ok.then_some(())
        },
    )
    .await;
    k2.ok(&["delete", "pod", "talk", "--wait=false"]);
}

/// GET as the administrator from any replica; (status, JSON).
async fn req_tls(c: &Cluster, path: &str) -> (u16, Value) {
    let client = c.client();
    let server = client.servers()[1].clone();
    let (code, body) = client.get_text(&server, path).await.unwrap();
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Sends one request as `client`; (status, JSON body).
async fn send(
    client: &flotilla::client::Client,
    server: &str,
    method: http::Method,
    path: &str,
    ctype: &str,
    body: &Value,
) -> (u16, Value) {
    let answer = req_with(client, &[server.to_string()], method, path, ctype, body).await;
    assert_ne!(answer.0, 0, "{path}: no answer");
    answer
}

/// kubectl as a token's user.
fn kubectl_as(c: &Cluster, pki: &Path, token: &str) -> impl Fn(&[&str]) -> (bool, String, String) {
    let mut k = Kubectl::new(c, 2);
    k.server = format!("https://{}", c.replica(2).api());
    // (A JWT is too long for a file name: its signature's end tells tokens apart.)
    let tail: String = token
        .chars()
        .rev()
        .take(16)
        .filter(char::is_ascii_alphanumeric)
        .collect();
    k.cache = c.dir.path().join(format!("cache-{tail}"));
    let ca = pki.join("ca.crt").display().to_string();
    let token = token.to_string();
    move |args: &[&str]| {
        let mut all = vec!["--certificate-authority", &ca, "--token", &token];
        all.extend_from_slice(args);
        k.run(&all)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_and_the_node_authorizer_decide_what_each_identity_may_do() {
    let (c, pki) = secure_cluster(
        "view-token,val,2,team-viewers\nadmin-token,ada,3\nnobody-token,nobody,4\n",
        &[],
    )
    .await;
    let api = c.replica(2).api();
    let mut k = Kubectl::new(&c, 2);
    k.server = format!("https://{api}");
    k.kubeconfig = Some(pki.join("admin.kubeconfig"));
    // The default roles exist, aggregated.
    let view = k.ok(&["get", "clusterrole", "view", "-o", "json"]);
    assert!(view.contains("\"pods/log\""), "{view}");
    k.ok(&["create", "namespace", "team"]);
    k.ok(&[
        "create",
        "secret",
        "generic",
        "s1",
        "-n",
        "team",
        "--from-literal=k=v",
    ]);
    // Imperative RBAC (kubectl sends these as protobuf): val views the namespace through
    // its group, ada administers it.
    k.ok(&[
        "create",
        "rolebinding",
        "viewers",
        "--clusterrole=view",
        "--group=team-viewers",
        "-n",
        "team",
    ]);
    k.ok(&[
        "create",
        "rolebinding",
        "ada-admin",
        "--clusterrole=admin",
        "--user=ada",
        "-n",
        "team",
    ]);
    let rb = k.ok(&["get", "rolebinding", "viewers", "-n", "team", "-o", "json"]);
    let rb: Value = serde_json::from_str(&rb).unwrap();
    assert_eq!(rb["roleRef"]["name"], "view", "{rb}");
    assert_eq!(rb["subjects"][0]["kind"], "Group", "{rb}");
    assert_eq!(rb["subjects"][0]["name"], "team-viewers", "{rb}");

    // A viewer lists pods but cannot create them or read Secrets, and only in its namespace.
    let val = kubectl_as(&c, &pki, "view-token");
    let (ok, _, err) = val(&["get", "pods", "-n", "team"]);
    assert!(ok, "{err}");
    let (ok, _, err) = val(&["run", "x", "--image=busybox", "-n", "team"]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    assert!(
        err.contains(
            r#"User "val" cannot create resource "pods" in API group "" in the namespace "team""#
        ),
        "{err}"
    );
    let (ok, _, err) = val(&["get", "secret", "s1", "-n", "team"]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    let (ok, _, err) = val(&["get", "pods", "-n", "default"]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    // kubectl auth can-i (a protobuf SelfSubjectAccessReview).
    for (args, want) in [
        (vec!["list", "pods", "-n", "team"], "yes"),
        (vec!["create", "pods", "-n", "team"], "no"),
        (vec!["get", "secrets", "-n", "team"], "no"),
        (vec!["list", "pods", "-n", "default"], "no"),
    ] {
        let mut all = vec!["auth", "can-i"];
        all.extend(args.iter());
        let (ok, out, err) = val(&all);
        assert_eq!(out.trim(), want, "{args:?}: {err}");
        assert_eq!(ok, want == "yes", "{args:?}");
    }
    // Someone without any binding: authenticated, allowed nothing but discovery.
    let nobody = kubectl_as(&c, &pki, "nobody-token");
    let (ok, _, err) = nobody(&["get", "pods", "-n", "team"]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    let (ok, out, _) = nobody(&["auth", "can-i", "get", "pods"]);
    assert!(!ok && out.trim() == "no");
    // The server's metrics are not for everyone.
    let as_val = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&pki, None)),
    )
    .with_bearer("view-token");
    assert_eq!(get(&as_val, &api, "/metrics").await.0, 403);
    assert_eq!(get(&as_val, &api, "/api").await.0, 200);

    // Escalation: ada administers the namespace and may grant what she holds there, not
    // more: not cluster-admin, not reading nodes.
    let ada = kubectl_as(&c, &pki, "admin-token");
    let (ok, _, err) = ada(&[
        "create",
        "role",
        "pod-reader",
        "--verb=get,list",
        "--resource=pods",
        "-n",
        "team",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = ada(&[
        "create",
        "rolebinding",
        "readers",
        "--role=pod-reader",
        "--user=nobody",
        "-n",
        "team",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = nobody(&["get", "pods", "-n", "team"]);
    assert!(ok, "the binding ada made works: {err}");
    let (ok, _, err) = ada(&[
        "create",
        "rolebinding",
        "root",
        "--clusterrole=cluster-admin",
        "--user=ada",
        "-n",
        "team",
    ]);
    assert!(
        !ok && err.contains("attempting to grant RBAC permissions not currently held"),
        "{err}"
    );
    let (ok, _, err) = ada(&[
        "create",
        "role",
        "node-reader",
        "--verb=get",
        "--resource=nodes",
        "-n",
        "team",
    ]);
    assert!(!ok && err.contains("not currently held"), "{err}");
    let (ok, _, err) = ada(&[
        "create",
        "clusterrolebinding",
        "x",
        "--clusterrole=view",
        "--user=ada",
    ]);
    assert!(!ok && err.contains("forbidden"), "{err}");

    // Aggregation: a ClusterRole labelled aggregate-to-view extends view (and, through
    // edit, admin) within moments: viewers may then read Roles.
    let extra = c.dir.path().join("role-viewer.yaml");
    std::fs::write(
        &extra,
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: role-viewer\n  labels:\n    rbac.authorization.k8s.io/aggregate-to-view: \"true\"\nrules:\n- apiGroups: [rbac.authorization.k8s.io]\n  resources: [roles]\n  verbs: [get, list]\n",
    )
    .unwrap();
    let (_, before, _) = val(&["auth", "can-i", "list", "roles", "-n", "team"]);
    assert_eq!(before.trim(), "no");
    k.ok(&["apply", "-f", extra.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(20),
        "view to aggregate role-viewer",
        || async {
            let (_, out, _) = val(&["auth", "can-i", "list", "roles", "-n", "team"]);
            (out.trim() == "yes").then_some(())
        },
    )
    .await;
    let (ok, out, err) = val(&["get", "roles", "-n", "team"]);
    assert!(ok && out.contains("pod-reader"), "{out}{err}");
    // ... and stops when the role goes.
    k.ok(&["delete", "clusterrole", "role-viewer"]);
    wait_for(
        Duration::from_secs(20),
        "view to drop role-viewer",
        || async {
            let (_, out, _) = val(&["auth", "can-i", "list", "roles", "-n", "team"]);
            (out.trim() == "no").then_some(())
        },
    )
    .await;

    // ServiceAccount tokens (`kubectl create token`): they authenticate as the account,
    // RBAC applies to it, and deleting the account revokes them.
    k.ok(&["create", "serviceaccount", "robot", "-n", "team"]);
    k.ok(&[
        "create",
        "rolebinding",
        "robot-view",
        "--clusterrole=view",
        "--serviceaccount=team:robot",
        "-n",
        "team",
    ]);
    let token = k
        .ok(&["create", "token", "robot", "-n", "team", "--duration=20m"])
        .trim()
        .to_string();
    let claims: Value = {
        use base64::Engine;
        let part = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        claims["sub"], "system:serviceaccount:team:robot",
        "{claims}"
    );
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 1200, "--duration=20m: {claims}");
    let robot = kubectl_as(&c, &pki, &token);
    let (ok, _, err) = robot(&["get", "pods", "-n", "team"]);
    assert!(ok, "{err}");
    let (ok, _, err) = robot(&["get", "secrets", "-n", "team"]);
    assert!(
        !ok && err.contains("system:serviceaccount:team:robot"),
        "{err}"
    );
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (ok, _, err) = kubectl_as(&c, &pki, &forged)(&["get", "pods", "-n", "team"]);
    assert!(!ok && err.contains("You must be logged in"), "{err}");
    // Who may ask for a token: ada (admin of team) yes, val (view) no.
    let (ok, _, err) = ada(&["create", "token", "robot", "-n", "team"]);
    assert!(ok, "{err}");
    let (ok, _, err) = val(&["create", "token", "robot", "-n", "team"]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    let (code, body) = send(
        &c.client(),
        &api,
        http::Method::POST,
        "/api/v1/namespaces/team/serviceaccounts/robot/token",
        "application/json",
        &json!({"spec": 1}),
    )
    .await;
    assert_eq!(code, 400, "a malformed TokenRequest: {body}");
    k.ok(&["delete", "serviceaccount", "robot", "-n", "team"]);
    wait_for(
        Duration::from_secs(10),
        "the deleted account's token to stop working",
        || async {
            let (ok, _, err) = robot(&["get", "pods", "-n", "team"]);
            (!ok && err.contains("You must be logged in")).then_some(())
        },
    )
    .await;

    // The audit log of the replica these requests went to: who, what, how it went.
    let audit = std::fs::read_to_string(c.replica(2).data_dir.with_extension("audit.log")).unwrap();
    let events: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let found = |user: &str, verb: &str, resource: &str, code: u64| {
        events.iter().any(|e| {
            e["user"]["username"] == user
                && e["verb"] == verb
                && e["objectRef"]["resource"] == resource
                && e["responseStatus"]["code"] == code
        })
    };
    assert!(found("val", "create", "pods", 403), "{audit}");
    assert!(found("val", "list", "pods", 200), "{audit}");
    assert!(found("admin", "create", "rolebindings", 201), "{audit}");
    assert!(found("ada", "create", "rolebindings", 403), "{audit}");

    // The node authorizer: node s1's certificate.
    let s1 = flotilla::client::Client::with_tls(
        vec![],
        Duration::from_secs(5),
        Some(client_tls(&pki, Some("agent-s1"))),
    );
    let json = "application/json";
    let merge = "application/merge-patch+json";
    let node = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
               "status": {"conditions": []}})
    };
    let admin = c.client();
    let (code, body) = send(
        &admin,
        &api,
        http::Method::POST,
        "/api/v1/nodes",
        json,
        &node("s2"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = send(
        &s1,
        &api,
        http::Method::POST,
        "/api/v1/nodes",
        json,
        &node("s1"),
    )
    .await;
    assert_eq!(code, 201, "its own Node: {body}");
    let (code, body) = send(
        &s1,
        &api,
        http::Method::POST,
        "/api/v1/nodes",
        json,
        &node("s3"),
    )
    .await;
    assert_eq!(code, 403, "another Node: {body}");
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::GET,
            "/api/v1/nodes",
            json,
            &Value::Null
        )
        .await
        .0,
        200
    );
    // Its own labels, but not the restricted ones, and not its taints once registered.
    let label = |k: &str| json!({"metadata": {"labels": {k: "x"}}});
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::PATCH,
            "/api/v1/nodes/s1",
            merge,
            &label("zone")
        )
        .await
        .0,
        200
    );
    for k in [
        "node-role.kubernetes.io/control-plane",
        "node-restriction.kubernetes.io/pci",
    ] {
        let (code, body) = send(
            &s1,
            &api,
            http::Method::PATCH,
            "/api/v1/nodes/s1",
            merge,
            &label(k),
        )
        .await;
        assert_eq!(code, 403, "{k}: {body}");
    }
    let taint = json!({"spec": {"taints": [{"key": "dedicated", "effect": "NoSchedule"}]}});
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::PATCH,
            "/api/v1/nodes/s1",
            merge,
            &taint
        )
        .await
        .0,
        403
    );
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::PATCH,
            "/api/v1/nodes/s1/status",
            merge,
            &status
        )
        .await
        .0,
        200
    );
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::PATCH,
            "/api/v1/nodes/s2/status",
            merge,
            &status
        )
        .await
        .0,
        403
    );
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::DELETE,
            "/api/v1/nodes/s2",
            json,
            &Value::Null
        )
        .await
        .0,
        403
    );
    // Leases: its own only.
    let lease = |name: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
               "spec": {"holderIdentity": name}})
    };
    let leases = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
    assert_eq!(
        send(&s1, &api, http::Method::POST, leases, json, &lease("s1"))
            .await
            .0,
        201
    );
    assert_eq!(
        send(&s1, &api, http::Method::POST, leases, json, &lease("s2"))
            .await
            .0,
        403
    );
    let (code, _) = send(&admin, &api, http::Method::POST, leases, json, &lease("s2")).await;
    assert_eq!(code, 201);
    let renew = json!({"spec": {"renewTime": "2026-01-01T00:00:00.000000Z"}});
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::PATCH,
            &format!("{leases}/s1"),
            merge,
            &renew
        )
        .await
        .0,
        200
    );
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::PATCH,
            &format!("{leases}/s2"),
            merge,
            &renew
        )
        .await
        .0,
        403
    );
    // Pods: the status of its own, not of pods bound elsewhere; Secrets only while a pod of
    // its refers to them.
    for (name, secret) in [("used", "used"), ("unused", "unused")] {
        let (code, _) = send(
            &admin,
            &api,
            http::Method::POST,
            "/api/v1/namespaces/team/secrets",
            json,
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"k": secret}}),
        )
        .await;
        assert_eq!(code, 201);
    }
    let pod = |name: &str, node: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox", "command": ["true"],
                 "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "used", "key": "k"}}}]}]}})
    };
    let pods = "/api/v1/namespaces/team/pods";
    assert_eq!(
        send(
            &admin,
            &api,
            http::Method::POST,
            pods,
            json,
            &pod("mine", "s1")
        )
        .await
        .0,
        201
    );
    assert_eq!(
        send(
            &admin,
            &api,
            http::Method::POST,
            pods,
            json,
            &pod("theirs", "s2")
        )
        .await
        .0,
        201
    );
    let phase = json!({"status": {"phase": "Running"}});
    let (code, body) = send(
        &s1,
        &api,
        http::Method::PATCH,
        &format!("{pods}/mine/status"),
        merge,
        &phase,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = send(
        &s1,
        &api,
        http::Method::PATCH,
        &format!("{pods}/theirs/status"),
        merge,
        &phase,
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::DELETE,
            &format!("{pods}/theirs"),
            json,
            &Value::Null
        )
        .await
        .0,
        403
    );
    assert_eq!(
        send(&s1, &api, http::Method::POST, pods, json, &pod("new", "s1"))
            .await
            .0,
        403
    );
    let secret = |name: &str| format!("/api/v1/namespaces/team/secrets/{name}");
    // At once: the authorizer confirms from the store what its index has not seen yet.
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::GET,
            &secret("used"),
            json,
            &Value::Null
        )
        .await
        .0,
        200
    );
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::GET,
            &secret("unused"),
            json,
            &Value::Null
        )
        .await
        .0,
        403
    );
    assert_eq!(
        send(
            &s1,
            &api,
            http::Method::GET,
            "/api/v1/namespaces/team/secrets",
            json,
            &Value::Null
        )
        .await
        .0,
        403
    );
    // Once the pod is gone, so is the access.
    assert_eq!(
        send(
            &admin,
            &api,
            http::Method::DELETE,
            &format!("{pods}/mine?gracePeriodSeconds=0"),
            json,
            &Value::Null
        )
        .await
        .0,
        200
    );
    wait_for(Duration::from_secs(10), "s1 to lose the Secret", || async {
        (send(
            &s1,
            &api,
            http::Method::GET,
            &secret("used"),
            json,
            &Value::Null,
        )
        .await
        .0 == 403)
            .then_some(())
    })
    .await;
}

/// An `EncryptionConfiguration` for Secrets with `keys` (name, 32 bytes) in order, then
/// the identity provider.
fn encryption_config(dir: &Path, file: &str, keys: &[(&str, u8)]) -> String {
    use base64::Engine;
    let keys: String = keys
        .iter()
        .map(|(n, b)| {
            format!(
                "        - name: {n}\n          secret: {}\n",
                base64::engine::general_purpose::STANDARD.encode([*b; 32])
            )
        })
        .collect();
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n    - aesgcm:\n        keys:\n{keys}    - identity: {{}}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Whether any file under `dir` contains `needle`.
fn on_disk(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_at_rest_and_keys_rotate() {
    let mut c = Cluster::new(3, &[]);
    let dir = c.dir.path().to_path_buf();
    c.args = vec![
        "--encryption-provider-config".into(),
        encryption_config(&dir, "enc-1.yaml", &[("key1", 1)]),
    ];
    for id in 1..=3 {
        c.launch(id, &[]);
    }
    c.wait_leader().await;
    c.wait_bootstrapped().await;
    let k = Kubectl::new(&c, 2);
    // Values nothing else on disk could contain.
    let secret = format!("secret-{:016x}", rand::random::<u64>());
    let plain = format!("plain-{:016x}", rand::random::<u64>());
    k.ok(&[
        "create",
        "secret",
        "generic",
        "s",
        &format!("--from-literal=k={secret}"),
    ]);
    k.ok(&[
        "create",
        "configmap",
        "c",
        &format!("--from-literal=k={plain}"),
    ]);
    let read = |k: &Kubectl| {
        let out = k.ok(&["get", "secret", "s", "-o", "jsonpath={.data.k}"]);
        use base64::Engine;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(out.trim())
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(read(&k), secret);
    // The raw store holds ciphertext under key1.
    let raw = common::get(&c.client(), "/registry/secrets/default/s", false)
        .await
        .unwrap()
        .unwrap();
    assert!(
        raw.value.starts_with(b"k8s:enc:aesgcm:v1:key1:"),
        "{:?}",
        &raw.value[..30]
    );
    // On disk (Raft log, state machine, its WAL), after a clean stop: the ConfigMap's value
    // is there to find, the Secret's is not, in plain text or base64.
    for id in 1..=3 {
        c.stop(id);
    }
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&secret)
    };
    assert!(
        !on_disk(&dir, plain.as_bytes()).is_empty(),
        "the scan finds plain values"
    );
    assert_eq!(on_disk(&dir, secret.as_bytes()), Vec::<PathBuf>::new());
    assert_eq!(on_disk(&dir, b64.as_bytes()), Vec::<PathBuf>::new());

    // Rotation: key2 first (key1 still reads), rewrite, then key1 gone.
    c.args[1] = encryption_config(&dir, "enc-2.yaml", &[("key2", 2), ("key1", 1)]);
    for id in 1..=3 {
        c.launch(id, &[]);
    }
    c.wait_leader().await;
    assert_eq!(read(&k), secret);
    let json = k.ok(&["get", "secret", "s", "-o", "json"]);
    let file = dir.join("s.json");
    std::fs::write(&file, json).unwrap();
    k.ok(&["replace", "-f", file.to_str().unwrap()]);
    let raw = common::get(&c.client(), "/registry/secrets/default/s", false)
        .await
        .unwrap()
        .unwrap();
    assert!(raw.value.starts_with(b"k8s:enc:aesgcm:v1:key2:"));
    for id in 1..=3 {
        c.stop(id);
    }
    c.args[1] = encryption_config(&dir, "enc-3.yaml", &[("key2", 2)]);
    for id in 1..=3 {
        c.launch(id, &[]);
    }
    c.wait_leader().await;
    assert_eq!(read(&k), secret);
    // A replica without the key cannot serve the Secret, and says why.
    let (ok, _, err) = {
        for id in 1..=3 {
            c.stop(id);
        }
        c.args[1] = encryption_config(&dir, "enc-4.yaml", &[("key9", 9)]);
        for id in 1..=3 {
            c.launch(id, &[]);
        }
        c.wait_leader().await;
        k.run(&["get", "secret", "s"])
    };
    assert!(!ok && err.contains("not configured"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_starve_the_others() {
    let (c, pki) = secure_cluster(
        "flood-token,flood,1,viewers\ncalm-token,calm,2,viewers\n",
        &[
            "--client-qps",
            "20",
            "--client-burst",
            "20",
            "--max-requests-inflight-per-client",
            "4",
            "--max-watches-per-client",
            "2",
            "--api-request-timeout-seconds",
            "1",
        ],
    )
    .await;
    let api = c.replica(2).api();
    let mut k = Kubectl::new(&c, 2);
    k.server = format!("https://{api}");
    k.kubeconfig = Some(pki.join("admin.kubeconfig"));
    k.ok(&[
        "create",
        "clusterrolebinding",
        "viewers",
        "--clusterrole=view",
        "--group=viewers",
    ]);
    let as_user = |token: &str| {
        Arc::new(
            flotilla::client::Client::with_tls(
                vec![],
                Duration::from_secs(10),
                Some(client_tls(&pki, None)),
            )
            .with_bearer(token),
        )
    };
    let (flood, calm) = (as_user("flood-token"), as_user("calm-token"));
    let pods = "/api/v1/namespaces/default/pods";
    wait_for(
        Duration::from_secs(10),
        "the viewers' binding to apply",
        || async { (get(&calm, &api, pods).await.0 == 200).then_some(()) },
    )
    .await;

    // One client floods from 8 connections; another asks at its own pace meanwhile.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for _ in 0..8 {
        let (flood, api, stop) = (flood.clone(), api.clone(), stop.clone());
        flooders.push(tokio::spawn(async move {
            let mut codes: HashMap<u16, u64> = HashMap::new();
            let mut retry_after = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = flood
                    .send_raw(
                        http::Method::GET,
                        &api,
                        pods,
                        "application/json",
                        vec![],
                        None,
                    )
                    .await
                    .unwrap();
                retry_after |= resp.headers().contains_key(http::header::RETRY_AFTER);
                *codes.entry(resp.status().as_u16()).or_default() += 1;
            }
            (codes, retry_after)
        }));
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let started = std::time::Instant::now();
        let (code, body) = get(&calm, &api, pods).await;
        assert_eq!(code, 200, "the calm client was refused: {body}");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes: HashMap<u16, u64> = HashMap::new();
    let mut retry_after = false;
    for f in flooders {
        let (c, r) = f.await.unwrap();
        for (k, v) in c {
            *codes.entry(k).or_default() += v;
        }
        retry_after |= r;
    }
    assert!(codes.get(&429).copied().unwrap_or(0) > 0, "{codes:?}");
    assert!(codes.get(&200).copied().unwrap_or(0) > 0, "{codes:?}");
    assert_eq!(codes.len(), 2, "only 200 and 429: {codes:?}");
    assert!(retry_after, "a 429 says when to retry");
    assert!(
        slowest < Duration::from_secs(1),
        "the calm client waited {slowest:?}"
    );

    // Watches: two per client; a third waits for one to end.
    let watch = format!("{pods}?watch=true");
    let w1 = calm.get_stream(&api, &watch).await.unwrap();
    let w2 = calm.get_stream(&api, &watch).await.unwrap();
    assert_eq!((w1.status().as_u16(), w2.status().as_u16()), (200, 200));
    let refused = calm.get_stream(&api, &watch).await.unwrap();
    assert_eq!(refused.status(), 429);
    let body = flotilla::client::read_all(&api, refused.into_body(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&body).contains("too many watches"),
        "{body:?}"
    );
    drop(w1);
    wait_for(
        Duration::from_secs(10),
        "a watch slot to free up",
        || async {
            let w = calm.get_stream(&api, &watch).await.ok()?;
            (w.status() == 200).then_some(())
        },
    )
    .await;
    drop(w2);

    // The request timeout: a log from a node whose agent accepts connections and never
    // answers is cut off with a 504 after a second.
    let ghost = tokio::net::TcpListener::bind(format!("{}.250:0", c.prefix))
        .await
        .unwrap();
    let port = ghost.local_addr().unwrap().port();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = ghost.accept().await {
            held.push(s);
        }
    });
    let admin = c.client();
    let json = "application/json";
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "ghost"}});
    assert_eq!(
        send(
            &admin,
            &api,
            http::Method::POST,
            "/api/v1/nodes",
            json,
            &node
        )
        .await
        .0,
        201
    );
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": format!("{}.250", c.prefix)}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
    let (code, body) = send(
        &admin,
        &api,
        http::Method::PATCH,
        "/api/v1/nodes/ghost/status",
        "application/merge-patch+json",
        &status,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "haunted"},
        "spec": {"nodeName": "ghost", "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}});
    assert_eq!(
        send(&admin, &api, http::Method::POST, pods, json, &pod)
            .await
            .0,
        201
    );
    let started = std::time::Instant::now();
    let (code, body) = send(
        &admin,
        &api,
        http::Method::GET,
        &format!("{pods}/haunted/log"),
        json,
        &Value::Null,
    )
    .await;
    assert_eq!(code, 504, "{body}");
    assert_eq!(body["reason"], "Timeout", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Every refusal is counted.
    let (_, metrics) = get(&admin, &api, "/metrics").await;
    for reason in ["client_rate", "client_watches", "timeout"] {
        let prefix = format!("flotilla_api_rejected_requests_total{{reason=\"{reason}\"}}");
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {reason} count"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 0.0, "{line}");
    }
    // The cluster is fine: writes go through.
    k.ok(&["create", "configmap", "after-the-flood"]);
}
