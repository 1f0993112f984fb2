//! t19: certificate rotation without restart, while the cluster serves
//! config writes and replicates conntrack. Node 2's key file is replaced
//! first (a half-done rotation: the node reports it and keeps its
//! identity), then its certificate: the node switches its admin API, its
//! own calls and its QUIC endpoint to the new certificate (new connections
//! present it). The old serial is then revoked: the peers drop node 2's
//! old QUIC connections, node 2 reconnects with the new certificate, and
//! the old certificate is refused by the admin API. Throughout, every
//! write succeeds and every flow replicates.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use holdfast_api::client::Client;
use holdfast_api::wire::LocalStatus;
use holdfast_node::testing::{backend, identity, service, BackgroundWrites, Cluster};
use holdfast_pki::{self as tls, CertInfo};
use raft_store::cluster::{Command, Revocation};

const VIP: &str = "10.200.0.1";
const T: Duration = Duration::from_secs(10);

/// The serial of the certificate the admin API at `addr` presents now.
async fn admin_serial(addr: std::net::SocketAddr, client: &tls::Identity) -> String {
    let cfg = holdfast_api::auth::tls::client_config(client).expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let s = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .expect("TLS");
    let chain = s
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate");
    tls::cert_info(&chain[0]).expect("parse").serial
}

/// The serial of the certificate node `id`'s QUIC endpoint presents now.
async fn quic_serial(addr: std::net::SocketAddr, id: u64, client: &tls::Identity) -> String {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(sync::transport::quic_client(client).expect("quic client"));
    let conn = ep
        .connect(addr, &tls::node_server_name(id))
        .expect("connect")
        .await
        .expect("QUIC handshake");
    let info = sync::transport::peer_cert(&conn).expect("peer cert");
    conn.close(0u32.into(), b"done");
    info.serial
}

fn write_atomically(path: &std::path::Path, data: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t19_rotate_while_serving_and_replicating() {
    let c = Cluster::start(3).await;
    c.write(service("web", VIP, 80)).await;
    let mut ids = Vec::new();
    for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        ids.push(c.write(backend("web", a, 80)).await.backend_ids[0]);
    }
    c.wait_converged(T).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(1..=3).all(|i| c.node(i).sync.get().expect("sync").is_ready()) {
        assert!(Instant::now() < deadline, "sync never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pki = c.pki.clone();
    let viewer_id = identity(&pki, "client-viewer");
    let n2 = c.node(2).clone();
    let old: CertInfo = n2.credentials.cert();
    let old_pem = std::fs::read_to_string(pki.join("node-2.pem")).expect("pem");
    let old_key = std::fs::read_to_string(pki.join("node-2.key")).expect("key");
    assert_eq!(
        admin_serial(n2.cfg.admin_addr, &viewer_id).await,
        old.serial
    );

    // Writes through node 2 all the time (forwarded to the leader when it
    // does not lead, with node 2's own certificate).
    let writes = BackgroundWrites::start(
        c.client(),
        vec![n2.cfg.admin_addr.to_string()],
        ids[0],
        "t19",
        Duration::from_millis(50),
    );

    let before = c.open_flows(2, VIP, 10_000, 40);
    c.wait_entries(1, &before, 2).await;
    c.wait_entries(3, &before, 2).await;

    // A half-done rotation: a new key under the old certificate.
    let ca = std::fs::read_to_string(pki.join("ca.pem")).expect("ca");
    let ca_key = std::fs::read_to_string(pki.join("ca.key")).expect("ca key");
    let (new_pem, new_key) = tls::issue(
        &ca,
        &ca_key,
        &tls::Subject::Node {
            id: 2,
            ips: vec!["127.0.0.1".parse().expect("ip")],
        },
    )
    .expect("issue");
    write_atomically(&pki.join("node-2.key"), &new_key);
    let deadline = Instant::now() + T;
    while n2.credentials.reload_errors.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the mismatched key was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        n2.credentials.cert().serial,
        old.serial,
        "kept its identity"
    );
    assert_eq!(n2.credentials.reloads.load(Ordering::Relaxed), 0);

    // The new certificate: picked up without a restart.
    write_atomically(&pki.join("node-2.pem"), &new_pem);
    let new_serial = tls::Identity::from_pem(&ca, &new_pem, &new_key)
        .expect("id")
        .info()
        .expect("info")
        .serial;
    let deadline = Instant::now() + T;
    while n2.credentials.cert().serial != new_serial {
        assert!(Instant::now() < deadline, "the rotation was not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n2.credentials.reloads.load(Ordering::Relaxed), 1);
    assert_eq!(
        admin_serial(n2.cfg.admin_addr, &viewer_id).await,
        new_serial
    );
    let rogue_id = {
        holdfast_node::testing::issue_node(&pki, 9);
        identity(&pki, "node-9")
    };
    assert_eq!(
        quic_serial(n2.cfg.raft_addr, 2, &rogue_id).await,
        new_serial
    );
    let st: LocalStatus = c
        .client_as(holdfast_api::auth::Role::Viewer)
        .get_async(&n2.cfg.admin_addr.to_string(), "/status", T)
        .await
        .expect("status");
    assert_eq!(st.certificate.expect("certificate").serial, new_serial);

    let during = c.open_flows(2, VIP, 11_000, 40);
    c.wait_entries(1, &during, 2).await;
    c.wait_entries(3, &during, 2).await;
    let from1 = c.open_flows(1, VIP, 12_000, 40);
    c.wait_entries(2, &from1, 1).await;

    let from2 = |serial: &str| {
        [1, 3]
            .iter()
            .map(|i| {
                c.node(*i)
                    .transport
                    .incoming_peers()
                    .iter()
                    .filter(|(p, s)| *p == 2 && s == serial)
                    .count()
            })
            .sum::<usize>()
    };
    assert!(
        from2(&old.serial) > 0,
        "node 2's connections from before the rotation stay up"
    );

    // Revoke the old certificate: the peers drop node 2's connections
    // made with it; node 2 goes on with the new one.
    c.write(Command::RevokeCertificate {
        revocation: Revocation {
            serial: old.serial.clone(),
            note: "rotated".into(),
        },
    })
    .await;
    c.wait_converged(T).await;
    let after = c.open_flows(2, VIP, 13_000, 40);
    c.wait_entries(1, &after, 2).await;
    c.wait_entries(3, &after, 2).await;
    let from3 = c.open_flows(3, VIP, 14_000, 40);
    c.wait_entries(2, &from3, 3).await;
    assert_eq!(
        from2(&old.serial),
        0,
        "a revoked certificate's connection is up"
    );
    assert!(
        from2(&new_serial) > 0,
        "node 2 reconnected with the new one"
    );
    let old_client =
        Client::from_identity(&tls::Identity::from_pem(&ca, &old_pem, &old_key).expect("old id"))
            .expect("client");
    let addr1 = c.node(1).cfg.admin_addr.to_string();
    let e =
        tokio::task::spawn_blocking(move || old_client.get::<LocalStatus>(&addr1, "/status", T))
            .await
            .expect("task")
            .expect_err("the revoked old certificate still works");
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = writes.stop().await;
    eprintln!("t19: {ok} writes through node 2 during the rotation, {failed} failed");
    assert_eq!(failed, 0, "writes failed during the rotation");
    assert!(ok >= 10, "only {ok} writes went through");
    c.wait_converged(T).await;
}
