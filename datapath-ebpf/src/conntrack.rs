//! A handle on the conntrack map that works without the [`Datapath`]'s
//! lock: its own duplicate of the map's file descriptor. Map operations are
//! safe to run concurrently in the kernel, so replication (apply, snapshot,
//! refresh, expiry) walks and writes a million entries while the node goes
//! on programming config through the `Datapath` — before this handle, a
//! 0.5 s dump for expiry held the lock and stalled every replicated write
//! behind it (docs/benchmarks.md, the scale bench).
//!
//! [`Datapath`]: crate::loader::Datapath

use std::{
    os::fd::{AsFd, OwnedFd},
    time::Duration,
};

use crate::{
    abi::{CtKey, CtVal, CT_F_CLOSING, IPPROTO_TCP},
    error::{Error, Result},
    sys,
};

const MAP: &str = crate::maps::M_CONNTRACK;

pub struct Conntrack {
    fd: OwnedFd,
    tcp_idle: Duration,
    tcp_closing: Duration,
    udp_idle: Duration,
}

fn syscall(call: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Syscall {
        call,
        map: MAP,
        source,
    }
}

impl Conntrack {
    pub(crate) fn new(
        fd: OwnedFd,
        tcp_idle: Duration,
        tcp_closing: Duration,
        udp_idle: Duration,
    ) -> Self {
        Self {
            fd,
            tcp_idle,
            tcp_closing,
            udp_idle,
        }
    }

    /// Look one entry up.
    pub fn get(&self, key: &CtKey) -> Result<Option<CtVal>> {
        sys::lookup_elem(self.fd.as_fd(), key).map_err(syscall("BPF_MAP_LOOKUP_ELEM"))
    }

    /// Insert or overwrite entries, 65 536 per syscall.
    pub fn insert_batch(&self, entries: &[(CtKey, CtVal)]) -> Result<usize> {
        let mut n = 0;
        for c in entries.chunks(65_536) {
            let (keys, vals): (Vec<CtKey>, Vec<CtVal>) = c.iter().copied().unzip();
            n += sys::update_batch(self.fd.as_fd(), &keys, &vals, 0)
                .map_err(syscall("BPF_MAP_UPDATE_BATCH"))?;
        }
        Ok(n)
    }

    /// Insert entries whose keys do not exist yet (`BPF_NOEXIST`, one
    /// syscall each, no lookup). Returns how many were inserted from the
    /// front and, if it stopped at an existing key, that key's index.
    pub fn insert_new(&self, entries: &[(CtKey, CtVal)]) -> Result<(usize, Option<usize>)> {
        const BPF_NOEXIST: u64 = 1;
        for (i, (k, v)) in entries.iter().enumerate() {
            match sys::update_elem(self.fd.as_fd(), k, v, BPF_NOEXIST) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok((i, Some(i))),
                Err(e) => return Err(syscall("BPF_MAP_UPDATE_ELEM")(e)),
            }
        }
        Ok((entries.len(), None))
    }

    /// Every entry, read in batches.
    pub fn dump(&self) -> Result<Vec<(CtKey, CtVal)>> {
        sys::lookup_all(self.fd.as_fd(), 16_384).map_err(syscall("BPF_MAP_LOOKUP_BATCH"))
    }

    /// Delete entries; returns how many existed.
    pub fn delete_batch(&self, keys: &[CtKey]) -> Result<usize> {
        sys::delete_batch(self.fd.as_fd(), keys).map_err(syscall("BPF_MAP_DELETE_BATCH"))
    }

    /// Delete entries idle longer than their protocol's timeout (per this
    /// host's CLOCK_MONOTONIC). Returns how many were removed.
    pub fn expire(&self, now_ns: u64) -> Result<usize> {
        let tcp = self.tcp_idle.as_nanos() as u64;
        let closing = self.tcp_closing.as_nanos() as u64;
        let udp = self.udp_idle.as_nanos() as u64;
        let stale: Vec<CtKey> = self
            .dump()?
            .into_iter()
            .filter(|(k, v)| {
                let limit = if k.proto != IPPROTO_TCP {
                    udp
                } else if v.flags & CT_F_CLOSING != 0 {
                    closing
                } else {
                    tcp
                };
                now_ns.saturating_sub(v.last_seen_ns) > limit
            })
            .map(|(k, _)| k)
            .collect();
        self.delete_batch(&stale)
    }
}
