//! The admin API: status, members, config, conntrack, writes (a
//! non-leader forwards them to the leader, one hop, on behalf of the
//! caller), join/remove, drain and `/metrics`.
//!
//! It is served over HTTPS on `admin_addr`, and every call is
//! authenticated by the client certificate of its TLS session and
//! authorized by the certificate's role (`holdfast_api::auth`); a refusal is
//! answered 401/403 (the reason in the body), counted in
//! `holdfast_admin_refused_total{reason}` and logged with the peer address
//! and certificate subject. `/metrics`, `/ready` and `/live` are also
//! served in plain HTTP on `metrics_addr` for Prometheus and the kubelet
//! ([`routes::plain_router`]); nothing there writes or shows conntrack.

pub mod conn;
pub mod render;
pub mod routes;
pub mod serve;
pub mod status;
