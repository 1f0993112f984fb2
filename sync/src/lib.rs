//! Holdfast conntrack replication: every LB node sends the conntrack entries
//! its datapath creates to every peer, which writes them into its own map,
//! so flows that ECMP moves to another node after a failure find their
//! backend already there.
//!
//! - [`wire`]: the versioned, bounded wire format (bincode 2);
//! - [`convert`]: kernel entries ↔ wire entries, monotonic ↔ Unix time;
//! - [`merge`]: what is stored when a peer's entry meets a local one;
//! - [`session`]: the sans-IO protocol core (batching, sequence numbers,
//!   acks, resend, gap detection);
//! - [`apply`]: batched, merged writes into the conntrack map.
//!
//! - [`transport`]: the node's QUIC endpoint (mutual TLS with the cluster
//!   CA, certificates from `holdfast-pki`), shared with Raft;
//! - [`service`]: replication run over that endpoint, with membership
//!   supplied by the node ([`service::Membership`]).

pub mod apply;
pub mod convert;
pub mod merge;
pub mod refresh;
pub mod service;
pub mod session;
pub mod transport;
pub mod wire;
