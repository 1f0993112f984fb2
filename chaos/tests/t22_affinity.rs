//! t22: `chaos run affinity` — the lab's echo services with client
//! affinity: 50 clients (40 IPv4, 10 IPv6) open one connection each, then
//! a backend is added and each opens six more, then an LB node dies and
//! each opens six more: every connection reaches its client's first
//! backend (none unanswered), while fresh clients after the addition do
//! reach the new backend (the tables changed) and the lab's long-lived
//! flows survive the node's death.

mod common;

#[test]
fn t22_clients_keep_their_backend_across_a_backend_addition_and_a_node_death() {
    let r = common::run_clean("affinity");
    let c = |k: &str| {
        r.counts
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("count {k} missing: {:?}", r.counts))
    };
    assert_eq!(c("affinity_clients"), 50);
    assert_eq!(c("affinity_connections"), 50 * 13, "{:?}", r.counts);
    assert_eq!(c("affinity_failed"), 0, "{:?}", r.counts);
    assert_eq!(c("affinity_broken"), 0, "{:?}", r.counts);
    assert!(
        c("affinity_backends_used") >= 2,
        "clients spread over backends: {:?}",
        r.counts
    );
    assert!(
        c("fresh_clients_on_new_backend") > 0,
        "the tables changed: {:?}",
        r.counts
    );
    assert!(r.victim.is_some(), "a node was killed");
}
