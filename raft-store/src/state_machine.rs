//! The config state machine in redb. `apply` writes the new state (with the
//! last applied log id and membership) before it returns, but fsyncs it
//! only every [`DURABLE_EVERY`] applies or [`DURABLE_AFTER`]: the Raft log
//! is already durable, so after a crash openraft re-applies the entries
//! after the last durable state (etcd's backend does the same with its
//! consistent index). Snapshots are the serialized state, always written
//! durably; on open, a snapshot newer than the stored state wins, so the
//! log purged behind a snapshot is never needed. Every applied state is
//! published on a watch channel for the node to program its datapath from.

use std::{
    io::Cursor,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use openraft::{
    storage::{RaftSnapshotBuilder, RaftStateMachine},
    AnyError, EntryPayload, OptionalSend, StorageIOError,
};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use crate::{
    cluster::{ClusterState, Response},
    types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig},
    util::{any, blocking},
};

const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("state_machine");
const K_STATE: &str = "state";
const K_SNAPSHOT: &str = "snapshot";

/// An applied state is fsynced at least every this many applies...
pub const DURABLE_EVERY: u32 = 64;
/// ...and when the last durable one is older than this.
pub const DURABLE_AFTER: Duration = Duration::from_secs(1);

/// What the state machine persists: the config plus Raft's bookkeeping.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: ClusterState,
    /// The trace contexts (W3C traceparent) of recently applied requests,
    /// with the epoch each left the config at: the node continues those
    /// traces when it programs that epoch. Not persisted; bounded.
    #[serde(skip)]
    pub traces: std::collections::VecDeque<(u64, String)>,
}

/// How many applied trace contexts [`SmData::traces`] keeps.
pub const RECENT_TRACES: usize = 256;

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

struct Inner {
    data: SmData,
    /// Snapshots built by this process (for unique snapshot ids).
    built: u64,
    /// Applies written without fsync since the last durable write.
    nondurable: u32,
    last_durable: Instant,
}

/// The state machine store; clones share state (the snapshot builder is one).
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    inner: Arc<Mutex<Inner>>,
    tx: Arc<watch::Sender<Arc<SmData>>>,
}

impl StateMachineStore {
    pub async fn open(path: PathBuf) -> Result<Self, StorageError> {
        let (db, data) = blocking(move || {
            let db = Database::create(&path).map_err(any)?;
            let tx = db.begin_write().map_err(any)?;
            tx.open_table(SM).map_err(any)?;
            tx.commit().map_err(any)?;
            let rx = db.begin_read().map_err(any)?;
            let t = rx.open_table(SM).map_err(any)?;
            let mut data: SmData = match t.get(K_STATE).map_err(any)? {
                Some(v) => serde_json::from_slice(v.value()).map_err(any)?,
                None => SmData::default(),
            };
            // The state is fsynced lazily, the snapshot always: after a
            // crash the snapshot may be the newer of the two.
            if let Some(v) = t.get(K_SNAPSHOT).map_err(any)? {
                let snap: StoredSnapshot = serde_json::from_slice(v.value()).map_err(any)?;
                if snap.meta.last_log_id > data.last_applied {
                    data = serde_json::from_slice(&snap.data).map_err(any)?;
                    data.last_applied = snap.meta.last_log_id;
                    data.last_membership = snap.meta.last_membership.clone();
                }
            }
            Ok((db, data))
        })
        .await
        .map_err(StorageIOError::read_state_machine)?;
        let (tx, _) = watch::channel(Arc::new(data.clone()));
        Ok(Self {
            db: Arc::new(db),
            inner: Arc::new(Mutex::new(Inner {
                data,
                built: 0,
                nondurable: 0,
                last_durable: Instant::now(),
            })),
            tx: Arc::new(tx),
        })
    }

    /// Every applied state, newest first; subscribe to follow the config.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SmData>> {
        self.tx.subscribe()
    }

    /// The current applied state.
    pub fn current(&self) -> Arc<SmData> {
        self.tx.borrow().clone()
    }

    /// Write the state (and, when given, the snapshot) in one transaction;
    /// fsynced when `durable`.
    async fn persist(
        &self,
        data: Option<&SmData>,
        snapshot: Option<&StoredSnapshot>,
        durable: bool,
    ) -> Result<(), AnyError> {
        let state = data.map(serde_json::to_vec).transpose().map_err(any)?;
        let snap = snapshot.map(serde_json::to_vec).transpose().map_err(any)?;
        let db = self.db.clone();
        blocking(move || {
            let mut tx = db.begin_write().map_err(any)?;
            if !durable {
                tx.set_durability(Durability::None).map_err(any)?;
            }
            {
                let mut t = tx.open_table(SM).map_err(any)?;
                if let Some(s) = &state {
                    t.insert(K_STATE, s.as_slice()).map_err(any)?;
                }
                if let Some(s) = &snap {
                    t.insert(K_SNAPSHOT, s.as_slice()).map_err(any)?;
                }
            }
            tx.commit().map_err(any)
        })
        .await
    }

    fn publish(&self, data: &SmData) {
        self.tx.send_replace(Arc::new(data.clone()));
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (data, id) = {
            let mut inner = self.inner.lock().await;
            inner.built += 1;
            (inner.data.clone(), inner.built)
        };
        let bytes =
            serde_json::to_vec(&data).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let snapshot_id = match data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, id),
            None => format!("none-{id}"),
        };
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.last_membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes.clone(),
        };
        // Only the snapshot: the state on disk may already be newer.
        self.persist(None, Some(&stored), true)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.inner.lock().await;
        Ok((inner.data.last_applied, inner.data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let mut responses = Vec::new();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            inner.data.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response {
                    epoch: inner.data.state.epoch,
                    ..Default::default()
                }),
                EntryPayload::Normal(req) => {
                    let r = inner.data.state.apply_request(&req);
                    if let Some(tp) = req.trace {
                        if inner.data.traces.len() == RECENT_TRACES {
                            inner.data.traces.pop_front();
                        }
                        let epoch = inner.data.state.epoch;
                        inner.data.traces.push_back((epoch, tp));
                    }
                    if let Some(why) = &r.rejected {
                        tracing::info!(index = entry.log_id.index, reason = %why, "command rejected");
                    }
                    responses.push(r);
                }
                EntryPayload::Membership(m) => {
                    inner.data.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(Response {
                        epoch: inner.data.state.epoch,
                        ..Default::default()
                    });
                }
            }
        }
        if let Some(log_id) = last {
            inner.nondurable += 1;
            let durable =
                inner.nondurable >= DURABLE_EVERY || inner.last_durable.elapsed() >= DURABLE_AFTER;
            let data = Arc::new(inner.data.clone());
            self.persist(Some(&data), None, durable)
                .await
                .map_err(|e| StorageIOError::apply(log_id, e))?;
            if durable {
                inner.nondurable = 0;
                inner.last_durable = Instant::now();
            }
            self.tx.send_replace(data);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let mut data: SmData = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        data.last_applied = meta.last_log_id;
        data.last_membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        let mut inner = self.inner.lock().await;
        self.persist(Some(&data), Some(&stored), true)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        inner.nondurable = 0;
        inner.last_durable = Instant::now();
        inner.data = data.clone();
        self.publish(&data);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let db = self.db.clone();
        let stored: Option<StoredSnapshot> = blocking(move || {
            let tx = db.begin_read().map_err(any)?;
            let t = tx.open_table(SM).map_err(any)?;
            match t.get(K_SNAPSHOT).map_err(any)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(any)?)),
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
