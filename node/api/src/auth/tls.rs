//! TLS of the admin API: the server side (node certificate, client
//! certificates verified against the cluster CA) and the client side
//! (clusterctl and nodes calling each other), with an explanation for each
//! way a handshake can fail.
//!
//! The server asks every client for a certificate but lets the handshake
//! finish without one, or with one that does not verify — after checking
//! the handshake signature, so the client has proven it holds the key.
//! The chain is verified right after the handshake against the same CA
//! with the same rules (webpki: chain, validity, key usage); a client that
//! fails is answered with HTTP 401 and the reason, instead of a TLS alert
//! it could not tell apart from a network fault. Nothing is served to it.

use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::{
    client::danger::HandshakeSignatureValid,
    crypto::WebPkiSupportedAlgorithms,
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::roles::{Caller, Refusal};
use holdfast_pki::{cert_info, provider, CertInfo, Identity};

/// ALPN of the admin API.
pub const ADMIN_ALPN: &[u8] = b"http/1.1";

/// An authenticated TLS peer of the admin API.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub caller: Caller,
    pub cert: CertInfo,
}

/// Server side of the admin API for one identity (rebuilt on rotation).
pub struct AdminServerTls {
    pub config: Arc<rustls::ServerConfig>,
    strict: Arc<dyn ClientCertVerifier>,
}

impl AdminServerTls {
    pub fn new(identity: &Identity) -> Result<Self> {
        let p = provider();
        let strict = WebPkiClientVerifier::builder_with_provider(identity.roots()?, p.clone())
            .build()
            .context("client certificate verifier")?;
        let lenient = Arc::new(VerifyAfterHandshake {
            strict: strict.clone(),
            algs: p.signature_verification_algorithms,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(lenient)
            .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            .context("admin API server certificate")?;
        config.alpn_protocols = vec![ADMIN_ALPN.to_vec()];
        Ok(Self {
            config: Arc::new(config),
            strict,
        })
    }

    /// Who the peer of a finished handshake is, or why it is refused.
    /// `revoked(serial)` says whether the cluster revoked a serial.
    pub fn authenticate(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        revoked: impl Fn(&str) -> bool,
    ) -> Result<Authenticated, Refusal> {
        let Some((leaf, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return Err(Refusal::NoCertificate);
        };
        let info = cert_info(leaf).map_err(|e| Refusal::Untrusted {
            subject: "(unparsable)".into(),
            why: e.to_string(),
        })?;
        if let Err(e) = self
            .strict
            .verify_client_cert(leaf, intermediates, UnixTime::now())
        {
            let why = e.to_string();
            return Err(match e {
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. },
                ) => Refusal::Expired {
                    subject: info.subject(),
                    why,
                },
                _ => Refusal::Untrusted {
                    subject: info.subject(),
                    why,
                },
            });
        }
        if revoked(&info.serial) {
            return Err(Refusal::Revoked {
                subject: info.subject(),
                serial: info.serial,
            });
        }
        let caller = Caller::from_cert(&info)?;
        Ok(Authenticated { caller, cert: info })
    }
}

/// Accepts any client certificate whose handshake signature verifies; the
/// chain is judged by [`AdminServerTls::authenticate`].
#[derive(Debug)]
struct VerifyAfterHandshake {
    strict: Arc<dyn ClientCertVerifier>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for VerifyAfterHandshake {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.strict.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side: trust the cluster CA(s), present `identity`'s certificate.
pub fn client_config(identity: &Identity) -> Result<Arc<rustls::ClientConfig>> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(identity.roots()?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .context("client certificate")?;
    c.alpn_protocols = vec![ADMIN_ALPN.to_vec()];
    Ok(Arc::new(c))
}

/// Client side without a certificate of our own (probes, tests).
pub fn anonymous_client_config(
    ca: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).context("adding the CA")?;
    }
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![ADMIN_ALPN.to_vec()];
    Ok(Arc::new(c))
}

/// The name the client verifies the server's certificate against: the
/// given name, else the IP address dialed (node certificates carry their
/// addresses), else the host name.
pub fn server_name(host: &str, explicit: Option<&str>) -> Result<ServerName<'static>, String> {
    let name = explicit.unwrap_or(host);
    ServerName::try_from(name.to_string())
        .map_err(|_| format!("{name:?} is not a valid server name or address"))
}

/// A handshake failure in words an operator can act on.
pub fn explain(e: &rustls::Error, server: &str) -> String {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the server's certificate is not signed by the CA you trust (wrong --ca, or a node of \
             another cluster): {e}"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate does not match {server} (dialed the wrong node, or its \
             certificate lacks this address: give --server-name node-<id>.holdfast): {e}"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => format!("the server's certificate is not valid now: {e}"),
        rustls::Error::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied,
        ) => format!("the server refused our client certificate: {e}"),
        rustls::Error::NoApplicationProtocol => {
            "the server does not speak the admin API (ALPN http/1.1)".into()
        }
        other => format!("TLS failed: {other}"),
    }
}
