//! The options in effect: a flag, else the environment, else clusterctl.toml.

use std::path::PathBuf;

use anyhow::Context;
use holdfast_api::client::Client;
use serde::Deserialize;

use crate::{args::Cli, error::Failure};

/// clusterctl.toml: defaults for the global options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    node: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
}

/// Where the config file is looked for, in order.
pub fn config_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        v.push(PathBuf::from(x).join("holdfast/clusterctl.toml"));
    }
    if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        v.push(PathBuf::from(h).join(".config/holdfast/clusterctl.toml"));
    }
    v.push(PathBuf::from("/etc/holdfast/clusterctl.toml"));
    v
}

/// The options in effect: flag, else environment, else config file.
pub struct Settings {
    pub node: String,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    /// The file the defaults came from, for messages.
    file: Option<PathBuf>,
}

impl Settings {
    pub fn resolve(cli: &Cli) -> anyhow::Result<Self> {
        let (file, fc) = match &cli.config {
            Some(p) => (Some(p.clone()), Some(read_config(p)?)),
            None => match config_candidates().into_iter().find(|p| p.exists()) {
                Some(p) => {
                    let c = read_config(&p)?;
                    (Some(p), Some(c))
                }
                None => (None, None),
            },
        };
        let fc = fc.unwrap_or_default();
        Ok(Self {
            node: cli
                .node_api
                .clone()
                .or(fc.node)
                .unwrap_or_else(|| "127.0.0.1:7101".into()),
            ca: cli.ca.clone().or(fc.ca),
            cert: cli.cert.clone().or(fc.cert),
            key: cli.key.clone().or(fc.key),
            server_name: cli.server_name.clone().or(fc.server_name),
            file,
        })
    }

    /// The admin API client, or why there is none.
    pub fn client(&self) -> Result<Client, Failure> {
        let hint = match &self.file {
            Some(f) => format!("--cert/--key/--ca, HOLDFAST_CERT/HOLDFAST_KEY/HOLDFAST_CA, or {}", f.display()),
            None => "--cert/--key/--ca, HOLDFAST_CERT/HOLDFAST_KEY/HOLDFAST_CA, or ~/.config/holdfast/clusterctl.toml".into(),
        };
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(Failure::Auth(format!(
                "no client certificate: the admin API accepts only certificates from the cluster CA; give {hint} (issue one with `clusterctl certs issue --client NAME --role admin|operator|viewer`)"
            )));
        };
        let Some(ca) = &self.ca else {
            return Err(Failure::Auth(format!(
                "no CA certificate to verify the node with: give {hint}"
            )));
        };
        let id = holdfast_pki::Identity::load(ca, cert, key)
            .map_err(|e| Failure::Auth(format!("{e:#}")))?;
        let c = Client::from_identity(&id).map_err(|e| Failure::Auth(format!("{e:#}")))?;
        Ok(match &self.server_name {
            Some(n) => c.with_server_name(n.clone()),
            None => c,
        })
    }
}

pub fn read_config(p: &std::path::Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}
