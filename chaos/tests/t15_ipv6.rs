//! t15: `chaos run ipv6` — the lab is dual-stack; the IPv6 VIP prefix is
//! announced over the same BGP sessions as the IPv4 one (MP-BGP) and the
//! router spreads IPv6 flows over the LB nodes (more than one node created
//! IPv6 flows). After a backend change, the node that created the most
//! IPv6 flows dies: with replication none of the 300 IPv6 TCP connections
//! and 100 IPv6 UDP flows (nor the IPv4 ones) breaks.

mod common;

#[test]
fn t15_ipv6_flows_survive_like_ipv4() {
    let r = common::run_clean("ipv6");
    let spread: Vec<(&String, &u64)> = r
        .counts
        .iter()
        .filter(|(k, _)| k.starts_with("v6_flows_created_by_node_"))
        .collect();
    assert!(spread.len() >= 2, "IPv6 ECMP over the nodes: {spread:?}");
    assert_eq!(
        spread.iter().map(|(_, n)| **n).sum::<u64>(),
        400,
        "every IPv6 flow was created by some node: {spread:?}"
    );
    let v = r.victim.expect("a victim");
    assert!(
        r.counts
            .contains_key(&format!("v6_flows_created_by_node_{v}")),
        "the victim carried IPv6 flows"
    );
    assert!(r.converge_ms.contains_key("route"));
}
