//! t08: `chaos run agent-restart` — holdfast-node is SIGKILLed and
//! restarted on a live node: BIRD keeps announcing (the scenario fails if
//! the router stops routing to the node), the pinned XDP program keeps
//! forwarding, and nothing breaks.

mod common;

#[test]
fn t08_agent_restart_breaks_nothing() {
    let r = common::run_clean("agent-restart");
    assert!(
        r.converge_ms.contains_key("ready"),
        "agent-restart: no ready time in {:?}",
        r.converge_ms
    );
}
