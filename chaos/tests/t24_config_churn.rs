//! t24: `chaos run config-churn` with BIRD and with FRR (on the LB nodes
//! and the router): 200 services added and removed and a VIP pool added
//! and removed while the lab's flows run leave every BGP session of the
//! router established since the same moment — no speaker is ever
//! reloaded or reset by a config change — and no flow breaks.

mod common;

use holdfast_bgp::Speaker;

#[test]
fn t24_config_changes_never_touch_bgp_sessions() {
    for speaker in [Speaker::Bird, Speaker::Frr] {
        let r = common::run_clean_with("config-churn", |o| {
            o.bgp = speaker;
            o.router = speaker;
        });
        let c = |k: &str| {
            r.counts
                .get(k)
                .copied()
                .unwrap_or_else(|| panic!("count {k} missing: {:?}", r.counts))
        };
        assert_eq!(r.bgp, speaker.to_string());
        assert_eq!((c("services_added"), c("services_removed")), (200, 200));
        assert_eq!(c("sessions"), 3, "{speaker}: one session per LB node");
        assert_eq!(c("sessions_reset"), 0, "{speaker}: {:?}", r.counts);
    }
}
