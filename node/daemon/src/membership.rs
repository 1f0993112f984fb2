//! Cluster membership: joining (learner, caught up, voter, registered),
//! registering this node, leaving and removing — and who may replicate
//! with this node ([`RaftMembership`]).

use std::{
    collections::BTreeSet,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use openraft::{error::ClientWriteError, BasicNode, ChangeMembers, ServerState};
use raft_store::{cluster::Member, types::Raft, Command, Request, Response, StateMachineStore};
use tracing::{info, instrument};

use crate::node::{Node, WriteError};

/// How long one membership change may take before the client is told to retry.
pub const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one join or registration call through a peer may take before
/// it is retried.
pub const JOIN_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a joining node may take to catch up as a learner.
pub const JOIN_CATCH_UP: Duration = Duration::from_secs(8);

/// Replication membership from Raft: the Raft membership (voters and
/// learners) and the registered members may replicate; peers are the
/// registered members with their QUIC addresses.
pub struct RaftMembership {
    pub id: u64,
    pub raft: Raft,
    pub sm: StateMachineStore,
}

impl sync::service::Membership for RaftMembership {
    fn is_member(&self, peer: u64) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.nodes().any(|(id, _)| *id == peer) || self.sm.current().state.members.contains_key(&peer)
    }

    fn peers(&self) -> std::collections::HashMap<u64, std::net::SocketAddr> {
        self.sm
            .current()
            .state
            .members
            .values()
            .filter(|m| m.node_id != self.id)
            .filter_map(|m| m.raft_addr.parse().ok().map(|a| (m.node_id, a)))
            .collect()
    }

    fn registered(&self) -> bool {
        self.sm.current().state.members.contains_key(&self.id)
    }

    fn changed(&self) -> sync::transport::BoxFuture<()> {
        let mut rx = self.sm.subscribe();
        Box::pin(async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

impl Node {
    fn member(&self) -> Member {
        Member {
            node_id: self.cfg.node_id,
            raft_addr: self.cfg.raft_addr.to_string(),
            admin_addr: self.cfg.admin_addr.to_string(),
            bgp_next_hop: self.cfg.bgp_next_hop,
        }
    }

    /// Make sure this node is a voter and registered as a member: join
    /// through `join` addresses, or (as bootstrap leader) register itself.
    pub(crate) async fn register_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        // One request id per process: retries apply once, a later restart
        // (maybe with new addresses) registers again.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        loop {
            if self.shutting_down.load(Ordering::Relaxed) {
                return;
            }
            let state = self.sm.current();
            let registered = state.state.members.contains_key(&self.id());
            let voter = state
                .last_membership
                .membership()
                .voter_ids()
                .any(|v| v == self.id());
            if registered && voter {
                return;
            }
            let res = if voter || self.cfg.join.is_empty() {
                // A voter (the bootstrap node, or a joiner whose join call
                // failed after it was made a voter): register through the
                // leader — locally if this node leads, else at its admin API.
                let req = Request {
                    id: Some(format!("register-{}-{nonce}", self.id())),
                    command: Command::PutMember {
                        member: self.member(),
                    },
                    trace: None,
                };
                match self.write(req.clone()).await {
                    Ok(_) => Ok(()),
                    Err(WriteError::NotLeader {
                        leader: Some((leader, admin)),
                    }) if !admin.is_empty() => self
                        .client()
                        .for_node(leader)
                        .post_async::<_, Response>(&admin, "/command", &req, JOIN_CALL_TIMEOUT)
                        .await
                        .map(|_| ())
                        .map_err(|e| anyhow!("registering through the leader: {e}")),
                    Err(e) => Err(anyhow!("{e}")),
                }
            } else {
                self.join_through_peers().await
            };
            match res {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    // The leader answers after its own commit; wait (bounded)
                    // for this node's log to show it before asking again.
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(2)
                        && !self.shutting_down.load(Ordering::Relaxed)
                    {
                        let s = self.sm.current();
                        if s.state.members.contains_key(&self.id())
                            && s.last_membership
                                .membership()
                                .voter_ids()
                                .any(|v| v == self.id())
                        {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Err(e) => {
                    info!(error = %e, "not yet a registered voter; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn join_through_peers(&self) -> Result<()> {
        let member = self.member();
        let mut last = anyhow!("no join address");
        for addr in &self.cfg.join {
            match self
                .client()
                .post_async::<_, serde_json::Value>(
                    &addr.to_string(),
                    "/cluster/join",
                    &member,
                    JOIN_CALL_TIMEOUT,
                )
                .await
            {
                Ok(_) => {
                    info!(via = %addr, "joined the cluster");
                    return Ok(());
                }
                Err(e) => last = anyhow!("join via {addr}: {e}"),
            }
        }
        Err(last)
    }

    /// Leader side of a join: learner first (caught up), then voter, then
    /// registered as a member.
    #[instrument(skip_all, fields(joining = m.node_id))]
    pub async fn add_member(&self, m: Member) -> Result<Response, WriteError> {
        let node = BasicNode {
            addr: m.raft_addr.clone(),
        };
        let is_voter = self.voters().contains(&m.node_id);
        if !is_voter {
            self.raft
                .add_learner(m.node_id, node, false)
                .await
                .map_err(|e| map_membership_err(self, e))?;
            // Promote only a learner that has really replicated our log: one
            // that cannot be reached (or refuses our certificate) never
            // matches, and is taken out again.
            if let Err(e) = self.wait_caught_up(m.node_id, JOIN_CATCH_UP).await {
                let _ = self
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([m.node_id])))
                    .await;
                return Err(e);
            }
            self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([m.node_id])))
                .await?;
            info!(node = m.node_id, "added voter");
        } else {
            // A retried join (the joiner had not yet applied our answer):
            // the same member again changes nothing and takes no new epoch.
            let cur = self.sm.current();
            if cur.state.members.get(&m.node_id) == Some(&m) {
                return Ok(Response {
                    epoch: cur.state.epoch,
                    rejected: None,
                    backend_ids: Vec::new(),
                });
            }
        }
        self.write(Command::PutMember { member: m }.into()).await
    }

    /// A bounded membership change. openraft 0.9 may never answer a leader
    /// that removes itself (it steps down around the commit); the caller
    /// retries, and the retry on the new leader finds the change done.
    async fn change_membership(
        &self,
        change: ChangeMembers<u64, BasicNode>,
    ) -> Result<(), WriteError> {
        match tokio::time::timeout(
            MEMBERSHIP_CHANGE_TIMEOUT,
            self.raft.change_membership(change, false),
        )
        .await
        {
            Ok(r) => r.map(|_| ()).map_err(|e| map_membership_err(self, e)),
            Err(_) => Err(WriteError::NotLeader {
                leader: self.leader(),
            }),
        }
    }

    /// Wait until the leader's replication to `id` has matched its log.
    async fn wait_caught_up(&self, id: u64, timeout: Duration) -> Result<(), WriteError> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.raft.metrics().borrow().clone();
            let last = m.last_log_index.unwrap_or(0);
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index);
            if matched.is_some_and(|x| x + 1 >= last) {
                return Ok(());
            }
            if m.state != ServerState::Leader {
                return Err(WriteError::NotLeader {
                    leader: self.leader(),
                });
            }
            if Instant::now() > deadline {
                return Err(WriteError::Raft(format!(
                    "node {id} did not catch up within {timeout:?} (unreachable, or its \
                     certificate is not from this cluster's CA); matched {matched:?} of {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Leader side of leave/remove: out of the voters, then unregistered.
    #[instrument(skip_all, fields(leaving = node_id))]
    pub async fn remove_member(&self, node_id: u64) -> Result<Response, WriteError> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let known = membership.nodes().any(|(id, _)| *id == node_id);
        let voter = membership.voter_ids().any(|id| id == node_id);
        if known {
            let ids = BTreeSet::from([node_id]);
            // retain=false: a removed voter does not stay on as a learner.
            self.change_membership(if voter {
                ChangeMembers::RemoveVoters(ids)
            } else {
                ChangeMembers::RemoveNodes(ids)
            })
            .await?;
            info!(node = node_id, voter, "removed from the membership");
        }
        let state = self.sm.current();
        if !known && !state.state.members.contains_key(&node_id) {
            // Idempotent: a retried removal (its first answer lost) finds
            // the node gone already.
            info!(node = node_id, "not a member (already removed)");
            return Ok(Response {
                epoch: state.state.epoch,
                rejected: None,
                backend_ids: vec![],
            });
        }
        let resp = self.write(Command::RemoveMember { node_id }.into()).await?;
        Ok(resp)
    }

    /// Leave the cluster gracefully: ask the leader to remove this node,
    /// retrying through leader changes for up to 10 s.
    pub(crate) async fn leave(&self) -> Result<()> {
        if self.voters() == [self.id()] {
            info!("last voter of the cluster: stopping without leaving");
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = match self.leader() {
                Some((id, _)) if id == self.id() => self
                    .remove_member(self.id())
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow!("{e}")),
                Some((id, admin)) if !admin.is_empty() => self
                    .client()
                    .for_node(id)
                    .post_async::<_, serde_json::Value>(
                        &admin,
                        "/cluster/remove",
                        &holdfast_api::wire::RemoveRequest { node_id: self.id() },
                        Duration::from_secs(5),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow!("{e}")),
                _ => Err(anyhow!("no leader known")),
            };
            match res {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

fn map_membership_err(
    node: &Node,
    e: openraft::error::RaftError<u64, ClientWriteError<u64, BasicNode>>,
) -> WriteError {
    match e {
        openraft::error::RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            match f.leader_id {
                Some(_) => WriteError::NotLeader {
                    leader: node.leader(),
                },
                None => WriteError::NoLeader,
            }
        }
        other => WriteError::Raft(other.to_string()),
    }
}
