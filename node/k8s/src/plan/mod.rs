//! From Kubernetes objects to Raft commands: a pure function of the
//! Services, the EndpointSlices and the current cluster config, so the
//! reconcile is idempotent (the same inputs give no commands the second
//! time) and a new leader converges from a relist.
//!
//! Ownership: a Holdfast service named `k8s:{ns}/{name}:{port}/{proto}`
//! (`/v6` appended for the IPv6 VIP of a dual-stack Service) belongs to the
//! controller; nothing else is touched.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use raft_store::{
    cluster::{
        cidr_contains, parse_cidr, BackendState, ForwardingMode, HealthCheck, Proto,
        Service as HfService,
    },
    ClusterState, Command,
};

pub const OWNED_PREFIX: &str = "k8s:";
/// Annotation requesting a VIP (like spec.loadBalancerIP, which is deprecated upstream).
pub const VIP_ANNOTATION: &str = "holdfast.io/vip";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation with the health check of the Service's backends, as JSON in
/// the form of `[[service]]`'s `health_check` (e.g.
/// `{"type":"http","path":"/healthz","interval_ms":1000}`).
pub const HEALTH_CHECK_ANNOTATION: &str = "holdfast.io/health-check";
/// Annotation choosing the forwarding mode: "dsr" (default) or "snat".
pub const FORWARDING_ANNOTATION: &str = "holdfast.io/forwarding";

#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub load_balancer_class: String,
    /// Also own Services whose spec.externalIPs fall in a VIP pool.
    pub external_ips: bool,
    pub table_size: u32,
}

/// A Kubernetes Event to record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Note {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Commands in a safe order (removals, services, additions, states).
    pub commands: Vec<Command>,
    /// LoadBalancer Services and the VIPs their status must show.
    pub statuses: BTreeMap<(String, String), Vec<IpAddr>>,
    pub notes: Vec<Note>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct WantBackend {
    addr: IpAddr,
    port: u16,
    state: BackendState,
}

#[derive(Clone, Debug)]
struct WantService {
    svc: HfService,
    backends: Vec<WantBackend>,
}

fn note(
    kind: &'static str,
    ns: &str,
    name: &str,
    uid: &str,
    reason: &'static str,
    msg: String,
) -> Note {
    Note {
        kind,
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
        reason,
        message: msg,
    }
}

fn in_pools(state: &ClusterState, ip: IpAddr) -> bool {
    state
        .pools
        .values()
        .filter_map(|p| parse_cidr(&p.cidr).ok())
        .any(|net| cidr_contains(net, ip))
}

/// The lowest free address of the pools of `ip`'s family (network and
/// broadcast addresses of IPv4 pools wider than /31 are skipped).
fn allocate(state: &ClusterState, used: &BTreeSet<IpAddr>, v6: bool) -> Option<IpAddr> {
    for p in state.pools.values() {
        let Ok((net, len)) = parse_cidr(&p.cidr) else {
            continue;
        };
        match net {
            IpAddr::V4(a) if !v6 => {
                let base = u32::from(a);
                let size: u64 = 1u64 << (32 - u32::from(len));
                let (first, last) = if size > 2 {
                    (1, size - 2)
                } else {
                    (0, size - 1)
                };
                for k in first..=last.min(first + 65_535) {
                    let ip = IpAddr::V4((base + k as u32).into());
                    if !used.contains(&ip) {
                        return Some(ip);
                    }
                }
            }
            IpAddr::V6(a) if v6 => {
                let base = u128::from(a);
                let bits = 128 - u32::from(len);
                let size: u128 = if bits >= 64 {
                    u64::MAX as u128
                } else {
                    1u128 << bits
                };
                for k in 1..size.min(65_536) {
                    let ip = IpAddr::V6((base + k).into());
                    if !used.contains(&ip) {
                        return Some(ip);
                    }
                }
            }
            _ => {}
        }
    }
    None
}

fn owned_name(ns: &str, name: &str, port: u16, proto: Proto, v6: bool) -> String {
    let p = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    format!(
        "{OWNED_PREFIX}{ns}/{name}:{port}/{p}{}",
        if v6 { "/v6" } else { "" }
    )
}

/// The Service (ns, name) an owned Holdfast service name belongs to.
pub fn owner_of(hf_name: &str) -> Option<(String, String)> {
    let rest = hf_name.strip_prefix(OWNED_PREFIX)?;
    let (nsname, _) = rest.split_once(':')?;
    let (ns, name) = nsname.split_once('/')?;
    Some((ns.into(), name.into()))
}

/// An object's namespace, name and uid, with Kubernetes' defaults for the
/// missing ones.
fn ident(m: &ObjectMeta) -> (String, String, String) {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
        m.uid.clone().unwrap_or_default(),
    )
}

/// Compute what must change. `services` and `slices` are the API's
/// current objects; `state` is the committed cluster config.
pub fn plan(
    services: &[Service],
    slices: &[EndpointSlice],
    state: &ClusterState,
    cfg: &PlanConfig,
) -> Plan {
    let mut out = Plan::default();
    // VIPs taken by services the controller does not own.
    let mut used: BTreeSet<IpAddr> = state
        .services
        .values()
        .filter(|s| !s.name.starts_with(OWNED_PREFIX))
        .map(|s| s.vip)
        .collect();
    // VIPs the owned services have now, by Kubernetes Service.
    let mut current: BTreeMap<(String, String), BTreeSet<IpAddr>> = BTreeMap::new();
    for s in state.services.values() {
        if let Some(k) = owner_of(&s.name) {
            current.entry(k).or_default().insert(s.vip);
        }
    }

    // A Service keeps the VIPs it has: reserve them before anyone asks.
    let existing: BTreeSet<(String, String)> = services
        .iter()
        .map(|s| {
            let (ns, name, _) = ident(&s.metadata);
            (ns, name)
        })
        .collect();
    for (k, ips) in &current {
        if existing.contains(k) {
            used.extend(ips.iter().copied());
        }
    }

    let mut svcs: Vec<&Service> = services.iter().collect();
    // Oldest first, so an older Service keeps a contested VIP.
    svcs.sort_by_key(|s| {
        (
            s.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second()),
            s.metadata.namespace.clone(),
            s.metadata.name.clone(),
        )
    });
    let mut known: BTreeSet<(String, String)> = BTreeSet::new();
    let mut want: BTreeMap<String, WantService> = BTreeMap::new();

    // First pass: decide the VIPs (keeping current ones), in age order.
    let mut vips_of: Vec<(&Service, Vec<IpAddr>, bool)> = Vec::new();
    for s in &svcs {
        let (ns, name, uid) = ident(&s.metadata);
        known.insert((ns.clone(), name.clone()));
        let Some(spec) = &s.spec else { continue };
        let is_lb = spec.type_.as_deref() == Some("LoadBalancer")
            && spec.load_balancer_class.as_deref() == Some(cfg.load_balancer_class.as_str());
        let ext: Vec<IpAddr> = if cfg.external_ips {
            spec.external_ips
                .iter()
                .flatten()
                .filter_map(|a| a.parse().ok())
                .filter(|a| in_pools(state, *a))
                .collect()
        } else {
            vec![]
        };
        if !is_lb && ext.is_empty() {
            continue;
        }
        let bad = |reason, msg: String| note("Service", &ns, &name, &uid, reason, msg);
        // Ports first: a Service with nothing Holdfast can balance gets no VIP.
        let mut usable = 0;
        for p in spec.ports.iter().flatten() {
            match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" | "UDP" if u16::try_from(p.port).is_ok_and(|x| x > 0) => usable += 1,
                "TCP" | "UDP" => out.notes.push(bad(
                    "InvalidPort",
                    format!("port {} is out of range; skipped", p.port),
                )),
                other => out.notes.push(bad(
                    "UnsupportedProtocol",
                    format!(
                        "port {} uses {other}; Holdfast balances TCP and UDP; port skipped",
                        p.port
                    ),
                )),
            }
        }
        if usable == 0 {
            if spec.ports.as_ref().is_none_or(|p| p.is_empty()) {
                out.notes
                    .push(bad("NoPorts", "the Service has no ports; skipped".into()));
            }
            continue;
        }
        let mut vips = Vec::new();
        let have = current
            .get(&(ns.clone(), name.clone()))
            .cloned()
            .unwrap_or_default();
        if is_lb {
            let requested = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(VIP_ANNOTATION))
                .or(spec.load_balancer_ip.as_ref());
            if let Some(r) = requested {
                match r.parse::<IpAddr>() {
                    Err(_) => {
                        out.notes.push(bad(
                            "InvalidVIP",
                            format!("requested VIP {r:?} is not an IP address"),
                        ));
                        continue;
                    }
                    Ok(ip) if !in_pools(state, ip) => {
                        out.notes.push(bad(
                            "VIPNotInPool",
                            format!("requested VIP {ip} is in no Holdfast VIP pool"),
                        ));
                        continue;
                    }
                    Ok(ip) if used.contains(&ip) && !have.contains(&ip) => {
                        out.notes.push(bad(
                            "VIPConflict",
                            format!("requested VIP {ip} is already used by another service"),
                        ));
                        continue;
                    }
                    Ok(ip) => vips.push(ip),
                }
            } else {
                let families: Vec<bool> = match spec.ip_family_policy.as_deref() {
                    Some("RequireDualStack") | Some("PreferDualStack") => vec![false, true],
                    _ => vec![spec
                        .ip_families
                        .as_ref()
                        .and_then(|f| f.first())
                        .is_some_and(|f| f == "IPv6")],
                };
                for v6 in families {
                    let keep = have
                        .iter()
                        .find(|ip| ip.is_ipv6() == v6 && in_pools(state, **ip))
                        .copied();
                    match keep.or_else(|| allocate(state, &used, v6)) {
                        Some(ip) => vips.push(ip),
                        None if spec.ip_family_policy.as_deref() == Some("PreferDualStack") => {}
                        None => out.notes.push(bad(
                            "NoVIPAvailable",
                            format!(
                                "no free {} address in the Holdfast VIP pools",
                                if v6 { "IPv6" } else { "IPv4" }
                            ),
                        )),
                    }
                }
                if vips.is_empty() {
                    continue;
                }
            }
        } else {
            for ip in ext {
                if used.contains(&ip) && !have.contains(&ip) {
                    out.notes.push(bad(
                        "VIPConflict",
                        format!("external IP {ip} is already used by another service"),
                    ));
                } else {
                    vips.push(ip);
                }
            }
            if vips.is_empty() {
                continue;
            }
        }
        used.extend(vips.iter().copied());
        vips_of.push((s, vips, is_lb));
    }

    // Slices by Service.
    let mut by_svc: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for sl in slices {
        let (ns, slname, sluid) = ident(&sl.metadata);
        let owner = sl
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        match owner {
            Some(o) if known.contains(&(ns.clone(), o.clone())) => {
                by_svc.entry((ns, o)).or_default().push(sl)
            }
            Some(o) => out.notes.push(note(
                "EndpointSlice",
                &ns,
                &slname,
                &sluid,
                "UnknownService",
                format!("EndpointSlice names Service {ns}/{o}, which does not exist; skipped"),
            )),
            None => {}
        }
    }

    // Second pass: ports and backends.
    for (s, vips, is_lb) in vips_of {
        let (ns, name, uid) = ident(&s.metadata);
        let check: Result<Option<HealthCheck>, String> = match s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(HEALTH_CHECK_ANNOTATION))
        {
            None => Ok(None),
            Some(v) => serde_json::from_str::<HealthCheck>(v)
                .map(Some)
                .map_err(|e| e.to_string()),
        };
        // A bad value is reported and the service keeps the mode it has.
        let forwarding: Option<ForwardingMode> = match s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FORWARDING_ANNOTATION))
        {
            None => Some(ForwardingMode::Dsr),
            Some(v) => match v.parse::<ForwardingMode>() {
                Ok(m) => Some(m),
                Err(e) => {
                    out.notes.push(note(
                        "Service",
                        &ns,
                        &name,
                        &uid,
                        "InvalidForwarding",
                        format!(
                            "annotation {FORWARDING_ANNOTATION}: {e}; the service keeps its current mode"
                        ),
                    ));
                    None
                }
            },
        };
        let spec = s.spec.as_ref().expect("filtered above");
        spec_notes(
            spec,
            forwarding.unwrap_or_default(),
            (&ns, &name, &uid),
            &mut out,
        );
        // loadBalancerSourceRanges: host bits cleared as Kubernetes reads
        // them; a malformed one keeps each port's current ranges (never
        // opens a restricted service) and is reported.
        let source_ranges: Option<Vec<String>> = {
            let mut ok = Vec::new();
            let mut bad = None;
            for r in spec.load_balancer_source_ranges.iter().flatten() {
                match raft_store::cluster::canonical_cidr(r) {
                    Ok(c) => ok.push(c),
                    Err(e) => bad = bad.or(Some(e)),
                }
            }
            ok.sort();
            ok.dedup();
            match bad {
                None => Some(ok),
                Some(e) => {
                    out.notes.push(note(
                        "Service",
                        &ns,
                        &name,
                        &uid,
                        "InvalidSourceRange",
                        format!(
                            "spec.loadBalancerSourceRanges: {e}; the service keeps its current ranges (a new one is not created)"
                        ),
                    ));
                    None
                }
            }
        };
        let affinity = session_affinity(spec, (&ns, &name, &uid), &mut out);
        let ports = spec.ports.clone().unwrap_or_default();
        let mut any = false;
        for p in &ports {
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                _ => continue, // noted in the first pass
            };
            let Some(port) = u16::try_from(p.port).ok().filter(|x| *x > 0) else {
                continue;
            };
            any = true;
            for vip in &vips {
                let v6 = vip.is_ipv6();
                let hf_name = owned_name(&ns, &name, port, proto, v6);
                let mode = forwarding.unwrap_or_else(|| {
                    state
                        .services
                        .get(&hf_name)
                        .map_or(ForwardingMode::Dsr, |s| s.mode)
                });
                let pool = if v6 { &state.snat.v6 } else { &state.snat.v4 };
                if mode == ForwardingMode::Snat && pool.is_none() {
                    // The config would refuse it: say why on the Service.
                    out.notes.push(note(
                        "Service",
                        &ns,
                        &name,
                        &uid,
                        "NoSnatPool",
                        format!(
                            "{FORWARDING_ANNOTATION}: snat needs an {} SNAT pool (clusterctl snat set); {vip} port {port} not created",
                            if v6 { "IPv6" } else { "IPv4" }
                        ),
                    ));
                    continue;
                }
                let source_ranges = match &source_ranges {
                    Some(r) => r.clone(),
                    None => match state.services.get(&hf_name) {
                        Some(cur) => cur.source_ranges.clone(),
                        None => continue,
                    },
                };
                let mut backends: BTreeMap<(IpAddr, u16), BackendState> = BTreeMap::new();
                for sl in by_svc
                    .get(&(ns.clone(), name.clone()))
                    .into_iter()
                    .flatten()
                {
                    let fam_ok = match sl.address_type.as_str() {
                        "IPv4" => !v6,
                        "IPv6" => v6,
                        _ => false,
                    };
                    if !fam_ok {
                        continue;
                    }
                    // The slice port for this Service port (by name).
                    let sp = sl.ports.iter().flatten().find(|q| {
                        q.name.as_deref().unwrap_or("") == p.name.as_deref().unwrap_or("")
                            && q.protocol.as_deref().unwrap_or("TCP")
                                == p.protocol.as_deref().unwrap_or("TCP")
                    });
                    let Some(target) = sp.and_then(|q| q.port).and_then(|q| u16::try_from(q).ok())
                    else {
                        continue;
                    };
                    for ep in &sl.endpoints {
                        let c = ep.conditions.as_ref();
                        let ready = c.and_then(|c| c.ready).unwrap_or(true);
                        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                        let st = if ready && !terminating {
                            BackendState::Active
                        } else if serving && terminating {
                            BackendState::Draining
                        } else {
                            continue;
                        };
                        for a in &ep.addresses {
                            match a.parse::<IpAddr>() {
                                Ok(ip) if ip.is_ipv6() == v6 => {
                                    // Active wins over draining for a duplicate.
                                    let e = backends.entry((ip, target)).or_insert(st);
                                    if st == BackendState::Active {
                                        *e = st;
                                    }
                                }
                                Ok(_) => {}
                                Err(_) => out.notes.push(note(
                                    "EndpointSlice",
                                    &ns,
                                    sl.metadata.name.as_deref().unwrap_or_default(),
                                    sl.metadata.uid.as_deref().unwrap_or_default(),
                                    "InvalidAddress",
                                    format!("endpoint address {a:?} is not an IP address; skipped"),
                                )),
                            }
                        }
                    }
                }
                // A bad annotation keeps the check the service has (if
                // any) and is reported; it never drops a working check.
                let health_check = match check.clone().and_then(|c| match c {
                    Some(c) => c.validate(port).map(|()| Some(c)),
                    None => Ok(None),
                }) {
                    Ok(c) => c,
                    Err(e) => {
                        out.notes.push(note(
                            "Service",
                            &ns,
                            &name,
                            &uid,
                            "InvalidHealthCheck",
                            format!("annotation {HEALTH_CHECK_ANNOTATION}: {e}; the service keeps its current check"),
                        ));
                        state
                            .services
                            .get(&hf_name)
                            .and_then(|s| s.health_check.clone())
                    }
                };
                let affinity_timeout_s = match affinity {
                    Some(a) => a,
                    None => state
                        .services
                        .get(&hf_name)
                        .and_then(|s| s.affinity_timeout_s),
                };
                let hf = HfService {
                    affinity_timeout_s,
                    name: hf_name,
                    vip: *vip,
                    port,
                    proto,
                    table_size: cfg.table_size,
                    mode,
                    health_check,
                    source_ranges,
                };
                want.insert(
                    hf.name.clone(),
                    WantService {
                        svc: hf,
                        backends: backends
                            .into_iter()
                            .map(|((addr, port), state)| WantBackend { addr, port, state })
                            .collect(),
                    },
                );
            }
        }
        if any && is_lb {
            out.statuses.insert((ns, name), vips);
        }
    }

    diff(state, &want, &mut out);
    health_notes(services, state, &mut out);
    out.notes.sort();
    out.notes.dedup();
    out
}

/// Warning Events for the ServiceSpec fields that ask for something
/// Holdfast does otherwise (docs/operations.md has the table of every
/// field: honoured, answered here, or not applicable).
fn spec_notes(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    mode: ForwardingMode,
    (ns, name, uid): (&str, &str, &str),
    out: &mut Plan,
) {
    let mut say = |reason: &'static str, msg: String| {
        out.notes.push(note("Service", ns, name, uid, reason, msg))
    };
    if spec.external_traffic_policy.as_deref() == Some("Local") {
        say(
            "ExternalTrafficPolicy",
            match mode {
                ForwardingMode::Dsr => "spec.externalTrafficPolicy: Local: Holdfast sends each flow to any ready endpoint, at the pod's own address, and the client's address is preserved already (DSR); on the endpoint's host Local keeps the VIP's delivery on that node".into(),
                ForwardingMode::Snat => "spec.externalTrafficPolicy: Local: Holdfast sends each flow to any ready endpoint (not only those on one node); in SNAT mode the backends see an LB node's SNAT address, not the client's (DSR preserves it)".into(),
            },
        );
    }
    if let Some(d) = &spec.traffic_distribution {
        say(
            "TrafficDistribution",
            format!("spec.trafficDistribution: {d} is not honoured: Holdfast spreads flows over every ready endpoint by Maglev"),
        );
    }
}

/// spec.sessionAffinity as the services' client affinity timeout:
/// `Some(None)` none, `Some(Some(s))` ClientIP with its timeout (Kubernetes'
/// default when sessionAffinityConfig does not say), `None` when the field
/// is malformed (reported; each port keeps its current affinity).
fn session_affinity(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    (ns, name, uid): (&str, &str, &str),
    out: &mut Plan,
) -> Option<Option<u32>> {
    use raft_store::cluster::{DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S};
    let bad = |out: &mut Plan, why: String| {
        out.notes.push(note(
            "Service",
            ns,
            name,
            uid,
            "InvalidSessionAffinity",
            format!("{why}; the service keeps its current affinity"),
        ));
        None
    };
    match spec.session_affinity.as_deref() {
        None | Some("None") => Some(None),
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(Some(t)),
                    _ => bad(
                        out,
                        format!(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t}: must be 1..={MAX_AFFINITY_TIMEOUT_S}"
                        ),
                    ),
                },
            }
        }
        Some(other) => bad(
            out,
            format!("spec.sessionAffinity {other:?}: use None or ClientIP"),
        ),
    }
}

/// Events for the owned services' backends the tier marked down, and for
/// services in health panic (recorded once per message).
fn health_notes(services: &[Service], state: &ClusterState, out: &mut Plan) {
    for s in state.services.values().filter(|s| s.health_check.is_some()) {
        let Some((ns, name)) = owner_of(&s.name) else {
            continue;
        };
        let uid = services
            .iter()
            .find(|k| {
                k.metadata.namespace.as_deref() == Some(ns.as_str())
                    && k.metadata.name.as_deref() == Some(name.as_str())
            })
            .and_then(|k| k.metadata.uid.clone())
            .unwrap_or_default();
        for b in state.backends_of(&s.name) {
            if b.health != raft_store::cluster::Health::Up {
                out.notes.push(note(
                    "Service",
                    &ns,
                    &name,
                    &uid,
                    "BackendUnhealthy",
                    format!(
                        "backend {} of {}:{}/{} fails its health check on a quorum of LB nodes: {}",
                        b.addr, s.vip, s.port, s.proto, b.health
                    ),
                ));
            }
        }
        if let Some(why) = state.health_panic(&s.name) {
            out.notes.push(note(
                "Service",
                &ns,
                &name,
                &uid,
                "HealthPanic",
                format!("{}:{}/{}: {why}", s.vip, s.port, s.proto),
            ));
        }
    }
}

/// Events for LB nodes whose own checks fail a backend the tier keeps up
/// (the leader's `GET /health` table): the node's path may be at fault.
pub fn view_notes(
    services: &[Service],
    state: &ClusterState,
    table: &holdfast_api::wire::HealthTable,
) -> Vec<Note> {
    let mut out = Vec::new();
    for row in table.backends.iter().filter(|r| !r.disagree.is_empty()) {
        let Some(s) = state.services.get(&row.service) else {
            continue;
        };
        let Some((ns, name)) = owner_of(&s.name) else {
            continue;
        };
        let uid = services
            .iter()
            .find(|k| {
                k.metadata.namespace.as_deref() == Some(ns.as_str())
                    && k.metadata.name.as_deref() == Some(name.as_str())
            })
            .and_then(|k| k.metadata.uid.clone())
            .unwrap_or_default();
        for n in &row.disagree {
            let detail = row
                .views
                .iter()
                .find(|v| v.node_id == *n)
                .map(|v| v.detail.clone())
                .unwrap_or_default();
            out.push(note(
                "Service",
                &ns,
                &name,
                &uid,
                "NodeViewDiffers",
                format!(
                    "LB node {n} sees backend {} of {}:{}/{} {} ({detail}); the tier's verdict is {}",
                    row.addr,
                    s.vip,
                    s.port,
                    s.proto,
                    if row.health == raft_store::cluster::Health::Down { "up" } else { "down" },
                    row.health
                ),
            ));
        }
    }
    out
}

fn diff(state: &ClusterState, want: &BTreeMap<String, WantService>, out: &mut Plan) {
    let mut removes = Vec::new();
    let mut puts = Vec::new();
    let mut adds = Vec::new();
    let mut states = Vec::new();
    for s in state
        .services
        .values()
        .filter(|s| s.name.starts_with(OWNED_PREFIX))
    {
        if !want.contains_key(&s.name) {
            removes.push(Command::RemoveService {
                name: s.name.clone(),
            });
        }
    }
    for (name, w) in want {
        let have = state.services.get(name);
        if have != Some(&w.svc) {
            puts.push(Command::PutService {
                service: w.svc.clone(),
            });
        }
        let existing: BTreeMap<(IpAddr, u16), (u32, BackendState)> = state
            .backends
            .values()
            .filter(|b| &b.service == name)
            .map(|b| ((b.addr, b.port), (b.id, b.state)))
            .collect();
        let wanted: BTreeMap<(IpAddr, u16), BackendState> = w
            .backends
            .iter()
            .map(|b| ((b.addr, b.port), b.state))
            .collect();
        for (k, (id, st)) in &existing {
            match wanted.get(k) {
                None => removes.push(Command::RemoveBackend { id: *id }),
                Some(ws) if ws != st => states.push(Command::SetBackendState {
                    id: *id,
                    state: *ws,
                }),
                _ => {}
            }
        }
        for (k, ws) in &wanted {
            // A terminating endpoint that never was a backend is not added.
            if !existing.contains_key(k) && *ws == BackendState::Active {
                adds.push(Command::AddBackend {
                    service: name.clone(),
                    addr: k.0,
                    port: k.1,
                    weight: 1,
                });
            }
        }
    }
    out.commands.extend(removes);
    out.commands.extend(puts);
    out.commands.extend(adds);
    out.commands.extend(states);
}

#[cfg(test)]
mod tests;
