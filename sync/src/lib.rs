//! Holdfast conntrack replication: every LB node sends the conntrack entries
//! its datapath creates to every peer, which writes them into its own map,
//! so flows that ECMP moves to another node after a failure find their
//! backend already there.
//!
//! - [`wire`]: the versioned, bounded wire format (bincode 2);
//! - [`convert`]: kernel entries ↔ wire entries, monotonic ↔ Unix time;
//! - [`session`]: the sans-IO protocol core (batching, sequence numbers,
//!   acks, resend, gap detection);
//! - [`apply`]: peers' entries written into the conntrack map under the
//!   merge rule, a batch per syscall (the rule itself is the datapath's
//!   `holdfast_ct_apply` program, bpf/ct_apply.h).
//!
//! - [`transport`]: the node's QUIC endpoint (mutual TLS with the cluster
//!   CA, certificates from `holdfast-pki`), shared with Raft;
//! - [`service`]: replication run over that endpoint, with membership
//!   supplied by the node ([`service::Membership`]).

pub mod apply;
pub mod convert;
pub mod refresh;
pub mod service;
pub mod session;
pub mod transport;
pub mod wire;
