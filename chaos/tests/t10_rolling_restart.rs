//! t10: `chaos run rolling-restart` — every LB node restarts in turn (SIGTERM: withdraw, keep the pinned
//! datapath; restart; warm join; announce): nothing breaks.

mod common;

#[test]
fn t10_rolling_restart_breaks_nothing() {
    let r = common::run_clean("rolling-restart");
    for k in ["node1_back", "node2_back", "node3_back"] {
        assert!(
            r.converge_ms.contains_key(k),
            "rolling-restart: no {k} time in {:?}",
            r.converge_ms
        );
    }
}
