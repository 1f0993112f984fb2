//! `clusterctl snat …`: the SNAT pools and every node's SNAT address.

use raft_store::{ClusterState, Command};
use serde::Serialize;

use crate::{
    args::SnatCmd,
    ctx::{applied, command, print, table, Ctx},
    error::Failure,
};

/// A row of `clusterctl snat`: a node's slot and addresses.
#[derive(Serialize)]
struct SlotRow {
    node_id: u64,
    slot: u16,
    v4: Option<std::net::Ipv4Addr>,
    v6: Option<std::net::Ipv6Addr>,
    /// A member now (else its address stays reserved until released).
    member: bool,
}

#[derive(Serialize)]
struct SnatView {
    v4: Option<String>,
    v6: Option<String>,
    nodes: Vec<SlotRow>,
}

pub fn snat(cx: &Ctx, cmd: Option<&SnatCmd>) -> Result<(), Failure> {
    match cmd.unwrap_or(&SnatCmd::List) {
        SnatCmd::List => {
            let c: ClusterState = cx.get("/config")?;
            let view = SnatView {
                v4: c.snat.v4.clone(),
                v6: c.snat.v6.clone(),
                nodes: c
                    .snat
                    .slots
                    .iter()
                    .map(|(id, slot)| {
                        let (v4, v6) = c.snat.addrs_of_slot(*slot);
                        SlotRow {
                            node_id: *id,
                            slot: *slot,
                            v4,
                            v6,
                            member: c.members.contains_key(id),
                        }
                    })
                    .collect(),
            };
            print(cx.cli.output, &view, |v| {
                let mut s = format!(
                    "pools: IPv4 {}, IPv6 {}\n",
                    v.v4.as_deref().unwrap_or("-"),
                    v.v6.as_deref().unwrap_or("-")
                );
                s += &table(
                    &["NODE", "SLOT", "IPV4", "IPV6", "STATE"],
                    v.nodes
                        .iter()
                        .map(|r| {
                            vec![
                                r.node_id.to_string(),
                                r.slot.to_string(),
                                r.v4.map_or("-".into(), |a| a.to_string()),
                                r.v6.map_or("-".into(), |a| a.to_string()),
                                if r.member { "member" } else { "reserved" }.into(),
                            ]
                        })
                        .collect(),
                );
                s
            })
        }
        SnatCmd::Set { v4, v6 } => {
            if v4.is_none() && v6.is_none() {
                return Err(Failure::Usage(
                    "give --v4 CIDR and/or --v6 CIDR (a family left out has no SNAT address)"
                        .into(),
                ));
            }
            applied(
                cx.cli,
                command(
                    cx,
                    Command::PutSnatPools {
                        v4: v4.clone(),
                        v6: v6.clone(),
                    },
                )?,
            )
        }
        SnatCmd::Release { node_id } => applied(
            cx.cli,
            command(cx, Command::ReleaseSnat { node_id: *node_id })?,
        ),
    }
}
