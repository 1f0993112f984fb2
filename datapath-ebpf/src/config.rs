//! What the datapath is programmed with: load-time options and the per-epoch
//! service/backend configuration, both validated before anything is written.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    abi::{IPPROTO_TCP, IPPROTO_UDP},
    error::{Error, Result},
    maglev::{is_prime, DEFAULT_TABLE_SIZE},
};

/// Load-time settings: map sizes and datapath tunables.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Services (VIP, port, protocol) the maps hold.
    pub max_services: u32,
    /// Backend ids must be below this.
    pub max_backends: u32,
    /// Largest Maglev table a service may use (a prime).
    pub max_table_size: u32,
    /// Conntrack entries (LRU).
    pub conntrack_size: u32,
    /// New-flow ring buffer size in bytes (a power of two, >= 4096).
    pub ring_bytes: u32,
    /// SYN flood protection: new TCP SYNs per second and CPU that may enter
    /// conntrack (counted in 100 ms windows); above it, and for one window
    /// after, SYNs are forwarded by Maglev without an entry, which the
    /// handshake's next packet makes. 0 turns the protection off.
    pub syn_flood_rate: u32,
    pub tcp_idle_timeout: Duration,
    pub udp_idle_timeout: Duration,
    /// A TCP entry whose client sent FIN or RST is expired after this long
    /// idle (the connection is closing; a SYN re-picks it at once anyway).
    pub tcp_closing_timeout: Duration,
    /// Minimum interval between last-seen updates of one entry.
    pub ct_refresh: Duration,
    /// Largest outer packet towards backends (fabric MTU), 1280..=9216.
    pub mtu: u32,
    /// Origin id stamped into conntrack entries created here.
    pub node_id: u16,
    /// Flow hash seed: must be equal on every LB node of a cluster.
    pub hash_seed: u32,
    /// bpffs directory to pin maps and links in; `None` keeps nothing pinned.
    pub pin_dir: Option<PathBuf>,
    /// SNAT bindings (flows of SNAT services, every node's) the map holds.
    pub snat_size: u32,
    /// Half-open SNAT bindings of SYN flood mode (an LRU).
    pub snat_half_open_size: u32,
    /// Source ports this node allocates from its SNAT address (inclusive;
    /// the top quarter is for SYN flood mode).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Source-range CIDRs of all services together (an LPM trie).
    pub max_source_ranges: u32,
    /// Divergent replication: announce to peers only the entries that a
    /// peer's tables would not rebuild (SNAT entries, client affinity,
    /// entries a prepared or previous table sends elsewhere), instead of
    /// every new entry.
    pub divergent: bool,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            max_services: 64,
            max_backends: 4096,
            max_table_size: DEFAULT_TABLE_SIZE,
            conntrack_size: 1 << 20,
            ring_bytes: 1 << 20,
            syn_flood_rate: 20_000,
            tcp_idle_timeout: Duration::from_secs(3600),
            udp_idle_timeout: Duration::from_secs(300),
            tcp_closing_timeout: Duration::from_secs(30),
            ct_refresh: Duration::from_secs(1),
            mtu: 1500,
            node_id: 0,
            hash_seed: 0x686f_6c64,
            pin_dir: None,
            snat_size: 262_144,
            snat_half_open_size: 65_536,
            snat_port_min: 1024,
            snat_port_max: 65535,
            max_source_ranges: 65_536,
            divergent: false,
        }
    }
}

/// Length of the datapath's SYN counting window.
pub const SYN_WINDOW: Duration = Duration::from_millis(100);

impl DatapathOptions {
    /// SYNs per CPU and window that may enter conntrack (0: no limit).
    pub fn syn_window_max(&self) -> u32 {
        if self.syn_flood_rate == 0 {
            return 0;
        }
        let per_window = u64::from(self.syn_flood_rate) * SYN_WINDOW.as_millis() as u64 / 1000;
        per_window.max(1) as u32
    }

    /// Check every field; the error names the first bad one and why.
    pub fn validate(&self) -> Result<()> {
        if self.max_services == 0 || self.max_services > 65_536 {
            return Err(Error::invalid("max_services", "must be 1..=65536"));
        }
        if self.max_backends == 0 || self.max_backends > 1 << 24 {
            return Err(Error::invalid("max_backends", "must be 1..=16777216"));
        }
        if !is_prime(self.max_table_size) {
            return Err(Error::invalid(
                "max_table_size",
                format!("{} is not a prime number", self.max_table_size),
            ));
        }
        let slots = 2u64 * u64::from(self.max_services) * u64::from(self.max_table_size);
        if slots > u64::from(u32::MAX) / 4 {
            return Err(Error::invalid(
                "max_table_size",
                format!("2 x max_services x max_table_size = {slots} slots is too large"),
            ));
        }
        if self.max_source_ranges == 0 || self.max_source_ranges > 1 << 24 {
            return Err(Error::invalid("max_source_ranges", "must be 1..=16777216"));
        }
        if self.conntrack_size < 1024 {
            return Err(Error::invalid("conntrack_size", "must be at least 1024"));
        }
        if !self.ring_bytes.is_power_of_two() || self.ring_bytes < 4096 {
            return Err(Error::invalid(
                "ring_bytes",
                format!("{} is not a power of two >= 4096", self.ring_bytes),
            ));
        }
        if self.syn_flood_rate > 100_000_000 {
            return Err(Error::invalid(
                "syn_flood_rate",
                "must be at most 100000000 SYNs per second and CPU (0: off)",
            ));
        }
        if self.tcp_idle_timeout.is_zero() {
            return Err(Error::invalid("tcp_idle_timeout", "must be positive"));
        }
        if self.tcp_closing_timeout.is_zero() || self.tcp_closing_timeout > self.tcp_idle_timeout {
            return Err(Error::invalid(
                "tcp_closing_timeout",
                "must be positive and at most tcp_idle_timeout",
            ));
        }
        if self.udp_idle_timeout.is_zero() {
            return Err(Error::invalid("udp_idle_timeout", "must be positive"));
        }
        if self.snat_size < 1024 {
            return Err(Error::invalid("snat_size", "must be at least 1024"));
        }
        if self.snat_half_open_size < 1024 {
            return Err(Error::invalid(
                "snat_half_open_size",
                "must be at least 1024",
            ));
        }
        if self.snat_port_min == 0
            || u32::from(self.snat_port_max) < u32::from(self.snat_port_min) + 63
        {
            return Err(Error::invalid(
                "snat_port_min",
                format!(
                    "the SNAT port range {}..={} must start above 0 and hold at least 64 ports",
                    self.snat_port_min, self.snat_port_max
                ),
            ));
        }
        if !(1280..=9216).contains(&self.mtu) {
            return Err(Error::invalid(
                "mtu",
                format!("{} is outside 1280..=9216", self.mtu),
            ));
        }
        Ok(())
    }
}

/// L4 protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl std::str::FromStr for Proto {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(Error::invalid(
                "protocol",
                format!("{other:?} is not tcp or udp"),
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Receives new flows and its existing ones.
    Active,
    /// Keeps its existing flows, gets no new ones.
    Draining,
}

/// A backend of a service. `id` is the cluster-wide backend id; a backend
/// belongs to exactly one service. `port` is the port it listens on (0:
/// the client's destination port). A DSR flow to another port than the
/// service's reaches it with that port; the service port rides in the
/// outer header for the backend's decap agent, which turns the answers
/// back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub id: u32,
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
}

/// How a service's new flows reach their backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Forwarding {
    /// IPIP encapsulation; the backend answers the client directly.
    #[default]
    Dsr,
    /// Both addresses rewritten (the node's SNAT address and port); the
    /// backend answers through the LB.
    Snat,
}

/// One node's SNAT addresses (`slot` indexes `lb_snat_addrs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnatSlot {
    pub slot: u16,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// Every node's SNAT addresses and which is this node's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnatConfig {
    pub slots: Vec<SnatSlot>,
    /// This node's slot (None: it binds no new SNAT flow).
    pub own: Option<u16>,
}

impl SnatConfig {
    /// Every SNAT address, with its slot.
    pub fn addrs(&self) -> impl Iterator<Item = (u16, IpAddr)> + '_ {
        self.slots.iter().flat_map(|s| {
            s.v4.map(|a| (s.slot, IpAddr::V4(a)))
                .into_iter()
                .chain(s.v6.map(|a| (s.slot, IpAddr::V6(a))))
        })
    }
}

/// A CIDR of clients that may reach a service (its host bits are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    pub net: IpAddr,
    pub len: u8,
}

impl SourceRange {
    /// `len` must fit `net`'s family.
    pub fn new(net: IpAddr, len: u8) -> Result<Self> {
        let max = if net.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(Error::invalid(
                "source_ranges",
                format!("{net}/{len}: the prefix length must be at most {max}"),
            ));
        }
        Ok(Self { net, len })
    }
}

impl std::str::FromStr for SourceRange {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid("source_ranges", format!("{s:?}: {why}"));
        let (a, l) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("not a CIDR (address/length)"))?;
        let net: IpAddr = a.parse().map_err(|_| bad("not an IP address"))?;
        let len: u8 = l.parse().map_err(|_| bad("not a prefix length"))?;
        Self::new(net, len)
    }
}

impl std::fmt::Display for SourceRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

/// A service: (VIP, port, protocol); port 0 matches every port of the VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    /// Maglev table size (a prime <= max_table_size).
    pub table_size: u32,
    /// How new flows are forwarded (an entry keeps the mode it was made with).
    pub forwarding: Forwarding,
    pub backends: Vec<BackendSpec>,
    /// Clients allowed (CIDRs of either family; empty: every client). A
    /// packet from elsewhere is dropped, on new and established flows.
    pub source_ranges: Vec<SourceRange>,
    /// Client affinity (Kubernetes sessionAffinity: ClientIP): the
    /// seconds an idle client keeps its backend; None: none.
    pub affinity_timeout_s: Option<u32>,
}

impl ServiceSpec {
    /// What the service's Maglev table is built from: its size and its
    /// active backends with their weights, by id. Equal inputs, equal
    /// tables (`build_table` orders backends by id itself).
    pub fn table_inputs(&self) -> (u32, Vec<(u32, u32)>) {
        let mut backends: Vec<(u32, u32)> = self
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .map(|b| (b.id, b.weight))
            .collect();
        backends.sort_unstable();
        (self.table_size, backends)
    }

    /// A service from textual input; a VIP that is not an address is an error.
    pub fn parse(vip: &str, port: u16, proto: &str) -> Result<Self> {
        let vip: IpAddr = vip
            .parse()
            .map_err(|_| Error::invalid("vip", format!("{vip:?} is not an IP address")))?;
        Ok(Self {
            vip,
            port,
            proto: proto.parse()?,
            table_size: DEFAULT_TABLE_SIZE,
            forwarding: Forwarding::Dsr,
            backends: Vec::new(),
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
        })
    }

    pub fn name(&self) -> String {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.vip {
            IpAddr::V4(v) => format!("{v}:{}/{proto}", self.port),
            IpAddr::V6(v) => format!("[{v}]:{}/{proto}", self.port),
        }
    }
}

/// Everything the datapath forwards by, as of one config epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    pub epoch: u64,
    pub services: Vec<ServiceSpec>,
    /// Every node's SNAT addresses (SNAT services and replication need all
    /// of them: a survivor forwards a dead node's flows with its address).
    pub snat: SnatConfig,
}

impl DatapathConfig {
    /// Validate against the load-time limits. Nothing is written on error.
    pub fn validate(&self, opts: &DatapathOptions) -> Result<()> {
        if self.services.len() > opts.max_services as usize {
            return Err(Error::invalid(
                "services",
                format!(
                    "{} services exceed max_services {}",
                    self.services.len(),
                    opts.max_services
                ),
            ));
        }
        let ranges: usize = self.services.iter().map(|s| s.source_ranges.len()).sum();
        if ranges > opts.max_source_ranges as usize {
            return Err(Error::invalid(
                "source_ranges",
                format!(
                    "{ranges} source ranges in all exceed max_source_ranges {}",
                    opts.max_source_ranges
                ),
            ));
        }
        let mut keys = HashMap::new();
        let mut owner: HashMap<u32, usize> = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let field = format!("services[{i}] ({})", svc.name());
            if svc.vip.is_unspecified() || svc.vip.is_multicast() || svc.vip.is_loopback() {
                return Err(Error::invalid(
                    format!("{field}.vip"),
                    format!("{} is not a usable VIP", svc.vip),
                ));
            }
            if let Some(prev) = keys.insert((svc.vip, svc.port, svc.proto), i) {
                return Err(Error::invalid(
                    field,
                    format!("duplicates services[{prev}]"),
                ));
            }
            if !is_prime(svc.table_size) || svc.table_size > opts.max_table_size {
                return Err(Error::invalid(
                    format!("{field}.table_size"),
                    format!(
                        "{} must be a prime <= max_table_size {}",
                        svc.table_size, opts.max_table_size
                    ),
                ));
            }
            if svc.affinity_timeout_s == Some(0) {
                return Err(Error::invalid(
                    format!("{field}.affinity_timeout_s"),
                    "must be at least 1 second",
                ));
            }
            for r in &svc.source_ranges {
                // (The fields are public: a range may not have come
                // through SourceRange::new.)
                SourceRange::new(r.net, r.len).map_err(|e| match e {
                    Error::InvalidConfig { reason, .. } => {
                        Error::invalid(format!("{field}.source_ranges"), reason)
                    }
                    e => e,
                })?;
            }
            if svc.backends.len() as u64 > u64::from(opts.max_backends) {
                return Err(Error::invalid(
                    format!("{field}.backends"),
                    format!(
                        "{} backends exceed max_backends {}",
                        svc.backends.len(),
                        opts.max_backends
                    ),
                ));
            }
            if svc.backends.len() as u64 > u64::from(svc.table_size) {
                return Err(Error::invalid(
                    format!("{field}.backends"),
                    format!(
                        "{} backends exceed the table size {}",
                        svc.backends.len(),
                        svc.table_size
                    ),
                ));
            }
            for b in &svc.backends {
                let bf = format!("{field}.backend {}", b.id);
                if b.id >= opts.max_backends {
                    return Err(Error::invalid(
                        format!("{bf}.id"),
                        format!("id must be below max_backends {}", opts.max_backends),
                    ));
                }
                if b.weight == 0 {
                    return Err(Error::invalid(
                        format!("{bf}.weight"),
                        "weight must be at least 1",
                    ));
                }
                if b.addr.is_unspecified() || b.addr.is_multicast() {
                    return Err(Error::invalid(
                        format!("{bf}.addr"),
                        format!("{} is not a usable backend address", b.addr),
                    ));
                }
                if svc.vip.is_ipv6() && b.addr.is_ipv4() {
                    return Err(Error::invalid(
                        format!("{bf}.addr"),
                        "an IPv6 service cannot forward to an IPv4 backend",
                    ));
                }
                if svc.forwarding == Forwarding::Snat && svc.vip.is_ipv4() != b.addr.is_ipv4() {
                    return Err(Error::invalid(
                        format!("{bf}.addr"),
                        "a SNAT service forwards within its VIP's address family",
                    ));
                }
                match owner.insert(b.id, i) {
                    Some(j) if j != i => {
                        return Err(Error::invalid(
                            format!("{bf}.id"),
                            format!("backend id {} already belongs to services[{j}]", b.id),
                        ));
                    }
                    _ => {}
                }
            }
            let mut ids: Vec<u32> = svc.backends.iter().map(|b| b.id).collect();
            ids.sort_unstable();
            if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::invalid(
                    format!("{field}.backends"),
                    format!("backend id {} appears twice", w[0]),
                ));
            }
        }
        self.validate_snat()
    }

    fn validate_snat(&self) -> Result<()> {
        let mut seen = HashMap::new();
        for s in &self.snat.slots {
            if u32::from(s.slot) >= crate::abi::SNAT_SLOTS {
                return Err(Error::invalid(
                    format!("snat.slots[{}]", s.slot),
                    format!("slot must be below {}", crate::abi::SNAT_SLOTS),
                ));
            }
            if seen.insert(s.slot, ()).is_some() {
                return Err(Error::invalid(
                    format!("snat.slots[{}]", s.slot),
                    "slot appears twice",
                ));
            }
        }
        if let Some(own) = self.snat.own {
            if !seen.contains_key(&own) {
                return Err(Error::invalid(
                    "snat.own",
                    format!("slot {own} has no addresses"),
                ));
            }
        }
        let mut addrs = HashMap::new();
        for (slot, a) in self.snat.addrs() {
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                return Err(Error::invalid(
                    format!("snat.slots[{slot}]"),
                    format!("{a} is not a usable SNAT address"),
                ));
            }
            if let Some(other) = addrs.insert(a, slot) {
                return Err(Error::invalid(
                    format!("snat.slots[{slot}]"),
                    format!("{a} is also slot {other}'s"),
                ));
            }
            if let Some(s) = self.services.iter().find(|s| s.vip == a) {
                return Err(Error::invalid(
                    format!("snat.slots[{slot}]"),
                    format!("{a} is the VIP of {}", s.name()),
                ));
            }
        }
        Ok(())
    }
}
