//! Conntrack replication over the node's QUIC endpoint: the protocol core
//! ([`crate::session`]) run on real streams.
//!
//! - The datapath's new-flow ring buffer is drained on its own task; each
//!   entry goes to one outgoing session per peer (a long-lived QUIC stream,
//!   `KIND_SYNC`), batched by count and by a short deadline, acknowledged,
//!   and resent after a reconnect.
//! - Inbound sessions are accepted only from members of the cluster (node id
//!   from the peer's certificate, checked against the Raft membership) and
//!   only for the peer's own entries; a malformed message closes the stream
//!   with a logged reason. Entries are written with the merge rule.
//! - Warm join: a node pulls a full snapshot (`KIND_SNAPSHOT`, streamed in
//!   chunks) from a peer before it reports ready. A gap in a peer's sequence
//!   (entries lost) triggers the same pull from that peer (anti-entropy).
//! - Every `refresh_interval` a node re-sends the entries it created that
//!   saw traffic since the last round, so long idle-but-alive flows stay
//!   alive on peers; every node expires idle entries itself.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use datapath_ebpf::{abi::FlowEvent, conntrack::Conntrack, Datapath};
use holdfast_api::wire::{PeerStatus, SyncStatus};
use holdfast_metrics::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    apply::apply_remote,
    convert::{from_wire, to_wire, Clock},
    session::{Inbox, InboxConfig, Outbox, OutboxConfig},
    transport::{BoxFuture, Transport},
    wire::{frame, frame_for, Deframer, Msg, WireEntry, VERSION},
};

/// Who may replicate with this node, supplied by the node (from Raft).
pub trait Membership: Send + Sync + 'static {
    /// May `peer` write into our map / read our snapshot?
    fn is_member(&self, peer: u64) -> bool;
    /// The other members and their QUIC addresses.
    fn peers(&self) -> HashMap<u64, SocketAddr>;
    /// Is this node registered, so that peers accept it (warm join may start)?
    fn registered(&self) -> bool;
    /// Resolves when membership may have changed.
    fn changed(&self) -> BoxFuture<()>;
}

/// Replication settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    /// Replicate new conntrack entries to peers (needs the datapath).
    pub enabled: bool,
    /// Which entries are replicated (see [`SyncMode`]).
    pub mode: SyncMode,
    /// Entries per batch at most.
    pub max_batch: usize,
    /// Longest an entry waits for its batch to fill.
    pub batch_delay_us: u64,
    /// Entries kept per peer until acknowledged.
    pub max_unacked_entries: usize,
    /// Re-send our live long-lived flows this often (well below the idle timeouts).
    pub refresh_interval_s: u64,
    /// Delete idle entries this often.
    pub expire_interval_s: u64,
}

impl Default for SyncSection {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: SyncMode::All,
            max_batch: 256,
            batch_delay_us: 100,
            max_unacked_entries: 1 << 18,
            refresh_interval_s: 60,
            expire_interval_s: 60,
        }
    }
}

/// Which conntrack entries a node replicates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Every new entry, to every peer.
    #[default]
    All,
    /// Only the entries a peer's Maglev tables would not rebuild: SNAT
    /// entries, client affinity, and the entries a table change moves
    /// (shared while the change is prepared, see the datapath's
    /// `prepare` and `Conntrack::share`).
    Divergent,
}

impl SyncMode {
    /// Is entry `v` (of this node, `me`) one that peers hold? In `all`
    /// mode every entry; in `divergent` mode peers' entries and own shared
    /// ones (affinity entries are always shared).
    pub fn replicated(self, v: &datapath_ebpf::abi::CtVal, me: u16) -> bool {
        use datapath_ebpf::abi::{CT_F_AFFINITY, CT_F_SHARED};
        self == SyncMode::All || v.origin != me || v.flags & (CT_F_SHARED | CT_F_AFFINITY) != 0
    }
}

pub const KIND_SYNC: u8 = 0x10;
pub const KIND_SNAPSHOT: u8 = 0x11;
const SNAPSHOT_CHUNK: usize = 1024;
/// Batches up to this many entries are written into the map on the
/// receiving task itself (see `apply`).
const INLINE_APPLY: usize = 64;

#[derive(Default)]
pub struct PeerStats {
    pub connected: AtomicBool,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub applied: AtomicU64,
    pub rejected: AtomicU64,
    pub queued: AtomicU64,
    /// Entries not handed to this peer's session because its queue was full.
    pub dropped: AtomicU64,
}

#[derive(Default)]
pub struct SyncMetrics {
    pub peers: Mutex<BTreeMap<u64, Arc<PeerStats>>>,
    /// Creation on the origin → applied here.
    pub lag: Histogram,
    /// Where that lag goes, as milestones from creation (each includes the
    /// ones before): read from the ring and handed to QUIC on the origin,
    /// received here. Applied is `lag`.
    pub stages: LagStages,
    pub batches_sent: AtomicU64,
    /// Bytes written on replication streams (frames, incl. headers).
    pub bytes_sent: AtomicU64,
    pub entries_in_batches: AtomicU64,
    /// Inbound sessions refused (not a member, wrong origin, bad message).
    pub refused: AtomicU64,
    pub snapshot_entries: AtomicU64,
    /// Bytes of snapshots served to peers (warm joins, resyncs).
    pub snapshot_bytes_sent: AtomicU64,
    pub resyncs: AtomicU64,
    /// Entries received in peers' refresh rounds.
    pub refreshed: AtomicU64,
    /// Own entries queued in refresh rounds (to every peer).
    pub refresh_sent: AtomicU64,
    pub expired: AtomicU64,
}

/// Milestones of a replicated entry, measured from its creation on the
/// origin (the datapath's insert): `ring` when the origin's consumer read it
/// from the ring buffer, `queued` when the peer's session took it into its
/// batch (recorded on the origin, per peer), `sent` when its batch was handed to the QUIC stream
/// (recorded on the origin), `received` when its batch was read off the
/// stream on a peer (recorded on the peer). New flows only (a closing event
/// carries its flow's creation time).
#[derive(Default)]
pub struct LagStages {
    pub ring: Histogram,
    pub queued: Histogram,
    pub sent: Histogram,
    pub received: Histogram,
}

/// Creation → `now_unix` of the new-flow entries among `entries`.
fn ages(entries: &[WireEntry], now_unix: u64) -> impl Iterator<Item = Duration> + '_ {
    entries
        .iter()
        .filter(|e| e.flags & datapath_ebpf::abi::CT_F_CLOSING == 0)
        .map(move |e| Duration::from_nanos(now_unix.saturating_sub(e.created)))
}

/// What a refresh round did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshReport {
    /// Entries in the map.
    pub scanned: usize,
    /// Own entries queued to every peer.
    pub sent: usize,
    /// Every live entry (after ring loss, or asked), not one slot's.
    pub full: bool,
}

enum PeerCmd {
    Entries(Arc<Vec<WireEntry>>),
    Refresh(Arc<Vec<WireEntry>>),
    /// Answer once every entry queued before this command is acknowledged
    /// (true), or at once if the peer is not connected (false).
    Flush(tokio::sync::oneshot::Sender<bool>),
}

/// What [`SyncService::share_moved`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareOutcome {
    /// Entries the share walk announced.
    pub shared: u64,
    /// Entries the walk visited (all runs).
    pub visited: u64,
    /// Peers that acknowledged everything queued up to the walk.
    pub acked_peers: usize,
    /// Peers not connected (their entries wait in their queues).
    pub away_peers: usize,
    /// Peers that did not acknowledge within the time given.
    pub late_peers: usize,
}

pub struct SyncService {
    node_id: u64,
    incarnation: u64,
    clock: Clock,
    cfg: SyncSection,
    dp: Arc<Mutex<Datapath>>,
    /// The conntrack map without the datapath's lock.
    ct: Arc<Conntrack>,
    transport: Arc<Transport>,
    members: Arc<dyn Membership>,
    peers: Mutex<HashMap<u64, mpsc::Sender<PeerCmd>>>,
    inbox: tokio::sync::Mutex<Inbox>,
    resyncing: Mutex<std::collections::HashSet<u64>>,
    refresher: Mutex<crate::refresh::Refresher>,
    pub metrics: SyncMetrics,
    ready: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Share-walk records (flagged SHARED) the ring consumer has handed
    /// to every peer.
    walk_records_queued: AtomicU64,
}

impl SyncService {
    /// Start replication; returns at once (warm join runs in the background).
    pub fn start(
        node_id: u64,
        cfg: SyncSection,
        dp: Arc<Mutex<Datapath>>,
        transport: Arc<Transport>,
        members: Arc<dyn Membership>,
    ) -> Result<Arc<Self>> {
        let (events, refresher, ct) = {
            let mut d = dp.lock().expect("dp");
            let o = d.options().clone();
            let refresher = crate::refresh::Refresher::new(
                Duration::from_secs(cfg.refresh_interval_s.max(1)),
                o.tcp_idle_timeout,
                o.udp_idle_timeout,
                datapath_ebpf::maps::monotonic_now().as_nanos() as u64,
            );
            (d.take_flow_events()?, refresher, d.conntrack())
        };
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id());
        let svc = Arc::new(Self {
            node_id,
            incarnation,
            clock: Clock::now(),
            cfg,
            dp,
            ct,
            transport: transport.clone(),
            members,
            peers: Mutex::new(HashMap::new()),
            inbox: tokio::sync::Mutex::new(Inbox::new(InboxConfig::default())),
            resyncing: Mutex::new(Default::default()),
            refresher: Mutex::new(refresher),
            metrics: SyncMetrics::default(),
            ready: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            walk_records_queued: AtomicU64::new(0),
        });
        let s = svc.clone();
        transport.set_stream_handler(Some(Arc::new(move |peer, kind, send, recv| {
            let s = s.clone();
            Box::pin(async move {
                let r = match kind {
                    KIND_SYNC => s.serve_sync(peer, send, recv).await,
                    KIND_SNAPSHOT => s.serve_snapshot(peer, send, recv).await,
                    other => Err(anyhow!("unknown stream kind {other:#x}")),
                };
                if let Err(e) = r {
                    debug!(peer, error = %e, "sync stream ended");
                }
            })
        })));
        let tasks = vec![
            tokio::spawn(svc.clone().ring_task(events)),
            tokio::spawn(svc.clone().membership_task()),
            tokio::spawn(svc.clone().warm_join_task()),
            tokio::spawn(svc.clone().refresh_task()),
            tokio::spawn(svc.clone().expire_task()),
            tokio::spawn(svc.clone().gap_task()),
        ];
        svc.tasks.lock().expect("tasks").extend(tasks);
        info!(node = node_id, incarnation, "conntrack replication started");
        Ok(svc)
    }

    /// Stop every task and release the transport (which refers back to us).
    pub async fn stop(&self) {
        self.transport.set_stream_handler(None);
        self.peers.lock().expect("peers").clear();
        let tasks: Vec<_> = self.tasks.lock().expect("tasks").drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> SyncStatus {
        let peers = self
            .metrics
            .peers
            .lock()
            .expect("peers")
            .iter()
            .map(|(p, s)| PeerStatus {
                peer: *p,
                connected: s.connected.load(Ordering::Relaxed),
                sent: s.sent.load(Ordering::Relaxed),
                received: s.received.load(Ordering::Relaxed),
                applied: s.applied.load(Ordering::Relaxed),
                rejected: s.rejected.load(Ordering::Relaxed),
                queued: s.queued.load(Ordering::Relaxed),
            })
            .collect();
        SyncStatus {
            ready: self.is_ready(),
            incarnation: self.incarnation,
            peers,
            lag_p50_ms: self
                .metrics
                .lag
                .quantile(0.5)
                .map(|d| d.as_secs_f64() * 1e3),
            lag_p99_ms: self
                .metrics
                .lag
                .quantile(0.99)
                .map(|d| d.as_secs_f64() * 1e3),
            snapshot_entries: self.metrics.snapshot_entries.load(Ordering::Relaxed),
            refused: self.metrics.refused.load(Ordering::Relaxed),
        }
    }

    /// Now on the wire's clock (Unix ns).
    fn unix_now(&self) -> u64 {
        self.clock
            .to_unix(datapath_ebpf::maps::monotonic_now().as_nanos() as u64)
    }

    fn peer_stats(&self, peer: u64) -> Arc<PeerStats> {
        self.metrics
            .peers
            .lock()
            .expect("peers")
            .entry(peer)
            .or_default()
            .clone()
    }

    fn is_member(&self, peer: u64) -> bool {
        self.members.is_member(peer)
    }

    fn peer_addrs(&self) -> HashMap<u64, SocketAddr> {
        self.members.peers()
    }

    fn broadcast(&self, mut cmd: impl FnMut() -> PeerCmd) {
        for (peer, tx) in self.peers.lock().expect("peers").iter() {
            if tx.try_send(cmd()).is_err() {
                // The peer's session is far behind: counted; the refresh
                // round and resyncs repair what it misses.
                self.peer_stats(*peer)
                    .dropped
                    .fetch_add(1, Ordering::Relaxed);
                warn!(
                    peer,
                    "replication queue full: entries dropped for this peer"
                );
            }
        }
    }

    /// Drain the new-flow ring buffer and hand entries to every peer.
    async fn ring_task(self: Arc<Self>, mut events: datapath_ebpf::events::FlowEvents) {
        let mut buf: Vec<FlowEvent> = Vec::with_capacity(4096);
        loop {
            buf.clear();
            if let Err(e) = events.recv(&mut buf, 4096).await {
                warn!(error = %e, "ring buffer consumer stopped");
                return;
            }
            let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
            // Closing and affinity events announce an entry that saw
            // traffic just now (a FIN/RST; a client's new flow or a
            // refresh), and SHARED ones an entry made earlier that a table
            // change moves (its last_seen is not in the record: now, which
            // at worst keeps the peers' copy a little longer); none is a
            // new flow's creation.
            let announce = datapath_ebpf::abi::CT_F_CLOSING
                | datapath_ebpf::abi::CT_F_AFFINITY
                | datapath_ebpf::abi::CT_F_SHARED;
            self.metrics.stages.ring.observe_many(
                buf.iter()
                    .filter(|ev| ev.flags & announce == 0)
                    .map(|ev| Duration::from_nanos(now.saturating_sub(ev.created_ns))),
            );
            let entries: Arc<Vec<WireEntry>> = Arc::new(
                buf.iter()
                    .map(|ev| {
                        let mut v = ev.val();
                        if ev.flags & announce != 0 {
                            v.last_seen_ns = now.max(v.created_ns);
                        }
                        to_wire(&ev.key(), &v, &self.clock)
                    })
                    .collect(),
            );
            self.broadcast(|| PeerCmd::Entries(entries.clone()));
            let walked = buf
                .iter()
                .filter(|ev| ev.flags & datapath_ebpf::abi::CT_F_SHARED != 0)
                .count() as u64;
            if walked > 0 {
                self.walk_records_queued
                    .fetch_add(walked, Ordering::Release);
            }
        }
    }

    /// A table change's first phase on this node, once the datapath holds
    /// the next tables as the services' other tables (`Datapath::prepare`):
    /// run the share walk (again while the ring had no room), wait until
    /// the ring consumer has queued its records, then until every
    /// connected peer has acknowledged everything queued so far, for at
    /// most `timeout` in all and `ack_timeout` for the acknowledgements: a
    /// peer that does not acknowledge by then (dead, its connection not
    /// yet timed out; or overloaded) is counted late, and keeps the
    /// entries queued like a peer that is away.
    pub async fn share_moved(
        &self,
        timeout: Duration,
        ack_timeout: Duration,
    ) -> Result<ShareOutcome> {
        let deadline = Instant::now() + timeout;
        let mut outcome = ShareOutcome::default();
        let queued0 = self.walk_records_queued.load(Ordering::Acquire);
        loop {
            let ct = self.ct.clone();
            let r = tokio::task::spawn_blocking(move || ct.share()).await??;
            outcome.shared += r.shared;
            outcome.visited += r.visited;
            if r.ring_full == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the share walk found {} entries the ring had no room for within {timeout:?}",
                    r.ring_full
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Every record the walk wrote is queued to the peers once the
        // consumer has counted as many (walks run one at a time: the
        // datapath's apply loop runs them).
        if outcome.shared > 0 {
            while self.walk_records_queued.load(Ordering::Acquire) < queued0 + outcome.shared {
                if Instant::now() > deadline {
                    bail!("the ring consumer did not take the share walk's records within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let mut waits = Vec::new();
        self.broadcast(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            waits.push(rx);
            PeerCmd::Flush(tx)
        });
        let acks_by = (Instant::now() + ack_timeout).min(deadline);
        for w in waits {
            match tokio::time::timeout_at(acks_by.into(), w).await {
                Ok(Ok(true)) => outcome.acked_peers += 1,
                Ok(Ok(false)) | Ok(Err(_)) => outcome.away_peers += 1,
                Err(_) => outcome.late_peers += 1,
            }
        }
        Ok(outcome)
    }

    /// Keep one outgoing session per member.
    async fn membership_task(self: Arc<Self>) {
        loop {
            let want = self.peer_addrs();
            {
                let mut peers = self.peers.lock().expect("peers");
                peers.retain(|p, _| want.contains_key(p));
                for (peer, addr) in want {
                    if let std::collections::hash_map::Entry::Vacant(v) = peers.entry(peer) {
                        let (tx, prx) = mpsc::channel(4096);
                        v.insert(tx);
                        let t = tokio::spawn(self.clone().peer_task(peer, addr, prx));
                        self.tasks.lock().expect("tasks").push(t);
                    }
                }
            }
            self.members.changed().await;
        }
    }

    async fn peer_task(
        self: Arc<Self>,
        peer: u64,
        addr: SocketAddr,
        mut rx: mpsc::Receiver<PeerCmd>,
    ) {
        let stats = self.peer_stats(peer);
        let mut out = Outbox::new(
            self.node_id,
            self.incarnation,
            OutboxConfig {
                max_batch: self.cfg.max_batch,
                max_delay: Duration::from_micros(self.cfg.batch_delay_us),
                max_unacked_entries: self.cfg.max_unacked_entries,
            },
        );
        let mut backoff = Duration::from_millis(100);
        // Flushes waiting for the acknowledgements of what was queued.
        let mut flushes: Vec<tokio::sync::oneshot::Sender<bool>> = Vec::new();
        loop {
            for f in flushes.drain(..) {
                let _ = f.send(false);
            }
            let (mut send, recv) = match self.transport.open_stream(peer, addr, KIND_SYNC).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(peer, error = %e, "sync connect failed; retrying");
                    // Keep queueing while the peer is away.
                    let until = tokio::time::sleep(backoff);
                    tokio::pin!(until);
                    loop {
                        tokio::select! {
                            _ = &mut until => break,
                            cmd = rx.recv() => match cmd {
                                Some(PeerCmd::Entries(es)) => {
                                    let now = Instant::now();
                                    for e in es.iter() { out.push(e.clone(), now); }
                                    out.poll(now);
                                }
                                Some(PeerCmd::Refresh(_)) => {}
                                Some(PeerCmd::Flush(tx)) => { let _ = tx.send(false); }
                                None => return,
                            }
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            stats.connected.store(true, Ordering::Relaxed);
            let (ack_tx, mut ack_rx) = mpsc::channel::<(u64, u64)>(1024);
            // The peer's version, once its answering Hello says it.
            let version = Arc::new(AtomicU16::new(1));
            let reader = tokio::spawn(read_acks(recv, ack_tx, version.clone()));
            // Opened with version 1, which every version accepts (see wire).
            let mut ok = write_msg(
                &mut send,
                &Msg::Hello {
                    version: 1,
                    node_id: self.node_id,
                    incarnation: self.incarnation,
                },
                &self.metrics,
                1,
            )
            .await;
            for m in out.on_reconnect() {
                if ok {
                    ok = write_msg(
                        &mut send,
                        &m,
                        &self.metrics,
                        version.load(Ordering::Relaxed),
                    )
                    .await;
                }
            }
            while ok {
                let deadline = out.deadline();
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(PeerCmd::Entries(es)) => {
                            let now = Instant::now();
                            for e in es.iter() { out.push(e.clone(), now); }
                            self.metrics.stages.queued.observe_many(ages(&es, self.unix_now()));
                            stats.queued.store(out.queued() as u64, Ordering::Relaxed);
                        }
                        Some(PeerCmd::Refresh(es)) => {
                            for chunk in es.chunks(crate::wire::MAX_BATCH) {
                                ok = write_msg(&mut send, &Msg::Refresh { entries: chunk.to_vec() }, &self.metrics, version.load(Ordering::Relaxed)).await;
                            }
                        }
                        Some(PeerCmd::Flush(tx)) => flushes.push(tx),
                        None => { reader.abort(); return; }
                    },
                    ack = ack_rx.recv() => match ack {
                        Some((inc, seq)) => out.on_ack(inc, seq),
                        None => ok = false,
                    },
                    _ = sleep_until(deadline) => {}
                }
                for m in out.poll(Instant::now()) {
                    if let Msg::Batch { entries, .. } = &m {
                        stats
                            .sent
                            .fetch_add(entries.len() as u64, Ordering::Relaxed);
                        self.metrics.batches_sent.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .entries_in_batches
                            .fetch_add(entries.len() as u64, Ordering::Relaxed);
                    }
                    if ok {
                        ok = write_msg(
                            &mut send,
                            &m,
                            &self.metrics,
                            version.load(Ordering::Relaxed),
                        )
                        .await;
                        if let (true, Msg::Batch { entries, .. }) = (ok, &m) {
                            self.metrics
                                .stages
                                .sent
                                .observe_many(ages(entries, self.unix_now()));
                        }
                    }
                }
                stats.queued.store(out.queued() as u64, Ordering::Relaxed);
                if !flushes.is_empty() && out.queued() == 0 && out.unacked_entries() == 0 {
                    for f in flushes.drain(..) {
                        let _ = f.send(true);
                    }
                }
            }
            reader.abort();
            stats.connected.store(false, Ordering::Relaxed);
            debug!(peer, "sync stream lost; reconnecting");
        }
    }

    /// An inbound session from `peer`.
    async fn serve_sync(
        self: Arc<Self>,
        peer: u64,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<()> {
        if !self.is_member(peer) {
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
            let _ = send.reset(1u32.into());
            warn!(peer, "refused replication from a non-member");
            bail!("node {peer} is not a member");
        }
        let stats = self.peer_stats(peer);
        let mut de = Deframer::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match recv.read(&mut buf).await? {
                Some(n) => n,
                None => return Ok(()),
            };
            de.push(&buf[..n]);
            loop {
                let msg = match de.next_msg() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(peer, reason = %e, "closing replication stream: bad message");
                        let _ = send.reset(3u32.into());
                        bail!("bad message from {peer}: {e}");
                    }
                };
                match msg {
                    Msg::Hello { node_id, .. } if node_id != peer => {
                        self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                        let _ = send.reset(4u32.into());
                        bail!("node {peer} claims to be {node_id}");
                    }
                    Msg::Hello { .. } => {
                        // Answer with the newest version we speak: a
                        // sender of version 2 or later then sends compact
                        // batches (older ones ignore the answer).
                        send.write_all(&frame(&Msg::Hello {
                            version: VERSION,
                            node_id: self.node_id,
                            incarnation: self.incarnation,
                        }))
                        .await?;
                    }
                    Msg::Ack { .. }
                    | Msg::SnapshotChunk { .. }
                    | Msg::CompactBatch { .. }
                    | Msg::BatchV3 { .. }
                    | Msg::RefreshV3 { .. }
                    | Msg::SnapshotChunkV3 { .. } => {}
                    Msg::Batch {
                        origin,
                        incarnation,
                        seq,
                        base,
                        entries,
                    } => {
                        if origin != peer || entries.iter().any(|e| u64::from(e.origin) != peer) {
                            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                            let _ = send.reset(5u32.into());
                            bail!("node {peer} sent entries of another origin");
                        }
                        stats
                            .received
                            .fetch_add(entries.len() as u64, Ordering::Relaxed);
                        self.metrics
                            .stages
                            .received
                            .observe_many(ages(&entries, self.unix_now()));
                        let d = self.inbox.lock().await.on_batch(
                            origin,
                            incarnation,
                            seq,
                            base,
                            entries,
                            Instant::now(),
                        );
                        for batch in d.apply {
                            self.apply(peer, &batch, true).await?;
                        }
                        if d.resync {
                            self.clone().spawn_resync(peer);
                        }
                        if let Some((inc, s)) = d.ack {
                            send.write_all(&frame(&Msg::Ack {
                                incarnation: inc,
                                seq: s,
                            }))
                            .await?;
                        }
                    }
                    Msg::Refresh { entries } => {
                        if entries.iter().any(|e| u64::from(e.origin) != peer) {
                            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                            let _ = send.reset(5u32.into());
                            bail!("node {peer} refreshed entries of another origin");
                        }
                        self.metrics
                            .refreshed
                            .fetch_add(entries.len() as u64, Ordering::Relaxed);
                        self.apply(peer, &entries, false).await?;
                    }
                }
            }
        }
    }

    /// Write entries from `peer` into our map (merge rule); `lag`: record
    /// creation → applied.
    async fn apply(&self, peer: u64, entries: &[WireEntry], lag: bool) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let kv: Vec<_> = entries.iter().map(|e| from_wire(e, &self.clock)).collect();
        // A small batch (the common case: new flows as they come) is one
        // batched map write of a few microseconds: done here, without the
        // hand-off to a blocking thread and back (two wake-ups, measured as a
        // large part of the lag's tail). Large ones (bursts, refresh rounds)
        // go to a blocking thread so the runtime's worker is not held.
        let st = if kv.len() <= INLINE_APPLY {
            apply_remote(&self.ct, &kv)?
        } else {
            let ct = self.ct.clone();
            tokio::task::spawn_blocking(move || apply_remote(&ct, &kv)).await??
        };
        let stats = self.peer_stats(peer);
        stats.applied.fetch_add(st.applied, Ordering::Relaxed);
        stats.rejected.fetch_add(st.rejected, Ordering::Relaxed);
        if lag {
            self.metrics
                .lag
                .observe_many(ages(entries, self.unix_now()));
        }
        Ok(())
    }

    /// Stream our whole conntrack map to `peer` in chunks, encoded for the
    /// version its request names (a request without one is from a node
    /// before version 3, which gets no SNAT entry).
    async fn serve_snapshot(
        self: Arc<Self>,
        peer: u64,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<()> {
        if !self.is_member(peer) {
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
            let _ = send.reset(1u32.into());
            bail!("snapshot refused to non-member {peer}");
        }
        let mut version = 1;
        if let Ok(Ok(req)) =
            tokio::time::timeout(Duration::from_secs(2), recv.read_to_end(256)).await
        {
            let mut de = Deframer::default();
            de.push(&req);
            if let Ok(Some(Msg::Hello { version: v, .. })) = de.next_msg() {
                version = v.min(VERSION);
            }
        }
        let ct = self.ct.clone();
        let (mode, me) = (self.cfg.mode, self.node_id as u16);
        // Divergent: only what peers hold (the joiner's tables rebuild the
        // rest).
        let all = tokio::task::spawn_blocking(move || {
            ct.dump().map(|d| {
                d.into_iter()
                    .filter(|(_, v)| mode.replicated(v, me))
                    .collect::<Vec<_>>()
            })
        })
        .await??;
        let n = all.len();
        let mut chunks = all.chunks(SNAPSHOT_CHUNK).peekable();
        if chunks.peek().is_none() {
            send.write_all(&frame_for(
                version,
                &Msg::SnapshotChunk {
                    entries: vec![],
                    last: true,
                },
            ))
            .await?;
        }
        while let Some(c) = chunks.next() {
            let entries = c.iter().map(|(k, v)| to_wire(k, v, &self.clock)).collect();
            let last = chunks.peek().is_none();
            let f = frame_for(version, &Msg::SnapshotChunk { entries, last });
            self.metrics
                .snapshot_bytes_sent
                .fetch_add(f.len() as u64, Ordering::Relaxed);
            send.write_all(&f).await?;
        }
        send.finish()?;
        info!(peer, entries = n, "served a conntrack snapshot");
        Ok(())
    }

    /// Pull a full snapshot from `peer` into our map; returns entries applied.
    pub async fn pull_snapshot(&self, peer: u64, addr: SocketAddr) -> Result<u64> {
        let (mut send, mut recv) = self
            .transport
            .open_stream(peer, addr, KIND_SNAPSHOT)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        // The request: our version (older servers never read it).
        send.write_all(&frame(&Msg::Hello {
            version: VERSION,
            node_id: self.node_id,
            incarnation: self.incarnation,
        }))
        .await?;
        send.finish()?;
        let mut de = Deframer::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = recv
                .read(&mut buf)
                .await?
                .ok_or_else(|| anyhow!("snapshot from {peer} ended early"))?;
            de.push(&buf[..n]);
            while let Some(m) = de.next_msg()? {
                let Msg::SnapshotChunk { entries, last } = m else {
                    bail!("unexpected message in a snapshot from {peer}");
                };
                total += entries.len() as u64;
                let kv: Vec<_> = entries.iter().map(|e| from_wire(e, &self.clock)).collect();
                let ct = self.ct.clone();
                tokio::task::spawn_blocking(move || apply_remote(&ct, &kv)).await??;
                self.metrics
                    .snapshot_entries
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                if total.is_multiple_of(SNAPSHOT_CHUNK as u64 * 64) {
                    info!(peer, entries = total, "warm join: snapshot progress");
                }
                if last {
                    return Ok(total);
                }
            }
        }
    }

    fn spawn_resync(self: Arc<Self>, peer: u64) {
        if !self.resyncing.lock().expect("resync").insert(peer) {
            return;
        }
        tokio::spawn(async move {
            self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
            if let Some(addr) = self.peer_addrs().get(&peer).copied() {
                match self.pull_snapshot(peer, addr).await {
                    Ok(n) => info!(peer, entries = n, "resynchronised from peer"),
                    Err(e) => warn!(peer, error = %e, "resync failed"),
                }
            }
            self.resyncing.lock().expect("resync").remove(&peer);
        });
    }

    /// Warm join: once registered, pull a snapshot from a peer, then ready.
    async fn warm_join_task(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.members.registered() {
                let peers = self.peer_addrs();
                if peers.is_empty() {
                    break;
                }
                let mut done = false;
                for (peer, addr) in peers {
                    info!(peer, "warm join: pulling the conntrack snapshot");
                    match self.pull_snapshot(peer, addr).await {
                        Ok(n) => {
                            info!(peer, entries = n, "warm join done");
                            done = true;
                            break;
                        }
                        Err(e) => warn!(peer, error = %e, "warm join from this peer failed"),
                    }
                }
                if done {
                    break;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        self.ready.store(true, Ordering::Relaxed);
        info!(node = self.node_id, "replication ready");
    }

    /// Re-send our own live entries so that peers' copies stay fresh
    /// (which ones each round: [`crate::refresh`]). A round runs every
    /// `refresh_interval_s`, and within a second (full) when entries were
    /// lost since the last round: ring-buffer events the datapath could
    /// not record, or entries dropped at a peer's full queue.
    async fn refresh_task(self: Arc<Self>) {
        let every = Duration::from_secs(self.cfg.refresh_interval_s.max(1));
        let check = every.min(Duration::from_secs(1));
        let mut last = Instant::now();
        let mut lost_seen = self.ring_lost();
        loop {
            tokio::time::sleep(check).await;
            let lost = self.ring_lost();
            if lost <= lost_seen && last.elapsed() < every {
                continue;
            }
            lost_seen = lost;
            last = Instant::now();
            if let Err(e) = self.refresh_round(false).await {
                warn!(error = %e, "refresh round failed");
            }
        }
    }

    /// Entries lost before they reached a peer: ring-buffer events the
    /// datapath could not record, and entries dropped at a full peer queue.
    fn ring_lost(&self) -> u64 {
        let ring = self
            .dp
            .lock()
            .expect("dp")
            .stats()
            .map(|s| s.c[datapath_ebpf::abi::stat::RING_LOST])
            .unwrap_or(0);
        let dropped: u64 = self
            .metrics
            .peers
            .lock()
            .expect("peers")
            .values()
            .map(|p| p.dropped.load(Ordering::Relaxed))
            .sum();
        ring + dropped
    }

    /// One refresh round now; `full`: every own entry with traffic since
    /// the last round, not only this round's slot (the bench measures
    /// both). Returns what was sent.
    pub async fn refresh_round(&self, full: bool) -> Result<RefreshReport> {
        let (me, mode) = (self.node_id as u16, self.cfg.mode);
        let start = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
        let lost = self.ring_lost();
        let ct = self.ct.clone();
        let all = tokio::task::spawn_blocking(move || ct.dump()).await??;
        let plan = self
            .refresher
            .lock()
            .expect("refresher")
            .plan(start, lost, full);
        let live: Arc<Vec<WireEntry>> = Arc::new(
            all.iter()
                .filter(|(k, v)| mode.replicated(v, me) && plan.wants(k, v, me))
                .map(|(k, v)| to_wire(k, v, &self.clock))
                .collect(),
        );
        if !live.is_empty() {
            self.broadcast(|| PeerCmd::Refresh(live.clone()));
        }
        self.metrics
            .refresh_sent
            .fetch_add(live.len() as u64, Ordering::Relaxed);
        Ok(RefreshReport {
            scanned: all.len(),
            sent: live.len(),
            full: plan.full,
        })
    }

    async fn expire_task(self: Arc<Self>) {
        let every = Duration::from_secs(self.cfg.expire_interval_s.max(1));
        loop {
            tokio::time::sleep(every).await;
            let ct = self.ct.clone();
            let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
            if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || ct.expire(now)).await {
                self.metrics.expired.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }

    /// Gaps that do not close in time become resyncs.
    async fn gap_task(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let d = self.inbox.lock().await.poll(Instant::now());
            for batch in &d.apply {
                if let Some(origin) = batch.first().map(|e| u64::from(e.origin)) {
                    let _ = self.apply(origin, batch, true).await;
                }
            }
            if d.resync {
                for peer in self.peer_addrs().keys().copied().collect::<Vec<_>>() {
                    self.clone().spawn_resync(peer);
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending::<()>().await,
    }
}

/// Write `m` for a peer that speaks wire `version` ([`frame_for`]).
async fn write_msg(
    send: &mut quinn::SendStream,
    m: &Msg,
    metrics: &SyncMetrics,
    version: u16,
) -> bool {
    let f = frame_for(version, m);
    metrics
        .bytes_sent
        .fetch_add(f.len() as u64, Ordering::Relaxed);
    send.write_all(&f).await.is_ok()
}

/// The receiver's side of a sync stream: acknowledgements, and its Hello
/// (version 2 and later answer ours), which says what it speaks.
async fn read_acks(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<(u64, u64)>,
    version: Arc<AtomicU16>,
) {
    let mut de = Deframer::default();
    let mut buf = vec![0u8; 4096];
    while let Ok(Some(n)) = recv.read(&mut buf).await {
        de.push(&buf[..n]);
        while let Ok(Some(m)) = de.next_msg() {
            let ack = match m {
                Msg::Ack { incarnation, seq } => (incarnation, seq),
                Msg::Hello { version: v, .. } => {
                    version.store(v.min(VERSION), Ordering::Relaxed);
                    continue;
                }
                _ => continue,
            };
            if tx.send(ack).await.is_err() {
                return;
            }
        }
    }
}

impl SyncService {
    /// Entries from all peers written into our map so far (cheap: no quantiles).
    pub fn applied_total(&self) -> u64 {
        self.metrics
            .peers
            .lock()
            .expect("peers")
            .values()
            .map(|s| s.applied.load(Ordering::Relaxed))
            .sum()
    }

    /// Used by clusterctl `members`: is the stream to `peer` up?
    pub fn connected_peers(&self) -> usize {
        self.metrics
            .peers
            .lock()
            .expect("peers")
            .values()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .count()
    }
}
