//! t17: the admin API authenticates every call by its client certificate
//! and authorizes it by role. For every endpoint: no certificate, a
//! certificate from a foreign CA, a self-signed one with the right subject,
//! an expired one and a revoked one are refused with 401 and their reason;
//! a viewer's writes and an operator's admin writes with 403; a node
//! certificate may join, register, leave and drain only as itself, and
//! only node certificates may act on behalf of another caller. Each
//! refusal changes nothing (config epoch, drain state) and is counted in
//! `holdfast_admin_refused_total{reason}`. clusterctl explains each
//! failure: no certificate, wrong CA, role too weak, server certificate
//! not matching, expired certificate; it reads its config file.

use std::{path::Path, sync::atomic::Ordering, time::Duration};

use holdfast_api::auth::{self, Caller, Refusal, Role};
use holdfast_api::client::Client;
use holdfast_api::wire::{Listener, ENDPOINTS};
use holdfast_node::config::RaftTuning;
use holdfast_node::testing::{
    backend, client_from, expired, identity, issue_client, issue_client_valid, make_ca, service,
    Cluster,
};
use holdfast_pki::{self as tls, Identity};
use raft_store::{
    cluster::{BackendState, Member, Revocation},
    Command, Request,
};

const T: Duration = Duration::from_secs(10);

/// A representative body for each write endpoint.
fn body(path: &str) -> Vec<u8> {
    let v = match path {
        "/command" => serde_json::to_value(Request::from(Command::AddBackend {
            service: "web".into(),
            addr: "10.0.0.9".parse().expect("ip"),
            port: 80,
            weight: 1,
        })),
        "/cluster/join" => serde_json::to_value(member(7)),
        "/cluster/remove" => serde_json::to_value(holdfast_api::wire::RemoveRequest { node_id: 3 }),
        "/drain" => serde_json::to_value(holdfast_api::wire::DrainRequest { drain: true }),
        "/health/report" => serde_json::to_value(holdfast_api::wire::HealthReport {
            node_id: 2,
            views: Vec::new(),
        }),
        "/tables/report" => serde_json::to_value(holdfast_api::wire::TablesReport {
            node_id: 2,
            live: 1,
            prepared: Some(2),
        }),
        other => panic!("no body for {other}"),
    };
    serde_json::to_vec(&v.expect("json")).expect("bytes")
}

fn member(id: u64) -> Member {
    Member {
        node_id: id,
        raft_addr: "127.0.0.1:9".into(),
        admin_addr: "127.0.0.1:10".into(),
        bgp_next_hop: None,
    }
}

/// One call of `method path` (the query is added for /conntrack).
fn call(client: &Client, addr: &str, method: &str, path: &str) -> (u16, String) {
    let (status, b) = if method == "GET" {
        let p = if path == "/conntrack" {
            "/conntrack?limit=5"
        } else {
            path
        };
        client.get_raw(addr, p, T)
    } else {
        client.post_raw(addr, path, &body(path), T)
    }
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (status, String::from_utf8_lossy(&b).into_owned())
}

/// A client presenting `cert`/`key` and trusting the cluster CA `ca`.
fn client_with(ca: &Path, cert: &str, key: &str) -> Client {
    let ca = std::fs::read(ca).expect("ca");
    let id = Identity::from_pem_bytes(&ca, cert.as_bytes(), key.as_bytes()).expect("identity");
    Client::from_identity(&id).expect("client")
}

fn self_signed_admin() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "admin");
    dn.push(rcgen::DnType::OrganizationName, tls::ORGANIZATION);
    dn.push(rcgen::DnType::OrganizationalUnitName, "admin");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).expect("self-signed");
    (cert.pem(), key.serialize_pem())
}

/// A call that must be refused with 403 and `text` in the answer.
struct Check {
    what: &'static str,
    client: Client,
    addr: String,
    path: &'static str,
    text: &'static str,
}

fn refused(c: &Cluster, id: u64, r: &Refusal) -> u64 {
    c.node(id).metrics.admin_refused[r.index()].load(Ordering::Relaxed)
}

fn epochs(c: &Cluster) -> Vec<u64> {
    c.nodes
        .values()
        .map(|n| n.sm.current().state.epoch)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_every_endpoint_refuses_bad_certificates_and_weak_roles() {
    let c = Cluster::start_with(3, RaftTuning::default(), false).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    let be = c.write(backend("web", "10.0.0.1", 80)).await.backend_ids[0];
    let pki = c.pki.clone();

    // The bad credentials.
    let anonymous = Client::new(
        auth::tls::anonymous_client_config(&identity(&pki, "client-admin").ca).expect("anon"),
    );
    let foreign_pki = c.dir.path().join("foreign");
    make_ca(&foreign_pki, "other");
    issue_client(&foreign_pki, "admin", Role::Admin);
    let foreign = client_with(
        &pki.join("ca.pem"),
        &std::fs::read_to_string(foreign_pki.join("client-admin.pem")).expect("pem"),
        &std::fs::read_to_string(foreign_pki.join("client-admin.key")).expect("key"),
    );
    let (ss_cert, ss_key) = self_signed_admin();
    let self_signed = client_with(&pki.join("ca.pem"), &ss_cert, &ss_key);
    issue_client_valid(&pki, "old", Role::Admin, expired());
    let expired = client_from(&pki, "client-old");
    issue_client(&pki, "gone", Role::Admin);
    let gone = identity(&pki, "client-gone");
    let serial = gone.info().expect("info").serial;
    c.write(Command::RevokeCertificate {
        revocation: Revocation {
            serial: serial.clone(),
            note: "t17".into(),
        },
    })
    .await;
    let revoked = Client::from_identity(&gone).expect("client");
    let epoch = c.wait_converged(T).await;

    let target = 2;
    let addr = c.node(target).cfg.admin_addr.to_string();
    let cases: [(&str, &Client, Refusal, &str); 5] = [
        (
            "no certificate",
            &anonymous,
            Refusal::NoCertificate,
            "no client certificate",
        ),
        (
            "foreign CA",
            &foreign,
            Refusal::Untrusted {
                subject: String::new(),
                why: String::new(),
            },
            "not issued by this cluster's CA",
        ),
        (
            "self-signed",
            &self_signed,
            Refusal::Untrusted {
                subject: String::new(),
                why: String::new(),
            },
            "not issued by this cluster's CA",
        ),
        (
            "expired",
            &expired,
            Refusal::Expired {
                subject: String::new(),
                why: String::new(),
            },
            "not valid now",
        ),
        (
            "revoked",
            &revoked,
            Refusal::Revoked {
                subject: String::new(),
                serial: String::new(),
            },
            "is revoked",
        ),
    ];
    let endpoints: Vec<_> = ENDPOINTS
        .iter()
        .filter(|e| matches!(e.listener, Listener::Admin | Listener::Both))
        .collect();
    assert_eq!(endpoints.len(), 13, "every endpoint is attacked");
    for (what, client, reason, text) in &cases {
        let before = refused(&c, target, reason);
        let mut calls = 0;
        for ep in &endpoints {
            let (client, addr, m, p) = ((*client).clone(), addr.clone(), ep.method, ep.path);
            let (status, body) = tokio::task::spawn_blocking(move || call(&client, &addr, m, p))
                .await
                .expect("task");
            assert_eq!(status, 401, "{what}: {m} {p}: {body}");
            assert!(body.contains(text), "{what}: {m} {p}: {body}");
            assert!(body.contains("\"unauthenticated\""), "{body}");
            calls += 1;
        }
        assert_eq!(
            refused(&c, target, reason) - before,
            calls,
            "{what}: every refusal counted as {}",
            reason.reason()
        );
    }
    assert_eq!(
        epochs(&c),
        vec![epoch; 3],
        "a refused call changed the config"
    );
    assert!(!c.node(target).draining.load(Ordering::Relaxed));

    // Roles. A viewer reads everything and writes nothing.
    let forbidden = Refusal::Forbidden {
        caller: String::new(),
        why: String::new(),
    };
    let viewer = c.client_as(Role::Viewer);
    let operator = c.client_as(Role::Operator);
    let before = refused(&c, target, &forbidden);
    for ep in &endpoints {
        let (client, addr, m, p) = (viewer.clone(), addr.clone(), ep.method, ep.path);
        let (status, body) = tokio::task::spawn_blocking(move || call(&client, &addr, m, p))
            .await
            .expect("task");
        match (ep.write, p) {
            (false, "/conntrack") => assert_eq!(status, 409, "no datapath here: {body}"),
            (false, "/ready") => assert!(status == 200 || status == 503, "{body}"),
            (false, _) => assert_eq!(status, 200, "viewer GET {p}: {body}"),
            (true, _) => {
                assert_eq!(status, 403, "viewer POST {p}: {body}");
                assert!(body.contains("read-only"), "{body}");
            }
        }
    }
    assert_eq!(refused(&c, target, &forbidden) - before, 6);
    // An operator drains backends, not services or members.
    let admin_cmds = [
        Command::AddBackend {
            service: "web".into(),
            addr: "10.0.0.2".parse().expect("ip"),
            port: 80,
            weight: 1,
        },
        Command::RemoveService { name: "web".into() },
        Command::PutMember { member: member(7) },
        Command::RevokeCertificate {
            revocation: Revocation {
                serial: "7f01".into(),
                note: String::new(),
            },
        },
        Command::Batch {
            commands: vec![
                Command::SetBackendWeight { id: be, weight: 2 },
                Command::RemoveBackend { id: be },
            ],
        },
    ];
    for cmd in admin_cmds {
        let (client, a) = (operator.clone(), addr.clone());
        let r = tokio::task::spawn_blocking(move || {
            client.post::<_, raft_store::Response>(&a, "/command", &Request::from(cmd), T)
        })
        .await
        .expect("task");
        let e = r.expect_err("operator wrote an admin command");
        assert_eq!(e.status(), Some(403), "{e}");
        assert!(e.to_string().contains("needs role admin"), "{e}");
    }
    for path in ["/cluster/join", "/cluster/remove"] {
        let (client, a) = (operator.clone(), addr.clone());
        let (status, b) = tokio::task::spawn_blocking(move || call(&client, &a, "POST", path))
            .await
            .expect("task");
        assert_eq!(status, 403, "operator {path}: {b}");
    }
    assert_eq!(epochs(&c), vec![epoch; 3]);
    // What an operator may do.
    let (client, a) = (operator.clone(), addr.clone());
    let r: raft_store::Response = tokio::task::spawn_blocking(move || {
        client.post(
            &a,
            "/command",
            &Request::from(Command::SetBackendState {
                id: be,
                state: BackendState::Draining,
            }),
            T,
        )
    })
    .await
    .expect("task")
    .expect("operator drains a backend");
    assert_eq!(r.epoch, epoch + 1);
    let (client, a) = (operator.clone(), addr.clone());
    let st: holdfast_api::wire::LocalStatus = tokio::task::spawn_blocking(move || {
        client.post(
            &a,
            "/drain",
            &holdfast_api::wire::DrainRequest { drain: false },
            T,
        )
    })
    .await
    .expect("task")
    .expect("operator (un)drains a node");
    assert!(!st.draining);
    let epoch = c.wait_converged(T).await;

    // Node certificates: as themselves only.
    let node2 = holdfast_node::testing::client_from(&pki, "node-2");
    let leader = c.wait_leader(T).await;
    let leader_addr = c.node(leader).cfg.admin_addr.to_string();
    let other = (1..=3)
        .find(|i| *i != 2 && *i != leader)
        .expect("a third node");
    let other_addr = c.node(other).cfg.admin_addr.to_string();
    let checks = vec![
        Check {
            what: "node 2 joins as node 7",
            client: node2.clone(),
            addr: leader_addr.clone(),
            path: "/cluster/join",
            text: "joining as node 7",
        },
        Check {
            what: "node 2 removes node 3",
            client: node2.clone(),
            addr: leader_addr.clone(),
            path: "/cluster/remove",
            text: "removing node 3",
        },
        Check {
            what: "node 2 adds a backend",
            client: node2.clone(),
            addr: leader_addr.clone(),
            path: "/command",
            text: "needs role admin",
        },
        Check {
            what: "node 2 drains another node",
            client: node2.clone(),
            addr: other_addr.clone(),
            path: "/drain",
            text: "POST /drain",
        },
        // The leader checks the joining id too: node 2 forwarding a
        // join "for node 8" that claims id 7.
        Check {
            what: "forwarded join with another id",
            client: node2.clone().on_behalf_of(&Caller::Node(8)),
            addr: leader_addr.clone(),
            path: "/cluster/join",
            text: "joining as node 7",
        },
        Check {
            what: "an admin certificate acting on behalf of another",
            client: c.client().on_behalf_of(&Caller::Node(7)),
            addr: leader_addr.clone(),
            path: "/cluster/join",
            text: "only node certificates",
        },
        Check {
            what: "a viewer made admin by a forwarding header it cannot send",
            client: viewer.clone().on_behalf_of(&Caller::Client {
                name: "x".into(),
                role: Role::Admin,
            }),
            addr: leader_addr.clone(),
            path: "/command",
            text: "only node certificates",
        },
    ];
    for Check {
        what,
        client,
        addr,
        path,
        text,
    } in checks
    {
        let (status, out) = tokio::task::spawn_blocking(move || {
            client.post_raw(&addr, path, &body(path), T).expect("call")
        })
        .await
        .expect("task");
        let out = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(status, 403, "{what}: {out}");
        assert!(out.contains(text), "{what}: {out}");
    }
    assert_eq!(epochs(&c), vec![epoch; 3]);
    for n in c.nodes.values() {
        assert!(!n.draining.load(Ordering::Relaxed));
    }
    // A node drains itself (the preStop hook) and reads others.
    let self_addr = c.node(2).cfg.admin_addr.to_string();
    let n2 = node2.clone();
    let st: holdfast_api::wire::LocalStatus = tokio::task::spawn_blocking(move || {
        n2.post(
            &self_addr,
            "/drain",
            &holdfast_api::wire::DrainRequest { drain: true },
            T,
        )
    })
    .await
    .expect("task")
    .expect("a node drains itself");
    assert!(st.draining);
    let n2 = node2.clone();
    let _: raft_store::ClusterState =
        tokio::task::spawn_blocking(move || n2.get(&other_addr, "/config", T))
            .await
            .expect("task")
            .expect("a node reads");

    // The refusals are in the metrics, by reason.
    let m = c.node(target).cfg.metrics_addr.to_string();
    let text = tokio::task::spawn_blocking(move || {
        holdfast_api::client::get_plain(&m, "/metrics", T)
            .expect("metrics")
            .1
    })
    .await
    .expect("task");
    for r in [
        "no_certificate",
        "untrusted_certificate",
        "expired_certificate",
        "revoked_certificate",
    ] {
        let line = format!("holdfast_admin_refused_total{{reason=\"{r}\"}} ");
        let v: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{line} missing"))
            .trim()
            .parse()
            .expect("value");
        assert!(v >= 10.0, "{r}: {v}");
    }
}

/// Run clusterctl with `args` and `env`: (exit code, stdout, stderr).
fn clusterctl(args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(holdfast_node::testing::workspace_bin(
        "clusterctl",
        "clusterctl",
    ));
    cmd.args(args)
        .env_remove("HOLDFAST_CA")
        .env_remove("HOLDFAST_CERT")
        .env_remove("HOLDFAST_KEY")
        .env_remove("HOLDFAST_ADMIN")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("HOME", "/nonexistent");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run clusterctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_clusterctl_explains_each_refusal() {
    let c = Cluster::start_with(1, RaftTuning::default(), false).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    let pki = c.pki.clone();
    let addr = c.node(1).cfg.admin_addr.to_string();
    let foreign = c.dir.path().join("foreign");
    make_ca(&foreign, "other");
    let dir = c.dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let p = |f: &str| pki.join(f);
        let viewer = [
            ("HOLDFAST_CA", p("ca.pem")),
            ("HOLDFAST_CERT", p("client-viewer.pem")),
            ("HOLDFAST_KEY", p("client-viewer.key")),
        ];
        let env =
            |e: &[(&'static str, std::path::PathBuf)]| -> Vec<(&'static str, std::path::PathBuf)> {
                e.to_vec()
            };
        let run = |args: &[&str], e: &[(&'static str, std::path::PathBuf)]| {
            let e: Vec<(&str, &Path)> = e.iter().map(|(k, v)| (*k, v.as_path())).collect();
            clusterctl(args, &e)
        };
        // No certificate at all.
        let (code, _, err) = run(&["--node", &addr, "status"], &[]);
        assert_eq!(code, 7, "{err}");
        assert!(err.contains("no client certificate"), "{err}");
        // The node's certificate is not from the CA clusterctl trusts.
        let mut wrong_ca = env(&viewer);
        wrong_ca[0].1 = foreign.join("ca.pem");
        let (code, _, err) = run(&["--node", &addr, "status"], &wrong_ca);
        assert_eq!(code, 7, "{err}");
        assert!(err.contains("not signed by the CA you trust"), "{err}");
        // The node's certificate does not name what was dialed.
        let (code, _, err) = run(
            &[
                "--node",
                &addr,
                "--server-name",
                "node-9.holdfast",
                "status",
            ],
            &viewer,
        );
        assert_eq!(code, 7, "{err}");
        assert!(err.contains("does not match node-9.holdfast"), "{err}");
        // Role too weak.
        let (code, _, err) = run(
            &[
                "--node",
                &addr,
                "backends",
                "add",
                "--service",
                "web",
                "--addr",
                "10.0.0.5",
            ],
            &viewer,
        );
        assert_eq!(code, 7, "{err}");
        assert!(
            err.contains("forbidden") && err.contains("read-only"),
            "{err}"
        );
        assert!(err.contains("role is too weak"), "{err}");
        // An expired client certificate.
        issue_client_valid(&pki, "old", Role::Admin, expired());
        let expired = [
            ("HOLDFAST_CA", p("ca.pem")),
            ("HOLDFAST_CERT", p("client-old.pem")),
            ("HOLDFAST_KEY", p("client-old.key")),
        ];
        let (code, _, err) = run(&["--node", &addr, "status"], &expired);
        assert_eq!(code, 7, "{err}");
        assert!(err.contains("not valid now"), "{err}");
        // The right role works, from flags.
        let (code, out, err) = run(
            &[
                "--node",
                &addr,
                "--ca",
                p("ca.pem").to_str().expect("utf8"),
                "--cert",
                p("client-operator.pem").to_str().expect("utf8"),
                "--key",
                p("client-operator.key").to_str().expect("utf8"),
                "-o",
                "json",
                "status",
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        let st: holdfast_api::wire::LocalStatus = serde_json::from_str(&out).expect("json");
        assert_eq!(st.node_id, 1);
        // And from the config file in the usual place.
        let xdg = dir.join("xdg");
        std::fs::create_dir_all(xdg.join("holdfast")).expect("dir");
        std::fs::write(
            xdg.join("holdfast/clusterctl.toml"),
            format!(
                "node = \"{addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                p("ca.pem").display(),
                p("client-admin.pem").display(),
                p("client-admin.key").display()
            ),
        )
        .expect("write config");
        let (code, out, err) = run(&["services", "list"], &[("XDG_CONFIG_HOME", xdg.clone())]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("web"), "{out}");
        // A config file with a typo is refused, naming it.
        std::fs::write(xdg.join("holdfast/clusterctl.toml"), "nodee = \"x\"\n").expect("write");
        let (code, _, err) = run(&["status"], &[("XDG_CONFIG_HOME", xdg)]);
        assert_ne!(code, 0);
        assert!(err.contains("nodee"), "{err}");
        // certs issue: a client certificate with a role, shown.
        let (code, out, err) = run(
            &[
                "certs",
                "issue",
                "--dir",
                p("").to_str().expect("utf8"),
                "--client",
                "ci",
                "--role",
                "operator",
                "--days",
                "2",
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("CN=ci,OU=operator"), "{out}");
        let (code, out, _) = run(
            &[
                "certs",
                "show",
                p("client-ci.pem").to_str().expect("utf8"),
                "-o",
                "json",
            ],
            &[],
        );
        assert_eq!(code, 0);
        let info: tls::CertInfo = serde_json::from_str(&out).expect("json");
        assert_eq!(info.ou.as_deref(), Some("operator"));
        let (code, _, err) = run(
            &[
                "certs",
                "issue",
                "--dir",
                p("").to_str().expect("utf8"),
                "--client",
                "x",
                "--role",
                "root",
            ],
            &[],
        );
        assert_ne!(code, 0);
        assert!(err.contains("root"), "{err}");
    })
    .await
    .expect("clusterctl checks");
}
