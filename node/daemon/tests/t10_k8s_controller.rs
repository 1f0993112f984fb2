//! t10: the Kubernetes controller against the test API server (HTTPS,
//! list/watch with bookmarks, 410 Gone, status patches, Events) and 3 real
//! nodes with their datapaths.
//!
//! - a LoadBalancer Service appears → a VIP from the pool, status written,
//!   config committed, every node's datapath programmed;
//! - endpoints scale 3 → 10 → 2 with stable backend ids; a terminating
//!   endpoint drains; the Service goes → its VIP is released;
//! - bad objects (SCTP, no ports, invalid IP, slice of an unknown Service,
//!   conflicting or out-of-pool VIP) get Events and stop nothing;
//! - the leader is killed in a burst → the new leader converges to the same
//!   config; the API server answers 410 / restarts → relist, nothing dropped;
//! - every call the controller made is one its RBAC grants (API_CALLS).

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use holdfast_k8s::{
    testapi::{Kind, TestApi},
    API_CALLS,
};
use holdfast_node::testing::Cluster;
use raft_store::{
    cluster::{BackendState, VipPool},
    ClusterState, Command,
};
use serde_json::{json, Value};

const CLASS: &str = "holdfast.io/l4";

fn service(name: &str, ports: Value, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "annotations": annotations,
                     "creationTimestamp": "2026-11-28T00:00:00Z"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": CLASS, "ports": ports},
    })
}

fn web(name: &str) -> Value {
    service(
        name,
        json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80},
               {"name": "dns", "port": 53, "protocol": "UDP"}]),
        json!({}),
    )
}

/// An EndpointSlice of `svc` with endpoints (address, ready, serving, terminating).
fn slice(svc: &str, name: &str, eps: &[(String, bool, bool, bool)]) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": eps.iter().map(|(a, r, s, t)| json!({
            "addresses": [a], "conditions": {"ready": r, "serving": s, "terminating": t}
        })).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                  {"name": "dns", "port": 53, "protocol": "UDP"}],
    })
}

fn ready(n: usize, base: u8) -> Vec<(String, bool, bool, bool)> {
    (0..n)
        .map(|i| (format!("10.1.{base}.{}", i + 1), true, true, false))
        .collect()
}

async fn k8s_cluster(api: &TestApi) -> (Cluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = api.k8s_section(dir.path()).expect("kubernetes section");
    let c = Cluster::start_full(3, Default::default(), true, k).await;
    for (name, cidr) in [("v4", "10.210.0.0/28"), ("v6", "fd00:210::/120")] {
        let r = c
            .write(Command::PutVipPool {
                pool: VipPool {
                    name: name.into(),
                    cidr: cidr.into(),
                    ..Default::default()
                },
            })
            .await;
        assert!(r.rejected.is_none(), "{:?}", r.rejected);
    }
    (c, dir)
}

/// Wait until every node's committed config satisfies `f` and its
/// datapath is at that config's epoch.
async fn wait_all(c: &Cluster, what: &str, f: impl Fn(&ClusterState) -> bool) -> ClusterState {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let states: Vec<_> = c
            .nodes
            .values()
            .map(|n| n.sm.current().state.clone())
            .collect();
        let applied = c.nodes.values().all(|n| {
            n.applied_epoch.load(std::sync::atomic::Ordering::Relaxed) == n.sm.current().state.epoch
        });
        if applied && states.iter().all(&f) {
            return states[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; node configs: {:#?}",
            states.first().map(|s| (&s.services, &s.backends))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn backends_of(s: &ClusterState, svc: &str) -> Vec<(IpAddr, u32, BackendState)> {
    let mut v: Vec<_> = s
        .backends
        .values()
        .filter(|b| b.service == svc)
        .map(|b| (b.addr, b.id, b.state))
        .collect();
    v.sort_by_key(|b| (b.0, b.1));
    v
}

fn ingress(api: &TestApi, name: &str) -> Vec<String> {
    api.get(Kind::Service, "default", name)
        .and_then(|s| s["status"]["loadBalancer"]["ingress"].as_array().cloned())
        .map(|a| {
            a.iter()
                .filter_map(|i| i["ip"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_ingress(api: &TestApi, name: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ingress(api, name) != want {
        assert!(
            Instant::now() < deadline,
            "status of {name}: {:?}, want {want:?}",
            ingress(api, name)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_event(api: &TestApi, reason: &str, object: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(e) = api.list(Kind::Event).into_iter().find(|e| {
            e["reason"] == reason && e["involvedObject"]["name"] == object && e["type"] == "Warning"
        }) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event for {object}; events: {:#?}",
            api.list(Kind::Event)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const HTTP: &str = "k8s:default/web:80/tcp";
const DNS: &str = "k8s:default/web:53/udp";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_services_endpoints_status_events() {
    let api = TestApi::start().await.expect("test API server");
    let (c, _dir) = k8s_cluster(&api).await;

    // A LoadBalancer Service with 3 ready endpoints.
    api.apply(Kind::Service, web("web"));
    api.apply(Kind::EndpointSlice, slice("web", "web-1", &ready(3, 0)));
    let s = wait_all(&c, "web with 3 backends", |s| {
        backends_of(s, HTTP).len() == 3 && backends_of(s, DNS).len() == 3
    })
    .await;
    assert_eq!(
        s.services[HTTP].vip,
        "10.210.0.1".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        s.services[DNS].vip, s.services[HTTP].vip,
        "one VIP per Service"
    );
    wait_ingress(&api, "web", &["10.210.0.1"]).await;
    // Every node's datapath has the service.
    for n in c.nodes.values() {
        let h = n.datapath.as_ref().expect("datapath");
        let key = datapath_ebpf::abi::SvcKey::new("10.210.0.1".parse().unwrap(), 80, 6);
        assert!(
            h.dp.lock()
                .unwrap()
                .service(&key)
                .expect("lookup")
                .is_some(),
            "node {} datapath lacks the VIP",
            n.id()
        );
    }

    // 3 → 10 → 2, ids stable.
    let ids3 = backends_of(&s, HTTP);
    api.apply(Kind::EndpointSlice, slice("web", "web-1", &ready(10, 0)));
    let s10 = wait_all(&c, "10 backends", |s| backends_of(s, HTTP).len() == 10).await;
    for b in &ids3 {
        assert!(
            backends_of(&s10, HTTP).contains(b),
            "backend {b:?} changed id"
        );
    }
    api.apply(Kind::EndpointSlice, slice("web", "web-1", &ready(2, 0)));
    let s2 = wait_all(&c, "2 backends", |s| backends_of(s, HTTP).len() == 2).await;
    assert_eq!(
        backends_of(&s2, HTTP),
        ids3[..2].to_vec(),
        "the first two keep their ids"
    );

    // A terminating (still serving) endpoint drains; a not-serving one goes.
    let mut eps = ready(2, 0);
    eps[1] = (eps[1].0.clone(), false, true, true);
    api.apply(Kind::EndpointSlice, slice("web", "web-1", &eps));
    let sd = wait_all(&c, "draining endpoint", |s| {
        backends_of(s, HTTP)
            .iter()
            .any(|b| b.2 == BackendState::Draining)
    })
    .await;
    assert_eq!(backends_of(&sd, HTTP)[1].1, ids3[1].1, "drained in place");
    eps[1] = (eps[1].0.clone(), false, false, true);
    api.apply(Kind::EndpointSlice, slice("web", "web-1", &eps));
    wait_all(&c, "terminated endpoint removed", |s| {
        backends_of(s, HTTP).len() == 1
    })
    .await;

    // Bad objects: Events, and the controller keeps going.
    api.apply(
        Kind::Service,
        service(
            "sctp",
            json!([{"name": "x", "port": 9, "protocol": "SCTP"}]),
            json!({}),
        ),
    );
    api.apply(Kind::Service, service("noports", json!([]), json!({})));
    api.apply(
        Kind::Service,
        service(
            "taken",
            json!([{"port": 80, "protocol": "TCP"}]),
            json!({"holdfast.io/vip": "10.210.0.1"}),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "outside",
            json!([{"port": 80, "protocol": "TCP"}]),
            json!({"holdfast.io/vip": "192.0.2.1"}),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "garbage",
            json!([{"port": 80, "protocol": "TCP"}]),
            json!({"holdfast.io/vip": "not-an-ip"}),
        ),
    );
    api.apply(Kind::EndpointSlice, slice("ghost", "ghost-1", &ready(1, 9)));
    let mut bad = ready(2, 5);
    bad[0].0 = "300.1.2.3".into();
    api.apply(Kind::Service, web("web2"));
    api.apply(Kind::EndpointSlice, slice("web2", "web2-1", &bad));
    wait_event(&api, "UnsupportedProtocol", "sctp").await;
    wait_event(&api, "NoPorts", "noports").await;
    wait_event(&api, "VIPConflict", "taken").await;
    wait_event(&api, "VIPNotInPool", "outside").await;
    wait_event(&api, "InvalidVIP", "garbage").await;
    wait_event(&api, "UnknownService", "ghost-1").await;
    wait_event(&api, "InvalidAddress", "web2-1").await;
    api.apply(Kind::Service, web("remap"));
    let mut sl = slice("remap", "remap-1", &ready(1, 7));
    sl["ports"][0]["port"] = json!(8080);
    api.apply(Kind::EndpointSlice, sl);
    // targetPort 8080 behind port 80 (DSR): the backend is the pod's port,
    // which the backend's decap agent translates.
    wait_all(&c, "remap's backend on its target port", |s| {
        s.backends
            .values()
            .any(|b| b.service == "k8s:default/remap:80/tcp" && b.port == 8080)
    })
    .await;
    // web2 still works, with its valid endpoint, and the next free VIP.
    let s = wait_all(&c, "web2", |s| {
        backends_of(s, "k8s:default/web2:80/tcp").len() == 1
    })
    .await;
    assert_eq!(
        s.services["k8s:default/web2:80/tcp"].vip,
        "10.210.0.2".parse::<IpAddr>().unwrap()
    );
    assert!(!s
        .services
        .keys()
        .any(|k| k.contains("sctp") || k.contains("taken")));
    wait_ingress(&api, "web2", &["10.210.0.2"]).await;

    // The Service goes: its config and VIP go. The Service that asked for
    // that VIP (refused while it was taken) gets it now.
    api.delete(Kind::Service, "default", "web");
    let s = wait_all(&c, "web removed, taken gets its VIP", |s| {
        !s.services.contains_key(HTTP)
            && !s.services.contains_key(DNS)
            && s.services.contains_key("k8s:default/taken:80/tcp")
    })
    .await;
    assert_eq!(
        s.services["k8s:default/taken:80/tcp"].vip,
        "10.210.0.1".parse::<IpAddr>().unwrap()
    );
    wait_ingress(&api, "taken", &["10.210.0.1"]).await;
    // A released VIP is allocated again.
    api.delete(Kind::Service, "default", "web2");
    wait_all(&c, "web2 removed", |s| {
        !s.services.contains_key("k8s:default/web2:80/tcp")
    })
    .await;
    api.apply(Kind::Service, web("web3"));
    let s = wait_all(&c, "web3", |s| {
        s.services.contains_key("k8s:default/web3:80/tcp")
    })
    .await;
    assert_eq!(
        s.services["k8s:default/web3:80/tcp"].vip,
        "10.210.0.2".parse::<IpAddr>().unwrap(),
        "web2's released VIP is free again"
    );

    // Everything the controller called is granted by its RBAC.
    check_rbac(&api);
}

fn check_rbac(api: &TestApi) {
    let granted: BTreeSet<(&str, &str, &str)> = API_CALLS.iter().copied().collect();
    let reqs = api.requests();
    assert!(!reqs.is_empty());
    for (method, path) in reqs {
        let (group, resource, verbs): (&str, &str, &[&str]) = match (method.as_str(), path.as_str())
        {
            ("GET", "/api/v1/services") => ("", "services", &["list", "watch"]),
            ("GET", "/apis/discovery.k8s.io/v1/endpointslices") => {
                ("discovery.k8s.io", "endpointslices", &["list", "watch"])
            }
            ("PATCH", p) if p.starts_with("/api/v1/namespaces/") && p.ends_with("/status") => {
                ("", "services/status", &["patch"])
            }
            ("POST", p) if p.starts_with("/api/v1/namespaces/") && p.ends_with("/events") => {
                ("", "events", &["create"])
            }
            other => panic!("the controller called {other:?}, which its RBAC does not grant"),
        };
        for v in verbs {
            assert!(
                granted.contains(&(group, resource, *v)),
                "{group}/{resource} {v}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_leader_kill_in_a_burst_and_api_restarts() {
    let mut api = TestApi::start().await.expect("test API server");
    let (mut c, _dir) = k8s_cluster(&api).await;
    for i in 0..5 {
        api.apply(Kind::Service, web(&format!("s{i}")));
    }
    let all5 = |s: &ClusterState| {
        (0..5).all(|i| s.services.contains_key(&format!("k8s:default/s{i}:80/tcp")))
    };
    wait_all(&c, "5 services", all5).await;

    // A burst of endpoint changes; the leader dies in the middle.
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    for round in 0..40u8 {
        let i = round % 5;
        api.apply(
            Kind::EndpointSlice,
            slice(
                &format!("s{i}"),
                &format!("s{i}-1"),
                &ready(usize::from(round / 5) + 1, i),
            ),
        );
        if round == 20 {
            c.kill(leader).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Final: s{i} has 8 endpoints 10.1.{i}.1..8.
    let want = |s: &ClusterState| {
        (0..5u8).all(|i| {
            let b = backends_of(s, &format!("k8s:default/s{i}:80/tcp"));
            b.len() == 8
                && b.iter().all(|(a, _, st)| {
                    *st == BackendState::Active && a.to_string().starts_with(&format!("10.1.{i}."))
                })
        })
    };
    let s = wait_all(&c, "the burst applied by the new leader", want).await;
    // No duplicate backends (nothing applied twice).
    let mut seen = BTreeSet::new();
    for b in s.backends.values() {
        assert!(
            seen.insert((b.service.clone(), b.addr, b.port)),
            "duplicate backend {b:?}"
        );
    }

    // 410 Gone: history compacted and watches ended → relist; no change.
    let epoch = s.epoch;
    api.compact();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = wait_all(&c, "still converged after 410", want).await;
    assert_eq!(s.epoch, epoch, "a relist must not rewrite the config");
    // And changes after the relist still flow.
    api.apply(Kind::EndpointSlice, slice("s0", "s0-1", &ready(3, 0)));
    wait_all(&c, "s0 down to 3 after 410", |s| {
        backends_of(s, "k8s:default/s0:80/tcp").len() == 3
    })
    .await;

    // API server restart: connections drop, the controller reconnects.
    api.restart().await.expect("restart");
    api.apply(Kind::EndpointSlice, slice("s1", "s1-1", &ready(4, 1)));
    let s = wait_all(&c, "s1 down to 4 after the API restart", |s| {
        backends_of(s, "k8s:default/s1:80/tcp").len() == 4
    })
    .await;
    assert_eq!(
        backends_of(&s, "k8s:default/s2:80/tcp").len(),
        8,
        "nothing else dropped"
    );
}

/// Services as users write them (tests/manifests/*.yaml: targetPort by
/// number and by name, loadBalancerSourceRanges, sessionAffinity,
/// externalTrafficPolicy, a malformed range): the config and every node's
/// datapath get the target ports, the ranges and the client affinity; every
/// field Holdfast does otherwise gets a Warning Event naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_services_as_users_write_them() {
    let api = TestApi::start().await.expect("test API server");
    let (c, _dir) = k8s_cluster(&api).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("manifests")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for f in files {
        let text = std::fs::read_to_string(&f).expect("manifest");
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for d in docs {
            let kind = match d["kind"].as_str() {
                Some("Service") => Kind::Service,
                Some("EndpointSlice") => Kind::EndpointSlice,
                other => panic!("{}: kind {other:?}", f.display()),
            };
            api.apply(kind, d);
        }
    }
    let s = wait_all(&c, "web, db and sticky", |s| {
        [
            "k8s:shop/web:80/tcp",
            "k8s:shop/web:53/udp",
            "k8s:shop/db:5432/tcp",
        ]
        .iter()
        .all(|n| s.services.contains_key(*n))
            && s.backends.len() >= 5
    })
    .await;
    // targetPort 8080 (a number) and "dns" (a name, resolved by the slice).
    let ports = |svc: &str| -> BTreeSet<(IpAddr, u16)> {
        s.backends
            .values()
            .filter(|b| b.service == svc)
            .map(|b| (b.addr, b.port))
            .collect()
    };
    let ip = |a: &str| a.parse::<IpAddr>().unwrap();
    assert_eq!(
        ports("k8s:shop/web:80/tcp"),
        BTreeSet::from([(ip("10.1.7.1"), 8080), (ip("10.1.7.2"), 8080)])
    );
    assert_eq!(
        ports("k8s:shop/web:53/udp"),
        BTreeSet::from([(ip("10.1.7.1"), 5353), (ip("10.1.7.2"), 5353)])
    );
    // Every node's datapath sends them to those ports.
    for n in c.nodes.values() {
        let h = n.datapath.as_ref().expect("datapath");
        let dp = h.dp.lock().expect("dp");
        for b in s
            .backends
            .values()
            .filter(|b| b.service.starts_with("k8s:shop/web"))
        {
            let v = dp.backend(b.id).expect("backend");
            assert_eq!(
                u16::from_be(v.port),
                b.port,
                "node {}: backend {}",
                n.id(),
                b.id
            );
        }
    }
    // Source ranges, host bits cleared.
    assert_eq!(
        s.services["k8s:shop/db:5432/tcp"].source_ranges,
        ["10.0.0.0/8", "192.168.1.0/24"]
    );
    assert!(s.services["k8s:shop/web:80/tcp"].source_ranges.is_empty());
    // Answered out loud.
    let e = wait_event(&api, "ExternalTrafficPolicy", "sticky").await;
    assert!(e["message"]
        .as_str()
        .unwrap_or("")
        .contains("client's address is preserved"));
    let e = wait_event(&api, "InvalidSourceRange", "typo").await;
    assert!(e["message"]
        .as_str()
        .unwrap_or("")
        .contains("spec.loadBalancerSourceRanges"));
    let s = wait_all(&c, "sticky created", |s| {
        s.services.contains_key("k8s:shop/sticky:443/tcp")
    })
    .await;
    assert!(
        !s.services.keys().any(|k| k.contains("typo")),
        "a Service with a malformed range is not created: {:?}",
        s.services.keys().collect::<Vec<_>>()
    );
    // sessionAffinity: ClientIP with its timeout, honoured: in the config
    // and in every node's datapath; no Event about it.
    let sticky = &s.services["k8s:shop/sticky:443/tcp"];
    assert_eq!(sticky.affinity_timeout_s, Some(600));
    assert_eq!(s.services["k8s:shop/web:80/tcp"].affinity_timeout_s, None);
    let key = datapath_ebpf::abi::SvcKey::new(sticky.vip, 443, 6);
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in c.nodes.values() {
        let h = n.datapath.as_ref().expect("datapath");
        // (Each node applies the epoch on its own time.)
        loop {
            let v = h.dp.lock().expect("dp").service(&key).expect("lookup");
            if v.is_some_and(|v| v.flags & datapath_ebpf::abi::SVC_F_AFFINITY != 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: sticky with client affinity in the datapath: {v:?}",
                n.id()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        !api.list(Kind::Event)
            .iter()
            .any(|e| e["reason"] == "SessionAffinity"),
        "sessionAffinity is honoured, not answered with an Event"
    );
}
