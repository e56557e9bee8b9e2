//! Property tests: random operation sequences against `KvStore` and a `BTreeMap` model.
//!
//! The model keeps the full state at every revision, so ranges at old revisions, compaction
//! and watch replays can all be checked exactly.

use std::collections::BTreeMap;

use flotilla_store::*;
use proptest::prelude::*;

type State = BTreeMap<Vec<u8>, KeyValue>;

#[derive(Debug, Clone)]
enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>, Vec<u8>),
    /// Put `key` if `guard`'s mod revision equals the current one (or a wrong one).
    CasPut {
        guard: Vec<u8>,
        right: bool,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Range {
        key: Vec<u8>,
        end: Vec<u8>,
        back: i64,
        limit: i64,
    },
    Compact {
        back: i64,
    },
    Reopen,
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"a\0".to_vec()),
        Just(b"ab".to_vec()),
        Just(b"b".to_vec()),
        Just(b"c".to_vec()),
    ]
}

fn end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(vec![0]),
        Just(b"b".to_vec()),
        Just(b"c\0".to_vec())
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (key(), proptest::collection::vec(any::<u8>(), 0..4)).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (key(), end()).prop_map(|(k, e)| Op::Delete(k, e)),
        2 => (key(), any::<bool>(), key(), proptest::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(guard, right, key, value)| Op::CasPut { guard, right, key, value }),
        3 => (key(), end(), 0i64..6, 0i64..3).prop_map(|(key, end, back, limit)| Op::Range { key, end, back, limit }),
        1 => (0i64..4).prop_map(|back| Op::Compact { back }),
        1 => Just(Op::Reopen),
    ]
}

struct Model {
    /// `states[r]` is the state at revision `r`.
    states: Vec<State>,
    events: Vec<Event>,
    compact: i64,
}

impl Model {
    fn current(&self) -> &State {
        self.states.last().unwrap()
    }
    fn rev(&self) -> i64 {
        self.states.len() as i64 - 1
    }
    fn range(&self, key: &[u8], end: &[u8], rev: i64, limit: i64) -> (Vec<KeyValue>, i64, bool) {
        let all: Vec<KeyValue> = self.states[rev as usize]
            .values()
            .filter(|kv| in_range(&kv.key, key, end))
            .cloned()
            .collect();
        let count = all.len() as i64;
        let more = limit > 0 && all.len() as i64 > limit;
        let kvs = if limit > 0 {
            all.into_iter().take(limit as usize).collect()
        } else {
            all
        };
        (kvs, count, more)
    }
}

fn apply(store: &KvStore, index: &mut u64, txn: TxnRequest) -> TxnResponse {
    *index += 1;
    let out = store
        .apply(vec![ApplyEntry {
            applied: index.to_le_bytes().to_vec(),
            membership: None,
            op: ApplyOp::Txn(txn),
        }])
        .unwrap();
    match out.into_iter().next().unwrap() {
        Applied::Txn(r) => r,
        other => panic!("unexpected {other:?}"),
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let mut store = KvStore::open(dir.path(), StoreOptions::default()).unwrap();
    let mut model = Model {
        states: vec![State::new()],
        events: Vec::new(),
        compact: 0,
    };
    let mut index = 0u64;
    for op in ops {
        match op {
            Op::Put(k, v) => {
                let r = apply(&store, &mut index, TxnRequest::put(k.clone(), v.clone()));
                let mut next = model.current().clone();
                let prev = next.get(&k).cloned();
                let rev = model.rev() + 1;
                let kv = KeyValue {
                    key: k.clone(),
                    create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                    mod_revision: rev,
                    version: prev.as_ref().map_or(1, |p| p.version + 1),
                    value: v,
                };
                next.insert(k, kv.clone());
                model.events.push(Event {
                    kind: EventKind::Put,
                    kv,
                    prev_kv: prev,
                });
                model.states.push(next);
                prop_assert_eq!(r.revision, model.rev());
            }
            Op::Delete(k, e) => {
                let r = apply(&store, &mut index, TxnRequest::delete(k.clone(), e.clone()));
                let doomed: Vec<KeyValue> = model
                    .current()
                    .values()
                    .filter(|kv| in_range(&kv.key, &k, &e))
                    .cloned()
                    .collect();
                let deleted = match &r.responses[0] {
                    ResponseOp::DeleteRange(d) => d.deleted,
                    other => panic!("{other:?}"),
                };
                prop_assert_eq!(deleted, doomed.len() as i64);
                if !doomed.is_empty() {
                    let rev = model.rev() + 1;
                    let mut next = model.current().clone();
                    for kv in doomed {
                        next.remove(&kv.key);
                        model.events.push(Event {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key: kv.key.clone(),
                                mod_revision: rev,
                                ..KeyValue::default()
                            },
                            prev_kv: Some(kv),
                        });
                    }
                    model.states.push(next);
                }
                prop_assert_eq!(r.revision, model.rev());
            }
            Op::CasPut {
                guard,
                right,
                key,
                value,
            } => {
                let cur = model.current().get(&guard).map_or(0, |kv| kv.mod_revision);
                let want = if right { cur } else { cur + 1 };
                let txn = TxnRequest {
                    compare: vec![Compare {
                        key: guard.clone(),
                        result: CompareResult::Equal,
                        target: CompareTarget::ModRevision(want),
                    }],
                    success: vec![RequestOp::Put(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        prev_kv: true,
                    })],
                    failure: vec![RequestOp::Range(RangeRequest {
                        key: guard.clone(),
                        ..RangeRequest::default()
                    })],
                };
                let r = apply(&store, &mut index, txn);
                prop_assert_eq!(r.succeeded, right);
                if right {
                    let mut next = model.current().clone();
                    let prev = next.get(&key).cloned();
                    let rev = model.rev() + 1;
                    let kv = KeyValue {
                        key: key.clone(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        value,
                    };
                    match &r.responses[0] {
                        ResponseOp::Put(p) => prop_assert_eq!(&p.prev_kv, &prev),
                        other => panic!("{other:?}"),
                    }
                    next.insert(key, kv.clone());
                    model.events.push(Event {
                        kind: EventKind::Put,
                        kv,
                        prev_kv: prev,
                    });
                    model.states.push(next);
                } else {
                    match &r.responses[0] {
                        ResponseOp::Range(rr) => {
                            let want: Vec<KeyValue> =
                                model.current().get(&guard).cloned().into_iter().collect();
                            prop_assert_eq!(&rr.kvs, &want);
                        }
                        other => panic!("{other:?}"),
                    }
                }
                prop_assert_eq!(r.revision, model.rev());
            }
            Op::Range {
                key,
                end,
                back,
                limit,
            } => {
                let rev = (model.rev() - back).max(0);
                let got = store.range(&RangeRequest {
                    key: key.clone(),
                    range_end: end.clone(),
                    limit,
                    revision: if back == 0 { 0 } else { rev },
                    ..RangeRequest::default()
                });
                // Revision 0 means "current".
                let effective = if back == 0 || rev == 0 {
                    model.rev()
                } else {
                    rev
                };
                if effective < model.compact {
                    prop_assert!(matches!(got, Err(Error::Compacted { .. })), "{got:?}");
                } else {
                    let got = got.unwrap();
                    let (kvs, count, more) = model.range(&key, &end, effective, limit);
                    prop_assert_eq!(got.kvs, kvs);
                    prop_assert_eq!(got.count, count);
                    prop_assert_eq!(got.more, more);
                    prop_assert_eq!(got.revision, effective);
                }
            }
            Op::Compact { back } => {
                let rev = model.rev() - back;
                index += 1;
                let out = store
                    .apply(vec![ApplyEntry {
                        applied: index.to_le_bytes().to_vec(),
                        membership: None,
                        op: ApplyOp::Compact(rev),
                    }])
                    .unwrap();
                match &out[0] {
                    Applied::Compact(r) => {
                        prop_assert!(rev > model.compact && rev <= model.rev());
                        prop_assert_eq!(*r, rev);
                        model.compact = rev;
                        store.wait_compacted().unwrap();
                    }
                    Applied::Rejected(_) => prop_assert!(rev <= model.compact || rev > model.rev()),
                    other => panic!("{other:?}"),
                }
            }
            Op::Reopen => {
                store.close();
                drop(store);
                store = KvStore::open(dir.path(), StoreOptions::default()).unwrap();
                prop_assert_eq!(store.revision(), model.rev());
                let (applied, _) = store.applied_state().unwrap();
                prop_assert_eq!(
                    applied.unwrap_or_default(),
                    if index == 0 {
                        vec![]
                    } else {
                        index.to_le_bytes().to_vec()
                    }
                );
            }
        }
    }
    // Every range at the current revision matches.
    let all = store
        .range(&RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..RangeRequest::default()
        })
        .unwrap();
    prop_assert_eq!(
        all.kvs,
        model.current().values().cloned().collect::<Vec<_>>()
    );
    prop_assert_eq!(store.status().keys, model.current().len() as i64);

    // A watch from the compaction point replays exactly the retained history.
    let start = model.compact.max(1);
    let want: Vec<Event> = model
        .events
        .iter()
        .filter(|e| e.kv.mod_revision >= start)
        .cloned()
        .collect();
    let got = rt.block_on(async {
        let mut w = store
            .watch(WatchRequest {
                key: vec![0],
                range_end: vec![0],
                start_revision: start,
                prev_kv: true,
            })
            .unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            match tokio::time::timeout(std::time::Duration::from_secs(5), w.recv()).await {
                Ok(Ok(WatchMessage::Events(evs))) => got.extend(evs),
                Ok(Ok(WatchMessage::Progress(_))) => {}
                other => panic!("watch ended early: {other:?}"),
            }
        }
        got
    });
    // Compaction removes versions older than the compaction point, so a replayed event at
    // the compaction point may have lost its previous version.
    let strip = |e: &Event| {
        if e.kv.mod_revision <= model.compact {
            Event {
                prev_kv: None,
                ..e.clone()
            }
        } else {
            e.clone()
        }
    };
    prop_assert_eq!(
        got.iter().map(strip).collect::<Vec<_>>(),
        want.iter().map(strip).collect::<Vec<_>>()
    );
    store.close();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_a_btreemap_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
