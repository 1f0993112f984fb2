//! The commands about nodes: status, drain, members, top, the config,
//! joins and removals, a node's conntrack entries.

use std::{net::IpAddr, time::Duration};

use anyhow::anyhow;
use holdfast_api::wire::{CtRow, DrainRequest, LocalStatus, MemberRow, RemoveRequest};
use raft_store::{cluster::Member, ClusterState};

use crate::{
    args::Output,
    ctx::{applied, opt, print, table, write, Ctx},
    error::Failure,
};

/// `clusterctl top`: per-service rates over every node, per-node health.
pub fn top(cx: &Ctx, interval_s: f64, once: bool) -> Result<(), Failure> {
    if !(interval_s > 0.0 && interval_s <= 3600.0) {
        return Err(Failure::Other(anyhow!("--interval-s must be in (0, 3600]")));
    }
    let interval = Duration::from_secs_f64(interval_s);
    loop {
        let v = crate::top::sample(&cx.client, &cx.node, interval)?;
        if !once && matches!(cx.cli.output, Output::Table) {
            // Clear the screen and go home.
            print!("\x1b[2J\x1b[H");
        }
        print(cx.cli.output, &v, |v| {
            let mut s = table(
                &[
                    "SERVICE",
                    "PKT/S",
                    "BYTES/S",
                    "NEW FLOWS/S",
                    "MIDFLOW MISS/S",
                ],
                v.services
                    .iter()
                    .map(|r| {
                        vec![
                            r.service.clone(),
                            format!("{:.0}", r.packets_per_s),
                            format!("{:.0}", r.bytes_per_s),
                            format!("{:.1}", r.new_flows_per_s),
                            format!("{:.1}", r.midflow_misses_per_s),
                        ]
                    })
                    .collect(),
            );
            s.push('\n');
            s += &table(
                &["NODE", "ROLE", "EPOCH", "CONNTRACK", "SYNC", "BGP"],
                v.nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.node_id.to_string(),
                            n.role.clone().unwrap_or_else(|| "unreachable".into()),
                            opt(&n.applied_epoch),
                            opt(&n.conntrack_entries),
                            match n.sync_ready {
                                Some(true) => "ready".into(),
                                Some(false) => "joining".into(),
                                None => "-".into(),
                            },
                            match n.bgp_announced {
                                Some(true) => "announced".into(),
                                Some(false) => "withdrawn".into(),
                                None => "-".into(),
                            },
                        ]
                    })
                    .collect(),
            );
            s
        })?;
        if once {
            break;
        }
    }
    Ok(())
}

/// `clusterctl drain` / `undrain`: withdraw or announce this node's VIPs.
pub fn drain(cx: &Ctx, drain: bool) -> Result<(), Failure> {
    let s = post_drain(cx, drain)?;
    print(cx.cli.output, &s, |s| {
        format!(
            "node {}: {} (BGP {})\n",
            s.node_id,
            if s.draining { "drained" } else { "not drained" },
            match s.bgp_announced {
                Some(true) => "announced",
                Some(false) => "withdrawn",
                None => "off",
            }
        )
    })
}

/// The admin address of member `id`, from the members list of the node
/// clusterctl talks to.
pub fn admin_addr_of(cx: &Ctx, id: u64) -> Result<String, Failure> {
    let rows: Vec<MemberRow> = cx.get("/cluster/members")?;
    let Some(row) = rows.iter().find(|r| r.node_id == id) else {
        return Err(Failure::Other(anyhow!(
            "no member with node id {id} (members: {})",
            rows.iter()
                .map(|r| r.node_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    row.admin_addr.clone().ok_or_else(|| {
        Failure::Other(anyhow!(
            "member {id} ({}) has no admin address in the cluster config: use --node with its address",
            row.raft_addr
        ))
    })
}

/// POST /drain: the node's status after.
pub fn post_drain(cx: &Ctx, drain: bool) -> Result<LocalStatus, Failure> {
    let t = Duration::from_secs(cx.cli.timeout_s);
    Ok(cx
        .client
        .post(&cx.node, "/drain", &DrainRequest { drain }, t)?)
}

/// After a drain: wait until the node's datapath sees no VIP packet for
/// `quiet` (the routers moved its traffic), then report.
pub fn wait_moved(cx: &Ctx, quiet: Duration, max: Duration) -> Result<(), Failure> {
    let s: LocalStatus = cx.get("/status")?;
    if s.vip_packets.is_none() {
        return Err(Failure::Other(anyhow!(
            "node {} has no datapath: nothing to wait for",
            s.node_id
        )));
    }
    let t = Duration::from_secs(cx.cli.timeout_s);
    match cx.client.wait_traffic_gone(&cx.node, quiet, max, t)? {
        Some(moved) => {
            let s: LocalStatus = cx.get("/status")?;
            print(cx.cli.output, &s, |s| {
                format!(
                    "node {}: traffic moved away {} ms after the drain (no VIP packet for {} ms): it can be stopped\n",
                    s.node_id,
                    moved.as_millis(),
                    quiet.as_millis()
                )
            })
        }
        None => Err(Failure::Other(anyhow!(
            "node {}: still receiving VIP traffic {} s after the drain (is its prefix announced by another speaker, or do clients reach it directly?)",
            s.node_id,
            max.as_secs()
        ))),
    }
}

/// `clusterctl status`: this node's Raft and datapath status.
pub fn status(cx: &Ctx) -> Result<(), Failure> {
    let s: LocalStatus = cx.get("/status")?;
    print(cx.cli.output, &s, |s| {
        format!(
            "node {} ({}) {} term {} leader {} log {} applied {} config epoch {} datapath epoch {} datapath {}\n",
            s.node_id,
            s.raft_addr,
            s.role,
            s.term,
            opt(&s.leader),
            opt(&s.last_log_index),
            opt(&s.last_applied_index),
            s.config_epoch,
            s.applied_epoch,
            if !s.datapath_enabled {
                "disabled"
            } else if s.datapath_attached {
                "attached"
            } else {
                "loaded"
            }
        )
    })
}

/// `clusterctl members`: one row per member.
pub fn members(cx: &Ctx) -> Result<(), Failure> {
    let rows: Vec<MemberRow> = cx.get("/cluster/members")?;
    print(cx.cli.output, &rows, |rows| members_table(rows))
}

/// The members table. An unreachable member's ROLE reads `unreachable [n]`
/// and its error is footnote `[n]` under the table, so one long error
/// does not widen every row.
fn members_table(rows: &[MemberRow]) -> String {
    let mut notes = Vec::new();
    let cells = rows
        .iter()
        .map(|r| {
            let role = r.role.clone().unwrap_or_else(|| {
                notes.push(format!(
                    "[{}] node {}: {}",
                    notes.len() + 1,
                    r.node_id,
                    r.error.as_deref().unwrap_or("no answer")
                ));
                format!("unreachable [{}]", notes.len())
            });
            vec![
                r.node_id.to_string(),
                r.raft_addr.clone(),
                role,
                opt(&r.term),
                opt(&r.last_log_index),
                opt(&r.last_applied_index),
                opt(&r.lag),
                r.heartbeat_age_ms
                    .map(|a| format!("{a}ms"))
                    .unwrap_or_else(|| "-".into()),
                opt(&r.applied_epoch),
                match r.datapath_attached {
                    Some(true) => "attached".into(),
                    Some(false) => "detached".into(),
                    None => "-".into(),
                },
                opt(&r.conntrack_entries),
                match (r.sync_ready, r.sync_peers_connected) {
                    (Some(true), Some(1)) => "ready (1 peer)".into(),
                    (Some(true), Some(n)) => format!("ready ({n} peers)"),
                    (Some(false), _) => "joining".into(),
                    _ => "-".into(),
                },
                r.sync_lag_p99_ms
                    .map(|l| format!("{l:.2}ms"))
                    .unwrap_or_else(|| "-".into()),
                match r.bgp_announced {
                    Some(true) => "announced".into(),
                    Some(false) => "withdrawn".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let mut t = table(
        &[
            "ID",
            "RAFT ADDR",
            "ROLE",
            "TERM",
            "LAST LOG",
            "APPLIED",
            "LAG",
            "HEARTBEAT",
            "EPOCH",
            "DATAPATH",
            "CONNTRACK",
            "SYNC",
            "SYNC LAG P99",
            "BGP",
        ],
        cells,
    );
    for n in notes {
        t += &n;
        t.push('\n');
    }
    t
}

/// `clusterctl config`: the whole replicated config.
pub fn config(cx: &Ctx) -> Result<(), Failure> {
    let c: ClusterState = cx.get("/config")?;
    print(cx.cli.output, &c, |c| {
        serde_json::to_string_pretty(c).unwrap_or_default() + "\n"
    })
}

/// `clusterctl join`: add a node (learner, then voter).
pub fn join(
    cx: &Ctx,
    node_id: &u64,
    raft_addr: &str,
    admin_addr: &str,
    bgp_next_hop: &Option<IpAddr>,
) -> Result<(), Failure> {
    let r = write(
        cx,
        "/cluster/join",
        &Member {
            node_id: *node_id,
            raft_addr: raft_addr.to_string(),
            admin_addr: admin_addr.to_string(),
            bgp_next_hop: *bgp_next_hop,
        },
    )?;
    applied(cx.cli, r)
}

/// `clusterctl leave` / `remove`: take a node out of the cluster.
pub fn remove(cx: &Ctx, node_id: &u64) -> Result<(), Failure> {
    let r = write(cx, "/cluster/remove", &RemoveRequest { node_id: *node_id })?;
    applied(cx.cli, r)
}

/// `clusterctl conntrack`: a node's conntrack entries.
pub fn conntrack(
    cx: &Ctx,
    node_id: &Option<u64>,
    vip: &Option<IpAddr>,
    limit: &usize,
) -> Result<(), Failure> {
    let t = Duration::from_secs(cx.cli.timeout_s);
    let addr = match node_id {
        None => cx.node.clone(),
        Some(id) => {
            let c: ClusterState = cx.get("/config")?;
            c.members
                .get(id)
                .map(|m| m.admin_addr.clone())
                .ok_or_else(|| anyhow!("no member {id}"))?
        }
    };
    let mut path = format!("/conntrack?limit={limit}");
    if let Some(v) = vip {
        path += &format!("&vip={v}");
    }
    let client = match node_id {
        Some(id) if cx.cli.server_name.is_none() => cx.client.clone().for_node(*id),
        _ => cx.client.clone(),
    };
    let rows: Vec<CtRow> = client.get(&addr, &path, t)?;
    print(cx.cli.output, &rows, |rows| {
        table(
            &[
                "CLIENT", "VIP", "PROTO", "BACKEND", "SNAT", "ORIGIN", "FLAGS", "IDLE",
            ],
            rows.iter()
                .map(|r| {
                    vec![
                        r.client.clone(),
                        r.vip.clone(),
                        r.proto.clone(),
                        r.backend_id.to_string(),
                        r.snat.clone().unwrap_or_else(|| "-".into()),
                        r.origin.to_string(),
                        [(r.remote, "remote"), (r.closing, "closing")]
                            .iter()
                            .filter(|(on, _)| *on)
                            .map(|(_, n)| *n)
                            .collect::<Vec<_>>()
                            .join(","),
                        format!("{:.1}s", r.idle_s),
                    ]
                })
                .collect(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64) -> MemberRow {
        serde_json::from_value(serde_json::json!({
            "node_id": id,
            "raft_addr": format!("10.0.0.1{id}:7100"),
            "admin_addr": format!("10.0.0.1{id}:7101"),
            "reachable": false,
        }))
        .expect("a member row from its required fields")
    }

    #[test]
    fn an_unreachable_member_has_its_error_in_a_footnote() {
        let mut up = row(1);
        up.role = Some("leader".into());
        up.sync_ready = Some(true);
        up.sync_peers_connected = Some(1);
        let mut down = row(2);
        down.error = Some(
            "node 10.0.0.12:7101 unreachable: connect: Connection refused (os error 111)".into(),
        );
        let t = members_table(&[up, down]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].contains("ready (1 peer)"), "{t}");
        assert!(!lines[1].contains("peers"), "{t}");
        assert!(lines[2].contains("unreachable [1]"), "{t}");
        assert!(!lines[2].contains("Connection refused"), "{t}");
        assert_eq!(
            lines[3],
            "[1] node 2: node 10.0.0.12:7101 unreachable: connect: Connection refused (os error 111)"
        );
        // The error no longer widens the ROLE column.
        let role_at = lines[0].find("ROLE").expect("ROLE");
        let term_at = lines[0].find("TERM").expect("TERM");
        assert!(term_at - role_at <= "unreachable [1]".len() + 2, "{t}");
    }
}
