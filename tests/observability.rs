//! Metrics and health as operators consume them: `promtool` accepts every exposition and the
//! shipped rules, and a real Prometheus (Debian's package) scrapes a running cluster with the
//! shipped configuration and sees exactly one leader, request counters and a leader change.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const REQUIRED: &[&str] = &[
    "flotilla_build_info",
    "flotilla_raft_term",
    "flotilla_raft_is_leader",
    "flotilla_raft_leader_changes_total",
    "flotilla_raft_commit_index",
    "flotilla_raft_applied_index",
    "flotilla_raft_apply_lag_entries",
    "flotilla_raft_proposals_total",
    "flotilla_raft_log_fsync_duration_seconds_bucket",
    "flotilla_raft_log_fsync_appends_bucket",
    "flotilla_raft_log_appended_entries_total",
    "flotilla_raft_snapshots_built_total",
    "flotilla_store_revision",
    "flotilla_store_compact_revision",
    "flotilla_store_db_size_bytes",
    "flotilla_store_quota_bytes",
    "flotilla_store_keys",
    "flotilla_store_watchers",
    "flotilla_api_requests_total",
    "flotilla_api_request_duration_seconds_bucket",
    "flotilla_api_requests_in_flight",
    "flotilla_api_watches_open",
    "flotilla_api_read_barrier_duration_seconds_bucket",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_cpu_seconds_total",
    "process_threads",
];

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; .ci/setup.sh installs it)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_exposes_lint_clean_metrics_and_a_verbose_readyz() {
    let c = Cluster::start(3, &[]).await;
    let client = c.client();
    for i in 0..20 {
        put(&client, &format!("m{i}"), "v").await;
    }
    get(&client, "m1", false).await.unwrap();
    for id in 1..=3 {
        let (status, text) = c
            .client_for(id)
            .get_text(&c.replica(id).api(), "/metrics")
            .await
            .unwrap();
        assert_eq!(status, 200);
        for name in REQUIRED {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "replica {id} does not expose {name}"
            );
        }
        let (ok, problems) = promtool(&["check", "metrics"], Some(&text));
        assert!(
            ok && problems.trim().is_empty(),
            "promtool on replica {id}:\n{problems}"
        );
        let (status, body) = c
            .client_for(id)
            .get_text(&c.replica(id).api(), "/readyz?verbose")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        for check in [
            "[+] store",
            "[+] quorum",
            "[+] caught-up",
            "readyz check passed",
        ] {
            assert!(
                body.contains(check),
                "replica {id} readyz lacks {check:?}:\n{body}"
            );
        }
    }
    let leader = c.wait_leader().await;
    assert_eq!(c.metric(leader, "flotilla_raft_is_leader").await, Some(1.0));
    assert!(
        c.metric(leader, "flotilla_raft_proposed_commands_total")
            .await
            .unwrap_or(0.0)
            >= 20.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_quorum_reports_not_ready() {
    let mut c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    for id in (1..=3).filter(|&id| id != leader).collect::<Vec<_>>() {
        c.kill(id);
    }
    let body = wait_for(
        Duration::from_secs(10),
        "readyz to fail on the isolated leader",
        || async {
            let (status, body) = c
                .client_for(leader)
                .get_text(&c.replica(leader).api(), "/readyz?verbose")
                .await
                .ok()?;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(body.contains("[-] quorum"), "{body}");
    // Liveness is not readiness: the process is still alive.
    let (status, _) = c
        .client_for(leader)
        .get_text(&c.replica(leader).api(), "/livez")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[test]
fn the_shipped_prometheus_config_and_rules_pass_promtool() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    let (ok, out) = promtool(&["check", "rules", &format!("{dir}/rules.yml")], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["check", "config", &format!("{dir}/prometheus.yml")], None);
    assert!(ok, "{out}");
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/flotilla-dashboard.json"
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(v["panels"].as_array().is_some_and(|p| p.len() >= 10));
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One number from an instant query, if the result has exactly one sample.
async fn query(client: &flotilla::client::Client, server: &str, q: &str) -> Option<f64> {
    let (status, body) = client
        .get_text(server, &format!("/api/v1/query?query={}", encode(q)))
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_cluster_and_sees_one_leader_and_a_leader_change() {
    let mut c = Cluster::start(3, &[]).await;
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    let prom_dir = c.dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    // The shipped configuration, pointed at this test's replicas and scraping every second.
    let mut config = std::fs::read_to_string(format!("{src}/prometheus.yml")).unwrap();
    for id in 1..=3u64 {
        config = config.replace(&format!("127.0.0.1:644{id}"), &c.replica(id).api());
    }
    // An agent, scraped under job flotilla-agent at the address the shipped config names.
    let agent_listen = format!("{}.7:8441", c.prefix);
    config = config.replace("127.0.0.1:8441", &agent_listen);
    let servers: Vec<String> = (1..=3).map(|id| c.replica(id).api()).collect();
    let agent_dir = c.dir.path().join("agent");
    let _agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["agent", "--servers", &servers.join(",")])
            .args(["--node-name", "prom-node", "--heartbeat-seconds", "1"])
            .args(["--listen", &agent_listen])
            .arg("--data-dir")
            .arg(&agent_dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(c.dir.path().join("agent.log")).unwrap())
            .spawn()
            .expect("the agent starts"),
    );
    config = config.replace("scrape_interval: 5s", "scrape_interval: 1s");
    config = config.replace("evaluation_interval: 5s", "evaluation_interval: 1s");
    assert!(
        config.contains(&c.replica(3).api()),
        "the shipped config names the three default targets"
    );
    std::fs::write(prom_dir.join("prometheus.yml"), config).unwrap();
    std::fs::copy(format!("{src}/rules.yml"), prom_dir.join("rules.yml")).unwrap();
    let listen = format!("{}.5:9090", c.prefix);
    let _prom = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                prom_dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(prom_dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect(
                "prometheus is installed (Debian package prometheus; .ci/setup.sh installs it)",
            ),
    );
    let prom = flotilla::client::Client::new(vec![listen.clone()], Duration::from_secs(5));

    wait_for(
        Duration::from_secs(60),
        "Prometheus to scrape all three replicas and the agent",
        || async {
            let (_, body) = prom.get_text(&listen, "/api/v1/targets").await.ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let targets = v["data"]["activeTargets"].as_array()?;
            (targets.len() == 4 && targets.iter().all(|t| t["health"] == "up")).then_some(())
        },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "the agent's Lease renewals to reach Prometheus",
        || async {
            let n = query(
                &prom,
                &listen,
                r#"sum(flotilla_agent_lease_renewals_total{job="flotilla-agent",result="ok"})"#,
            )
            .await?;
            (n >= 1.0).then_some(())
        },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "sum(flotilla_raft_is_leader) == 1",
        || async {
            (query(&prom, &listen, "sum(flotilla_raft_is_leader)").await? == 1.0).then_some(())
        },
    )
    .await;

    let client = c.client();
    for i in 0..10 {
        put(&client, &format!("p{i}"), "v").await;
    }
    wait_for(
        Duration::from_secs(30),
        "the put counters to reach Prometheus",
        || async {
            let n = query(
                &prom,
                &listen,
                r#"sum(flotilla_api_requests_total{verb="put",code="200"})"#,
            )
            .await?;
            (n >= 10.0).then_some(())
        },
    )
    .await;

    // Every expression of the shipped dashboard and rules runs, and every series they name
    // exists (a renamed metric would leave a panel or an alert silently empty).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/flotilla-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    let rules_text = std::fs::read_to_string(format!("{src}/rules.yml")).unwrap();
    let mut names: Vec<String> = exprs
        .iter()
        .map(String::as_str)
        .chain(rules_text.lines().filter(|l| l.contains("expr:")))
        .flat_map(|e| {
            e.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_' || ch == ':'))
                .filter(|w| w.starts_with("flotilla_") || w.starts_with("flotilla:"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 20, "{names:?}");
    for e in &exprs {
        let (status, body) = prom
            .get_text(&listen, &format!("/api/v1/query?query={}", encode(e)))
            .await
            .unwrap();
        assert!(
            status == 200 && body.contains(r#""status":"success""#),
            "dashboard expression {e}: {body}"
        );
    }
    for name in &names {
        wait_for(
            Duration::from_secs(30),
            &format!("the series {name} that the dashboard or the rules use"),
            || async {
                query(&prom, &listen, &format!(r#"count({{__name__="{name}"}})"#))
                    .await
                    .filter(|n| *n >= 1.0)
            },
        )
        .await;
    }

    // Counted on the survivors only: the killed leader's series leaves the sum, and it may
    // have counted more changes (startup elections) than the survivors add.
    let leader = c.wait_leader().await;
    let survivors = format!(
        r#"sum(flotilla_raft_leader_changes_total{{job="flotilla",instance!="{}"}})"#,
        c.replica(leader).api()
    );
    let before = wait_for(
        Duration::from_secs(30),
        "the survivors' leader changes",
        || async { query(&prom, &listen, &survivors).await },
    )
    .await;
    c.kill(leader);
    c.wait_leader().await;
    wait_for(
        Duration::from_secs(30),
        "the leader change to show in Prometheus",
        || async {
            let after = query(&prom, &listen, &survivors).await?;
            (after > before).then_some(())
        },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "the killed replica's target to go down",
        || async {
            (query(&prom, &listen, r#"sum(up{job="flotilla"})"#).await? == 2.0).then_some(())
        },
    )
    .await;
    let (_, rules) = prom.get_text(&listen, "/api/v1/rules").await.unwrap();
    assert!(
        rules.contains("FlotillaNoLeader") && rules.contains("flotilla-recording"),
        "{rules}"
    );
}

/// One plain HTTP/1.1 GET with `headers`; the whole answer as text.
async fn raw_get(server: &str, path: &str, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {server}\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_an_id_that_its_logs_and_its_response_carry() {
    let c = Cluster::start(
        3,
        &[
            "--log-format",
            "json",
            "--log-level",
            "info,flotilla::http=debug,flotilla_raft::proposer=debug,flotilla_raft::replica=debug,flotilla_raft::state_machine=debug",
        ],
    )
    .await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let api = c.replica(follower).api();
    // The client's id is kept and echoed; a write sent to a follower is forwarded to the
    // leader within the request's span.
    let body = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"traced"}}"#;
    let answer = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&api).await.unwrap();
        s.write_all(
            format!(
                "POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: {api}\r\nX-Request-Id: test-req-42\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-request-id: test-req-42\r\n"),
        "{answer}"
    );
    let log = c.replica(follower).data_dir.with_extension("log");
    let line = wait_for(
        Duration::from_secs(10),
        "the request's log line",
        || async {
            std::fs::read_to_string(&log)
                .ok()?
                .lines()
                .find(|l| l.contains("request served") && l.contains("test-req-42"))
                .map(str::to_string)
        },
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["span"]["id"], "test-req-42", "{line}");
    assert_eq!(v["span"]["method"], "POST", "{line}");
    assert_eq!(v["fields"]["status"], 201, "{line}");
    // The id rides with the write: the follower logs forwarding it, the leader receiving
    // it, and every replica applying it (same log index and revision everywhere).
    let line_with = |id: u64, what: &'static str| {
        let log = c.replica(id).data_dir.with_extension("log");
        async move {
            std::fs::read_to_string(&log)
                .ok()?
                .lines()
                .filter(|l| l.contains("test-req-42"))
                .find(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .is_ok_and(|v| v["fields"]["message"] == what)
                })
                .map(str::to_string)
        }
    };
    let forwarded = wait_for(
        Duration::from_secs(10),
        "the follower's forward line",
        || line_with(follower, "forwarding writes to the leader"),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&forwarded).unwrap();
    assert_eq!(v["span"]["id"], "test-req-42", "{forwarded}");
    wait_for(Duration::from_secs(10), "the leader's receive line", || {
        line_with(leader, "forwarded writes received")
    })
    .await;
    let mut applied = Vec::new();
    for id in 1..=3 {
        let line = wait_for(Duration::from_secs(10), "an apply line", || {
            line_with(id, "applied")
        })
        .await;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["fields"]["request_id"], "test-req-42", "{line}");
        assert_eq!(v["fields"]["succeeded"], true, "{line}");
        applied.push((
            v["fields"]["index"].clone(),
            v["fields"]["revision"].clone(),
        ));
    }
    assert!(
        applied.iter().all(|a| *a == applied[0]) && applied[0].0.is_u64(),
        "every replica applies the request's write at one index and revision: {applied:?}"
    );
    // Without one (or with one that is not plain), the replica makes one up.
    for headers in ["", "X-Request-Id: bad id with spaces\r\n"] {
        let answer = raw_get(&api, "/api/v1/namespaces/default", headers).await;
        let id = answer
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-request-id: ")
                    .map(str::to_string)
            })
            .unwrap_or_default();
        assert!(
            id.len() == 16 && id.chars().all(|ch| ch.is_ascii_hexdigit()),
            "{answer}"
        );
    }
}
