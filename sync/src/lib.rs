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
//! The QUIC transport that runs sessions over the node's endpoint lives in
//! the node crate (`node/src/sync.rs`).

pub mod apply;
pub mod convert;
pub mod merge;
pub mod session;
pub mod wire;
