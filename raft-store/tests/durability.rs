//! The state machine fsyncs its state lazily (the Raft log is the durable
//! record) and its snapshots always. These tests pin down what a restart
//! finds: a state consistent with its last applied log id, never older than
//! the last snapshot, so that the log purged behind a snapshot is never
//! needed.

use openraft::{
    storage::{RaftSnapshotBuilder, RaftStateMachine},
    CommittedLeaderId, Entry, EntryPayload, LogId,
};
use raft_store::{
    cluster::VipPool,
    state_machine::{SmData, DURABLE_EVERY},
    Command, Request, StateMachineStore, TypeConfig,
};
use redb::{Database, TableDefinition};

const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("state_machine");

/// Entry `i` (1-based) adds pool `p{i}`: after applying 1..=n there are n pools.
fn entry(i: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
        payload: EntryPayload::Normal(Request {
            id: None,
            command: Command::PutVipPool {
                pool: VipPool {
                    name: format!("p{i}"),
                    cidr: format!("10.{}.{}.0/24", i / 256, i % 256),
                    ..Default::default()
                },
            },
            trace: None,
        }),
    }
}

fn consistent(d: &SmData) -> u64 {
    let n = d.last_applied.map(|l| l.index).unwrap_or(0);
    assert_eq!(
        d.state.pools.len() as u64,
        n,
        "the state must be exactly the result of applying entries 1..={n}"
    );
    n
}

#[tokio::test]
async fn applied_state_is_durable_every_n_applies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sm.redb");
    let n = u64::from(DURABLE_EVERY) + 3;
    {
        let mut sm = StateMachineStore::open(path.clone()).await.unwrap();
        for i in 1..=n {
            let r = sm.apply([entry(i)]).await.unwrap();
            assert!(r[0].rejected.is_none(), "{:?}", r[0].rejected);
        }
        assert_eq!(consistent(&sm.current()), n);
    }
    let sm = StateMachineStore::open(path).await.unwrap();
    let got = consistent(&sm.current());
    // At least the DURABLE_EVERY-th apply was fsynced; later ones may be.
    assert!(
        (u64::from(DURABLE_EVERY)..=n).contains(&got),
        "reopened at {got}, expected {DURABLE_EVERY}..={n}"
    );
}

#[tokio::test]
async fn a_snapshot_newer_than_the_stored_state_wins_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sm.redb");
    let old_state: Vec<u8>;
    {
        let mut sm = StateMachineStore::open(path.clone()).await.unwrap();
        sm.apply([entry(1), entry(2)]).await.unwrap();
        old_state = serde_json::to_vec(&*sm.current()).unwrap();
        sm.apply((3..=10).map(entry)).await.unwrap();
        let snap = sm.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(10));
        sm.apply([entry(11)]).await.unwrap();
    }
    // A crash that lost the lazily written state: the stored state is back
    // at entry 2 while the (always fsynced) snapshot holds entry 10.
    {
        let db = Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(SM)
            .unwrap()
            .insert("state", old_state.as_slice())
            .unwrap();
        tx.commit().unwrap();
    }
    let mut sm = StateMachineStore::open(path).await.unwrap();
    assert_eq!(consistent(&sm.current()), 10);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(10));
    // Entries after the snapshot re-apply on top of it.
    sm.apply([entry(11)]).await.unwrap();
    assert_eq!(consistent(&sm.current()), 11);
}
