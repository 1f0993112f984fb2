//! t22: health checks through clusterctl on a 3-node cluster (loopback,
//! no datapath): a check set with `services add --check`, real TCP servers
//! as backends; one server stops → every node's config marks it down and
//! `clusterctl backends -o json` shows the verdict with all three nodes'
//! views; the leader dies and the verdict stays; it starts again → up
//! (decided by the new leader). Bad check arguments (interval 0, unknown
//! type, a timeout longer than the interval) are refused by clusterctl
//! with a message naming the field (exit 2) and change nothing.

use std::time::{Duration, Instant};

use holdfast_node::config::RaftTuning;
use holdfast_node::testing::Cluster;
use raft_store::cluster::Health;

/// Wait until every node's config shows backend `id` as `want`.
async fn wait_health(c: &Cluster, id: u32, want: Health, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let all = c.nodes.values().all(|n| {
            n.sm.current()
                .state
                .backends
                .get(&id)
                .is_some_and(|b| b.health == want)
        });
        if all {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "backend {id} not {want} on every node within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t22_checks_from_clusterctl_mark_a_dead_backend_down_everywhere() {
    let mut c = Cluster::start_with(3, RaftTuning::default(), false).await;
    c.wait_converged(Duration::from_secs(10)).await;
    // Two backend servers on one port of two loopback addresses.
    let a = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind a");
    let port = a.local_addr().expect("addr").port();
    let b = tokio::net::TcpListener::bind(("127.0.0.3", port))
        .await
        .expect("bind b");
    let serve = |l: tokio::net::TcpListener| {
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        })
    };
    let sa = serve(a);
    let _sb = serve(b);
    let p = port.to_string();

    // Bad checks are refused before anything is sent.
    let epoch = c.node(1).sm.current().state.epoch;
    for (extra, field) in [
        (
            vec!["--check", "tcp", "--check-interval-ms", "0"],
            "health_check.interval_ms",
        ),
        (vec!["--check", "icmp"], "health_check.type"),
        (
            vec![
                "--check",
                "tcp",
                "--check-interval-ms",
                "1000",
                "--check-timeout-ms",
                "3000",
            ],
            "health_check.timeout_ms",
        ),
        (
            vec!["--check", "http", "--check-query", "x.org"],
            "health_check.query",
        ),
        (vec!["--check-path", "/x"], "--check-path needs --check"),
    ] {
        let mut args = vec![
            "services",
            "add",
            "bad",
            "--vip",
            "10.200.0.81",
            "--port",
            &p,
        ];
        args.extend(extra.iter().copied());
        let o = c.clusterctl(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: {err}");
    }
    assert_eq!(c.node(1).sm.current().state.epoch, epoch, "nothing changed");

    c.clusterctl_ok(&[
        "services",
        "add",
        "web",
        "--vip",
        "10.200.0.80",
        "--port",
        &p,
        "--check",
        "tcp",
        "--check-interval-ms",
        "200",
        "--check-timeout-ms",
        "100",
        "--check-rise",
        "2",
        "--check-fall",
        "2",
        "--check-hold-down-ms",
        "0",
    ]);
    for addr in ["127.0.0.2", "127.0.0.3"] {
        c.clusterctl_ok(&["backends", "add", "--service", "web", "--addr", addr]);
    }
    let st = c.node(1).sm.current().state.clone();
    let id_a = st
        .backends
        .values()
        .find(|b| b.addr.to_string() == "127.0.0.2")
        .expect("a")
        .id;
    let listed = c.clusterctl_ok(&["services", "list"]);
    assert!(
        listed.contains("tcp every 200 ms, rise 2 fall 2"),
        "{listed}"
    );

    // Backend a's server dies.
    std::thread::sleep(Duration::from_millis(600));
    sa.abort();
    let _ = sa.await;
    let d = wait_health(&c, id_a, Health::Down, Duration::from_secs(10)).await;
    eprintln!(
        "t22: marked down on every node {} ms after the server died",
        d.as_millis()
    );
    // The verdict needs a quorum (2 of 3); the third node's checks run on
    // its own clock and report within an interval or two more.
    let t0 = std::time::Instant::now();
    let row = loop {
        let rows: serde_json::Value =
            serde_json::from_str(&c.clusterctl_ok(&["backends", "-o", "json"])).expect("json");
        let row = rows
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["id"] == id_a)
            .expect("row of a")
            .clone();
        let all_down = row["views"]
            .as_array()
            .is_some_and(|v| v.len() == 3 && v.iter().all(|v| v["up"] == false));
        if all_down || t0.elapsed() > Duration::from_secs(3) {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(row["health"], "down", "{row}");
    let views = row["views"].as_array().expect("views");
    assert_eq!(views.len(), 3, "every node's view: {row}");
    assert!(views.iter().all(|v| v["up"] == false), "{row}");
    assert!(
        views
            .iter()
            .all(|v| v["detail"].as_str().unwrap_or("").contains("refused")),
        "{row}"
    );
    assert_eq!(row["disagree"], serde_json::json!([]), "{row}");
    let table = c.clusterctl_ok(&["backends"]);
    assert!(
        table.contains("HEALTH") && table.contains("down"),
        "{table}"
    );
    // The other backend is up, the service not in panic.
    let st = c.node(2).sm.current().state.clone();
    assert!(st.health_panic("web").is_none());

    // The leader dies: the verdict is in Raft, the new leader (no views
    // yet) does not flip it, and decides from the next reports.
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    c.kill(leader).await;
    let new = c.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(new, leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in c.nodes.values() {
        assert_eq!(
            n.sm.current().state.backends[&id_a].health,
            Health::Down,
            "node {} after the leader died",
            n.id()
        );
    }

    // It comes back.
    let a = tokio::net::TcpListener::bind(("127.0.0.2", port))
        .await
        .expect("rebind a");
    let _sa = serve(a);
    let d = wait_health(&c, id_a, Health::Up, Duration::from_secs(10)).await;
    eprintln!("t22: up again on every node after {} ms", d.as_millis());

    // Removing the check: every backend counts as healthy, nothing is checked.
    c.clusterctl_ok(&["services", "check", "web", "--none"]);
    let st = c.node(new).sm.current().state.clone();
    assert!(st.services["web"].health_check.is_none());
}
