//! The Raft log in redb: entries by index, plus vote, committed log id and
//! last purged log id. Appends are fsynced (redb `Durability::Immediate`)
//! before openraft is told they are durable. Every redb call runs on tokio's
//! blocking pool.

use std::{fmt::Debug, ops::RangeBounds, path::PathBuf, sync::Arc};

use openraft::{
    storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage},
    AnyError, OptionalSend, StorageIOError,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::util::{any, blocking};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const K_VOTE: &str = "vote";
const K_COMMITTED: &str = "committed";
const K_PURGED: &str = "last_purged";

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, AnyError> {
    serde_json::to_vec(v).map_err(|e| AnyError::new(&e))
}

fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T, AnyError> {
    serde_json::from_slice(b).map_err(|e| AnyError::new(&e))
}

/// The log store; clones share the database (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
}

impl LogStore {
    pub async fn open(path: PathBuf) -> Result<Self, StorageError> {
        let db = blocking(move || {
            let db = Database::create(&path).map_err(any)?;
            let tx = db.begin_write().map_err(any)?;
            tx.open_table(LOGS).map_err(any)?;
            tx.open_table(META).map_err(any)?;
            tx.commit().map_err(any)?;
            Ok(db)
        })
        .await
        .map_err(StorageIOError::write_logs)?;
        Ok(Self { db: Arc::new(db) })
    }

    async fn get_meta<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, AnyError> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_read().map_err(any)?;
            let t = tx.open_table(META).map_err(any)?;
            match t.get(key).map_err(any)? {
                Some(v) => Ok(Some(dec(v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, v: &T) -> Result<(), AnyError> {
        let bytes = enc(v)?;
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(any)?;
            {
                let mut t = tx.open_table(META).map_err(any)?;
                t.insert(key, bytes.as_slice()).map_err(any)?;
            }
            tx.commit().map_err(any)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_read().map_err(any)?;
            let t = tx.open_table(LOGS).map_err(any)?;
            let mut out = Vec::new();
            for item in t.range::<u64>((start, end)).map_err(any)? {
                let (_, v) = item.map_err(any)?;
                out.push(dec::<Entry>(v.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self
            .get_meta(K_PURGED)
            .await
            .map_err(StorageIOError::read_logs)?;
        let db = self.db.clone();
        let last = blocking(move || {
            let tx = db.begin_read().map_err(any)?;
            let t = tx.open_table(LOGS).map_err(any)?;
            let last = match t.last().map_err(any)? {
                Some((_, v)) => Some(dec::<Entry>(v.value())?.log_id),
                None => None,
            };
            Ok(last)
        })
        .await
        .map_err(StorageIOError::read_logs)?;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(K_VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(K_VOTE)
            .await
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(K_COMMITTED, &committed)
            .await
            .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId>>(K_COMMITTED)
            .await
            .map_err(StorageIOError::read)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, enc(&e)?)))
            .collect::<Result<Vec<(u64, Vec<u8>)>, AnyError>>()
            .map_err(StorageIOError::write_logs)?;
        let db = self.db.clone();
        let res = blocking(move || {
            let tx = db.begin_write().map_err(any)?;
            {
                let mut t = tx.open_table(LOGS).map_err(any)?;
                for (i, bytes) in &encoded {
                    t.insert(*i, bytes.as_slice()).map_err(any)?;
                }
            }
            tx.commit().map_err(any)
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(any)?;
            {
                let mut t = tx.open_table(LOGS).map_err(any)?;
                t.retain_in(log_id.index.., |_, _| false).map_err(any)?;
            }
            tx.commit().map_err(any)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = enc(&log_id).map_err(StorageIOError::write_logs)?;
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(any)?;
            {
                let mut m = tx.open_table(META).map_err(any)?;
                m.insert(K_PURGED, bytes.as_slice()).map_err(any)?;
                let mut t = tx.open_table(LOGS).map_err(any)?;
                t.retain_in(..=log_id.index, |_, _| false).map_err(any)?;
            }
            tx.commit().map_err(any)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}
