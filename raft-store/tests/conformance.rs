//! raft-store passes openraft's storage conformance suite: log and state
//! machine, redb-backed, each test on a fresh temporary directory.

use openraft::testing::{StoreBuilder, Suite};
use raft_store::{types::StorageError, LogStore, StateMachineStore, TypeConfig};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (log, sm) = raft_store::open(dir.path()).await?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_conformance() {
    Suite::test_all(Builder).expect("openraft storage conformance suite");
}
