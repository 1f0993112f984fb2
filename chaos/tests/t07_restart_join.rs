//! t07: `chaos run restart-join` — a killed LB node restarts, warm-joins (conntrack snapshot) before it
//! announces, and ECMP moves flows back to it: none breaks.

mod common;

#[test]
fn t07_restart_join_breaks_nothing() {
    let r = common::run_clean("restart-join");
    for k in ["route_down", "warm_join", "route_up"] {
        assert!(
            r.converge_ms.contains_key(k),
            "restart-join: no {k} time in {:?}",
            r.converge_ms
        );
    }
}
