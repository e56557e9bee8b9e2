//! `flotilla up`: the README's main command.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn free_host() -> String {
    let c = Cluster::new(1, &[]);
    c.replica(1).ip.clone()
}

/// Runs `flotilla up`, waits for it to report the cluster up, writes through it, then
/// interrupts it and checks that every replica stopped cleanly.
async fn up_once(host: &str, data: &std::path::Path, key: &str) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["up", "--host", host, "--base-port", "6441"])
        .args([
            "--service-cidr",
            &format!("{}.64/28", host.rsplit_once('.').unwrap().0),
            "--data-dir",
        ])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("`flotilla up` reports the cluster up");
        lines.push(line.clone());
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let servers: Vec<String> = (0..3).map(|i| format!("{host}:{}", 6441 + i)).collect();
    // Secure by default: the administrator's certificate from `--data-dir/pki`.
    let pki = data.join("pki");
    let admin = flotilla::tls::client_config(
        &pki.join("ca.crt"),
        Some((&pki.join("admin.crt"), &pki.join("admin.key"))),
    )
    .unwrap();
    let client = flotilla::client::Client::with_tls(
        servers,
        Duration::from_secs(10),
        Some(std::sync::Arc::new(admin)),
    );
    put(&client, key, "through-up").await;
    // The agent `flotilla up` starts registers node-1, Ready.
    wait_for(Duration::from_secs(60), "node-1 to be Ready", || async {
        let (code, body) = client
            .get_text(&format!("{host}:6441"), "/api/v1/nodes/node-1")
            .await
            .ok()?;
        let node: serde_json::Value = serde_json::from_str(&body).ok()?;
        let ready = node["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        (code == 200 && ready).then_some(())
    })
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "flotilla up exits cleanly on Ctrl-C: {status}"
    );
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_a_cluster_stops_it_cleanly_and_reuses_its_data() {
    let host = free_host();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lines = up_once(&host, &data, "first").await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Flotilla is up: 3 replicas")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "stopped 3 replicas"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "stopped 1 agents"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("Kubeconfig: ")),
        "{lines:?}"
    );
    let kubeconfig = std::fs::read_to_string(data.join("kubeconfig")).unwrap();
    assert!(
        kubeconfig.contains(&format!("server: https://{host}:6441"))
            && kubeconfig.contains("client-certificate: "),
        "{kubeconfig}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("kubeconfig"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the kubeconfig holds credentials");
    let ca = std::fs::read(data.join("pki/ca.crt")).unwrap();
    // Secrets at rest are encrypted with a key only this user may read.
    let enc = std::fs::read(data.join("pki/encryption.yaml")).unwrap();
    assert!(String::from_utf8_lossy(&enc).contains("aesgcm"));
    let mode = std::fs::metadata(data.join("pki/encryption.yaml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    for id in 1..=3 {
        let log = std::fs::read_to_string(data.join(id.to_string()).join("server.log")).unwrap();
        assert!(
            log.contains("stopped"),
            "replica {id} shut down cleanly:\n{log}"
        );
    }
    // The second run finds the first run's data, and keeps the cluster's CA.
    up_once(&host, &data, "second").await;
    assert_eq!(std::fs::read(data.join("pki/ca.crt")).unwrap(), ca);
    assert_eq!(
        std::fs::read(data.join("pki/encryption.yaml")).unwrap(),
        enc,
        "the key of the stored Secrets is kept"
    );
    let mut c = Cluster::new(3, &[]);
    c.initial_cluster = (1..=3)
        .map(|id| format!("{id}={host}:{}", 7441 + id - 1))
        .collect::<Vec<_>>()
        .join(",");
    let servers: Vec<String> = (0..3).map(|i| format!("{host}:{}", 6441 + i)).collect();
    // Start the cluster by hand from up's data directory to read both keys.
    for (i, r) in c.replicas.iter_mut().enumerate() {
        r.ip = host.clone();
        r.data_dir = data.join((i + 1).to_string());
    }
    for id in 1..=3u64 {
        let r = c.replica(id);
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["server", "--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&r.data_dir)
            .args(["--listen-api", &servers[(id - 1) as usize]])
            .args(["--listen-peer", &format!("{host}:{}", 7441 + id - 1)])
            .args(["--initial-cluster", &c.initial_cluster])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        c.replicas[(id - 1) as usize].child = Some(child);
    }
    let client = flotilla::client::Client::new(servers, Duration::from_secs(10));
    for key in ["first", "second"] {
        let got = wait_for(
            Duration::from_secs(30),
            &format!("{key} to be readable"),
            || async { get(&client, key, false).await.ok().flatten() },
        )
        .await;
        assert_eq!(got.value, b"through-up");
    }
}
