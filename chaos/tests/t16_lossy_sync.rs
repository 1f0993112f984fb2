//! t16: `chaos run lossy-sync` — the links between LB nodes (not to the
//! router) lose 5% of their frames and add 20 ms each way (a tc program
//! drops, a userspace delay line holds: this kernel has no netem). The
//! backends change, 240 new flows open and must replicate over the bad
//! links, then the busiest node dies: nothing breaks. The impairment is
//! checked to be real (ping between LB nodes ≥ 40 ms, frames dropped).

mod common;

#[test]
fn t16_lossy_links_between_nodes_break_nothing() {
    let r = common::run_clean("lossy-sync");
    let c = &r.counts;
    assert!(c["lb_to_lb_rtt_ms"] >= 40, "{c:?}");
    assert!(c["impair_dropped"] > 0 && c["impair_delayed"] > 0, "{c:?}");
    let share = c["impair_dropped"] as f64 / c["impair_matched"] as f64;
    assert!(
        (0.01..0.12).contains(&share),
        "dropped share {share}: {c:?}"
    );
    assert_eq!(c["new_flows_broken"], 0);
    assert!(r.converge_ms.contains_key("replicated_new_flows"));
}
