//! t04: `chaos run kill-node` — an LB node dies silently (switch port down,
//! SIGKILL of holdfast-node and BIRD) under 1000 TCP connections and 200
//! UDP flows; with conntrack replication none of them breaks, and the
//! router drops the dead node's next hop (BFD).

mod common;

#[test]
fn t04_kill_node_breaks_nothing() {
    let r = common::run_clean("kill-node");
    assert!(r.victim.is_some());
    assert!(
        r.converge_ms.contains_key("route"),
        "the router dropped the dead node: {:?}",
        r.converge_ms
    );
}
