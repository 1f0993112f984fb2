//! t03: the same forwarding in generic (skb) XDP mode, for NICs without
//! native XDP; and detach restores plain kernel forwarding (the VIP is then
//! unreachable, since no LB balances it). Needs root.

use chaos::dplab::{lab_config, lab_options, DpLab, LB_IF};
use datapath_ebpf::AttachMode;

#[test]
fn t03_generic_mode_forwards_and_detach_stops() {
    let mut lab = DpLab::up("hfgen", 2).expect("lab up");
    lab.start_datapath_mode(
        lab_options(None),
        lab_config(1, 2, &[]),
        AttachMode::Generic,
    )
    .expect("datapath");
    let link = lab.lb.ip(&format!("-d link show {LB_IF}")).expect("ip");
    assert!(
        link.contains("xdpgeneric"),
        "attached in generic mode: {link}"
    );
    for v6 in [false, true] {
        let mut conns = lab.tcp_connect(10, v6).expect("connect");
        for (i, c) in conns.iter_mut().enumerate() {
            c.exchange(&format!("generic {i}")).expect("exchange");
        }
        let u = lab.udp_socket(v6).expect("udp");
        u.exchange("generic udp").expect("udp exchange");
    }
    lab.dp().expect("dp").detach(LB_IF).expect("detach");
    assert_eq!(lab.attached_prog_id().expect("ip"), None);
    assert!(
        lab.tcp_connect(1, false).is_err(),
        "VIP reachable without the LB?"
    );
}
