//! openraft's network over the QUIC transport. Messages are JSON (openraft's
//! serde types); the response carries the remote `Result` so Raft errors
//! travel back as errors, not as transport failures.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use openraft::{
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    },
    BasicNode,
};
use raft_store::{
    types::{NodeId, Raft},
    TypeConfig,
};
use serde::{de::DeserializeOwned, Serialize};

use sync::transport::{CallError, Handler, Transport};

pub const RPC_APPEND: u8 = 1;
pub const RPC_VOTE: u8 = 2;
pub const RPC_SNAPSHOT: u8 = 3;

#[derive(Clone)]
pub struct RaftNet {
    pub transport: Arc<Transport>,
}

impl RaftNetworkFactory<TypeConfig> for RaftNet {
    type Network = RaftConn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        RaftConn {
            transport: self.transport.clone(),
            target,
            addr: node.addr.parse().ok(),
            raw_addr: node.addr.clone(),
        }
    }
}

pub struct RaftConn {
    transport: Arc<Transport>,
    target: NodeId,
    addr: Option<SocketAddr>,
    raw_addr: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl RaftConn {
    async fn call<Req, Resp, E>(
        &self,
        kind: u8,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let addr = self.addr.ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "node {} has no valid address {:?}",
                self.target, self.raw_addr
            ))))
        })?;
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let resp = self
            .transport
            .call(self.target, addr, kind, &body, ttl)
            .await
            .map_err(|e| match e {
                CallError::Unreachable(e) => {
                    RPCError::Unreachable(Unreachable::new(&Msg(format!("{e:#}"))))
                }
                other => RPCError::Network(NetworkError::new(&other)),
            })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&resp).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for RaftConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RPC_APPEND, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RPC_SNAPSHOT, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RPC_VOTE, &rpc, option.hard_ttl()).await
    }
}

/// When this node last received an AppendEntries (heartbeat) from a leader.
#[derive(Default)]
pub struct HeartbeatClock {
    start: std::sync::OnceLock<Instant>,
    last_ms: AtomicU64,
}

impl HeartbeatClock {
    fn now_ms(&self) -> u64 {
        self.start.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    pub fn beat(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last heartbeat, if any was received.
    pub fn age_ms(&self) -> Option<u64> {
        match self.last_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(self.now_ms().saturating_sub(t)),
        }
    }
}

fn reply<T: Serialize>(r: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(r).map_err(|e| format!("encoding response: {e}"))
}

/// Whether `peer` may send this node Raft RPCs as `claimed` (the node the
/// RPC says it comes from: the leader or candidate in its vote).
///
/// Refused: an RPC claiming another node than the certificate names (no
/// node speaks for another), and one from a node outside this node's
/// membership — unless this node has no membership yet (a new node waiting
/// for the leader that adds it), or the RPC itself carries a membership
/// naming the sender (`carried`: how a new leader reaches a follower that
/// missed its join). A vote always needs the sender in the membership.
pub fn admit(
    raft: &Raft,
    peer: NodeId,
    claimed: Option<NodeId>,
    carried: bool,
) -> Result<(), String> {
    if claimed != Some(peer) {
        return Err(format!(
            "node {peer} sent an RPC as {}",
            claimed.map_or("nobody".to_string(), |c| format!("node {c}"))
        ));
    }
    let m = raft.metrics().borrow().membership_config.clone();
    let mut nodes = m.membership().nodes().map(|(id, _)| *id).peekable();
    if nodes.peek().is_none() {
        return Ok(());
    }
    if nodes.any(|id| id == peer) || carried {
        return Ok(());
    }
    Err(format!("node {peer} is not a member"))
}

/// The server side: check the sender, decode, hand to the local Raft,
/// encode its result. Refusals count in `refused`.
pub fn handler(raft: Raft, heartbeat: Arc<HeartbeatClock>, refused: Arc<AtomicU64>) -> Handler {
    Arc::new(move |peer, kind, body| {
        let raft = raft.clone();
        let heartbeat = heartbeat.clone();
        let refused = refused.clone();
        Box::pin(async move {
            let deny = |why: String| {
                refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer, kind, reason = %why, "Raft RPC refused");
                why
            };
            match kind {
                RPC_APPEND => {
                    let req: AppendEntriesRequest<TypeConfig> = serde_json::from_slice(&body)
                        .map_err(|e| deny(format!("bad append_entries: {e}")))?;
                    let carried = req.entries.iter().any(|e| match &e.payload {
                        openraft::EntryPayload::Membership(m) => {
                            m.nodes().any(|(id, _)| *id == peer)
                        }
                        _ => false,
                    });
                    admit(&raft, peer, req.vote.leader_id().voted_for(), carried).map_err(deny)?;
                    heartbeat.beat();
                    reply(&raft.append_entries(req).await)
                }
                RPC_VOTE => {
                    let req: VoteRequest<NodeId> = serde_json::from_slice(&body)
                        .map_err(|e| deny(format!("bad vote: {e}")))?;
                    admit(&raft, peer, req.vote.leader_id().voted_for(), false).map_err(deny)?;
                    reply(&raft.vote(req).await)
                }
                RPC_SNAPSHOT => {
                    let req: InstallSnapshotRequest<TypeConfig> = serde_json::from_slice(&body)
                        .map_err(|e| deny(format!("bad install_snapshot: {e}")))?;
                    let carried = req
                        .meta
                        .last_membership
                        .membership()
                        .nodes()
                        .any(|(id, _)| *id == peer);
                    admit(&raft, peer, req.vote.leader_id().voted_for(), carried).map_err(deny)?;
                    heartbeat.beat();
                    reply(&raft.install_snapshot(req).await)
                }
                other => Err(deny(format!("unknown RPC kind {other}"))),
            }
        })
    })
}
