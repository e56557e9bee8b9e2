//! The watch cache (pods, nodes, services, endpoints, endpoint slices served from memory):
//! a watch by node name on a follower sees exactly its node's changes, in order; a list by
//! node name on a follower right after a write through the leader includes it (a consistent
//! read from the cache); the cache's answers equal the store's (a page of a list is always
//! read from the store); a watch from before the cache's window is served from the store;
//! a read from a revision the cache has not reached is served after it or refused as too
//! large.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

/// Opens the watch `path` on replica `id`.
async fn open(c: &Cluster, id: u64, path: &str) -> KubeWatch {
    KubeWatch::open_path(c, id, path).await.unwrap()
}

/// Events (type, name, resourceVersion) until `want` of them have come, bookmarks aside;
/// fails after 20 s of silence.
async fn take(w: &mut KubeWatch, want: usize) -> Vec<(String, String, i64)> {
    let mut out = Vec::new();
    while out.len() < want {
        let e = w
            .next(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("watch ended or went silent after {out:?}"));
        let t = e["type"].as_str().unwrap().to_string();
        if t == "BOOKMARK" {
            continue;
        }
        out.push((
            t,
            e["object"]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string(),
            rv(&e["object"]),
        ));
    }
    out
}

fn rv(o: &Value) -> i64 {
    o["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Sends a request to replica `id`; returns status and parsed body.
async fn send(c: &Cluster, id: u64, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (ct, bytes) = match &body {
        Some(b) if method == "PATCH" => (
            "application/merge-patch+json",
            serde_json::to_vec(b).unwrap(),
        ),
        Some(b) => ("application/json", serde_json::to_vec(b).unwrap()),
        None => ("application/json", Vec::new()),
    };
    let resp = c
        .client_for(id)
        .send_raw(
            method.parse().unwrap(),
            &c.replica(id).api(),
            path,
            ct,
            bytes,
            None,
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&text).unwrap_or(Value::Null))
}

/// Lists and watches replica `id` served from the cache or the store (its metric).
async fn served(c: &Cluster, id: u64, verb: &str, from: &str) -> f64 {
    c.metric(
        id,
        &format!(
            "flotilla_api_watch_cache_requests_total{{served_from=\"{from}\",verb=\"{verb}\"}}"
        ),
    )
    .await
    .unwrap_or(0.0)
}

/// Creates `body` at `path` through replica `id`; the created object.
async fn create(c: &Cluster, id: u64, path: &str, body: Value) -> Value {
    let (s, o) = send(c, id, "POST", path, Some(body)).await;
    assert_eq!(s, 201, "{path}: {o}");
    o
}

fn pod(name: &str, node: Option<&str>, app: &str) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        // Another scheduler's pods: Flotilla's scheduler leaves them alone, so every change
        // to them is one this test makes.
        "spec": {"schedulerName": "elsewhere", "containers": [{"name": "c", "image": "busybox"}]},
    });
    if let Some(n) = node {
        p["spec"]["nodeName"] = json!(n);
    }
    p
}

/// (name, resourceVersion) of a list's items, in order.
fn items(list: &Value) -> Vec<(String, i64)> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["metadata"]["name"].as_str().unwrap().to_string(), rv(o)))
        .collect()
}

const BY_N1: &str = "fieldSelector=spec.nodeName%3Dn1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_lists_by_node_from_the_cache_are_exact_and_consistent() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let f = (1..=3).find(|&id| id != leader).unwrap();

    let (s, list) = send(&c, f, "GET", &format!("/api/v1/pods?{BY_N1}"), None).await;
    assert_eq!(s, 200, "{list}");
    let rv0 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    // Watches on the follower: by node (all namespaces), by node and label, everything in
    // `default`.
    let mut by_node = open(
        &c,
        f,
        &format!("/api/v1/pods?{BY_N1}&watch=1&resourceVersion={rv0}"),
    )
    .await;
    let mut by_label = open(
        &c,
        f,
        &format!("/api/v1/pods?{BY_N1}&labelSelector=app%3Da&watch=1&resourceVersion={rv0}"),
    )
    .await;
    let mut in_default = open(
        &c,
        f,
        &format!("/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv0}"),
    )
    .await;

    // Writes through the leader; after each one that concerns n1, a list by node on the
    // follower must already show it at (at least) the acknowledged version.
    let mut want_node: Vec<(&str, String)> = Vec::new();
    let mut want_label: Vec<(&str, String)> = Vec::new();
    let mut want_default = 0;
    let read_your_write = |name: String, at: i64| {
        let c = &c;
        async move {
            let (s, list) = send(c, f, "GET", &format!("/api/v1/pods?{BY_N1}"), None).await;
            assert_eq!(s, 200, "{list}");
            let found = items(&list).into_iter().find(|(n, _)| *n == name);
            assert!(
                found.as_ref().is_some_and(|(_, r)| *r >= at),
                "{name} at {at} not in a list by node right after its write: {found:?}"
            );
        }
    };
    for i in 0..10 {
        let name = format!("p{i}");
        let node = if i % 2 == 0 { "n1" } else { "n2" };
        let app = if i % 3 == 0 { "a" } else { "b" };
        let o = create(
            &c,
            leader,
            "/api/v1/namespaces/default/pods",
            pod(&name, Some(node), app),
        )
        .await;
        want_default += 1;
        if node == "n1" {
            read_your_write(name.clone(), rv(&o)).await;
            want_node.push(("ADDED", name.clone()));
            if app == "a" {
                want_label.push(("ADDED", name.clone()));
            }
        }
    }
    // Another namespace: seen by node, not in `default`.
    create(
        &c,
        leader,
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}),
    )
    .await;
    create(
        &c,
        leader,
        "/api/v1/namespaces/other/pods",
        pod("k", Some("n1"), "a"),
    )
    .await;
    want_node.push(("ADDED", "k".into()));
    want_label.push(("ADDED", "k".into()));
    // Unbound pods, then bound: a pod arriving on n1 is ADDED for its watchers.
    for (name, node) in [("q0", "n1"), ("q1", "n2")] {
        create(
            &c,
            leader,
            "/api/v1/namespaces/default/pods",
            pod(name, None, "a"),
        )
        .await;
        create(&c, leader, &format!("/api/v1/namespaces/default/pods/{name}/binding"), json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name}, "target": {"kind": "Node", "name": node}})).await;
        want_default += 2;
        if node == "n1" {
            let (_, p) = send(
                &c,
                leader,
                "GET",
                &format!("/api/v1/namespaces/default/pods/{name}"),
                None,
            )
            .await;
            read_your_write(name.into(), rv(&p)).await;
            want_node.push(("ADDED", name.into()));
            want_label.push(("ADDED", name.into()));
        }
    }
    // A label change: p0 (app=a) stops matching the label watch, p4 (app=b) starts.
    for (name, app) in [("p0", "b"), ("p4", "a")] {
        let (s, o) = send(
            &c,
            leader,
            "PATCH",
            &format!("/api/v1/namespaces/default/pods/{name}"),
            Some(json!({"metadata": {"labels": {"app": app}}})),
        )
        .await;
        assert_eq!(s, 200, "{o}");
        want_default += 1;
        read_your_write(name.into(), rv(&o)).await;
        want_node.push(("MODIFIED", name.into()));
        want_label.push((if app == "a" { "ADDED" } else { "DELETED" }, name.into()));
    }
    // Deletions (grace 0: the pods run nowhere).
    for name in ["p2", "p3"] {
        let (s, o) = send(
            &c,
            leader,
            "DELETE",
            &format!("/api/v1/namespaces/default/pods/{name}?gracePeriodSeconds=0"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{o}");
        want_default += 1;
        if name == "p2" {
            want_node.push(("DELETED", name.into()));
        }
    }

    let check = |got: Vec<(String, String, i64)>, want: &[(&str, String)], what: &str| {
        let kinds: Vec<(&str, &str)> = got
            .iter()
            .map(|(t, n, _)| (t.as_str(), n.as_str()))
            .collect();
        let want: Vec<(&str, &str)> = want.iter().map(|(t, n)| (*t, n.as_str())).collect();
        assert_eq!(kinds, want, "{what}: events");
        assert!(
            got.windows(2).all(|w| w[0].2 < w[1].2),
            "{what}: resourceVersions not increasing: {got:?}"
        );
    };
    check(
        take(&mut by_node, want_node.len()).await,
        &want_node,
        "watch by node",
    );
    check(
        take(&mut by_label, want_label.len()).await,
        &want_label,
        "watch by node and label",
    );
    let all = take(&mut in_default, want_default).await;
    assert!(all.iter().all(|(_, n, _)| n != "k"), "{all:?}");
    assert!(all.windows(2).all(|w| w[0].2 < w[1].2), "{all:?}");
    // Nothing more (a bookmark-free stream stays silent).
    assert!(by_node.next(Duration::from_millis(500)).await.is_none());

    // The cache's whole lists equal the store's (a page: always read from the store), on
    // every replica, for every selector used above.
    for id in 1..=3 {
        for q in [
            BY_N1,
            "fieldSelector=spec.nodeName%3Dn1&labelSelector=app%3Da",
            "labelSelector=app%3Da",
            "",
        ] {
            let (_, cached) = send(&c, id, "GET", &format!("/api/v1/pods?{q}"), None).await;
            let (_, paged) =
                send(&c, id, "GET", &format!("/api/v1/pods?{q}&limit=1000"), None).await;
            assert_eq!(items(&cached), items(&paged), "replica {id}, {q:?}");
            assert_eq!(
                cached["items"], paged["items"],
                "replica {id}, {q:?}: bytes differ"
            );
        }
    }
    // A watch without resourceVersion starts with the current objects (from the cache).
    let mut fresh = open(&c, f, &format!("/api/v1/pods?{BY_N1}&watch=1")).await;
    let initial = take(&mut fresh, 6).await;
    let mut names: Vec<&str> = initial
        .iter()
        .map(|(t, n, _)| {
            assert_eq!(t, "ADDED");
            n.as_str()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["k", "p0", "p4", "p6", "p8", "q0"]);

    assert!(
        served(&c, f, "watch", "cache").await >= 4.0,
        "watches not served from the cache"
    );
    assert!(
        served(&c, f, "list", "cache").await >= 5.0,
        "lists not served from the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_by_node_from_before_the_window_is_expired_one_without_selectors_is_replayed() {
    let c = Cluster::start(3, &["--watch-cache-size", "5"]).await;
    let leader = c.wait_leader().await;
    let f = (1..=3).find(|&id| id != leader).unwrap();
    // Load the follower's pod cache.
    let (s, list) = send(&c, f, "GET", "/api/v1/namespaces/default/pods", None).await;
    assert_eq!(s, 200, "{list}");
    let rv0 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut rvs = Vec::new();
    for i in 0..12 {
        let o = create(
            &c,
            leader,
            "/api/v1/namespaces/default/pods",
            pod(&format!("w{i}"), Some("n1"), "a"),
        )
        .await;
        rvs.push(rv(&o));
    }
    // A watch by node (a node agent's) from before the window (twelve changes ago, the
    // window holds five) is refused as kube-apiserver's watch cache refuses it: 410 Expired,
    // a Status naming the versions.
    // Wait until the follower's cache holds the last write, so the refusal is the window's.
    let newest = *rvs.last().unwrap();
    wait_for(
        Duration::from_secs(10),
        "the follower's cache to hold the last write",
        || async {
            let any = "/api/v1/namespaces/default/pods?resourceVersion=0";
            let (_, l) = send(&c, f, "GET", any, None).await;
            let at = l["metadata"]["resourceVersion"]
                .as_str()?
                .parse::<i64>()
                .ok()?;
            (at >= newest).then_some(())
        },
    )
    .await;
    let path = format!("/api/v1/namespaces/default/pods?{BY_N1}&watch=1&resourceVersion={rv0}");
    let (s, status) = send(&c, f, "GET", &path, None).await;
    assert_eq!(s, 410, "{status}");
    assert_eq!(status["kind"], "Status", "{status}");
    assert_eq!(status["reason"], "Expired", "{status}");
    assert_eq!(status["code"], 410, "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!("too old resource version: {rv0} ("))),
        "{status}"
    );
    // Without selectors, the same start is replayed from the store (the stored bytes go out
    // unparsed): exactly the twelve changes.
    let mut old = open(
        &c,
        f,
        &format!("/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv0}"),
    )
    .await;
    let got: Vec<String> = take(&mut old, 12)
        .await
        .into_iter()
        .map(|(_, n, _)| n)
        .collect();
    assert_eq!(got, (0..12).map(|i| format!("w{i}")).collect::<Vec<_>>());
    // The refused client relists (from the cache) and watches from the list: it has all
    // twelve, and sees the next change.
    let (s, list) = send(
        &c,
        f,
        "GET",
        &format!("/api/v1/namespaces/default/pods?{BY_N1}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{list}");
    let names: Vec<String> = items(&list).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 12, "{names:?}");
    let rv1 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut relisted = open(
        &c,
        f,
        &format!("/api/v1/namespaces/default/pods?{BY_N1}&watch=1&resourceVersion={rv1}"),
    )
    .await;
    create(
        &c,
        leader,
        "/api/v1/namespaces/default/pods",
        pod("after", Some("n1"), "a"),
    )
    .await;
    let got: Vec<String> = take(&mut relisted, 1)
        .await
        .into_iter()
        .map(|(_, n, _)| n)
        .collect();
    assert_eq!(got, ["after"]);
    // A watch starting inside the window is replayed from it.
    let mut recent = open(
        &c,
        f,
        &format!(
            "/api/v1/namespaces/default/pods?{BY_N1}&watch=1&resourceVersion={}",
            rvs[9]
        ),
    )
    .await;
    let got: Vec<String> = take(&mut recent, 3)
        .await
        .into_iter()
        .map(|(_, n, _)| n)
        .collect();
    assert_eq!(got, ["w10", "w11", "after"]);
    assert_eq!(served(&c, f, "watch", "store").await, 1.0);
    assert_eq!(served(&c, f, "watch", "cache").await, 2.0);

    // Without a cache, the same answers from the store.
    drop(c);
    let c = Cluster::start(3, &["--watch-cache-size", "0"]).await;
    let leader = c.wait_leader().await;
    let o = create(
        &c,
        leader,
        "/api/v1/namespaces/default/pods",
        pod("x", Some("n1"), "a"),
    )
    .await;
    let (s, list) = send(&c, leader, "GET", &format!("/api/v1/pods?{BY_N1}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(items(&list), [("x".to_string(), rv(&o))]);
    assert!(c
        .metric(leader, "flotilla_api_watch_cache_requests_total")
        .await
        .is_none());
}

/// `resourceVersion=N` on a list and a watch, as kube-apiserver's watch cache answers it.
/// A watch from a revision the replica's cache has not reached (a node agent resuming, on
/// a replica that is behind, from what another replica sent it) is registered at once and
/// served from the cache: exactly the changes after N, none at or before it. A list with N
/// is served not older than N, without a read barrier; one with N past every committed
/// revision waits for it, then is refused as 504 "Too large resource version" (cause
/// `ResourceVersionTooLarge`), from the cache (pods) as from the store (config maps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_a_revision_not_reached_are_served_after_it_or_refused_as_too_large() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let f = (1..=3).find(|&id| id != leader).unwrap();
    let (s, list) = send(&c, f, "GET", "/api/v1/namespaces/default/pods", None).await;
    assert_eq!(s, 200, "{list}");
    let now: i64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // A watch by node from a revision nothing has reached yet.
    let future = now + 8;
    let mut w = open(
        &c,
        f,
        &format!("/api/v1/namespaces/default/pods?{BY_N1}&watch=1&resourceVersion={future}"),
    )
    .await;
    let (cache0, store0) = (
        served(&c, f, "watch", "cache").await,
        served(&c, f, "watch", "store").await,
    );
    assert_eq!(
        (cache0, store0),
        (1.0, 0.0),
        "the watch is served from the cache"
    );
    // Pods on n1 until three of them are past it; the watch carries exactly those.
    let mut created = Vec::new();
    while created.iter().filter(|(_, r)| *r > future).count() < 3 {
        assert!(
            created.len() < 40,
            "revisions did not pass {future}: {created:?}"
        );
        let name = format!("f{}", created.len());
        let o = create(
            &c,
            leader,
            "/api/v1/namespaces/default/pods",
            pod(&name, Some("n1"), "a"),
        )
        .await;
        created.push((name, rv(&o)));
    }
    let want: Vec<(String, String, i64)> = created
        .iter()
        .filter(|(_, r)| *r > future)
        .map(|(n, r)| ("ADDED".to_string(), n.clone(), *r))
        .collect();
    assert_eq!(take(&mut w, want.len()).await, want);

    // A list not older than a revision the replica holds: served at once, with every pod
    // written up to it.
    let (last_name, last_rv) = created.last().unwrap().clone();
    let (s, l) = send(
        &c,
        leader,
        "GET",
        &format!("/api/v1/namespaces/default/pods?{BY_N1}&resourceVersion={last_rv}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{l}");
    assert!(rv(&l) >= last_rv, "{l}");
    assert!(items(&l).iter().any(|(n, _)| *n == last_name), "{l}");

    // Past every committed revision: refused as too large, from the cache and the store.
    let far = last_rv + 1_000_000;
    for path in [
        format!("/api/v1/namespaces/default/pods?{BY_N1}&resourceVersion={far}"),
        format!("/api/v1/namespaces/default/configmaps?resourceVersion={far}"),
    ] {
        let (s, st) = send(&c, f, "GET", &path, None).await;
        assert_eq!(s, 504, "{path}: {st}");
        assert_eq!(st["kind"], "Status", "{st}");
        assert_eq!(st["reason"], "Timeout", "{st}");
        assert_eq!(
            st["details"]["causes"][0]["reason"], "ResourceVersionTooLarge",
            "{st}"
        );
        assert_eq!(st["details"]["retryAfterSeconds"], 1, "{st}");
        assert!(
            st["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!(
                    "Timeout: Too large resource version: {far}, current: "
                ))),
            "{st}"
        );
    }
}
