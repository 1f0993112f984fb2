//! Cluster PKI: the CA, node and admin certificates (rcgen), and the rustls
//! configurations of the node's QUIC endpoint — mutual TLS 1.3 where both
//! sides must present a certificate signed by the cluster CA.
//!
//! A node certificate's subject CN is `node-<id>` and its DNS SAN
//! `node-<id>.holdfast`; a client dialing node N verifies that name, and a
//! server reads the calling node's id from its certificate.

use std::{path::Path, sync::Arc};

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{pki_types::pem::PemObject, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN of the node's QUIC endpoint (Raft RPCs now, conntrack sync later).
pub const ALPN: &[u8] = b"holdfast/1";

pub fn node_server_name(id: u64) -> String {
    format!("node-{id}.holdfast")
}

/// Install ring as the process-wide rustls provider (never aws-lc-rs).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Create a cluster CA: (certificate PEM, key PEM).
pub fn generate_ca(cluster: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("holdfast cluster CA {cluster}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What a certificate is for.
#[derive(Clone, Debug)]
pub enum Subject {
    /// LB node `id`, reachable at `ips`.
    Node { id: u64, ips: Vec<std::net::IpAddr> },
    /// An operator (clusterctl).
    Admin { name: String },
}

/// Issue a certificate signed by the CA: (certificate PEM, key PEM).
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, subject: &Subject) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("parsing the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("parsing the CA certificate")?;
    let key = KeyPair::generate()?;
    let (cn, sans) = match subject {
        Subject::Node { id, .. } => {
            if *id == 0 {
                bail!("node id must be positive");
            }
            (format!("node-{id}"), vec![node_server_name(*id)])
        }
        Subject::Admin { name } => (
            format!("admin-{name}"),
            vec![format!("{name}.admin.holdfast")],
        ),
    };
    let mut params = CertificateParams::new(sans)?;
    if let Subject::Node { ips, .. } = subject {
        for ip in ips {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(*ip));
        }
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The node id in a certificate (subject CN `node-<id>`).
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<u64> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow!("peer certificate does not parse: {e}"))?;
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .ok_or_else(|| anyhow!("peer certificate has no common name"))?;
    cn.strip_prefix("node-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("peer certificate {cn:?} is not a node certificate"))
}

/// Certificates and key of this node, and the CA that peers must chain to.
pub struct Identity {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let ca = CertificateDer::from_pem_file(ca)
            .with_context(|| format!("reading CA certificate {}", ca.display()))?;
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading certificate {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing certificate {}", cert.display()))?;
        if chain.is_empty() {
            bail!("{} holds no certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading key {}", key.display()))?;
        Ok(Self { ca, chain, key })
    }

    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self> {
        Ok(Self {
            ca: CertificateDer::from_pem_slice(ca.as_bytes()).context("CA PEM")?,
            chain: vec![CertificateDer::from_pem_slice(cert.as_bytes()).context("cert PEM")?],
            key: PrivateKeyDer::from_pem_slice(key.as_bytes()).context("key PEM")?,
        })
    }

    /// This node's own id, from its certificate.
    pub fn node_id(&self) -> Result<u64> {
        node_id_of(&self.chain[0])
    }

    fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .context("adding the cluster CA")?;
        Ok(Arc::new(roots))
    }

    /// QUIC server side: TLS 1.3, client certificate required and verified.
    pub fn quic_server(&self) -> Result<quinn::ServerConfig> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .context("client verifier")?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("server certificate")?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| anyhow!("QUIC server TLS: {e}"))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport_config());
        Ok(cfg)
    }

    /// QUIC client side: verifies the server against the CA, presents ours.
    pub fn quic_client(&self) -> Result<quinn::ClientConfig> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("client certificate")?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| anyhow!("QUIC client TLS: {e}"))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport_config());
        Ok(cfg)
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_millis(500)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(5)).expect("static"),
    ));
    Arc::new(t)
}

/// Write a PEM pair with the key readable by its owner only.
pub fn write_pair(dir: &Path, name: &str, cert: &str, key: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(format!("{name}.pem")), cert)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(format!("{name}.key")))?;
    std::io::Write::write_all(&mut f, key.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_node_cert_carries_its_id() {
        let (ca, ca_key) = generate_ca("test").expect("ca");
        let (cert, key) = issue(
            &ca,
            &ca_key,
            &Subject::Node {
                id: 42,
                ips: vec!["127.0.0.1".parse().expect("ip")],
            },
        )
        .expect("issue");
        let id = Identity::from_pem(&ca, &cert, &key).expect("identity");
        assert_eq!(id.node_id().expect("id"), 42);
        let (admin, _) =
            issue(&ca, &ca_key, &Subject::Admin { name: "ops".into() }).expect("admin");
        let admin = CertificateDer::from_pem_slice(admin.as_bytes()).expect("pem");
        assert!(node_id_of(&admin).is_err(), "an admin cert is not a node");
    }
}
