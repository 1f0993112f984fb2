//! t09: `chaos run partition` — one LB node is cut off from its peers (not from the router) for 10 s:
//! forwarding goes on, and after the heal replication repairs (conntrack is
//! identical on every node, including flows opened during the partition).

mod common;

#[test]
fn t09_partition_breaks_nothing() {
    let r = common::run_clean("partition");
    for k in ["repair", "ready"] {
        assert!(
            r.converge_ms.contains_key(k),
            "partition: no {k} time in {:?}",
            r.converge_ms
        );
    }
}
