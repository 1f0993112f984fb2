//! What a node attaches to the prefixes it announces: the BGP attributes
//! of the VIP pools they lie in (communities, local preference) and, while
//! it is drained with `[bgp] drain = "graceful-shutdown"`, the
//! GRACEFUL_SHUTDOWN community (RFC 8326) on everything. Rendered for BIRD
//! as a filter function (`holdfast_export()`, in the state file its
//! export filters call) and for FRR as a route-map (`HOLDFAST-EXPORT`, on
//! the node's `network` statements). Neither touches a BGP session: the
//! speakers send the changed attributes as UPDATEs.

use std::net::IpAddr;

use raft_store::cluster::{parse_cidr, parse_communities, Community, VipPool, GRACEFUL_SHUTDOWN};

/// A prefix: network address and length.
pub type Prefix = (IpAddr, u8);

/// The attributes of the announced prefixes inside one VIP pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPolicy {
    pub prefix: Prefix,
    pub communities: Vec<Community>,
    pub local_pref: Option<u32>,
}

/// Everything a node attaches to what it announces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportPolicy {
    /// One per VIP pool with attributes, ordered by prefix.
    pub pools: Vec<PoolPolicy>,
    /// GRACEFUL_SHUTDOWN on every announced prefix (a drain that keeps
    /// announcing so the routers move traffic first).
    pub graceful_shutdown: bool,
}

impl ExportPolicy {
    /// The policy of the committed VIP pools (pools without attributes
    /// left out; the config refused malformed ones when they were put).
    pub fn from_pools<'a>(
        pools: impl IntoIterator<Item = &'a VipPool>,
        graceful_shutdown: bool,
    ) -> Self {
        let mut out: Vec<PoolPolicy> = pools
            .into_iter()
            .filter(|p| !p.communities.is_empty() || p.local_pref.is_some())
            .filter_map(|p| {
                Some(PoolPolicy {
                    prefix: parse_cidr(&p.cidr).ok()?,
                    communities: parse_communities(&p.communities).ok()?,
                    local_pref: p.local_pref,
                })
            })
            .collect();
        out.sort_by_key(|p| p.prefix);
        Self {
            pools: out,
            graceful_shutdown,
        }
    }

    /// The BIRD function `holdfast_export()` that sets these attributes on
    /// the route being exported (its export filters call it).
    pub fn bird_function(&self) -> String {
        let mut out = String::from("function holdfast_export()\n{\n");
        for p in &self.pools {
            let (addr, len) = p.prefix;
            let (ty, max) = match addr {
                IpAddr::V4(_) => ("NET_IP4", 32),
                IpAddr::V6(_) => ("NET_IP6", 128),
            };
            out += &format!(
                "\tif net.type = {ty} then {{ if net ~ [ {addr}/{len}{{{len},{max}}} ] then {{\n"
            );
            for c in &p.communities {
                out += &format!("\t\t{}\n", bird_add(c));
            }
            if let Some(lp) = p.local_pref {
                out += &format!("\t\tbgp_local_pref = {lp};\n");
            }
            out += "\t} }\n";
        }
        if self.graceful_shutdown {
            out += &format!("\t{}\n", bird_add(&GRACEFUL_SHUTDOWN));
        }
        out += "}\n";
        out
    }

    /// The vtysh commands that make FRR's route-map `HOLDFAST-EXPORT` (and
    /// its prefix lists `HOLDFAST-POOL-N`) this policy, given the entries
    /// and lists FRR has now (`running`: its running config). Entries are
    /// rewritten in place, never removed and re-added, so the route-map
    /// exists throughout (a `network` statement naming a missing route-map
    /// is not announced).
    pub fn frr_commands(&self, running: &str) -> Vec<String> {
        let (have_entries, have_lists) = frr_existing(running);
        let mut cmds = vec!["configure terminal".to_string()];
        for (i, p) in self.pools.iter().enumerate() {
            let (addr, len) = p.prefix;
            let list = format!("HOLDFAST-POOL-{i}");
            let (fam, max) = if addr.is_ipv4() {
                ("ip", 32)
            } else {
                ("ipv6", 128)
            };
            // The list anew: another pool may have had this number.
            if have_lists.contains(&i) {
                cmds.push(format!("no ip prefix-list {list}"));
                cmds.push(format!("no ipv6 prefix-list {list}"));
            }
            let le = if len < max {
                format!(" le {max}")
            } else {
                String::new()
            };
            cmds.push(format!(
                "{fam} prefix-list {list} seq 5 permit {addr}/{len}{le}"
            ));
            cmds.push(format!("route-map {FRR_ROUTE_MAP} permit {}", entry_seq(i)));
            cmds.push("no match ip address".into());
            cmds.push("no match ipv6 address".into());
            cmds.push(format!("match {fam} address prefix-list {list}"));
            let mut standard: Vec<String> = p
                .communities
                .iter()
                .filter(|c| matches!(c, Community::Standard(..)))
                .map(|c| c.to_string())
                .collect();
            if self.graceful_shutdown {
                standard.push(GRACEFUL_SHUTDOWN.to_string());
            }
            let large: Vec<String> = p
                .communities
                .iter()
                .filter(|c| matches!(c, Community::Large(..)))
                .map(|c| c.to_string())
                .collect();
            set_or_clear(&mut cmds, "community", &standard);
            set_or_clear(&mut cmds, "large-community", &large);
            match p.local_pref {
                Some(lp) => cmds.push(format!("set local-preference {lp}")),
                None => cmds.push("no set local-preference".into()),
            }
            cmds.push("exit".into());
        }
        // The catch-all: every other prefix, with GRACEFUL_SHUTDOWN if set.
        cmds.push(format!("route-map {FRR_ROUTE_MAP} permit {CATCH_ALL}"));
        let gshut = if self.graceful_shutdown {
            vec![GRACEFUL_SHUTDOWN.to_string()]
        } else {
            vec![]
        };
        set_or_clear(&mut cmds, "community", &gshut);
        cmds.push("exit".into());
        for seq in have_entries {
            if seq != CATCH_ALL && !(0..self.pools.len()).any(|i| entry_seq(i) == seq) {
                cmds.push(format!("no route-map {FRR_ROUTE_MAP} permit {seq}"));
            }
        }
        for i in have_lists {
            if i >= self.pools.len() {
                cmds.push(format!("no ip prefix-list HOLDFAST-POOL-{i}"));
                cmds.push(format!("no ipv6 prefix-list HOLDFAST-POOL-{i}"));
            }
        }
        cmds.push("end".into());
        cmds
    }
}

/// The route-map the node's FRR `network` statements name.
pub const FRR_ROUTE_MAP: &str = "HOLDFAST-EXPORT";
/// The sequence of the route-map's last entry (every prefix no pool
/// entry matched).
const CATCH_ALL: u32 = 65000;

fn entry_seq(i: usize) -> u32 {
    10 * (i as u32 + 1)
}

/// The BIRD statement that adds community `c` to the route.
fn bird_add(c: &Community) -> String {
    match c {
        Community::Standard(a, v) => format!("bgp_community.add(({a},{v}));"),
        Community::Large(a, b, c) => format!("bgp_large_community.add(({a},{b},{c}));"),
    }
}

fn set_or_clear(cmds: &mut Vec<String>, what: &str, values: &[String]) {
    if values.is_empty() {
        cmds.push(format!("no set {what}"));
    } else {
        cmds.push(format!("set {what} {}", values.join(" ")));
    }
}

/// The route-map entries (sequence numbers) and pool prefix lists
/// (numbers) in FRR's running config.
fn frr_existing(running: &str) -> (Vec<u32>, Vec<usize>) {
    let mut entries = Vec::new();
    let mut lists = Vec::new();
    for line in running.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["route-map", name, "permit", seq, ..] if *name == FRR_ROUTE_MAP => {
                if let Ok(s) = seq.parse() {
                    entries.push(s);
                }
            }
            ["ip" | "ipv6", "prefix-list", name, ..] => {
                if let Some(Ok(i)) = name.strip_prefix("HOLDFAST-POOL-").map(str::parse) {
                    if !lists.contains(&i) {
                        lists.push(i);
                    }
                }
            }
            _ => {}
        }
    }
    (entries, lists)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, communities: &[&str], local_pref: Option<u32>) -> VipPool {
        VipPool {
            name: cidr.replace('/', "-"),
            cidr: cidr.into(),
            communities: communities.iter().map(|c| c.to_string()).collect(),
            local_pref,
        }
    }

    #[test]
    fn bird_function_sets_each_pools_attributes() {
        let pools = [
            pool("10.200.0.0/24", &["65000:100", "65000:1:2"], Some(200)),
            pool("fd00:200::/120", &["65000:6"], None),
            pool("10.201.0.0/24", &[], None),
        ];
        let f = ExportPolicy::from_pools(&pools, false).bird_function();
        assert!(
            f.contains("if net.type = NET_IP4 then { if net ~ [ 10.200.0.0/24{24,32} ] then {"),
            "{f}"
        );
        assert!(f.contains("bgp_community.add((65000,100));"), "{f}");
        assert!(f.contains("bgp_large_community.add((65000,1,2));"), "{f}");
        assert!(f.contains("bgp_local_pref = 200;"), "{f}");
        assert!(f.contains("[ fd00:200::/120{120,128} ]"), "{f}");
        assert!(!f.contains("10.201.0.0"), "a pool without attributes: {f}");
        assert!(!f.contains("65535"), "{f}");
        let g = ExportPolicy::from_pools(&pools, true).bird_function();
        assert!(g.contains("bgp_community.add((65535,0));"), "{g}");
        // An empty policy is an empty function.
        assert_eq!(
            ExportPolicy::default().bird_function(),
            "function holdfast_export()\n{\n}\n"
        );
    }

    #[test]
    fn frr_commands_rewrite_entries_in_place() {
        let pools = [
            pool("10.200.0.0/24", &["65000:100", "65000:1:2"], Some(200)),
            pool("fd00:200::/120", &["65000:6"], None),
        ];
        let p = ExportPolicy::from_pools(&pools, true);
        let cmds = p.frr_commands("");
        let text = cmds.join("\n");
        assert!(
            text.contains("ip prefix-list HOLDFAST-POOL-0 seq 5 permit 10.200.0.0/24 le 32"),
            "{text}"
        );
        assert!(
            text.contains("ipv6 prefix-list HOLDFAST-POOL-1 seq 5 permit fd00:200::/120 le 128"),
            "{text}"
        );
        assert!(text.contains("route-map HOLDFAST-EXPORT permit 10\nno match ip address\nno match ipv6 address\nmatch ip address prefix-list HOLDFAST-POOL-0\nset community 65000:100 65535:0\nset large-community 65000:1:2\nset local-preference 200"), "{text}");
        assert!(
            text.contains("route-map HOLDFAST-EXPORT permit 65000\nset community 65535:0"),
            "{text}"
        );
        assert!(!text.contains("no route-map"), "nothing to remove: {text}");
        // One pool fewer, no graceful shutdown: entry 20 and list 1 go, the
        // catch-all loses the community, and nothing is removed first.
        let running = "route-map HOLDFAST-EXPORT permit 10\nroute-map HOLDFAST-EXPORT permit 20\nroute-map HOLDFAST-EXPORT permit 65000\nip prefix-list HOLDFAST-POOL-0 seq 5 permit 10.200.0.0/24 le 32\nipv6 prefix-list HOLDFAST-POOL-1 seq 5 permit fd00:200::/120 le 128\n";
        let p = ExportPolicy::from_pools(&pools[..1], false);
        let text = p.frr_commands(running).join("\n");
        assert!(
            text.contains("no route-map HOLDFAST-EXPORT permit 20"),
            "{text}"
        );
        assert!(
            !text.contains("no route-map HOLDFAST-EXPORT permit 10\n"),
            "{text}"
        );
        assert!(
            !text.contains("no route-map HOLDFAST-EXPORT permit 65000"),
            "{text}"
        );
        assert!(
            text.contains("no ipv6 prefix-list HOLDFAST-POOL-1"),
            "{text}"
        );
        assert!(
            text.contains("route-map HOLDFAST-EXPORT permit 65000\nno set community"),
            "{text}"
        );
        assert!(text.contains("set community 65000:100\n"), "{text}");
    }
}
