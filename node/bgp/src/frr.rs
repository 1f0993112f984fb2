//! The FRR driver: adds and removes `network` statements of FRR's `router
//! bgp` through `vtysh`, the way operators' tooling drives FRR. FRR's own
//! configuration (deploy/frr) holds the sessions, BFD and policies; the
//! node only ever touches the statements of its prefixes, so no session is
//! reset by anything it does (a `network` change is an UPDATE, not a
//! session change).
//!
//! Which statements are the node's: those of its configured prefixes (the
//! VIP prefixes and SNAT pools) and host routes inside them (its own SNAT
//! addresses) — found in FRR's running config, so a withdraw needs no
//! memory of what was announced (a restarted agent withdraws what the
//! previous one announced).

use std::{
    collections::BTreeSet,
    io::Read,
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    announce::Announcer,
    policy::{ExportPolicy, Prefix, FRR_ROUTE_MAP},
};

/// FRR through `vtysh`.
#[derive(Debug)]
pub struct Frr {
    pub vtysh: PathBuf,
    /// `vtysh -N`: the FRR instance's pathspace (several FRR instances on
    /// one host); none: the default instance.
    pub pathspace: Option<String>,
    /// The AS number of FRR's `router bgp`.
    pub asn: u32,
    /// What the node announces when ready: its VIP prefixes and SNAT
    /// pools.
    pub prefixes: Vec<Prefix>,
    /// The node's own host routes (its SNAT addresses), announced with the
    /// prefixes.
    own: Mutex<Vec<IpAddr>>,
    /// `write memory` after each change of the node's statements.
    pub save: bool,
    /// The export policy FRR has (route-map `HOLDFAST-EXPORT`, which the
    /// node's statements name); None until this process set it.
    policy: Mutex<Option<ExportPolicy>>,
}

/// How long one vtysh run may take.
const VTYSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A pathspace name: letters, digits, `-`, `_` (it names directories).
pub fn check_pathspace(p: &str) -> Result<()> {
    if p.is_empty()
        || p.len() > 64
        || !p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("bgp.frr_pathspace: {p:?} is not a pathspace name (letters, digits, - and _)");
    }
    Ok(())
}

/// Parse `a.b.c.d/len` or `x::/len` with its network address.
pub fn parse_prefix(s: &str) -> Result<Prefix> {
    raft_store::cluster::parse_cidr(s.trim()).map_err(|e| anyhow!("{e}"))
}

fn host(addr: IpAddr) -> Prefix {
    (addr, if addr.is_ipv4() { 32 } else { 128 })
}

/// Is prefix `p` inside `outer` (or equal to it)?
fn within(p: &Prefix, outer: &Prefix) -> bool {
    p.1 >= outer.1 && raft_store::cluster::cidr_contains(*outer, p.0)
}

/// The `network` statements of `router bgp {asn}` in FRR's running config
/// (both address families). Err when FRR has no such `router bgp`.
pub fn parse_networks(running: &str, asn: u32) -> Result<BTreeSet<Prefix>> {
    Ok(parse_statements(running, asn)?
        .into_iter()
        .map(|(p, _)| p)
        .collect())
}

/// The `network` statements of `router bgp {asn}` with whether each names
/// the node's route-map.
fn parse_statements(running: &str, asn: u32) -> Result<BTreeSet<(Prefix, bool)>> {
    let head = format!("router bgp {asn}");
    let mut inside = false;
    let mut found = false;
    let mut out = BTreeSet::new();
    for line in running.lines() {
        if !inside {
            if line.trim_end() == head {
                inside = true;
                found = true;
            }
            continue;
        }
        // The block ends at its unindented `exit` (or the next top-level
        // statement of an older FRR that prints none).
        if !line.starts_with(' ') && !line.trim().is_empty() && line.trim() != "!" {
            inside = false;
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["network", p, rest @ ..] = w.as_slice() {
            let ours = rest == ["route-map", FRR_ROUTE_MAP];
            out.insert((parse_prefix(p)?, ours));
        }
    }
    if !found {
        bail!(
            "FRR's running config has no `router bgp {asn}` (load FRR's configuration first: deploy/frr)"
        );
    }
    Ok(out)
}

/// The vtysh commands that add the statements of `add` (naming the
/// node's route-map) and remove those of `remove`, in one session.
pub fn network_commands(asn: u32, add: &[Prefix], remove: &[Prefix]) -> Vec<String> {
    let mut cmds = vec![
        "configure terminal".to_string(),
        format!("router bgp {asn}"),
    ];
    for (af, v4) in [("ipv4", true), ("ipv6", false)] {
        let family = |ps: &[Prefix]| -> Vec<Prefix> {
            ps.iter().filter(|p| p.0.is_ipv4() == v4).copied().collect()
        };
        let (plus, minus) = (family(add), family(remove));
        if plus.is_empty() && minus.is_empty() {
            continue;
        }
        cmds.push(format!("address-family {af} unicast"));
        for (a, l) in plus {
            cmds.push(format!("network {a}/{l} route-map {FRR_ROUTE_MAP}"));
        }
        for (a, l) in minus {
            cmds.push(format!("no network {a}/{l}"));
        }
        cmds.push("exit-address-family".into());
    }
    cmds
}

impl Frr {
    pub fn new(
        vtysh: PathBuf,
        pathspace: Option<String>,
        asn: u32,
        prefixes: &[String],
    ) -> Result<Self> {
        if let Some(p) = &pathspace {
            check_pathspace(p)?;
        }
        if asn == 0 {
            bail!("bgp.asn: FRR's `router bgp` AS number is needed (1..=4294967295)");
        }
        if prefixes.is_empty() {
            bail!("bgp.prefixes: name the VIP prefixes (and SNAT pools) to announce");
        }
        let prefixes = prefixes
            .iter()
            .map(|p| parse_prefix(p).context("bgp.prefixes"))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vtysh,
            pathspace,
            asn,
            prefixes,
            own: Mutex::new(Vec::new()),
            save: false,
            policy: Mutex::new(None),
        })
    }

    /// Save the running config after each change (`[bgp] frr_save`).
    pub fn saving(mut self, save: bool) -> Self {
        self.save = save;
        self
    }

    /// Apply `cmds` (a change of the node's statements or route-map) and,
    /// if asked, save the running config in the same vtysh run: a bgpd
    /// that restarts loads frr.conf, and with it what the node announces
    /// now.
    fn change(&self, mut cmds: Vec<String>) -> Result<()> {
        if self.save {
            if cmds.last().map(String::as_str) != Some("end") {
                cmds.push("end".into());
            }
            cmds.push("write memory".into());
        }
        self.vtysh(&cmds)?;
        Ok(())
    }

    /// Run vtysh with these commands; its output, or an error with it.
    pub fn vtysh(&self, cmds: &[String]) -> Result<String> {
        let mut c = Command::new(&self.vtysh);
        if let Some(p) = &self.pathspace {
            c.arg("-N").arg(p);
        }
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} (is FRR installed?)", self.vtysh.display()))?;
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if t0.elapsed() > VTYSH_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!("vtysh took longer than {VTYSH_TIMEOUT:?}: {cmds:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut out)?;
        }
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        // vtysh answers a refused command with a line starting with "%"
        // (and, for some, a non-zero exit).
        let refused = out
            .lines()
            .chain(err.lines())
            .find(|l| l.trim_start().starts_with('%'));
        if !status.success() || refused.is_some() {
            bail!(
                "FRR refused {cmds:?} ({status}): {}",
                refused.unwrap_or(err.trim())
            );
        }
        Ok(out)
    }

    /// The node's statements in FRR's running config.
    fn ours(&self) -> Result<BTreeSet<Prefix>> {
        Ok(self.statements()?.into_iter().map(|(p, _)| p).collect())
    }

    /// The node's statements, with whether each names its route-map.
    fn statements(&self) -> Result<BTreeSet<(Prefix, bool)>> {
        let running = self.vtysh(&["show running-config".into()])?;
        Ok(parse_statements(&running, self.asn)?
            .into_iter()
            .filter(|(p, _)| self.prefixes.iter().any(|o| within(p, o)))
            .collect())
    }

    /// Make the route-map the policy, then save.
    fn apply_policy(&self, policy: &ExportPolicy) -> Result<()> {
        let running = self.vtysh(&["show running-config".into()])?;
        self.change(policy.frr_commands(&running))?;
        *self.policy.lock().expect("policy") = Some(policy.clone());
        Ok(())
    }

    fn wanted(&self) -> BTreeSet<Prefix> {
        let own = self.own.lock().expect("own routes");
        self.prefixes
            .iter()
            .copied()
            .chain(own.iter().map(|a| host(*a)))
            .collect()
    }
}

impl Announcer for Frr {
    fn announce(&self) -> Result<()> {
        // The route-map the statements name must exist first (a statement
        // naming a missing one is not announced).
        if self.policy.lock().expect("policy").is_none() {
            self.apply_policy(&ExportPolicy::default())?;
        }
        let want = self.wanted();
        let statements = self.statements()?;
        let have: BTreeSet<Prefix> = statements.iter().map(|(p, _)| *p).collect();
        // Missing, or there without the route-map (an older node's).
        let add: Vec<Prefix> = want
            .iter()
            .filter(|p| !statements.contains(&(**p, true)))
            .copied()
            .collect();
        // Host routes that are no longer the node's own.
        let stale: Vec<Prefix> = have.difference(&want).copied().collect();
        if !add.is_empty() || !stale.is_empty() {
            self.change(network_commands(self.asn, &add, &stale))?;
        }
        Ok(())
    }

    fn withdraw(&self) -> Result<()> {
        let have: Vec<Prefix> = self.ours()?.into_iter().collect();
        if !have.is_empty() {
            self.change(network_commands(self.asn, &[], &have))?;
        }
        Ok(())
    }

    fn is_announced(&self) -> Result<bool> {
        let have = self.ours()?;
        Ok(self.wanted().is_subset(&have))
    }

    fn set_policy(&self, policy: &ExportPolicy) -> Result<bool> {
        if self.policy.lock().expect("policy").as_ref() == Some(policy) {
            return Ok(false);
        }
        self.apply_policy(policy)?;
        Ok(true)
    }

    /// Own routes must lie inside a configured prefix (a SNAT pool):
    /// that is how a withdraw finds them.
    fn set_own_routes(&self, addrs: &[IpAddr]) -> Result<bool> {
        for a in addrs {
            if !self.prefixes.iter().any(|p| within(&host(*a), p)) {
                bail!("bgp.prefixes must include the SNAT pools: {a} is in none of them");
            }
        }
        let mut own = self.own.lock().expect("own routes");
        let changed = *own != addrs;
        *own = addrs.to_vec();
        Ok(changed)
    }

    fn has_own_routes(&self, addrs: &[IpAddr]) -> bool {
        let Ok(have) = self.ours() else { return false };
        let hosts: BTreeSet<Prefix> = have
            .into_iter()
            .filter(|p| !self.prefixes.contains(p))
            .collect();
        let ok = hosts == addrs.iter().map(|a| host(*a)).collect();
        if ok {
            *self.own.lock().expect("own routes") = addrs.to_vec();
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: &str = "Building configuration...

Current configuration:
!
frr version 8.4.4
frr defaults datacenter
!
router bgp 65100
 bgp router-id 10.77.0.11
 no bgp network import-check
 neighbor 10.77.0.1 remote-as 65000
 !
 address-family ipv4 unicast
  network 10.200.0.0/24
  network 10.200.1.3/32
  network 192.0.2.0/24 route-map X
 exit-address-family
 !
 address-family ipv6 unicast
  network fd00:200::/120
  neighbor 10.77.0.1 activate
 exit-address-family
exit
!
router bgp 65200 vrf blue
 address-family ipv4 unicast
  network 10.9.9.0/24
 exit-address-family
exit
!
route-map HOLDFAST-IN deny 10
exit
!
end
";

    #[test]
    fn the_running_config_is_read_per_router() {
        let n = parse_networks(RUNNING, 65100).unwrap();
        let want: BTreeSet<Prefix> = [
            "10.200.0.0/24",
            "10.200.1.3/32",
            "192.0.2.0/24",
            "fd00:200::/120",
        ]
        .iter()
        .map(|p| parse_prefix(p).unwrap())
        .collect();
        assert_eq!(n, want);
        let e = parse_networks(RUNNING, 65101).unwrap_err().to_string();
        assert!(e.contains("router bgp 65101"), "{e}");
    }

    #[test]
    fn commands_and_bad_settings() {
        let v4 = parse_prefix("10.200.0.0/24").unwrap();
        let v6 = parse_prefix("fd00:200::/120").unwrap();
        let v4b = parse_prefix("10.200.1.3/32").unwrap();
        assert_eq!(
            network_commands(65100, &[v4b], &[v4]),
            [
                "configure terminal",
                "router bgp 65100",
                "address-family ipv4 unicast",
                "network 10.200.1.3/32 route-map HOLDFAST-EXPORT",
                "no network 10.200.0.0/24",
                "exit-address-family",
            ]
        );
        assert_eq!(
            network_commands(65100, &[], &[v4, v6]),
            [
                "configure terminal",
                "router bgp 65100",
                "address-family ipv4 unicast",
                "no network 10.200.0.0/24",
                "exit-address-family",
                "address-family ipv6 unicast",
                "no network fd00:200::/120",
                "exit-address-family",
            ]
        );
        for (bad, why) in [
            ("10.200.0.1/24", "host bits"),
            ("10.200.0.0", "not a CIDR"),
            ("10.200.0.0/33", "prefix length 33"),
        ] {
            let e = parse_prefix(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = Frr::new(
            "vtysh".into(),
            Some("a/b".into()),
            65100,
            &["10.0.0.0/8".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("frr_pathspace"), "{e}");
        let e = Frr::new("vtysh".into(), None, 0, &["10.0.0.0/8".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bgp.asn"), "{e}");
        let f = Frr::new("vtysh".into(), None, 65100, &["10.200.1.0/28".into()]).unwrap();
        assert!(f
            .set_own_routes(&["10.9.0.1".parse().unwrap()])
            .unwrap_err()
            .to_string()
            .contains("SNAT pools"));
        assert!(f.set_own_routes(&["10.200.1.3".parse().unwrap()]).unwrap());
        assert!(within(
            &host("10.200.1.3".parse().unwrap()),
            &parse_prefix("10.200.1.0/28").unwrap()
        ));
    }
}
