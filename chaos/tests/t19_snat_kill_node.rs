//! t19: `chaos run kill-node --forwarding snat` — the lab's services are
//! SNAT (backends run plain servers: no decap agent, no VIP); an LB node
//! dies silently under 1000 TCP connections and 200 UDP flows (and the
//! IPv6 ones): with conntrack replication none of them breaks, and the
//! survivors forward the dead node's flows with its SNAT address and port
//! (the backends' replies reach them by its host route's backup path).

mod common;

#[test]
fn t19_snat_flows_survive_a_dead_node() {
    let r = common::run_clean_with("kill-node", |o| {
        o.forwarding = raft_store::cluster::ForwardingMode::Snat;
    });
    assert_eq!(r.forwarding, "snat");
    assert!(r.victim.is_some());
    let snat = r.counts.get("snat_entries").copied().unwrap_or(0);
    let of_victim = r.counts.get("snat_entries_of_victim").copied().unwrap_or(0);
    assert!(
        snat >= 1600,
        "every flow is SNAT'd on the survivors: {snat} SNAT entries ({:?})",
        r.counts
    );
    assert!(
        of_victim > 0,
        "survivors carry the dead node's flows with its SNAT address: {:?}",
        r.counts
    );
    assert!(r.converge_ms.contains_key("route"));
}
