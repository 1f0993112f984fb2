//! A network namespace where `bpf_fib_lookup` resolves the fixture's
//! backends, for BPF_PROG_TEST_RUN: the packet tests, the property test and
//! the benchmark run the program inside it.
//!
//! `f0` (10.99.0.2/24, fd00:99::2/64) has static neighbours for
//! 10.99.0.11-13 and fd00:99::11-13 (MAC 02:00:00:00:00:1N) and a router
//! 10.99.0.1 / fd00:99::1 (02:00:00:00:00:01) that clients in
//! 172.20.0.0/16 and fd00:20::/64 are routed through (SNAT replies); `f1`
//! (10.98.0.2/24) has 10.98.0.21 (02:00:00:00:00:21). 10.99.0.99 has no
//! neighbour entry and 10.50.0.0/16 no route.

use netns::{NetNs, NsGuard};

use crate::packet::Mac;

/// Static neighbours of the test network: (address, device, MAC).
pub const NEIGHBOURS: &[(&str, &str, Mac)] = &[
    ("10.99.0.11", "f0", [0x02, 0, 0, 0, 0, 0x11]),
    ("10.99.0.12", "f0", [0x02, 0, 0, 0, 0, 0x12]),
    ("10.99.0.13", "f0", [0x02, 0, 0, 0, 0, 0x13]),
    ("fd00:99::11", "f0", [0x02, 0, 0, 0, 0, 0x11]),
    ("fd00:99::12", "f0", [0x02, 0, 0, 0, 0, 0x12]),
    ("fd00:99::13", "f0", [0x02, 0, 0, 0, 0, 0x13]),
    ("10.98.0.21", "f1", [0x02, 0, 0, 0, 0, 0x21]),
    ("10.99.0.1", "f0", ROUTER_MAC),
    ("fd00:99::1", "f0", ROUTER_MAC),
];

/// The MAC of the router that clients are reached through.
pub const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];

/// Client prefixes routed through the router (SNAT replies go there).
pub const CLIENT_ROUTES: &[(&str, &str)] = &[
    ("172.20.0.0/16", "10.99.0.1"),
    ("fd00:20::/64", "fd00:99::1"),
];

pub struct TestNet {
    pub ifindex: u32,
    pub ifindex_f1: u32,
    pub mac: Mac,
    pub mac_f1: Mac,
    pub ns: NetNs,
}

impl TestNet {
    /// Create the namespace (named `{prefix}-{pid}-{n}`, removed on drop).
    pub fn new(prefix: &str) -> Result<Self, netns::Error> {
        let ns = NetNs::new(prefix)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        for (a, b) in [("f0", "p0"), ("f1", "p1")] {
            ns.ip(&format!("link add {a} type veth peer name {b}"))?;
            ns.ip(&format!("link set {a} up"))?;
            ns.ip(&format!("link set {b} up"))?;
        }
        ns.ip("addr add 10.99.0.2/24 dev f0")?;
        ns.ip("addr add fd00:99::2/64 dev f0 nodad")?;
        ns.ip("addr add 10.98.0.2/24 dev f1")?;
        for (addr, dev, mac) in NEIGHBOURS {
            let mac = mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            ns.ip(&format!(
                "neigh replace {addr} lladdr {mac} dev {dev} nud permanent"
            ))?;
        }
        for (prefix, via) in CLIENT_ROUTES {
            ns.ip(&format!("route add {prefix} via {via} dev f0"))?;
        }
        Ok(Self {
            ifindex: ns.ifindex("f0")?,
            ifindex_f1: ns.ifindex("f1")?,
            mac: ns.mac("f0")?,
            mac_f1: ns.mac("f1")?,
            ns,
        })
    }

    /// Move the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Result<NsGuard, netns::Error> {
        self.ns.enter()
    }
}
