//! The SNAT pools and every node's SNAT addresses.
//!
//! A SNAT service rewrites a flow's source to the SNAT address of the node
//! that creates the flow, with a port that node allocates. Every node has
//! its own address per family, so two nodes can never bind the same
//! (address, port): node N's slot `s` takes the `s`-th usable address of
//! each pool. A slot is assigned when a node is registered (the lowest
//! free one) and kept by node id when it leaves: flows that use its address
//! may still live on the survivors, and a node that comes back with the
//! same id gets its address back. An operator releases the slot of a node
//! that is gone for good (`release_snat`).
//!
//! A pool may not overlap a VIP pool, a service's VIP or a member's
//! addresses; one too small for the slots in use is refused.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

use crate::cidr::{cidr_contains, parse_cidr};

/// Most SNAT slots (the datapath's `lb_snat_addrs` size).
pub const MAX_SNAT_SLOTS: u16 = 256;

/// The SNAT pools and the slots assigned to nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnatPools {
    /// IPv4 pool, e.g. "10.88.3.0/28".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v4: Option<String>,
    /// IPv6 pool, e.g. "fd88:3::/120".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6: Option<String>,
    /// Node id -> slot.
    #[serde(default)]
    pub slots: BTreeMap<u64, u16>,
}

/// The usable addresses of a pool: every address but the first (the
/// network address) when it has four or more; at most MAX_SNAT_SLOTS.
fn capacity(cidr: &str) -> Result<u16, String> {
    let (addr, len) = parse_cidr(cidr)?;
    let bits = if addr.is_ipv4() { 32 } else { 128 } - u32::from(len);
    let size: u128 = if bits >= 127 {
        u128::MAX
    } else {
        1u128 << bits
    };
    let usable = if size >= 4 { size - 1 } else { size };
    Ok(usable.min(u128::from(MAX_SNAT_SLOTS)) as u16)
}

/// The address of `slot` in `cidr` (see [`capacity`]).
fn nth(cidr: &str, slot: u16) -> Option<IpAddr> {
    let (base, len) = parse_cidr(cidr).ok()?;
    if slot >= capacity(cidr).ok()? {
        return None;
    }
    let bits = if base.is_ipv4() { 32 } else { 128 } - u32::from(len);
    let skip = u128::from(bits >= 2);
    let off = u128::from(slot) + skip;
    Some(match base {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + off as u32)),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) + off)),
    })
}

impl SnatPools {
    /// Whether any pool is configured.
    pub fn enabled(&self) -> bool {
        self.v4.is_some() || self.v6.is_some()
    }

    /// Slots the pools can hold (the smaller pool's usable addresses).
    pub fn capacity(&self) -> u16 {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .filter_map(|c| capacity(c).ok())
            .min()
            .unwrap_or(0)
    }

    /// The SNAT addresses of `slot`.
    pub fn addrs_of_slot(&self, slot: u16) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let v4 = self.v4.as_deref().and_then(|c| match nth(c, slot) {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        });
        let v6 = self.v6.as_deref().and_then(|c| match nth(c, slot) {
            Some(IpAddr::V6(a)) => Some(a),
            _ => None,
        });
        (v4, v6)
    }

    /// The SNAT addresses of node `id` (none without a slot).
    pub fn addrs_of(&self, id: u64) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        match self.slots.get(&id) {
            Some(s) => self.addrs_of_slot(*s),
            None => (None, None),
        }
    }

    /// Every assigned address, with its node.
    pub fn all_addrs(&self) -> impl Iterator<Item = (u64, IpAddr)> + '_ {
        self.slots.keys().flat_map(|id| {
            let (a, b) = self.addrs_of(*id);
            a.map(|a| (*id, IpAddr::V4(a)))
                .into_iter()
                .chain(b.map(|b| (*id, IpAddr::V6(b))))
        })
    }

    /// Give node `id` the lowest free slot, if it has none and one is free.
    pub fn assign(&mut self, id: u64) {
        if !self.enabled() || self.slots.contains_key(&id) {
            return;
        }
        let cap = self.capacity();
        if let Some(s) = (0..cap).find(|s| !self.slots.values().any(|v| v == s)) {
            self.slots.insert(id, s);
        }
    }

    /// Set the pools (None: that family has no SNAT address). `taken` are
    /// the addresses a pool must not overlap: VIP pools (as CIDRs), VIPs
    /// and members' addresses, each with what it is for the error.
    pub fn set_pools(
        &mut self,
        v4: Option<String>,
        v6: Option<String>,
        vip_pools: &[(String, String)],
        taken: &[(IpAddr, String)],
    ) -> Result<(), String> {
        for (field, pool, want_v4) in [("snat.v4", &v4, true), ("snat.v6", &v6, false)] {
            let Some(cidr) = pool else { continue };
            let net = parse_cidr(cidr).map_err(|e| format!("{field}: {e}"))?;
            if net.0.is_ipv4() != want_v4 {
                return Err(format!(
                    "{field}: {cidr} is not an IPv{} prefix",
                    if want_v4 { 4 } else { 6 }
                ));
            }
            for (name, other) in vip_pools {
                let Ok(o) = parse_cidr(other) else { continue };
                if cidr_contains(net, o.0) || cidr_contains(o, net.0) {
                    return Err(format!(
                        "{field}: {cidr} overlaps VIP pool {name} ({other})"
                    ));
                }
            }
            if let Some((a, what)) = taken.iter().find(|(a, _)| cidr_contains(net, *a)) {
                return Err(format!("{field}: {cidr} holds {a}, {what}"));
            }
        }
        let next = SnatPools {
            v4,
            v6,
            slots: self.slots.clone(),
        };
        if next.enabled() {
            let need = self.slots.values().max().map_or(0, |m| m + 1);
            if next.capacity() < need {
                return Err(format!(
                    "snat: the pools hold {} addresses per family, {} slots are in use (the \
                     highest is {}); release slots or use a larger pool",
                    next.capacity(),
                    self.slots.len(),
                    need - 1
                ));
            }
        } else if !self.slots.is_empty() {
            return Err(format!(
                "snat: {} nodes hold SNAT addresses; release them before removing the pools",
                self.slots.len()
            ));
        }
        *self = next;
        Ok(())
    }

    /// Whether `ip` is inside a pool.
    pub fn contains(&self, ip: IpAddr) -> bool {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .filter_map(|c| parse_cidr(c).ok())
            .any(|net| cidr_contains(net, ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_take_the_pools_usable_addresses() {
        let mut p = SnatPools::default();
        p.set_pools(Some("10.88.3.0/30".into()), None, &[], &[])
            .expect("pool");
        assert_eq!(p.capacity(), 3);
        for id in [7, 3, 9, 11] {
            p.assign(id);
        }
        assert_eq!(p.slots, BTreeMap::from([(7, 0), (3, 1), (9, 2)]));
        assert_eq!(p.addrs_of(7).0, Some("10.88.3.1".parse().unwrap()));
        assert_eq!(p.addrs_of(9).0, Some("10.88.3.3".parse().unwrap()));
        assert_eq!(p.addrs_of(11), (None, None), "the pool is full");
        // Too small for the slots in use, or removed while in use: refused.
        let e = p
            .set_pools(Some("10.88.3.0/31".into()), None, &[], &[])
            .unwrap_err();
        assert!(e.contains("release slots"), "{e}");
        assert!(p.set_pools(None, None, &[], &[]).is_err());
        // Both families: slot s is the s-th address of each.
        p.set_pools(
            Some("10.88.3.0/28".into()),
            Some("fd88:3::/120".into()),
            &[],
            &[],
        )
        .expect("pools");
        assert_eq!(p.addrs_of(3).1, Some("fd88:3::2".parse().unwrap()));
    }

    #[test]
    fn pools_must_not_overlap() {
        let mut p = SnatPools::default();
        let vip_pools = vec![("lb".to_string(), "10.200.0.0/24".to_string())];
        let taken = vec![(
            "10.88.0.11".parse().unwrap(),
            "the admin address of node 1".to_string(),
        )];
        for (v4, v6, want) in [
            ("10.200.0.128/25", None, "overlaps VIP pool lb"),
            ("10.88.0.0/24", None, "the admin address of node 1"),
            ("fd88:3::/120", None, "is not an IPv4 prefix"),
            ("10.88.3.1/28", None, "host bits"),
            (
                "10.88.3.0/28",
                Some("10.88.4.0/28"),
                "is not an IPv6 prefix",
            ),
        ] {
            let e = p
                .set_pools(Some(v4.into()), v6.map(String::from), &vip_pools, &taken)
                .unwrap_err();
            assert!(e.contains(want), "{v4}: {e}");
            assert!(e.starts_with("snat.v"), "names the field: {e}");
        }
        assert_eq!(p, SnatPools::default(), "a refusal changes nothing");
    }
}
