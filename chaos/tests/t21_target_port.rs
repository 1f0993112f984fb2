//! t21: `chaos run target-port` — a service whose backends listen on
//! another port than its own (VIP:8009 to the echo servers' 8007) serves
//! real connections in DSR mode (the LB sends the flow to the backend's
//! port and names the service port in the outer header; the backend's
//! decap agent turns the answers' source port back) with the client's own
//! address seen by the backend; the SNAT service (VIP:8008 to 8007) serves
//! them too, the backend seeing an LB node's SNAT address.

mod common;

#[test]
fn t21_target_ports_serve_in_dsr_and_snat_mode() {
    let r = common::run_clean("target-port");
    assert_eq!(r.forwarding, "dsr");
    let c = |k: &str| {
        r.counts
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("count {k} missing: {:?}", r.counts))
    };
    for k in ["tp", "snat"] {
        assert!(c(&format!("{k}_connections")) > 0);
        assert_eq!(
            c(&format!("{k}_answered")),
            c(&format!("{k}_connections")),
            "{k}: {:?}",
            r.counts
        );
    }
    assert_eq!(
        c("tp_seen_client_address"),
        c("tp_connections"),
        "DSR keeps the client's address"
    );
    assert_eq!(
        c("snat_seen_snat_address"),
        c("snat_connections"),
        "SNAT shows a SNAT address"
    );
}
