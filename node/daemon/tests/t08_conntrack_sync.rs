//! t08: conntrack replication between three nodes with real BPF maps. A flow
//! created by node A's datapath appears in B's and C's maps with A as origin
//! and the same backend; a restarted node warm-joins (snapshot) and ends
//! with the same entries before it reports ready; a client FIN on the
//! origin turns the peers' copies CLOSING; a node with a valid
//! cluster certificate that is not a member is refused and writes nothing;
//! clusterctl lists the entries with their origin.

use std::{
    net::IpAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use datapath_ebpf::{
    abi::{CtKey, CT_F_CLOSING, IPPROTO_TCP},
    packet::{Packet, TCP_ACK, TCP_FIN},
    testrun,
};
use holdfast_api::wire::CtRow;
use holdfast_node::testing::{backend, issue_node, service, Cluster};
use holdfast_pki::Identity;
use sync::service::{KIND_SNAPSHOT, KIND_SYNC};
use sync::transport::Transport;
use sync::wire::{frame, Msg, WireEntry, VERSION};

const VIP: &str = "10.200.0.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08_flows_replicate_warm_join_and_members_only() {
    let mut c = Cluster::start(3).await;
    c.write(service("web", VIP, 80)).await;
    for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        c.write(backend("web", a, 80)).await;
    }
    c.wait_converged(Duration::from_secs(5)).await;
    for id in 1..=3 {
        c.wait_sync_ready(id).await;
    }

    let first = c.open_flows(1, VIP, 20_000, 50);
    c.wait_entries(2, &first, 1).await;
    c.wait_entries(3, &first, 1).await;
    let lag = c.node(2).sync.get().expect("sync").status().lag_p99_ms;
    assert!(lag.is_some(), "lag is measured");

    // Node 3 restarts with an empty map and warm-joins.
    c.kill(3).await;
    let second = c.open_flows(1, VIP, 30_000, 50);
    c.wait_entries(2, &second, 1).await;
    c.restart(3).await;
    c.wait_sync_ready(3).await;
    let st = c.node(3).sync.get().expect("sync").status();
    assert!(
        st.snapshot_entries >= 100,
        "warm join pulled {} entries",
        st.snapshot_entries
    );
    let all: Vec<CtKey> = first.iter().chain(&second).copied().collect();
    c.wait_entries(3, &all, 1).await; // already there when ready

    // A client FIN on node 1 turns its entry CLOSING there; the datapath
    // announces it and the peers' copies turn CLOSING too (so they expire
    // after the closing timeout, not the hour of an open flow).
    let closing = first[0];
    {
        let dp = c
            .node(1)
            .datapath
            .as_ref()
            .expect("dp")
            .dp
            .lock()
            .expect("dp");
        let fin = Packet::tcp(
            "192.0.2.10",
            u16::from_be(closing.sport),
            VIP,
            80,
            TCP_ACK | TCP_FIN,
        );
        testrun::run(dp.program(), &fin.frame(), 0).expect("test run");
        let v = dp.ct_get(&closing).expect("ct").expect("entry");
        assert_ne!(v.flags & CT_F_CLOSING, 0, "node 1 saw the FIN");
    }
    for id in [2, 3] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = {
                let dp = c
                    .node(id)
                    .datapath
                    .as_ref()
                    .expect("dp")
                    .dp
                    .lock()
                    .expect("dp");
                dp.ct_get(&closing).expect("ct").expect("entry")
            };
            if v.flags & CT_F_CLOSING != 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id}'s copy never turned CLOSING: {v:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // A node with a valid cluster certificate that is not a member.
    let pki = c.pki.clone();
    issue_node(&pki, 9);
    let id = Identity::load(
        &pki.join("ca.pem"),
        &pki.join("node-9.pem"),
        &pki.join("node-9.key"),
    )
    .expect("id");
    let rogue = Transport::bind("127.0.0.1:0".parse().expect("addr"), &id).expect("bind");
    let target = c.node(1).cfg.raft_addr;
    let refused_before = c
        .node(1)
        .sync
        .get()
        .expect("sync")
        .metrics
        .refused
        .load(Ordering::Relaxed);
    let bogus = CtKey::new(
        "198.51.100.7".parse().expect("ip"),
        1234,
        VIP.parse().expect("vip"),
        80,
        IPPROTO_TCP,
    );
    if let Ok((mut send, _recv)) = rogue.open_stream(1, target, KIND_SYNC).await {
        let entry = WireEntry {
            family: 4,
            proto: 6,
            saddr: vec![198, 51, 100, 7],
            daddr: vec![10, 200, 0, 1],
            sport: 1234,
            dport: 80,
            backend_id: 1,
            flags: 0,
            origin: 9,
            created: 1,
            last_seen: 1,
            snat_port: 0,
            snat_slot: 0,
        };
        let _ = send
            .write_all(&frame(&Msg::Hello {
                version: VERSION,
                node_id: 9,
                incarnation: 1,
            }))
            .await;
        let _ = send
            .write_all(&frame(&Msg::Batch {
                origin: 9,
                incarnation: 1,
                seq: 1,
                base: 1,
                entries: vec![entry],
            }))
            .await;
        let _ = send.finish();
    }
    let snapshot = rogue.open_stream(1, target, KIND_SNAPSHOT).await;
    if let Ok((mut s, mut r)) = snapshot {
        let _ = s.finish();
        let mut buf = [0u8; 64];
        assert!(
            !matches!(r.read(&mut buf).await, Ok(Some(n)) if n > 0),
            "snapshot served to a non-member"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while c
        .node(1)
        .sync
        .get()
        .expect("sync")
        .metrics
        .refused
        .load(Ordering::Relaxed)
        < refused_before + 2
    {
        assert!(Instant::now() < deadline, "non-member was not refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dp1 = c
        .node(1)
        .datapath
        .as_ref()
        .expect("dp")
        .dp
        .lock()
        .expect("dp")
        .ct_get(&bogus)
        .expect("lookup");
    assert!(dp1.is_none(), "a non-member wrote into the conntrack map");

    // clusterctl conntrack, as an operator lists node 2's entries.
    let admin = c.node(1).cfg.admin_addr.to_string();
    let env = c.clusterctl_env(holdfast_api::auth::Role::Viewer);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(holdfast_node::testing::workspace_bin(
            "clusterctl",
            "clusterctl",
        ))
        .envs(env)
        .args([
            "--node",
            &admin,
            "conntrack",
            "--node-id",
            "2",
            "--vip",
            VIP,
            "-o",
            "json",
        ])
        .output()
        .expect("run clusterctl")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<CtRow> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows.len(), 100);
    assert!(rows.iter().all(|r| r.origin == 1 && r.remote));
    let _ = IpAddr::from([0u8; 4]);
}
