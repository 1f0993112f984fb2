//! holdfast-node: an LB node of a Holdfast cluster, and the one crate that
//! wires the others. Raft (openraft on the `raft-store` crate) over the
//! node's QUIC endpoint (`sync::transport`) with mutual TLS holds the
//! cluster config; every committed epoch is programmed into the XDP
//! datapath (`datapath-ebpf`); conntrack entries are replicated to peers
//! (`sync`); the admin API ([`admin`]) serves status, writes and metrics to
//! `clusterctl` and to other nodes (`holdfast-api`); the VIPs are announced
//! over BGP when the node is ready (`holdfast-bgp`); backend health checks
//! (`holdfast-health`) and the Kubernetes controller (`holdfast-k8s`) run
//! inside it, reaching the node only through their `Host` traits
//! ([`hosts`]).
//!
//! - [`node`]: the node's state and what every part asks of it (roles,
//!   leader, writes through Raft);
//! - [`lifecycle`]: start (wiring every part) and shutdown;
//! - [`membership`]: join, leave, remove, registration;
//! - [`datapath`]: programming committed epochs, the datapath health check;
//! - [`raft_net`], [`credentials`], [`config`], [`metrics`], [`telemetry`];
//! - [`daemon`]: the `holdfast-node` entry point; [`testing`]: in-process
//!   clusters for tests and benches.

pub mod admin;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod datapath;
pub mod hosts;
pub mod lifecycle;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod raft_net;
pub mod tables;
pub mod telemetry;
pub mod testing;
