//! openraft's storage conformance suite, run against our RocksDB log store and state machine.

use std::sync::Arc;

use flotilla_raft::log_store::RaftLog;
use flotilla_raft::{NoObserver, StateMachine, TypeConfig};
use flotilla_store::{KvStore, LogStore, StoreOptions};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct Builder;

impl StoreBuilder<TypeConfig, RaftLog, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, RaftLog, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = KvStore::open(dir.path().join("sm"), StoreOptions::default()).expect("open kv");
        let log = LogStore::open(dir.path().join("raft")).expect("open log");
        let sm = StateMachine::open(
            kv.clone(),
            dir.path().join("snapshots"),
            Arc::new(NoObserver),
        )
        .expect("snapshot dir");
        Ok((dir, RaftLog::new(log, kv), sm))
    }
}

#[test]
fn the_rocksdb_stores_pass_openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("storage suite failed: {e}");
    }
}
