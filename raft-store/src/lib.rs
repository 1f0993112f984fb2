//! Holdfast's Raft storage: the openraft log store and the config state
//! machine, both persisted in redb (in separate database files, so that log
//! appends never wait behind state-machine writes), with every redb call run
//! on tokio's blocking pool.

pub mod cidr;
pub mod cluster;
pub mod health;
pub mod log_store;
pub mod snat;
pub mod state_machine;
pub mod types;
mod util;

pub use cluster::{ClusterState, Command, Request, Response};
pub use log_store::LogStore;
pub use state_machine::StateMachineStore;
pub use types::TypeConfig;

/// Open (or create) both stores under `dir` (`log.redb`, `sm.redb`).
pub async fn open(
    dir: &std::path::Path,
) -> Result<(LogStore, StateMachineStore), types::StorageError> {
    std::fs::create_dir_all(dir).map_err(|e| openraft::StorageIOError::write(&e))?;
    let log = LogStore::open(dir.join("log.redb")).await?;
    let sm = StateMachineStore::open(dir.join("sm.redb")).await?;
    Ok((log, sm))
}
