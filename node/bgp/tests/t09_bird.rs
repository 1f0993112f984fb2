//! t09: the BIRD announcer against real BIRD 2 daemons in network
//! namespaces: a router (eBGP, kernel export) and an LB node whose static
//! `vip` protocol starts disabled. Announcing makes the router install the
//! VIP prefix via the LB node; withdrawing removes it; a bad protocol name
//! is BIRD's clear error. Timing allows for BIRD 2.0.12's 3 s update delay.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use holdfast_bgp::{Announcer, Bird};
use netns::NetNs;

/// A BIRD daemon (`-P` pid file); killed on drop. The namespace guard also
/// kills whatever is left inside it.
struct Daemon(std::path::PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: signalling a pid we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn bird(ns: &NetNs, dir: &std::path::Path, name: &str, conf: &str) -> Daemon {
    let c = dir.join(format!("{name}.conf"));
    let pid = dir.join(format!("{name}.pid"));
    std::fs::write(&c, conf).expect("write bird.conf");
    let st = Command::new("ip")
        .args(["netns", "exec", ns.name(), "bird", "-c"])
        .arg(&c)
        .arg("-s")
        .arg(dir.join(format!("{name}.ctl")))
        .arg("-P")
        .arg(&pid)
        .status()
        .expect("bird2 must be installed (scripts/install-deps.sh)");
    assert!(st.success(), "bird failed to start with {}", c.display());
    Daemon(pid)
}

/// The announcer of the static protocol `vip` of the BIRD `lb` in `dir`,
/// with the state file `state`.
fn vip_bird(dir: &std::path::Path, state: &std::path::Path) -> Bird {
    Bird::new(
        dir.join("lb.ctl"),
        vec!["vip".into()],
        None,
        Some(state.to_path_buf()),
    )
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "t09 runs BIRD in network namespaces: run as root"
    );
}

fn route(router: &NetNs) -> Option<String> {
    router
        .ip("route show 10.200.0.0/24")
        .ok()
        .filter(|r| !r.trim().is_empty())
}

fn wait(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn t09_bird_announce_and_withdraw() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let router = NetNs::new("hfbgpr").expect("ns");
    let lb = NetNs::new("hfbgpl").expect("ns");
    netns::veth(&router, "r0", &lb, "f0").expect("veth");
    router.ip("addr add 10.66.0.1/24 dev r0").expect("addr");
    lb.ip("addr add 10.66.0.11/24 dev f0").expect("addr");
    let _r = bird(
        &router,
        dir.path(),
        "router",
        "router id 10.66.0.1;\nprotocol device { }\n\
         protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; merge paths yes limit 16; }\n\
         protocol bgp lb1 { local as 65000; neighbor 10.66.0.11 as 65100; connect delay time 1; connect retry time 2; error wait time 1, 5;\n\
         ipv4 { import where net ~ [ 10.200.0.0/16{16,32} ]; export none; }; }\n",
    );
    let state = dir.path().join("state.conf");
    std::fs::write(
        &state,
        holdfast_bgp::render_state(false, &Default::default()),
    )
    .expect("write");
    let _l = bird(
        &lb,
        dir.path(),
        "lb",
        &format!(
            "include \"{}\";\nrouter id 10.66.0.11;\nprotocol device {{ }}\n\
             protocol static vip {{ disabled HOLDFAST_WITHDRAWN; ipv4; route 10.200.0.0/24 blackhole; }}\n\
             protocol bgp tor {{ local 10.66.0.11 as 65100; neighbor 10.66.0.1 as 65000; connect delay time 1; connect retry time 2; error wait time 1, 5;\n\
             ipv4 {{ import none; export filter {{ if proto = \"vip\" then {{ holdfast_export(); accept; }} reject; }}; }}; }}\n",
            state.display()
        ),
    );
    let b = vip_bird(dir.path(), &state);
    wait("BIRD's control socket", || b.is_announced().is_ok());
    assert!(!b.is_announced().expect("show"), "starts withdrawn");
    assert!(route(&router).is_none());

    b.announce().expect("announce");
    assert!(b.is_announced().expect("show"));
    wait("the router's route to the VIPs", || {
        route(&router).is_some_and(|r| r.contains("via 10.66.0.11") && r.contains("proto bird"))
    });

    // VIP pool attributes and graceful shutdown: the router sees the
    // communities, on the same session.
    let router_birdc = |cmd: &str| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", router.name(), "birdc", "-s"])
            .arg(dir.path().join("router.ctl"))
            .arg(cmd)
            .output()
            .expect("birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let since = || -> String {
        router_birdc("show protocols lb1")
            .lines()
            .find(|l| l.starts_with("lb1"))
            .map(|l| l.split_whitespace().nth(4).unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let before = since();
    let pools = [raft_store::cluster::VipPool {
        name: "web".into(),
        cidr: "10.200.0.0/24".into(),
        communities: vec!["65000:100".into(), "65000:7:8".into()],
        local_pref: Some(200),
    }];
    assert!(b
        .set_policy(&holdfast_bgp::ExportPolicy::from_pools(&pools, true))
        .expect("set_policy"));
    assert!(
        b.is_announced().expect("show"),
        "the reload kept the announcement"
    );
    wait("the communities at the router", || {
        let r = router_birdc("show route all 10.200.0.0/24");
        r.contains("(65000,100)") && r.contains("(65535,0)") && r.contains("(65000, 7, 8)")
    });
    assert!(b
        .set_policy(&holdfast_bgp::ExportPolicy::default())
        .expect("set_policy"));
    wait("no communities at the router", || {
        let r = router_birdc("show route all 10.200.0.0/24");
        r.contains("via 10.66.0.11") && !r.contains("BGP.community")
    });
    assert_eq!(
        since(),
        before,
        "attributes changed without a session reset"
    );

    b.withdraw().expect("withdraw");
    assert!(!b.is_announced().expect("show"));
    wait("the route to be withdrawn", || route(&router).is_none());

    let bad = Bird::new(b.ctl.clone(), vec!["nosuch".into()], None, None);
    let e = bad.announce().unwrap_err().to_string();
    assert!(e.contains("BIRD refused"), "{e}");
}

/// The shipped BIRD configs (deploy/bird/) parse with the BIRD we run, and
/// the LB node's template keeps the `vip` protocol the node drives.
#[test]
fn t09_shipped_bird_configs_parse() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/bird");
    // The shipped own-routes and state files are what the node writes
    // with no address, withdrawn.
    let snat = deploy.join("holdfast-snat.conf");
    assert_eq!(
        std::fs::read_to_string(&snat).expect("holdfast-snat.conf"),
        holdfast_bgp::render_own_routes(&[], true),
        "deploy/bird/holdfast-snat.conf is the node's rendering of no SNAT address"
    );
    let state = deploy.join("holdfast-state.conf");
    assert_eq!(
        std::fs::read_to_string(&state).expect("holdfast-state.conf"),
        holdfast_bgp::render_state(false, &Default::default()),
        "deploy/bird/holdfast-state.conf is the node's rendering of withdrawn"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for f in [
        "lb-node.bird.conf",
        "lb-node-bfd.bird.conf",
        "tor.bird.conf",
    ] {
        // The includes point at the shipped files' installed paths.
        let text = std::fs::read_to_string(deploy.join(f))
            .expect("read")
            .replace(
                "/etc/bird/holdfast/holdfast-snat.conf",
                snat.to_str().expect("utf-8"),
            )
            .replace(
                "/run/bird/holdfast-state.conf",
                state.to_str().expect("utf-8"),
            );
        let path = dir.path().join(f);
        std::fs::write(&path, text).expect("write");
        let out = Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&path)
            .output()
            .expect("bird2 must be installed (scripts/install-deps.sh)");
        assert!(
            out.status.success(),
            "{f} does not parse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lb = std::fs::read_to_string(deploy.join("lb-node.bird.conf")).expect("read");
    assert!(lb.contains("protocol static vip {") && lb.contains("disabled HOLDFAST_WITHDRAWN;"));
    assert!(lb.contains("include \"/run/bird/holdfast-state.conf\";"));
    assert!(lb.contains("graceful restart on;"));
    // BFD is the other BIRD's (it stays up while this one restarts).
    assert!(
        !lb.contains("protocol bfd"),
        "BFD lives in lb-node-bfd.bird.conf"
    );
    assert!(
        lb.contains("protocol static vip6 {"),
        "the template announces IPv6 VIPs too"
    );
    assert!(lb.contains("include \"/etc/bird/holdfast/holdfast-snat.conf\";"));
    // Own SNAT addresses render as host routes BIRD takes.
    let own = holdfast_bgp::render_own_routes(
        &[
            "10.200.1.3".parse().unwrap(),
            "fd00:201::3".parse().unwrap(),
        ],
        true,
    );
    assert!(own.contains("route 10.200.1.3/32 blackhole;"), "{own}");
    assert!(own.contains("route fd00:201::3/128 blackhole;"), "{own}");
    let text = std::fs::read_to_string(deploy.join("lb-node.bird.conf"))
        .expect("read")
        .replace(
            "/etc/bird/holdfast/holdfast-snat.conf",
            dir.path().join("own.conf").to_str().expect("utf-8"),
        )
        .replace(
            "/run/bird/holdfast-state.conf",
            dir.path().join("state.conf").to_str().expect("utf-8"),
        );
    std::fs::write(dir.path().join("own.conf"), own).expect("write");
    std::fs::write(
        dir.path().join("state.conf"),
        holdfast_bgp::render_state(true, &Default::default()),
    )
    .expect("write");
    std::fs::write(dir.path().join("lb.conf"), text).expect("write");
    let out = Command::new("bird")
        .arg("-p")
        .arg("-c")
        .arg(dir.path().join("lb.conf"))
        .output()
        .expect("bird");
    assert!(
        out.status.success(),
        "with own routes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With a state file, a BIRD that restarts comes back in the node's state:
/// announcing after `announce`, withdrawn after `withdraw`, with nobody
/// telling it (what graceful restart needs before BIRD's End-of-RIB).
#[test]
fn t09_restarted_bird_comes_back_in_the_nodes_state() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let lb = NetNs::new("hfbgps").expect("ns");
    let state = dir.path().join("state.conf");
    std::fs::write(
        &state,
        holdfast_bgp::render_state(false, &Default::default()),
    )
    .expect("write");
    let conf = format!(
        "include \"{}\";\nrouter id 10.66.1.11;\nprotocol device {{ }}\n\
         protocol static vip {{ disabled HOLDFAST_WITHDRAWN; ipv4; route 10.200.0.0/24 blackhole; }}\n",
        state.display()
    );
    let b = vip_bird(dir.path(), &state);
    let restart = |d: Daemon| -> Daemon {
        drop(d);
        wait("the old BIRD to go", || {
            std::os::unix::net::UnixStream::connect(&b.ctl).is_err()
        });
        let _ = std::fs::remove_file(&b.ctl);
        let d = bird(&lb, dir.path(), "lb", &conf);
        wait("BIRD's control socket", || b.is_announced().is_ok());
        d
    };
    let d = bird(&lb, dir.path(), "lb", &conf);
    wait("BIRD's control socket", || b.is_announced().is_ok());
    assert!(!b.is_announced().expect("show"), "starts withdrawn");

    b.announce().expect("announce");
    assert_eq!(
        std::fs::read_to_string(&state).expect("state"),
        holdfast_bgp::render_state(true, &Default::default())
    );
    let d = restart(d);
    assert!(
        b.is_announced().expect("show"),
        "a restarted BIRD announces what the node announced"
    );

    b.withdraw().expect("withdraw");
    let d = restart(d);
    assert!(
        !b.is_announced().expect("show"),
        "a restarted BIRD keeps the node's withdrawal"
    );
    drop(d);
}
