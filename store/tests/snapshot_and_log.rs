//! Snapshot export/import and the Raft log store.

use std::sync::mpsc;
use std::time::Duration;

use flotilla_store::*;

fn put(store: &KvStore, index: u64, key: &str, value: &str) {
    store
        .apply(vec![ApplyEntry {
            applied: index.to_le_bytes().to_vec(),
            membership: Some(b"members".to_vec()),
            op: ApplyOp::Txn(TxnRequest::put(key, value)),
        }])
        .unwrap();
}

fn everything(store: &KvStore) -> Vec<KeyValue> {
    store
        .range(&RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..RangeRequest::default()
        })
        .unwrap()
        .kvs
}

#[test]
fn an_imported_snapshot_reproduces_data_history_and_applied_state() {
    let a_dir = tempfile::tempdir().unwrap();
    let a = KvStore::open(a_dir.path(), StoreOptions::default()).unwrap();
    for i in 1..=200u64 {
        put(&a, i, &format!("key{:03}", i % 37), &format!("v{i}"));
    }
    let mut buf = Vec::new();
    let info = a.export(&mut buf).unwrap();
    assert_eq!(info.revision, 200);
    assert_eq!(info.applied, Some(200u64.to_le_bytes().to_vec()));

    let b_dir = tempfile::tempdir().unwrap();
    let b = KvStore::open(b_dir.path(), StoreOptions::default()).unwrap();
    put(&b, 1, "stale", "gone after install");
    let got = b.install(&mut buf.as_slice()).unwrap();
    assert_eq!(got, info);
    assert_eq!(everything(&b), everything(&a));
    assert_eq!(b.applied_state().unwrap(), a.applied_state().unwrap());
    // History came along: a read at an old revision matches.
    let old = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        revision: 50,
        ..RangeRequest::default()
    };
    assert_eq!(b.range(&old).unwrap(), a.range(&old).unwrap());
    // And it survives a reopen (the new generation is current on disk).
    b.close();
    drop(b);
    let b = KvStore::open(b_dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(everything(&b), everything(&a));
    assert_eq!(b.revision(), 200);
}

#[test]
fn a_damaged_snapshot_is_refused_and_the_old_state_stays() {
    let a_dir = tempfile::tempdir().unwrap();
    let a = KvStore::open(a_dir.path(), StoreOptions::default()).unwrap();
    for i in 1..=20u64 {
        put(&a, i, &format!("k{i}"), "v");
    }
    let mut buf = Vec::new();
    a.export(&mut buf).unwrap();

    let b_dir = tempfile::tempdir().unwrap();
    let b = KvStore::open(b_dir.path(), StoreOptions::default()).unwrap();
    put(&b, 1, "mine", "kept");
    let truncated = &buf[..buf.len() / 2];
    assert!(matches!(
        b.install(&mut &truncated[..]),
        Err(Error::Corrupt(_))
    ));
    let mut flipped = buf.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    assert!(b.install(&mut flipped.as_slice()).is_err());
    assert_eq!(everything(&b).len(), 1);
    assert_eq!(everything(&b)[0].key, b"mine");
}

#[test]
fn the_log_reports_appends_durable_and_supports_truncate_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogStore::open(dir.path()).unwrap();
    let (tx, rx) = mpsc::channel();
    for batch in 0..10u64 {
        let entries = (batch * 10 + 1..=batch * 10 + 10)
            .map(|i| (i, format!("e{i}").into_bytes()))
            .collect();
        let tx = tx.clone();
        log.append(
            entries,
            Box::new(move |r| tx.send((batch, r.is_ok())).unwrap()),
        )
        .unwrap();
    }
    let mut acked: Vec<u64> = (0..10)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
        .map(|(b, ok)| {
            assert!(ok);
            b
        })
        .collect();
    acked.sort();
    assert_eq!(acked, (0..10).collect::<Vec<_>>());
    assert_eq!(log.range(1, 101, usize::MAX).unwrap().len(), 100);
    assert_eq!(
        log.range(1, 101, 10).unwrap().len(),
        5,
        "five 2-byte entries fit in 10 bytes"
    );
    log.truncate(51).unwrap();
    assert_eq!(log.last().unwrap().unwrap().0, 50);
    log.purge(20, b"purged", b"20").unwrap();
    // A read from before the purge point starts at the first entry still present.
    let rest = log.range(0, 100, usize::MAX).unwrap();
    assert_eq!(rest.first().unwrap().0, 21);
    assert_eq!(rest.len(), 30);
    assert_eq!(log.get_meta(b"purged").unwrap(), Some(b"20".to_vec()));
    log.put_meta(b"vote", b"v1", true).unwrap();
    drop(log);
    let log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.get_meta(b"vote").unwrap(), Some(b"v1".to_vec()));
    assert_eq!(log.last().unwrap().unwrap().0, 50);
}

#[test]
fn oversized_and_malformed_transactions_are_refused_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let store = KvStore::open(dir.path(), StoreOptions::default()).unwrap();
    put(&store, 1, "a", "1");
    let big = TxnRequest::put("big", vec![0u8; 1536 * 1024 + 1]);
    let dup = TxnRequest {
        success: vec![
            RequestOp::Put(PutRequest {
                key: b"x".to_vec(),
                value: vec![],
                prev_kv: false,
            }),
            RequestOp::Put(PutRequest {
                key: b"x".to_vec(),
                value: vec![],
                prev_kv: false,
            }),
        ],
        ..TxnRequest::default()
    };
    let empty_key = TxnRequest::put("", "v");
    for (i, bad) in [big, dup, empty_key].into_iter().enumerate() {
        let out = store
            .apply(vec![ApplyEntry {
                applied: (i as u64 + 2).to_le_bytes().to_vec(),
                membership: None,
                op: ApplyOp::Txn(bad),
            }])
            .unwrap();
        assert!(
            matches!(&out[0], Applied::Rejected(Error::InvalidRequest(_))),
            "{:?}",
            out[0]
        );
    }
    assert_eq!(store.revision(), 1);
    assert_eq!(everything(&store).len(), 1);
    // The refused entries still advanced the applied position.
    assert_eq!(
        store.applied_state().unwrap().0,
        Some(4u64.to_le_bytes().to_vec())
    );
    // Reads at a future revision are refused.
    let future = RangeRequest {
        key: b"a".to_vec(),
        revision: 99,
        ..RangeRequest::default()
    };
    assert!(matches!(
        store.range(&future),
        Err(Error::FutureRevision {
            requested: 99,
            current: 1
        })
    ));
}

#[test]
fn the_quota_refuses_puts_but_not_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let store = KvStore::open(
        dir.path(),
        StoreOptions {
            quota_bytes: 64 * 1024,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    for i in 0..40u64 {
        put(&store, i + 1, &format!("k{i}"), &"x".repeat(4096));
    }
    let err = store
        .check_quota(&TxnRequest::put("more", "x"))
        .unwrap_err();
    assert!(matches!(err, Error::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("quota"));
    store.check_quota(&TxnRequest::delete("k1", "")).unwrap();
}

/// The child of `an_installed_snapshot_survives_a_kill_right_after_the_install`: installs a
/// snapshot, applies ten more entries, says so, and waits to be killed.
#[test]
#[ignore = "run by an_installed_snapshot_survives_a_kill_right_after_the_install as a child process"]
fn install_then_wait_child() {
    let (Ok(dir), Ok(source)) = (
        std::env::var("FLOTILLA_INSTALL_DIR"),
        std::env::var("FLOTILLA_SOURCE_DIR"),
    ) else {
        return;
    };
    // Both directories are the parent's: this process is killed, so it removes nothing.
    let a = KvStore::open(std::path::Path::new(&source), StoreOptions::default()).unwrap();
    for i in 1..=200u64 {
        put(&a, i, &format!("key{:03}", i % 37), &format!("v{i}"));
    }
    let mut buf = Vec::new();
    a.export(&mut buf).unwrap();
    let b = KvStore::open(std::path::Path::new(&dir), StoreOptions::default()).unwrap();
    b.install(&mut buf.as_slice()).unwrap();
    for i in 201..=210u64 {
        put(&b, i, "after", &format!("v{i}"));
    }
    println!("ready");
    std::thread::sleep(Duration::from_secs(60));
}

/// Found by the chaos suite: the import writes without the write-ahead log and the install
/// flushed only the default column family, so a process killed soon after an install came
/// back with the snapshot's rows gone but later (logged) entries kept: a diverged replica.
#[test]
fn an_installed_snapshot_survives_a_kill_right_after_the_install() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "install_then_wait_child",
            "--nocapture",
        ])
        .env("FLOTILLA_INSTALL_DIR", dir.path())
        .env("FLOTILLA_SOURCE_DIR", source.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let ready = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("ready"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready, "the child installed the snapshot");
    let b = KvStore::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(
        b.applied_state().unwrap().0,
        Some(210u64.to_le_bytes().to_vec())
    );
    let all = everything(&b);
    // The snapshot's 37 keys and the one written after it, at revision 210.
    assert_eq!(all.len(), 38, "{all:?}");
    assert_eq!(b.revision(), 210);
    // And the snapshot's history: a read at revision 50 sees what was there then.
    let old = b
        .range(&RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision: 50,
            ..RangeRequest::default()
        })
        .unwrap();
    assert_eq!(old.kvs.len(), 37);
}
