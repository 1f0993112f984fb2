//! Shared by the scenario tests: run one scenario with replication on and
//! check the mission's outcome — every one of the 1000 TCP connections and
//! 200 UDP flows, and of the 300 IPv6 TCP connections and 100 IPv6 UDP
//! flows beside them, survives, and no flow stalls longer than 1 s plus
//! BIRD 2.0.12's 3 s update delay.

use chaos::scenario::{self, RunOpts, ScenarioResult};

#[allow(dead_code)] // not every scenario test uses it
pub fn run_clean(name: &str) -> ScenarioResult {
    run_clean_with(name, |_| {})
}

/// As [`run_clean`], with the options adjusted by `adjust`.
#[allow(dead_code)]
pub fn run_clean_with(name: &str, adjust: impl FnOnce(&mut RunOpts)) -> ScenarioResult {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the scenario tests build labs of network namespaces with BPF and BIRD: run as root"
    );
    let mut opts = RunOpts::new(env!("CARGO_BIN_EXE_chaos").into());
    opts.verbose = true;
    adjust(&mut opts);
    let r = scenario::run(name, &opts).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    println!("{}", scenario::describe(&r));
    assert_eq!(
        (r.tcp_total, r.udp_total),
        (1000, 200),
        "every flow was opened"
    );
    assert_eq!(
        (r.tcp_broken, r.udp_broken),
        (0, 0),
        "{name}: broken flows: {:?}",
        r.broken_examples
    );
    assert_eq!(
        (r.v6.tcp_total, r.v6.udp_total),
        (300, 100),
        "every IPv6 flow was opened"
    );
    assert_eq!(
        (r.v6.tcp_broken, r.v6.udp_broken),
        (0, 0),
        "{name}: broken IPv6 flows: {:?}",
        r.v6.broken_examples
    );
    assert!(
        r.v6.max_stall_ms <= 4000,
        "{name}: longest IPv6 stall {} ms",
        r.v6.max_stall_ms
    );
    assert!(
        r.max_stall_ms <= 4000,
        "{name}: longest stall {} ms",
        r.max_stall_ms
    );
    r
}
