//! t23: `chaos run kill-node --bgp frr --router frr` — the lab with FRR as
//! the LB nodes' speaker (driven by holdfast-node through vtysh) and as
//! the router (BFD, ECMP over the LB nodes): an LB node dies silently and
//! every connection and flow survives, as with BIRD.

mod common;

use holdfast_bgp::Speaker;

#[test]
fn t23_kill_node_with_frr_on_the_lb_nodes_and_the_router() {
    let r = common::run_clean_with("kill-node", |o| {
        o.bgp = Speaker::Frr;
        o.router = Speaker::Frr;
    });
    assert_eq!((r.bgp.as_str(), r.router.as_str()), ("frr", "frr"));
    assert!(r.victim.is_some(), "a node was killed");
    assert!(
        r.converge_ms.get("route").is_some_and(|ms| *ms < 4000),
        "the router dropped the dead node by BFD: {:?}",
        r.converge_ms
    );
}
