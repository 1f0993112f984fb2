//! t11: the health check withdraws a node that would black-hole traffic.
//! LB node 2 loses its route to the backend segment: its health check
//! (no backend routable) fails, it withdraws over BGP, the router stops
//! sending it flows and the flows carry on through the others. With the
//! route back it announces again. Then the operator drains node 3
//! (`clusterctl drain`): it withdraws, stays a member, and announces again
//! when undrained. No connection breaks.

use std::time::Duration;

use chaos::{
    lab::{Lab, LabSpec},
    traffic::{Traffic, TrafficSpec},
};

#[test]
fn t11_unhealthy_node_withdraws_and_returns() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "t11 needs root (namespaces, BPF, BIRD)"
    );
    let dir = tempfile_dir();
    let mut spec = LabSpec::new("hfh", dir.clone(), env!("CARGO_BIN_EXE_chaos").into());
    spec.backends = 2;
    let lab = Lab::up(spec).expect("lab up");
    let t = Traffic::start(
        &lab.client,
        TrafficSpec::new(
            chaos::lab::VIP.parse().unwrap(),
            chaos::lab::CLIENT.parse().unwrap(),
            200,
            40,
        ),
    )
    .expect("traffic");
    t.mark();
    t.wait_all_answered(Duration::from_secs(20))
        .expect("answers");

    lab.lb(2)
        .ns
        .ip("route del 10.88.1.0/24")
        .expect("delete the route to the backends");
    lab.wait_status(
        2,
        "node 2 unhealthy and withdrawn",
        Duration::from_secs(10),
        |s| {
            s.health_error
                .as_deref()
                .is_some_and(|e| e.contains("no route to any of the 2 IPv4 backends"))
                && s.bgp_announced == Some(false)
        },
    )
    .expect("node 2 withdraws");
    lab.wait_route(&[1, 3], Duration::from_secs(10))
        .expect("the router drops node 2");
    t.mark();
    t.wait_all_answered(Duration::from_secs(15))
        .expect("flows answer through nodes 1 and 3");

    lab.lb(2)
        .ns
        .ip("route add 10.88.1.0/24 via 10.88.0.1")
        .expect("restore the route");
    lab.wait_status(
        2,
        "node 2 healthy and announced",
        Duration::from_secs(10),
        |s| s.health_error.is_none() && s.bgp_announced == Some(true),
    )
    .expect("node 2 announces again");
    lab.wait_route(&[1, 2, 3], Duration::from_secs(10))
        .expect("the router routes over node 2 again");
    t.mark();
    t.wait_all_answered(Duration::from_secs(15))
        .expect("flows answer");
    let r = t.stop().expect("report");
    assert_eq!(
        (r.tcp_broken, r.udp_broken),
        (0, 0),
        "broken flows: {:?}",
        r.broken.first()
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("holdfast-t11-{}", std::process::id()))
}
