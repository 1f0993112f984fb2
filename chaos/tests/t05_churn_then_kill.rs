//! t05: `chaos run churn-then-kill` with and without replication. Backends
//! are added, drained and reweighted (the Maglev tables change while the
//! flows keep their backends through conntrack), then the LB node carrying
//! the most flows dies. With replication every flow survives; without it
//! the surviving nodes pick by the new tables and break the moved flows —
//! the failure of the classic design this product fixes. IPv6 flows run
//! beside the IPv4 ones and are counted apart.

use chaos::scenario::{self, RunOpts};

#[test]
fn t05_churn_then_kill_with_and_without_replication() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "t05 builds a lab of network namespaces with BPF and BIRD: run as root"
    );
    let mut opts = RunOpts::new(env!("CARGO_BIN_EXE_chaos").into());
    opts.verbose = true;
    let on = scenario::run("churn-then-kill", &opts).expect("runs with replication");
    println!("{}", scenario::describe(&on));
    assert_eq!((on.tcp_total, on.udp_total), (1000, 200));
    assert_eq!(
        (on.tcp_broken, on.udp_broken),
        (0, 0),
        "with replication: {:?}",
        on.broken_examples
    );
    assert!(
        on.max_stall_ms <= 4000,
        "longest stall {} ms",
        on.max_stall_ms
    );
    assert_eq!((on.v6.tcp_total, on.v6.udp_total), (300, 100));
    assert_eq!(
        (on.v6.tcp_broken, on.v6.udp_broken),
        (0, 0),
        "IPv6 with replication: {:?}",
        on.v6.broken_examples
    );

    opts.sync = false;
    let off = scenario::run("churn-then-kill", &opts).expect("runs without replication");
    println!("{}", scenario::describe(&off));
    assert_eq!((off.tcp_total, off.udp_total), (1000, 200));
    assert!(
        off.tcp_broken > 0 && off.udp_broken > 0,
        "without replication the moved flows should break: tcp {} udp {}",
        off.tcp_broken,
        off.udp_broken
    );
    assert!(
        off.v6.tcp_broken + off.v6.udp_broken > 0,
        "without replication moved IPv6 flows break too: {:?}",
        off.v6
    );
    // Broken by the backend change, as the design predicts: resets for
    // TCP, another backend answering for UDP.
    assert!(off
        .broken_reasons
        .keys()
        .any(|k| k.starts_with("tcp") && k.contains("reset")));
    assert!(off.broken_reasons.contains_key("udp backend changed"));
}
