//! holdfast-node: an LB node of a Holdfast cluster. Raft (openraft on the
//! `raft-store` crate) over the node's QUIC endpoint with mutual TLS holds
//! the cluster config; every committed epoch is programmed into the XDP
//! datapath; an admin API serves status, writes and metrics; `clusterctl`
//! is the operator's CLI.

pub mod api;
pub mod auth;
pub mod bgp;
pub mod client;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod decap_agent;
pub mod health;
pub mod k8s;
pub mod metrics;
pub mod node;
pub mod raft_net;
pub mod telemetry;
pub mod testing;
pub mod top;
pub mod wire;

pub use sync::{service as replication, tls, transport};

pub use node::Node;
