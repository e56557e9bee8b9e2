//! Kubernetes watches across replica failure: a watch opened on a follower sees every change
//! made through the leader, in order, and when that replica is killed the client resumes on
//! another replica from the last resourceVersion it saw, losing and repeating nothing.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

const PATH: &str = "/api/v1/namespaces/default/configmaps";

/// A watch of the ConfigMaps from `rv`, with bookmarks, on replica `id`.
async fn open_watch(c: &Cluster, id: u64, rv: &str) -> Result<KubeWatch, String> {
    KubeWatch::open_path(
        c,
        id,
        &format!("{PATH}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_follower_resumes_on_another_replica_without_loss() {
    let mut c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let other = (1..=3).find(|&id| id != leader && id != follower).unwrap();
    let (status, list) = c
        .client_for(leader)
        .get_text(&c.replica(leader).api(), PATH)
        .await
        .unwrap();
    assert_eq!(status, 200, "{list}");
    let start_rv = serde_json::from_str::<Value>(&list).unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // The writer: creates, then merge-patches, through the leader, recording every
    // acknowledged change as (name, resourceVersion).
    const NAMES: usize = 40;
    const WRITES: usize = 160;
    let writer = {
        let client = c.client_for(leader);
        let server = c.replica(leader).api();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..WRITES {
                let name = format!("cm{}", i % NAMES);
                let (method, path, ctype, body) = if i < NAMES {
                    (
                        http::Method::POST,
                        PATH.to_string(),
                        "application/json",
                        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"i": "0"}}),
                    )
                } else {
                    (
                        http::Method::PATCH,
                        format!("{PATH}/{name}"),
                        "application/merge-patch+json",
                        json!({"data": {"i": i.to_string()}}),
                    )
                };
                let resp = client
                    .send_raw(
                        method,
                        &server,
                        &path,
                        ctype,
                        serde_json::to_vec(&body).unwrap(),
                        None,
                    )
                    .await
                    .expect("the leader stays up");
                let status = resp.status().as_u16();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                assert!(
                    status == 200 || status == 201,
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
                let obj: Value = serde_json::from_slice(&bytes).unwrap();
                let rv = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string();
                acked.push((name, rv));
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            acked
        })
    };

    // The watcher: starts on the follower; after a third of the writes the follower is
    // killed, and the watch resumes on the third replica from the last resourceVersion seen.
    let mut seen: Vec<(String, String, String)> = Vec::new(); // (type, name, rv)
    let mut last_rv = start_rv.clone();
    let mut w = open_watch(&c, follower, &start_rv).await.unwrap();
    let mut on = follower;
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < WRITES {
        assert!(
            Instant::now() < deadline,
            "saw only {} of {WRITES} events before the deadline",
            seen.len()
        );
        if !killed && seen.len() >= WRITES / 3 {
            c.kill(follower);
            killed = true;
        }
        match w.next(Duration::from_secs(5)).await {
            Some(ev) => {
                let kind = ev["type"].as_str().unwrap_or("").to_string();
                let rv = ev["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                assert_ne!(kind, "ERROR", "watch error event: {ev}");
                last_rv = rv.clone();
                if kind == "BOOKMARK" {
                    continue;
                }
                let name = ev["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string();
                seen.push((kind, name, rv));
            }
            None => {
                // The stream broke (its replica died) or went quiet: resume from the last
                // resourceVersion on a replica that answers.
                assert!(
                    killed || on != follower,
                    "the watch ended while its replica was up"
                );
                on = other;
                w = wait_for(
                    Duration::from_secs(10),
                    "a replica to resume the watch",
                    || {
                        let c = &c;
                        let rv = last_rv.clone();
                        async move { open_watch(c, other, &rv).await.ok() }
                    },
                )
                .await;
            }
        }
    }
    let acked = writer.await.unwrap();
    assert!(killed, "the follower was killed mid-stream");
    assert_eq!(on, other, "the watch moved to another replica");

    // Every acknowledged change exactly once, in resourceVersion order.
    let rvs: Vec<u64> = seen.iter().map(|(_, _, rv)| rv.parse().unwrap()).collect();
    assert!(
        rvs.windows(2).all(|w| w[0] < w[1]),
        "events out of order or repeated: {rvs:?}"
    );
    let got: BTreeSet<(String, String)> = seen
        .iter()
        .map(|(_, name, rv)| (name.clone(), rv.clone()))
        .collect();
    let want: BTreeSet<(String, String)> = acked.into_iter().collect();
    assert_eq!(got, want, "the watch saw exactly the acknowledged changes");
    let added = seen.iter().filter(|(t, _, _)| t == "ADDED").count();
    assert_eq!(
        added, NAMES,
        "one ADDED per created object, the rest MODIFIED"
    );
}

/// GETs a path and parses the JSON answer.
async fn get_json(c: &Cluster, id: u64, path: &str) -> Value {
    let (status, text) = c
        .client_for(id)
        .get_text(&c.replica(id).api(), path)
        .await
        .unwrap();
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_larger_than_a_store_chunk_are_whole_and_pages_stay_at_one_revision() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    const N: usize = 1100; // more than two of the server's 500-key store chunks
    let mut tasks = Vec::new();
    for t in 0..16 {
        let client = c.client_for(leader);
        let server = c.replica(leader).api();
        tasks.push(tokio::spawn(async move {
            for i in (t..N).step_by(16) {
                let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("c{i:04}"), "labels": {"odd": (i % 2 == 1).to_string()}}});
                // A create that got no answer (the machine is busy with the other tests) is
                // sent again; then it may find its first attempt landed.
                let mut tries = 0;
                loop {
                    tries += 1;
                    match client
                        .post_raw(&server, PATH, serde_json::to_vec(&body).unwrap(), None)
                        .await
                    {
                        Ok(resp) => {
                            let s = resp.status();
                            assert!(s == 201 || (tries > 1 && s == 409), "{s}");
                            break;
                        }
                        Err(e) if tries < 3 => eprintln!("create c{i:04}: {e}; again"),
                        Err(e) => panic!("create c{i:04}: {e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let all = get_json(&c, follower, PATH).await;
    let expected: Vec<String> = (0..N).map(|i| format!("c{i:04}")).collect();
    assert_eq!(names(&all), expected, "a whole list, in key order");
    assert_eq!(all["kind"], "ConfigMapList");
    assert!(all["items"][0]["metadata"]["resourceVersion"].is_string());

    // Pages: 700 then the rest, at the first page's revision even after another write.
    let p1 = get_json(&c, follower, &format!("{PATH}?limit=700")).await;
    assert_eq!(names(&p1), expected[..700].to_vec());
    assert_eq!(p1["metadata"]["remainingItemCount"], 400);
    let token = p1["metadata"]["continue"].as_str().unwrap().to_string();
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "zz-late"}});
    let resp = c
        .client_for(leader)
        .post_raw(
            &c.replica(leader).api(),
            PATH,
            serde_json::to_vec(&body).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let p2 = get_json(&c, follower, &format!("{PATH}?limit=700&continue={token}")).await;
    assert_eq!(
        names(&p2),
        expected[700..].to_vec(),
        "the page ignores the later write"
    );
    assert!(p2["metadata"].get("continue").is_none());
    assert_eq!(
        p2["metadata"]["resourceVersion"],
        p1["metadata"]["resourceVersion"]
    );

    // Filtered: selectors apply across chunks; and the later write is in a fresh list.
    let odd = get_json(&c, follower, &format!("{PATH}?labelSelector=odd%3Dtrue")).await;
    assert_eq!(names(&odd).len(), N / 2);
    let odd_page = get_json(
        &c,
        follower,
        &format!("{PATH}?labelSelector=odd%3Dtrue&limit=300"),
    )
    .await;
    assert_eq!(names(&odd_page), names(&odd)[..300].to_vec());
    assert!(
        odd_page["metadata"].get("remainingItemCount").is_none(),
        "not counted when filtered"
    );
    let fresh = get_json(&c, follower, PATH).await;
    assert_eq!(names(&fresh).len(), N + 1);
}
