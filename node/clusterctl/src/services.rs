//! The commands about services and backends.

use anyhow::anyhow;
use holdfast_api::wire::{HealthTable, NodeView};
use raft_store::{
    cluster::{BackendState, Proto, Service},
    ClusterState, Command,
};
use serde::Serialize;

use crate::{
    args::{BeCmd, SvcCmd},
    ctx::{applied, command, print, table, Ctx},
    error::Failure,
};

/// `clusterctl services …`.
pub fn services(cx: &Ctx, cmd: Option<&SvcCmd>) -> Result<(), Failure> {
    match cmd.unwrap_or(&SvcCmd::List) {
        SvcCmd::List => {
            let c: ClusterState = cx.get("/config")?;
            // Refused packets summed over the nodes that answer (the
            // column says how many did).
            let restricted = c.services.values().any(|s| !s.source_ranges.is_empty());
            let refused = if restricted {
                match cx.get::<Vec<holdfast_api::wire::MemberRow>>("/cluster/members") {
                    Ok(rows) => Some(rows),
                    Err(e) => {
                        eprintln!("clusterctl: refused packets are not shown: {e}");
                        None
                    }
                }
            } else {
                None
            };
            let list: Vec<ServiceRow> = c
                .services
                .values()
                .map(|s| ServiceRow {
                    service: s.clone(),
                    source_refused: refused.as_ref().and_then(|rows| {
                        (!s.source_ranges.is_empty()).then(|| {
                            rows.iter()
                                .filter_map(|r| r.source_refused.get(&s.name))
                                .sum()
                        })
                    }),
                })
                .collect();
            print(cx.cli.output, &list, |list| {
                table(
                    &[
                        "NAME",
                        "VIP",
                        "PORT",
                        "PROTO",
                        "FORWARDING",
                        "TABLE",
                        "BACKENDS",
                        "CHECK",
                        "SOURCES",
                        "REFUSED",
                        "AFFINITY",
                    ],
                    list.iter()
                        .map(|r| {
                            let s = &r.service;
                            vec![
                                s.name.clone(),
                                s.vip.to_string(),
                                s.port.to_string(),
                                s.proto.to_string(),
                                s.mode.to_string(),
                                s.table_size.to_string(),
                                c.backends_of(&s.name).count().to_string(),
                                s.health_check
                                    .as_ref()
                                    .map(|h| {
                                        format!(
                                            "{} every {} ms, rise {} fall {}",
                                            h.kind, h.interval_ms, h.rise, h.fall
                                        )
                                    })
                                    .unwrap_or_else(|| "-".into()),
                                sources_cell(&s.source_ranges),
                                r.source_refused
                                    .map_or_else(|| "-".into(), |n| n.to_string()),
                                s.affinity_timeout_s
                                    .map_or_else(|| "-".into(), |t| format!("client {t}s")),
                            ]
                        })
                        .collect(),
                )
            })
        }
        SvcCmd::Add {
            name,
            vip,
            port,
            proto,
            table_size,
            forwarding,
            source_ranges,
            affinity,
            check,
        } => {
            let health_check = check.build(*port)?;
            let proto = match proto.to_ascii_lowercase().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                other => return Err(anyhow!("--proto {other:?}: use tcp or udp").into()),
            };
            let r = command(
                cx,
                Command::PutService {
                    service: Service {
                        name: name.clone(),
                        vip: *vip,
                        port: *port,
                        proto,
                        table_size: *table_size,
                        mode: *forwarding,
                        health_check,
                        source_ranges: ranges(source_ranges)?,
                        affinity_timeout_s: *affinity,
                    },
                },
            )?;
            applied(cx.cli, r)
        }
        SvcCmd::Set {
            name,
            forwarding,
            table_size,
            source_ranges,
            any_source,
            affinity,
            no_affinity,
        } => {
            if forwarding.is_none()
                && table_size.is_none()
                && source_ranges.is_none()
                && !any_source
                && affinity.is_none()
                && !no_affinity
            {
                return Err(Failure::Usage(
                    "give what to change: --forwarding dsr|snat, --table-size N, \
                     --source-ranges CIDR[,CIDR...], --any-source, --affinity SECONDS \
                     or --no-affinity"
                        .into(),
                ));
            }
            let c: ClusterState = cx.get("/config")?;
            let mut svc = c
                .services
                .get(name)
                .cloned()
                .ok_or_else(|| Failure::Usage(format!("no service {name:?}")))?;
            if let Some(f) = forwarding {
                svc.mode = *f;
            }
            if let Some(t) = table_size {
                svc.table_size = *t;
            }
            if let Some(r) = source_ranges {
                svc.source_ranges = ranges(r)?;
            }
            if *any_source {
                svc.source_ranges.clear();
            }
            if affinity.is_some() {
                svc.affinity_timeout_s = *affinity;
            }
            if *no_affinity {
                svc.affinity_timeout_s = None;
            }
            applied(cx.cli, command(cx, Command::PutService { service: svc })?)
        }
        SvcCmd::Remove { name } => {
            let r = command(cx, Command::RemoveService { name: name.clone() })?;
            applied(cx.cli, r)
        }
        SvcCmd::Check { name, check, none } => {
            let c: ClusterState = cx.get("/config")?;
            let mut svc = c
                .services
                .get(name)
                .cloned()
                .ok_or_else(|| Failure::Usage(format!("no service {name:?}")))?;
            svc.health_check = match (none, check.build(svc.port)?) {
                (true, _) => None,
                (false, Some(hc)) => Some(hc),
                (false, None) => {
                    return Err(Failure::Usage(
                        "give --check TYPE (and its settings) or --none".into(),
                    ))
                }
            };
            applied(cx.cli, command(cx, Command::PutService { service: svc })?)
        }
    }
}

/// A service as `clusterctl services` lists it.
#[derive(Serialize)]
struct ServiceRow {
    #[serde(flatten)]
    service: Service,
    /// Packets refused for their source, summed over the nodes that
    /// answered (only services with source ranges).
    #[serde(skip_serializing_if = "Option::is_none")]
    source_refused: Option<u64>,
}

fn sources_cell(r: &[String]) -> String {
    match r {
        [] => "any".into(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} +{}", rest.len()),
    }
}

/// `--source-ranges` checked here, so a typo is named before anything is
/// sent: CIDRs with their network address.
fn ranges(v: &[String]) -> Result<Vec<String>, Failure> {
    let mut out = Vec::new();
    for r in v.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        raft_store::cluster::parse_cidr(r)
            .map_err(|e| Failure::Usage(format!("--source-ranges {r:?}: {e}")))?;
        out.push(r.to_string());
    }
    if !v.is_empty() && out.is_empty() {
        return Err(Failure::Usage(
            "--source-ranges: no CIDR given (--any-source lifts the ranges)".into(),
        ));
    }
    Ok(out)
}

/// `clusterctl backends …`.
pub fn backends(cx: &Ctx, cmd: Option<&BeCmd>) -> Result<(), Failure> {
    match cmd.unwrap_or(&BeCmd::List { service: None }) {
        BeCmd::List { service } => {
            let c: ClusterState = cx.get("/config")?;
            let checked = c.services.values().any(|s| s.health_check.is_some());
            // Each node's view lives on the leader (GET /health).
            let (health, health_error) = if checked {
                match cx.get::<HealthTable>("/health") {
                    Ok(t) => (Some(t), None),
                    Err(e) => (None, Some(e.to_string())),
                }
            } else {
                (None, None)
            };
            let rows: Vec<BackendRow> = c
                .backends
                .values()
                .filter(|b| service.as_ref().is_none_or(|s| &b.service == s))
                .map(|b| {
                    let row = health
                        .as_ref()
                        .and_then(|t| t.backends.iter().find(|r| r.backend_id == b.id));
                    let checked = c
                        .services
                        .get(&b.service)
                        .is_some_and(|s| s.health_check.is_some());
                    BackendRow {
                        backend: b.clone(),
                        checked,
                        views: row.map(|r| r.views.clone()).unwrap_or_default(),
                        disagree: row.map(|r| r.disagree.clone()).unwrap_or_default(),
                    }
                })
                .collect();
            if let Some(e) = &health_error {
                eprintln!("clusterctl: the nodes' views are not shown: {e}");
            }
            print(cx.cli.output, &rows, |list| {
                let mut t = table(
                    &[
                        "ID", "SERVICE", "ADDRESS", "PORT", "WEIGHT", "STATE", "HEALTH", "VIEWS",
                    ],
                    list.iter()
                        .map(|r| {
                            let b = &r.backend;
                            vec![
                                b.id.to_string(),
                                b.service.clone(),
                                b.addr.to_string(),
                                b.port.to_string(),
                                b.weight.to_string(),
                                format!("{:?}", b.state).to_lowercase(),
                                if r.checked {
                                    b.health.to_string()
                                } else {
                                    "-".into()
                                },
                                views_cell(r),
                            ]
                        })
                        .collect(),
                );
                if let Some(h) = &health {
                    for (svc, why) in &h.panic {
                        t += &format!("ALERT {svc}: {why}\n");
                    }
                }
                t
            })
        }
        BeCmd::Add {
            service,
            addr,
            port,
            weight,
        } => {
            let port = match port {
                Some(p) => *p,
                None => {
                    let c: ClusterState = cx.get("/config")?;
                    c.services
                        .get(service)
                        .map(|s| s.port)
                        .ok_or_else(|| anyhow!("no service {service:?}"))?
                }
            };
            let r = command(
                cx,
                Command::AddBackend {
                    service: service.clone(),
                    addr: *addr,
                    port,
                    weight: *weight,
                },
            )?;
            applied(cx.cli, r)
        }
        BeCmd::Remove { id } => applied(cx.cli, command(cx, Command::RemoveBackend { id: *id })?),
        BeCmd::Drain { id } => applied(
            cx.cli,
            command(
                cx,
                Command::SetBackendState {
                    id: *id,
                    state: BackendState::Draining,
                },
            )?,
        ),
        BeCmd::Undrain { id } => applied(
            cx.cli,
            command(
                cx,
                Command::SetBackendState {
                    id: *id,
                    state: BackendState::Active,
                },
            )?,
        ),
        BeCmd::Weight { id, weight } => applied(
            cx.cli,
            command(
                cx,
                Command::SetBackendWeight {
                    id: *id,
                    weight: *weight,
                },
            )?,
        ),
    }
}

/// A row of `clusterctl backends`: the backend as configured, with each
/// node's view of its checks.
#[derive(Serialize)]
struct BackendRow {
    #[serde(flatten)]
    backend: raft_store::cluster::Backend,
    /// Its service has a health check.
    checked: bool,
    /// Each node's view (from the leader), empty without a check.
    views: Vec<NodeView>,
    /// Nodes whose fresh view differs from the tier's verdict.
    disagree: Vec<u64>,
}

/// "1:up 2:down(connect refused) 3:up"; a stale view is marked "?".
fn views_cell(r: &BackendRow) -> String {
    if r.views.is_empty() {
        return "-".into();
    }
    r.views
        .iter()
        .map(|v| {
            let st = if v.up { "up" } else { "down" };
            let stale = if v.fresh { "" } else { "?" };
            if v.up {
                format!("{}:{st}{stale}", v.node_id)
            } else {
                format!("{}:{st}{stale}({})", v.node_id, v.detail)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
