//! One check of one backend: TCP connect, HTTP(S) GET, UDP request/response
//! or a DNS query, sent from this node to the backend's own address.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use raft_store::cluster::{CheckKind, HealthCheck, Via};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

/// What a check found.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    /// Why it failed, or what passed ("200", "connected", ...).
    pub detail: String,
    pub latency: Duration,
}

/// Longest HTTP status line read.
const MAX_STATUS_LINE: usize = 1024;

/// Run `check` against `addr:port` within its timeout (with `via = vip`:
/// against `vip:port` through `addr`).
pub async fn probe(check: &HealthCheck, addr: IpAddr, port: u16, vip: IpAddr) -> Outcome {
    let start = Instant::now();
    let timeout = Duration::from_millis(u64::from(check.timeout_ms));
    let target = SocketAddr::new(addr, port);
    let r = match check.via {
        Via::Direct => tokio::time::timeout(timeout, run(check, target)).await,
        Via::Vip => Ok(through_vip(check, addr, vip, port, timeout).await),
    };
    let (ok, detail) = match r {
        Ok(Ok(d)) => (true, d),
        Ok(Err(e)) => (false, e),
        Err(_) => (false, format!("no answer within {} ms", check.timeout_ms)),
    };
    Outcome {
        ok,
        detail,
        latency: start.elapsed(),
    }
}

async fn run(check: &HealthCheck, target: SocketAddr) -> Result<String, String> {
    match check.kind {
        CheckKind::Tcp => {
            let s = connect(target).await?;
            drop(s);
            Ok("connected".into())
        }
        CheckKind::Http => {
            let s = connect(target).await?;
            http_get(s, check, target).await
        }
        CheckKind::Https => {
            let s = connect(target).await?;
            let tls = tokio_rustls::TlsConnector::from(insecure_client_config());
            let name = match &check.host {
                Some(h) => ServerName::try_from(h.clone())
                    .map_err(|_| format!("host {h:?} is not a TLS server name"))?,
                None => ServerName::IpAddress(target.ip().into()),
            };
            let s = tls
                .connect(name, s)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            http_get(s, check, target).await
        }
        CheckKind::Udp => {
            let payload = check.send.as_deref().unwrap_or_default().as_bytes();
            let reply = udp_exchange(target, payload).await?;
            match &check.expect {
                Some(e) if !reply.starts_with(e.as_bytes()) => Err(format!(
                    "answer {:?} does not start with {e:?}",
                    String::from_utf8_lossy(&reply[..reply.len().min(64)])
                )),
                _ => Ok(format!("{} bytes answered", reply.len())),
            }
        }
        CheckKind::Dns => {
            let id: u16 = rand_id();
            let q = dns_query(id, check.query.as_deref().unwrap_or("."))?;
            let reply = udp_exchange(target, &q).await?;
            dns_verdict(id, &reply)
        }
    }
}

async fn through_vip(
    check: &HealthCheck,
    backend: IpAddr,
    vip: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<String, String> {
    let id = rand_id();
    let payload: Vec<u8> = match check.kind {
        CheckKind::Tcp => Vec::new(),
        CheckKind::Udp => check.send.clone().unwrap_or_default().into_bytes(),
        CheckKind::Dns => dns_query(id, check.query.as_deref().unwrap_or("."))?,
        k => return Err(format!("{k} checks do not go through the VIP")),
    };
    let kind = check.kind;
    let reply = tokio::task::spawn_blocking(move || {
        let p = match kind {
            CheckKind::Tcp => super::vip::Probe::TcpSyn,
            _ => super::vip::Probe::Udp(&payload),
        };
        super::vip::exchange(p, backend, vip, port, timeout)
    })
    .await
    .map_err(|e| format!("check task: {e}"))??;
    match check.kind {
        CheckKind::Tcp => Ok("SYN-ACK through the VIP".into()),
        CheckKind::Dns => dns_verdict(id, &reply).map(|d| format!("{d} through the VIP")),
        _ => match &check.expect {
            Some(e) if !reply.starts_with(e.as_bytes()) => Err(format!(
                "answer {:?} does not start with {e:?}",
                String::from_utf8_lossy(&reply[..reply.len().min(64)])
            )),
            _ => Ok(format!("{} bytes answered through the VIP", reply.len())),
        },
    }
}

async fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    check: &HealthCheck,
    target: SocketAddr,
) -> Result<String, String> {
    let path = check.path.as_deref().unwrap_or("/");
    let host = match (&check.host, target.ip()) {
        (Some(h), _) => h.clone(),
        (None, IpAddr::V4(a)) => a.to_string(),
        (None, IpAddr::V6(a)) => format!("[{a}]"),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: holdfast-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        if buf.len() >= MAX_STATUS_LINE {
            return Err("no HTTP status line in the first 1024 bytes".into());
        }
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err("connection closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = parse_status_line(&buf)?;
    let want = check.expect_status.unwrap_or(200);
    if status == want {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status}, expected {want}"))
    }
}

/// The status code of `HTTP/1.x NNN ...`.
pub fn parse_status_line(buf: &[u8]) -> Result<u16, String> {
    let end = buf
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(buf.len());
    let line = String::from_utf8_lossy(&buf[..end]);
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!(
            "not an HTTP/1.x status line: {:?}",
            &line[..line.len().min(80)]
        ));
    }
    code.parse::<u16>()
        .map_err(|_| format!("status {code:?} is not a number"))
}

async fn udp_exchange(target: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, String> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    s.connect(target)
        .await
        .map_err(|e| format!("UDP {target}: {e}"))?;
    s.send(payload)
        .await
        .map_err(|e| format!("sending to {target}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    // A connected socket only receives from the target; an ICMP port
    // unreachable shows as an error here (connection refused).
    let n = s
        .recv(&mut buf)
        .await
        .map_err(|e| format!("UDP {target}: {e}"))?;
    buf.truncate(n);
    Ok(buf)
}

fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() as u16
}

/// A DNS query for `name`, type A, class IN, recursion desired.
pub fn dns_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    raft_store::health::valid_dns_name(name)?;
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.strip_suffix('.').unwrap_or(name).split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]);
    Ok(q)
}

/// Passes when the answer is a response to query `id` with RCODE NOERROR.
pub fn dns_verdict(id: u16, reply: &[u8]) -> Result<String, String> {
    if reply.len() < 12 {
        return Err(format!("DNS answer of {} bytes is too short", reply.len()));
    }
    let rid = u16::from_be_bytes([reply[0], reply[1]]);
    if rid != id {
        return Err(format!("DNS answer id {rid} is not the query's {id}"));
    }
    if reply[2] & 0x80 == 0 {
        return Err("DNS answer is not a response (QR 0)".into());
    }
    let rcode = reply[3] & 0x0f;
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    match rcode {
        0 => Ok(format!("NOERROR, {answers} answers")),
        n => Err(format!(
            "RCODE {n} ({})",
            match n {
                1 => "FORMERR",
                2 => "SERVFAIL",
                3 => "NXDOMAIN",
                4 => "NOTIMP",
                5 => "REFUSED",
                _ => "error",
            }
        )),
    }
}

/// TLS for checks: any certificate is accepted (a check proves that the
/// backend answers, not who it is; the signature of the handshake is still
/// verified against the certificate presented).
fn insecure_client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = holdfast_pki::provider();
            let verifier = Arc::new(AnyCertificate(provider.clone()));
            let mut c = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        })
        .clone()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_and_dns_answers() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Ok(204));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2x4 odd\r\n").is_err());
        let q = dns_query(0x1234, "example.com").expect("query");
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(q[12], 7);
        let mut a = q.clone();
        a[2] |= 0x80;
        assert!(dns_verdict(0x1234, &a).is_ok());
        a[3] = 3;
        assert!(dns_verdict(0x1234, &a)
            .expect_err("nx")
            .contains("NXDOMAIN"));
        assert!(dns_verdict(0x1235, &q).is_err());
        assert!(dns_verdict(0x1234, &q[..5]).is_err());
    }

    #[tokio::test]
    async fn probes_against_local_servers() {
        holdfast_pki::install_crypto_provider();
        // TCP and HTTP.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let srv = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 512];
                    let n = s.read(&mut b).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&b[..n]).to_string();
                    let status = if req.starts_with("GET /ok ") {
                        "200 OK"
                    } else {
                        "503 Down"
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let lo: IpAddr = "127.0.0.1".parse().expect("lo");
        let tcp = HealthCheck::new(CheckKind::Tcp);
        assert!(probe(&tcp, lo, port, lo).await.ok);
        let http = HealthCheck {
            path: Some("/ok".into()),
            ..HealthCheck::new(CheckKind::Http)
        };
        let o = probe(&http, lo, port, lo).await;
        assert!(o.ok, "{o:?}");
        let bad = HealthCheck {
            path: Some("/sick".into()),
            ..HealthCheck::new(CheckKind::Http)
        };
        let o = probe(&bad, lo, port, lo).await;
        assert!(!o.ok && o.detail.contains("503"), "{o:?}");
        srv.abort();
        // Nothing listens any more: refused.
        let _ = srv.await;
        let o = probe(&tcp, lo, port, lo).await;
        assert!(!o.ok, "{o:?}");
        // UDP with an expected answer prefix, and silence → timeout.
        let u = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let uport = u.local_addr().expect("addr").port();
        let usrv = tokio::spawn(async move {
            let mut b = [0u8; 512];
            while let Ok((n, from)) = u.recv_from(&mut b).await {
                if &b[..n] == b"ping" {
                    let _ = u.send_to(b"pong", from).await;
                }
            }
        });
        let udp = HealthCheck {
            send: Some("ping".into()),
            expect: Some("po".into()),
            ..HealthCheck::new(CheckKind::Udp)
        };
        assert!(probe(&udp, lo, uport, lo).await.ok);
        let silent = HealthCheck {
            send: Some("other".into()),
            timeout_ms: 100,
            ..HealthCheck::new(CheckKind::Udp)
        };
        let o = probe(&silent, lo, uport, lo).await;
        assert!(!o.ok && o.detail.contains("within 100 ms"), "{o:?}");
        usrv.abort();
    }
}
