//! Client of the admin API (HTTPS with a client certificate): used by
//! clusterctl, by nodes calling each other (joins, forwarded writes,
//! members' status) and by tests. Knows the wire types and the TLS setup
//! of [`crate::auth`], nothing of the node.
//!
//! One request per connection (`Connection: close`), blocking, bounded by
//! a timeout over connect, handshake, request and answer; the `_async`
//! variants run it on tokio's blocking pool.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{de::DeserializeOwned, Serialize};

use holdfast_pki::Identity;

use crate::{
    auth::{tls as auth_tls, Caller},
    wire::{ApiError, ON_BEHALF_HEADER},
};

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("node {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The TLS handshake failed (wrong CA, name mismatch, refused).
    #[error("{addr}: {reason}")]
    Tls { addr: String, reason: String },
    #[error("{addr}: {kind}: {error}")]
    Api {
        addr: String,
        status: u16,
        kind: String,
        error: String,
    },
    #[error("{addr}: unexpected answer: {reason}")]
    Protocol { addr: String, reason: String },
}

impl ClientError {
    /// Exit code of clusterctl for this error (documented in operations.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable { .. } => 3,
            ClientError::Tls { .. } => 7,
            ClientError::Api { status, .. } if *status == 401 || *status == 403 => 7,
            ClientError::Api { kind, .. } if kind == "no_leader" || kind == "unavailable" => 4,
            ClientError::Api { kind, .. } if kind == "rejected" => 5,
            ClientError::Api { kind, .. } if kind == "bad_request" => 2,
            _ => 6,
        }
    }

    /// HTTP status, if the node answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Connecting to a live node takes well under a second; a dead or cut-off
/// one must not hold a call (or a forwarded write) for the whole timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest answer read (a full conntrack listing fits).
pub const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// A configured client: TLS identity, how to name the server, and on whose
/// behalf it calls. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
    on_behalf: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server_name", &self.server_name)
            .field("on_behalf", &self.on_behalf)
            .finish()
    }
}

impl Client {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls,
            server_name: None,
            on_behalf: None,
        }
    }

    /// A client presenting `identity`'s certificate, trusting its CA.
    pub fn from_identity(identity: &Identity) -> anyhow::Result<Self> {
        Ok(Self::new(auth_tls::client_config(identity)?))
    }

    /// Verify the server's certificate against this name (default: the
    /// address dialed).
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Verify the server as node `id` (`node-<id>.holdfast`).
    pub fn for_node(self, id: u64) -> Self {
        self.with_server_name(holdfast_pki::node_server_name(id))
    }

    /// Act for `caller` (a node forwarding a call it authenticated).
    pub fn on_behalf_of(mut self, caller: &Caller) -> Self {
        self.on_behalf = Some(caller.header_value());
        self
    }

    /// Blocking GET of JSON.
    pub fn get<T: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let (status, body) = self.request(addr, "GET", path, None, timeout)?;
        decode(addr, status, &body)
    }

    /// Blocking GET of a text body (e.g. `/metrics`).
    pub fn get_text(
        &self,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<String, ClientError> {
        let (status, body) = self.request(addr, "GET", path, None, timeout)?;
        if !(200..300).contains(&status) {
            return Err(api_error(addr, status, &body));
        }
        String::from_utf8(body).map_err(|e| ClientError::Protocol {
            addr: addr.into(),
            reason: e.to_string(),
        })
    }

    /// Blocking POST of JSON.
    pub fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let bytes = encode(addr, body)?;
        let (status, body) = self.request(addr, "POST", path, Some(&bytes), timeout)?;
        decode(addr, status, &body)
    }

    /// GET: status and body, whatever the status (tests, probes).
    pub fn get_raw(
        &self,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        self.request(addr, "GET", path, None, timeout)
    }

    /// After a drain of node `addr`: poll its status until its VIP packet
    /// counter stood still for `quiet` (routers send it nothing any more).
    /// `Ok(Some(d))`: the traffic stopped `d` after the call (the start of
    /// the quiet time); `Ok(None)`: still moving after `max`, or the node
    /// has no datapath.
    pub fn wait_traffic_gone(
        &self,
        addr: &str,
        quiet: Duration,
        max: Duration,
        timeout: Duration,
    ) -> Result<Option<Duration>, ClientError> {
        let t0 = Instant::now();
        let status = |c: &Self| -> Result<crate::wire::LocalStatus, ClientError> {
            c.get(addr, "/status", timeout)
        };
        let Some(mut last) = status(self)?.vip_packets else {
            return Ok(None);
        };
        let mut still_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = status(self)?.vip_packets.unwrap_or(last);
            if now != last {
                last = now;
                still_since = Instant::now();
            } else if still_since.elapsed() >= quiet {
                return Ok(Some(still_since.duration_since(t0)));
            }
            if t0.elapsed() > max {
                return Ok(None);
            }
        }
    }

    /// POST raw bytes (tests of malformed bodies): status and body.
    pub fn post_raw(
        &self,
        addr: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        self.request(addr, "POST", path, Some(body), timeout)
    }

    /// POST, retrying while the cluster answers "no leader / unavailable"
    /// (and, when more than one address is given, while a node is
    /// unreachable: the next address is tried), until `timeout`. With a
    /// request id in `body`, retries apply at most once.
    pub fn post_retry<B: Serialize, T: DeserializeOwned>(
        &self,
        addrs: &[String],
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut k = 0;
        loop {
            let addr = &addrs[k % addrs.len()];
            k += 1;
            let per_call = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            match self.post(addr, path, body, per_call) {
                Err(e)
                    if (e.exit_code() == 4 || (e.exit_code() == 3 && addrs.len() > 1))
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    /// [`Client::get`] on the blocking pool.
    pub async fn get_async<T: DeserializeOwned + Send + 'static>(
        &self,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let (c, a, p) = (self.clone(), addr.to_string(), path.to_string());
        tokio::task::spawn_blocking(move || c.get(&a, &p, timeout))
            .await
            .map_err(|e| ClientError::Protocol {
                addr: addr.into(),
                reason: e.to_string(),
            })?
    }

    /// [`Client::post`] on the blocking pool.
    pub async fn post_async<B: Serialize, T: DeserializeOwned + Send + 'static>(
        &self,
        addr: &str,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let bytes = encode(addr, body)?;
        let (c, a, p) = (self.clone(), addr.to_string(), path.to_string());
        tokio::task::spawn_blocking(move || {
            let (status, body) = c.request(&a, "POST", &p, Some(&bytes), timeout)?;
            decode(&a, status, &body)
        })
        .await
        .map_err(|e| ClientError::Protocol {
            addr: addr.into(),
            reason: e.to_string(),
        })?
    }

    /// One request on a new connection: status and body.
    fn request(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let deadline = Instant::now() + timeout;
        let unreachable = |reason: String| ClientError::Unreachable {
            addr: addr.into(),
            reason,
        };
        let sock: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| unreachable(format!("resolving: {e}")))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        let host = addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']'))
            .unwrap_or(addr);
        let name = auth_tls::server_name(host, self.server_name.as_deref()).map_err(|reason| {
            ClientError::Tls {
                addr: addr.into(),
                reason,
            }
        })?;
        let shown = self.server_name.clone().unwrap_or_else(|| host.to_string());
        let tcp = TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT.min(timeout))
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let remaining = |d: Instant| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        tcp.set_read_timeout(Some(remaining(deadline)))
            .and_then(|_| tcp.set_write_timeout(Some(remaining(deadline))))
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name).map_err(|e| {
            ClientError::Tls {
                addr: addr.into(),
                reason: e.to_string(),
            }
        })?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let io_err = |e: std::io::Error, tls: &rustls::StreamOwned<_, TcpStream>| {
            tls_or_io(addr, &shown, e, tls)
        };
        // Handshake first, so its failures are told apart from the request's.
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(io_err(e, &tls));
            }
        }
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n"
        );
        if let Some(b) = &body {
            head += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            );
        }
        if let Some(c) = &self.on_behalf {
            head += &format!("{ON_BEHALF_HEADER}: {c}\r\n");
        }
        head += "\r\n";
        let mut msg = head.into_bytes();
        if let Some(b) = body {
            msg.extend_from_slice(b);
        }
        if let Err(e) = tls.write_all(&msg).and_then(|_| tls.flush()) {
            return Err(io_err(e, &tls));
        }
        read_response(addr, &mut tls, deadline).map_err(|e| match e {
            ReadError::Io(e) => io_err(e, &tls),
            ReadError::Protocol(reason) => ClientError::Protocol {
                addr: addr.into(),
                reason,
            },
        })
    }
}

/// A failed read or write: a TLS failure explained, a timeout, or a reset.
fn tls_or_io(
    addr: &str,
    server: &str,
    e: std::io::Error,
    tls: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
) -> ClientError {
    if let Some(t) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return ClientError::Tls {
            addr: addr.into(),
            reason: auth_tls::explain(t, server),
        };
    }
    if tls.conn.is_handshaking() {
        return ClientError::Unreachable {
            addr: addr.into(),
            reason: format!("TLS handshake: {e}"),
        };
    }
    ClientError::Unreachable {
        addr: addr.into(),
        reason: e.to_string(),
    }
}

enum ReadError {
    Io(std::io::Error),
    Protocol(String),
}

/// Read one HTTP/1.1 response: status line, headers, a body framed by
/// Content-Length or chunked, or (neither) read to the end.
fn read_response(
    _addr: &str,
    r: &mut impl Read,
    deadline: Instant,
) -> Result<(u16, Vec<u8>), ReadError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 << 10];
    let proto = |s: String| ReadError::Protocol(s);
    let (status, head_len, framing) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                let mut framing = Framing::ToEnd;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let len = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .ok_or_else(|| proto("bad Content-Length".into()))?;
                        framing = Framing::Length(len);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                        && h.value.eq_ignore_ascii_case(b"chunked")
                    {
                        framing = Framing::Chunked;
                    }
                }
                break (status, n, framing);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(proto(format!("bad HTTP response: {e}"))),
        }
        if buf.len() > 64 << 10 {
            return Err(proto("response headers too long".into()));
        }
        match read_some(r, &mut chunk, deadline)? {
            0 => return Err(proto("connection closed before the response".into())),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut body = buf.split_off(head_len);
    let done = |body: &Vec<u8>| match framing {
        Framing::Length(n) => body.len() >= n,
        Framing::Chunked => dechunk(body).is_some(),
        Framing::ToEnd => false,
    };
    while !done(&body) {
        if body.len() > MAX_RESPONSE_BYTES {
            return Err(proto(format!(
                "response larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        match read_some(r, &mut chunk, deadline) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            // The server closed without close_notify after a body read to
            // its end: the body is complete.
            Err(ReadError::Io(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof
                    && matches!(framing, Framing::ToEnd) =>
            {
                break
            }
            Err(e) => return Err(e),
        }
    }
    let body = match framing {
        Framing::Length(n) if body.len() >= n => {
            body.truncate(n);
            body
        }
        Framing::Length(n) => {
            return Err(proto(format!(
                "response body cut short ({} of {n} bytes)",
                body.len()
            )))
        }
        Framing::Chunked => {
            dechunk(&body).ok_or_else(|| proto("chunked response body cut short".into()))?
        }
        Framing::ToEnd => body,
    };
    Ok((status, body))
}

#[derive(Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked,
    ToEnd,
}

fn read_some(r: &mut impl Read, buf: &mut [u8], deadline: Instant) -> Result<usize, ReadError> {
    loop {
        if Instant::now() > deadline {
            return Err(ReadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out waiting for the answer",
            )));
        }
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// The payload of a complete chunked body, or None if it is not complete.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn encode<B: Serialize + ?Sized>(addr: &str, body: &B) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(body).map_err(|e| ClientError::Protocol {
        addr: addr.into(),
        reason: format!("encoding the request: {e}"),
    })
}

fn api_error(addr: &str, status: u16, body: &[u8]) -> ClientError {
    let err: ApiError = serde_json::from_slice(body).unwrap_or(ApiError {
        kind: "internal".into(),
        error: String::from_utf8_lossy(body).into_owned(),
    });
    ClientError::Api {
        addr: addr.into(),
        status,
        kind: err.kind,
        error: err.error,
    }
}

fn decode<T: DeserializeOwned>(addr: &str, status: u16, body: &[u8]) -> Result<T, ClientError> {
    if (200..300).contains(&status) {
        return serde_json::from_slice(body).map_err(|e| ClientError::Protocol {
            addr: addr.into(),
            reason: format!("{e}: {}", String::from_utf8_lossy(body)),
        });
    }
    Err(api_error(addr, status, body))
}

/// A plain-HTTP GET (the `metrics_addr` listener: `/metrics`, `/ready`,
/// `/live`): status and body text.
pub fn get_plain(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), ClientError> {
    let deadline = Instant::now() + timeout;
    let unreachable = |reason: String| ClientError::Unreachable {
        addr: addr.into(),
        reason,
    };
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let mut tcp = TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT.min(timeout))
        .map_err(|e| unreachable(e.to_string()))?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| unreachable(e.to_string()))?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| unreachable(e.to_string()))?;
    let (status, body) = read_response(addr, &mut tcp, deadline).map_err(|e| match e {
        ReadError::Io(e) => unreachable(e.to_string()),
        ReadError::Protocol(reason) => ClientError::Protocol {
            addr: addr.into(),
            reason,
        },
    })?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_by_length_chunks_and_end() {
        let far = Instant::now() + Duration::from_secs(5);
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        assert_eq!(
            read_response("x", &mut r, far).ok().expect("length"),
            (200, b"hello".to_vec())
        );
        let mut r: &[u8] =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            read_response("x", &mut r, far).ok().expect("chunked"),
            (404, b"abcde".to_vec())
        );
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        assert_eq!(
            read_response("x", &mut r, far).ok().expect("to end"),
            (200, b"all of it".to_vec())
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"",
        ] {
            let mut r = bad;
            assert!(
                read_response("x", &mut r, far).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
