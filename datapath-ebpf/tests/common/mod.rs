//! Shared fixture of the datapath tests: a network namespace where
//! bpf_fib_lookup can resolve backends, and a datapath loaded with small maps
//! and a config of services covering every forwarding case.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use datapath_ebpf::testbed::{TestNet, NEIGHBOURS};
use datapath_ebpf::{
    abi::{CtKey, SvcKey},
    hash::flow_hash,
    packet::{ipip_frame, Mac, Packet, L4},
    testrun::{self, RunResult},
    BackendSpec, BackendState, Datapath, DatapathConfig, DatapathOptions, Proto, ServiceSpec,
};
use netns::NsGuard;

pub const TABLE: u32 = 251;
pub const SEED: u32 = 0x1234_5678;
pub const NODE_ID: u16 = 7;

/// Backend id -> (address, neighbour MAC if resolvable).
pub fn backend_addrs() -> Vec<(u32, &'static str)> {
    vec![
        (1, "10.99.0.11"),
        (2, "10.99.0.12"),
        (3, "10.99.0.13"),
        (4, "10.99.0.11"),
        (5, "10.99.0.12"),
        (6, "10.99.0.13"),
        (7, "fd00:99::11"),
        (8, "fd00:99::12"),
        (9, "fd00:99::11"),
        (10, "fd00:99::12"),
        (11, "10.98.0.21"),
        (12, "10.99.0.99"),
        (13, "10.50.0.1"),
        (14, "10.99.0.11"),
        (15, "10.99.0.12"),
        (16, "fd00:99::13"),
        (17, "10.99.0.11"),
        (18, "10.99.0.12"),
        (19, "10.99.0.13"),
        (20, "10.99.0.11"),
    ]
}

/// Static neighbours of the fixture (address -> MAC).
pub fn neighbours() -> Vec<(&'static str, &'static str, Mac)> {
    NEIGHBOURS.to_vec()
}

pub fn be(id: u32, state: BackendState) -> BackendSpec {
    let addr = backend_addrs()
        .into_iter()
        .find(|(i, _)| *i == id)
        .map(|(_, a)| a)
        .expect("fixture backend id");
    BackendSpec {
        id,
        addr: addr.parse().expect("fixture address"),
        weight: 1,
        state,
        port: 0,
    }
}

pub fn svc(vip: &str, port: u16, proto: Proto, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        source_ranges: Vec::new(),
        vip: vip.parse().expect("fixture VIP"),
        port,
        proto,
        table_size: TABLE,
        backends,
        forwarding: Default::default(),
        affinity_timeout_s: None,
    }
}

/// The base config: one service per forwarding case.
pub fn base_config() -> DatapathConfig {
    use BackendState::*;
    DatapathConfig {
        epoch: 1,
        services: vec![
            svc(
                "10.200.0.1",
                80,
                Proto::Tcp,
                vec![be(1, Active), be(2, Active), be(3, Active)],
            ),
            svc(
                "10.200.0.1",
                53,
                Proto::Udp,
                vec![be(4, Active), be(5, Active)],
            ),
            svc("10.200.0.2", 0, Proto::Tcp, vec![be(6, Active)]),
            svc(
                "fd00:200::1",
                80,
                Proto::Tcp,
                vec![be(7, Active), be(8, Active)],
            ),
            svc("fd00:200::1", 53, Proto::Udp, vec![be(9, Active)]),
            svc("10.200.0.3", 80, Proto::Tcp, vec![be(10, Active)]),
            svc("10.200.0.4", 80, Proto::Tcp, vec![be(11, Active)]),
            svc("10.200.0.5", 80, Proto::Tcp, vec![be(12, Active)]),
            svc("10.200.0.6", 80, Proto::Tcp, vec![be(13, Active)]),
            svc("10.200.0.7", 80, Proto::Tcp, vec![be(14, Draining)]),
        ],
        snat: Default::default(),
    }
}

static ROOT_CHECKED: AtomicBool = AtomicBool::new(false);

pub fn require_root() {
    if ROOT_CHECKED.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the datapath tests load BPF programs and create network namespaces: run them as root"
    );
    ROOT_CHECKED.store(true, Ordering::Relaxed);
}

/// Namespace + loaded datapath; the test thread stays inside the namespace.
pub struct Fixture {
    pub dp: Datapath,
    pub cfg: DatapathConfig,
    pub ifindex: u32,
    pub ifindex_f1: u32,
    pub lb_mac: Mac,
    pub lb_mac_f1: Mac,
    // Field order: the guard restores the thread before the namespace goes.
    _guard: NsGuard,
    pub net: TestNet,
}

pub fn options() -> DatapathOptions {
    DatapathOptions {
        max_services: 16,
        max_backends: 256,
        max_table_size: TABLE,
        conntrack_size: 4096,
        ring_bytes: 1 << 16,
        node_id: NODE_ID,
        hash_seed: SEED,
        ..Default::default()
    }
}

impl Fixture {
    pub fn new(prefix: &str) -> Self {
        Self::with_options(prefix, options())
    }

    pub fn with_options(prefix: &str, opts: DatapathOptions) -> Self {
        require_root();
        let net = TestNet::new(prefix).expect("test network namespace");
        let guard = net.enter().expect("enter namespace");
        let mut dp = Datapath::load(opts).expect("load datapath");
        let cfg = base_config();
        dp.apply(&cfg).expect("apply base config");
        Self {
            dp,
            cfg,
            ifindex: net.ifindex,
            ifindex_f1: net.ifindex_f1,
            lb_mac: net.mac,
            lb_mac_f1: net.mac_f1,
            _guard: guard,
            net,
        }
    }

    pub fn run(&self, pkt: &Packet) -> RunResult {
        self.run_frame(&pkt.frame())
    }

    pub fn run_frame(&self, frame: &[u8]) -> RunResult {
        testrun::run(self.dp.program(), frame, self.ifindex).expect("BPF_PROG_TEST_RUN")
    }

    pub fn apply(&mut self, cfg: DatapathConfig) {
        self.dp.apply(&cfg).expect("apply config");
        self.cfg = cfg;
    }

    /// The counters of service (vip, port, proto), summed over CPUs.
    pub fn svc_stats(
        &self,
        vip: &str,
        port: u16,
        proto: u8,
    ) -> [u64; datapath_ebpf::abi::SVC_STAT_MAX] {
        let key = SvcKey::new(vip.parse().expect("vip"), port, proto);
        self.dp
            .service_stats()
            .expect("service stats")
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s.c)
            .expect("service exists")
    }

    pub fn backend_addr(id: u32) -> IpAddr {
        backend_addrs()
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, a)| a.parse().expect("address"))
            .expect("fixture backend id")
    }

    /// Which backend id the Rust mirror of Maglev + flow hash predicts.
    pub fn predict(&self, key: &CtKey, svc: &SvcKey) -> u32 {
        let table = self
            .dp
            .table(svc)
            .expect("read table")
            .expect("service exists");
        table[(flow_hash(key, SEED) % table.len() as u32) as usize]
    }

    /// The frame the datapath must emit when it sends `pkt` to backend `id`.
    pub fn expected_encap(&self, pkt: &Packet, id: u32) -> Vec<u8> {
        let addr = Self::backend_addr(id);
        let mac = neighbours()
            .into_iter()
            .find(|(a, _, _)| a.parse::<IpAddr>().expect("addr") == addr)
            .map(|(_, _, m)| m)
            .expect("backend has a neighbour");
        let (src_mac, sport) = (
            if addr.to_string().starts_with("10.98.") {
                self.lb_mac_f1
            } else {
                self.lb_mac
            },
            match pkt.l4 {
                L4::Tcp { sport, .. } | L4::Udp { sport, .. } => sport,
                _ => 0,
            },
        );
        ipip_frame(
            mac,
            src_mac,
            pkt.vlan,
            addr,
            pkt.src,
            sport,
            pkt.tos,
            &pkt.l3(),
        )
    }

    pub fn stat(&self, idx: usize) -> u64 {
        self.dp.stats().expect("stats").c[idx]
    }
}

/// Backend ids keyed by address string (for messages).
pub fn addr_names() -> HashMap<IpAddr, u32> {
    backend_addrs()
        .into_iter()
        .map(|(i, a)| (a.parse().expect("addr"), i))
        .collect()
}
