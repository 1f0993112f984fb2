//! t10: the FRR announcer against real FRR daemons in network namespaces,
//! each started with the shipped configuration (deploy/frr): a router and
//! an LB node. Announcing makes the router install the VIP prefixes (IPv4,
//! and IPv6 over the same session with the node's global next hop) and the
//! node's own SNAT address as a host route; withdrawing removes them; none
//! of it resets the BGP session (its established time stays); an AS number
//! FRR does not run is a clear error.

use std::time::{Duration, Instant};

use holdfast_bgp::{Announcer, ExportPolicy, Frr};
use netns::{frr::Frr as FrrInstance, NetNs};
use raft_store::cluster::VipPool;

fn deploy(f: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/frr")
            .join(f),
    )
    .expect("shipped FRR config")
}

fn wait(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn route(router: &NetNs, prefix: &str) -> String {
    let fam = if prefix.contains(':') { "-6" } else { "-4" };
    router
        .ip(&format!("{fam} route show {prefix}"))
        .unwrap_or_default()
}

/// The router's session to the LB node: (state, times it was
/// established).
fn session(r: &FrrInstance, ns: &NetNs) -> (String, u64) {
    let out = r.vtysh(ns, "show bgp neighbors json").unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let p = &v["10.0.0.11"];
    (
        p["bgpState"].as_str().unwrap_or("").to_string(),
        p["connectionsEstablished"].as_u64().unwrap_or(0),
    )
}

#[test]
fn t10_frr_announce_and_withdraw_without_touching_the_session() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "t10 runs FRR in network namespaces: run as root"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let router = NetNs::new("hffrr").expect("ns");
    let lb = NetNs::new("hffrl").expect("ns");
    netns::veth(&router, "r0", &lb, "f0").expect("veth");
    router.ip("addr add 10.0.0.1/24 dev r0").expect("addr");
    router.ip("addr add fd00::1/64 dev r0 nodad").expect("addr");
    lb.ip("addr add 10.0.0.11/24 dev f0").expect("addr");
    lb.ip("addr add fd00::11/64 dev f0 nodad").expect("addr");
    let r = FrrInstance::start(&router, dir.path(), router.name(), &deploy("tor.frr.conf"))
        .expect("router FRR with deploy/frr/tor.frr.conf");
    let l = FrrInstance::start(&lb, dir.path(), lb.name(), &deploy("lb-node.frr.conf"))
        .expect("LB FRR with deploy/frr/lb-node.frr.conf");
    wait("the BGP session", || {
        session(&r, &router).0 == "Established"
    });
    let since = session(&r, &router).1;

    // The node runs vtysh inside its namespace, as holdfast-node does.
    let f = Frr::new(
        "vtysh".into(),
        Some(lb.name().into()),
        65100,
        &[
            "10.200.0.0/24".into(),
            "fd00:200::/120".into(),
            "10.200.1.0/28".into(),
        ],
    )
    .expect("settings");
    let f = std::sync::Arc::new(f);
    let in_lb = |g: std::sync::Arc<Frr>, what: fn(&Frr) -> anyhow::Result<bool>| {
        lb.run(move || what(&g)).expect("in the namespace")
    };
    assert!(
        !in_lb(f.clone(), |f| f.is_announced()).expect("show"),
        "starts withdrawn"
    );
    assert!(route(&router, "10.200.0.0/24").is_empty());

    in_lb(f.clone(), |f| {
        f.set_own_routes(&["10.200.1.3".parse().unwrap()])?;
        f.announce().map(|_| true)
    })
    .expect("announce");
    assert!(in_lb(f.clone(), |f| f.is_announced()).expect("show"));
    assert!(in_lb(f.clone(), |f| Ok(
        f.has_own_routes(&["10.200.1.3".parse().unwrap()])
    ))
    .unwrap());
    wait("the router's routes", || {
        route(&router, "10.200.0.0/24").contains("via 10.0.0.11")
            && route(&router, "10.200.1.3").contains("via 10.0.0.11")
            && route(&router, "10.200.1.0/28").contains("via 10.0.0.11")
            && route(&router, "fd00:200::/120").contains("via fd00::11")
    });

    in_lb(f.clone(), |f| f.withdraw().map(|_| true)).expect("withdraw");
    assert!(!in_lb(f.clone(), |f| f.is_announced()).expect("show"));
    wait("the routes to be withdrawn", || {
        route(&router, "10.200.0.0/24").is_empty()
            && route(&router, "10.200.1.3").is_empty()
            && route(&router, "fd00:200::/120").is_empty()
    });
    // Announced again: still the same session.
    in_lb(f.clone(), |f| f.announce().map(|_| true)).expect("announce");
    wait("the route again", || {
        route(&router, "10.200.0.0/24").contains("via 10.0.0.11")
    });
    assert_eq!(
        session(&r, &router),
        ("Established".to_string(), since),
        "no session reset"
    );

    // VIP pool attributes and graceful shutdown: UPDATEs on the same
    // session; the router sees the communities, FRR's own table the local
    // preference (an eBGP router sets its own).
    let pools = [VipPool {
        name: "web".into(),
        cidr: "10.200.0.0/24".into(),
        communities: vec!["65000:100".into(), "65000:7:8".into()],
        local_pref: Some(200),
    }];
    let bgp_json = |ns: &NetNs, inst: &FrrInstance| -> serde_json::Value {
        let out = inst
            .vtysh(ns, "show bgp ipv4 unicast 10.200.0.0/24 json")
            .unwrap_or_default();
        serde_json::from_str(&out).unwrap_or_default()
    };
    let set = |p: ExportPolicy| {
        let g = f.clone();
        lb.run(move || g.set_policy(&p))
            .expect("in the namespace")
            .expect("set_policy")
    };
    assert!(set(ExportPolicy::from_pools(&pools, true)));
    wait("the communities at the router", || {
        let v = bgp_json(&router, &r);
        let path = &v["paths"][0];
        let c = path["community"]["string"].as_str().unwrap_or("");
        let l = path["largeCommunity"]["string"].as_str().unwrap_or("");
        c.contains("65000:100") && c.contains("graceful-shutdown") && l == "65000:7:8"
    });
    let own = bgp_json(&lb, &l);
    assert_eq!(own["paths"][0]["locPrf"], serde_json::json!(200), "{own}");
    // Unchanged: nothing to do.
    assert!(!set(ExportPolicy::from_pools(&pools, true)));
    // Back to none: the communities go, the session stays.
    assert!(set(ExportPolicy::default()));
    wait("no communities at the router", || {
        let v = bgp_json(&router, &r);
        v["paths"][0].is_object() && v["paths"][0]["community"].is_null()
    });
    assert_eq!(
        session(&r, &router),
        ("Established".to_string(), since),
        "attributes changed without a session reset"
    );

    // Saving (`frr_save`): frr.conf holds the node's statements, so a bgpd
    // that restarts (graceful restart: SIGTERM, started again, `vtysh -b`)
    // comes back announcing, with nobody announcing again, and the router
    // kept the routes meanwhile.
    let saved = std::sync::Arc::new(
        Frr::new(
            "vtysh".into(),
            Some(lb.name().into()),
            65100,
            &["10.200.0.0/24".into(), "fd00:200::/120".into()],
        )
        .expect("settings")
        .saving(true),
    );
    in_lb(saved.clone(), |f| {
        f.withdraw().and_then(|_| f.announce()).map(|_| true)
    })
    .expect("announce, saved");
    let conf = std::path::Path::new("/etc/frr")
        .join(lb.name())
        .join("frr.conf");
    let text = std::fs::read_to_string(&conf).expect("frr.conf");
    assert!(text.contains("network 10.200.0.0/24"), "{text}");
    wait("the route, saved", || {
        route(&router, "10.200.0.0/24").contains("via 10.0.0.11")
    });
    l.restart_daemon(&lb, dir.path(), "bgpd", libc::SIGTERM)
        .expect("restart bgpd");
    assert!(
        in_lb(saved.clone(), |f| f.is_announced()).expect("show"),
        "the restarted bgpd loaded the node's statements"
    );
    assert!(
        route(&router, "10.200.0.0/24").contains("via 10.0.0.11"),
        "the router kept the route while bgpd restarted"
    );

    // An AS number FRR does not run: FRR's config is not touched.
    let bad = std::sync::Arc::new(
        Frr::new(
            "vtysh".into(),
            Some(lb.name().into()),
            65999,
            &["10.200.0.0/24".into()],
        )
        .expect("settings"),
    );
    let e = in_lb(bad, |f| f.announce().map(|_| true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("router bgp 65999"), "{e}");
}
