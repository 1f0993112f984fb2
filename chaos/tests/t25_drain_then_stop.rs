//! t25: `chaos run drain-then-stop` — the busiest LB node is drained as
//! before maintenance (its VIPs withdrawn, then a wait until its datapath
//! sees no VIP packet for 1 s) and then dies: the router moved its flows on
//! the withdrawal, so none breaks, and the drain reports when the traffic
//! had moved. Then with `drain = "graceful-shutdown"`: the node keeps
//! announcing with the community 65535:0, the router keeps its path at
//! local preference 0 (out of the ECMP route) and moves the traffic the
//! same way.

mod common;

use holdfast_bgp::DrainMode;

#[test]
fn t25_a_drained_node_stops_without_a_broken_flow() {
    let r = common::run_clean("drain-then-stop");
    assert!(r.victim.is_some(), "a node was drained and stopped");
    assert!(
        r.converge_ms.contains_key("traffic_moved"),
        "the drain saw the traffic move: {:?}",
        r.converge_ms
    );
    assert_eq!(r.drain, "withdraw");

    let r = common::run_clean_with("drain-then-stop", |o| o.drain = DrainMode::GracefulShutdown);
    assert_eq!(r.drain, "graceful-shutdown");
    assert!(r.converge_ms.contains_key("traffic_moved"));
    assert_eq!(
        r.counts.get("graceful_shutdown_path_kept"),
        Some(&1),
        "{:?}",
        r.counts
    );
}
