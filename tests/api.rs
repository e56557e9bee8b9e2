//! The key-value API and the operator tools against a real cluster: bad input, transactions,
//! compaction, membership changes, leader transfer, and `flotilla ctl` snapshots.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use flotilla::client::ClientError;
use flotilla::gateway::json::*;

/// POSTs a raw body to one replica; returns (status, body).
async fn raw(c: &Cluster, id: u64, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let client = c.client_for(id);
    let resp = client
        .post_raw(&c.replica(id).api(), path, body.to_vec(), None)
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

fn message(v: &serde_json::Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let c = Cluster::start(3, &[]).await;
    let client = c.client();
    for i in 0..10 {
        put(&client, &format!("k{i}"), "v").await;
    }
    let compact: serde_json::Value = client
        .post(
            "/v3/kv/compaction",
            &CompactionRequest {
                revision: 5,
                physical: true,
            },
        )
        .await
        .unwrap();
    assert!(compact["header"].is_object());
    let before = all(&client, false).await.unwrap();

    let (s, b) = raw(&c, 1, "/v3/kv/put", b"{not json").await;
    assert_eq!(s, 400, "malformed JSON");
    assert!(message(&b).contains("malformed"), "{b}");

    let (s, b) = raw(
        &c,
        1,
        "/v3/kv/put",
        br#"{"key":"a2V5","value":"dg==","frobnicate":1}"#,
    )
    .await;
    assert_eq!(s, 400, "unknown field");
    assert!(message(&b).contains("frobnicate"), "{b}");

    let (s, _) = raw(&c, 2, "/v3/kv/frobnicate", b"{}").await;
    assert_eq!(s, 404, "unknown operation");

    let (s, b) = raw(&c, 1, "/v3/kv/txn", br#"{"success":[{}]}"#).await;
    assert_eq!(s, 400, "txn op with no operation");
    assert!(message(&b).contains("exactly one"), "{b}");

    let (s, b) = raw(
        &c,
        1,
        "/v3/kv/txn",
        br#"{"compare":[{"key":"YQ==","target":"COLOUR"}]}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(message(&b).contains("COLOUR"), "{b}");

    let big = PutRequest {
        key: b"big".to_vec(),
        value: vec![b'x'; 1536 * 1024 + 1],
        prev_kv: false,
        lease: 0,
    };
    match client.post::<_, PutResponse>("/v3/kv/put", &big).await {
        Err(ClientError::Api {
            status: 400, body, ..
        }) => assert!(body.error.contains("too large"), "{}", body.error),
        other => panic!("oversized value: {other:?}"),
    }
    let huge = vec![b' '; 5 << 20];
    let (s, _) = raw(&c, 1, "/v3/kv/put", &huge).await;
    assert_eq!(s, 413, "oversized body");

    let future = RangeRequest {
        key: b"k1".to_vec(),
        revision: 1_000_000,
        ..RangeRequest::default()
    };
    match client
        .post::<_, RangeResponse>("/v3/kv/range", &future)
        .await
    {
        Err(ClientError::Api {
            status: 400, body, ..
        }) => assert!(body.error.contains("future revision"), "{}", body.error),
        other => panic!("future revision: {other:?}"),
    }
    let compacted = RangeRequest {
        key: b"k1".to_vec(),
        revision: 2,
        ..RangeRequest::default()
    };
    match client
        .post::<_, RangeResponse>("/v3/kv/range", &compacted)
        .await
    {
        Err(ClientError::Api {
            status: 410, body, ..
        }) => assert!(body.error.contains("compacted"), "{}", body.error),
        other => panic!("compacted revision: {other:?}"),
    }
    match client
        .post::<_, serde_json::Value>(
            "/v3/kv/compaction",
            &CompactionRequest {
                revision: 3,
                physical: false,
            },
        )
        .await
    {
        Err(ClientError::Api { status: 410, .. }) => {}
        other => panic!("compacting below the compaction point: {other:?}"),
    }
    let (s, b) = raw(
        &c,
        3,
        "/v3/watch",
        br#"{"create_request":{"key":"AA==","range_end":"AA==","start_revision":"2"}}"#,
    )
    .await;
    assert_eq!(s, 410, "a watch from a compacted revision");
    assert!(message(&b).contains("compacted"), "{b}");

    match client
        .post::<_, MemberListResponse>("/v3/cluster/member/remove", &MemberIdRequest { id: 42 })
        .await
    {
        Err(ClientError::Api {
            status: 404, body, ..
        }) => assert!(body.error.contains("unknown member"), "{}", body.error),
        other => panic!("unknown member: {other:?}"),
    }
    let (s, _) = raw(
        &c,
        1,
        "/v3/cluster/member/add",
        br#"{"ID":"0","peerURLs":["127.0.0.1:1"]}"#,
    )
    .await;
    assert_eq!(s, 400, "member id 0");
    let (s, _) = raw(&c, 1, "/v3/kv/put", br#"{"key":"","value":"dg=="}"#).await;
    assert_eq!(s, 400, "empty key");
    let (s, _) = raw(&c, 1, "/v3/kv/put", br#"{"key":"!!!","value":"dg=="}"#).await;
    assert_eq!(s, 400, "bad base64");

    let after = all(&client, false).await.unwrap();
    assert_eq!(
        after.header.revision, before.header.revision,
        "no revision was spent on bad input"
    );
    assert_eq!(after.kvs, before.kvs, "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_swap_transaction_applies_only_when_its_guard_holds() {
    let c = Cluster::start(3, &[]).await;
    let client = c.client();
    let rev = put(&client, "lock", "free").await;
    let cas = |expect: i64, value: &str| TxnRequest {
        compare: vec![Compare {
            result: Some("EQUAL".into()),
            target: Some("MOD".into()),
            key: b"lock".to_vec(),
            mod_revision: expect,
            ..Compare::default()
        }],
        success: vec![RequestOp {
            request_put: Some(PutRequest {
                key: b"lock".to_vec(),
                value: value.as_bytes().to_vec(),
                prev_kv: true,
                lease: 0,
            }),
            ..RequestOp::default()
        }],
        failure: vec![RequestOp {
            request_range: Some(RangeRequest {
                key: b"lock".to_vec(),
                ..RangeRequest::default()
            }),
            ..RequestOp::default()
        }],
    };
    let won: TxnResponse = client.post("/v3/kv/txn", &cas(rev, "mine")).await.unwrap();
    assert!(won.succeeded);
    assert_eq!(
        won.responses[0]
            .response_put
            .as_ref()
            .unwrap()
            .prev_kv
            .as_ref()
            .unwrap()
            .value,
        b"free"
    );
    let lost: TxnResponse = client.post("/v3/kv/txn", &cas(rev, "yours")).await.unwrap();
    assert!(!lost.succeeded, "the guard saw a stale mod revision");
    let current = &lost.responses[0].response_range.as_ref().unwrap().kvs[0];
    assert_eq!(current.value, b"mine");
    assert_eq!(current.mod_revision, won.header.revision);
    assert_eq!(
        lost.header.revision, won.header.revision,
        "a failed guard spends no revision"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_can_be_added_removed_and_leadership_transferred() {
    let mut c = Cluster::start(3, &[]).await;
    let client = c.client();
    put(&client, "before-join", "1").await;

    // Transfer leadership to each follower in turn.
    for _ in 0..2 {
        let leader = c.wait_leader().await;
        let target = (1..=3).find(|&id| id != leader).unwrap();
        let _: serde_json::Value = client
            .post(
                "/v3/maintenance/transfer-leadership",
                &TransferLeadershipRequest { target_id: target },
            )
            .await
            .unwrap();
        assert_eq!(
            c.wait_leader().await,
            target,
            "leadership moved to {target}"
        );
    }

    // A fourth replica joins, catches up, becomes a voter, then leaves.
    c.add_slot(4);
    c.launch(4, &["--join"]);
    let r: MemberListResponse = client
        .post(
            "/v3/cluster/member/add",
            &MemberAddRequest {
                id: 4,
                peer_urls: vec![format!("http://{}", c.replica(4).peer())],
                is_learner: false,
            },
        )
        .await
        .unwrap();
    let m4 = r
        .members
        .iter()
        .find(|m| m.id == 4)
        .expect("member 4 listed");
    assert!(!m4.is_learner, "promoted to voter");
    put(&client, "after-join", "2").await;
    let got = get(&c.client_for(4), "after-join", false).await.unwrap();
    assert_eq!(got.unwrap().value, b"2");
    assert!(get(&c.client_for(4), "before-join", true)
        .await
        .unwrap()
        .is_some());
    // Its API address is announced.
    wait_for(
        Duration::from_secs(10),
        "member 4 to announce its API address",
        || async {
            let r: MemberListResponse = client
                .post("/v3/cluster/member/list", &serde_json::json!({}))
                .await
                .ok()?;
            r.members
                .iter()
                .any(|m| {
                    m.id == 4 && m.client_urls == vec![format!("http://{}", c.replica(4).api())]
                })
                .then_some(())
        },
    )
    .await;

    let r: MemberListResponse = client
        .post("/v3/cluster/member/remove", &MemberIdRequest { id: 4 })
        .await
        .unwrap();
    assert!(r.members.iter().all(|m| m.id != 4));
    c.kill(4);
    put(&client, "after-leave", "3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_saves_a_snapshot_that_seeds_a_new_cluster() {
    let c = Cluster::start(3, &[]).await;
    let client = c.client();
    for i in 0..25 {
        put(&client, &format!("snap{i:02}"), &format!("v{i}")).await;
    }
    let before = all(&client, false).await.unwrap();
    let servers = c
        .replicas
        .iter()
        .map(|r| r.api())
        .collect::<Vec<_>>()
        .join(",");
    let file = c.dir.path().join("backup.snap");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["ctl", "--servers", &servers, "snapshot", "save"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "snapshot save: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains(&format!("revision {}", before.header.revision)),
        "{said}"
    );

    // A damaged file is refused.
    let mut bad = std::fs::read(&file).unwrap();
    let n = bad.len();
    bad.truncate(n - 3);
    let bad_file = c.dir.path().join("bad.snap");
    std::fs::write(&bad_file, bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["ctl", "snapshot", "restore"])
        .arg(&bad_file)
        .arg("--data-dir")
        .arg(c.dir.path().join("bad-restore"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a truncated snapshot must not restore"
    );

    let mut fresh = Cluster::new(3, &[]);
    for id in 1..=3u64 {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["ctl", "snapshot", "restore"])
            .arg(&file)
            .arg("--data-dir")
            .arg(&fresh.replica(id).data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fresh.launch(id, &[]);
    }
    fresh.wait_leader().await;
    let restored = all(&fresh.client(), false).await.unwrap();
    assert_eq!(restored.kvs, before.kvs);
    assert_eq!(restored.header.revision, before.header.revision);
    let rev = put(&fresh.client(), "new", "write").await;
    assert_eq!(
        rev,
        before.header.revision + 1,
        "revisions continue from the snapshot"
    );
}

/// With its in-flight bounds at one request each, a replica under a burst answers some
/// requests 429 `TooManyRequests` with `Retry-After` at once, serves the others, and a
/// refused create leaves nothing behind: the objects that exist are exactly the ones
/// whose create was answered 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_in_flight_bound_are_refused_whole() {
    use http_body_util::BodyExt;
    let c = Cluster::start(
        3,
        &[
            "--max-requests-inflight",
            "1",
            "--max-mutating-requests-inflight",
            "1",
        ],
    )
    .await;
    let server = c.replica(1).api();
    let client = std::sync::Arc::new(flotilla::client::Client::new(
        vec![server.clone()],
        Duration::from_secs(10),
    ));
    let send = |method: http::Method, path: String, body: Vec<u8>| {
        let (client, server) = (client.clone(), server.clone());
        async move {
            let resp = client
                .send_raw(method, &server, &path, "application/json", body, None)
                .await
                .expect("an answer");
            let status = resp.status().as_u16();
            let retry = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().to_string());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            (status, retry, body)
        }
    };
    let creates: Vec<_> = (0..100)
        .map(|i| {
            let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("cm-{i}")}, "data": {"k": "v"}});
            send(
                http::Method::POST,
                "/api/v1/namespaces/default/configmaps".into(),
                serde_json::to_vec(&cm).unwrap(),
            )
        })
        .collect();
    let answers = futures::future::join_all(creates).await;
    let mut created = std::collections::BTreeSet::new();
    let mut refused = 0;
    for (i, (status, retry, body)) in answers.iter().enumerate() {
        match status {
            201 => {
                created.insert(format!("cm-{i}"));
            }
            429 => {
                refused += 1;
                assert_eq!(retry.as_deref(), Some("1"), "{body}");
                assert_eq!(body["reason"], "TooManyRequests", "{body}");
                assert_eq!(body["kind"], "Status", "{body}");
            }
            other => panic!("create {i}: {other} {body}"),
        }
    }
    assert!(refused > 0, "a burst of 100 over a bound of 1 refuses some");
    assert!(!created.is_empty(), "and serves some");
    // What exists is exactly what was acknowledged.
    let (status, _, list) = send(
        http::Method::GET,
        "/api/v1/namespaces/default/configmaps".into(),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    let names: std::collections::BTreeSet<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .filter(|n| n.starts_with("cm-"))
        .map(str::to_string)
        .collect();
    assert_eq!(names, created);
    // Reads have their own bound.
    let reads: Vec<_> = (0..100)
        .map(|_| {
            send(
                http::Method::GET,
                "/api/v1/namespaces/default/configmaps".into(),
                Vec::new(),
            )
        })
        .collect();
    let codes: Vec<u16> = futures::future::join_all(reads)
        .await
        .into_iter()
        .map(|(s, _, _)| s)
        .collect();
    assert!(codes.iter().all(|s| *s == 200 || *s == 429), "{codes:?}");
    assert!(codes.contains(&429) && codes.contains(&200), "{codes:?}");
}
