//! What a node says about itself: `/status` (and the `/metrics` gauges
//! built from it) and its conntrack entries.

use std::sync::atomic::Ordering;

use holdfast_api::wire::{CtRow, LocalStatus};

use crate::node::Node;

pub fn local_status(node: &Node) -> LocalStatus {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let (entries, attached) = match &node.datapath {
        Some(h) => (
            Some(node.conntrack_entries.load(Ordering::Relaxed)),
            !h.dp.lock().expect("dp").attached().is_empty(),
        ),
        None => (None, false),
    };
    LocalStatus {
        node_id: node.id(),
        raft_addr: node.cfg.raft_addr.to_string(),
        admin_addr: node.cfg.admin_addr.to_string(),
        role: node.role().into(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        last_applied_index: m.last_applied.map(|l| l.index),
        config_epoch: node.sm.current().state.epoch,
        applied_epoch: node.applied_epoch.load(Ordering::Relaxed),
        heartbeat_age_ms: if m.current_leader == Some(node.id()) {
            Some(0)
        } else {
            node.heartbeat.age_ms()
        },
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        replication: m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect()),
        datapath_enabled: node.datapath.is_some(),
        datapath_attached: attached,
        conntrack_entries: entries,
        sync: node.sync.get().map(|s| s.status()),
        bgp_announced: node
            .cfg
            .bgp
            .enabled
            .then(|| node.bgp_announced.load(Ordering::Relaxed)),
        health_error: node.health_error.lock().expect("health").clone(),
        draining: node.draining.load(Ordering::Relaxed),
        certificate: Some(node.credentials.cert()),
        source_refused: source_refused(node),
        vip_packets: vip_packets(node),
    }
}

/// VIP packets the datapath handled (see `LocalStatus::vip_packets`).
fn vip_packets(node: &Node) -> Option<u64> {
    use datapath_ebpf::abi::stat;
    let h = node.datapath.as_ref()?;
    let st = h.dp.lock().expect("dp").stats().ok()?;
    Some(
        // (Overlaps do not matter: it is read for whether it moves.)
        [
            stat::CT_HITS,
            stat::NEW_FLOWS,
            stat::SYN_FLOOD,
            stat::SNAT_REPLIES,
            stat::SRC_REFUSED,
            stat::DROP_NO_BACKEND,
            stat::DROP_FRAGMENT,
            stat::DROP_MALFORMED,
            stat::PASS_VIP_OTHER,
        ]
        .iter()
        .map(|i| st.c[*i])
        .sum(),
    )
}

/// Per service with source ranges: the packets this datapath refused.
fn source_refused(node: &Node) -> std::collections::BTreeMap<String, u64> {
    let Some(h) = &node.datapath else {
        return Default::default();
    };
    let Ok(per) = h.dp.lock().expect("dp").service_stats() else {
        return Default::default();
    };
    let state = node.sm.current();
    state
        .state
        .services
        .values()
        .filter(|s| !s.source_ranges.is_empty())
        .filter_map(|s| {
            let key = datapath_ebpf::abi::SvcKey::new(s.vip, s.port, s.proto.number());
            per.iter().find(|(k, _)| *k == key).map(|(_, v)| {
                (
                    s.name.clone(),
                    v.c[datapath_ebpf::abi::svc_stat::SRC_REFUSED],
                )
            })
        })
        .collect()
}

/// The conntrack entries of this node's datapath, as `GET /conntrack` lists
/// them (at most `limit`, sorted by VIP and client).
pub fn ct_rows(
    dp: &datapath_ebpf::Datapath,
    snat: &raft_store::snat::SnatPools,
    vip: Option<std::net::IpAddr>,
    limit: usize,
) -> datapath_ebpf::Result<Vec<CtRow>> {
    let now = datapath_ebpf::maps::monotonic_now().as_nanos() as u64;
    let mut rows: Vec<CtRow> = dp
        .ct_dump()?
        .into_iter()
        .filter(|(k, _)| vip.is_none() || k.vip() == vip)
        .map(|(k, v)| {
            let sock = |a: Option<std::net::IpAddr>, p: u16| match a {
                Some(std::net::IpAddr::V6(a)) => format!("[{a}]:{p}"),
                Some(a) => format!("{a}:{p}"),
                None => "?".into(),
            };
            CtRow {
                client: sock(k.client(), u16::from_be(k.sport)),
                vip: sock(k.vip(), u16::from_be(k.dport)),
                proto: if k.proto == 6 {
                    "tcp".into()
                } else {
                    "udp".into()
                },
                backend_id: v.backend_id,
                origin: v.origin,
                remote: v.flags & datapath_ebpf::abi::CT_F_REMOTE != 0,
                closing: v.flags & datapath_ebpf::abi::CT_F_CLOSING != 0,
                idle_s: now.saturating_sub(v.last_seen_ns) as f64 / 1e9,
                snat: (v.flags & datapath_ebpf::abi::CT_F_SNAT != 0).then(|| {
                    let port = u16::from_be(v.snat_port);
                    let (v4, v6) = snat.addrs_of_slot(v.snat_slot);
                    let addr = match k.client() {
                        Some(std::net::IpAddr::V6(_)) => v6.map(std::net::IpAddr::V6),
                        _ => v4.map(std::net::IpAddr::V4),
                    };
                    match addr {
                        Some(a) => sock(Some(a), port),
                        None => format!("slot {}:{port}", v.snat_slot),
                    }
                }),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.vip, &a.client).cmp(&(&b.vip, &b.client)));
    rows.truncate(limit);
    Ok(rows)
}
