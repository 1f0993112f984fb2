//! A Kubernetes API server for tests, speaking what the kube-rs client of
//! the controller really uses, over HTTPS with a bearer token:
//!
//! - `GET /api/v1/services`, `GET /apis/discovery.k8s.io/v1/endpointslices`:
//!   lists with `metadata.resourceVersion`; with `watch=true` a chunked
//!   stream of JSON watch events from the given resourceVersion, with
//!   BOOKMARK events when `allowWatchBookmarks=true`, ending after
//!   `timeoutSeconds`; a resourceVersion older than the compaction point is
//!   answered with an ERROR event carrying a 410 Gone Status (the client
//!   must relist);
//! - `PATCH /api/v1/namespaces/{ns}/services/{name}/status` (merge patch,
//!   also accepted for apply patches: the body is merged);
//! - `POST /api/v1/namespaces/{ns}/events`.
//!
//! Everything else is a 404 Status and every request is logged, so a test
//! can compare what the controller called with its RBAC rules. Objects are
//! kept as JSON; the test drives them with [`TestApi`] methods. What it does
//! not do: field/label selectors, pagination (`limit` is ignored: all items
//! in one page, which the API allows), server-side apply semantics,
//! admission, and the rest of the API.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, patch, post},
    Router,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// The kinds the server stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Event,
}

impl Kind {
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Event => "EventList",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Event => "Event",
        }
    }
}

/// A change as watchers see it: the watch event line is serialized once.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    line: Bytes,
}

impl Change {
    fn new(rv: u64, kind: Kind, kind_of_change: &str, object: &Value) -> Self {
        Self {
            rv,
            kind,
            line: Bytes::from(format!(
                "{}\n",
                json!({"type": kind_of_change, "object": object})
            )),
        }
    }
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    requests: Vec<(String, String)>,
    /// Bumped to end every open watch.
    generation: u64,
}

struct Shared {
    store: Mutex<Store>,
    tx: broadcast::Sender<Change>,
    token: String,
    bookmark_every: Duration,
}

/// The running server; stopped on drop.
pub struct TestApi {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    /// The CA certificate (PEM) the server's certificate chains to.
    pub ca_pem: String,
    pub token: String,
    tls: Arc<rustls::ServerConfig>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn meta_key(v: &Value) -> Option<(String, String)> {
    let m = v.get("metadata")?;
    Some((
        m.get("namespace")?.as_str()?.to_string(),
        m.get("name")?.as_str()?.to_string(),
    ))
}

impl TestApi {
    /// Start on 127.0.0.1 (a free port).
    pub async fn start() -> Result<Self> {
        holdfast_pki::install_crypto_provider();
        let (ca_pem, tls) = server_tls()?;
        let (tx, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1000,
                ..Default::default()
            }),
            tx,
            token: format!("test-token-{}", std::process::id()),
            bookmark_every: Duration::from_millis(500),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let token = shared.token.clone();
        let mut me = Self {
            shared,
            addr,
            ca_pem,
            token,
            tls,
            task: None,
        };
        me.serve(listener);
        Ok(me)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = router(self.shared.clone());
        let l = TlsListener {
            inner: listener,
            acceptor: tokio_rustls::TlsAcceptor::from(self.tls.clone()),
        };
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        }));
    }

    /// Stop the server (closing every connection and watch) and start it
    /// again on the same address with the same objects: an API server
    /// restart as a client sees it.
    pub async fn restart(&mut self) -> Result<()> {
        self.end_watches();
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    /// A `[kubernetes]` section (controller on) that reaches this server:
    /// its CA certificate and token are written into `dir`.
    pub fn k8s_section(&self, dir: &std::path::Path) -> Result<super::K8sSection> {
        let ca = dir.join("ca.pem");
        let token = dir.join("token");
        std::fs::write(&ca, &self.ca_pem).with_context(|| format!("writing {}", ca.display()))?;
        std::fs::write(&token, &self.token)
            .with_context(|| format!("writing {}", token.display()))?;
        Ok(super::K8sSection {
            enabled: true,
            api_url: Some(format!("https://{}", self.addr)),
            ca_file: Some(ca),
            token_file: Some(token),
            ..Default::default()
        })
    }

    /// A kube client for this server.
    pub fn client_config(&self) -> Result<kube::Config> {
        let url: axum::http::Uri = format!("https://{}", self.addr).parse()?;
        let mut cfg = kube::Config::new(url);
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(self.ca_pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
            .map_err(|e| anyhow!("CA PEM: {e}"))?;
        cfg.root_cert = Some(vec![der]);
        cfg.auth_info.token = Some(self.token.clone().into());
        cfg.read_timeout = Some(Duration::from_secs(300));
        Ok(cfg)
    }

    fn mutate(&self, kind: Kind, change: &'static str, mut obj: Value) -> Value {
        let mut s = self.shared.store.lock().expect("store");
        s.rv += 1;
        let rv = s.rv;
        let obj_kind = kind.kind();
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(obj_kind);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"].get("uid").is_none() {
            obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        let (ns, name) = meta_key(&obj).unwrap_or_default();
        if change == "DELETED" {
            s.objects.remove(&(kind, ns, name));
        } else {
            s.objects.insert((kind, ns, name), obj.clone());
        }
        let c = Change::new(rv, kind, change, &obj);
        s.history.push(c.clone());
        let _ = self.shared.tx.send(c);
        obj
    }

    /// Create or replace an object (Service or EndpointSlice, as JSON of
    /// the k8s-openapi type).
    pub fn apply(&self, kind: Kind, obj: Value) -> Value {
        let exists = meta_key(&obj).is_some_and(|(ns, n)| {
            self.shared
                .store
                .lock()
                .expect("store")
                .objects
                .contains_key(&(kind, ns, n))
        });
        self.mutate(kind, if exists { "MODIFIED" } else { "ADDED" }, obj)
    }

    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let obj = self.get(kind, ns, name)?;
        Some(self.mutate(kind, "DELETED", obj))
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .expect("store")
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .expect("store")
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Forget history: watches from older resourceVersions get 410 Gone;
    /// open watches end (their clients re-watch and get the 410).
    pub fn compact(&self) {
        let mut s = self.shared.store.lock().expect("store");
        s.compacted_below = s.rv + 1;
        s.history.clear();
        s.generation += 1;
    }

    /// End every open watch (clients re-watch from their resourceVersion).
    pub fn end_watches(&self) {
        self.shared.store.lock().expect("store").generation += 1;
    }

    /// (method, path) of every request so far.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.store.lock().expect("store").requests.clone()
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn server_tls() -> Result<(String, Arc<rustls::ServerConfig>)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse()?)];
    let cert = p.signed_by(&key, &issuer)?;
    let der_key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow!("key: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der_key)
        .context("server TLS config")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca_cert.pem(), Arc::new(cfg)))
}

struct TlsListener {
    inner: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((s, a)) = self.inner.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(s)).await
            {
                return (tls, a);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message.into(), "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/services", get(list_services))
        .route("/apis/discovery.k8s.io/v1/endpointslices", get(list_slices))
        .route(
            "/api/v1/namespaces/{ns}/services/{name}/status",
            patch(patch_status),
        )
        .route("/api/v1/namespaces/{ns}/events", post(create_event))
        .fallback(|uri: Uri| async move {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the test API server does not serve {uri}"),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            auth_and_log,
        ))
        .with_state(shared)
}

async fn auth_and_log(
    State(sh): State<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    sh.store
        .lock()
        .expect("store")
        .requests
        .push((method.to_string(), req.uri().path().to_string()));
    let want = format!("Bearer {}", sh.token);
    if headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .is_none_or(|h| h != want)
    {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "bad or missing token",
        );
    }
    next.run(req).await
}

async fn list_services(
    State(sh): State<Arc<Shared>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    list_or_watch(sh, Kind::Service, q)
}

async fn list_slices(
    State(sh): State<Arc<Shared>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    list_or_watch(sh, Kind::EndpointSlice, q)
}

fn list_or_watch(sh: Arc<Shared>, kind: Kind, q: BTreeMap<String, String>) -> Response {
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch(sh, kind, q);
    }
    let s = sh.store.lock().expect("store");
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((k, _, _), _)| *k == kind)
        .map(|(_, v)| v.clone())
        .collect();
    axum::Json(json!({
        "apiVersion": kind.api_version(),
        "kind": kind.list_kind(),
        "metadata": {"resourceVersion": s.rv.to_string()},
        "items": items,
    }))
    .into_response()
}

fn watch(sh: Arc<Shared>, kind: Kind, q: BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300)
            .min(300),
    );
    // Subscribe before reading the history so nothing falls in between.
    let mut rx = sh.tx.subscribe();
    let (backlog, gone, generation, mut last_rv) = {
        let s = sh.store.lock().expect("store");
        let gone = from != 0 && from < s.compacted_below;
        let backlog: Vec<Change> = s
            .history
            .iter()
            .filter(|c| c.kind == kind && c.rv > from)
            .cloned()
            .collect();
        (backlog, gone, s.generation, s.rv)
    };
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1024);
    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
    tokio::spawn(async move {
        if gone {
            let _ = tx
                .send(line(json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure",
                    "message": format!("too old resource version: {from}"),
                    "reason": "Expired", "code": 410,
                }})))
                .await;
            return;
        }
        let mut seen = from;
        for c in backlog {
            seen = c.rv;
            if tx.send(Ok(c.line.clone())).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(sh.bookmark_every);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                c = rx.recv() => match c {
                    Ok(c) if c.kind == kind && c.rv > seen => {
                        seen = c.rv;
                        last_rv = last_rv.max(c.rv);
                        if tx.send(Ok(c.line)).await.is_err() {
                            return;
                        }
                    }
                    Ok(c) => last_rv = last_rv.max(c.rv),
                    Err(_) => return,
                },
                _ = tick.tick() => {
                    if sh.store.lock().expect("store").generation != generation {
                        return;
                    }
                    if bookmarks {
                        let rv = last_rv.max(seen);
                        if tx.send(line(json!({"type": "BOOKMARK", "object": {
                            "kind": kind.kind(), "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": rv.to_string()}
                        }}))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let stream = tokio_stream_from(body_rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR, "Internal", "body"))
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn patch_status(
    State(sh): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let mut s = sh.store.lock().expect("store");
    let key = (Kind::Service, ns.clone(), name.clone());
    let Some(mut obj) = s.objects.get(&key).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("services \"{name}\" not found"),
        );
    };
    // Only the status subresource changes.
    if let Some(st) = patch.get("status") {
        merge(&mut obj["status"], st);
    }
    s.rv += 1;
    let rv = s.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    s.objects.insert(key, obj.clone());
    let c = Change::new(rv, Kind::Service, "MODIFIED", &obj);
    s.history.push(c.clone());
    let _ = sh.tx.send(c);
    axum::Json(obj).into_response()
}

async fn create_event(
    State(sh): State<Arc<Shared>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let mut ev: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let mut s = sh.store.lock().expect("store");
    s.rv += 1;
    let rv = s.rv;
    ev["metadata"]["namespace"] = json!(ns);
    if ev["metadata"].get("name").is_none() {
        ev["metadata"]["name"] = json!(format!("event-{rv}"));
    }
    ev["metadata"]["resourceVersion"] = json!(rv.to_string());
    let name = ev["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    s.objects.insert((Kind::Event, ns, name), ev.clone());
    (StatusCode::CREATED, axum::Json(ev)).into_response()
}
