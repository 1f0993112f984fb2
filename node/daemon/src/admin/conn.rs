//! What the admin listeners know of a connection, and their bounds
//! (shared by the listener and the routes that enforce them per request).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use holdfast_api::auth::{Authenticated, Refusal};

use crate::config::AdminSection;

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
    pub connection_lifetime: Duration,
}

impl From<&AdminSection> for Limits {
    fn from(a: &AdminSection) -> Self {
        Self {
            max_connections: a.max_connections,
            max_connections_per_ip: a.max_connections_per_ip,
            handshake_timeout: Duration::from_millis(a.handshake_timeout_ms),
            request_timeout: Duration::from_millis(a.request_timeout_ms),
            body_timeout: Duration::from_millis(a.body_timeout_ms),
            max_body_bytes: a.max_body_bytes,
            connection_lifetime: Duration::from_millis(a.connection_lifetime_ms),
        }
    }
}

/// What the TLS session of a connection proved (a request extension that
/// the authentication layer reads).
#[derive(Clone, Debug)]
pub struct ConnAuth {
    pub peer: SocketAddr,
    pub result: Arc<Result<Authenticated, Refusal>>,
}
