//! t18: `chaos run health` — active health checks the tier agrees on, in
//! the BGP/ECMP lab (3 LB nodes, 4 backends; checks every 500 ms, down
//! after 2 failures, up after 2 passes, 1 s hold-down), under 1000 TCP +
//! 200 UDP long-lived flows (and IPv6 beside them) and 200 new
//! connections a second:
//! - backend 1's servers stop: every node marks it down and runs that
//!   epoch within fall × interval plus one interval and 2 s, and no
//!   connection opened after that fails (none goes to the dead backend);
//!   its servers start again: up everywhere within rise × interval plus
//!   the hold-down plus the same slack, and it gets new flows again;
//! - node 3 alone cannot reach backend 2 (nftables on that node): the
//!   backend stays up everywhere, the leader's `GET /health` shows node 3
//!   disagreeing and node 3's `holdfast_backend_check_up` is 0;
//! - only flows on the dead backend broke (0 on the others, IPv4 and IPv6);
//! - backend 3's decap agent stops: direct checks still pass (they do
//!   not cover it); switched to checks through the VIP path (IPIP and
//!   IPv6-in-IPv6 from the LB node) it is marked down, the healthy
//!   backends pass, and it is up again once the agent runs;
//! - every backend fails: the TCP service keeps a healthy set (failing)
//!   and `holdfast_service_health_panic` is 1 on every node.

use chaos::scenario::{self, RunOpts};

#[test]
fn t18_health_checks_agree_across_the_tier() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the scenario builds a lab of network namespaces with BPF and BIRD: run as root"
    );
    let mut opts = RunOpts::new(env!("CARGO_BIN_EXE_chaos").into());
    opts.verbose = true;
    opts.short_per_s = 200;
    let r = scenario::run("health", &opts).unwrap_or_else(|e| panic!("health: {e:#}"));
    println!("{}", scenario::describe(&r));
    for k in [
        "marked_down_everywhere",
        "marked_up_everywhere",
        "panic_everywhere",
        "all_up_again",
    ] {
        assert!(r.converge_ms.contains_key(k), "{k}: {:?}", r.converge_ms);
    }
    let c = &r.counts;
    assert_eq!(c["short_failed_after_marked_down"], 0, "{c:?}");
    assert!(
        c["entries_to_victim_after_up"] > c["entries_to_victim_before_kill"],
        "the recovered backend gets new flows again: {c:?}"
    );
    assert_eq!(c["lonely_node_check_up_metric"], 0, "{c:?}");
    assert!(c["lonely_view_disagrees"] >= 4, "all four services: {c:?}");
    assert_eq!(c["broken_on_other_backends"], 0, "{c:?}");
    assert_eq!(c["v6_broken_on_other_backends"], 0, "{c:?}");
    assert!(
        c["broken_on_dead_backend"] > 0,
        "the dead backend had flows: {c:?}"
    );
    assert!(c["kept_when_all_fail"] >= 1, "{c:?}");
    assert_eq!(c["direct_checks_miss_dead_decap"], 1, "{c:?}");
    assert_eq!(
        c["vip_checks_pass_on_healthy"], c["healthy_backend_ids"],
        "every healthy backend passes through the VIP path: {c:?}"
    );
    assert!(r
        .converge_ms
        .contains_key("vip_check_marked_dead_decap_down"));
    assert!(r.converge_ms.contains_key("vip_check_marked_decap_up"));
    assert!(r.short.ok > 1000, "short connections ran: {:?}", r.short);
}
