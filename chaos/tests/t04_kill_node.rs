//! t04: `chaos run kill-node` — an LB node dies silently (switch port down,
//! SIGKILL of holdfast-node and BIRD) under 1000 TCP connections and 200
//! UDP flows; with conntrack replication none of them breaks, and the
//! router drops the dead node's next hop (BFD).

use chaos::scenario::{self, RunOpts};

#[test]
fn t04_kill_node_breaks_nothing() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "t04 builds a lab of network namespaces with BPF and BIRD: run as root"
    );
    let mut opts = RunOpts::new(env!("CARGO_BIN_EXE_chaos").into());
    opts.verbose = true;
    let r = scenario::run("kill-node", &opts).expect("the kill-node scenario runs");
    println!("{}", scenario::describe(&r));
    assert_eq!(
        (r.tcp_total, r.udp_total),
        (1000, 200),
        "every flow was opened"
    );
    assert_eq!(
        (r.tcp_broken, r.udp_broken),
        (0, 0),
        "broken flows: {:?}",
        r.broken_examples
    );
    assert!(r.victim.is_some());
    assert!(
        r.converge_ms.contains_key("route"),
        "the router dropped the dead node"
    );
    // Broken would be ≥ 10 s; a stall over 1 s (+ BIRD 2.0.12's 3 s) is an outage.
    assert!(
        r.max_stall_ms <= 4000,
        "longest stall {} ms",
        r.max_stall_ms
    );
}
