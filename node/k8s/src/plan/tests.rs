//! The plan against objects written as users write them.
use super::*;
use raft_store::cluster::VipPool;

fn cfg() -> PlanConfig {
    PlanConfig {
        load_balancer_class: "holdfast.io/l4".into(),
        external_ips: true,
        table_size: 251,
    }
}

fn state() -> ClusterState {
    let mut s = ClusterState::default();
    for (n, c) in [("v4", "10.210.0.0/29"), ("v6", "fd00:210::/120")] {
        let r = s.apply(&Command::PutVipPool {
            pool: VipPool {
                name: n.into(),
                cidr: c.into(),
                ..Default::default()
            },
        });
        assert!(r.rejected.is_none());
    }
    s
}

fn svc(v: serde_json::Value) -> Service {
    serde_json::from_value(v).expect("Service")
}

fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).expect("EndpointSlice")
}

/// Apply the plan's commands the way the controller does.
fn apply(s: &mut ClusterState, p: &Plan) {
    let r = s.apply(&Command::Batch {
        commands: p.commands.clone(),
    });
    assert!(r.rejected.is_none(), "{:?}", r.rejected);
}

#[test]
fn dual_stack_multi_port_and_idempotent() {
    let services = vec![svc(serde_json::json!({
        "metadata": {"name": "dns", "namespace": "ns", "uid": "u1"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
                 "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": "udp", "port": 53, "protocol": "UDP"},
                           {"name": "tcp", "port": 53, "protocol": "TCP"}]}
    }))];
    let slices = vec![
        slice(serde_json::json!({
            "metadata": {"name": "dns-a", "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": true}},
                          {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}],
            "ports": [{"name": "udp", "port": 53, "protocol": "UDP"},
                      {"name": "tcp", "port": 53, "protocol": "TCP"}]
        })),
        slice(serde_json::json!({
            "metadata": {"name": "dns-b", "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00:1::1"], "conditions": {"ready": true}}],
            "ports": [{"name": "udp", "port": 53, "protocol": "UDP"},
                      {"name": "tcp", "port": 53, "protocol": "TCP"}]
        })),
    ];
    let mut s = state();
    let p = plan(&services, &slices, &s, &cfg());
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    apply(&mut s, &p);
    let names: Vec<&str> = s.services.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "k8s:ns/dns:53/tcp",
            "k8s:ns/dns:53/tcp/v6",
            "k8s:ns/dns:53/udp",
            "k8s:ns/dns:53/udp/v6"
        ]
    );
    assert_eq!(
        s.services["k8s:ns/dns:53/udp"].vip.to_string(),
        "10.210.0.1"
    );
    assert_eq!(
        s.services["k8s:ns/dns:53/udp/v6"].vip.to_string(),
        "fd00:210::1"
    );
    // The terminating endpoint was never a backend: not added.
    let v4: Vec<String> = s
        .backends
        .values()
        .filter(|b| b.service == "k8s:ns/dns:53/udp")
        .map(|b| b.addr.to_string())
        .collect();
    assert_eq!(v4, ["10.1.0.1"]);
    let v6: Vec<String> = s
        .backends
        .values()
        .filter(|b| b.service == "k8s:ns/dns:53/tcp/v6")
        .map(|b| b.addr.to_string())
        .collect();
    assert_eq!(v6, ["fd00:1::1"]);
    assert_eq!(p.statuses[&("ns".into(), "dns".into())].len(), 2);
    // Idempotent: the same objects against the new state change nothing.
    let again = plan(&services, &slices, &s, &cfg());
    assert!(again.commands.is_empty(), "{:?}", again.commands);
    // The Service goes: everything it owned goes, nothing else.
    let gone = plan(&[], &[], &s, &cfg());
    apply(&mut s, &gone);
    assert!(s.services.is_empty() && s.backends.is_empty());
}

#[test]
fn external_ips_and_foreign_services_are_respected() {
    let mut s = state();
    // A service made by clusterctl holds 10.210.0.1.
    let r = s.apply(&Command::PutService {
        service: HfService {
            name: "manual".into(),
            vip: "10.210.0.1".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
            table_size: 251,
            mode: ForwardingMode::Dsr,
            health_check: None,
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
        },
    });
    assert!(r.rejected.is_none());
    let services = vec![
        svc(serde_json::json!({
            "metadata": {"name": "ext", "namespace": "ns", "uid": "u2"},
            "spec": {"type": "ClusterIP", "externalIPs": ["10.210.0.3", "192.0.2.9"],
                     "ports": [{"port": 80}]}
        })),
        svc(serde_json::json!({
            "metadata": {"name": "lb", "namespace": "ns", "uid": "u3"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
                     "ports": [{"port": 80}]}
        })),
        svc(serde_json::json!({
            "metadata": {"name": "other-class", "namespace": "ns", "uid": "u4"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "someone.else/lb",
                     "ports": [{"port": 80}]}
        })),
    ];
    let p = plan(&services, &[], &s, &cfg());
    apply(&mut s, &p);
    // externalIPs in a pool are served (no status: not a LoadBalancer);
    // the address outside the pools is ignored.
    assert_eq!(
        s.services["k8s:ns/ext:80/tcp"].vip.to_string(),
        "10.210.0.3"
    );
    assert!(!p.statuses.contains_key(&("ns".into(), "ext".into())));
    // The LB service skips the manual VIP and the external IP.
    assert_eq!(s.services["k8s:ns/lb:80/tcp"].vip.to_string(), "10.210.0.2");
    assert!(!s.services.keys().any(|k| k.contains("other-class")));
    assert!(
        s.services.contains_key("manual"),
        "foreign services are untouched"
    );
    assert!(plan(&services, &[], &s, &cfg()).commands.is_empty());
}

#[test]
fn health_check_annotation_events_and_bad_values() {
    let mk = |ann: &str| {
        svc(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u9",
                         "annotations": {HEALTH_CHECK_ANNOTATION: ann}},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        }))
    };
    let slices = vec![slice(serde_json::json!({
        "metadata": {"name": "web-a", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]
    }))];
    let mut s = state();
    let good = r#"{"type":"http","path":"/healthz","interval_ms":1000,"timeout_ms":500}"#;
    let p = plan(&[mk(good)], &slices, &s, &cfg());
    apply(&mut s, &p);
    let hs = s.services.values().next().expect("service");
    let hc = hs.health_check.clone().expect("check from the annotation");
    assert_eq!(
        (hc.kind, hc.path.as_deref(), hc.interval_ms),
        (raft_store::cluster::CheckKind::Http, Some("/healthz"), 1000)
    );
    // A bad annotation (interval 0, unknown type, not JSON): the
    // service keeps its check and an Event names the problem.
    for (bad, word) in [
        (
            r#"{"type":"http","interval_ms":0}"#,
            "health_check.interval_ms",
        ),
        (r#"{"type":"icmp"}"#, "icmp"),
        ("tcp please", "expected"),
    ] {
        let p = plan(&[mk(bad)], &slices, &s, &cfg());
        assert!(p.commands.is_empty(), "{bad}: {:?}", p.commands);
        let n = p
            .notes
            .iter()
            .find(|n| n.reason == "InvalidHealthCheck")
            .unwrap_or_else(|| panic!("{bad}: no event"));
        assert!(n.message.contains(word), "{bad}: {}", n.message);
        assert_eq!((n.name.as_str(), n.uid.as_str()), ("web", "u9"));
    }
    // The tier marks its only backend down: events for it and the panic.
    let id = *s.backends.keys().next().expect("backend");
    assert!(s
        .apply(&Command::SetBackendHealth {
            id,
            health: raft_store::cluster::Health::Failing
        })
        .rejected
        .is_none());
    let p = plan(&[mk(good)], &slices, &s, &cfg());
    let reasons: Vec<&str> = p.notes.iter().map(|n| n.reason).collect();
    assert!(
        reasons.contains(&"BackendUnhealthy") && reasons.contains(&"HealthPanic"),
        "{reasons:?}"
    );
    // A node alone disagreeing: an Event on the Service.
    let table = holdfast_api::wire::HealthTable {
        leader: 1,
        backends: vec![holdfast_api::wire::HealthRow {
            backend_id: id,
            service: s.backends[&id].service.clone(),
            addr: s.backends[&id].addr,
            health: raft_store::cluster::Health::Up,
            views: vec![holdfast_api::wire::NodeView {
                node_id: 3,
                up: false,
                detail: "connect: refused".into(),
                latency_ms: 0.1,
                age_ms: 10,
                fresh: true,
            }],
            disagree: vec![3],
        }],
        panic: Default::default(),
    };
    let n = view_notes(&[mk(good)], &s, &table);
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(
        n[0].reason == "NodeViewDiffers"
            && n[0].message.contains("LB node 3 sees backend 10.1.0.1"),
        "{n:?}"
    );
    // Without the annotation the check goes.
    let plain = svc(serde_json::json!({
        "metadata": {"name": "web", "namespace": "ns", "uid": "u9"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }));
    let p = plan(&[plain], &slices, &s, &cfg());
    apply(&mut s, &p);
    assert!(s.services.values().all(|x| x.health_check.is_none()));
}

#[test]
fn forwarding_annotation_snat_forwards_to_the_target_port() {
    let web = |ann: Option<&str>| {
        let mut meta = serde_json::json!({"name": "web", "namespace": "ns", "uid": "u9"});
        if let Some(a) = ann {
            meta["annotations"] = serde_json::json!({ FORWARDING_ANNOTATION: a });
        }
        svc(serde_json::json!({
            "metadata": meta,
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        }))
    };
    let slices = vec![slice(serde_json::json!({
        "metadata": {"name": "web-a", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))];
    let mut s = state();
    // No SNAT pool yet: an Event saying so, nothing created.
    let p = plan(&[web(Some("snat"))], &slices, &s, &cfg());
    assert!(
        p.notes
            .iter()
            .any(|n| n.reason == "NoSnatPool" && n.message.contains("IPv4 SNAT pool")),
        "{:?}",
        p.notes
    );
    assert!(
        !p.commands
            .iter()
            .any(|c| matches!(c, raft_store::Command::PutService { .. })),
        "{:?}",
        p.commands
    );
    let r = s.apply(&raft_store::Command::PutSnatPools {
        v4: Some("10.200.1.0/28".into()),
        v6: None,
    });
    assert_eq!(r.rejected, None);
    // SNAT: the backend is the endpoint's port, no Event.
    let p = plan(&[web(Some("snat"))], &slices, &s, &cfg());
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    apply(&mut s, &p);
    let hs = &s.services["k8s:ns/web:80/tcp"];
    assert_eq!(hs.mode, ForwardingMode::Snat);
    let b: Vec<(IpAddr, u16)> = s.backends.values().map(|b| (b.addr, b.port)).collect();
    assert_eq!(b, vec![("10.1.0.7".parse().unwrap(), 8080)]);
    // A bad value: an Event naming the annotation; the service keeps snat.
    let p = plan(&[web(Some("nat"))], &slices, &s, &cfg());
    assert!(
        p.notes
            .iter()
            .any(|n| n.reason == "InvalidForwarding" && n.message.contains(FORWARDING_ANNOTATION)),
        "{:?}",
        p.notes
    );
    assert!(p.commands.is_empty(), "nothing changes: {:?}", p.commands);
}

#[test]
fn load_balancer_source_ranges_restrict_the_service_and_bad_ones_never_open_it() {
    let db = |ranges: serde_json::Value| {
        svc(serde_json::json!({
            "metadata": {"name": "db", "namespace": "ns", "uid": "u5"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
                     "loadBalancerSourceRanges": ranges,
                     "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}
        }))
    };
    let slices = vec![slice(serde_json::json!({
        "metadata": {"name": "db-a", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.9"], "conditions": {"ready": true}}],
        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]
    }))];
    let mut s = state();
    // Host bits are cleared as Kubernetes reads the field; duplicates go.
    let p = plan(
        &[db(serde_json::json!([
            "10.0.0.1/8",
            "192.168.7.0/24",
            "10.0.0.0/8"
        ]))],
        &slices,
        &s,
        &cfg(),
    );
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    apply(&mut s, &p);
    let name = "k8s:ns/db:5432/tcp";
    assert_eq!(
        s.services[name].source_ranges,
        ["10.0.0.0/8", "192.168.7.0/24"]
    );
    // Narrowed: the new list replaces the old one.
    let p = plan(
        &[db(serde_json::json!(["192.168.7.0/24"]))],
        &slices,
        &s,
        &cfg(),
    );
    apply(&mut s, &p);
    assert_eq!(s.services[name].source_ranges, ["192.168.7.0/24"]);
    // A malformed range: an Event naming the field, the ranges stay.
    let p = plan(
        &[db(serde_json::json!(["192.168.7.0/24", "everyone"]))],
        &slices,
        &s,
        &cfg(),
    );
    assert!(
        p.notes.iter().any(|n| n.reason == "InvalidSourceRange"
            && n.message.contains("spec.loadBalancerSourceRanges")),
        "{:?}",
        p.notes
    );
    apply(&mut s, &p);
    assert_eq!(s.services[name].source_ranges, ["192.168.7.0/24"]);
    // ... and a new Service with one is not created at all.
    let mut fresh = state();
    let p = plan(&[db(serde_json::json!(["bad"]))], &slices, &fresh, &cfg());
    apply(&mut fresh, &p);
    assert!(fresh.services.is_empty(), "{:?}", fresh.services);
    // The field removed: every client.
    let p = plan(&[db(serde_json::json!([]))], &slices, &s, &cfg());
    apply(&mut s, &p);
    assert!(s.services[name].source_ranges.is_empty());
}

#[test]
fn session_affinity_client_ip_sets_the_timeout_and_bad_ones_keep_it() {
    let web = |spec: serde_json::Value| {
        let mut s = serde_json::json!({
            "type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]
        });
        s.as_object_mut()
            .expect("object")
            .extend(spec.as_object().expect("object").clone());
        svc(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u6"},
            "spec": s
        }))
    };
    let slices = vec![slice(serde_json::json!({
        "metadata": {"name": "web-a", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.9"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]
    }))];
    let name = "k8s:ns/web:80/tcp";
    let mut s = state();
    // ClientIP without a config: Kubernetes' default of three hours.
    let p = plan(
        &[web(serde_json::json!({"sessionAffinity": "ClientIP"}))],
        &slices,
        &s,
        &cfg(),
    );
    assert!(
        p.notes.is_empty(),
        "honoured without an Event: {:?}",
        p.notes
    );
    apply(&mut s, &p);
    assert_eq!(s.services[name].affinity_timeout_s, Some(10_800));
    // With its timeout.
    let p = plan(
        &[web(serde_json::json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}))],
        &slices,
        &s,
        &cfg(),
    );
    apply(&mut s, &p);
    assert_eq!(s.services[name].affinity_timeout_s, Some(600));
    // A timeout out of range, or an unknown value: an Event naming the
    // field, and the affinity stays.
    for bad in [
        serde_json::json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
        serde_json::json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86_401}}}),
        serde_json::json!({"sessionAffinity": "Cookie"}),
    ] {
        let p = plan(&[web(bad.clone())], &slices, &s, &cfg());
        assert!(
            p.notes.iter().any(|n| n.reason == "InvalidSessionAffinity"
                && n.message.contains("spec.sessionAffinity")),
            "{bad}: {:?}",
            p.notes
        );
        apply(&mut s, &p);
        assert_eq!(s.services[name].affinity_timeout_s, Some(600), "{bad}");
    }
    // None (or the field removed): no affinity.
    let p = plan(
        &[web(serde_json::json!({"sessionAffinity": "None"}))],
        &slices,
        &s,
        &cfg(),
    );
    apply(&mut s, &p);
    assert_eq!(s.services[name].affinity_timeout_s, None);
}
