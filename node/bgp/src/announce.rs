//! When to announce and how: the readiness rule, the [`Announcer`] trait
//! every BGP speaker driver implements, and the loop that keeps the
//! announcement in line with readiness.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use tracing::{info, warn};

use crate::policy::ExportPolicy;

/// Announces or withdraws this node's VIP routes.
pub trait Announcer: Send + Sync {
    fn announce(&self) -> Result<()>;
    fn withdraw(&self) -> Result<()>;
    fn is_announced(&self) -> Result<bool>;
    /// Make the node's own host routes (its SNAT addresses) these,
    /// announced with the rest from the next `announce`. Called only while
    /// withdrawn (a speaker may reload its config). Returns whether the
    /// speaker's config changed.
    fn set_own_routes(&self, _addrs: &[std::net::IpAddr]) -> Result<bool> {
        Ok(false)
    }
    /// Whether the speaker already has exactly these own routes (a
    /// restarted agent keeps announcing if so).
    fn has_own_routes(&self, _addrs: &[std::net::IpAddr]) -> bool {
        true
    }
    /// Attach these attributes to what the node announces (VIP pools'
    /// communities and local preference, graceful shutdown), announced or
    /// not, without touching a session. Returns whether the speaker's
    /// config changed.
    fn set_policy(&self, _policy: &ExportPolicy) -> Result<bool> {
        Ok(false)
    }
}

/// What the node's readiness depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub shutting_down: bool,
    /// The operator drained the node (`clusterctl drain`).
    pub draining: bool,
    /// A drain keeps announcing, with the GRACEFUL_SHUTDOWN community
    /// (`[bgp] drain = "graceful-shutdown"`), instead of withdrawing.
    pub drain_graceful_shutdown: bool,
    pub leader_known: bool,
    pub config_epoch: u64,
    pub applied_epoch: u64,
    /// The datapath is attached (when an interface is configured).
    pub datapath_attached: bool,
    /// Conntrack warm join done (or replication off).
    pub sync_ready: bool,
    /// The datapath health check passes (interface up, backends routable).
    pub healthy: bool,
    /// The node is a registered member of the config (so it has its SNAT
    /// addresses, which are assigned at registration).
    pub registered: bool,
}

impl Readiness {
    /// Announce only a node that forwards with the cluster's config and
    /// knows the cluster's flows; `Err` says why not.
    pub fn decide(&self) -> Result<(), &'static str> {
        if self.shutting_down {
            return Err("shutting down");
        }
        if self.draining && !self.drain_graceful_shutdown {
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
        if !self.registered {
            return Err("not yet a registered member");
        }
        Ok(())
    }
}

/// How often the announce loop compares readiness with the announcement.
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);
/// Every this many rounds the loop asks the speaker what it announces.
const VERIFY_EVERY: u64 = 10;

/// Announce when ready, withdraw when not (every [`ANNOUNCE_EVERY`]), until
/// the task is aborted. `announced` mirrors what the speaker does (the
/// node's status shows it).
///
/// It starts from what the speaker really does: after an agent restart it
/// may still announce a datapath that never stopped forwarding. If so and
/// the datapath was `adopted` from pins, the announcement is kept while
/// the node catches up, for up to `restart_grace` (unless it shuts down).
/// `own_routes` are the node's own host routes (its SNAT addresses; None
/// while it does not know them): a change is applied while withdrawn.
/// `policy` is what the node attaches to what it announces (None while it
/// does not know): a change is applied at once, announced or not.
pub async fn announce_loop(
    announcer: Arc<dyn Announcer>,
    readiness: impl Fn() -> Readiness + Send,
    own_routes: impl Fn() -> Option<Vec<std::net::IpAddr>> + Send,
    policy: impl Fn() -> Option<ExportPolicy> + Send,
    adopted: bool,
    restart_grace: Duration,
    announced: Arc<AtomicBool>,
) {
    let a = announcer.clone();
    let initially = tokio::task::spawn_blocking(move || a.is_announced())
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(false);
    let grace_until = (initially && adopted).then(|| Instant::now() + restart_grace);
    if initially {
        info!(
            adopted,
            grace_ms = grace_until.map(|_| restart_grace.as_millis() as u64),
            "the BGP speaker already announces the VIPs"
        );
    }
    announced.store(initially, Ordering::Relaxed);
    let mut was_ready = false;
    // The own routes the speaker has, once known to be current.
    let mut routes: Option<Vec<std::net::IpAddr>> = None;
    // The policy the speaker has, once set; when setting it last failed
    // (tried again every VERIFY_EVERY ticks, not every tick).
    let mut applied: Option<ExportPolicy> = None;
    let mut policy_failed: Option<u64> = None;
    let mut tick: u64 = 0;
    loop {
        tick += 1;
        // Every VERIFY_EVERY ticks: does the speaker still do what we
        // believe? (A reloaded or restarted speaker is back at its config:
        // withdrawn.) A difference is corrected by the rest of the loop.
        if tick.is_multiple_of(VERIFY_EVERY) {
            let a = announcer.clone();
            if let Ok(Ok(real)) = tokio::task::spawn_blocking(move || a.is_announced()).await {
                if real != announced.load(Ordering::Relaxed) {
                    warn!(
                        announced = real,
                        "the BGP speaker's state changed behind the node (reload or restart)"
                    );
                    announced.store(real, Ordering::Relaxed);
                }
            }
        }
        // (None: the node does not know yet, e.g. before its config loaded.)
        let desired = own_routes();
        if let Some(desired) = desired.filter(|d| routes.as_ref() != Some(d)) {
            if routes.is_none() && announcer.has_own_routes(&desired) {
                routes = Some(desired.clone());
            } else {
                // New own routes (the node's SNAT addresses changed): the
                // speaker reloads its config while withdrawn, then the node
                // announces again when ready.
                if announced.load(Ordering::Relaxed) {
                    info!("own routes change: withdrawing to reload the speaker's config");
                    withdraw_now(announcer.clone()).await;
                    announced.store(false, Ordering::Relaxed);
                }
                let (a, d) = (announcer.clone(), desired.clone());
                match tokio::task::spawn_blocking(move || a.set_own_routes(&d)).await {
                    Ok(Ok(changed)) => {
                        info!(routes = ?desired, changed, "own routes set");
                        routes = Some(desired);
                    }
                    Ok(Err(e)) => {
                        warn!(error = %format!("{e:#}"), "BGP: setting own routes failed");
                        tokio::time::sleep(ANNOUNCE_EVERY).await;
                        continue;
                    }
                    Err(e) => warn!(error = %e, "BGP task failed"),
                }
            }
        }
        let retry = policy_failed.is_none_or(|t| tick >= t + VERIFY_EVERY);
        if let Some(p) = policy().filter(|p| retry && applied.as_ref() != Some(p)) {
            let (a, q) = (announcer.clone(), p.clone());
            match tokio::task::spawn_blocking(move || a.set_policy(&q)).await {
                Ok(Ok(changed)) => {
                    info!(
                        pools = p.pools.len(),
                        graceful_shutdown = p.graceful_shutdown,
                        changed,
                        "BGP export policy set"
                    );
                    applied = Some(p);
                    policy_failed = None;
                }
                Ok(Err(e)) => {
                    warn!(error = %format!("{e:#}"), "BGP: setting the export policy failed");
                    policy_failed = Some(tick);
                }
                Err(e) => {
                    warn!(error = %e, "BGP task failed");
                    policy_failed = Some(tick);
                }
            }
        }
        let mut want = readiness().decide();
        was_ready |= want.is_ok();
        // Restart grace: the adopted datapath forwards with its pinned
        // config and conntrack; keep it announced until the node is
        // ready (or the grace ends), unless it is shutting down.
        if let (Err(why), Some(until)) = (&want, grace_until) {
            if !was_ready && *why != "shutting down" && Instant::now() < until {
                want = Ok(());
            }
        }
        let have = announced.load(Ordering::Relaxed);
        let a = announcer.clone();
        let res = match (&want, have) {
            (Ok(()), false) => tokio::task::spawn_blocking(move || a.announce())
                .await
                .map(|r| r.map(|_| true)),
            (Err(_), true) => tokio::task::spawn_blocking(move || a.withdraw())
                .await
                .map(|r| r.map(|_| false)),
            _ => Ok(Ok(have)),
        };
        match res {
            Ok(Ok(now)) => {
                if now != have {
                    info!(announced = now, reason = ?want.err(), "BGP announcement changed");
                }
                announced.store(now, Ordering::Relaxed);
            }
            Ok(Err(e)) => warn!(error = %format!("{e:#}"), "BGP: speaker command failed"),
            Err(e) => warn!(error = %e, "BGP task failed"),
        }
        tokio::time::sleep(ANNOUNCE_EVERY).await;
    }
}

/// Withdraw now (SIGTERM, shutdown): the first thing a stopping node does.
pub async fn withdraw_now(announcer: Arc<dyn Announcer>) {
    match tokio::task::spawn_blocking(move || announcer.withdraw()).await {
        Ok(Ok(())) => info!("BGP: VIPs withdrawn"),
        Ok(Err(e)) => warn!(error = %format!("{e:#}"), "BGP: withdraw failed"),
        Err(e) => warn!(error = %e, "BGP: withdraw task failed"),
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
            drain_graceful_shutdown: false,
            leader_known: true,
            config_epoch: 7,
            applied_epoch: 7,
            datapath_attached: true,
            sync_ready: true,
            healthy: true,
            registered: true,
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
            (
                Readiness {
                    draining: true,
                    drain_graceful_shutdown: true,
                    shutting_down: true,
                    ..ok
                },
                "shutting down",
            ),
            (
                Readiness {
                    registered: false,
                    ..ok
                },
                "not yet a registered member",
            ),
        ] {
            assert_eq!(r.decide(), Err(why));
        }
        // A graceful-shutdown drain keeps announcing (with the community).
        assert_eq!(
            Readiness {
                draining: true,
                drain_graceful_shutdown: true,
                ..ok
            }
            .decide(),
            Ok(())
        );
    }
}
