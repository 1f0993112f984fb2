//! Batched map operations (BPF_MAP_*_BATCH, Linux 5.6+), which aya 0.14 does
//! not wrap: one syscall writes a whole Maglev table or a batch of conntrack
//! entries instead of one syscall per entry.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn sys_bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the given size
    // whose pointers reference live buffers sized for `count` elements.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Write `keys[i] -> values[i]` for every i. Returns how many were written
/// (all of them on success; the kernel stops at the first failing element).
pub fn update_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    elem_flags: u64,
) -> io::Result<usize> {
    assert_eq!(keys.len(), values.len(), "keys and values differ in length");
    if keys.is_empty() {
        return Ok(0);
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags,
        ..Default::default()
    };
    sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    Ok(attr.count as usize)
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// `union bpf_attr` for element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One `BPF_MAP_UPDATE_ELEM` (batch updates accept no element flags but
/// `BPF_F_LOCK`, so "insert if absent" must go element by element).
pub fn update_elem<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags,
        ..Default::default()
    };
    // SAFETY: attr points at a live key and value of the map's sizes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            &mut attr as *mut ElemAttr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Delete `keys`. Keys that are absent make the kernel stop with ENOENT; the
/// call then deletes the rest one by one and counts only those that existed.
pub fn delete_batch<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut done = 0usize;
    let mut rest = keys;
    let mut deleted = 0usize;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: u32::try_from(rest.len())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        match sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => {
                deleted += attr.count as usize;
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // attr.count elements were deleted; the next one is absent: skip it.
                let n = attr.count as usize;
                deleted += n;
                done += n + 1;
                rest = &keys[done.min(keys.len())..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Read the whole map in chunks of `chunk` entries.
pub fn lookup_all<K: Pod + Default, V: Pod + Default>(
    fd: BorrowedFd<'_>,
    chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // Hash maps use a u32 bucket cursor; 8 bytes covers every map type.
    let mut cursor = [0u64; 1];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: cursor.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match res {
            Ok(()) => first = false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                // A bucket holds more entries than the chunk: grow and retry.
                let bigger = keys.len() * 2;
                keys.resize(bigger, K::default());
                values.resize(bigger, V::default());
            }
            Err(e) => return Err(e),
        }
    }
}
