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

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// One `BPF_MAP_LOOKUP_ELEM`: `Ok(None)` when the key is absent.
pub fn lookup_elem<K: Pod, V: Pod + Default>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..Default::default()
    };
    // SAFETY: attr points at a live key and a value buffer of the map's sizes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &mut attr as *mut ElemAttr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if ret == 0 {
        return Ok(Some(value));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e)
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

/// A `BPF_F_MMAPABLE` array map of `u32` values mapped into this process:
/// writing a Maglev table is a memcpy instead of a syscall that copies
/// every key and value from user space (the kernel stores array elements
/// 8 bytes apart, so element `i` is the `u32` at byte `8 * i`).
pub struct MmapU32Array {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    entries: u32,
}

// SAFETY: the mapping is plain shared memory owned by this value until
// Drop unmaps it; every access goes through atomics.
unsafe impl Send for MmapU32Array {}
// SAFETY: as above.
unsafe impl Sync for MmapU32Array {}

/// Array maps place their elements `round_up(value_size, 8)` bytes apart.
const U32_ELEM_STRIDE: usize = 8;

impl MmapU32Array {
    /// Map the whole array; fails (EINVAL/EPERM) unless the map was created
    /// with `BPF_F_MMAPABLE`.
    pub fn map(fd: BorrowedFd<'_>, entries: u32) -> io::Result<Self> {
        let len = (entries as usize * U32_ELEM_STRIDE).max(1);
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the length against the map's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Self { ptr, len, entries })
    }

    fn cell(&self, i: u32) -> &std::sync::atomic::AtomicU32 {
        assert!(i < self.entries, "element {i} of {}", self.entries);
        // SAFETY: i is in bounds, the offset is 8-byte aligned inside the
        // live mapping, and the kernel's BPF programs access the element
        // with ordinary aligned 32-bit loads.
        unsafe {
            std::sync::atomic::AtomicU32::from_ptr(
                self.ptr
                    .as_ptr()
                    .add(i as usize * U32_ELEM_STRIDE)
                    .cast::<u32>(),
            )
        }
    }

    /// Elements `base..base + len`.
    pub fn read(&self, base: u32, len: u32) -> Vec<u32> {
        (base..base + len)
            .map(|i| self.cell(i).load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Write `vals` at `base..`, touching only the elements that differ;
    /// returns how many did. The writes are released: a later syscall that
    /// publishes them (a service entry pointing here) is ordered after them.
    pub fn write_diff(&self, base: u32, vals: &[u32]) -> usize {
        use std::sync::atomic::Ordering;
        let mut n = 0;
        for (i, v) in vals.iter().enumerate() {
            let c = self.cell(base + i as u32);
            if c.load(Ordering::Relaxed) != *v {
                c.store(*v, Ordering::Relaxed);
                n += 1;
            }
        }
        std::sync::atomic::fence(Ordering::Release);
        n
    }
}

impl Drop for MmapU32Array {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `map`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Element 0 of a `BPF_F_MMAPABLE` array map of `u64`, memory-mapped: a
/// value BPF programs read with an ordinary aligned load.
pub struct MmapU64Cell {
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: shared memory owned by this value until Drop unmaps it; every
// access goes through an atomic.
unsafe impl Send for MmapU64Cell {}
// SAFETY: as above.
unsafe impl Sync for MmapU64Cell {}

impl MmapU64Cell {
    const LEN: usize = 8;

    pub fn map(fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the length against the map's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Self { ptr })
    }

    fn cell(&self) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: element 0 is 8-byte aligned at the start of the live
        // mapping; BPF programs read it with aligned 64-bit loads.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().cast::<u64>()) }
    }

    pub fn store(&self, v: u64) {
        self.cell().store(v, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn load(&self) -> u64 {
        self.cell().load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for MmapU64Cell {
    fn drop(&mut self) {
        // SAFETY: ptr/LEN are exactly the mapping made in `map`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), Self::LEN);
        }
    }
}
