//! t14: `chaos run kill-two` — in a tier of 5 LB nodes, the Raft leader
//! and the node carrying the most flows die in the same second (a rack
//! switch), under 1000 TCP connections, 200 UDP flows and 100 new short
//! connections a second, with a backend change in flight. With
//! replication none of the long-lived flows breaks, the three survivors
//! elect a leader and commit the change exactly once, and the router
//! sends everything to them.

mod common;

#[test]
fn t14_two_nodes_die_together_nothing_breaks() {
    let r = common::run_clean_with("kill-two", |o| o.short_per_s = 100);
    assert_eq!(r.nodes, 5, "kill-two runs with 5 LB nodes");
    for k in ["election", "route", "change_committed", "second_kill"] {
        assert!(r.converge_ms.contains_key(k), "{k}: {:?}", r.converge_ms);
    }
    assert!(
        r.converge_ms["second_kill"] < 1000,
        "both nodes died within a second: {:?}",
        r.converge_ms
    );
    assert!(r.short.ok > 100, "short connections ran: {:?}", r.short);
    println!("short connections: {:?}", r.short);
}
