//! Dropping the last handle of a store stops its compactor and closes it on the dropping
//! thread, even while the compactor is working: no compactor thread is left, the directory
//! can be reopened at once, and a program that exits right after dropping its store never
//! leaves RocksDB closing on another thread.

use flotilla_store::*;

#[test]
fn dropping_the_last_handle_closes_the_store_at_once_even_while_it_compacts() {
    let dir = tempfile::tempdir().unwrap();
    // Small compaction batches: a long physical compaction, in many steps.
    let options = || StoreOptions {
        compaction_batch: 10,
        ..StoreOptions::default()
    };
    let store = KvStore::open(dir.path(), options()).unwrap();
    let entries: Vec<ApplyEntry> = (0..200)
        .map(|i| ApplyEntry {
            applied: format!("entry-{i}").into_bytes(),
            membership: None,
            op: ApplyOp::Batch(
                (0..100)
                    .map(|j| ApplyOp::Txn(TxnRequest::put("k", format!("{i}-{j}").as_str())))
                    .collect(),
            ),
        })
        .collect();
    store.apply(entries).unwrap();
    // 20,000 revisions of one key compacted away: the compactor starts on them.
    store
        .apply(vec![ApplyEntry {
            applied: b"compact".to_vec(),
            membership: None,
            op: ApplyOp::Compact(store.revision()),
        }])
        .unwrap();
    assert_eq!(compactor_threads(), 1, "the open store's compactor");
    drop(store);
    assert_eq!(
        compactor_threads(),
        0,
        "the compactor thread outlived the last handle"
    );
    let reopened = KvStore::open(dir.path(), options());
    assert!(
        reopened.is_ok(),
        "the store was still open after its last handle was dropped: {:?}",
        reopened.err()
    );
}

/// Threads of this process named `kv-compactor` (nextest runs each test in a process of its
/// own).
fn compactor_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "kv-compactor")
        .count()
}
