//! t06: `chaos run kill-leader` — the Raft leader dies under load while a backend change is in flight: a new leader
//! is elected, the change commits exactly once, no flow breaks.

mod common;

#[test]
fn t06_kill_leader_breaks_nothing() {
    let r = common::run_clean("kill-leader");
    for k in ["election", "change_committed", "route"] {
        assert!(
            r.converge_ms.contains_key(k),
            "kill-leader: no {k} time in {:?}",
            r.converge_ms
        );
    }
}
