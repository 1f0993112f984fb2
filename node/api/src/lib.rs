//! The admin API as its clients see it — what `clusterctl`, the nodes
//! (calling each other) and the tests share, and nothing of the daemon:
//!
//! - [`wire`]: the request and answer types of every endpoint;
//! - [`auth`]: roles and what each call needs, the admin TLS of both sides
//!   with refusals explained, certificate rotation;
//! - [`client`]: the blocking HTTPS client with client certificates.
//!
//! The certificates themselves (issuing, parsing) are the cluster PKI in
//! `holdfast-pki`, which the QUIC endpoint uses too.

pub mod auth;
pub mod client;
pub mod wire;
