//! What every command shares: the node and client it talks to, output as a
//! table or JSON, and writes through the leader.

use std::time::Duration;

use anyhow::anyhow;
use holdfast_api::client::{Client, ClientError};
use raft_store::{Command, Request, Response};
use serde::Serialize;

use crate::{
    args::{Cli, Output},
    error::Failure,
};

pub fn print<T: Serialize>(
    out: Output,
    v: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), Failure> {
    match out {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).map_err(|e| anyhow!(e))?
        ),
        Output::Table => print!("{}", table(v)),
    }
    Ok(())
}

pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i >= width.len() {
                width.push(0);
            }
            width[i] = width[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut s = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        s += &line(r);
    }
    s
}

pub fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("clusterctl-{}-{nanos}", std::process::id())
}

/// What a command talks to: the node and the client.
pub struct Ctx<'a> {
    pub cli: &'a Cli,
    pub node: String,
    pub client: Client,
}

impl Ctx<'_> {
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.client
            .get(&self.node, path, Duration::from_secs(self.cli.timeout_s))
    }
}

/// POST a write, retrying through leader changes; the same request id makes
/// retries apply at most once.
pub fn write<B: Serialize>(cx: &Ctx, path: &str, body: &B) -> Result<Response, ClientError> {
    cx.client.post_retry(
        std::slice::from_ref(&cx.node),
        path,
        body,
        Duration::from_secs(cx.cli.timeout_s),
    )
}

pub fn command(cx: &Ctx, command: Command) -> Result<Response, ClientError> {
    write(
        cx,
        "/command",
        &Request {
            id: Some(request_id()),
            command,
            trace: None,
        },
    )
}

pub fn applied(cli: &Cli, r: Response) -> Result<(), Failure> {
    print(cli.output, &r, |r| {
        if r.backend_ids.is_empty() {
            format!("applied at epoch {}\n", r.epoch)
        } else {
            format!(
                "applied at epoch {}; backend id {}\n",
                r.epoch,
                r.backend_ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    })
}
