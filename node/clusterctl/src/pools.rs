//! `clusterctl pools …`: the VIP pools and the BGP attributes of what the
//! LB nodes announce inside them.

use raft_store::{cluster::VipPool, ClusterState, Command};

use crate::{
    args::PoolCmd,
    ctx::{applied, command, print, table, Ctx},
    error::Failure,
};

pub fn pools(cx: &Ctx, cmd: Option<&PoolCmd>) -> Result<(), Failure> {
    match cmd.unwrap_or(&PoolCmd::List) {
        PoolCmd::List => {
            let c: ClusterState = cx.get("/config")?;
            let rows: Vec<&VipPool> = c.pools.values().collect();
            print(cx.cli.output, &rows, |rows| {
                table(
                    &["NAME", "CIDR", "COMMUNITIES", "LOCAL-PREF"],
                    rows.iter()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                p.cidr.clone(),
                                if p.communities.is_empty() {
                                    "-".into()
                                } else {
                                    p.communities.join(" ")
                                },
                                p.local_pref.map_or("-".into(), |l| l.to_string()),
                            ]
                        })
                        .collect(),
                )
            })
        }
        PoolCmd::Set {
            name,
            cidr,
            communities,
            local_pref,
        } => {
            // Refused here already with the config's own words, before a
            // write (the leader checks it again).
            raft_store::cluster::parse_communities(communities)
                .map_err(|e| Failure::Usage(format!("--community: {e}")))?;
            applied(
                cx.cli,
                command(
                    cx,
                    Command::PutVipPool {
                        pool: VipPool {
                            name: name.clone(),
                            cidr: cidr.clone(),
                            communities: communities.clone(),
                            local_pref: *local_pref,
                        },
                    },
                )?,
            )
        }
        PoolCmd::Remove { name } => applied(
            cx.cli,
            command(cx, Command::RemoveVipPool { name: name.clone() })?,
        ),
    }
}
