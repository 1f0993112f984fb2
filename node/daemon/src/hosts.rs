//! What the node offers the subsystems that run inside it, through their
//! own small traits: the health checks ([`holdfast_health::Host`]) and the
//! Kubernetes controller ([`holdfast_k8s::Host`]). Neither sees [`Node`].

use std::sync::Arc;

use holdfast_api::{client::Client, wire::HealthTable};
use holdfast_health::HealthState;
use raft_store::{state_machine::SmData, ClusterState, Request, Response};

use crate::node::Node;

impl holdfast_health::Host for Node {
    fn id(&self) -> u64 {
        Node::id(self)
    }

    fn config(&self) -> Arc<SmData> {
        self.sm.current()
    }

    fn health(&self) -> &HealthState {
        &self.health
    }

    fn is_leader(&self) -> bool {
        self.role() == "leader"
    }

    fn leader(&self) -> Option<(u64, String)> {
        Node::leader(self)
    }

    fn voters(&self) -> Vec<u64> {
        Node::voters(self)
    }

    fn client(&self) -> Client {
        Node::client(self)
    }

    fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        Node::shutdown_signal(self)
    }

    async fn commit(&self, req: Request) -> Result<Response, String> {
        self.write(req).await.map_err(|e| e.to_string())
    }
}

impl holdfast_k8s::Host for Node {
    fn id(&self) -> u64 {
        Node::id(self)
    }

    fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader == Some(Node::id(self)) && m.state == openraft::ServerState::Leader
    }

    async fn leadership_changed(&self) {
        let mut rx = self.raft.metrics();
        if rx.changed().await.is_err() {
            // Raft stopped: nothing changes any more.
            std::future::pending::<()>().await;
        }
    }

    fn is_shutting_down(&self) -> bool {
        Node::is_shutting_down(self)
    }

    async fn ensure_leading(&self) -> Result<(), String> {
        self.raft
            .ensure_linearizable()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn config(&self) -> Arc<SmData> {
        self.sm.current()
    }

    fn health_table(&self, state: &ClusterState) -> HealthTable {
        self.health.table(Node::id(self), state)
    }

    async fn commit(&self, req: Request) -> Result<Response, String> {
        self.write(req).await.map_err(|e| e.to_string())
    }

    async fn commit_pipelined(&self, reqs: Vec<Request>) -> Vec<Result<Response, String>> {
        self.write_pipelined(reqs)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    }
}
