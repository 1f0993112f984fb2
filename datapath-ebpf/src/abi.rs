//! Rust mirror of `bpf/include/lb_abi.h`.
//!
//! Every struct is `#[repr(C)]` with the same fields, names and explicit
//! padding as the C header. `tests/abi_layout.rs` compares sizes, field
//! offsets and enum values against the BTF of the compiled object, so the two
//! sides cannot drift silently. Multi-byte fields documented as network order
//! hold the big-endian bytes (use [`u16::to_be`] / [`u16::from_be`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ABI_VERSION: u32 = 4;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const BACKEND_EMPTY: u8 = 0;
pub const BACKEND_ACTIVE: u8 = 1;
pub const BACKEND_DRAINING: u8 = 2;

/// Maglev slot value meaning "no backend".
pub const NO_BACKEND: u32 = 0xFFFF_FFFF;

pub const CT_F_CLOSING: u16 = 0x0001;
pub const CT_F_REMOTE: u16 = 0x0002;
/// Forwarded with SNAT (`CtVal::snat_slot`, `CtVal::snat_port`), not DSR.
pub const CT_F_SNAT: u16 = 0x0004;
/// Not a flow: a client's affinity entry (key: source port 0, pad
/// [`CT_PAD_AFFINITY`]).
pub const CT_F_AFFINITY: u16 = 0x0008;
/// A flow of a service with client affinity (its refreshes refresh its
/// client's affinity entry).
pub const CT_F_AFFINE: u16 = 0x0010;
/// Announced to peers. A divergent service leaves it off the entries any
/// node's tables would rebuild; on the ring it marks an entry made earlier
/// and shared now (by the share walk).
pub const CT_F_SHARED: u16 = 0x0020;
/// The key pad of an affinity entry (flows' keys have pad 0).
pub const CT_PAD_AFFINITY: u16 = 0xaff1;

/// `Svc::flags`: new flows are forwarded with SNAT.
pub const SVC_F_SNAT: u32 = 0x0001;
/// `Svc::flags`: client affinity (timeout in `SvcPolicy::affinity_s`).
pub const SVC_F_AFFINITY: u32 = 0x0002;
/// `Svc::flags`: replicate only the entries the tables cannot rebuild.
pub const SVC_F_DIVERGENT: u32 = 0x0004;
/// `lb_vips` values: or'd in when the address is a node's SNAT address.
pub const VIPS_F_SNAT: u32 = 0x8000_0000;

/// Slots of `lb_snat_addrs` (SNAT addresses of the nodes).
pub const SNAT_SLOTS: u32 = 256;
pub const SNAT_F_V4: u32 = 0x1;
pub const SNAT_F_V6: u32 = 0x2;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Address bytes as stored in keys: IPv4 in the first four bytes.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// Inverse of [`addr_bytes`]; `None` for an unknown family.
pub fn addr_from_bytes(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcKey {
    pub addr: [u8; 16],
    /// Network byte order; 0 matches every port.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

impl SvcKey {
    pub fn new(vip: IpAddr, port: u16, proto: u8) -> Self {
        let (addr, family) = addr_bytes(vip);
        Self {
            addr,
            port: port.to_be(),
            proto,
            family,
        }
    }

    /// The key of the VIP address alone (the `lb_vips` map).
    pub fn vip_only(&self) -> Self {
        Self {
            addr: self.addr,
            port: 0,
            proto: 0,
            family: self.family,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Svc {
    pub id: u32,
    pub flags: u32,
    pub ring_base: u32,
    pub ring_size: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Stats slot (`Svc::id`) + 1 of the backend's service; 0: not known.
    pub svc_ref: u32,
    pub family: u8,
    pub state: u8,
    /// Network order; 0 keeps the client's destination port (DSR always does).
    pub port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: u16,
}

impl CtKey {
    /// The key of the flow `client:sport -> vip:dport`. Both addresses must be
    /// of one family (the IPv4 family is used if either is IPv4).
    pub fn new(client: IpAddr, sport: u16, vip: IpAddr, dport: u16, proto: u8) -> Self {
        let (saddr, family) = addr_bytes(client);
        let (daddr, _) = addr_bytes(vip);
        Self {
            saddr,
            daddr,
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family,
            pad: 0,
        }
    }

    pub fn client(&self) -> Option<IpAddr> {
        addr_from_bytes(&self.saddr, self.family)
    }

    pub fn vip(&self) -> Option<IpAddr> {
        addr_from_bytes(&self.daddr, self.family)
    }

    /// The key an entry with `flags` has in the map: an affinity entry's
    /// pad is [`CT_PAD_AFFINITY`] (the ring and the wire carry only its
    /// flag), a flow's 0.
    pub fn in_map(self, flags: u16) -> Self {
        Self {
            pad: if flags & CT_F_AFFINITY != 0 {
                CT_PAD_AFFINITY
            } else {
                0
            },
            ..self
        }
    }

    /// The affinity entry's key of `client` for service `vip:port`.
    pub fn affinity(client: IpAddr, vip: IpAddr, port: u16, proto: u8) -> Self {
        Self::new(client, 0, vip, port, proto).in_map(CT_F_AFFINITY)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtVal {
    pub backend_id: u32,
    pub flags: u16,
    pub origin: u16,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// SNAT entries: the port the backend sees (network order).
    pub snat_port: u16,
    /// SNAT entries: the slot of the SNAT address (the origin node's).
    pub snat_slot: u16,
    /// The service's source-ranges generation this flow's source was
    /// found in (0: not checked yet; the datapath's cache, not replicated).
    pub ranges_gen: u32,
}

/// The header of a batch of peers' entries for the in-kernel apply
/// program (`struct lb_ct_batch`): `count` (key, value) pairs follow it;
/// the program fills in the counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtBatch {
    pub count: u32,
    /// Written: new, or merged into an existing entry.
    pub applied: u32,
    /// Already equal.
    pub unchanged: u32,
    /// Refused: the local entry is newer.
    pub rejected: u32,
    /// The map refused the write (out of memory).
    pub failed: u32,
    pub pad: u32,
}

/// A service's other Maglev table during a table change (`lb_svc_alt`):
/// the prepared next one, or the previous one for a grace period after
/// the switch. `size` 0: none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcAlt {
    pub base: u32,
    pub size: u32,
}

/// `SvcAlt::size`: every entry of the service diverges (client affinity or
/// the forwarding mode switched: a pick no table shows).
pub const ALT_ALL: u32 = 0xFFFF_FFFF;

/// What one run of the share walk did (`struct lb_share_report`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareReport {
    /// Entries visited.
    pub visited: u64,
    /// Own entries announced: a service's next table sends them elsewhere.
    pub shared: u64,
    /// Such entries the ring had no room for (walk again once it drained).
    pub ring_full: u64,
}

/// Bytes of one (key, value) pair in a batch.
pub const CT_BATCH_ENTRY: usize = 72;
/// Pairs per batch (what one page of test-run packet holds).
pub const CT_BATCH_MAX: usize = 48;

/// A new flow as the datapath created it (`last_seen_ns == created_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: CtKey,
    pub backend_id: u32,
    pub flags: u16,
    pub origin: u16,
    pub created_ns: u64,
}

impl FlowEvent {
    /// The entry's key: the record's with its pad (which carries a SNAT
    /// entry's port) as the map has it.
    pub fn key(&self) -> CtKey {
        self.key.in_map(self.flags)
    }

    /// The conntrack value this event stands for. A SNAT entry's binding
    /// travels in the record's spare fields: its port in the key's pad,
    /// its slot in the flags' high byte.
    pub fn val(&self) -> CtVal {
        let snat = self.flags & CT_F_SNAT != 0;
        CtVal {
            backend_id: self.backend_id,
            flags: self.flags & 0x00ff,
            origin: self.origin,
            created_ns: self.created_ns,
            last_seen_ns: self.created_ns,
            snat_port: if snat { self.key.pad } else { 0 },
            snat_slot: if snat { self.flags >> 8 } else { 0 },
            ranges_gen: 0,
        }
    }
}

/// A SNAT reverse binding's value (`lb_snat_rev`): the client -> VIP flow
/// and its backend. Its key is the backend's reply: a [`CtKey`] with
/// saddr = backend, daddr = SNAT address, sport = backend port, dport =
/// SNAT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatRev {
    pub flow: CtKey,
    pub backend_id: u32,
    /// Half-open bindings: the client's ISN + 1.
    pub pad: u32,
}

/// A node's SNAT addresses (`lb_snat_addrs`, by slot), in the 16-byte
/// form of keys (IPv4 in the first 4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatAddr {
    pub v4: [u8; 16],
    pub v6: [u8; 16],
    pub flags: u32,
    pub pad: u32,
}

/// The prefix bits of a [`SrcRangeKey`] before the address: the service
/// slot (32) and the family (8).
pub const SRC_RANGE_BASE_BITS: u32 = 40;

/// A key of `lb_src_ranges` (an LPM trie): one CIDR of a service's source
/// ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey {
    /// `SRC_RANGE_BASE_BITS` + the CIDR's prefix length.
    pub prefixlen: u32,
    /// The service's stats slot, network order.
    pub svc: u32,
    pub family: u8,
    pub addr: [u8; 16],
    pub pad: [u8; 3],
}

impl SrcRangeKey {
    /// The key of `net/len` for service slot `slot` (`net`'s host bits are
    /// cleared).
    pub fn new(slot: u32, net: IpAddr, len: u8) -> Self {
        let (mut addr, family) = addr_bytes(net);
        let bits = if family == FAMILY_V4 { 32 } else { 128 };
        let len = u32::from(len).min(bits);
        for (i, b) in addr.iter_mut().enumerate() {
            let keep = len.saturating_sub(8 * i as u32).min(8);
            *b &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
        }
        Self {
            prefixlen: SRC_RANGE_BASE_BITS + len,
            svc: slot.to_be(),
            family,
            addr,
            pad: [0; 3],
        }
    }

    /// The service slot.
    pub fn slot(&self) -> u32 {
        u32::from_be(self.svc)
    }
}

/// A service's policy (`lb_svc_policy`, by stats slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcPolicy {
    /// 0: no source ranges; else their generation.
    pub ranges_gen: u32,
    /// Client affinity: seconds an idle client keeps its backend (0: none).
    pub affinity_s: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub epoch: u64,
    pub abi_version: u32,
    pub max_table: u32,
}

/// An attached interface and its MAC, in `lb_iface_slots` (an array with
/// open addressing: interface `ifindex` is in slot `(ifindex + i) %
/// IFACE_SLOTS` for some `i < IFACE_PROBES`; see `lb_iface_slot`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceSlot {
    /// 0: free (ends a probe sequence); [`IFACE_TOMBSTONE`]: freed.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub flags: u16,
}

pub const IFACE_SLOTS: u32 = 64;
pub const IFACE_PROBES: u32 = 4;
pub const IFACE_TOMBSTONE: u32 = u32::MAX;

/// Words of the VIP prefilter (`lb_vip_filter`, see `LB_VIP_FILTER_WORDS`).
pub const VIP_FILTER_WORDS: u32 = 1024;
const VIP_HASH_MUL: u32 = 0x9E37_79B1;

/// The prefilter word and bit of a VIP address (`addr` as in keys: an IPv4
/// address in its first 4 bytes), exactly as the program computes them: the
/// address folded to 32 bits as loaded from memory (native byte order),
/// times `LB_VIP_HASH_MUL`, the top 16 bits.
pub fn vip_filter_bit(addr: &[u8; 16], family: u8) -> (u32, u32) {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let folded = if family == FAMILY_V4 {
        w(0)
    } else {
        w(0) ^ w(4) ^ w(8) ^ w(12)
    };
    let h = folded.wrapping_mul(VIP_HASH_MUL) >> 16;
    (h >> 6, h & 63)
}

pub const STAT_MAX: usize = 48;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    pub c: [u64; STAT_MAX],
}

impl Default for Stats {
    fn default() -> Self {
        Self { c: [0; STAT_MAX] }
    }
}

pub const SVC_STAT_MAX: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub c: [u64; SVC_STAT_MAX],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub pad: [u8; 3],
}

impl DecapKey {
    pub fn new(vip: IpAddr) -> Self {
        let (addr, family) = addr_bytes(vip);
        Self {
            addr,
            family,
            pad: [0; 3],
        }
    }
}

/// A flow the decap agent sends answers of back from the service port
/// (`lb_decap_ports`; see lb_abi.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapPortKey {
    pub vip: [u8; 16],
    pub client: [u8; 16],
    pub target_port: u16,
    pub client_port: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: u16,
}

pub const DECAP_STAT_MAX: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapStats {
    pub c: [u64; DECAP_STAT_MAX],
}

// SAFETY: all of these are #[repr(C)] structs of integers and integer arrays
// with explicit padding fields, so every bit pattern is valid and no byte is
// uninitialised padding.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for Svc {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtVal {}
unsafe impl aya::Pod for FlowEvent {}
unsafe impl aya::Pod for CtBatch {}
unsafe impl aya::Pod for SvcAlt {}
unsafe impl aya::Pod for ShareReport {}
unsafe impl aya::Pod for Meta {}
unsafe impl aya::Pod for IfaceSlot {}
unsafe impl aya::Pod for Stats {}
unsafe impl aya::Pod for SvcStats {}
unsafe impl aya::Pod for DecapKey {}
unsafe impl aya::Pod for DecapStats {}
unsafe impl aya::Pod for DecapPortKey {}
unsafe impl aya::Pod for SnatRev {}
unsafe impl aya::Pod for SnatAddr {}
unsafe impl aya::Pod for SrcRangeKey {}
unsafe impl aya::Pod for SvcPolicy {}

/// Declares counter indices as constants plus a table of (C name, index)
/// that the layout test checks against the C enum in BTF.
macro_rules! counters {
    ($mod:ident, $table:ident, $($name:ident = $c:literal => $v:literal),+ $(,)?) => {
        pub mod $mod {
            $(pub const $name: usize = $v;)+
        }
        pub const $table: &[(&str, usize)] = &[$(($c, $v)),+];
    };
}

counters!(stat, STAT_NAMES,
    FWD_PACKETS = "LB_STAT_FWD_PACKETS" => 0,
    FWD_BYTES = "LB_STAT_FWD_BYTES" => 1,
    NEW_FLOWS = "LB_STAT_NEW_FLOWS" => 2,
    CT_HITS = "LB_STAT_CT_HITS" => 3,
    MIDFLOW_MISS = "LB_STAT_MIDFLOW_MISS" => 4,
    REPICK_GONE = "LB_STAT_REPICK_GONE" => 5,
    REPICK_STALE = "LB_STAT_REPICK_STALE" => 6,
    RING_LOST = "LB_STAT_RING_LOST" => 7,
    FIB_NO_NEIGH = "LB_STAT_FIB_NO_NEIGH" => 8,
    FIB_FAIL = "LB_STAT_FIB_FAIL" => 9,
    ICMP_TOO_BIG = "LB_STAT_ICMP_TOO_BIG" => 10,
    ICMP_ERR_FWD = "LB_STAT_ICMP_ERR_FWD" => 11,
    PASS_MALFORMED = "LB_STAT_PASS_MALFORMED" => 12,
    PASS_VIP_OTHER = "LB_STAT_PASS_VIP_OTHER" => 13,
    DROP_MALFORMED = "LB_STAT_DROP_MALFORMED" => 14,
    DROP_FRAGMENT = "LB_STAT_DROP_FRAGMENT" => 15,
    DROP_NO_BACKEND = "LB_STAT_DROP_NO_BACKEND" => 16,
    DROP_UNSUPPORTED = "LB_STAT_DROP_UNSUPPORTED" => 17,
    DROP_ADJUST = "LB_STAT_DROP_ADJUST" => 18,
    PASS_OTHERHOST = "LB_STAT_PASS_OTHERHOST" => 19,
    SYN_FLOOD = "LB_STAT_SYN_FLOOD" => 20,
    FLOOD_HANDSHAKE = "LB_STAT_FLOOD_HANDSHAKE" => 21,
    SNAT_FWD = "LB_STAT_SNAT_FWD" => 22,
    SNAT_REPLIES = "LB_STAT_SNAT_REPLIES" => 23,
    SNAT_NO_ENTRY = "LB_STAT_SNAT_NO_ENTRY" => 24,
    SNAT_EXHAUSTED = "LB_STAT_SNAT_EXHAUSTED" => 25,
    SNAT_NO_ADDR = "LB_STAT_SNAT_NO_ADDR" => 26,
    SNAT_ICMP = "LB_STAT_SNAT_ICMP" => 27,
    DROP_TTL = "LB_STAT_DROP_TTL" => 28,
    SNAT_HALF_OPEN = "LB_STAT_SNAT_HALF_OPEN" => 29,
    SNAT_STRAY = "LB_STAT_SNAT_STRAY" => 30,
    SNAT_MIDFLOW = "LB_STAT_SNAT_MIDFLOW" => 31,
    SRC_REFUSED = "LB_STAT_SRC_REFUSED" => 32,
    AFFINITY_HITS = "LB_STAT_AFFINITY_HITS" => 33,
    AFFINITY_NEW = "LB_STAT_AFFINITY_NEW" => 34,
    AFFINITY_RELEASED = "LB_STAT_AFFINITY_RELEASED" => 35,
    AFFINITY_EXPIRED = "LB_STAT_AFFINITY_EXPIRED" => 36,
);

counters!(svc_stat, SVC_STAT_NAMES,
    PACKETS = "LB_SVC_PACKETS" => 0,
    BYTES = "LB_SVC_BYTES" => 1,
    NEW_FLOWS = "LB_SVC_NEW_FLOWS" => 2,
    CT_HITS = "LB_SVC_CT_HITS" => 3,
    MIDFLOW_MISS = "LB_SVC_MIDFLOW_MISS" => 4,
    DROPS = "LB_SVC_DROPS" => 5,
    SNAT_EXHAUSTED = "LB_SVC_SNAT_EXHAUSTED" => 6,
    REPLIES = "LB_SVC_REPLIES" => 7,
    SRC_REFUSED = "LB_SVC_SRC_REFUSED" => 8,
);

counters!(decap_stat, DECAP_STAT_NAMES,
    OK = "LB_DECAP_OK" => 0,
    NOT_VIP = "LB_DECAP_NOT_VIP" => 1,
    MALFORMED = "LB_DECAP_MALFORMED" => 2,
    PORT_FLOWS = "LB_DECAP_PORT_FLOWS" => 3,
    PORT_OUT = "LB_DECAP_PORT_OUT" => 4,
);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nh {
    pub expires_ns: u64,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

// SAFETY: repr(C) integers and byte arrays, no implicit padding (24 bytes).
unsafe impl aya::Pod for Nh {}
