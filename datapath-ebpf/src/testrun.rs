//! BPF_PROG_TEST_RUN for XDP programs: the packet tests, the fuzz test and
//! the benchmark all run frames through the real, verified program with it.

use std::time::Duration;

use std::{
    mem::size_of,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{programs::Xdp, Ebpf};

use crate::{
    error::{Error, Result},
    prog::{load_xdp, xdp, xdp_mut},
};

pub(crate) static NOP_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nop.bpf.o"));
pub const NOP_PROGRAM: &str = "holdfast_nop";

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "ABORTED",
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        XDP_TX => "TX",
        XDP_REDIRECT => "REDIRECT",
        _ => "UNKNOWN",
    }
}

/// Outcome of one test run.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub verdict: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// The kernel's measured time per repetition.
    pub duration: Duration,
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it in ctx_in.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// `union bpf_attr`'s `test` member.
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Run `frame` through `prog` once, as if received on `ifindex` (in the
/// calling thread's network namespace; 0 for none, which makes
/// bpf_fib_lookup fail).
pub fn run(prog: &Xdp, frame: &[u8], ifindex: u32) -> Result<RunResult> {
    let fd = prog.fd().map_err(Error::program("test_run"))?;
    run_fd(fd.as_fd(), frame, ifindex)
}

/// [`run`] on a program file descriptor (usable from any thread).
pub fn run_fd(prog: BorrowedFd<'_>, frame: &[u8], ifindex: u32) -> Result<RunResult> {
    if frame.len() < 14 {
        return Err(Error::invalid(
            "frame",
            "BPF_PROG_TEST_RUN needs at least an Ethernet header (14 bytes)",
        ));
    }
    let mut out = vec![0u8; frame.len() + 512];
    let (verdict, len, duration) = run_raw(prog, frame, &mut out, ifindex)?;
    out.truncate(len);
    Ok(RunResult {
        verdict,
        frame: out,
        duration,
    })
}

/// One BPF_PROG_TEST_RUN of `prog` on `data` (at least 14 bytes), the
/// packet as the program left it written to `out`: its verdict, the
/// packet's length and the kernel's measured time.
pub(crate) fn run_raw(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out: &mut [u8],
    ifindex: u32,
) -> Result<(u32, usize, Duration)> {
    let ctx = XdpMd {
        data: 0,
        data_end: data.len() as u32,
        ingress_ifindex: ifindex,
        ..Default::default()
    };
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    if ifindex != 0 {
        attr.ctx_in = (&ctx as *const XdpMd) as u64;
        attr.ctx_size_in = size_of::<XdpMd>() as u32;
    }
    // SAFETY: attr is a valid bpf_attr prefix whose pointers reference live
    // buffers of the sizes given; the kernel writes at most data_size_out bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestAttr,
            size_of::<TestAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(Error::Syscall {
            call: "BPF_PROG_TEST_RUN",
            map: "(program)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok((
        attr.retval,
        (attr.data_size_out as usize).min(out.len()),
        Duration::from_nanos(u64::from(attr.duration)),
    ))
}

/// A loaded trivial XDP program: the benchmark's baseline, and the program
/// the lab attaches to veth peers so XDP_TX into them has a NAPI context.
pub struct Nop {
    bpf: Ebpf,
    links: Vec<aya::programs::xdp::XdpLink>,
}

impl Nop {
    pub fn load() -> Result<Self> {
        Ok(Self {
            bpf: load_xdp(NOP_OBJ, "nop.bpf.o", NOP_PROGRAM)?,
            links: Vec::new(),
        })
    }

    pub fn program(&self) -> &Xdp {
        xdp(&self.bpf, NOP_PROGRAM)
    }

    /// Attach (native) to an interface index of the calling thread's namespace.
    pub fn attach(&mut self, ifindex: u32) -> Result<()> {
        let prog = xdp_mut(&mut self.bpf, NOP_PROGRAM)?;
        let id = prog
            .attach_to_if_index(ifindex, aya::programs::XdpMode::Driver)
            .map_err(Error::program(NOP_PROGRAM))?;
        self.links
            .push(prog.take_link(id).map_err(Error::program(NOP_PROGRAM))?);
        Ok(())
    }
}
