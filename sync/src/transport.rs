//! The node's one QUIC endpoint (quinn, mutual TLS with the cluster CA).
//! Raft RPCs use one bidirectional stream each: `[kind u8][body]` → finish,
//! answered by `[status u8][body]`. Reads are bounded. The conntrack
//! replication will share this endpoint.
//!
//! A peer whose certificate is not signed by the cluster CA fails the TLS
//! handshake and is counted in `refused`. [`Transport::isolate`] drops all
//! traffic to and from given peers: fault injection for partition tests and
//! the chaos lab.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{debug, info, warn};

use crate::tls::{node_id_of, node_server_name, Identity};

/// Largest RPC message (request or response) accepted.
pub const MAX_RPC_BYTES: usize = 64 << 20;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// Handles one RPC: (peer node id, kind, body) → response body or error text.
pub type Handler =
    Arc<dyn Fn(u64, u8, Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> + Send + Sync>;
/// Handles a long-lived stream of a kind >= [`STREAM_KINDS`]:
/// (peer node id, kind, send half, receive half).
pub type StreamHandler =
    Arc<dyn Fn(u64, u8, quinn::SendStream, quinn::RecvStream) -> BoxFuture<()> + Send + Sync>;

/// Stream kinds at or above this are long-lived streams (replication),
/// below it one-shot RPCs (Raft).
pub const STREAM_KINDS: u8 = 0x10;

#[derive(Default)]
pub struct TransportStats {
    pub accepted: AtomicU64,
    /// Handshakes that failed (e.g. a certificate from another CA).
    pub refused: AtomicU64,
    pub rpcs_served: AtomicU64,
}

pub struct Transport {
    endpoint: quinn::Endpoint,
    conns: tokio::sync::Mutex<HashMap<u64, quinn::Connection>>,
    isolated: Mutex<HashSet<u64>>,
    streams: Mutex<Option<StreamHandler>>,
    pub stats: TransportStats,
}

impl Transport {
    /// Bind the endpoint (server and client side).
    pub fn bind(addr: SocketAddr, identity: &Identity) -> Result<Arc<Self>> {
        let mut endpoint = quinn::Endpoint::server(identity.quic_server()?, addr)
            .with_context(|| format!("binding QUIC endpoint on {addr}"))?;
        endpoint.set_default_client_config(identity.quic_client()?);
        Ok(Arc::new(Self {
            endpoint,
            conns: tokio::sync::Mutex::new(HashMap::new()),
            isolated: Mutex::new(HashSet::new()),
            streams: Mutex::new(None),
            stats: TransportStats::default(),
        }))
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Drop all traffic to and from these peers (empty set: heal).
    pub fn isolate(&self, peers: HashSet<u64>) {
        *self.isolated.lock().expect("isolation lock") = peers;
    }

    fn is_isolated(&self, peer: u64) -> bool {
        self.isolated
            .lock()
            .expect("isolation lock")
            .contains(&peer)
    }

    /// Accept connections and serve RPCs with `handler` until the endpoint closes.
    pub fn serve(self: &Arc<Self>, handler: Handler) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(incoming) = me.endpoint.accept().await {
                let me = me.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            me.stats.refused.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, "QUIC handshake refused");
                            return;
                        }
                    };
                    let peer = match peer_id(&conn) {
                        Ok(p) => p,
                        Err(e) => {
                            me.stats.refused.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, remote = %conn.remote_address(), "peer refused");
                            conn.close(1u32.into(), b"not a node certificate");
                            return;
                        }
                    };
                    me.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    debug!(peer, remote = %conn.remote_address(), "peer connected");
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        let me = me.clone();
                        let handler = handler.clone();
                        tokio::spawn(async move {
                            if let Err(e) = me.serve_stream(peer, send, recv, handler).await {
                                debug!(peer, error = %e, "RPC stream failed");
                            }
                        });
                    }
                });
            }
        })
    }

    /// Install (or with `None` remove) the handler of long-lived streams.
    pub fn set_stream_handler(&self, h: Option<StreamHandler>) {
        *self.streams.lock().expect("stream handler") = h;
    }

    async fn serve_stream(
        &self,
        peer: u64,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        handler: Handler,
    ) -> Result<()> {
        let mut kind = [0u8; 1];
        recv.read_exact(&mut kind).await?;
        let kind = kind[0];
        if self.is_isolated(peer) {
            bail!("peer {peer} is isolated");
        }
        if kind >= STREAM_KINDS {
            let h = self.streams.lock().expect("stream handler").clone();
            match h {
                Some(h) => h(peer, kind, send, recv).await,
                None => {
                    let _ = send.reset(2u32.into());
                }
            }
            return Ok(());
        }
        let body = recv.read_to_end(MAX_RPC_BYTES).await?;
        self.stats.rpcs_served.fetch_add(1, Ordering::Relaxed);
        let (status, payload) = match handler(peer, kind, body).await {
            Ok(p) => (0u8, p),
            Err(e) => (1u8, e.into_bytes()),
        };
        send.write_all(&[status]).await?;
        send.write_all(&payload).await?;
        send.finish()?;
        let _ = send.stopped().await;
        Ok(())
    }

    async fn connection(&self, peer: u64, addr: SocketAddr) -> Result<quinn::Connection> {
        if let Some(c) = self.conns.lock().await.get(&peer) {
            if c.close_reason().is_none() && c.remote_address() == addr {
                return Ok(c.clone());
            }
        }
        // Connect without holding the cache lock: a dead peer's handshake
        // must not delay RPCs to live ones.
        let conn = self
            .endpoint
            .connect(addr, &node_server_name(peer))?
            .await
            .with_context(|| format!("connecting to node {peer} at {addr}"))?;
        info!(peer, %addr, "connected to peer");
        self.conns.lock().await.insert(peer, conn.clone());
        Ok(conn)
    }

    /// One RPC to node `peer` at `addr`, bounded by `timeout`.
    pub async fn call(
        &self,
        peer: u64,
        addr: SocketAddr,
        kind: u8,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        if self.is_isolated(peer) {
            return Err(CallError::Unreachable(anyhow!("node {peer} is isolated")));
        }
        let fut = async {
            let conn = self
                .connection(peer, addr)
                .await
                .map_err(CallError::Unreachable)?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| CallError::Unreachable(e.into()))?;
            send.write_all(&[kind])
                .await
                .map_err(|e| CallError::Network(e.into()))?;
            send.write_all(body)
                .await
                .map_err(|e| CallError::Network(e.into()))?;
            send.finish().map_err(|e| CallError::Network(e.into()))?;
            let resp = recv
                .read_to_end(MAX_RPC_BYTES)
                .await
                .map_err(|e| CallError::Network(e.into()))?;
            match resp.split_first() {
                Some((0, body)) => Ok(body.to_vec()),
                Some((_, err)) => Err(CallError::Remote(String::from_utf8_lossy(err).into_owned())),
                None => Err(CallError::Network(anyhow!("empty response"))),
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Network(anyhow!(
                "RPC to node {peer} timed out after {timeout:?}"
            ))),
        }
    }

    /// Open a long-lived stream of `kind` to `peer`.
    pub async fn open_stream(
        &self,
        peer: u64,
        addr: SocketAddr,
        kind: u8,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), CallError> {
        if self.is_isolated(peer) {
            return Err(CallError::Unreachable(anyhow!("node {peer} is isolated")));
        }
        let conn = self
            .connection(peer, addr)
            .await
            .map_err(CallError::Unreachable)?;
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| CallError::Unreachable(e.into()))?;
        send.write_all(&[kind])
            .await
            .map_err(|e| CallError::Network(e.into()))?;
        Ok((send, recv))
    }

    pub fn is_peer_isolated(&self, peer: u64) -> bool {
        self.is_isolated(peer)
    }

    /// Close the endpoint: no more RPCs in or out.
    pub fn close(&self) {
        self.conns.try_lock().map(|mut c| c.clear()).ok();
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    /// Wait (at most 200 ms) until the closed endpoint has no connections left.
    pub async fn wait_closed(&self) {
        let _ = tokio::time::timeout(Duration::from_millis(200), self.endpoint.wait_idle()).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("unreachable: {0:#}")]
    Unreachable(anyhow::Error),
    #[error("network: {0:#}")]
    Network(anyhow::Error),
    #[error("remote handler: {0}")]
    Remote(String),
}

/// The node id of a connected peer, from its verified client certificate.
pub fn peer_id(conn: &quinn::Connection) -> Result<u64> {
    let certs = conn
        .peer_identity()
        .ok_or_else(|| anyhow!("peer presented no certificate"))?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow!("unexpected peer identity type"))?;
    let first = certs
        .first()
        .ok_or_else(|| anyhow!("empty certificate chain"))?;
    node_id_of(first)
}
