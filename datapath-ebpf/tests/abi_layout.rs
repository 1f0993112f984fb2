//! The C/Rust ABI is checked by machine: every struct shared through maps is
//! looked up in the BTF that clang emitted into the built objects, and its
//! size, member names, offsets and sizes — and the counter enums' values —
//! must equal the Rust mirror in `src/abi.rs`. No root needed.

use std::collections::HashMap;

use datapath_ebpf::abi::*;
use object::{Object, ObjectSection};

/// A minimal reader of the BTF type section (kernel Documentation/bpf/btf.rst).
struct Btf {
    types: Vec<(u32, u32, u32, Vec<u8>)>, // (name_off, info, size_or_type, trailing data)
    strings: Vec<u8>,
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

impl Btf {
    fn from_object(bytes: &[u8]) -> Self {
        let obj = object::File::parse(bytes).expect("ELF object");
        let sec = obj
            .section_by_name(".BTF")
            .expect(".BTF section (built with -g)");
        let data = sec.data().expect("BTF bytes");
        assert_eq!(u16::from_le_bytes([data[0], data[1]]), 0xEB9F, "BTF magic");
        let hdr_len = u32_at(data, 4) as usize;
        let (type_off, type_len) = (u32_at(data, 8) as usize, u32_at(data, 12) as usize);
        let (str_off, str_len) = (u32_at(data, 16) as usize, u32_at(data, 20) as usize);
        let tdata = &data[hdr_len + type_off..hdr_len + type_off + type_len];
        let strings = data[hdr_len + str_off..hdr_len + str_off + str_len].to_vec();
        let mut types = vec![(0, 0, 0, vec![])]; // id 0 is void
        let mut off = 0;
        while off < tdata.len() {
            let (name, info, st) = (
                u32_at(tdata, off),
                u32_at(tdata, off + 4),
                u32_at(tdata, off + 8),
            );
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                _ => 0,
            };
            types.push((name, info, st, tdata[off..off + extra].to_vec()));
            off += extra;
        }
        Self { types, strings }
    }

    fn name(&self, off: u32) -> &str {
        let s = &self.strings[off as usize..];
        let end = s.iter().position(|&c| c == 0).expect("NUL");
        std::str::from_utf8(&s[..end]).expect("utf8")
    }

    fn kind(&self, id: u32) -> u32 {
        (self.types[id as usize].1 >> 24) & 0x1f
    }

    fn find(&self, name: &str, kind: u32) -> u32 {
        (1..self.types.len() as u32)
            .find(|&id| self.kind(id) == kind && self.name(self.types[id as usize].0) == name)
            .unwrap_or_else(|| panic!("{name} not in BTF"))
    }

    fn size(&self, id: u32) -> usize {
        let (_, _, st, data) = &self.types[id as usize];
        match self.kind(id) {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM => *st as usize,
            KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST => self.size(*st),
            KIND_ARRAY => self.size(u32_at(data, 0)) * u32_at(data, 8) as usize,
            k => panic!("unexpected BTF kind {k} in a map struct"),
        }
    }

    /// (size, [(member name, byte offset, byte size)]) of a struct.
    fn layout(&self, name: &str) -> (usize, Vec<(String, usize, usize)>) {
        let id = self.find(name, KIND_STRUCT);
        let (_, info, size, data) = &self.types[id as usize];
        let kflag = info >> 31 == 1;
        let members = data
            .chunks(12)
            .map(|m| {
                let bits = u32_at(m, 8);
                let bits = if kflag { bits & 0xff_ffff } else { bits };
                assert_eq!(bits % 8, 0, "{name}: bitfields are not allowed in the ABI");
                (
                    self.name(u32_at(m, 0)).to_string(),
                    bits as usize / 8,
                    self.size(u32_at(m, 4)),
                )
            })
            .collect();
        (*size as usize, members)
    }

    fn enum_values(&self, name: &str) -> HashMap<String, usize> {
        let id = self.find(name, KIND_ENUM);
        self.types[id as usize]
            .3
            .chunks(8)
            .map(|e| (self.name(u32_at(e, 0)).to_string(), u32_at(e, 4) as usize))
            .collect()
    }
}

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    std::mem::size_of::<F>()
}

macro_rules! check_struct {
    ($btf:expr, $c:literal, $t:ty, [$($f:ident),+ $(,)?]) => {{
        let (size, members) = $btf.layout($c);
        assert_eq!(size, std::mem::size_of::<$t>(), "{}: size", $c);
        let rust: Vec<(String, usize, usize)> = vec![$((
            stringify!($f).to_string(),
            std::mem::offset_of!($t, $f),
            field_size(|s: &$t| &s.$f),
        )),+];
        assert_eq!(members, rust, "{}: members (name, offset, size) differ from {}", $c, stringify!($t));
    }};
}

fn check_all(obj: &[u8], structs: &[&str]) {
    let btf = Btf::from_object(obj);
    for s in structs {
        match *s {
            "lb_svc_key" => check_struct!(btf, "lb_svc_key", SvcKey, [addr, port, proto, family]),
            "lb_svc" => check_struct!(btf, "lb_svc", Svc, [id, flags, ring_base, ring_size]),
            "lb_backend" => check_struct!(
                btf,
                "lb_backend",
                Backend,
                [addr, svc_ref, family, state, port]
            ),
            "lb_ct_key" => check_struct!(
                btf,
                "lb_ct_key",
                CtKey,
                [saddr, daddr, sport, dport, proto, family, pad]
            ),
            "lb_nh" => check_struct!(btf, "lb_nh", Nh, [expires_ns, ifindex, smac, dmac]),
            "lb_ct_val" => check_struct!(
                btf,
                "lb_ct_val",
                CtVal,
                [
                    backend_id,
                    flags,
                    origin,
                    created_ns,
                    last_seen_ns,
                    snat_port,
                    snat_slot,
                    ranges_gen
                ]
            ),
            "lb_snat_rev" => check_struct!(btf, "lb_snat_rev", SnatRev, [flow, backend_id, pad]),
            "lb_snat_addr" => check_struct!(btf, "lb_snat_addr", SnatAddr, [v4, v6, flags, pad]),
            "lb_flow_event" => check_struct!(
                btf,
                "lb_flow_event",
                FlowEvent,
                [key, backend_id, flags, origin, created_ns]
            ),
            "lb_meta" => check_struct!(btf, "lb_meta", Meta, [epoch, abi_version, max_table]),
            "lb_svc_alt" => check_struct!(btf, "lb_svc_alt", SvcAlt, [base, size]),
            "lb_share_report" => check_struct!(
                btf,
                "lb_share_report",
                ShareReport,
                [visited, shared, ring_full]
            ),
            "lb_ct_batch" => check_struct!(
                btf,
                "lb_ct_batch",
                CtBatch,
                [count, applied, unchanged, rejected, failed, pad]
            ),
            "lb_iface_slot" => {
                check_struct!(btf, "lb_iface_slot", IfaceSlot, [ifindex, mac, flags])
            }
            "lb_stats" => check_struct!(btf, "lb_stats", Stats, [c]),
            "lb_svc_stats" => check_struct!(btf, "lb_svc_stats", SvcStats, [c]),
            "lb_src_range_key" => check_struct!(
                btf,
                "lb_src_range_key",
                SrcRangeKey,
                [prefixlen, svc, family, addr, pad]
            ),
            "lb_svc_policy" => {
                check_struct!(btf, "lb_svc_policy", SvcPolicy, [ranges_gen, affinity_s])
            }
            "lb_decap_key" => check_struct!(btf, "lb_decap_key", DecapKey, [addr, family, pad]),
            "lb_decap_stats" => check_struct!(btf, "lb_decap_stats", DecapStats, [c]),
            "lb_decap_port_key" => check_struct!(
                btf,
                "lb_decap_port_key",
                DecapPortKey,
                [vip, client, target_port, client_port, proto, family, pad]
            ),
            other => panic!("no Rust mirror listed for {other}"),
        }
    }
}

fn object(name: &str) -> &'static [u8] {
    datapath_ebpf::objects()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| b)
        .expect("embedded object")
}

#[test]
fn lb_structs_match_btf() {
    check_all(
        object("lb.bpf.o"),
        &[
            "lb_svc_key",
            "lb_svc",
            "lb_backend",
            "lb_ct_key",
            "lb_ct_val",
            "lb_flow_event",
            "lb_ct_batch",
            "lb_svc_alt",
            "lb_share_report",
            "lb_meta",
            "lb_iface_slot",
            "lb_stats",
            "lb_svc_stats",
            "lb_snat_rev",
            "lb_snat_addr",
            "lb_src_range_key",
            "lb_svc_policy",
        ],
    );
}

#[test]
fn decap_structs_match_btf() {
    check_all(
        object("decap.bpf.o"),
        &["lb_decap_key", "lb_decap_stats", "lb_decap_port_key"],
    );
}

fn check_enum(obj: &[u8], name: &str, max_name: &str, max: usize, table: &[(&str, usize)]) {
    let btf = Btf::from_object(obj);
    let mut c = btf.enum_values(name);
    assert_eq!(c.remove(max_name), Some(max), "{name}: {max_name}");
    let rust: HashMap<String, usize> = table.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    assert_eq!(c, rust, "{name}: C enum and Rust counter table differ");
}

#[test]
fn counter_enums_match_btf() {
    check_enum(
        object("lb.bpf.o"),
        "lb_stat",
        "LB_STAT_MAX",
        STAT_MAX,
        STAT_NAMES,
    );
    check_enum(
        object("lb.bpf.o"),
        "lb_svc_stat",
        "LB_SVC_STAT_MAX",
        SVC_STAT_MAX,
        SVC_STAT_NAMES,
    );
    check_enum(
        object("decap.bpf.o"),
        "lb_decap_stat",
        "LB_DECAP_STAT_MAX",
        DECAP_STAT_MAX,
        DECAP_STAT_NAMES,
    );
}
