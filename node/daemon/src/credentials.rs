//! The node's live TLS identity: the admin API's server side, the client
//! it calls other nodes with, and the QUIC endpoint — all switched to new
//! certificate files without a restart ([`Credentials::rotate`], driven by
//! [`holdfast_api::auth::Watcher`] in the node's reload loop).

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, RwLock,
};

use anyhow::{bail, Result};

use holdfast_api::{auth::AdminServerTls, client::Client};
use holdfast_pki::{CertInfo, Identity};
use sync::transport::Transport;

pub struct Credentials {
    server: RwLock<Arc<AdminServerTls>>,
    client: RwLock<Client>,
    cert: RwLock<CertInfo>,
    node_id: u64,
    /// Rotations applied.
    pub reloads: AtomicU64,
    /// Changed files that did not form a valid identity.
    pub reload_errors: AtomicU64,
}

impl Credentials {
    /// The credentials of node `node_id` (its certificate must say so).
    pub fn new(node_id: u64, identity: &Identity) -> Result<Self> {
        let (server, client, cert) = Self::build(node_id, identity)?;
        Ok(Self {
            server: RwLock::new(Arc::new(server)),
            client: RwLock::new(client),
            cert: RwLock::new(cert),
            node_id,
            reloads: AtomicU64::new(0),
            reload_errors: AtomicU64::new(0),
        })
    }

    fn build(node_id: u64, identity: &Identity) -> Result<(AdminServerTls, Client, CertInfo)> {
        let cert = identity.info()?;
        let id = identity.node_id()?;
        if id != node_id {
            bail!("the certificate is for node {id}, but this is node {node_id}");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if cert.not_after <= now {
            bail!(
                "the certificate {} (serial {}) has expired",
                cert.subject(),
                cert.serial
            );
        }
        Ok((
            AdminServerTls::new(identity)?,
            Client::from_identity(identity)?,
            cert,
        ))
    }

    /// Switch everything to `identity` (the QUIC endpoint too): new
    /// connections use it, established ones finish with the old one.
    pub fn rotate(&self, identity: &Identity, transport: &Transport) -> Result<CertInfo> {
        let (server, client, cert) = Self::build(self.node_id, identity)?;
        transport.reload(identity)?;
        *self.server.write().expect("creds") = Arc::new(server);
        *self.client.write().expect("creds") = client;
        *self.cert.write().expect("creds") = cert.clone();
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(cert)
    }

    pub fn server(&self) -> Arc<AdminServerTls> {
        self.server.read().expect("creds").clone()
    }

    /// The client this node calls other nodes' admin APIs with.
    pub fn client(&self) -> Client {
        self.client.read().expect("creds").clone()
    }

    /// The certificate in use.
    pub fn cert(&self) -> CertInfo {
        self.cert.read().expect("creds").clone()
    }
}
