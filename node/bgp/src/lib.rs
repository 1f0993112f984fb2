//! BGP announcement of the node's VIPs. The node decides *when* (ready: the
//! datapath programmed with the committed config, a Raft leader known,
//! conntrack warm join done); an [`Announcer`] does it, for the speaker
//! node.toml names (`[bgp] speaker`). [`Bird`] drives a BIRD 2 daemon
//! through its control socket by enabling or disabling the static protocols
//! that carry the VIP routes (one per address family: `vip`, `vip6`);
//! [`Frr`] drives FRR through `vtysh`, adding and removing the `network`
//! statements of its prefixes in `router bgp`.
//!
//! SNAT addresses: every node announces the SNAT pools (static protocols
//! `snat_pool`, `snat_pool6` in its BIRD config, a backup path to every
//! node) and its own SNAT addresses as host routes (`snat_own`,
//! `snat_own6`, which the node renders into `snat_routes_file`), so by the
//! longest prefix replies reach the address's owner while it lives, and
//! any survivor when it dies.

mod announce;
mod bird;
mod frr;
mod link;
mod policy;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use announce::{announce_loop, withdraw_now, Announcer, Readiness, ANNOUNCE_EVERY};
pub use bird::{check_protocol_name, render_own_routes, render_state, Bird};
pub use frr::{check_pathspace, network_commands, parse_networks, parse_prefix, Frr};
pub use link::link_state;
pub use policy::{ExportPolicy, PoolPolicy, FRR_ROUTE_MAP};

/// The BGP speaker a node drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    #[default]
    Bird,
    Frr,
}

impl std::str::FromStr for Speaker {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bird" => Ok(Speaker::Bird),
            "frr" => Ok(Speaker::Frr),
            other => Err(format!("speaker {other:?}: use bird or frr")),
        }
    }
}

impl std::fmt::Display for Speaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Speaker::Bird => "bird",
            Speaker::Frr => "frr",
        })
    }
}

/// `[bgp]` of node.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BgpSection {
    /// Announce (off: the node never touches BGP).
    pub enabled: bool,
    /// Which speaker: `bird` (BIRD 2, its control socket) or `frr` (FRR,
    /// through vtysh).
    pub speaker: Speaker,
    /// BIRD: its control socket.
    pub bird_ctl: PathBuf,
    /// BIRD's static protocols that carry the VIP routes, one per address
    /// family (`vip` for IPv4, `vip6` for IPv6); enabled and disabled
    /// together.
    pub protocols: Vec<String>,
    /// FRR: the vtysh program.
    pub vtysh: PathBuf,
    /// FRR: the instance's pathspace (`vtysh -N`; none: the default
    /// instance).
    pub frr_pathspace: Option<String>,
    /// FRR: the AS number of its `router bgp`.
    pub asn: u32,
    /// FRR: the prefixes announced while the node is ready (`network`
    /// statements): the VIP prefixes and, for SNAT, the SNAT pools (the
    /// node's own SNAT addresses go with them as host routes).
    pub prefixes: Vec<String>,
    /// After an agent restart that adopted a pinned, forwarding datapath
    /// while BIRD still announces: keep announcing for up to this long while
    /// the node catches up (Raft, warm join), instead of withdrawing and
    /// moving every flow away and back. 0 disables the grace.
    pub restart_grace_ms: u64,
    /// BIRD config file (included by the main one) that the node writes
    /// with its own SNAT addresses (protocols `snat_own`, `snat_own6`);
    /// none: the node announces no SNAT address of its own.
    pub snat_routes_file: Option<PathBuf>,
    /// BIRD config file (included first by the main one) where the node
    /// writes `define HOLDFAST_WITHDRAWN = 0|1;` whenever it announces or
    /// withdraws; the static protocols say `disabled HOLDFAST_WITHDRAWN;`,
    /// so a restarted BIRD (graceful restart) announces exactly what the
    /// node did. None: the protocols are plain `disabled;` and a restarted
    /// BIRD announces only once the node enables them again.
    pub bird_state_file: Option<PathBuf>,
    /// FRR: save the running config (`write memory`) after each change of
    /// the node's `network` statements, so a restarted bgpd (graceful
    /// restart) loads them with the rest of frr.conf before its End-of-RIB.
    pub frr_save: bool,
    /// What `clusterctl drain` does: withdraw the prefixes (`withdraw`),
    /// or keep announcing them with the GRACEFUL_SHUTDOWN community
    /// (`graceful-shutdown`, RFC 8326: routers that honour it prefer the
    /// other nodes, and still reach this one if no other is left).
    pub drain: DrainMode,
}

/// How a drained node leaves the routers' paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainMode {
    #[default]
    Withdraw,
    GracefulShutdown,
}

impl std::str::FromStr for DrainMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "withdraw" => Ok(DrainMode::Withdraw),
            "graceful-shutdown" => Ok(DrainMode::GracefulShutdown),
            other => Err(format!(
                "drain {other:?}: use withdraw or graceful-shutdown"
            )),
        }
    }
}

impl std::fmt::Display for DrainMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrainMode::Withdraw => "withdraw",
            DrainMode::GracefulShutdown => "graceful-shutdown",
        })
    }
}

impl Default for BgpSection {
    fn default() -> Self {
        Self {
            enabled: false,
            speaker: Speaker::Bird,
            bird_ctl: "/run/bird/bird.ctl".into(),
            protocols: vec!["vip".into()],
            vtysh: "vtysh".into(),
            frr_pathspace: None,
            asn: 0,
            prefixes: Vec::new(),
            restart_grace_ms: 10_000,
            snat_routes_file: None,
            bird_state_file: None,
            frr_save: true,
            drain: DrainMode::Withdraw,
        }
    }
}

impl BgpSection {
    /// The announcer of the configured speaker (Err names the bad field).
    pub fn announcer(&self) -> anyhow::Result<std::sync::Arc<dyn Announcer>> {
        Ok(match self.speaker {
            Speaker::Bird => {
                if self.protocols.is_empty() {
                    anyhow::bail!("bgp.protocols: name at least one BIRD protocol");
                }
                for p in &self.protocols {
                    check_protocol_name(p)?;
                }
                std::sync::Arc::new(Bird::new(
                    self.bird_ctl.clone(),
                    self.protocols.clone(),
                    self.snat_routes_file.clone(),
                    self.bird_state_file.clone(),
                ))
            }
            Speaker::Frr => std::sync::Arc::new(
                Frr::new(
                    self.vtysh.clone(),
                    self.frr_pathspace.clone(),
                    self.asn,
                    &self.prefixes,
                )?
                .saving(self.frr_save),
            ),
        })
    }
}
