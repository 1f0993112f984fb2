//! Kernel conntrack entries ↔ wire entries. Kernel times are this host's
//! CLOCK_MONOTONIC; the wire carries Unix time, so hosts with different boot
//! times agree.

use datapath_ebpf::abi::{CtKey, CtVal, FAMILY_V4};

use crate::wire::WireEntry;

/// Offset between the monotonic clock and Unix time, taken once.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// unix_ns - monotonic_ns
    offset: i128,
}

impl Clock {
    pub fn now() -> Self {
        let mono = datapath_ebpf::maps::monotonic_now().as_nanos() as i128;
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Self {
            offset: unix - mono,
        }
    }

    /// A clock with a given offset (tests: two "hosts" with different boots).
    pub fn with_offset(offset: i128) -> Self {
        Self { offset }
    }

    pub fn to_unix(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset).max(0) as u64
    }

    pub fn to_mono(&self, unix_ns: u64) -> u64 {
        (unix_ns as i128 - self.offset).max(0) as u64
    }
}

pub fn to_wire(key: &CtKey, val: &CtVal, clock: &Clock) -> WireEntry {
    let alen = if key.family == FAMILY_V4 { 4 } else { 16 };
    WireEntry {
        family: key.family,
        proto: key.proto,
        saddr: key.saddr[..alen].to_vec(),
        daddr: key.daddr[..alen].to_vec(),
        sport: u16::from_be(key.sport),
        dport: u16::from_be(key.dport),
        backend_id: val.backend_id,
        flags: val.flags,
        origin: val.origin,
        created: clock.to_unix(val.created_ns),
        last_seen: clock.to_unix(val.last_seen_ns),
        snat_port: u16::from_be(val.snat_port),
        snat_slot: val.snat_slot,
    }
}

/// A validated wire entry (see `Msg::decode`) as a kernel key and value.
pub fn from_wire(e: &WireEntry, clock: &Clock) -> (CtKey, CtVal) {
    let mut key = CtKey {
        family: e.family,
        proto: e.proto,
        sport: e.sport.to_be(),
        dport: e.dport.to_be(),
        ..Default::default()
    };
    key.saddr[..e.saddr.len()].copy_from_slice(&e.saddr);
    key.daddr[..e.daddr.len()].copy_from_slice(&e.daddr);
    let key = key.in_map(e.flags);
    let val = CtVal {
        backend_id: e.backend_id,
        flags: e.flags,
        origin: e.origin,
        created_ns: clock.to_mono(e.created),
        last_seen_ns: clock.to_mono(e.last_seen),
        snat_port: e.snat_port.to_be(),
        snat_slot: e.snat_slot,
        ..Default::default()
    };
    (key, val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datapath_ebpf::abi::{CT_F_AFFINITY, CT_PAD_AFFINITY, IPPROTO_TCP};

    /// An affinity entry crosses the wire by its flag alone and lands under
    /// its map key (pad marked); a flow's key keeps pad 0.
    #[test]
    fn affinity_entries_keep_their_map_key() {
        let clock = Clock::with_offset(5_000_000_000);
        let k = CtKey::affinity(
            "192.0.2.1".parse().unwrap(),
            "10.200.0.1".parse().unwrap(),
            80,
            IPPROTO_TCP,
        );
        assert_eq!((k.pad, k.sport), (CT_PAD_AFFINITY, 0));
        let v = CtVal {
            backend_id: 3,
            flags: CT_F_AFFINITY,
            origin: 2,
            created_ns: 10,
            last_seen_ns: 20,
            ..Default::default()
        };
        let (k2, v2) = from_wire(&to_wire(&k, &v, &clock), &clock);
        assert_eq!((k2, v2), (k, v));
        let flow = CtKey::new(
            "192.0.2.1".parse().unwrap(),
            40_000,
            "10.200.0.1".parse().unwrap(),
            80,
            IPPROTO_TCP,
        );
        let (f2, _) = from_wire(&to_wire(&flow, &CtVal::default(), &clock), &clock);
        assert_eq!(f2.pad, 0);
    }
}
