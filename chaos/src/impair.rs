//! Impaired links between the lab's LB nodes — loss and delay without
//! netem (this kernel has no netem, fq or etf). On every LB node's bridge
//! port (`pf<i>`, in the switch namespace) a tc program
//! (`datapath_ebpf::impair`) takes the frames from that node to another LB
//! node (both ends on the fabric, neither the router), drops a share of
//! them at random and redirects the rest into `dl0`, one end of a veth
//! pair whose other end `dl1` a [`DelayLine`] reads with a raw socket,
//! holds for the delay and sends back; `dl0` is a bridge port that neither
//! learns nor floods, so the frame then goes through the bridge to its
//! destination as if the wire were that long. Traffic to and from the
//! router (BGP, BFD, client flows) is not touched.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use datapath_ebpf::impair::{Impair, ImpairSpec, ImpairStats};
use netns::NetNs;

/// Frames held, in order; sent back on the same interface when due.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    pub delayed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl DelayLine {
    /// Start on interface `iface` of namespace `ns`.
    pub fn start(ns: &NetNs, iface: &str, delay: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let delayed = Arc::new(AtomicU64::new(0));
        let (s, d, name) = (stop.clone(), delayed.clone(), iface.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = ns.spawn(move || run(&name, delay, &s, &d, ready_tx));
        ready_rx
            .recv()
            .context("the delay line died while starting")??;
        Ok(Self {
            stop,
            delayed,
            thread: Some(thread),
        })
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    iface: &str,
    delay: Duration,
    stop: &AtomicBool,
    delayed: &AtomicU64,
    ready: std::sync::mpsc::Sender<Result<()>>,
) -> Result<()> {
    let fd = match open(iface) {
        Ok(fd) => {
            let _ = ready.send(Ok(()));
            fd
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            bail!("delay line on {iface} did not start");
        }
    };
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65_536];
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let wait_ms = queue
            .front()
            .map(|(due, _)| due.saturating_duration_since(Instant::now()).as_millis() as i32)
            .unwrap_or(10)
            .clamp(0, 10);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        loop {
            // SAFETY: sockaddr_ll is plain old data; zeroed is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buf and from are valid for their lengths.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n <= 0 {
                break;
            }
            // Our own sends show up as outgoing: not again.
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            queue.push_back((Instant::now() + delay, buf[..n as usize].to_vec()));
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, frame) = queue.pop_front().expect("checked");
            // SAFETY: frame is valid for its length; fd is bound to iface.
            let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
            if n >= 0 {
                delayed.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    // SAFETY: closing our socket.
    unsafe { libc::close(fd) };
    result
}

/// A raw socket bound to `iface` (every protocol).
fn open(iface: &str) -> Result<i32> {
    let c = std::ffi::CString::new(iface)?;
    // SAFETY: c is NUL-terminated.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {iface}");
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = idx as i32;
    // SAFETY: sll is a valid sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: closing our socket.
        unsafe { libc::close(fd) };
        bail!("binding the raw socket to {iface}: {e}");
    }
    let rcvbuf: i32 = 8 << 20;
    // SAFETY: a valid int option.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&rcvbuf as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

/// The impairment of every LB node's links to the others.
pub struct LinkImpairment {
    /// One program per LB node's bridge port.
    progs: Vec<Impair>,
    delay_line: DelayLine,
}

impl LinkImpairment {
    /// Impair the frames between the LB nodes on ports `ports` of the
    /// switch namespace `sw` (bridge `bridge`) as `spec` says (the fabric,
    /// the router's address that is left alone, the loss; its redirect is
    /// the delay line's), the rest delayed by `delay`.
    pub fn start(
        sw: &NetNs,
        bridge: &str,
        ports: &[String],
        spec: ImpairSpec,
        delay: Duration,
    ) -> Result<Self> {
        sw.ip("link add dl0 type veth peer name dl1")?;
        sw.ip(&format!("link set dl0 master {bridge}"))?;
        sw.exec(&[
            "bridge",
            "link",
            "set",
            "dev",
            "dl0",
            "learning",
            "off",
            "flood",
            "off",
            "mcast_flood",
            "off",
            "bcast_flood",
            "off",
        ])?;
        sw.ip("link set dl0 up")?;
        sw.ip("link set dl1 up")?;
        let _ = sw.exec(&["ethtool", "-K", "dl1", "gro", "off"]);
        let delay_line = DelayLine::start(sw, "dl1", delay)?;
        let redirect = sw.ifindex("dl0")?;
        let ports = ports.to_vec();
        let progs = sw.run(move || -> Result<Vec<Impair>> {
            ports
                .iter()
                .map(|p| {
                    Impair::attach(
                        p,
                        &ImpairSpec {
                            redirect_ifindex: redirect,
                            ..spec
                        },
                    )
                    .with_context(|| format!("impairing {p}"))
                })
                .collect()
        })??;
        Ok(Self { progs, delay_line })
    }

    /// Frames matched, dropped, redirected (summed over the ports), and
    /// frames the delay line sent on.
    pub fn stats(&self) -> Result<(ImpairStats, u64)> {
        let mut s = ImpairStats::default();
        for p in &self.progs {
            let x = p.stats()?;
            s.matched += x.matched;
            s.dropped += x.dropped;
            s.redirected += x.redirected;
        }
        Ok((s, self.delay_line.delayed.load(Ordering::Relaxed)))
    }
}
