//! t20: `chaos run source-ranges` — the lab's services restricted to the
//! client's subnet serve a second client address with open flows; the
//! ranges narrowed to the first client while those flows are open: the
//! second client's open flows get no answer more, its new connections and
//! queries (IPv4 and IPv6) none at all, and the first client's flows
//! (IPv4 and IPv6) go on without one broken.

mod common;

#[test]
fn t20_source_ranges_refuse_outside_clients_and_narrowing_stops_open_flows() {
    let r = common::run_clean("source-ranges");
    let c = |k: &str| {
        r.counts
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("count {k} missing: {:?}", r.counts))
    };
    assert_eq!(c("inside_broken"), 0, "{:?}", r.counts);
    assert_eq!(c("inside_total"), 1600, "{:?}", r.counts);
    assert!(c("outside_open_flows") > 0 && c("outside_new_attempts") > 0);
    assert_eq!(
        c("outside_total"),
        c("outside_open_flows") + c("outside_new_attempts")
    );
    assert_eq!(c("outside_answered"), 0, "{:?}", r.counts);
    assert!(
        c("refused_packets") >= c("outside_new_attempts"),
        "every refused attempt counted: {:?}",
        r.counts
    );
}
