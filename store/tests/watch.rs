//! Watch behaviour: replay then live without gaps or duplicates, slow watchers, compaction,
//! and watchers surviving a snapshot install.

use std::time::Duration;

use flotilla_store::*;

/// Fields drop in order: the store closes (and its background thread stops writing) before
/// its directory is removed, or the directory outlives the test.
struct Fixture {
    store: KvStore,
    index: u64,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(options: StoreOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(dir.path(), options).unwrap();
        Fixture {
            _dir: dir,
            store,
            index: 0,
        }
    }

    fn put(&mut self, key: &str, value: &str) -> i64 {
        self.index += 1;
        match self
            .store
            .apply(vec![ApplyEntry {
                applied: self.index.to_le_bytes().to_vec(),
                membership: None,
                op: ApplyOp::Txn(TxnRequest::put(key, value)),
            }])
            .unwrap()
            .remove(0)
        {
            Applied::Txn(r) => r.revision,
            other => panic!("{other:?}"),
        }
    }

    fn compact(&mut self, rev: i64) {
        self.index += 1;
        let out = self
            .store
            .apply(vec![ApplyEntry {
                applied: self.index.to_le_bytes().to_vec(),
                membership: None,
                op: ApplyOp::Compact(rev),
            }])
            .unwrap();
        assert!(matches!(out[0], Applied::Compact(_)), "{:?}", out[0]);
    }
}

fn all_keys(start: i64) -> WatchRequest {
    WatchRequest {
        key: vec![0],
        range_end: vec![0],
        start_revision: start,
        prev_kv: false,
    }
}

async fn next_events(w: &mut Watcher) -> Vec<Event> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), w.recv()).await {
            Ok(Ok(WatchMessage::Events(e))) => return e,
            Ok(Ok(WatchMessage::Progress(_))) => continue,
            other => panic!("expected events, got {other:?}"),
        }
    }
}

async fn collect_revisions(w: &mut Watcher, until: i64) -> Vec<i64> {
    let mut revs = Vec::new();
    while revs.last().copied().unwrap_or(0) < until {
        revs.extend(next_events(w).await.iter().map(|e| e.kv.mod_revision));
    }
    revs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_an_old_revision_replays_history_then_streams_live_events_without_gaps() {
    let mut f = Fixture::new(StoreOptions {
        watch_batch_events: 7,
        ..StoreOptions::default()
    });
    for i in 0..100 {
        f.put(&format!("k{}", i % 10), &i.to_string());
    }
    let mut w = f.store.watch(all_keys(5)).unwrap();
    // Writes race with the replay.
    let store = f.store.clone();
    let writer = std::thread::spawn(move || {
        let mut fx = Fixture {
            _dir: tempfile::tempdir().unwrap(),
            store,
            index: 1000,
        };
        for i in 100..300 {
            fx.put(&format!("k{}", i % 10), &i.to_string());
        }
    });
    let revs = collect_revisions(&mut w, 300).await;
    writer.join().unwrap();
    assert_eq!(
        revs,
        (5..=300).collect::<Vec<_>>(),
        "every revision exactly once, in order"
    );
}

#[tokio::test]
async fn a_watch_filters_by_range_and_reports_prev_kv() {
    let mut f = Fixture::new(StoreOptions::default());
    f.put("a", "1");
    let mut w = f
        .store
        .watch(WatchRequest {
            key: b"a".to_vec(),
            range_end: vec![],
            start_revision: 0,
            prev_kv: true,
        })
        .unwrap();
    f.put("b", "x");
    f.put("a", "2");
    let events = next_events(&mut w).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kv.value, b"2");
    assert_eq!(events[0].kv.version, 2);
    assert_eq!(events[0].prev_kv.as_ref().unwrap().value, b"1");
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_cancelled_as_slow_and_can_resume() {
    let mut f = Fixture::new(StoreOptions {
        watch_buffer: 4,
        ..StoreOptions::default()
    });
    let mut w = f.store.watch(all_keys(0)).unwrap();
    for i in 0..50 {
        f.put("k", &i.to_string());
    }
    // The writer never blocked; the watcher gets what was buffered, then the reason.
    let mut delivered = Vec::new();
    let resume = loop {
        match w.recv().await {
            Ok(WatchMessage::Events(e)) => delivered.extend(e.iter().map(|e| e.kv.mod_revision)),
            Ok(WatchMessage::Progress(_)) => {}
            Err(CancelReason::Slow { resume_revision }) => break resume_revision,
            Err(other) => panic!("unexpected cancel {other:?}"),
        }
    };
    assert_eq!(delivered, (1..resume).collect::<Vec<_>>());
    let mut again = f.store.watch(all_keys(resume)).unwrap();
    let revs = collect_revisions(&mut again, 50).await;
    assert_eq!(revs, (resume..=50).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_watch_below_the_compaction_point_fails_with_compacted() {
    let mut f = Fixture::new(StoreOptions::default());
    for i in 0..10 {
        f.put("k", &i.to_string());
    }
    f.compact(6);
    match f.store.watch(all_keys(3)) {
        Err(Error::Compacted {
            requested: 3,
            compact_revision: 6,
        }) => {}
        other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
    }
    let mut w = f.store.watch(all_keys(6)).unwrap();
    assert_eq!(collect_revisions(&mut w, 10).await, vec![6, 7, 8, 9, 10]);
}

#[tokio::test]
async fn a_lagging_watcher_is_cancelled_when_history_it_needs_is_compacted() {
    // One event per message and room for one message: the replay can run at most a few
    // revisions ahead of what this test has read, so it is still far below 15 when the
    // compaction lands (with the default buffer it could finish the replay first, and then
    // nothing it still needed was compacted).
    let mut f = Fixture::new(StoreOptions {
        watch_batch_events: 1,
        watch_buffer: 1,
        ..StoreOptions::default()
    });
    for i in 0..20 {
        f.put("k", &i.to_string());
    }
    let mut w = f.store.watch(all_keys(1)).unwrap();
    // Read a little, then compact past the watcher's position.
    let first = next_events(&mut w).await;
    assert_eq!(first[0].kv.mod_revision, 1);
    f.compact(15);
    let mut last = 1;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), w.recv())
            .await
            .unwrap()
        {
            Ok(WatchMessage::Events(e)) => {
                for ev in e {
                    assert_eq!(ev.kv.mod_revision, last + 1, "no gap before the cancel");
                    last = ev.kv.mod_revision;
                }
            }
            Ok(WatchMessage::Progress(_)) => {}
            Err(CancelReason::Compacted {
                compact_revision, ..
            }) => {
                assert_eq!(compact_revision, 15);
                break;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn watchers_continue_on_the_new_state_after_a_snapshot_install() {
    let mut leader = Fixture::new(StoreOptions::default());
    let mut follower = Fixture::new(StoreOptions::default());
    for i in 0..5 {
        leader.put("k", &i.to_string());
        follower.put("k", &i.to_string());
    }
    let mut w = follower.store.watch(all_keys(0)).unwrap();
    for i in 5..12 {
        leader.put("k", &i.to_string());
    }
    let mut buf = Vec::new();
    leader.store.export(&mut buf).unwrap();
    follower.store.install(&mut buf.as_slice()).unwrap();
    assert_eq!(follower.store.revision(), 12);
    assert_eq!(
        collect_revisions(&mut w, 12).await,
        (6..=12).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_progress_request_reports_the_current_revision_once_synced() {
    let mut f = Fixture::new(StoreOptions::default());
    f.put("a", "1");
    f.put("a", "2");
    let mut w = f.store.watch(all_keys(0)).unwrap();
    assert!(w.request_progress());
    match tokio::time::timeout(Duration::from_secs(30), w.recv())
        .await
        .unwrap()
    {
        Ok(WatchMessage::Progress(rev)) => assert_eq!(rev, 2),
        other => panic!("{other:?}"),
    }
}
