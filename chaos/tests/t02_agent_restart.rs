//! t02: an agent restart flushes no conntrack and stops no forwarding. The
//! program and maps are pinned; while no agent runs, established connections
//! keep working and new ones are balanced; the next agent adopts the maps
//! (same conntrack entries, same epoch) and atomically replaces the program
//! in the pinned link. Teardown removes every trace. Needs root.

use chaos::dplab::{lab_config, lab_options, DpLab};
use datapath_ebpf::abi::stat;

fn exchange_all(conns: &mut [chaos::dplab::TcpConn], pinned: &[usize], what: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let be = c
            .exchange(&format!("{what} {i}"))
            .unwrap_or_else(|e| panic!("{what}: connection {i} broke: {e}"));
        assert_eq!(be, pinned[i], "{what}: connection {i} moved backend");
    }
}

#[test]
fn t02_agent_restart_keeps_flows() {
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/holdfast-t02-{}", std::process::id()));
    let mut lab = DpLab::up("hfrst", 3).expect("lab up");
    lab.start_datapath(lab_options(Some(pin.clone())), lab_config(1, 3, &[]))
        .expect("datapath");
    let first_prog = lab
        .attached_prog_id()
        .expect("ip")
        .expect("program attached");

    let mut conns = lab.tcp_connect(20, false).expect("connect");
    let pinned: Vec<usize> = conns
        .iter_mut()
        .enumerate()
        .map(|(i, c)| c.exchange(&format!("hello {i}")).expect("first exchange"))
        .collect();
    let entries_before = lab.dp().expect("dp").ct_dump().expect("dump");
    assert!(entries_before.len() >= 20);

    // The agent dies: nothing in user space, the pinned program keeps going.
    lab.kill_agent();
    assert_eq!(lab.attached_prog_id().expect("ip"), Some(first_prog));
    exchange_all(&mut conns, &pinned, "without agent");
    let mut during = lab
        .tcp_connect(5, false)
        .expect("new connections without an agent");
    for c in &mut during {
        c.exchange("new while down").expect("served without agent");
    }

    // The next agent adopts the maps and takes over the link.
    lab.start_datapath(lab_options(Some(pin.clone())), lab_config(2, 3, &[]))
        .expect("restart");
    let dp = lab.dp().expect("dp");
    assert!(dp.adopted(), "maps were adopted from pins");
    assert_eq!(dp.applied_epoch().expect("epoch"), 2);
    let entries_after = dp.ct_dump().expect("dump");
    for (k, v) in &entries_before {
        let now = entries_after
            .iter()
            .find(|(k2, _)| k2 == k)
            .unwrap_or_else(|| panic!("conntrack entry {k:?} lost across restart"));
        assert_eq!(now.1.backend_id, v.backend_id);
    }
    assert!(entries_after.len() >= entries_before.len() + 5);
    let second_prog = lab.attached_prog_id().expect("ip").expect("attached");
    assert_ne!(
        second_prog, first_prog,
        "the new agent's program replaced the old"
    );
    exchange_all(&mut conns, &pinned, "after restart");
    let stats = lab.dp().expect("dp").stats().expect("stats");
    assert_eq!(stats.c[stat::MIDFLOW_MISS], 0, "no flow lost its entry");

    // A backend change after the restart does not move established flows.
    lab.dp()
        .expect("dp")
        .apply(&lab_config(3, 3, &[2]))
        .expect("drain be2");
    exchange_all(&mut conns, &pinned, "after draining be2");

    // Teardown: detached, unpinned.
    let dp = lab.datapath.take().expect("dp");
    dp.teardown().expect("teardown");
    assert_eq!(lab.attached_prog_id().expect("ip"), None);
    assert!(!pin.exists(), "pin directory removed");
}
