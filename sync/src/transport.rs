//! The node's one QUIC endpoint (quinn, mutual TLS with the cluster CA).
//! Raft RPCs use one bidirectional stream each: `[kind u8][body]` → finish,
//! answered by `[status u8][body]`. Reads are bounded. The conntrack
//! replication will share this endpoint.
//!
//! A peer whose certificate is not signed by the cluster CA fails the TLS
//! handshake and is counted in `refused`; so is one that fails the node's
//! peer check (a revoked serial: [`Transport::set_peer_check`]), now or
//! later ([`Transport::enforce_peer_check`] closes its connections).
//!
//! Bounds, so that no peer — not even one with a valid certificate — can
//! exhaust the node: at most [`MAX_CONNECTIONS`] connections (handshaking
//! included) and [`MAX_CONNECTIONS_PER_PEER`] per peer id, at most
//! [`MAX_STREAMS_PER_CONNECTION`] streams per connection, an RPC
//! of at most [`MAX_RPC_BYTES`], and all RPCs being read together hold at
//! most [`RPC_MEMORY_BUDGET`] bytes. [`Transport::reload`] swaps the
//! certificates for new connections (rotation without restart).
//!
//! [`Transport::isolate`] drops all traffic to and from given peers: fault
//! injection for partition tests and the chaos lab.

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

use holdfast_pki::{cert_info, node_server_name, provider, CertInfo, Identity, ALPN};

/// Largest RPC message (request or response) accepted.
pub const MAX_RPC_BYTES: usize = 64 << 20;
/// Bytes of RPC requests being read at once, over every peer: past it a
/// new chunk is refused (the stream is reset) instead of buffered.
pub const RPC_MEMORY_BUDGET: usize = 256 << 20;
/// Connections the endpoint holds at once (handshaking ones included).
pub const MAX_CONNECTIONS: usize = 512;
/// Incoming connections of one peer id at once (a node needs one).
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// Decides whether a peer's (CA-verified) certificate may talk to this
/// node: `Err(reason)` refuses it (e.g. a revoked serial).
pub type PeerCheck = Arc<dyn Fn(&CertInfo) -> Result<(), String> + Send + Sync>;

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
    /// Handshakes that failed (e.g. a certificate from another CA), peers
    /// refused by the peer check, connections over the limits.
    pub refused: AtomicU64,
    /// Of `refused`: connections over [`MAX_CONNECTIONS`] or
    /// [`MAX_CONNECTIONS_PER_PEER`].
    pub over_limit: AtomicU64,
    /// RPC streams reset for exceeding [`MAX_RPC_BYTES`] or the budget.
    pub oversized: AtomicU64,
    pub rpcs_served: AtomicU64,
}

struct Incoming {
    peer: u64,
    cert: CertInfo,
    conn: quinn::Connection,
}

pub struct Transport {
    endpoint: quinn::Endpoint,
    /// Client side of connections this node opens (swapped by `reload`).
    client: Mutex<quinn::ClientConfig>,
    /// Connections this node opened, by peer: looked up on every call
    /// (`dashmap`: 41 ns a lookup against 90 ns through the async lock it
    /// replaced, and revocation's sweep and `close` never skip it as a
    /// `try_lock` could; `sync-bench --locks`).
    conns: dashmap::DashMap<u64, quinn::Connection>,
    /// Accepted connections by quinn's stable id.
    incoming: Mutex<HashMap<usize, Incoming>>,
    isolated: Mutex<HashSet<u64>>,
    streams: Mutex<Option<StreamHandler>>,
    peer_check: Mutex<Option<PeerCheck>>,
    budget: Arc<tokio::sync::Semaphore>,
    pub stats: TransportStats,
}

impl Transport {
    /// Bind the endpoint (server and client side).
    pub fn bind(addr: SocketAddr, identity: &Identity) -> Result<Arc<Self>> {
        let endpoint = quinn::Endpoint::server(quic_server(identity)?, addr)
            .with_context(|| format!("binding QUIC endpoint on {addr}"))?;
        let client = quic_client(identity)?;
        Ok(Arc::new(Self {
            endpoint,
            client: Mutex::new(client),
            conns: dashmap::DashMap::new(),
            incoming: Mutex::new(HashMap::new()),
            isolated: Mutex::new(HashSet::new()),
            streams: Mutex::new(None),
            peer_check: Mutex::new(None),
            budget: Arc::new(tokio::sync::Semaphore::new(RPC_MEMORY_BUDGET)),
            stats: TransportStats::default(),
        }))
    }

    /// New certificates (and CA) for every connection from now on;
    /// established connections keep the identity they were authenticated
    /// with until they close.
    pub fn reload(&self, identity: &Identity) -> Result<()> {
        let server = quic_server(identity)?;
        let client = quic_client(identity)?;
        self.endpoint.set_server_config(Some(server));
        *self.client.lock().expect("client config") = client;
        Ok(())
    }

    /// Install the check every peer certificate must pass (at connect and
    /// accept, and at each [`Transport::enforce_peer_check`]).
    pub fn set_peer_check(&self, check: Option<PeerCheck>) {
        *self.peer_check.lock().expect("peer check") = check;
    }

    fn check_peer(&self, cert: &CertInfo) -> Result<(), String> {
        let check = self.peer_check.lock().expect("peer check").clone();
        match check {
            Some(f) => f(cert),
            None => Ok(()),
        }
    }

    /// Close every connection (in and out) whose peer fails the peer check
    /// now (e.g. after a revocation was committed). Returns how many.
    pub fn enforce_peer_check(&self) -> usize {
        let mut closed = 0;
        let incoming: Vec<(usize, CertInfo, quinn::Connection)> = self
            .incoming
            .lock()
            .expect("incoming")
            .iter()
            .map(|(k, i)| (*k, i.cert.clone(), i.conn.clone()))
            .collect();
        for (k, cert, conn) in incoming {
            if let Err(why) = self.check_peer(&cert) {
                warn!(subject = %cert.subject(), remote = %conn.remote_address(), reason = %why, "closing a peer's connection");
                conn.close(3u32.into(), b"certificate refused");
                self.incoming.lock().expect("incoming").remove(&k);
                closed += 1;
            }
        }
        self.conns.retain(|peer, conn| match peer_cert(conn) {
            Ok(cert) if self.check_peer(&cert).is_ok() => true,
            _ => {
                warn!(
                    peer,
                    "closing the connection to a peer whose certificate is refused"
                );
                conn.close(3u32.into(), b"certificate refused");
                closed += 1;
                false
            }
        });
        closed
    }

    /// Incoming connections open now: (peer node id, certificate serial).
    pub fn incoming_peers(&self) -> Vec<(u64, String)> {
        self.incoming
            .lock()
            .expect("incoming")
            .values()
            .filter(|i| i.conn.close_reason().is_none())
            .map(|i| (i.peer, i.cert.serial.clone()))
            .collect()
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
                if me.endpoint.open_connections() > MAX_CONNECTIONS {
                    me.stats.refused.fetch_add(1, Ordering::Relaxed);
                    me.stats.over_limit.fetch_add(1, Ordering::Relaxed);
                    debug!(remote = %incoming.remote_address(), "QUIC connection refused: too many");
                    incoming.refuse();
                    continue;
                }
                let me = me.clone();
                let handler = handler.clone();
                tokio::spawn(async move { me.serve_connection(incoming, handler).await });
            }
        })
    }

    async fn serve_connection(self: Arc<Self>, incoming: quinn::Incoming, handler: Handler) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, %remote, "QUIC handshake refused");
                return;
            }
        };
        let admitted = peer_cert(&conn).and_then(|cert| {
            let peer = cert.node_id().ok_or_else(|| {
                anyhow!("certificate {} is not a node certificate", cert.subject())
            })?;
            self.check_peer(&cert)
                .map_err(|why| anyhow!("{}: {why}", cert.subject()))?;
            Ok((peer, cert))
        });
        let (peer, cert) = match admitted {
            Ok(p) => p,
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, %remote, "peer refused");
                conn.close(1u32.into(), b"certificate refused");
                return;
            }
        };
        let key = conn.stable_id();
        {
            let mut inc = self.incoming.lock().expect("incoming");
            if inc.values().filter(|i| i.peer == peer).count() >= MAX_CONNECTIONS_PER_PEER {
                drop(inc);
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.stats.over_limit.fetch_add(1, Ordering::Relaxed);
                warn!(peer, %remote, "peer refused: too many connections from this node id");
                conn.close(2u32.into(), b"too many connections");
                return;
            }
            inc.insert(
                key,
                Incoming {
                    peer,
                    cert,
                    conn: conn.clone(),
                },
            );
        }
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        debug!(peer, %remote, "peer connected");
        while let Ok((send, recv)) = conn.accept_bi().await {
            let me = self.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Err(e) = me.serve_stream(peer, send, recv, handler).await {
                    debug!(peer, error = %e, "RPC stream failed");
                }
            });
        }
        self.incoming.lock().expect("incoming").remove(&key);
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
        let (body, _held) = match self.read_bounded(&mut recv).await {
            Ok(b) => b,
            Err(e) => {
                self.stats.oversized.fetch_add(1, Ordering::Relaxed);
                let _ = recv.stop(4u32.into());
                let _ = send.reset(4u32.into());
                warn!(peer, error = %e, "RPC refused");
                return Err(e);
            }
        };
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

    /// Read a whole RPC request, within [`MAX_RPC_BYTES`] and the shared
    /// [`RPC_MEMORY_BUDGET`] (held until the returned permit is dropped).
    async fn read_bounded(
        &self,
        recv: &mut quinn::RecvStream,
    ) -> Result<(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>)> {
        let mut body = Vec::new();
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        while let Some(chunk) = recv.read_chunk(64 << 10, true).await? {
            if body.len() + chunk.bytes.len() > MAX_RPC_BYTES {
                bail!("RPC larger than {MAX_RPC_BYTES} bytes");
            }
            let permit = self
                .budget
                .clone()
                .try_acquire_many_owned(chunk.bytes.len() as u32)
                .map_err(|_| anyhow!("RPC memory budget ({RPC_MEMORY_BUDGET} bytes) exhausted"))?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            body.extend_from_slice(&chunk.bytes);
        }
        Ok((body, held))
    }

    async fn connection(&self, peer: u64, addr: SocketAddr) -> Result<quinn::Connection> {
        // (The entry's guard is dropped at once: never held across an await.)
        let cached = self.conns.get(&peer).map(|c| c.value().clone());
        if let Some(c) = cached {
            if c.close_reason().is_none() && c.remote_address() == addr {
                return Ok(c);
            }
        }
        // Connect without holding the cache lock: a dead peer's handshake
        // must not delay RPCs to live ones.
        let client = self.client.lock().expect("client config").clone();
        let conn = self
            .endpoint
            .connect_with(client, addr, &node_server_name(peer))?
            .await
            .with_context(|| format!("connecting to node {peer} at {addr}"))?;
        let cert = peer_cert(&conn)?;
        if let Err(why) = self.check_peer(&cert) {
            conn.close(1u32.into(), b"certificate refused");
            bail!("node {peer} at {addr} presents {}: {why}", cert.subject());
        }
        info!(peer, %addr, "connected to peer");
        self.conns.insert(peer, conn.clone());
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
        self.conns.clear();
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
    let cert = peer_cert(conn)?;
    cert.node_id()
        .ok_or_else(|| anyhow!("certificate {} is not a node certificate", cert.subject()))
}

/// What a connected peer's (verified) certificate says.
pub fn peer_cert(conn: &quinn::Connection) -> Result<CertInfo> {
    let certs = conn
        .peer_identity()
        .ok_or_else(|| anyhow!("peer presented no certificate"))?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow!("unexpected peer identity type"))?;
    let first = certs
        .first()
        .ok_or_else(|| anyhow!("empty certificate chain"))?;
    cert_info(first)
}

/// QUIC server side: TLS 1.3, client certificate required and verified.
pub fn quic_server(id: &Identity) -> Result<quinn::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(id.roots()?, provider())
            .build()
            .context("client verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .context("server certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| anyhow!("QUIC server TLS: {e}"))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// QUIC client side: verifies the server against the CA, presents ours.
pub fn quic_client(id: &Identity) -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .context("client certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| anyhow!("QUIC client TLS: {e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// Concurrent bidirectional streams a peer may open on one connection: a
/// Raft RPC or a replication session each. Raft pipelines a handful per
/// peer; the rest is headroom.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_millis(500)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(5)).expect("static"),
    ));
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    // Nothing here uses unidirectional streams.
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}
