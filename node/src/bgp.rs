//! BGP announcement of the node's VIPs. The node decides *when* (ready: the
//! datapath programmed with the committed config, a Raft leader known,
//! conntrack warm join done); an [`Announcer`] does it. [`Bird`] drives a
//! BIRD 2 daemon through its control socket by enabling or disabling the
//! static protocols that carry the VIP routes (one per address family:
//! `vip`, `vip6`); another BGP agent can replace it behind the same trait.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Announces or withdraws this node's VIP routes.
pub trait Announcer: Send + Sync {
    fn announce(&self) -> Result<()>;
    fn withdraw(&self) -> Result<()>;
    fn is_announced(&self) -> Result<bool>;
}

/// BIRD 2 through its control socket (`bird -s PATH`).
#[derive(Clone, Debug)]
pub struct Bird {
    pub ctl: PathBuf,
    /// The protocols carrying the VIP routes (e.g. `protocol static vip`
    /// for IPv4 and `vip6` for IPv6), driven together.
    pub protocols: Vec<String>,
}

impl Bird {
    /// Run one CLI command; the reply lines, or the error BIRD gave.
    pub fn command(&self, cmd: &str) -> Result<Vec<String>> {
        let mut s = UnixStream::connect(&self.ctl).with_context(|| {
            format!("connecting to BIRD's control socket {}", self.ctl.display())
        })?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut greeting = String::new();
        r.read_line(&mut greeting)?;
        if !greeting.starts_with("0001 ") {
            bail!("unexpected BIRD greeting {greeting:?}");
        }
        s.write_all(format!("{cmd}\n").as_bytes())?;
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l)? == 0 {
                bail!("BIRD closed the control socket during {cmd:?}");
            }
            // Only the newline: a final line may be just "0000 ".
            let l = l.trim_end_matches(['\n', '\r']).to_string();
            let code = l.get(..4).filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
            let last = code.is_some() && l.as_bytes().get(4) == Some(&b' ');
            if let Some(c) = code {
                if c.starts_with('8') || c.starts_with('9') {
                    bail!("BIRD refused {cmd:?}: {}", l.get(5..).unwrap_or("").trim());
                }
            }
            lines.push(l);
            if last {
                return Ok(lines);
            }
        }
    }

    fn check_names(&self) -> Result<()> {
        if self.protocols.is_empty() {
            bail!("bgp.protocols is empty");
        }
        for p in &self.protocols {
            check_protocol_name(p)?;
        }
        Ok(())
    }
}

/// A BIRD protocol name: letters, digits, `_` (nothing BIRD's CLI would
/// read as more than a name).
pub fn check_protocol_name(p: &str) -> Result<()> {
    if p.is_empty() || p.len() > 64 || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("bgp.protocols: {p:?} is not a BIRD protocol name");
    }
    Ok(())
}

impl Announcer for Bird {
    fn announce(&self) -> Result<()> {
        self.check_names()?;
        for p in &self.protocols {
            self.command(&format!("enable {p}"))?;
        }
        Ok(())
    }

    /// Withdraw every family, even when one of them fails.
    fn withdraw(&self) -> Result<()> {
        self.check_names()?;
        let mut first_err = None;
        for p in &self.protocols {
            if let Err(e) = self.command(&format!("disable {p}")) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Announced only when every protocol is up (a half-announced node is
    /// announced again, which enables the missing one).
    fn is_announced(&self) -> Result<bool> {
        self.check_names()?;
        for p in &self.protocols {
            let lines = self.command(&format!("show protocols {p}"))?;
            let row = lines
                .iter()
                .find(|l| l.starts_with("1002-") || l.starts_with("1002 "))
                .ok_or_else(|| anyhow!("BIRD shows no protocol {p}"))?;
            // Name Proto Table State Since Info
            if row[5..].split_whitespace().nth(3) != Some("up") {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// (administratively up, carrier) of interface `name` in this network
/// namespace (SIOCGIFFLAGS; /sys may belong to another namespace).
pub fn link_state(name: &str) -> Result<(bool, bool)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("bad interface name {name:?}");
    }
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: fd is a socket, req a valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing our fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("no interface {name}: {err}");
    }
    // SAFETY: SIOCGIFFLAGS filled ifru_flags.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    Ok((flags & libc::IFF_UP != 0, flags & libc::IFF_RUNNING != 0))
}

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
}

impl Default for BgpSection {
    fn default() -> Self {
        Self {
            enabled: false,
            bird_ctl: "/run/bird/bird.ctl".into(),
            protocols: vec!["vip".into()],
            restart_grace_ms: 10_000,
        }
    }
}

/// What the node's readiness depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub shutting_down: bool,
    /// The operator drained the node (`clusterctl drain`).
    pub draining: bool,
    pub leader_known: bool,
    pub config_epoch: u64,
    pub applied_epoch: u64,
    /// The datapath is attached (when an interface is configured).
    pub datapath_attached: bool,
    /// Conntrack warm join done (or replication off).
    pub sync_ready: bool,
    /// The datapath health check passes (interface up, backends routable).
    pub healthy: bool,
}

impl Readiness {
    /// Announce only a node that forwards with the cluster's config and
    /// knows the cluster's flows; `Err` says why not.
    pub fn decide(&self) -> Result<(), &'static str> {
        if self.shutting_down {
            return Err("shutting down");
        }
        if self.draining {
            return Err("drained by the operator");
        }
        if !self.datapath_attached {
            return Err("datapath not attached");
        }
        if !self.healthy {
            return Err("datapath health check failed");
        }
        if !self.leader_known {
            return Err("no Raft leader known");
        }
        if self.config_epoch == 0 || self.applied_epoch != self.config_epoch {
            return Err("datapath not at the committed config epoch");
        }
        if !self.sync_ready {
            return Err("conntrack warm join not done");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_rules() {
        let ok = Readiness {
            shutting_down: false,
            draining: false,
            leader_known: true,
            config_epoch: 7,
            applied_epoch: 7,
            datapath_attached: true,
            sync_ready: true,
            healthy: true,
        };
        assert_eq!(ok.decide(), Ok(()));
        for (r, why) in [
            (
                Readiness {
                    shutting_down: true,
                    ..ok
                },
                "shutting down",
            ),
            (
                Readiness {
                    datapath_attached: false,
                    ..ok
                },
                "datapath not attached",
            ),
            (
                Readiness {
                    leader_known: false,
                    ..ok
                },
                "no Raft leader known",
            ),
            (
                Readiness {
                    applied_epoch: 6,
                    ..ok
                },
                "datapath not at the committed config epoch",
            ),
            (
                Readiness {
                    config_epoch: 0,
                    applied_epoch: 0,
                    ..ok
                },
                "datapath not at the committed config epoch",
            ),
            (
                Readiness {
                    sync_ready: false,
                    ..ok
                },
                "conntrack warm join not done",
            ),
            (
                Readiness {
                    healthy: false,
                    ..ok
                },
                "datapath health check failed",
            ),
            (
                Readiness {
                    draining: true,
                    ..ok
                },
                "drained by the operator",
            ),
        ] {
            assert_eq!(r.decide(), Err(why));
        }
    }

    #[test]
    fn protocol_names_are_checked_before_talking_to_bird() {
        let b = Bird {
            ctl: "/nonexistent".into(),
            protocols: vec!["vip".into(), "vip6; shutdown".into()],
        };
        assert!(b
            .announce()
            .unwrap_err()
            .to_string()
            .contains("not a BIRD protocol name"));
        let b = Bird {
            ctl: "/nonexistent/bird.ctl".into(),
            protocols: vec!["vip".into()],
        };
        assert!(b
            .announce()
            .unwrap_err()
            .to_string()
            .contains("control socket"));
    }
}
