//! BGP announcement of the node's VIPs. The node decides *when* (ready: the
//! datapath programmed with the committed config, a Raft leader known,
//! conntrack warm join done); an [`Announcer`] does it. [`Bird`] drives a
//! BIRD 2 daemon through its control socket by enabling or disabling the
//! static protocols that carry the VIP routes (one per address family:
//! `vip`, `vip6`); another BGP agent can replace it behind the same trait.
//!
//! SNAT addresses: every node announces the SNAT pools (static protocols
//! `snat_pool`, `snat_pool6` in its BIRD config, a backup path to every
//! node) and its own SNAT addresses as host routes (`snat_own`,
//! `snat_own6`, which the node renders into `snat_routes_file`), so by the
//! longest prefix replies reach the address's owner while it lives, and
//! any survivor when it dies.

mod announce;
mod bird;
mod link;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use announce::{announce_loop, withdraw_now, Announcer, Readiness, ANNOUNCE_EVERY};
pub use bird::{check_protocol_name, render_own_routes, Bird};
pub use link::link_state;

/// `[bgp]` of node.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BgpSection {
    /// Announce through BIRD (off: the node never touches BGP).
    pub enabled: bool,
    pub bird_ctl: PathBuf,
    /// BIRD's static protocols that carry the VIP routes, one per address
    /// family (`vip` for IPv4, `vip6` for IPv6); enabled and disabled
    /// together.
    pub protocols: Vec<String>,
    /// After an agent restart that adopted a pinned, forwarding datapath
    /// while BIRD still announces: keep announcing for up to this long while
    /// the node catches up (Raft, warm join), instead of withdrawing and
    /// moving every flow away and back. 0 disables the grace.
    pub restart_grace_ms: u64,
    /// BIRD config file (included by the main one) that the node writes
    /// with its own SNAT addresses (protocols `snat_own`, `snat_own6`);
    /// none: the node announces no SNAT address of its own.
    pub snat_routes_file: Option<PathBuf>,
}

impl Default for BgpSection {
    fn default() -> Self {
        Self {
            enabled: false,
            bird_ctl: "/run/bird/bird.ctl".into(),
            protocols: vec!["vip".into()],
            restart_grace_ms: 10_000,
            snat_routes_file: None,
        }
    }
}
