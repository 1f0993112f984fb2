//! What the loader, the conntrack handle and the ring-buffer consumer share:
//! the maps' names in the object, which of them are pinned, the bpffs
//! plumbing that pins and adopts them, and the clock of conntrack
//! timestamps. Every module that opens a map by name takes it from here, so
//! none of them needs the loader.

use std::{ffi::CString, path::Path, time::Duration};

use aya::{
    maps::{Map, MapData},
    Ebpf,
};

use crate::error::{Error, Result};

pub(crate) const M_SERVICES: &str = "lb_services";
pub(crate) const M_VIPS: &str = "lb_vips";
pub(crate) const M_BACKENDS: &str = "lb_backends";
pub(crate) const M_MAGLEV: &str = "lb_maglev";
pub(crate) const M_CONNTRACK: &str = "lb_conntrack";
pub(crate) const M_EVENTS: &str = "lb_flow_events";
pub(crate) const M_STATS: &str = "lb_stats";
pub(crate) const M_SVC_STATS: &str = "lb_svc_stats";
pub(crate) const M_META: &str = "lb_meta";
pub(crate) const M_NH_CACHE: &str = "lb_nh_cache";
pub(crate) const M_IFACE_SLOTS: &str = "lb_iface_slots";
pub(crate) const M_VIP_FILTER: &str = "lb_vip_filter";
pub(crate) const M_SNAT_REV: &str = "lb_snat_rev";
pub(crate) const M_SNAT_HALF_OPEN: &str = "lb_snat_half_open";
pub(crate) const M_SNAT_ADDRS: &str = "lb_snat_addrs";
pub(crate) const M_SNAT_OWN: &str = "lb_snat_own";
pub(crate) const M_SNAT_FILTER: &str = "lb_snat_filter";
pub(crate) const M_SRC_RANGES: &str = "lb_src_ranges";
pub(crate) const M_SVC_POLICY: &str = "lb_svc_policy";
pub(crate) const M_SVC_ALT: &str = "lb_svc_alt";
/// Not pinned: each process publishes its own clock to its own program.
pub(crate) const M_CLOCK: &str = "lb_clock";
/// How often the agent publishes CLOCK_MONOTONIC into `lb_clock`.
pub const CLOCK_PERIOD: Duration = Duration::from_millis(2);

/// The maps pinned with `pin_dir` (a restart adopts them).
pub(crate) const ALL_MAPS: [&str; 19] = [
    M_SERVICES,
    M_VIPS,
    M_BACKENDS,
    M_MAGLEV,
    M_CONNTRACK,
    M_EVENTS,
    M_STATS,
    M_SVC_STATS,
    M_META,
    M_IFACE_SLOTS,
    M_VIP_FILTER,
    M_SNAT_REV,
    M_SNAT_HALF_OPEN,
    M_SNAT_ADDRS,
    M_SNAT_OWN,
    M_SNAT_FILTER,
    M_SRC_RANGES,
    M_SVC_POLICY,
    M_SVC_ALT,
];

/// bpffs magic (statfs f_type).
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn statfs_type(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid NUL-terminated path; buf is a properly sized out-param.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf.f_type as i64)
}

/// Make sure `dir` exists on a bpffs (mounting /sys/fs/bpf if needed).
pub fn ensure_bpffs_dir(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && statfs_type(root).ok() != Some(BPF_FS_MAGIC) {
        let src = CString::new("bpf").expect("static");
        let target = CString::new("/sys/fs/bpf").expect("static");
        // SAFETY: plain mount(2) with static NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Error::Io {
                what: "mounting bpffs at",
                path: root.into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: "creating pin directory",
        path: dir.into(),
        source,
    })?;
    match statfs_type(dir) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        Ok(_) => Err(Error::Pinned {
            path: dir.into(),
            reason: "not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)".into(),
        }),
        Err(source) => Err(Error::Io {
            what: "statfs",
            path: dir.into(),
            source,
        }),
    }
}

pub(crate) fn map_data<'a>(bpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData> {
    match bpf.map(name) {
        Some(
            Map::Array(d)
            | Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::PerCpuArray(d)
            | Map::RingBuf(d),
        ) => Ok(d),
        Some(_) | None => Err(Error::MissingMap { map: name }),
    }
}

/// CLOCK_MONOTONIC now, the clock of conntrack timestamps.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-param.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
