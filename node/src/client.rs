//! HTTP/JSON client of the admin API: used by clusterctl, by nodes to join
//! through a peer, and to forward writes to the leader.

use std::time::Duration;

use anyhow::{anyhow, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::node::Node;

/// An error body of the admin API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable kind: bad_request, rejected, no_leader, unavailable, internal.
    pub kind: String,
    pub error: String,
}

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("node {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
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
            ClientError::Api { kind, .. } if kind == "no_leader" || kind == "unavailable" => 4,
            ClientError::Api { kind, .. } if kind == "rejected" => 5,
            ClientError::Api { kind, .. } if kind == "bad_request" => 2,
            _ => 6,
        }
    }
}

/// Connecting to a live node takes well under a second; a dead or cut-off
/// one must not hold a call (or a forwarded write) for the whole timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
        .build()
        .into()
}

/// Status and body of an answer (or the node was unreachable).
fn read(
    addr: &str,
    res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(u16, String), ClientError> {
    let mut resp = res.map_err(|e| ClientError::Unreachable {
        addr: addr.into(),
        reason: e.to_string(),
    })?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| ClientError::Protocol {
            addr: addr.into(),
            reason: e.to_string(),
        })?;
    Ok((status, body))
}

fn finish<T: DeserializeOwned>(
    addr: &str,
    res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<T, ClientError> {
    let (status, body) = read(addr, res)?;
    if (200..300).contains(&status) {
        return serde_json::from_str(&body).map_err(|e| ClientError::Protocol {
            addr: addr.into(),
            reason: format!("{e}: {body}"),
        });
    }
    let err: ApiError = serde_json::from_str(&body).unwrap_or(ApiError {
        kind: "internal".into(),
        error: body,
    });
    Err(ClientError::Api {
        addr: addr.into(),
        status,
        kind: err.kind,
        error: err.error,
    })
}

/// Blocking GET of JSON.
pub fn get_blocking<T: DeserializeOwned>(
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<T, ClientError> {
    let url = format!("http://{addr}{path}");
    finish(addr, agent(timeout).get(&url).call())
}

/// Blocking GET of a text body (e.g. `/metrics`).
pub fn get_text_blocking(addr: &str, path: &str, timeout: Duration) -> Result<String, ClientError> {
    let url = format!("http://{addr}{path}");
    let (status, body) = read(addr, agent(timeout).get(&url).call())?;
    if !(200..300).contains(&status) {
        return Err(ClientError::Protocol {
            addr: addr.into(),
            reason: format!("HTTP {status}: {body}"),
        });
    }
    Ok(body)
}

/// Blocking POST of JSON.
pub fn post_blocking<B: Serialize, T: DeserializeOwned>(
    addr: &str,
    path: &str,
    body: &B,
    timeout: Duration,
    forwarded: bool,
) -> Result<T, ClientError> {
    let url = format!("http://{addr}{path}");
    let mut req = agent(timeout).post(&url);
    if forwarded {
        req = req.header(crate::api::FORWARDED_HEADER, "1");
    }
    finish(addr, req.send_json(body))
}

/// POST, retrying while the cluster answers "no leader / unavailable" (and,
/// when more than one address is given, while a node is unreachable: the
/// next address is tried), until `timeout`. With a request id in `body`,
/// retries apply at most once.
pub fn post_retry<B: Serialize, T: DeserializeOwned>(
    addrs: &[String],
    path: &str,
    body: &B,
    timeout: Duration,
) -> Result<T, ClientError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut k = 0;
    loop {
        let addr = &addrs[k % addrs.len()];
        k += 1;
        let per_call = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_secs(1));
        match post_blocking(addr, path, body, per_call, false) {
            Err(e)
                if (e.exit_code() == 4 || (e.exit_code() == 3 && addrs.len() > 1))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Async POST (on the blocking pool).
pub async fn post_json<B: Serialize, T: DeserializeOwned + Send + 'static>(
    addr: &str,
    path: &str,
    body: &B,
) -> Result<T> {
    let body = serde_json::to_value(body)?;
    let (addr, path) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || {
        post_blocking(&addr, &path, &body, Duration::from_secs(5), false)
    })
    .await?
    .map_err(|e| anyhow!("{e}"))
}

/// Async GET (on the blocking pool).
pub async fn get_json<T: DeserializeOwned + Send + 'static>(
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<T, ClientError> {
    let (a, p) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || get_blocking(&a, &p, timeout))
        .await
        .map_err(|e| ClientError::Protocol {
            addr: addr.into(),
            reason: e.to_string(),
        })?
}

/// Leave the cluster gracefully: ask the leader to remove this node,
/// retrying through leader changes for up to 10 s.
pub async fn leave(node: &Node) -> Result<()> {
    #[derive(Serialize)]
    struct Remove {
        node_id: u64,
    }
    if node.voters() == [node.id()] {
        tracing::info!("last voter of the cluster: stopping without leaving");
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = match node.leader() {
            Some((id, _)) if id == node.id() => node
                .remove_member(node.id())
                .await
                .map(|_| ())
                .map_err(|e| anyhow!("{e}")),
            Some((_, admin)) if !admin.is_empty() => post_json::<_, serde_json::Value>(
                &admin,
                "/cluster/remove",
                &Remove { node_id: node.id() },
            )
            .await
            .map(|_| ()),
            _ => Err(anyhow!("no leader known")),
        };
        match res {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
