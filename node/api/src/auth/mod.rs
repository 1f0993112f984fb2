//! Control-plane security, shared by the admin API (server side) and
//! clusterctl and the nodes (client side): who a certificate names and
//! which role it carries ([`roles`]), what each call needs, the TLS
//! configurations of both sides with errors explained ([`tls`]), and
//! certificate rotation without restart ([`reload`]).
//!
//! The certificates themselves (issuing, parsing) are the cluster PKI in
//! `holdfast-pki`, which the QUIC endpoint uses too.

pub mod reload;
pub mod roles;
pub mod tls;

pub use reload::{CertFiles, Change, Watcher};
pub use roles::{command_need, Caller, Need, Refusal, Role};
pub use tls::{AdminServerTls, Authenticated};
