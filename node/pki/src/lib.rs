//! Cluster PKI: the CA, node and client certificates (rcgen), what a
//! certificate says about its holder, and a holder's identity (CA,
//! certificate chain, key) that the QUIC endpoint (`sync::transport`), the
//! admin API and its clients build their rustls configurations from —
//! mutual TLS 1.3 where both sides must present a certificate signed by the
//! cluster CA. Depends on no other Holdfast crate.
//!
//! Every certificate this module issues has subject `O=holdfast`, a role in
//! `OU` and a random 20-byte serial (the revocation list names serials):
//! - a node certificate: `CN=node-<id>`, `OU=node`, DNS SAN
//!   `node-<id>.holdfast` and the node's IP addresses; a client dialing node
//!   N verifies that name, a server reads the calling node's id from it;
//! - a client certificate (clusterctl, operators, automation): `CN=<name>`,
//!   `OU=<role>` (`admin`, `operator`, `viewer`), client authentication only.

use std::{path::Path, sync::Arc, time::SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::{pki_types::pem::PemObject, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN of the node's QUIC endpoint (Raft RPCs and conntrack replication).
pub const ALPN: &[u8] = b"holdfast/1";

/// The `OU` of node certificates.
pub const NODE_ROLE: &str = "node";
/// The `O` of every certificate the cluster CA issues.
pub const ORGANIZATION: &str = "holdfast";
/// Default lifetime of node and client certificates.
pub const DEFAULT_CERT_DAYS: u32 = 365;
/// Default lifetime of the cluster CA.
pub const DEFAULT_CA_DAYS: u32 = 3650;

pub fn node_server_name(id: u64) -> String {
    format!("node-{id}.holdfast")
}

/// Install ring as the process-wide rustls provider (never aws-lc-rs).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The crypto provider of every TLS configuration here (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From five minutes ago (clock skew between nodes) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - std::time::Duration::from_secs(300),
            not_after: now + std::time::Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

fn apply_validity(params: &mut CertificateParams, v: Validity) -> Result<()> {
    if v.not_after <= v.not_before {
        bail!("a certificate must end after it begins");
    }
    params.not_before = v.not_before.into();
    params.not_after = v.not_after.into();
    Ok(())
}

fn random_serial() -> SerialNumber {
    let mut s: [u8; 20] = rand::random();
    s[0] &= 0x7f; // positive, and at most 20 bytes encoded (RFC 5280)
    s[0] |= 0x01; // no leading zero byte: the hex form is always 40 digits
    SerialNumber::from_slice(&s)
}

/// Create a cluster CA valid for [`DEFAULT_CA_DAYS`]: (certificate PEM, key PEM).
pub fn generate_ca(cluster: &str) -> Result<(String, String)> {
    generate_ca_with(cluster, Validity::days(DEFAULT_CA_DAYS))
}

pub fn generate_ca_with(cluster: &str, validity: Validity) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("holdfast cluster CA {cluster}"));
    dn.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    apply_validity(&mut params, validity)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What a certificate is for.
#[derive(Clone, Debug)]
pub enum Subject {
    /// LB node `id`, reachable at `ips`.
    Node { id: u64, ips: Vec<std::net::IpAddr> },
    /// A client of the admin API (an operator's clusterctl, automation)
    /// with a role (`admin`, `operator`, `viewer`: see `holdfast_api::auth`).
    Client { name: String, role: String },
}

/// A client certificate's name: 1–64 of `[A-Za-z0-9._-]`, not `node-…`
/// (that prefix is how a node certificate is recognised).
pub fn check_client_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!("client name {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ -");
    }
    if name.starts_with("node-") {
        bail!("client name {name:?}: names starting with node- are for node certificates");
    }
    Ok(())
}

/// Issue a certificate valid for [`DEFAULT_CERT_DAYS`], signed by the CA:
/// (certificate PEM, key PEM).
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, subject: &Subject) -> Result<(String, String)> {
    issue_with(
        ca_cert_pem,
        ca_key_pem,
        subject,
        Validity::days(DEFAULT_CERT_DAYS),
    )
}

pub fn issue_with(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    subject: &Subject,
    validity: Validity,
) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("parsing the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("parsing the CA certificate")?;
    let key = KeyPair::generate()?;
    let (cn, ou, sans, ekus) = match subject {
        Subject::Node { id, .. } => {
            if *id == 0 {
                bail!("node id must be positive");
            }
            (
                format!("node-{id}"),
                NODE_ROLE.to_string(),
                vec![node_server_name(*id)],
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
        }
        Subject::Client { name, role } => {
            check_client_name(name)?;
            if role.is_empty() || role == NODE_ROLE || !role.chars().all(|c| c.is_ascii_lowercase())
            {
                bail!("role {role:?} is not a client role");
            }
            (
                name.clone(),
                role.clone(),
                vec![],
                vec![ExtendedKeyUsagePurpose::ClientAuth],
            )
        }
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
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::OrganizationalUnitName, ou);
    params.distinguished_name = dn;
    params.extended_key_usages = ekus;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    apply_validity(&mut params, validity)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What a certificate says (parsed, not verified).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertInfo {
    /// Subject common name.
    pub cn: String,
    /// Subject organizational unit: the role.
    pub ou: Option<String>,
    /// Serial number, lowercase hex without separators.
    pub serial: String,
    /// Validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// Issuer common name.
    pub issuer: String,
}

impl CertInfo {
    /// `CN=…,OU=…` for logs.
    pub fn subject(&self) -> String {
        match &self.ou {
            Some(ou) => format!("CN={},OU={ou}", self.cn),
            None => format!("CN={}", self.cn),
        }
    }

    /// The node id, if this is a node certificate (`CN=node-<id>`, `OU=node`).
    pub fn node_id(&self) -> Option<u64> {
        if self.ou.as_deref() != Some(NODE_ROLE) {
            return None;
        }
        self.cn
            .strip_prefix("node-")
            .and_then(|n| n.parse().ok())
            .filter(|id| *id > 0)
    }
}

/// A serial number as the revocation list names it: lowercase hex, no
/// separators, no leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let s: String = raw[start..].iter().map(|b| format!("{b:02x}")).collect();
    if s.is_empty() {
        "00".into()
    } else {
        s
    }
}

/// Normalise a serial typed by an operator (`0A:1B:…`, `0a1b…`).
pub fn normalize_serial(s: &str) -> Result<String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || hex.len() > 42 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("serial {s:?} is not a hex serial number (at most 20 bytes)");
    }
    let hex = hex.to_ascii_lowercase();
    let hex = if !hex.len().is_multiple_of(2) {
        format!("0{hex}")
    } else {
        hex
    };
    let raw: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex"))
        .collect();
    Ok(serial_hex(&raw))
}

pub fn cert_info(cert: &CertificateDer<'_>) -> Result<CertInfo> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow!("certificate does not parse: {e}"))?;
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.next().and_then(|c| c.as_str().ok()).map(str::to_string)
    };
    let cn = first(&mut x.subject().iter_common_name())
        .ok_or_else(|| anyhow!("certificate has no subject common name"))?;
    let ou = first(&mut x.subject().iter_organizational_unit());
    let issuer = first(&mut x.issuer().iter_common_name()).unwrap_or_default();
    Ok(CertInfo {
        cn,
        ou,
        serial: serial_hex(x.raw_serial()),
        not_before: x.validity().not_before.timestamp(),
        not_after: x.validity().not_after.timestamp(),
        issuer,
    })
}

/// The node id in a node certificate (`CN=node-<id>`, `OU=node`).
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<u64> {
    let info = cert_info(cert)?;
    info.node_id()
        .ok_or_else(|| anyhow!("certificate {} is not a node certificate", info.subject()))
}

/// Certificates and key of this node (or client), and the CA(s) that peers
/// must chain to. The CA file may hold several certificates (a CA
/// rotation: old and new CA side by side).
pub struct Identity {
    pub ca: Vec<CertificateDer<'static>>,
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
    /// Read and check the three PEM files: the key must belong to the
    /// certificate.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
        };
        Self::from_pem_bytes(
            &read(ca, "CA certificate")?,
            &read(cert, "certificate")?,
            &read(key, "key")?,
        )
        .with_context(|| {
            format!(
                "loading {} / {} / {}",
                ca.display(),
                cert.display(),
                key.display()
            )
        })
    }

    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self> {
        Self::from_pem_bytes(ca.as_bytes(), cert.as_bytes(), key.as_bytes())
    }

    pub fn from_pem_bytes(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self> {
        let ca = CertificateDer::pem_slice_iter(ca)
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the CA certificate PEM")?;
        if ca.is_empty() {
            bail!("the CA file holds no certificate");
        }
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the certificate PEM")?;
        if chain.is_empty() {
            bail!("the certificate file holds no certificate");
        }
        let key = PrivateKeyDer::from_pem_slice(key).context("parsing the key PEM")?;
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(|e| anyhow!("the key does not belong to the certificate: {e}"))?;
        Ok(Self { ca, chain, key })
    }

    /// This node's own id, from its certificate.
    pub fn node_id(&self) -> Result<u64> {
        node_id_of(&self.chain[0])
    }

    /// What the certificate says.
    pub fn info(&self) -> Result<CertInfo> {
        cert_info(&self.chain[0])
    }

    /// The CA certificates as a root store.
    pub fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .context("adding the cluster CA to the trust store")?;
        }
        Ok(Arc::new(roots))
    }
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
    fn issued_certs_carry_id_role_and_a_random_serial() {
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
        let info = id.info().expect("info");
        assert_eq!(info.ou.as_deref(), Some(NODE_ROLE));
        assert_eq!(info.serial.len(), 40, "{}", info.serial);
        let (admin, admin_key) = issue(
            &ca,
            &ca_key,
            &Subject::Client {
                name: "ops".into(),
                role: "admin".into(),
            },
        )
        .expect("admin");
        let a = Identity::from_pem(&ca, &admin, &admin_key).expect("client identity");
        assert!(a.node_id().is_err(), "a client cert is not a node");
        let ai = a.info().expect("info");
        assert_eq!((ai.cn.as_str(), ai.ou.as_deref()), ("ops", Some("admin")));
        assert_ne!(ai.serial, info.serial);
        // A client certificate cannot pose as a node.
        for (name, role) in [
            ("node-3", "admin"),
            ("x", "node"),
            ("", "admin"),
            ("a b", "viewer"),
        ] {
            assert!(
                issue(
                    &ca,
                    &ca_key,
                    &Subject::Client {
                        name: name.into(),
                        role: role.into()
                    }
                )
                .is_err(),
                "{name}/{role} issued"
            );
        }
        // The key must belong to the certificate.
        let e = Identity::from_pem(&ca, &cert, &admin_key)
            .err()
            .expect("mismatch");
        assert!(format!("{e:#}").contains("does not belong"), "{e:#}");
    }

    #[test]
    fn serials_normalise() {
        assert_eq!(serial_hex(&[0, 0x0a, 0xff]), "0aff");
        assert_eq!(normalize_serial("0A:FF").expect("ok"), "0aff");
        assert_eq!(normalize_serial("00aff").expect("ok"), "0aff");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
    }
}
