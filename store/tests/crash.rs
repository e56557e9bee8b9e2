//! Crash test: a child process appends to the log and applies to the state machine while the
//! parent kills it with SIGKILL at random moments; after each kill the parent reopens the
//! stores and checks every acknowledged append, the atomicity of apply (applied position and
//! data agree) and the revision invariants against a model. Then the next child resumes the
//! way Raft would: re-applying logged entries beyond the applied position.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flotilla_store::*;
use rand::Rng;

const KEYS: u64 = 50;
const COMPACT_EVERY: u64 = 25;

/// What entry `i` does.
fn op_for(i: u64, current_rev: i64, compact_rev: i64) -> ApplyOp {
    if i % COMPACT_EVERY == 0 {
        let target = current_rev - 10;
        if target > compact_rev {
            return ApplyOp::Compact(target);
        }
        return ApplyOp::None;
    }
    if i % 7 == 3 {
        // Several writes in one entry: all land or none.
        return ApplyOp::Batch(
            (0..3u64)
                .map(|j| {
                    ApplyOp::Txn(TxnRequest::put(
                        format!("k{:02}", (i + j) % KEYS),
                        format!("{i}.{j}"),
                    ))
                })
                .collect(),
        );
    }
    ApplyOp::Txn(TxnRequest::put(format!("k{:02}", i % KEYS), i.to_string()))
}

fn applied_index(kv: &KvStore) -> u64 {
    kv.applied_state()
        .unwrap()
        .0
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
}

/// The child: resume, then append and apply forever, printing what is acknowledged.
fn child(dir: &Path) {
    let log = LogStore::open(dir.join("raft")).unwrap();
    let kv = KvStore::open(dir.join("sm"), StoreOptions::default()).unwrap();
    let mut out = std::io::stdout().lock();
    let apply = |i: u64| {
        let op = op_for(i, kv.revision(), kv.compact_revision());
        kv.apply(vec![ApplyEntry {
            applied: i.to_le_bytes().to_vec(),
            membership: None,
            op,
        }])
        .unwrap();
    };
    let last = log.last().unwrap().map_or(0, |(i, _)| i);
    for i in applied_index(&kv) + 1..=last {
        apply(i);
    }
    let mut i = last;
    loop {
        // A few entries per append, as Raft batches them.
        let batch: Vec<(u64, Vec<u8>)> = (i + 1..=i + 3)
            .map(|n| (n, n.to_le_bytes().to_vec()))
            .collect();
        let (tx, rx) = mpsc::channel();
        log.append(batch, Box::new(move |r| tx.send(r.is_ok()).unwrap()))
            .unwrap();
        assert!(rx.recv().unwrap());
        writeln!(out, "logged {}", i + 3).unwrap();
        for n in i + 1..=i + 3 {
            apply(n);
            writeln!(out, "applied {n}").unwrap();
        }
        out.flush().unwrap();
        i += 3;
    }
}

#[test]
#[ignore = "run by crash_recovery_keeps_every_acknowledged_write as a child process"]
fn crash_child() {
    if let Ok(dir) = std::env::var("FLOTILLA_CRASH_DIR") {
        child(Path::new(&dir));
    }
}

/// Replays entries 1..=applied on a model and returns (revision, compact revision, state).
fn model(applied: u64) -> (i64, i64, BTreeMap<Vec<u8>, KeyValue>) {
    let mut rev = 0i64;
    let mut compact = 0i64;
    let mut state: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
    for i in 1..=applied {
        let ops = match op_for(i, rev, compact) {
            ApplyOp::Batch(ops) => ops,
            op => vec![op],
        };
        for op in ops {
            match op {
                ApplyOp::Compact(t) => compact = t,
                ApplyOp::Txn(txn) => {
                    let RequestOp::Put(p) = &txn.success[0] else {
                        unreachable!()
                    };
                    rev += 1;
                    let prev = state.get(&p.key).cloned();
                    state.insert(
                        p.key.clone(),
                        KeyValue {
                            key: p.key.clone(),
                            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                            mod_revision: rev,
                            version: prev.as_ref().map_or(1, |p| p.version + 1),
                            value: p.value.clone(),
                        },
                    );
                }
                _ => {}
            }
        }
    }
    (rev, compact, state)
}

#[test]
fn crash_recovery_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut max_logged = 0u64;
    let mut max_applied = 0u64;
    for round in 0..8 {
        let mut child = Command::new(&exe)
            .args([
                "crash_child",
                "--exact",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FLOTILLA_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.split_whitespace();
                if let (Some(kind), Some(n)) = (
                    parts.next(),
                    parts.next().and_then(|n| n.parse::<u64>().ok()),
                ) {
                    let _ = tx.send((kind == "logged", n));
                }
            }
        });
        // Let it make progress past where it started, then kill it at a random moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        let start = max_logged;
        while max_logged < start + 30 {
            let (logged, n) = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("round {round}: child made no progress"));
            if logged {
                max_logged = max_logged.max(n)
            } else {
                max_applied = max_applied.max(n)
            }
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for (logged, n) in rx.try_iter() {
            if logged {
                max_logged = max_logged.max(n)
            } else {
                max_applied = max_applied.max(n)
            }
        }

        let log = LogStore::open(dir.path().join("raft")).unwrap();
        let kv = KvStore::open(dir.path().join("sm"), StoreOptions::default()).unwrap();
        let last = log.last().unwrap().map_or(0, |(i, _)| i);
        assert!(
            last >= max_logged,
            "round {round}: acknowledged append {max_logged} lost (log ends at {last})"
        );
        let entries = log.range(1, last + 1, usize::MAX).unwrap();
        assert_eq!(
            entries.len() as u64,
            last,
            "round {round}: the log has a gap"
        );
        for (i, bytes) in &entries {
            assert_eq!(
                bytes,
                &i.to_le_bytes().to_vec(),
                "round {round}: entry {i} is damaged"
            );
        }
        let applied = applied_index(&kv);
        assert!(
            applied >= max_applied,
            "round {round}: applied {max_applied} reported, {applied} found"
        );
        assert!(applied <= last, "round {round}: applied beyond the log");
        let (rev, compact, state) = model(applied);
        assert_eq!(
            kv.revision(),
            rev,
            "round {round}: revision and applied position disagree"
        );
        assert_eq!(kv.compact_revision(), compact, "round {round}");
        let all = kv
            .range(&RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..RangeRequest::default()
            })
            .unwrap();
        assert_eq!(
            all.kvs,
            state.into_values().collect::<Vec<_>>(),
            "round {round}: data disagrees with the applied position"
        );
        if compact > 0 {
            // History from the compaction point on is readable and consistent.
            let old = kv
                .range(&RangeRequest {
                    key: vec![0],
                    range_end: vec![0],
                    revision: compact,
                    ..RangeRequest::default()
                })
                .unwrap();
            assert!(old.kvs.iter().all(|kv| kv.mod_revision <= compact));
        }
        kv.close();
    }
    assert!(
        max_applied > 100,
        "the test exercised too little: {max_applied} entries"
    );
}
