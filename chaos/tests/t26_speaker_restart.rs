//! t26: `chaos run speaker-restart`: the busiest LB node's BGP speaker
//! restarts the way an upgrade does (BIRD: `birdc graceful restart`, then
//! `bird -R`; FRR: bgpd stopped and started with its saved config) while
//! its datapath and BFD run on. With graceful restart the router never
//! loses the node's next hop and no flow breaks, with BIRD and with FRR;
//! without it (BIRD, the baseline) the router drops the node until its
//! session is back — which shows the check can fail.

mod common;

use holdfast_bgp::Speaker;

#[test]
fn t26_a_speaker_restart_keeps_the_router_forwarding_to_the_node() {
    for speaker in [Speaker::Bird, Speaker::Frr] {
        let r = common::run_clean_with("speaker-restart", |o| {
            o.bgp = speaker;
            o.router = speaker;
        });
        assert!(r.graceful_restart);
        let ms = |k: &str| {
            r.converge_ms
                .get(k)
                .copied()
                .unwrap_or_else(|| panic!("{k} missing: {:?}", r.converge_ms))
        };
        assert!(ms("session_back") > 0, "{speaker}: the session came back");
        assert_eq!(
            ms("route_missing"),
            0,
            "{speaker}: the router kept the restarting node's route: {:?}",
            r.converge_ms
        );
    }
    let r = common::run_clean_with("speaker-restart", |o| o.graceful_restart = false);
    assert!(!r.graceful_restart);
    assert!(
        r.converge_ms.get("route_missing").is_some_and(|ms| *ms > 0),
        "without graceful restart the router drops the node meanwhile: {:?}",
        r.converge_ms
    );
}
