//! Loading, attaching, pinning and programming the load balancer.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp,
    },
    Ebpf, EbpfLoader,
};
use tracing::{debug, info};

use crate::{
    abi::{
        addr_bytes, vip_filter_bit, Backend, CtKey, CtVal, IfaceSlot, Meta, Nh, SrcRangeKey, Stats,
        Svc, SvcAlt, SvcKey, SvcStats, ABI_VERSION, ALT_ALL, BACKEND_ACTIVE, BACKEND_DRAINING,
        BACKEND_EMPTY, IFACE_PROBES, IFACE_SLOTS, IFACE_TOMBSTONE, SNAT_SLOTS, SVC_F_AFFINITY,
        SVC_F_DIVERGENT, SVC_F_SNAT, VIPS_F_SNAT, VIP_FILTER_WORDS,
    },
    config::{BackendState, DatapathConfig, DatapathOptions, Forwarding, ServiceSpec},
    conntrack::{Conntrack, CtMaps},
    error::{Error, Result},
    events::FlowEvents,
    maglev::{build_table, MaglevBackend},
    maps::{
        ensure_bpffs_dir, map_data, monotonic_now, ALL_MAPS, CLOCK_PERIOD, M_BACKENDS, M_CLOCK,
        M_CONNTRACK, M_EVENTS, M_IFACE_SLOTS, M_MAGLEV, M_META, M_NH_CACHE, M_SERVICES,
        M_SNAT_ADDRS, M_SNAT_FILTER, M_SNAT_HALF_OPEN, M_SNAT_REV, M_SRC_RANGES, M_STATS,
        M_SVC_ALT, M_SVC_POLICY, M_SVC_STATS, M_VIPS, M_VIP_FILTER,
    },
    prog::{self, ifindex, percpu_sum, xdp, xdp_mut, AttachMode},
    ranges::RangesState,
    snat::SnatState,
    sys,
};

pub(crate) static LB_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.bpf.o"));

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "holdfast_lb";
/// The share walk of a table change (bpf/ct_share.h), run by
/// [`Conntrack::share`], never attached.
pub const SHARE_PROGRAM: &str = "holdfast_ct_share";
/// The program that applies peers' entries under the merge rule
/// (bpf/ct_apply.h), run by [`Conntrack::apply`], never attached.
pub const APPLY_PROGRAM: &str = "holdfast_ct_apply";

/// Publishes CLOCK_MONOTONIC into the program's `lb_clock` every
/// [`CLOCK_PERIOD`] from a thread of its own, until dropped.
struct ClockPublisher {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClockPublisher {
    fn start(cell: sys::MmapU64Cell) -> Result<Self> {
        cell.store(monotonic_now().as_nanos() as u64);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hf-dp-clock".into())
            .spawn(move || {
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    cell.store(monotonic_now().as_nanos() as u64);
                    std::thread::sleep(CLOCK_PERIOD);
                }
            })
            .map_err(|source| Error::Syscall {
                call: "spawn clock thread",
                map: M_CLOCK,
                source,
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ClockPublisher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A service's place in the maps: its id (stats index) and which of its two
/// Maglev regions is live.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    half: u32,
}

enum HeldLink {
    /// Pinned under pin_dir: survives this process.
    Pinned(PinnedLink),
    /// Owned by this process: detached when dropped.
    Owned(XdpLink),
}

/// What one [`Datapath::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub epoch: u64,
    pub services_added: usize,
    pub services_removed: usize,
    pub tables_written: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    /// Maglev slots written (only the slots that differ from what the
    /// region already holds).
    pub slots_written: usize,
    /// Services whose source ranges were (re)written.
    pub ranges_written: usize,
}

/// The load balancer datapath of one node.
pub struct Datapath {
    pub(crate) bpf: Ebpf,
    /// The conntrack map, usable without this struct's lock.
    ct: Arc<Conntrack>,
    opts: DatapathOptions,
    slots: HashMap<SvcKey, Slot>,
    free_ids: BTreeSet<u32>,
    /// Last config applied by this process (None after load/adopt).
    applied: Option<DatapathConfig>,
    /// Backends present in the backends map, by id.
    live_backends: HashMap<u32, Backend>,
    /// The Maglev map, memory-mapped: tables are written (only the slots
    /// that differ from the region's content) without a syscall per slot.
    maglev: sys::MmapU32Array,
    links: HashMap<String, HeldLink>,
    adopted: bool,
    /// What `lb_vip_filter` holds, word by word.
    vip_filter: Vec<u64>,
    /// What the SNAT maps hold (see `snat.rs`).
    pub(crate) snat: SnatState,
    ranges: RangesState,
    /// What `lb_svc_alt` holds, by service slot (see [`Datapath::prepare`]).
    alts: HashMap<u32, Alt>,
    _clock: ClockPublisher,
}

/// A service's other table (`lb_svc_alt`) and why it is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Alt {
    table: SvcAlt,
    /// Prepared: the next table; else the previous one, until
    /// [`Datapath::end_grace`].
    prepared: bool,
}

/// A service's Maglev table: its active backends by weight.
fn service_table(svc: &ServiceSpec) -> Result<Vec<u32>> {
    build_table(
        &svc.backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .map(|b| MaglevBackend {
                id: b.id,
                weight: b.weight,
            })
            .collect::<Vec<_>>(),
        svc.table_size,
    )
}

/// A duplicate of a loaded program's file descriptor.
fn prog_fd(prog: &Xdp, name: &'static str) -> Result<std::os::fd::OwnedFd> {
    prog.fd()
        .map_err(Error::program(name))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::Syscall {
            call: "dup",
            map: name,
            source,
        })
}

/// What one [`Datapath::prepare`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrepareReport {
    /// Services whose next table is now their other table.
    pub services: usize,
    /// Maglev slots written.
    pub slots_written: usize,
}

/// The VIP prefilter words with the bits of these addresses set.
pub(crate) fn vip_filter_words<'a>(vips: impl IntoIterator<Item = &'a SvcKey>) -> Vec<u64> {
    let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
    for k in vips {
        let (w, b) = vip_filter_bit(&k.addr, k.family);
        words[w as usize] |= 1 << b;
    }
    words
}

/// A backend's map value; `svc_slot` is its service's stats slot.
fn backend_value(addr: std::net::IpAddr, port: u16, state: BackendState, svc_slot: u32) -> Backend {
    let (addr, family) = addr_bytes(addr);
    Backend {
        addr,
        svc_ref: svc_slot + 1,
        family,
        state: match state {
            BackendState::Active => BACKEND_ACTIVE,
            BackendState::Draining => BACKEND_DRAINING,
        },
        port: port.to_be(),
    }
}

impl Datapath {
    /// Load the program and create its maps — or, with `pin_dir` set and
    /// maps already pinned there, adopt them with their conntrack, tables and
    /// counters intact.
    pub fn load(opts: DatapathOptions) -> Result<Self> {
        opts.validate()?;
        let maglev_slots = 2 * opts.max_services * opts.max_table_size;
        let tcp_ns = opts.tcp_idle_timeout.as_nanos() as u64;
        let udp_ns = opts.udp_idle_timeout.as_nanos() as u64;
        let refresh_ns = opts.ct_refresh.as_nanos() as u64;
        let node_id = u32::from(opts.node_id);
        let syn_max = opts.syn_window_max();
        let syn_window_ns = crate::config::SYN_WINDOW.as_nanos() as u64;
        let (snat_min, snat_max) = (u32::from(opts.snat_port_min), u32::from(opts.snat_port_max));

        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(M_SERVICES, opts.max_services)
            .map_max_entries(M_VIPS, opts.max_services)
            .map_max_entries(M_BACKENDS, opts.max_backends)
            .map_max_entries(M_MAGLEV, maglev_slots)
            .map_max_entries(M_CONNTRACK, opts.conntrack_size)
            .map_max_entries(M_EVENTS, opts.ring_bytes)
            .map_max_entries(M_SVC_STATS, opts.max_services)
            .map_max_entries(M_SVC_POLICY, opts.max_services)
            .map_max_entries(M_SVC_ALT, opts.max_services)
            .map_max_entries(M_SRC_RANGES, opts.max_source_ranges)
            .map_max_entries(M_SNAT_REV, opts.snat_size)
            .map_max_entries(M_SNAT_HALF_OPEN, opts.snat_half_open_size)
            .override_global("lb_snat_port_min", &snat_min, true)
            .override_global("lb_snat_port_max", &snat_max, true)
            .override_global("lb_tcp_timeout_ns", &tcp_ns, true)
            .override_global("lb_udp_timeout_ns", &udp_ns, true)
            .override_global("lb_ct_refresh_ns", &refresh_ns, true)
            .override_global("lb_mtu", &opts.mtu, true)
            .override_global("lb_node_id", &node_id, true)
            .override_global("lb_hash_seed", &opts.hash_seed, true)
            .override_global("lb_syn_window_max", &syn_max, true)
            .override_global("lb_syn_window_ns", &syn_window_ns, true);
        let mut adopted = false;
        let pin_paths: Vec<(&str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                ensure_bpffs_dir(dir)?;
                adopted = dir.join(M_META).exists();
                ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut bpf = loader.load(LB_OBJ).map_err(|e| Error::Load {
            object: "lb.bpf.o",
            source: Box::new(e),
        })?;
        let lb = xdp_mut(&mut bpf, PROGRAM)?;
        prog::verify(PROGRAM, || lb.load())?;
        let apply = xdp_mut(&mut bpf, APPLY_PROGRAM)?;
        prog::verify(APPLY_PROGRAM, || apply.load())?;
        let apply_fd = prog_fd(apply, APPLY_PROGRAM)?;
        let share = xdp_mut(&mut bpf, SHARE_PROGRAM)?;
        prog::verify(SHARE_PROGRAM, || share.load())?;
        let share_fd = prog_fd(share, SHARE_PROGRAM)?;
        let maglev = sys::MmapU32Array::map(map_data(&bpf, M_MAGLEV)?.fd().as_fd(), maglev_slots)
            .map_err(|source| match (&opts.pin_dir, adopted) {
            (Some(dir), true) => Error::Pinned {
                path: dir.join(M_MAGLEV),
                reason: format!(
                    "the pinned Maglev map cannot be memory-mapped ({source}): it was made by \
                     an older Holdfast (ABI < 3); drain the node and remove the pins"
                ),
            },
            _ => Error::Syscall {
                call: "mmap",
                map: M_MAGLEV,
                source,
            },
        })?;

        let clock =
            sys::MmapU64Cell::map(map_data(&bpf, M_CLOCK)?.fd().as_fd()).map_err(|source| {
                Error::Syscall {
                    call: "mmap",
                    map: M_CLOCK,
                    source,
                }
            })?;
        let clock = ClockPublisher::start(clock)?;

        let dup = |map: &'static str| -> Result<std::os::fd::OwnedFd> {
            map_data(&bpf, map)?
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| Error::Syscall {
                    call: "dup",
                    map,
                    source,
                })
        };
        let ct = Arc::new(Conntrack::new(
            CtMaps {
                conntrack: dup(M_CONNTRACK)?,
                snat_rev: dup(M_SNAT_REV)?,
                snat_half_open: dup(M_SNAT_HALF_OPEN)?,
                backends: dup(M_BACKENDS)?,
                snat_addrs: dup(M_SNAT_ADDRS)?,
                services: dup(M_SERVICES)?,
                svc_policy: dup(M_SVC_POLICY)?,
                apply: apply_fd,
                share: share_fd,
            },
            opts.tcp_idle_timeout,
            opts.tcp_closing_timeout,
            opts.udp_idle_timeout,
        ));
        let mut dp = Self {
            bpf,
            ct,
            free_ids: (0..opts.max_services).collect(),
            opts,
            slots: HashMap::new(),
            applied: None,
            live_backends: HashMap::new(),
            maglev,
            links: HashMap::new(),
            adopted,
            vip_filter: Vec::new(),
            snat: SnatState::default(),
            ranges: RangesState::default(),
            alts: HashMap::new(),
            _clock: clock,
        };
        if adopted {
            dp.check_pinned_sizes(maglev_slots)?;
        }
        dp.init_meta()?;
        dp.check_array_sizes()?;
        dp.recover_state()?;
        // No table change outlives the process that prepared it.
        for slot in 0..dp.opts.max_services {
            dp.write_alt(slot, SvcAlt::default())?;
        }
        info!(
            adopted,
            services = dp.slots.len(),
            epoch = dp.applied_epoch().unwrap_or(0),
            "datapath loaded"
        );
        Ok(dp)
    }

    /// The fixed-size arrays the program indexes by the rules of lb_abi.h
    /// must have the sizes this build computes with.
    fn check_array_sizes(&self) -> Result<()> {
        for (name, size) in [
            (M_IFACE_SLOTS, IFACE_SLOTS),
            (M_VIP_FILTER, VIP_FILTER_WORDS),
            (M_SNAT_FILTER, VIP_FILTER_WORDS),
            (M_SNAT_ADDRS, SNAT_SLOTS),
        ] {
            let info = map_data(&self.bpf, name)?
                .info()
                .map_err(Error::map(name))?;
            if info.max_entries() != size {
                return Err(Error::invalid(
                    name,
                    format!(
                        "map has {} entries, this build indexes {size}",
                        info.max_entries()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn vip_filter_map(&mut self) -> Result<Array<&mut MapData, u64>> {
        Array::try_from(
            self.bpf
                .map_mut(M_VIP_FILTER)
                .ok_or(Error::MissingMap { map: M_VIP_FILTER })?,
        )
        .map_err(Error::map(M_VIP_FILTER))
    }

    /// Make `lb_vip_filter` hold `words` (writing the words that differ).
    fn write_vip_filter(&mut self, words: Vec<u64>) -> Result<()> {
        let old = std::mem::take(&mut self.vip_filter);
        let mut arr = self.vip_filter_map()?;
        for (i, w) in words.iter().enumerate() {
            if old.get(i) != Some(w) {
                arr.set(i as u32, *w, 0).map_err(Error::map(M_VIP_FILTER))?;
            }
        }
        self.vip_filter = words;
        Ok(())
    }

    /// Pinned maps must have the sizes this process was configured with.
    fn check_pinned_sizes(&self, maglev_slots: u32) -> Result<()> {
        let want = [
            (M_SERVICES, self.opts.max_services),
            (M_BACKENDS, self.opts.max_backends),
            (M_MAGLEV, maglev_slots),
            (M_CONNTRACK, self.opts.conntrack_size),
            (M_EVENTS, self.opts.ring_bytes),
            (M_SNAT_REV, self.opts.snat_size),
            (M_SNAT_HALF_OPEN, self.opts.snat_half_open_size),
        ];
        for (name, size) in want {
            let info = map_data(&self.bpf, name)?
                .info()
                .map_err(Error::map(name))?;
            if info.max_entries() != size {
                return Err(Error::Pinned {
                    path: self.pin_dir().map(|d| d.join(name)).unwrap_or_default(),
                    reason: format!(
                        "pinned map has {} entries, config wants {size}: remove the pins \
                         (this flushes conntrack) or restore the old sizes",
                        info.max_entries()
                    ),
                });
            }
        }
        Ok(())
    }

    fn meta(&self) -> Result<Meta> {
        let arr: Array<&MapData, Meta> = Array::try_from(
            self.bpf
                .map(M_META)
                .ok_or(Error::MissingMap { map: M_META })?,
        )
        .map_err(Error::map(M_META))?;
        arr.get(&0, 0).map_err(Error::map(M_META))
    }

    fn set_meta(&mut self, meta: Meta) -> Result<()> {
        let mut arr: Array<&mut MapData, Meta> = Array::try_from(
            self.bpf
                .map_mut(M_META)
                .ok_or(Error::MissingMap { map: M_META })?,
        )
        .map_err(Error::map(M_META))?;
        arr.set(0, meta, 0).map_err(Error::map(M_META))
    }

    fn init_meta(&mut self) -> Result<()> {
        let meta = self.meta()?;
        if meta.abi_version == 0 {
            return self.set_meta(Meta {
                epoch: 0,
                abi_version: ABI_VERSION,
                max_table: self.opts.max_table_size,
            });
        }
        if meta.abi_version != ABI_VERSION || meta.max_table != self.opts.max_table_size {
            return Err(Error::Pinned {
                path: self.pin_dir().map(Path::to_path_buf).unwrap_or_default(),
                reason: format!(
                    "pinned maps have ABI {} / max_table {}, this build has ABI {ABI_VERSION} / \
                     max_table {}",
                    meta.abi_version, meta.max_table, self.opts.max_table_size
                ),
            });
        }
        Ok(())
    }

    /// Rebuild the service slots and live backends from (adopted) maps.
    fn recover_state(&mut self) -> Result<()> {
        let services: Vec<(SvcKey, Svc)> =
            sys::lookup_all(self.fd(M_SERVICES)?, 256).map_err(|source| Error::Syscall {
                call: "BPF_MAP_LOOKUP_BATCH",
                map: M_SERVICES,
                source,
            })?;
        for (key, svc) in services {
            let region = svc.ring_base / self.opts.max_table_size;
            let half = region.saturating_sub(2 * svc.id);
            self.free_ids.remove(&svc.id);
            self.slots.insert(key, Slot { id: svc.id, half });
        }
        // The prefilter as it is (adopted pins), then exactly the services'
        // VIPs (pins of a build without the filter get one here, before the
        // program is attached).
        let arr = self.vip_filter_map()?;
        self.vip_filter = (0..VIP_FILTER_WORDS)
            .map(|i| arr.get(&i, 0).map_err(Error::map(M_VIP_FILTER)))
            .collect::<Result<_>>()?;
        self.snat = SnatState::recover(&mut self.bpf)?;
        self.ranges = RangesState::recover(&mut self.bpf, self.opts.max_services)?;
        let words = vip_filter_words(self.slots.keys().chain(self.snat.keys().iter()));
        self.write_vip_filter(words)?;
        self.recover_backends()
    }

    /// What the backends map holds, by id.
    fn recover_backends(&mut self) -> Result<()> {
        let backends: Vec<(u32, Backend)> =
            sys::lookup_all(self.fd(M_BACKENDS)?, 4096).map_err(|source| Error::Syscall {
                call: "BPF_MAP_LOOKUP_BATCH",
                map: M_BACKENDS,
                source,
            })?;
        self.live_backends = backends
            .into_iter()
            .filter(|(_, b)| b.state != BACKEND_EMPTY)
            .collect();
        Ok(())
    }

    pub(crate) fn fd(&self, map: &'static str) -> Result<BorrowedFd<'_>> {
        Ok(map_data(&self.bpf, map)?.fd().as_fd())
    }

    /// The config this process last applied (None after load or adopt).
    pub fn applied_config(&self) -> Option<&DatapathConfig> {
        self.applied.as_ref()
    }

    pub fn options(&self) -> &DatapathOptions {
        &self.opts
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.opts.pin_dir.as_deref()
    }

    /// True if the maps were adopted from pins left by an earlier process.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The loaded XDP program (for BPF_PROG_TEST_RUN and pinning).
    /// The apply program (tests run raw batches through it).
    pub fn apply_program(&self) -> &Xdp {
        xdp(&self.bpf, APPLY_PROGRAM)
    }

    pub fn program(&self) -> &Xdp {
        xdp(&self.bpf, PROGRAM)
    }

    fn program_mut(&mut self) -> Result<&mut Xdp> {
        xdp_mut(&mut self.bpf, PROGRAM)
    }

    /// Attach to `ifname`. With a pin directory the link is pinned, and an
    /// existing pinned link is taken over by atomically replacing its program
    /// (no packet goes unprocessed during an agent restart).
    pub fn attach(&mut self, ifname: &str, mode: AttachMode) -> Result<()> {
        let ifindex = ifindex(ifname)?;
        // Frames for other MACs are not ours (see lb_iface_slot in
        // lb_abi.h): the filter is in place before the program runs there.
        let mac = crate::prog::if_mac(ifname)?;
        let had = self.links.contains_key(ifname);
        self.set_iface(ifindex, Some(mac))?;
        let r = self.attach_link(ifname, ifindex, mode);
        if r.is_err() && !had {
            self.set_iface(ifindex, None)?;
        }
        r
    }

    fn attach_link(&mut self, ifname: &str, ifindex: u32, mode: AttachMode) -> Result<()> {
        let link_path = self.pin_dir().map(|d| d.join(format!("link_{ifname}")));
        let prog = self.program_mut()?;
        let held = match link_path {
            Some(path) if path.exists() => {
                let fd: FdLink = PinnedLink::from_pin(&path)
                    .map_err(|e| Error::Pinned {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
                    .into();
                let link = XdpLink::try_from(fd).map_err(|e| Error::Pinned {
                    path: path.clone(),
                    reason: format!("not an XDP link: {e}"),
                })?;
                let id = prog.attach_to_link(link).map_err(Error::program(PROGRAM))?;
                // The pin keeps the link; drop our fd and hold the pin instead.
                drop(prog.take_link(id).map_err(Error::program(PROGRAM))?);
                let pinned = PinnedLink::from_pin(&path).map_err(|e| Error::Pinned {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                info!(ifname, "took over pinned XDP link");
                HeldLink::Pinned(pinned)
            }
            Some(path) => {
                let id = prog
                    .attach_to_if_index(ifindex, mode.xdp())
                    .map_err(Error::program(PROGRAM))?;
                let link = prog.take_link(id).map_err(Error::program(PROGRAM))?;
                let fd = FdLink::try_from(link).map_err(|e| Error::Pinned {
                    path: path.clone(),
                    reason: format!("kernel gave a netlink XDP attachment, cannot pin: {e}"),
                })?;
                let pinned = fd.pin(&path).map_err(|e| Error::Pinned {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                info!(ifname, ?mode, "attached and pinned XDP link");
                HeldLink::Pinned(pinned)
            }
            None => {
                let id = prog
                    .attach_to_if_index(ifindex, mode.xdp())
                    .map_err(Error::program(PROGRAM))?;
                info!(ifname, ?mode, "attached XDP program");
                HeldLink::Owned(prog.take_link(id).map_err(Error::program(PROGRAM))?)
            }
        };
        self.links.insert(ifname.to_string(), held);
        Ok(())
    }

    /// Enter `ifindex` with its MAC into `lb_iface_slots` (or, `None`, take
    /// it out), by the probe rule of `lb_iface_slot`.
    fn set_iface(&mut self, ifindex: u32, mac: Option<[u8; 6]>) -> Result<()> {
        if ifindex == 0 || ifindex == IFACE_TOMBSTONE {
            return Err(Error::invalid("interfaces", "reserved ifindex"));
        }
        let mut arr: Array<&mut MapData, IfaceSlot> = Array::try_from(
            self.bpf
                .map_mut(M_IFACE_SLOTS)
                .ok_or(Error::MissingMap { map: M_IFACE_SLOTS })?,
        )
        .map_err(Error::map(M_IFACE_SLOTS))?;
        let mut found = None;
        let mut free = None;
        for i in 0..IFACE_PROBES {
            let k = (ifindex.wrapping_add(i)) % IFACE_SLOTS;
            let slot = arr.get(&k, 0).map_err(Error::map(M_IFACE_SLOTS))?;
            if slot.ifindex == ifindex {
                found = Some(k);
                break;
            }
            if free.is_none() && (slot.ifindex == 0 || slot.ifindex == IFACE_TOMBSTONE) {
                free = Some(k);
            }
            if slot.ifindex == 0 {
                break;
            }
        }
        match (mac, found, free) {
            (Some(mac), Some(k), _) | (Some(mac), None, Some(k)) => arr.set(
                k,
                IfaceSlot {
                    ifindex,
                    mac,
                    flags: 0,
                },
                0,
            ),
            (Some(_), None, None) => {
                return Err(Error::invalid(
                    "interfaces",
                    format!(
                        "ifindex {ifindex}: the {IFACE_PROBES} slots it may use hold other                          interfaces (too many attached interfaces collide)"
                    ),
                ))
            }
            (None, Some(k), _) => arr.set(
                k,
                IfaceSlot {
                    ifindex: IFACE_TOMBSTONE,
                    ..Default::default()
                },
                0,
            ),
            (None, None, _) => Ok(()),
        }
        .map_err(Error::map(M_IFACE_SLOTS))
    }

    /// Detach from `ifname` (removing its pinned link if any).
    pub fn detach(&mut self, ifname: &str) -> Result<()> {
        if let Ok(ifx) = ifindex(ifname) {
            self.set_iface(ifx, None)?;
        }
        match self.links.remove(ifname) {
            Some(HeldLink::Pinned(p)) => {
                let fd = p.unpin().map_err(|source| Error::Io {
                    what: "unpinning link of",
                    path: PathBuf::from(ifname),
                    source,
                })?;
                drop(fd);
            }
            Some(HeldLink::Owned(l)) => drop(l),
            None => {
                // A link pinned by an earlier process that this one never attached.
                if let Some(path) = self.pin_dir().map(|d| d.join(format!("link_{ifname}"))) {
                    if path.exists() {
                        std::fs::remove_file(&path).map_err(|source| Error::Io {
                            what: "removing pinned link",
                            path,
                            source,
                        })?;
                    }
                }
            }
        }
        info!(ifname, "detached XDP program");
        Ok(())
    }

    /// Interfaces this process holds an attachment for.
    pub fn attached(&self) -> Vec<String> {
        let mut v: Vec<String> = self.links.keys().cloned().collect();
        v.sort();
        v
    }

    /// Detach everywhere and remove every pin: the next load starts empty.
    pub fn teardown(mut self) -> Result<()> {
        let names: Vec<String> = self.links.keys().cloned().collect();
        for n in names {
            self.detach(&n)?;
        }
        if let Some(dir) = self.opts.pin_dir.clone() {
            remove_pins(&dir)?;
        }
        Ok(())
    }

    /// The epoch of the last config applied to these maps (by any process).
    pub fn applied_epoch(&self) -> Result<u64> {
        Ok(self.meta()?.epoch)
    }

    /// Program a config epoch. The whole config is validated first (nothing
    /// is written on error). Each service's new Maglev table is written into
    /// its inactive region and switched live by one update of the service
    /// entry, so no packet ever sees a half-written table. Backends are added
    /// before the tables that use them and emptied after the tables stop
    /// using them.
    pub fn apply(&mut self, cfg: &DatapathConfig) -> Result<ApplyReport> {
        cfg.validate(&self.opts)?;
        let r = self.apply_validated(cfg);
        if r.is_err() {
            // Part of it may be in the maps: re-read the backends they hold,
            // rebuild every table on the next apply (written only where the
            // map differs) and forget every cached next hop, so nothing this
            // process believed about the maps outlives the failure.
            self.applied = None;
            let all: Vec<u32> = (0..self.opts.max_backends).collect();
            if let Err(e) = self
                .recover_backends()
                .and_then(|()| self.invalidate_next_hops(&all))
            {
                tracing::warn!(error = %e, "resynchronising after a failed apply");
                self.live_backends.clear();
            }
        }
        r
    }

    /// Prepare a table change (divergent replication's first phase): each
    /// service of `cfg` that exists now and whose table `cfg` changes gets
    /// its next table written into its inactive region, which becomes the
    /// service's other table (`lb_svc_alt`). Nothing is switched: packets
    /// still follow the current tables, but from now on a new entry the
    /// next table sends elsewhere is shared at once, and
    /// [`Conntrack::share`] finds the existing ones. [`Datapath::apply`]
    /// with the same config then switches without rewriting the tables.
    pub fn prepare(&mut self, cfg: &DatapathConfig) -> Result<PrepareReport> {
        cfg.validate(&self.opts)?;
        let mut report = PrepareReport::default();
        let prev: HashMap<SvcKey, &ServiceSpec> = self
            .applied
            .as_ref()
            .map(|a| {
                a.services
                    .iter()
                    .map(|s| (SvcKey::new(s.vip, s.port, s.proto.number()), s))
                    .collect()
            })
            .unwrap_or_default();
        let mut writes = Vec::new();
        let mut everything = Vec::new();
        for svc in &cfg.services {
            let key = SvcKey::new(svc.vip, svc.port, svc.proto.number());
            // A new service has no entries to share.
            let Some(slot) = self.slots.get(&key).copied() else {
                continue;
            };
            // Client affinity or the forwarding mode switched: a peer
            // without an entry would pick differently in ways no table
            // shows (the client's backend; SNAT for a DSR flow), so every
            // entry of the service is shared.
            if prev.get(&key).is_some_and(|p| {
                p.affinity_timeout_s.is_some() != svc.affinity_timeout_s.is_some()
                    || p.forwarding != svc.forwarding
            }) {
                everything.push(slot.id);
                continue;
            }
            if prev
                .get(&key)
                .is_some_and(|p| p.table_inputs() == svc.table_inputs())
            {
                continue; // the table does not change
            }
            let table = service_table(svc)?;
            let half = 1 - slot.half.min(1);
            let base = (2 * slot.id + half) * self.opts.max_table_size;
            writes.push((slot.id, base, svc.table_size, table));
        }
        for id in everything {
            self.write_alt(
                id,
                SvcAlt {
                    base: 0,
                    size: ALT_ALL,
                },
            )?;
            self.alts.get_mut(&id).expect("just written").prepared = true;
            report.services += 1;
        }
        for (id, base, size, table) in writes {
            // Not the other table while it is rewritten.
            if self.alts.get(&id).is_some_and(|a| a.table.base == base) {
                self.write_alt(id, SvcAlt::default())?;
            }
            report.slots_written += self.maglev.write_diff(base, &table);
            self.write_alt(id, SvcAlt { base, size })?;
            self.alts.get_mut(&id).expect("just written").prepared = true;
            report.services += 1;
        }
        Ok(report)
    }

    /// End the grace period after a switch: no service has an other table
    /// but the prepared ones.
    pub fn end_grace(&mut self) -> Result<()> {
        let grace: Vec<u32> = self
            .alts
            .iter()
            .filter(|(_, a)| !a.prepared)
            .map(|(id, _)| *id)
            .collect();
        for id in grace {
            self.write_alt(id, SvcAlt::default())?;
        }
        Ok(())
    }

    /// Services with an other table: (prepared, previous).
    pub fn alt_tables(&self) -> (usize, usize) {
        let prepared = self.alts.values().filter(|a| a.prepared).count();
        (prepared, self.alts.len() - prepared)
    }

    /// Set service slot `id`'s other table (size 0: none).
    fn write_alt(&mut self, id: u32, alt: SvcAlt) -> Result<()> {
        let mut arr: Array<&mut MapData, SvcAlt> = Array::try_from(
            self.bpf
                .map_mut(M_SVC_ALT)
                .ok_or(Error::MissingMap { map: M_SVC_ALT })?,
        )
        .map_err(Error::map(M_SVC_ALT))?;
        arr.set(id, alt, 0).map_err(Error::map(M_SVC_ALT))?;
        if alt.size == 0 {
            self.alts.remove(&id);
        } else {
            self.alts.insert(
                id,
                Alt {
                    table: alt,
                    prepared: false,
                },
            );
        }
        Ok(())
    }

    fn apply_validated(&mut self, cfg: &DatapathConfig) -> Result<ApplyReport> {
        let mut report = ApplyReport {
            epoch: cfg.epoch,
            ..Default::default()
        };
        let prev: HashMap<SvcKey, ServiceSpec> = self
            .applied
            .as_ref()
            .map(|a| {
                a.services
                    .iter()
                    .map(|s| (SvcKey::new(s.vip, s.port, s.proto.number()), s.clone()))
                    .collect()
            })
            .unwrap_or_default();

        // 0. Each service's stats slot: its own, or for a new service a
        // free one (lowest first; step 2 takes it). Backends carry it
        // (svc_ref), so they need it before step 1.
        let mut free = self.free_ids.iter().copied();
        let mut slot_of: HashMap<SvcKey, u32> = HashMap::new();
        for svc in &cfg.services {
            let key = SvcKey::new(svc.vip, svc.port, svc.proto.number());
            let id = match self.slots.get(&key) {
                Some(s) => s.id,
                None => free
                    .next()
                    .ok_or_else(|| Error::invalid("services", "no free service slot"))?,
            };
            slot_of.insert(key, id);
        }

        // 1. Backends (new and changed) before any table references them.
        let mut ids = Vec::new();
        let mut vals = Vec::new();
        for svc in &cfg.services {
            let slot = slot_of[&SvcKey::new(svc.vip, svc.port, svc.proto.number())];
            for b in &svc.backends {
                ids.push(b.id);
                vals.push(backend_value(b.addr, b.port, b.state, slot));
            }
        }
        // Only what is new or changed (the map holds the rest already).
        let (w_ids, w_vals): (Vec<u32>, Vec<Backend>) = ids
            .iter()
            .zip(&vals)
            .filter(|(id, v)| self.live_backends.get(id) != Some(v))
            .map(|(id, v)| (*id, *v))
            .unzip();
        report.backends_written = self.write_batch(M_BACKENDS, &w_ids, &w_vals)?;
        // A backend id now at another address must not reuse the old next hop.
        let moved: Vec<u32> = w_ids
            .iter()
            .zip(&w_vals)
            .filter(|(id, v)| {
                self.live_backends
                    .get(id)
                    .is_some_and(|old| old.addr != v.addr || old.family != v.family)
            })
            .map(|(id, _)| *id)
            .collect();
        self.invalidate_next_hops(&moved)?;
        let new_backends: HashMap<u32, Backend> =
            ids.iter().copied().zip(vals.iter().copied()).collect();

        // 1a. Every node's SNAT addresses (before a SNAT service may bind
        // with one; slots that are gone are cleared in step 4b).
        let snat_keys = crate::snat::snat_keys(&cfg.snat);
        self.snat.write(&mut self.bpf, &cfg.snat, &snat_keys)?;

        // 2a. The VIP prefilter lets the new VIPs (and SNAT addresses)
        // through before their services exist (and keeps the old ones until
        // step 4 removed them).
        let want_filter = vip_filter_words(
            cfg.services
                .iter()
                .map(|svc| SvcKey::new(svc.vip, svc.port, svc.proto.number()))
                .chain(snat_keys.iter().copied())
                .collect::<Vec<_>>()
                .iter(),
        );
        let union = want_filter
            .iter()
            .zip(&self.vip_filter)
            .map(|(a, b)| a | b)
            .collect();
        self.write_vip_filter(union)?;

        // 2. Tables and service entries.
        let mut desired = HashSet::new();
        let mut vip_count: HashMap<SvcKey, u32> = HashMap::new();
        for svc in &cfg.services {
            let key = SvcKey::new(svc.vip, svc.port, svc.proto.number());
            desired.insert(key);
            *vip_count.entry(key.vip_only()).or_default() += 1;
            let existing = self.slots.get(&key).copied();
            if existing.is_some() && prev.get(&key) == Some(svc) {
                continue; // unchanged since our last apply
            }
            let table = service_table(svc)?;
            let slot = match existing {
                Some(s) => Slot {
                    id: s.id,
                    half: 1 - s.half.min(1),
                },
                None => {
                    let id = slot_of[&key];
                    self.free_ids.remove(&id);
                    self.reset_svc_stats(id)?;
                    report.services_added += 1;
                    Slot { id, half: 0 }
                }
            };
            // Source ranges before the service entry (a new service is
            // restricted from its first packet).
            let ranges = svc
                .source_ranges
                .iter()
                .map(|r| SrcRangeKey::new(slot.id, r.net, r.len))
                .collect();
            if self.ranges.set(&mut self.bpf, slot.id, ranges)? {
                report.ranges_written += 1;
            }
            // The affinity timeout before the flag that makes it read,
            // cleared after the flag is.
            if let Some(secs) = svc.affinity_timeout_s {
                crate::ranges::set_affinity(&mut self.bpf, slot.id, secs)?;
            }
            let base = (2 * slot.id + slot.half) * self.opts.max_table_size;
            // The region may be the service's other table: the prepared
            // one (then it holds this table already, and stays the other
            // table up to the switch), or the previous one (no longer
            // compared with once it is rewritten).
            let prepared = SvcAlt {
                base,
                size: svc.table_size,
            };
            if self.alts.get(&slot.id).is_some_and(|a| {
                a.table.size != ALT_ALL
                    && a.table.base == base
                    && (a.table != prepared || self.maglev.read(base, svc.table_size) != table)
            }) {
                self.write_alt(slot.id, SvcAlt::default())?;
            }
            // Write only what differs from the region's current content
            // (Maglev moves ~1/N of the slots when a backend changes); the
            // region is not in use (the service points at the other half).
            report.slots_written += self.maglev.write_diff(base, &table);
            let divergent = if self.opts.divergent {
                SVC_F_DIVERGENT
            } else {
                0
            };
            self.services_map()?
                .insert(
                    key,
                    Svc {
                        id: slot.id,
                        flags: match svc.forwarding {
                            Forwarding::Dsr => 0,
                            Forwarding::Snat => SVC_F_SNAT,
                        } | if svc.affinity_timeout_s.is_some() {
                            SVC_F_AFFINITY
                        } else {
                            0
                        } | divergent,
                        ring_base: base,
                        ring_size: svc.table_size,
                    },
                    0,
                )
                .map_err(Error::map(M_SERVICES))?;
            if svc.affinity_timeout_s.is_none() {
                crate::ranges::set_affinity(&mut self.bpf, slot.id, 0)?;
            }
            // Divergent: the table before stays the other table for a
            // grace period (nodes switch a few milliseconds apart; a new
            // entry that the previous table sends elsewhere is shared).
            let previous = match (existing, prev.get(&key)) {
                (Some(old), Some(old_svc)) if self.opts.divergent => SvcAlt {
                    base: (2 * old.id + old.half) * self.opts.max_table_size,
                    size: old_svc.table_size,
                },
                _ => SvcAlt::default(),
            };
            if previous.size > 0 || self.alts.contains_key(&slot.id) {
                self.write_alt(slot.id, previous)?;
            }
            self.slots.insert(key, slot);
            report.tables_written += 1;
            debug!(service = %svc.name(), id = slot.id, half = slot.half, "maglev table switched");
        }

        // 3. VIP set (fragment / unbalanced-protocol handling; SNAT
        // addresses flagged, so their stray packets are counted).
        for k in &snat_keys {
            *vip_count.entry(*k).or_default() |= VIPS_F_SNAT;
        }
        {
            let mut vips = self.vips_map()?;
            let old: Vec<SvcKey> = vips.keys().filter_map(|k| k.ok()).collect();
            for (k, n) in &vip_count {
                vips.insert(*k, *n, 0).map_err(Error::map(M_VIPS))?;
            }
            for k in old.into_iter().filter(|k| !vip_count.contains_key(k)) {
                vips.remove(&k).map_err(Error::map(M_VIPS))?;
            }
        }

        // 4. Services that are gone.
        let gone: Vec<(SvcKey, Slot)> = self
            .slots
            .iter()
            .filter(|(k, _)| !desired.contains(k))
            .map(|(k, s)| (*k, *s))
            .collect();
        for (key, slot) in gone {
            self.services_map()?
                .remove(&key)
                .map_err(Error::map(M_SERVICES))?;
            self.slots.remove(&key);
            self.write_alt(slot.id, SvcAlt::default())?;
            self.ranges
                .set(&mut self.bpf, slot.id, Default::default())?;
            crate::ranges::set_affinity(&mut self.bpf, slot.id, 0)?;
            self.free_ids.insert(slot.id);
            report.services_removed += 1;
        }

        // 4a. The prefilter: only the VIPs of this config.
        self.write_vip_filter(want_filter)?;
        // 4b. SNAT slots and filter bits that are gone.
        self.snat.prune(&mut self.bpf, &cfg.snat, &snat_keys)?;

        // 5. Backends that are gone: no table references them any more.
        let removed: Vec<u32> = self
            .live_backends
            .keys()
            .copied()
            .filter(|id| !new_backends.contains_key(id))
            .collect();
        let empties = vec![Backend::default(); removed.len()];
        report.backends_removed = self.write_batch(M_BACKENDS, &removed, &empties)?;
        self.invalidate_next_hops(&removed)?;
        self.live_backends = new_backends;

        let mut meta = self.meta()?;
        meta.epoch = cfg.epoch;
        self.set_meta(meta)?;
        self.applied = Some(cfg.clone());
        info!(
            epoch = cfg.epoch,
            tables = report.tables_written,
            added = report.services_added,
            removed = report.services_removed,
            "config applied to datapath"
        );
        Ok(report)
    }

    fn write_batch<K: aya::Pod, V: aya::Pod>(
        &self,
        map: &'static str,
        keys: &[K],
        vals: &[V],
    ) -> Result<usize> {
        sys::update_batch(self.fd(map)?, keys, vals, 0).map_err(|source| Error::Syscall {
            call: "BPF_MAP_UPDATE_BATCH",
            map,
            source,
        })
    }

    fn services_map(&mut self) -> Result<BpfHashMap<&mut MapData, SvcKey, Svc>> {
        BpfHashMap::try_from(
            self.bpf
                .map_mut(M_SERVICES)
                .ok_or(Error::MissingMap { map: M_SERVICES })?,
        )
        .map_err(Error::map(M_SERVICES))
    }

    fn vips_map(&mut self) -> Result<BpfHashMap<&mut MapData, SvcKey, u32>> {
        BpfHashMap::try_from(
            self.bpf
                .map_mut(M_VIPS)
                .ok_or(Error::MissingMap { map: M_VIPS })?,
        )
        .map_err(Error::map(M_VIPS))
    }

    /// Forget the cached next hops of these backend ids on every CPU.
    fn invalidate_next_hops(&mut self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ncpu = nr_cpus()?;
        let mut arr: PerCpuArray<&mut MapData, Nh> = PerCpuArray::try_from(
            self.bpf
                .map_mut(M_NH_CACHE)
                .ok_or(Error::MissingMap { map: M_NH_CACHE })?,
        )
        .map_err(Error::map(M_NH_CACHE))?;
        for &id in ids {
            let zeros =
                PerCpuValues::try_from(vec![Nh::default(); ncpu]).map_err(|source| Error::Io {
                    what: "building per-CPU values for",
                    path: M_NH_CACHE.into(),
                    source,
                })?;
            arr.set(id, zeros, 0).map_err(Error::map(M_NH_CACHE))?;
        }
        Ok(())
    }

    fn reset_svc_stats(&mut self, id: u32) -> Result<()> {
        let mut arr: PerCpuArray<&mut MapData, SvcStats> = PerCpuArray::try_from(
            self.bpf
                .map_mut(M_SVC_STATS)
                .ok_or(Error::MissingMap { map: M_SVC_STATS })?,
        )
        .map_err(Error::map(M_SVC_STATS))?;
        let ncpu = nr_cpus()?;
        let zeros = PerCpuValues::try_from(vec![SvcStats::default(); ncpu]).map_err(|source| {
            Error::Io {
                what: "building per-CPU values for",
                path: M_SVC_STATS.into(),
                source,
            }
        })?;
        arr.set(id, zeros, 0).map_err(Error::map(M_SVC_STATS))
    }

    /// The service entry of (vip, port, proto) as the datapath sees it.
    pub fn service(&self, key: &SvcKey) -> Result<Option<Svc>> {
        let m: BpfHashMap<&MapData, SvcKey, Svc> = BpfHashMap::try_from(
            self.bpf
                .map(M_SERVICES)
                .ok_or(Error::MissingMap { map: M_SERVICES })?,
        )
        .map_err(Error::map(M_SERVICES))?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(Error::map(M_SERVICES)(e)),
        }
    }

    /// The live Maglev table of a service.
    pub fn table(&self, key: &SvcKey) -> Result<Option<Vec<u32>>> {
        let Some(svc) = self.service(key)? else {
            return Ok(None);
        };
        Ok(Some(self.maglev.read(svc.ring_base, svc.ring_size)))
    }

    /// The backend in slot `id` (state EMPTY if none).
    pub fn backend(&self, id: u32) -> Result<Backend> {
        let arr: Array<&MapData, Backend> = Array::try_from(
            self.bpf
                .map(M_BACKENDS)
                .ok_or(Error::MissingMap { map: M_BACKENDS })?,
        )
        .map_err(Error::map(M_BACKENDS))?;
        arr.get(&id, 0).map_err(Error::map(M_BACKENDS))
    }

    /// The conntrack map for callers that must not hold the lock around
    /// this `Datapath` while they walk or write it (replication).
    pub fn conntrack(&self) -> Arc<Conntrack> {
        self.ct.clone()
    }

    /// Look one conntrack entry up.
    pub fn ct_get(&self, key: &CtKey) -> Result<Option<CtVal>> {
        self.ct.get(key)
    }

    /// Insert or overwrite entries (batched syscalls).
    pub fn ct_insert_batch(&self, entries: &[(CtKey, CtVal)]) -> Result<usize> {
        self.ct.insert_batch(entries)
    }

    /// See [`Conntrack::insert_new`].
    pub fn ct_insert_new(&self, entries: &[(CtKey, CtVal)]) -> Result<(usize, Option<usize>)> {
        self.ct.insert_new(entries)
    }

    /// Every conntrack entry, read in batches.
    pub fn ct_dump(&self) -> Result<Vec<(CtKey, CtVal)>> {
        self.ct.dump()
    }

    /// Delete entries; returns how many existed.
    pub fn ct_delete_batch(&self, keys: &[CtKey]) -> Result<usize> {
        self.ct.delete_batch(keys)
    }

    /// See [`Conntrack::expire`].
    pub fn ct_expire(&self, now_ns: u64) -> Result<usize> {
        self.ct.expire(now_ns)
    }

    /// The conntrack map as the kernel accounts it (`/proc/self/fdinfo`,
    /// the same figures `bpftool map show` prints): id, sizes and the
    /// bytes charged to it. An LRU hash preallocates every entry, so
    /// `memlock` is its full size whatever it holds.
    pub fn ct_map_info(&self) -> Result<MapInfo> {
        use std::os::fd::AsRawFd;
        let fd = self.fd(M_CONNTRACK)?;
        let path = PathBuf::from(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()));
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            what: "reading the conntrack map's fdinfo",
            path: path.clone(),
            source,
        })?;
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(MapInfo {
            id: field("map_id") as u32,
            max_entries: field("max_entries"),
            key_size: field("key_size"),
            value_size: field("value_size"),
            memlock: field("memlock"),
        })
    }

    /// Global counters summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        percpu_sum(&self.bpf, M_STATS, 0)
    }

    /// Per-service counters summed over CPUs, by service key.
    pub fn service_stats(&self) -> Result<Vec<(SvcKey, SvcStats)>> {
        let mut out = self
            .slots
            .iter()
            .map(|(key, slot)| Ok((*key, percpu_sum(&self.bpf, M_SVC_STATS, slot.id)?)))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|(k, _)| (k.family, k.addr, u16::from_be(k.port), k.proto));
        Ok(out)
    }

    /// Take the new-flow ring buffer for asynchronous consumption (once).
    pub fn take_flow_events(&mut self) -> Result<FlowEvents> {
        let map = self
            .bpf
            .take_map(M_EVENTS)
            .ok_or(Error::MissingMap { map: M_EVENTS })?;
        let ring = RingBuf::try_from(map).map_err(Error::map(M_EVENTS))?;
        FlowEvents::new(ring)
    }

    /// Pin the program itself (benchmarks and outside harnesses).
    pub fn pin_program(&mut self, path: &Path) -> Result<()> {
        self.program_mut()?.pin(path).map_err(|e| Error::Pinned {
            path: path.into(),
            reason: e.to_string(),
        })
    }
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, source)| Error::Io {
        what: "reading",
        path: "/sys/devices/system/cpu/possible".into(),
        source,
    })
}

/// Remove every pin in `dir` (maps and links) and the directory itself.
/// Write conntrack entries straight into the pinned conntrack map of the
/// datapath pinned at `pin_dir` (lab and benchmark tooling: a large
/// conntrack without that many real flows). Returns how many were written.
/// A BPF map as `/proc/self/fdinfo` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u32,
    pub max_entries: u64,
    pub key_size: u64,
    pub value_size: u64,
    /// Bytes charged to the map (its preallocated memory).
    pub memlock: u64,
}

pub fn ct_fill_pinned(pin_dir: &Path, entries: &[(CtKey, CtVal)]) -> Result<usize> {
    let path = pin_dir.join(M_CONNTRACK);
    let map = aya::maps::MapData::from_pin(&path).map_err(|e| Error::Io {
        what: "opening the pinned conntrack map",
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut n = 0;
    for c in entries.chunks(65_536) {
        let (k, v): (Vec<CtKey>, Vec<CtVal>) = c.iter().copied().unzip();
        n += sys::update_batch(map.fd().as_fd(), &k, &v, 0).map_err(|source| Error::Syscall {
            call: "BPF_MAP_UPDATE_BATCH",
            map: M_CONNTRACK,
            source,
        })?;
    }
    Ok(n)
}

pub fn remove_pins(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        what: "reading pin directory",
        path: dir.into(),
        source,
    })?;
    for e in entries.flatten() {
        std::fs::remove_file(e.path()).map_err(|source| Error::Io {
            what: "removing pin",
            path: e.path(),
            source,
        })?;
    }
    std::fs::remove_dir(dir).map_err(|source| Error::Io {
        what: "removing pin directory",
        path: dir.into(),
        source,
    })
}
