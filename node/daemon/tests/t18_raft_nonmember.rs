//! t18: Raft RPCs are admitted only from members speaking as themselves. A
//! QUIC peer with a valid cluster certificate that is not a member sends
//! well-formed vote, append-entries (with a config command, at a higher
//! term) and install-snapshot RPCs; a member's certificate sends RPCs that
//! claim to come from another node. Every one is refused and counted
//! (`holdfast_raft_rpcs_refused_total`), and nothing lands: every node's
//! term, leader, log and config stay as they were, and the cluster keeps
//! committing. (The conntrack side is t08's non-member check.)

use std::{collections::BTreeSet, sync::atomic::Ordering, time::Duration};

use holdfast_node::config::RaftTuning;
use holdfast_node::raft_net::{RPC_APPEND, RPC_SNAPSHOT, RPC_VOTE};
use holdfast_node::testing::{backend, identity, issue_node, service, Cluster};
use openraft::{
    raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest},
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    StoredMembership, Vote,
};
use raft_store::{Command, Request, TypeConfig};
use sync::transport::{CallError, Transport};

fn snapshot_request(term: u64, from: u64, voters: &[u64]) -> InstallSnapshotRequest<TypeConfig> {
    let log_id = LogId::new(CommittedLeaderId::new(term, from), 1000);
    let voters: BTreeSet<u64> = voters.iter().copied().collect();
    InstallSnapshotRequest {
        vote: Vote::new_committed(term, from),
        meta: SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: StoredMembership::new(
                Some(log_id),
                Membership::<u64, BasicNode>::new(vec![voters], ()),
            ),
            snapshot_id: "rogue".into(),
        },
        offset: 0,
        data: b"{}".to_vec(),
        done: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t18_raft_rpcs_from_non_members_and_impostors_land_nowhere() {
    let c = Cluster::start_with(3, RaftTuning::default(), false).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    c.write(backend("web", "10.0.0.1", 80)).await;
    let epoch = c.wait_converged(Duration::from_secs(10)).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let before: Vec<(u64, Option<u64>, Option<u64>)> = c
        .nodes
        .values()
        .map(|n| {
            let m = n.raft.metrics().borrow().clone();
            (m.current_term, m.current_leader, m.last_log_index)
        })
        .collect();
    let term = before[0].0;
    let last = c.node(leader).raft.metrics().borrow().last_log_index;

    // Node 9: a certificate from the cluster CA, never a member.
    issue_node(&c.pki, 9);
    let rogue = Transport::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &identity(&c.pki, "node-9"),
    )
    .expect("bind");
    // Node 2's own certificate in another process, speaking as node 1.
    let impostor = Transport::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &identity(&c.pki, "node-2"),
    )
    .expect("bind");

    let entry = |idx: u64, from: u64| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(term + 5, from), idx),
        payload: EntryPayload::Normal(Request::from(Command::RemoveService { name: "web".into() })),
    };
    let append = |from: u64| AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term + 5, from),
        prev_log_id: last.map(|i| LogId::new(CommittedLeaderId::new(term, leader), i)),
        entries: vec![entry(last.unwrap_or(0) + 1, from)],
        leader_commit: None,
    };
    let vote = |from: u64| VoteRequest::new(Vote::new(term + 5, from), None);

    let refused_before: u64 = c
        .nodes
        .values()
        .map(|n| n.metrics.raft_rpcs_refused.load(Ordering::Relaxed))
        .sum();
    let mut sent = 0;
    for target in 1..=3u64 {
        let addr = c.node(target).cfg.raft_addr;
        let rpcs: Vec<(&Transport, u8, Vec<u8>, &str)> = vec![
            (&rogue, RPC_VOTE, json(&vote(9)), "not a member"),
            (&rogue, RPC_APPEND, json(&append(9)), "not a member"),
            (
                &rogue,
                RPC_SNAPSHOT,
                json(&snapshot_request(term + 5, 9, &[1, 2, 3])),
                "not a member",
            ),
            (&rogue, RPC_VOTE, json(&vote(1)), "sent an RPC as node 1"),
            (
                &impostor,
                RPC_APPEND,
                json(&append(1)),
                "sent an RPC as node 1",
            ),
            (&impostor, RPC_VOTE, json(&vote(3)), "sent an RPC as node 3"),
            (&rogue, 9, b"{}".to_vec(), "unknown RPC kind"),
            (
                &rogue,
                RPC_APPEND,
                b"{\"vote\":".to_vec(),
                "bad append_entries",
            ),
        ];
        for (t, kind, body, why) in rpcs {
            match t
                .call(target, addr, kind, &body, Duration::from_secs(3))
                .await
            {
                Err(CallError::Remote(e)) => assert!(e.contains(why), "node {target}: {e}"),
                other => panic!("node {target} kind {kind}: {other:?}"),
            }
            sent += 1;
        }
    }
    let refused_after: u64 = c
        .nodes
        .values()
        .map(|n| n.metrics.raft_rpcs_refused.load(Ordering::Relaxed))
        .sum();
    assert_eq!(
        refused_after - refused_before,
        sent,
        "every refusal counted"
    );

    // Nothing landed: same term, leader and log everywhere, same config.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<(u64, Option<u64>, Option<u64>)> = c
        .nodes
        .values()
        .map(|n| {
            let m = n.raft.metrics().borrow().clone();
            (m.current_term, m.current_leader, m.last_log_index)
        })
        .collect();
    assert_eq!(after, before, "a refused RPC changed Raft state");
    for n in c.nodes.values() {
        let s = n.sm.current();
        assert_eq!(s.state.epoch, epoch);
        assert!(s.state.services.contains_key("web"));
    }
    // And the cluster still commits.
    let r = c.write(backend("web", "10.0.0.2", 80)).await;
    assert_eq!(r.epoch, epoch + 1);
    c.wait_converged(Duration::from_secs(5)).await;
    rogue.close();
    impostor.close();
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}
