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
    collections::{HashMap, HashSet},
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
    time::Duration,
};

use std::mem::size_of;

use crate::{
    abi::{
        Backend, CtBatch, CtKey, CtVal, ShareReport, SnatAddr, SnatRev, Svc, SvcKey, SvcPolicy,
        BACKEND_EMPTY, CT_BATCH_ENTRY, CT_BATCH_MAX, CT_F_AFFINITY, CT_F_CLOSING, CT_F_SNAT,
        FAMILY_V4, IPPROTO_TCP, SNAT_F_V4, SNAT_F_V6, SNAT_SLOTS, SVC_F_AFFINITY,
    },
    error::{Error, Result},
    maps::{M_BACKENDS, M_SERVICES, M_SNAT_ADDRS, M_SNAT_HALF_OPEN, M_SNAT_REV, M_SVC_POLICY},
    sys,
    testrun::{run_raw, XDP_PASS},
};

/// The bytes of a plain-old-data value (a `#[repr(C)]` ABI struct).
fn pod_bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod (repr(C), no padding the kernel could misread, every
    // byte initialised by its constructors), so its bytes may be read.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

const MAP: &str = crate::maps::M_CONNTRACK;

/// File descriptors (duplicates) of the maps a conntrack handle uses.
pub(crate) struct CtMaps {
    pub conntrack: OwnedFd,
    pub snat_rev: OwnedFd,
    pub snat_half_open: OwnedFd,
    pub backends: OwnedFd,
    pub snat_addrs: OwnedFd,
    pub services: OwnedFd,
    pub svc_policy: OwnedFd,
    /// The apply program (holdfast_ct_apply).
    pub apply: OwnedFd,
    /// The share walk (holdfast_ct_share).
    pub share: OwnedFd,
}

pub struct Conntrack {
    fd: OwnedFd,
    rev: OwnedFd,
    half_open: OwnedFd,
    backends: OwnedFd,
    snat_addrs: OwnedFd,
    services: OwnedFd,
    svc_policy: OwnedFd,
    apply: OwnedFd,
    share: OwnedFd,
    tcp_idle: Duration,
    tcp_closing: Duration,
    udp_idle: Duration,
    /// What the previous sweep found: bindings without a live entry, and
    /// half-open bindings (see [`Conntrack::sweep_bindings`]).
    sweep: Mutex<Sweep>,
}

#[derive(Default)]
struct Sweep {
    stale: HashSet<CtKey>,
    half_open: HashSet<CtKey>,
}

/// What applying peers' entries did (see [`Conntrack::apply`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyCounts {
    /// Written: new, or merged into an existing entry.
    pub applied: u64,
    /// Already equal.
    pub unchanged: u64,
    /// Refused: the local entry is newer.
    pub rejected: u64,
}

/// What writing a replicated SNAT entry's binding did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindReport {
    /// Bindings written.
    pub bound: usize,
    /// Entries whose binding could not be made: their backend or their
    /// slot's address is not (or no more) in this node's config.
    pub unresolved: usize,
    /// Local entries dropped because their origin gave their port to a
    /// newer flow (the binding now names that flow).
    pub superseded: usize,
}

fn syscall_on(call: &'static str, map: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Syscall { call, map, source }
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
        maps: CtMaps,
        tcp_idle: Duration,
        tcp_closing: Duration,
        udp_idle: Duration,
    ) -> Self {
        Self {
            fd: maps.conntrack,
            rev: maps.snat_rev,
            half_open: maps.snat_half_open,
            backends: maps.backends,
            snat_addrs: maps.snat_addrs,
            services: maps.services,
            svc_policy: maps.svc_policy,
            apply: maps.apply,
            share: maps.share,
            tcp_idle,
            tcp_closing,
            udp_idle,
            sweep: Mutex::new(Sweep::default()),
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

    /// Apply peers' entries under the merge rule (bpf/ct_apply.h) in the
    /// kernel: one BPF_PROG_TEST_RUN of the apply program per
    /// [`CT_BATCH_MAX`] entries, instead of a syscall or more per entry.
    pub fn apply(&self, entries: &[(CtKey, CtVal)]) -> Result<ApplyCounts> {
        let hdr = size_of::<CtBatch>();
        let mut buf = Vec::with_capacity(hdr + CT_BATCH_MAX * CT_BATCH_ENTRY);
        let mut out = vec![0u8; hdr + CT_BATCH_MAX * CT_BATCH_ENTRY];
        let mut counts = ApplyCounts::default();
        for chunk in entries.chunks(CT_BATCH_MAX) {
            let head = CtBatch {
                count: chunk.len() as u32,
                ..Default::default()
            };
            buf.clear();
            buf.extend_from_slice(pod_bytes(&head));
            for (k, v) in chunk {
                buf.extend_from_slice(pod_bytes(k));
                buf.extend_from_slice(pod_bytes(v));
            }
            let (verdict, len, _) = run_raw(self.apply.as_fd(), &buf, &mut out, 0)?;
            if verdict != XDP_PASS || len < hdr {
                return Err(Error::invalid(
                    "conntrack batch",
                    format!(
                        "the apply program refused a batch of {} (verdict {verdict})",
                        chunk.len()
                    ),
                ));
            }
            // SAFETY: out holds at least hdr bytes written by the kernel;
            // CtBatch is plain old data, read unaligned.
            let done: CtBatch = unsafe { std::ptr::read_unaligned(out.as_ptr().cast()) };
            if done.failed > 0 {
                return Err(Error::Syscall {
                    call: "BPF_PROG_TEST_RUN (apply)",
                    map: MAP,
                    source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                });
            }
            counts.applied += u64::from(done.applied);
            counts.unchanged += u64::from(done.unchanged);
            counts.rejected += u64::from(done.rejected);
        }
        Ok(counts)
    }

    /// The share walk of a table change (bpf/ct_share.h): every own entry
    /// not yet shared that its service's other table (the prepared next
    /// one) sends to another backend is marked shared and written on the
    /// ring, all in one walk in the kernel. If the ring was full for some
    /// (`ring_full`), run it again once the ring drained: those stay
    /// unmarked.
    pub fn share(&self) -> Result<ShareReport> {
        // The report is written over the packet (at least 14 bytes).
        let data = [0u8; size_of::<ShareReport>()];
        let mut out = [0u8; size_of::<ShareReport>() + 64];
        let (verdict, len, _) = run_raw(self.share.as_fd(), &data, &mut out, 0)?;
        if verdict != XDP_PASS || len < size_of::<ShareReport>() {
            return Err(Error::invalid(
                "share walk",
                format!("the share program returned verdict {verdict}"),
            ));
        }
        // SAFETY: out holds a ShareReport written by the kernel; plain old
        // data, read unaligned.
        Ok(unsafe { std::ptr::read_unaligned(out.as_ptr().cast()) })
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
    /// host's CLOCK_MONOTONIC), then the SNAT bindings no live entry holds
    /// (see [`Conntrack::sweep_bindings`]). Returns how many entries were
    /// removed.
    pub fn expire(&self, now_ns: u64) -> Result<usize> {
        let n = self.expire_entries(now_ns)?;
        self.sweep_bindings()?;
        Ok(n)
    }

    fn expire_entries(&self, now_ns: u64) -> Result<usize> {
        let tcp = self.tcp_idle.as_nanos() as u64;
        let closing = self.tcp_closing.as_nanos() as u64;
        let udp = self.udp_idle.as_nanos() as u64;
        let entries = self.dump()?;
        let affinity = if entries.iter().any(|(_, v)| v.flags & CT_F_AFFINITY != 0) {
            self.affinity_timeouts()?
        } else {
            HashMap::new()
        };
        let stale: Vec<CtKey> = entries
            .into_iter()
            .filter(|(k, v)| {
                let limit = if v.flags & CT_F_AFFINITY != 0 {
                    // Its service's timeout, as the datapath reads it (a
                    // service gone or without affinity: the entry is
                    // dead weight).
                    let svc = SvcKey {
                        addr: k.daddr,
                        port: k.dport,
                        proto: k.proto,
                        family: k.family,
                    };
                    affinity.get(&svc).copied().unwrap_or(0)
                } else if k.proto != IPPROTO_TCP {
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

    /// The client affinity timeout (ns) of every service that has one.
    fn affinity_timeouts(&self) -> Result<HashMap<SvcKey, u64>> {
        let services: Vec<(SvcKey, Svc)> = sys::lookup_all(self.services.as_fd(), 1024)
            .map_err(syscall_on("BPF_MAP_LOOKUP_BATCH", M_SERVICES))?;
        let mut out = HashMap::new();
        for (k, svc) in services {
            if svc.flags & SVC_F_AFFINITY == 0 {
                continue;
            }
            let p: Option<SvcPolicy> = sys::lookup_elem(self.svc_policy.as_fd(), &svc.id)
                .map_err(syscall_on("BPF_MAP_LOOKUP_ELEM", M_SVC_POLICY))?;
            if let Some(p) = p.filter(|p| p.affinity_s != 0) {
                out.insert(k, u64::from(p.affinity_s) * 1_000_000_000);
            }
        }
        Ok(out)
    }
}

impl Conntrack {
    /// The reverse key of a SNAT entry (the backend's reply as it
    /// arrives), from this node's backends and SNAT addresses; None when
    /// the entry is not SNAT or either is unknown here.
    pub fn snat_rev_key(&self, key: &CtKey, val: &CtVal) -> Result<Option<CtKey>> {
        if val.flags & CT_F_SNAT == 0 || u32::from(val.snat_slot) >= SNAT_SLOTS {
            return Ok(None);
        }
        let be: Option<Backend> = sys::lookup_elem(self.backends.as_fd(), &val.backend_id)
            .map_err(syscall_on("BPF_MAP_LOOKUP_ELEM", M_BACKENDS))?;
        let Some(be) = be.filter(|b| b.state != BACKEND_EMPTY && b.family == key.family) else {
            return Ok(None);
        };
        let slot = u32::from(val.snat_slot);
        let a: Option<SnatAddr> = sys::lookup_elem(self.snat_addrs.as_fd(), &slot)
            .map_err(syscall_on("BPF_MAP_LOOKUP_ELEM", M_SNAT_ADDRS))?;
        let Some(a) = a else { return Ok(None) };
        let (want, daddr) = if key.family == FAMILY_V4 {
            (SNAT_F_V4, a.v4)
        } else {
            (SNAT_F_V6, a.v6)
        };
        if a.flags & want == 0 {
            return Ok(None);
        }
        Ok(Some(CtKey {
            saddr: be.addr,
            daddr,
            sport: if be.port != 0 { be.port } else { key.dport },
            dport: val.snat_port,
            proto: key.proto,
            family: key.family,
            pad: 0,
        }))
    }

    /// Write the bindings of the SNAT entries stored under `keys` (as the
    /// map holds them after a merge; DSR entries and missing keys are
    /// skipped). A binding held by another flow is replaced: its origin gave
    /// the port to this newer flow, so the older flow's entry, if it still
    /// names the port, is deleted first.
    pub fn bind(&self, keys: &[CtKey]) -> Result<BindReport> {
        let mut r = BindReport::default();
        for k in keys {
            let Some(v) = self.get(k)?.filter(|v| v.flags & CT_F_SNAT != 0) else {
                continue;
            };
            let (k, v) = (k, &v);
            let Some(rk) = self.snat_rev_key(k, v)? else {
                r.unresolved += 1;
                continue;
            };
            let old: Option<SnatRev> = sys::lookup_elem(self.rev.as_fd(), &rk)
                .map_err(syscall_on("BPF_MAP_LOOKUP_ELEM", M_SNAT_REV))?;
            if let Some(old) = old.filter(|o| o.flow != *k) {
                if let Some(ov) = self.get(&old.flow)? {
                    if ov.flags & CT_F_SNAT != 0
                        && ov.snat_port == v.snat_port
                        && ov.snat_slot == v.snat_slot
                        && ov.created_ns <= v.created_ns
                    {
                        self.delete_batch(&[old.flow])?;
                        r.superseded += 1;
                    }
                }
            }
            let rv = SnatRev {
                flow: *k,
                backend_id: v.backend_id,
                pad: 0,
            };
            sys::update_elem(self.rev.as_fd(), &rk, &rv, 0)
                .map_err(syscall_on("BPF_MAP_UPDATE_ELEM", M_SNAT_REV))?;
            r.bound += 1;
        }
        Ok(r)
    }

    /// Every SNAT binding: (reverse key, value).
    pub fn bindings(&self) -> Result<Vec<(CtKey, SnatRev)>> {
        sys::lookup_all(self.rev.as_fd(), 16_384)
            .map_err(syscall_on("BPF_MAP_LOOKUP_BATCH", M_SNAT_REV))
    }

    /// Every half-open binding of SYN flood mode.
    pub fn half_open(&self) -> Result<Vec<(CtKey, SnatRev)>> {
        sys::lookup_all(self.half_open.as_fd(), 16_384)
            .map_err(syscall_on("BPF_MAP_LOOKUP_BATCH", M_SNAT_HALF_OPEN))
    }

    /// Delete the SNAT bindings that no live entry holds (its entry is
    /// gone, no longer SNAT, or names another port or backend) in two
    /// sweeps in a row, so their ports can be bound again; and the
    /// half-open bindings already there in the previous sweep (their
    /// handshake never completed). Two sweeps: the datapath binds a port
    /// just before it writes the entry, and a binding caught in between
    /// must not be freed. An entry always goes before its binding — by
    /// expiry above, or by the LRU — so a port is never free while an entry
    /// names it. Returns how many bindings were deleted.
    pub fn sweep_bindings(&self) -> Result<usize> {
        let mut stale = HashSet::new();
        for (rk, rv) in self.bindings()? {
            let live = match self.get(&rv.flow)? {
                Some(v) => self.snat_rev_key(&rv.flow, &v)?.is_some_and(|k| k == rk),
                None => false,
            };
            if !live {
                stale.insert(rk);
            }
        }
        let mut sweep = self.sweep.lock().expect("sweep");
        let mut n = 0;
        let dead: Vec<CtKey> = stale.intersection(&sweep.stale).copied().collect();
        if !dead.is_empty() {
            n += sys::delete_batch(self.rev.as_fd(), &dead)
                .map_err(syscall_on("BPF_MAP_DELETE_BATCH", M_SNAT_REV))?;
        }
        for k in &dead {
            stale.remove(k);
        }
        sweep.stale = stale;
        let now: HashSet<CtKey> = self.half_open()?.into_iter().map(|(k, _)| k).collect();
        let old: Vec<CtKey> = now.intersection(&sweep.half_open).copied().collect();
        if !old.is_empty() {
            n += sys::delete_batch(self.half_open.as_fd(), &old)
                .map_err(syscall_on("BPF_MAP_DELETE_BATCH", M_SNAT_HALF_OPEN))?;
        }
        sweep.half_open = now.into_iter().filter(|k| !old.contains(k)).collect();
        Ok(n)
    }
}
