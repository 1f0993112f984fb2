//! The cluster config — what Raft replicates — and its commands.
//!
//! Every command is validated when it is applied; a bad one is rejected with
//! a reason and leaves the state untouched (a batch is all or nothing). The
//! epoch increases by one with every applied command, so "applied epoch N"
//! means the same config on every node.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

pub use crate::cidr::{canonical_cidr, cidr_contains, parse_cidr};
pub use crate::health::{CheckKind, Health, HealthCheck, OnDown, Via};
pub use crate::snat::SnatPools;

/// Backend ids are allocated round-robin below this limit (the datapath's
/// `max_backends` must be at least this), so a removed id is reused as late
/// as possible.
pub const DEFAULT_BACKEND_ID_LIMIT: u32 = 4096;
pub const MAX_TABLE_SIZE: u32 = 65_537;
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// IPIP encapsulation, backends answer clients directly.
    #[default]
    Dsr,
    /// Both addresses rewritten (the LB node's SNAT address and port);
    /// backends need nothing and answer through the LB.
    Snat,
}

impl std::fmt::Display for ForwardingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForwardingMode::Dsr => "dsr",
            ForwardingMode::Snat => "snat",
        })
    }
}

impl std::str::FromStr for ForwardingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "dsr" => Ok(ForwardingMode::Dsr),
            "snat" => Ok(ForwardingMode::Snat),
            other => Err(format!("forwarding {other:?}: use dsr or snat")),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    Draining,
}

/// A service: (VIP, port, protocol); port 0 matches every port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    #[serde(default)]
    pub mode: ForwardingMode,
    /// Active health check of its backends (none: backends are taken as
    /// healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Clients that may reach it: CIDRs of either family, network
    /// addresses (empty: every client). The datapath drops packets from
    /// elsewhere, of new and established flows alike.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    /// Client affinity (Kubernetes sessionAffinity: ClientIP): every new
    /// flow of a client goes to the client's backend until the client has
    /// been idle this many seconds (1..=86400) or the backend goes away;
    /// none: each flow is placed on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
}

/// The most source ranges one service may have.
pub const MAX_SOURCE_RANGES: usize = 4096;

/// The longest client affinity timeout (Kubernetes' limit: one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Kubernetes' default client affinity timeout (three hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

fn default_table_size() -> u32 {
    DEFAULT_TABLE_SIZE
}

/// A backend of one service, with its cluster-wide id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub id: u32,
    pub service: String,
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    /// As the tier agreed on it (only services with a health check).
    #[serde(default)]
    pub health: Health,
}

/// An LB node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub node_id: u64,
    /// QUIC address (Raft and conntrack replication).
    pub raft_addr: String,
    /// Admin API address.
    pub admin_addr: String,
    /// The next hop the node announces over BGP.
    #[serde(default)]
    pub bgp_next_hop: Option<IpAddr>,
}

/// A pool VIPs are allocated from (Kubernetes LoadBalancer services), and
/// the BGP attributes the LB nodes give the prefixes they announce inside
/// it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipPool {
    pub name: String,
    /// CIDR, e.g. "10.200.0.0/24" or "fd00:200::/112".
    pub cidr: String,
    /// BGP communities of the announced prefixes inside the pool:
    /// standard `ASN:VALUE` (RFC 1997, 0..=65535 each) or large
    /// `ASN:DATA1:DATA2` (RFC 8092, 32 bits each); at most
    /// [`MAX_POOL_COMMUNITIES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// LOCAL_PREF of those prefixes (sent to iBGP peers; an eBGP peer
    /// sets its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
}

/// Most communities a VIP pool carries.
pub const MAX_POOL_COMMUNITIES: usize = 32;

/// A BGP community: standard (RFC 1997) or large (RFC 8092).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Community {
    Standard(u16, u16),
    Large(u32, u32, u32),
}

/// The GRACEFUL_SHUTDOWN community (RFC 8326): receivers lower the
/// route's preference to 0, so traffic moves to other paths first.
pub const GRACEFUL_SHUTDOWN: Community = Community::Standard(65535, 0);

impl std::str::FromStr for Community {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = |why: &str| format!("community {s:?}: {why}");
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit());
        if !parts.iter().all(|p| digits(p)) {
            return Err(bad("use ASN:VALUE or ASN:DATA1:DATA2, decimal numbers"));
        }
        match parts.as_slice() {
            [a, v] => match (a.parse::<u16>(), v.parse::<u16>()) {
                (Ok(a), Ok(v)) => Ok(Community::Standard(a, v)),
                _ => Err(bad("a standard community has two parts of 0..=65535")),
            },
            [a, b, c] => match (a.parse::<u32>(), b.parse::<u32>(), c.parse::<u32>()) {
                (Ok(a), Ok(b), Ok(c)) => Ok(Community::Large(a, b, c)),
                _ => Err(bad("a large community has three parts of 0..=4294967295")),
            },
            _ => Err(bad("use ASN:VALUE or ASN:DATA1:DATA2")),
        }
    }
}

impl std::fmt::Display for Community {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Community::Standard(a, v) => write!(f, "{a}:{v}"),
            Community::Large(a, b, c) => write!(f, "{a}:{b}:{c}"),
        }
    }
}

/// A pool's communities, parsed; Err names the first bad one.
pub fn parse_communities(list: &[String]) -> Result<Vec<Community>, String> {
    if list.len() > MAX_POOL_COMMUNITIES {
        return Err(format!(
            "{} communities: at most {MAX_POOL_COMMUNITIES}",
            list.len()
        ));
    }
    list.iter().map(|c| c.trim().parse()).collect()
}

/// Most certificates the revocation list holds (each entry is checked
/// per admin request and per QUIC connection, by a map lookup).
pub const MAX_REVOKED: usize = 10_000;

/// A revoked certificate: every node's admin API and QUIC endpoint refuse
/// it from the epoch that commits the revocation on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// Serial number: lowercase hex, no separators, no leading zero byte.
    pub serial: String,
    /// Free text for operators (whose certificate, why).
    #[serde(default)]
    pub note: String,
}

/// A certificate serial as the revocation list keeps it.
pub fn valid_serial(serial: &str) -> Result<(), String> {
    let ok = (2..=40).contains(&serial.len())
        && serial.len().is_multiple_of(2)
        && serial
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        && (serial == "00" || !serial.starts_with("00"));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "serial {serial:?} must be 1-20 bytes of lowercase hex without separators or leading zero bytes"
        ))
    }
}

/// A change to the cluster config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    /// Create a service, or update the one of that name.
    PutService {
        service: Service,
    },
    /// Remove a service and its backends.
    RemoveService {
        name: String,
    },
    /// Add a backend; the state machine assigns its id.
    AddBackend {
        service: String,
        addr: IpAddr,
        port: u16,
        weight: u32,
    },
    RemoveBackend {
        id: u32,
    },
    SetBackendState {
        id: u32,
        state: BackendState,
    },
    SetBackendWeight {
        id: u32,
        weight: u32,
    },
    /// The tier's verdict on a backend (committed by the leader from the
    /// nodes' check reports).
    SetBackendHealth {
        id: u32,
        health: Health,
    },
    PutMember {
        member: Member,
    },
    RemoveMember {
        node_id: u64,
    },
    PutVipPool {
        pool: VipPool,
    },
    /// Refuse a certificate (by serial) cluster-wide.
    RevokeCertificate {
        revocation: Revocation,
    },
    /// Take a serial off the revocation list.
    UnrevokeCertificate {
        serial: String,
    },
    RemoveVipPool {
        name: String,
    },
    /// Set the SNAT pools (IPv4, IPv6; none: that family has none). Nodes
    /// without a SNAT address get one.
    PutSnatPools {
        v4: Option<String>,
        v6: Option<String>,
    },
    /// Free the SNAT address of a node that left for good.
    ReleaseSnat {
        node_id: u64,
    },
    /// Divergent replication: every live node has prepared the Maglev
    /// tables of this fingerprint (and shared the entries they move); the
    /// nodes switch to them (committed by the leader from the nodes'
    /// reports).
    ActivateTables {
        fingerprint: u64,
    },
    /// Several commands applied atomically: all of them or none.
    Batch {
        commands: Vec<Command>,
    },
}

/// How many request ids the state machine remembers for deduplication.
pub const RECENT_REQUESTS: usize = 4096;

/// A command as submitted: with an optional client-chosen request id. A
/// retried request (same id) is answered with the first response and not
/// applied again, so a client can retry across a leader failover and the
/// change happens exactly once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    #[serde(default)]
    pub id: Option<String>,
    pub command: Command,
    /// W3C `traceparent` of the span that submitted the request: every node
    /// that applies the entry continues that trace (it is not part of the
    /// config and never changes what the command does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

impl From<Command> for Request {
    fn from(command: Command) -> Self {
        Self {
            id: None,
            command,
            trace: None,
        }
    }
}

/// What applying a command did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The epoch after this command (unchanged if rejected).
    pub epoch: u64,
    /// Why the command was rejected; `None` if applied.
    pub rejected: Option<String>,
    /// Ids assigned to backends added by this command, in order.
    pub backend_ids: Vec<u32>,
}

/// The replicated cluster config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub epoch: u64,
    pub services: BTreeMap<String, Service>,
    pub backends: BTreeMap<u32, Backend>,
    pub members: BTreeMap<u64, Member>,
    pub pools: BTreeMap<String, VipPool>,
    pub backend_id_limit: u32,
    /// Where the round-robin id allocation continues.
    pub next_backend_id: u32,
    /// Recently applied request ids and their responses (bounded).
    #[serde(default)]
    pub recent: VecDeque<(String, Response)>,
    /// Revoked certificates by serial.
    #[serde(default)]
    pub revoked: BTreeMap<String, Revocation>,
    /// SNAT pools and every node's SNAT address slot.
    #[serde(default)]
    pub snat: SnatPools,
    /// Divergent replication: the fingerprint of the Maglev tables the
    /// leader last switched the tier to (0: none yet).
    #[serde(default)]
    pub tables_active: u64,
}

impl Default for ClusterState {
    fn default() -> Self {
        Self {
            epoch: 0,
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            members: BTreeMap::new(),
            pools: BTreeMap::new(),
            backend_id_limit: DEFAULT_BACKEND_ID_LIMIT,
            next_backend_id: 0,
            recent: VecDeque::new(),
            revoked: BTreeMap::new(),
            snat: SnatPools::default(),
            tables_active: 0,
        }
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The addresses a member is reached at (none of them may be a SNAT address).
fn member_addrs(m: &Member) -> impl Iterator<Item = IpAddr> + '_ {
    [&m.raft_addr, &m.admin_addr]
        .into_iter()
        .filter_map(|a| a.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .chain(m.bgp_next_hop)
}

fn valid_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '/' | '_' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?} must be 1-253 characters of [A-Za-z0-9-./_:]"
        ))
    }
}

impl ClusterState {
    /// Apply a request: a request id seen before returns its first response.
    pub fn apply_request(&mut self, req: &Request) -> Response {
        if let Some(id) = &req.id {
            if let Some((_, r)) = self.recent.iter().find(|(i, _)| i == id) {
                return r.clone();
            }
        }
        let r = self.apply(&req.command);
        if let Some(id) = &req.id {
            if self.recent.len() >= RECENT_REQUESTS {
                self.recent.pop_front();
            }
            self.recent.push_back((id.clone(), r.clone()));
        }
        r
    }

    /// Apply a command: on success the epoch increases by one; on rejection
    /// nothing changes and the response carries the reason.
    pub fn apply(&mut self, cmd: &Command) -> Response {
        let mut next = self.clone();
        let mut ids = Vec::new();
        match next.apply_inner(cmd, &mut ids) {
            Ok(()) => {
                next.epoch += 1;
                *self = next;
                Response {
                    epoch: self.epoch,
                    rejected: None,
                    backend_ids: ids,
                }
            }
            Err(reason) => Response {
                epoch: self.epoch,
                rejected: Some(reason),
                backend_ids: Vec::new(),
            },
        }
    }

    fn apply_inner(&mut self, cmd: &Command, ids: &mut Vec<u32>) -> Result<(), String> {
        match cmd {
            Command::PutService { service } => self.put_service(service),
            Command::RemoveService { name } => {
                if self.services.remove(name).is_none() {
                    return Err(format!("no service {name:?}"));
                }
                self.backends.retain(|_, b| &b.service != name);
                Ok(())
            }
            Command::AddBackend {
                service,
                addr,
                port,
                weight,
            } => {
                let id = self.add_backend(service, *addr, *port, *weight)?;
                ids.push(id);
                Ok(())
            }
            Command::RemoveBackend { id } => self
                .backends
                .remove(id)
                .map(|_| ())
                .ok_or_else(|| format!("no backend {id}")),
            Command::SetBackendState { id, state } => {
                let b = self
                    .backends
                    .get_mut(id)
                    .ok_or_else(|| format!("no backend {id}"))?;
                b.state = *state;
                Ok(())
            }
            Command::SetBackendWeight { id, weight } => {
                if *weight == 0 {
                    return Err("weight must be at least 1".into());
                }
                let b = self
                    .backends
                    .get_mut(id)
                    .ok_or_else(|| format!("no backend {id}"))?;
                b.weight = *weight;
                Ok(())
            }
            Command::SetBackendHealth { id, health } => {
                let b = self
                    .backends
                    .get(id)
                    .ok_or_else(|| format!("no backend {id}"))?;
                let checked = self
                    .services
                    .get(&b.service)
                    .is_some_and(|s| s.health_check.is_some());
                if !checked && *health != Health::Up {
                    return Err(format!(
                        "backend {id}: service {} has no health check",
                        b.service
                    ));
                }
                if let Some(b) = self.backends.get_mut(id) {
                    b.health = *health;
                }
                Ok(())
            }
            Command::PutMember { member } => {
                if member.raft_addr.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!(
                        "member {}: raft_addr {:?} is not ip:port",
                        member.node_id, member.raft_addr
                    ));
                }
                if member.admin_addr.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!(
                        "member {}: admin_addr {:?} is not ip:port",
                        member.node_id, member.admin_addr
                    ));
                }
                for a in member_addrs(member) {
                    if self.snat.contains(a) {
                        return Err(format!(
                            "member {}: {a} is inside the SNAT pools",
                            member.node_id
                        ));
                    }
                }
                self.members.insert(member.node_id, member.clone());
                // A node gets a SNAT address when it joins (kept by id).
                self.snat.assign(member.node_id);
                Ok(())
            }
            Command::RemoveMember { node_id } => self
                .members
                .remove(node_id)
                .map(|_| ())
                .ok_or_else(|| format!("no member {node_id}")),
            Command::PutVipPool { pool } => {
                valid_name("pool", &pool.name)?;
                let net = parse_cidr(&pool.cidr)?;
                parse_communities(&pool.communities)
                    .map_err(|e| format!("pool {}: communities: {e}", pool.name))?;
                if let Some(snat) = [&self.snat.v4, &self.snat.v6]
                    .into_iter()
                    .flatten()
                    .find(|c| {
                        parse_cidr(c)
                            .is_ok_and(|o| cidr_contains(net, o.0) || cidr_contains(o, net.0))
                    })
                {
                    return Err(format!(
                        "pool {} ({}) overlaps the SNAT pool {snat}",
                        pool.name, pool.cidr
                    ));
                }
                for other in self.pools.values().filter(|p| p.name != pool.name) {
                    let o = parse_cidr(&other.cidr)?;
                    if cidr_contains(net, o.0) || cidr_contains(o, net.0) {
                        return Err(format!(
                            "pool {} ({}) overlaps pool {} ({})",
                            pool.name, pool.cidr, other.name, other.cidr
                        ));
                    }
                }
                self.pools.insert(pool.name.clone(), pool.clone());
                Ok(())
            }
            Command::RemoveVipPool { name } => self
                .pools
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| format!("no pool {name:?}")),
            Command::PutSnatPools { v4, v6 } => {
                let vip_pools: Vec<(String, String)> = self
                    .pools
                    .values()
                    .map(|p| (p.name.clone(), p.cidr.clone()))
                    .collect();
                let mut taken: Vec<(IpAddr, String)> = self
                    .services
                    .values()
                    .map(|s| (s.vip, format!("the VIP of service {}", s.name)))
                    .collect();
                for m in self.members.values() {
                    taken.extend(
                        member_addrs(m).map(|a| (a, format!("an address of node {}", m.node_id))),
                    );
                }
                for (pool, v6) in [(v4, false), (v6, true)] {
                    if let Some(svc) = self.services.values().find(|s| {
                        pool.is_none() && s.mode == ForwardingMode::Snat && s.vip.is_ipv6() == v6
                    }) {
                        return Err(format!(
                            "snat: service {} forwards with SNAT over {}: its pool stays \
                             (change the service first)",
                            svc.name,
                            if v6 { "IPv6" } else { "IPv4" }
                        ));
                    }
                }
                self.snat
                    .set_pools(v4.clone(), v6.clone(), &vip_pools, &taken)?;
                let ids: Vec<u64> = self.members.keys().copied().collect();
                for id in ids {
                    self.snat.assign(id);
                }
                Ok(())
            }
            Command::ReleaseSnat { node_id } => {
                if self.members.contains_key(node_id) {
                    return Err(format!(
                        "node {node_id} is a member: it uses its SNAT address (remove it first)"
                    ));
                }
                self.snat
                    .slots
                    .remove(node_id)
                    .map(|_| ())
                    .ok_or_else(|| format!("node {node_id} holds no SNAT address"))
            }
            Command::RevokeCertificate { revocation } => {
                valid_serial(&revocation.serial)?;
                if revocation.note.len() > 256 {
                    return Err("revocation note longer than 256 bytes".into());
                }
                if !self.revoked.contains_key(&revocation.serial)
                    && self.revoked.len() >= MAX_REVOKED
                {
                    return Err(format!(
                        "the revocation list is full ({MAX_REVOKED}); rotate the CA"
                    ));
                }
                self.revoked
                    .insert(revocation.serial.clone(), revocation.clone());
                Ok(())
            }
            Command::UnrevokeCertificate { serial } => self
                .revoked
                .remove(serial)
                .map(|_| ())
                .ok_or_else(|| format!("serial {serial} is not revoked")),
            Command::ActivateTables { fingerprint } => {
                if *fingerprint == 0 {
                    return Err("tables fingerprint 0 names no tables".into());
                }
                self.tables_active = *fingerprint;
                Ok(())
            }
            Command::Batch { commands } => {
                for (i, c) in commands.iter().enumerate() {
                    if matches!(c, Command::Batch { .. }) {
                        return Err(format!("batch[{i}]: batches do not nest"));
                    }
                    self.apply_inner(c, ids)
                        .map_err(|e| format!("batch[{i}]: {e}"))?;
                }
                Ok(())
            }
        }
    }

    fn put_service(&mut self, s: &Service) -> Result<(), String> {
        valid_name("service", &s.name)?;
        if s.vip.is_unspecified() || s.vip.is_multicast() || s.vip.is_loopback() {
            return Err(format!("service {}: {} is not a usable VIP", s.name, s.vip));
        }
        if !is_prime(s.table_size) || s.table_size > MAX_TABLE_SIZE {
            return Err(format!(
                "service {}: table_size {} must be a prime <= {MAX_TABLE_SIZE}",
                s.name, s.table_size
            ));
        }
        if let Some(other) = self
            .services
            .values()
            .find(|o| o.name != s.name && o.vip == s.vip && o.port == s.port && o.proto == s.proto)
        {
            return Err(format!(
                "service {}: {}:{}/{} is already service {}",
                s.name, s.vip, s.port, s.proto, other.name
            ));
        }
        let mine: Vec<&Backend> = self
            .backends
            .values()
            .filter(|b| b.service == s.name)
            .collect();
        if s.vip.is_ipv6() && mine.iter().any(|b| b.addr.is_ipv4()) {
            return Err(format!(
                "service {}: an IPv6 VIP cannot have IPv4 backends",
                s.name
            ));
        }
        if s.source_ranges.len() > MAX_SOURCE_RANGES {
            return Err(format!(
                "service {}: source_ranges has {} CIDRs, at most {MAX_SOURCE_RANGES}",
                s.name,
                s.source_ranges.len()
            ));
        }
        for r in &s.source_ranges {
            parse_cidr(r).map_err(|e| format!("service {}: source_ranges: {e}", s.name))?;
        }
        if let Some(t) = s.affinity_timeout_s {
            if !(1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) {
                return Err(format!(
                    "service {}: affinity_timeout_s {t}: must be 1..={MAX_AFFINITY_TIMEOUT_S} seconds",
                    s.name
                ));
            }
        }
        if self.snat.contains(s.vip) {
            return Err(format!(
                "service {}: {} is inside the SNAT pools",
                s.name, s.vip
            ));
        }
        match s.mode {
            ForwardingMode::Snat => {
                let (pool, flag) = if s.vip.is_ipv4() {
                    (&self.snat.v4, "--v4")
                } else {
                    (&self.snat.v6, "--v6")
                };
                if pool.is_none() {
                    return Err(format!(
                        "service {}: forwarding snat needs an {} SNAT pool, and there is none \
                         (clusterctl snat set {flag} CIDR)",
                        s.name,
                        if s.vip.is_ipv4() { "IPv4" } else { "IPv6" }
                    ));
                }
                if let Some(b) = mine.iter().find(|b| b.addr.is_ipv4() != s.vip.is_ipv4()) {
                    return Err(format!(
                        "service {}: forwarding snat stays within the VIP's address family \
                         (backend {} is {})",
                        s.name, b.id, b.addr
                    ));
                }
            }
            ForwardingMode::Dsr => {
                if let Some(b) = mine.iter().find(|b| s.port == 0 && b.port != 0) {
                    return Err(format!(
                        "service {}: a service of every port (port 0) keeps each packet's, but \
                         backend {} listens on {}",
                        s.name, b.id, b.port
                    ));
                }
            }
        }
        if let Some(c) = &s.health_check {
            c.validate(s.port)
                .map_err(|e| format!("service {}: {e}", s.name))?;
        }
        if mine.len() as u64 > u64::from(s.table_size) {
            return Err(format!(
                "service {}: {} backends exceed table_size {}",
                s.name,
                mine.len(),
                s.table_size
            ));
        }
        if s.health_check.is_none() {
            // Without a check nothing marks a backend down or up again.
            for b in self.backends.values_mut().filter(|b| b.service == s.name) {
                b.health = Health::Up;
            }
        }
        self.services.insert(s.name.clone(), s.clone());
        Ok(())
    }

    fn add_backend(
        &mut self,
        service: &str,
        addr: IpAddr,
        port: u16,
        weight: u32,
    ) -> Result<u32, String> {
        let svc = self
            .services
            .get(service)
            .ok_or_else(|| format!("no service {service:?}"))?;
        if weight == 0 {
            return Err("weight must be at least 1".into());
        }
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(format!("{addr} is not a usable backend address"));
        }
        if svc.vip.is_ipv6() && addr.is_ipv4() {
            return Err(format!(
                "service {service} has an IPv6 VIP: backend {addr} must be IPv6"
            ));
        }
        match svc.mode {
            ForwardingMode::Dsr if svc.port == 0 && port != 0 => {
                return Err(format!(
                    "service {service} takes every port (port 0) and keeps each packet's: \
                     backend port {port} must be 0"
                ));
            }
            ForwardingMode::Snat if svc.vip.is_ipv4() != addr.is_ipv4() => {
                return Err(format!(
                    "service {service} forwards with snat within its VIP's family: backend {addr} \
                     is of the other"
                ));
            }
            ForwardingMode::Snat if port == 0 && svc.port != 0 => {
                return Err(format!(
                    "service {service}: a snat backend needs a port (1-65535)"
                ));
            }
            _ => {}
        }
        let existing: Vec<&Backend> = self
            .backends
            .values()
            .filter(|b| b.service == service)
            .collect();
        if existing.iter().any(|b| b.addr == addr && b.port == port) {
            return Err(format!("{addr}:{port} is already a backend of {service}"));
        }
        if existing.len() as u64 >= u64::from(svc.table_size) {
            return Err(format!(
                "service {service} has {} backends, its table_size {}",
                existing.len(),
                svc.table_size
            ));
        }
        let limit = self.backend_id_limit.max(1);
        let id = (0..limit)
            .map(|i| (self.next_backend_id + i) % limit)
            .find(|id| !self.backends.contains_key(id))
            .ok_or_else(|| format!("all {limit} backend ids are in use"))?;
        self.next_backend_id = (id + 1) % limit;
        self.backends.insert(
            id,
            Backend {
                id,
                service: service.to_string(),
                addr,
                port,
                weight,
                state: BackendState::Active,
                health: Health::Up,
            },
        );
        Ok(id)
    }

    /// Why the service is in health panic, if it is: some of its backends
    /// fail their checks but are kept because all of them do (the last
    /// healthy set, `Failing`), or every active backend is marked down
    /// (e.g. the healthy ones were drained or removed) and the datapath
    /// sends to all of them rather than to none (fail open).
    pub fn health_panic(&self, service: &str) -> Option<String> {
        let mut active = 0;
        let mut down = 0;
        let mut failing = 0;
        for b in self
            .backends_of(service)
            .filter(|b| b.state == BackendState::Active)
        {
            active += 1;
            match b.health {
                Health::Up => {}
                Health::Down => down += 1,
                Health::Failing => failing += 1,
            }
        }
        if failing > 0 {
            Some(format!(
                "all backends fail their checks: keeping the last healthy set ({failing} backends)"
            ))
        } else if active > 0 && down == active {
            Some(format!(
                "all {active} active backends are down: sending to all of them (fail open)"
            ))
        } else {
            None
        }
    }

    /// Backends of a service, by id.
    pub fn backends_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Backend> + 'a {
        self.backends.values().filter(move |b| b.service == service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, vip: &str, port: u16) -> Command {
        Command::PutService {
            service: Service {
                name: name.into(),
                vip: vip.parse().expect("vip"),
                port,
                proto: Proto::Tcp,
                table_size: 251,
                mode: ForwardingMode::Dsr,
                health_check: None,
                source_ranges: Vec::new(),
                affinity_timeout_s: None,
            },
        }
    }

    #[test]
    fn affinity_timeouts_are_one_second_to_one_day() {
        let mut s = ClusterState::default();
        let Command::PutService { mut service } = svc("web", "10.0.0.1", 80) else {
            unreachable!()
        };
        for bad in [0, MAX_AFFINITY_TIMEOUT_S + 1, u32::MAX] {
            service.affinity_timeout_s = Some(bad);
            let e = s
                .apply(&Command::PutService {
                    service: service.clone(),
                })
                .rejected
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains("affinity_timeout_s"), "{bad}: {e}");
            assert!(!s.services.contains_key("web"), "nothing stored for {bad}");
        }
        for good in [1, DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S] {
            service.affinity_timeout_s = Some(good);
            assert!(s
                .apply(&Command::PutService {
                    service: service.clone()
                })
                .rejected
                .is_none());
            assert_eq!(s.services["web"].affinity_timeout_s, Some(good));
        }
    }

    #[test]
    fn source_ranges_must_be_cidrs_with_network_addresses() {
        let mut s = ClusterState::default();
        let Command::PutService { mut service } = svc("db", "10.0.0.1", 5432) else {
            unreachable!()
        };
        for (bad, why) in [
            ("10.0.0.0", "not a CIDR"),
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0/33", "prefix length"),
            ("banana/8", "not an IP address"),
        ] {
            service.source_ranges = vec!["192.168.0.0/16".into(), bad.into()];
            let r = s.apply(&Command::PutService {
                service: service.clone(),
            });
            let e = r.rejected.unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains("source_ranges") && e.contains(why), "{bad}: {e}");
            assert!(!s.services.contains_key("db"), "nothing stored for {bad}");
        }
        service.source_ranges = vec!["192.168.0.0/16".into(), "2001:db8::/32".into()];
        assert!(s
            .apply(&Command::PutService {
                service: service.clone()
            })
            .rejected
            .is_none());
        assert_eq!(s.services["db"].source_ranges, service.source_ranges);
        service.source_ranges = vec!["10.0.0.0/8".into(); MAX_SOURCE_RANGES + 1];
        let e = s
            .apply(&Command::PutService { service })
            .rejected
            .expect("too many ranges refused");
        assert!(e.contains("at most"), "{e}");
        assert_eq!(
            s.services["db"].source_ranges.len(),
            2,
            "the old ranges stay"
        );
        assert_eq!(
            canonical_cidr(" 10.1.2.3/8").as_deref(),
            Ok("10.0.0.0/8"),
            "Kubernetes-style host bits cleared"
        );
        assert!(canonical_cidr("10.0.0.0/40").is_err());
    }

    fn add(service: &str, addr: &str, port: u16) -> Command {
        Command::AddBackend {
            service: service.into(),
            addr: addr.parse().expect("addr"),
            port,
            weight: 1,
        }
    }

    fn snat_svc(name: &str, vip: &str, port: u16) -> Command {
        let Command::PutService { mut service } = svc(name, vip, port) else {
            unreachable!()
        };
        service.mode = ForwardingMode::Snat;
        Command::PutService { service }
    }

    fn member(id: u64, addr: &str) -> Command {
        Command::PutMember {
            member: Member {
                node_id: id,
                raft_addr: format!("{addr}:7100"),
                admin_addr: format!("{addr}:7101"),
                bgp_next_hop: None,
            },
        }
    }

    fn pools(v4: Option<&str>, v6: Option<&str>) -> Command {
        Command::PutSnatPools {
            v4: v4.map(Into::into),
            v6: v6.map(Into::into),
        }
    }

    #[test]
    fn snat_services_need_their_familys_pool_and_nodes_get_slots() {
        let mut s = ClusterState::default();
        s.apply(&member(1, "10.0.0.11"));
        // No pool yet: refused, naming the way out.
        let r = s.apply(&snat_svc("db", "10.200.0.5", 5432));
        let why = r.rejected.expect("refused");
        assert!(
            why.contains("needs an IPv4 SNAT pool") && why.contains("--v4"),
            "{why}"
        );
        // Pools that overlap a node's address or are malformed: refused.
        for (cmd, want) in [
            (pools(Some("10.0.0.0/24"), None), "node 1"),
            (pools(Some("10.200.1.1/28"), None), "host bits"),
            (pools(Some("bogus"), None), "snat"),
        ] {
            let before = s.clone();
            let r = s.apply(&cmd);
            let why = r.rejected.expect("refused");
            assert!(why.contains(want), "{cmd:?}: {why}");
            assert_eq!(s, before, "a refused pool changes nothing");
        }
        assert_eq!(s.apply(&pools(Some("10.200.1.0/28"), None)).rejected, None);
        assert_eq!(s.snat.slots.get(&1), Some(&0), "the member got slot 0");
        assert_eq!(
            s.snat.addrs_of(1).0,
            Some("10.200.1.1".parse().unwrap()),
            "the first usable address"
        );
        // A joining node gets the next slot.
        s.apply(&member(2, "10.0.0.12"));
        assert_eq!(s.snat.slots.get(&2), Some(&1));
        // Now the SNAT service, with a backend on another port.
        assert_eq!(s.apply(&snat_svc("db", "10.200.0.5", 5432)).rejected, None);
        assert_eq!(s.apply(&add("db", "10.1.0.7", 15432)).rejected, None);
        // Its VIP family's pool cannot go while it forwards with SNAT.
        let why = s
            .apply(&pools(None, Some("fd00:201::/120")))
            .rejected
            .expect("refused");
        assert!(why.contains("service db"), "{why}");
        // No IPv6 pool: an IPv6 SNAT service is refused.
        let why = s
            .apply(&snat_svc("db6", "fd00:200::5", 5432))
            .rejected
            .expect("refused");
        assert!(why.contains("IPv6 SNAT pool"), "{why}");
        // A VIP inside the pools is refused.
        let why = s
            .apply(&svc("in", "10.200.1.3", 80))
            .rejected
            .expect("refused");
        assert!(why.contains("inside the SNAT pools"), "{why}");
    }

    #[test]
    fn epochs_and_ids() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&svc("web", "10.200.0.1", 80)).epoch, 1);
        let r = s.apply(&add("web", "10.0.0.1", 80));
        assert_eq!(
            (r.epoch, r.backend_ids.clone(), r.rejected),
            (2, vec![0], None)
        );
        let r = s.apply(&add("web", "10.0.0.2", 80));
        assert_eq!(r.backend_ids, vec![1]);
        s.apply(&Command::RemoveBackend { id: 0 });
        // Round-robin: a removed id is not reused at once.
        assert_eq!(s.apply(&add("web", "10.0.0.3", 80)).backend_ids, vec![2]);
        assert_eq!(s.epoch, 5);
    }

    #[test]
    fn rejected_commands_change_nothing() {
        let mut s = ClusterState::default();
        s.apply(&svc("web", "10.200.0.1", 80));
        s.apply(&svc("all", "10.200.0.2", 0));
        let before = s.clone();
        for (cmd, why) in [
            (svc("web2", "10.200.0.1", 80), "already service web"),
            (add("nope", "10.0.0.1", 80), "no service"),
            (add("all", "10.0.0.1", 81), "must be 0"),
            (
                Command::AddBackend {
                    service: "web".into(),
                    addr: "10.0.0.1".parse().expect("a"),
                    port: 80,
                    weight: 0,
                },
                "weight",
            ),
            (svc("bad name!", "10.200.0.9", 80), "name"),
            (svc("lo", "127.0.0.1", 80), "usable VIP"),
            (
                Command::PutVipPool {
                    pool: VipPool {
                        name: "p".into(),
                        cidr: "10.1.1.1/24".into(),
                        ..Default::default()
                    },
                },
                "host bits",
            ),
            (
                Command::Batch {
                    commands: vec![add("web", "10.0.0.9", 80), add("web", "10.0.0.9", 80)],
                },
                "batch[1]",
            ),
        ] {
            let r = s.apply(&cmd);
            let reason = r.rejected.unwrap_or_else(|| panic!("{cmd:?} accepted"));
            assert!(reason.contains(why), "{reason} should mention {why}");
            assert_eq!(s, before, "{cmd:?} changed state");
        }
    }

    #[test]
    fn retried_request_applies_once() {
        let mut s = ClusterState::default();
        s.apply(&svc("web", "10.200.0.1", 80));
        let req = Request {
            id: Some("r1".into()),
            command: add("web", "10.0.0.1", 80),
            trace: None,
        };
        let first = s.apply_request(&req);
        let again = s.apply_request(&req);
        assert_eq!(first, again);
        assert_eq!(first.rejected, None);
        assert_eq!(s.backends.len(), 1);
        assert_eq!(s.epoch, 2);
    }

    #[test]
    fn ipv6_service_refuses_ipv4_backend() {
        let mut s = ClusterState::default();
        s.apply(&svc("v6", "fd00::1", 80));
        assert!(s.apply(&add("v6", "10.0.0.1", 80)).rejected.is_some());
        assert!(s.apply(&add("v6", "fd00::10", 80)).rejected.is_none());
    }

    #[test]
    fn remove_service_removes_its_backends() {
        let mut s = ClusterState::default();
        s.apply(&svc("a", "10.200.0.1", 80));
        s.apply(&svc("b", "10.200.0.2", 80));
        s.apply(&add("a", "10.0.0.1", 80));
        s.apply(&add("b", "10.0.0.1", 80));
        s.apply(&Command::RemoveService { name: "a".into() });
        assert_eq!(s.backends.len(), 1);
        assert!(s.backends.values().all(|b| b.service == "b"));
    }

    #[test]
    fn pools_do_not_overlap() {
        let mut s = ClusterState::default();
        let pool = |n: &str, c: &str| Command::PutVipPool {
            pool: VipPool {
                name: n.into(),
                cidr: c.into(),
                ..Default::default()
            },
        };
        assert!(s.apply(&pool("a", "10.200.0.0/24")).rejected.is_none());
        assert!(s.apply(&pool("b", "10.200.0.128/25")).rejected.is_some());
        assert!(s.apply(&pool("c", "fd00:200::/112")).rejected.is_none());
    }

    #[test]
    fn revocations_are_validated_and_removable() {
        let mut s = ClusterState::default();
        let revoke = |serial: &str| Command::RevokeCertificate {
            revocation: Revocation {
                serial: serial.into(),
                note: "lost laptop".into(),
            },
        };
        for bad in ["", "0", "ABCD", "00ab", "xy", "0a:bc", &"ab".repeat(21)] {
            let r = s.apply(&revoke(bad));
            assert!(r.rejected.is_some(), "{bad:?} accepted");
        }
        assert_eq!(s.epoch, 0);
        assert!(s.apply(&revoke("7fab01")).rejected.is_none());
        assert!(s.revoked.contains_key("7fab01"));
        assert!(s
            .apply(&Command::UnrevokeCertificate {
                serial: "7fab01".into()
            })
            .rejected
            .is_none());
        assert!(s.revoked.is_empty());
        assert!(s
            .apply(&Command::UnrevokeCertificate {
                serial: "7fab01".into()
            })
            .rejected
            .is_some());
        // A state written before revocations existed still loads.
        let mut v = serde_json::to_value(ClusterState::default()).expect("json");
        v.as_object_mut().expect("object").remove("revoked");
        let old: ClusterState = serde_json::from_value(v).expect("old state loads");
        assert!(old.revoked.is_empty());
    }

    #[test]
    fn health_needs_a_check_and_a_valid_one() {
        let mut s = ClusterState::default();
        s.apply(&svc("web", "10.200.0.1", 80));
        s.apply(&add("web", "10.0.0.1", 80));
        let down = Command::SetBackendHealth {
            id: 0,
            health: Health::Down,
        };
        let r = s.apply(&down);
        assert!(
            r.rejected
                .as_deref()
                .unwrap_or("")
                .contains("no health check"),
            "{r:?}"
        );
        let mut with = match svc("web", "10.200.0.1", 80) {
            Command::PutService { service } => service,
            _ => unreachable!(),
        };
        with.health_check = Some(HealthCheck {
            timeout_ms: 5000,
            ..HealthCheck::new(CheckKind::Tcp)
        });
        let r = s.apply(&Command::PutService {
            service: with.clone(),
        });
        let why = r.rejected.expect("timeout longer than interval");
        assert!(why.contains("health_check.timeout_ms"), "{why}");
        with.health_check = Some(HealthCheck::new(CheckKind::Tcp));
        assert!(s
            .apply(&Command::PutService {
                service: with.clone()
            })
            .rejected
            .is_none());
        assert!(s.apply(&down).rejected.is_none());
        assert_eq!(s.backends[&0].health, Health::Down);
        // Taking the check away makes every backend healthy again.
        with.health_check = None;
        s.apply(&Command::PutService { service: with });
        assert_eq!(s.backends[&0].health, Health::Up);
        // A state written before health existed still loads.
        let mut v = serde_json::to_value(&s).expect("json");
        v["backends"]["0"]
            .as_object_mut()
            .expect("b")
            .remove("health");
        let old: ClusterState = serde_json::from_value(v).expect("old state loads");
        assert_eq!(old.backends[&0].health, Health::Up);
    }
}
