//! t17: `chaos run kill-during-join` — a replaced LB node (datapath wiped)
//! warm-joins from peers that hold 800 000 entries besides the flows, so
//! its snapshot pull takes seconds; the peer it pulls from dies in the
//! middle. The joiner finishes from the other peer, becomes ready with
//! every flow before it is announced, and nothing breaks.

mod common;

#[test]
fn t17_a_node_dies_while_another_warm_joins() {
    let r = common::run_clean("kill-during-join");
    let c = &r.counts;
    assert_eq!(c.get("killed_during_join"), Some(&1), "{c:?}");
    assert!(c["joiner_flows"] >= 1600, "{c:?}");
    assert!(
        r.converge_ms["join_ready"] > r.converge_ms["pull_started"],
        "{:?}",
        r.converge_ms
    );
}
