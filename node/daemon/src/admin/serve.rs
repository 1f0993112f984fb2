//! The admin API's listeners: HTTPS on `admin_addr` (certificates from
//! the node's live credentials, so a rotation applies to the next
//! connection) and plain HTTP on `metrics_addr`.
//!
//! Bounded, so that a misbehaving client cannot stall the leader: at most
//! `max_connections` connections and `max_connections_per_ip` from one
//! address (others are closed at once, before any TLS work), the TLS
//! handshake within `handshake_timeout_ms`, the request head within
//! `request_timeout_ms`, the body within `body_timeout_ms` and
//! `max_body_bytes`, one request per connection, and no connection lives
//! longer than `connection_lifetime_ms`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use holdfast_api::auth::{Authenticated, Refusal};

use crate::{
    admin::{
        conn::{ConnAuth, Limits},
        routes,
    },
    node::Node,
};

/// Open connections, in total and per client address.
struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

struct ConnPermit {
    lim: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnPermit> {
        let mut g = self.open.lock().expect("limiter");
        let per = g.1.get(&ip).copied().unwrap_or(0);
        if g.0 >= self.max_total || per >= self.max_per_ip {
            return None;
        }
        g.0 += 1;
        g.1.insert(ip, per + 1);
        Some(ConnPermit {
            lim: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut g = self.lim.open.lock().expect("limiter");
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// Serve until the node shuts down: HTTPS with the admin router when
/// `tls`, else plain HTTP with the metrics/probe router.
pub async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener, tls: bool) {
    let limits = Limits::from(&node.cfg.admin);
    let limiter = Arc::new(ConnLimiter {
        max_total: limits.max_connections,
        max_per_ip: limits.max_connections_per_ip,
        open: Mutex::new((0, HashMap::new())),
    });
    let app = if tls {
        routes::router(node.clone())
    } else {
        routes::plain_router(node.clone())
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = node.shut_down() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off a little.
                debug!(error = %e, "admin API accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(permit) = limiter.try_acquire(peer.ip()) else {
            // Counted, not logged one by one: this is what a flood looks like.
            node.metrics.admin_refused[Refusal::TooManyConnections.index()]
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            debug!(%peer, "admin API connection refused: too many");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let node = node.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if !tls {
                let auth = Arc::new(Err(Refusal::NoCertificate));
                serve_http(tcp, peer, auth, app, limits).await;
                return;
            }
            let server = node.credentials.server();
            let acceptor = tokio_rustls::TlsAcceptor::from(server.config.clone());
            let stream =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "admin API TLS handshake failed");
                        node.metrics.admin_refused[Refusal::Handshake.index()]
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "admin API TLS handshake timed out");
                        node.metrics.admin_refused[Refusal::Timeout.index()]
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                };
            let chain = stream.get_ref().1.peer_certificates().map(|c| c.to_vec());
            let auth = server.authenticate(chain.as_deref(), |serial| node.is_revoked(serial));
            serve_http(stream, peer, Arc::new(auth), app, limits).await;
        });
    }
}

/// One HTTP/1.1 request on `io`, with the connection's authentication as
/// a request extension.
async fn serve_http<IO>(
    io: IO,
    peer: SocketAddr,
    result: Arc<Result<Authenticated, Refusal>>,
    app: axum::Router,
    limits: Limits,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_auth = ConnAuth { peer, result };
    let svc = tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(conn_auth.clone());
        tower::ServiceExt::oneshot(app.clone(), req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .keep_alive(false)
        .max_buf_size(64 << 10)
        .serve_connection(
            TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(svc),
        );
    match tokio::time::timeout(limits.connection_lifetime, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(%peer, error = %e, "admin API connection failed"),
        Err(_) => debug!(%peer, "admin API connection reached its lifetime"),
    }
}
