//! Several operations in one Raft entry: one write batch, sequential semantics, one revision
//! per write, and refused operations that change nothing.

use flotilla_store::*;

fn cas(key: &str, mod_revision: i64, value: &str) -> ApplyOp {
    ApplyOp::Txn(TxnRequest {
        compare: vec![Compare {
            key: key.as_bytes().to_vec(),
            result: CompareResult::Equal,
            target: CompareTarget::ModRevision(mod_revision),
        }],
        success: vec![RequestOp::Put(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            prev_kv: false,
        })],
        failure: vec![],
    })
}

#[test]
fn operations_of_one_entry_apply_in_order_each_with_its_own_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = KvStore::open(dir.path(), StoreOptions::default()).unwrap();
    let ops = vec![
        ApplyOp::Txn(TxnRequest::put("a", "1")),
        // Sees the put above (mod revision 1) within the same entry.
        cas("a", 1, "2"),
        // A stale guard fails and spends no revision.
        cas("a", 1, "3"),
        // Refused outright; changes nothing.
        ApplyOp::Txn(TxnRequest::put("", "bad")),
        ApplyOp::Txn(TxnRequest::delete("a", "")),
        ApplyOp::Txn(TxnRequest::put("b", "x")),
        ApplyOp::Compact(2),
    ];
    let out = store
        .apply(vec![ApplyEntry {
            applied: b"entry-1".to_vec(),
            membership: None,
            op: ApplyOp::Batch(ops),
        }])
        .unwrap();
    let Applied::Batch(results) = &out[0] else {
        panic!("{out:?}")
    };
    let revs: Vec<Option<(bool, i64)>> = results
        .iter()
        .map(|r| match r {
            Applied::Txn(t) => Some((t.succeeded, t.revision)),
            _ => None,
        })
        .collect();
    assert_eq!(
        revs,
        vec![
            Some((true, 1)),
            Some((true, 2)),
            Some((false, 2)),
            None,
            Some((true, 3)),
            Some((true, 4)),
            None
        ]
    );
    assert!(matches!(
        results[3],
        Applied::Rejected(Error::InvalidRequest(_))
    ));
    assert!(matches!(results[6], Applied::Compact(2)));
    assert_eq!(store.revision(), 4);
    assert_eq!(store.compact_revision(), 2);
    assert_eq!(store.status().keys, 1);
    let b = store
        .range(&RangeRequest {
            key: b"b".to_vec(),
            ..RangeRequest::default()
        })
        .unwrap();
    assert_eq!(b.kvs[0].value, b"x");
    let a_at_2 = store
        .range(&RangeRequest {
            key: b"a".to_vec(),
            revision: 2,
            ..RangeRequest::default()
        })
        .unwrap();
    assert_eq!(a_at_2.kvs[0].value, b"2");
    assert_eq!(a_at_2.kvs[0].version, 2);
    assert_eq!(store.applied_state().unwrap().0, Some(b"entry-1".to_vec()));
    // The compaction above runs on the store's thread: stop it before the directory goes.
    store.close();
}

#[test]
fn a_guard_sees_the_previous_entry_s_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = KvStore::open(dir.path(), StoreOptions::default()).unwrap();
    let apply = |i: u64, op: ApplyOp| {
        store
            .apply(vec![ApplyEntry {
                applied: i.to_le_bytes().to_vec(),
                membership: None,
                op,
            }])
            .unwrap()
            .remove(0)
    };
    apply(1, ApplyOp::Txn(TxnRequest::put("lock", "free")));
    match apply(2, cas("lock", 1, "mine")) {
        Applied::Txn(t) => assert!(t.succeeded, "{t:?}"),
        other => panic!("{other:?}"),
    }
    match apply(3, cas("lock", 1, "yours")) {
        Applied::Txn(t) => assert!(!t.succeeded, "{t:?}"),
        other => panic!("{other:?}"),
    }
}
