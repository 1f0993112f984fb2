//! Small helpers shared by the three programs' loaders: loading an embedded
//! XDP object, and summing per-CPU counter arrays.

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode},
    Ebpf, Pod,
};

use crate::{
    abi::{DecapStats, Stats, SvcStats},
    error::{Error, Result},
};

/// Load `obj` and verify its XDP program `program` in the kernel.
pub(crate) fn load_xdp(obj: &[u8], object: &'static str, program: &'static str) -> Result<Ebpf> {
    let mut bpf = Ebpf::load(obj).map_err(|e| Error::Load {
        object,
        source: Box::new(e),
    })?;
    let prog = xdp_mut(&mut bpf, program)?;
    verify(program, || prog.load())?;
    Ok(bpf)
}

/// How often a load interrupted by a signal is tried.
const VERIFY_ATTEMPTS: u32 = 5;

/// Verify a program in the kernel (`load` is its aya `load`), trying again
/// when the verifier was interrupted: it gives up with EAGAIN when a signal
/// is pending for the loading thread (a child process exiting, a SIGTERM
/// being handled), as libbpf's loader knows and retries too. Any other
/// error, or EAGAIN `VERIFY_ATTEMPTS` times, is the error.
pub(crate) fn verify(
    program: &'static str,
    mut load: impl FnMut() -> std::result::Result<(), ProgramError>,
) -> Result<()> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < VERIFY_ATTEMPTS =>
            {
                attempt += 1;
            }
            r => return r.map_err(Error::program(program)),
        }
    }
}

pub(crate) fn xdp_mut<'a>(bpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut Xdp> {
    bpf.program_mut(program)
        .ok_or(Error::MissingMap { map: program })?
        .try_into()
        .map_err(Error::program(program))
}

pub(crate) fn xdp<'a>(bpf: &'a Ebpf, program: &'static str) -> &'a Xdp {
    match bpf.program(program) {
        Some(aya::programs::Program::Xdp(x)) => x,
        _ => unreachable!("{program} is an XDP program, checked at load"),
    }
}

/// Counter structs (`c: [u64; N]`) that can be summed over CPUs.
pub trait Counters: Pod + Default {
    fn add(&mut self, other: &Self);
}

macro_rules! counters_impl {
    ($($t:ty),+) => {$(
        impl Counters for $t {
            fn add(&mut self, other: &Self) {
                for (acc, v) in self.c.iter_mut().zip(other.c.iter()) {
                    *acc += v;
                }
            }
        }
    )+};
}
counters_impl!(Stats, SvcStats, DecapStats);

/// Entry `index` of the per-CPU array `name`, summed over CPUs.
pub(crate) fn percpu_sum<T: Counters>(bpf: &Ebpf, name: &'static str, index: u32) -> Result<T> {
    let arr: PerCpuArray<&MapData, T> =
        PerCpuArray::try_from(bpf.map(name).ok_or(Error::MissingMap { map: name })?)
            .map_err(Error::map(name))?;
    let per_cpu = arr.get(&index, 0).map_err(Error::map(name))?;
    let mut sum = T::default();
    for v in per_cpu.iter() {
        sum.add(v);
    }
    Ok(sum)
}

/// Index of interface `name` in the calling thread's network namespace.
/// The MAC address of `name` in the calling thread's network namespace
/// (SIOCGIFHWADDR: works where /sys belongs to another namespace).
pub(crate) fn if_mac(name: &str) -> Result<[u8; 6]> {
    let unknown = || Error::UnknownInterface { name: name.into() };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(unknown());
    }
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(unknown());
    }
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: fd is a socket and req a valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(unknown());
    }
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok(mac)
}

pub(crate) fn ifindex(name: &str) -> Result<u32> {
    let unknown = || Error::UnknownInterface { name: name.into() };
    let c = std::ffi::CString::new(name).map_err(|_| unknown())?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(unknown()),
        i => Ok(i),
    }
}

/// How the program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (fastest; veth, most NICs).
    Native,
    /// In the kernel's generic path (any interface).
    Generic,
}

impl AttachMode {
    pub(crate) fn xdp(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}
