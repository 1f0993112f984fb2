//! Certificate rotation without restart: the node re-reads its CA,
//! certificate and key files when their content changes (a Kubernetes
//! Secret mount swaps them all at once through its `..data` symlink; an
//! operator may write them one by one) and switches to them only when they
//! form a valid identity again.

use std::path::PathBuf;

use anyhow::Result;

use holdfast_pki::Identity;

/// The three PEM files of an identity.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    fn read(&self) -> std::io::Result<Vec<u8>> {
        let mut all = Vec::new();
        for p in [&self.ca, &self.cert, &self.key] {
            let b = std::fs::read(p)?;
            all.extend_from_slice(&(b.len() as u64).to_le_bytes());
            all.extend_from_slice(&b);
        }
        Ok(all)
    }

    pub fn load(&self) -> Result<Identity> {
        Identity::load(&self.ca, &self.cert, &self.key)
    }
}

/// What one look at the files found.
pub enum Change {
    /// Same content as last time.
    None,
    /// New content forming a valid identity: switch to it.
    Valid(Box<Identity>),
    /// New content that does not (yet) form a valid identity — reported
    /// once per content; the node keeps its current identity.
    Invalid(anyhow::Error),
}

/// Watches [`CertFiles`] by content.
pub struct Watcher {
    files: CertFiles,
    seen: Vec<u8>,
}

impl Watcher {
    /// Start from the files as they are now (the identity already loaded).
    pub fn new(files: CertFiles) -> Self {
        let seen = files.read().unwrap_or_default();
        Self { files, seen }
    }

    pub fn poll(&mut self) -> Change {
        let now = match self.files.read() {
            Ok(b) => b,
            // Mid-swap (a file missing for a moment): look again next time.
            Err(_) => return Change::None,
        };
        if now == self.seen {
            return Change::None;
        }
        self.seen = now;
        match self.files.load() {
            Ok(id) => Change::Valid(Box::new(id)),
            Err(e) => Change::Invalid(e),
        }
    }
}
