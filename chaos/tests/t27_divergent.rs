//! t27: divergent replication in the lab (`--sync-mode divergent`): the
//! LB nodes replicate only what their peers' tables would not rebuild, and
//! a table change is prepared on every node before the leader switches
//! the tier. `churn-then-kill` (three table changes, then the busiest
//! node killed) and `kill-during-prepare` (a node's agent stopped, a
//! backend added, the node killed during the prepare) break no flow; the
//! change still comes into force on the survivors.

mod common;

use holdfast_node::config::SyncMode;

#[test]
fn t27_divergent_replication_keeps_every_flow_through_changes_and_deaths() {
    for name in ["churn-then-kill", "kill-during-prepare"] {
        let r = common::run_clean_with(name, |o| o.sync_mode = SyncMode::Divergent);
        assert_eq!(r.sync_mode, SyncMode::Divergent);
        assert!(
            r.converge_ms.contains_key("route"),
            "{name}: a node was killed: {:?}",
            r.converge_ms
        );
        if name == "kill-during-prepare" {
            assert!(
                r.converge_ms.contains_key("change_applied"),
                "the change came into force on the survivors: {:?}",
                r.converge_ms
            );
        }
    }
}
