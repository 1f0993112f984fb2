//! The datapath lab: one LB node in front of N backends on a shared L2
//! segment, every host its own network namespace.
//!
//! ```text
//!  client (10.77.0.100, fd77::100)            VIPs 10.77.100.1, fd77:100::1
//!     |  route VIPs via 10.77.0.2
//!  [ bridge br0 in namespace "sw" ] ----- lb (10.77.0.2): holdfast_lb XDP on l0
//!     |            |                         (XDP_TX back onto the segment, IPIP)
//!   be1 ...      beN (10.77.0.1N): holdfast_decap XDP on b0, VIPs on lo,
//!                 TCP echo on :8007 and UDP request/response on :5353,
//!                 answering the client directly (DSR)
//! ```
//!
//! Sockets are made on threads inside the namespaces and then used from any
//! thread. Everything is removed when the lab drops, also on panic.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use datapath_ebpf::{
    decap::Decap, testrun::Nop, AttachMode, BackendSpec, BackendState, Datapath, DatapathConfig,
    DatapathOptions, Proto, ServiceSpec,
};
use netns::{veth, NetNs};

pub const VIP4: &str = "10.77.100.1";
pub const VIP6: &str = "fd77:100::1";
pub const TCP_PORT: u16 = 8007;
pub const UDP_PORT: u16 = 5353;
pub const CLIENT4: &str = "10.77.0.100";
pub const CLIENT6: &str = "fd77::100";
pub const LB_IF: &str = "l0";

pub fn backend_v4(i: usize) -> IpAddr {
    format!("10.77.0.{}", 10 + i).parse().expect("static")
}

pub fn backend_v6(i: usize) -> IpAddr {
    format!("fd77::{}", 10 + i).parse().expect("static")
}

/// Backend id of the IPv4 / IPv6 address of backend `i` (1-based).
pub fn backend_id(i: usize, v6: bool) -> u32 {
    if v6 {
        100 + i as u32
    } else {
        i as u32
    }
}

pub struct DpLab {
    pub datapath: Option<Datapath>,
    decaps: Vec<Decap>,
    _nop: Nop,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    pub backends: Vec<NetNs>,
    pub lb: NetNs,
    pub client: NetNs,
    pub sw: NetNs,
    pub pin_dir: Option<PathBuf>,
}

/// The config of the lab's four services with backends `active` (1-based).
pub fn lab_config(epoch: u64, n_backends: usize, draining: &[usize]) -> DatapathConfig {
    let mut services = Vec::new();
    for (vip, v6) in [(VIP4, false), (VIP6, true)] {
        for (port, proto) in [(TCP_PORT, Proto::Tcp), (UDP_PORT, Proto::Udp)] {
            let backends = (1..=n_backends)
                .map(|i| BackendSpec {
                    // Each (service, backend) pair has its own cluster-wide id.
                    id: backend_id(i, v6) + if proto == Proto::Udp { 1000 } else { 0 },
                    addr: if v6 { backend_v6(i) } else { backend_v4(i) },
                    weight: 1,
                    state: if draining.contains(&i) {
                        BackendState::Draining
                    } else {
                        BackendState::Active
                    },
                    port: 0,
                })
                .collect();
            services.push(ServiceSpec {
                source_ranges: Vec::new(),
                affinity_timeout_s: None,
                vip: vip.parse().expect("static"),
                port,
                proto,
                table_size: 251,
                backends,
                forwarding: Default::default(),
            });
        }
    }
    DatapathConfig {
        epoch,
        services,
        snat: Default::default(),
    }
}

pub fn lab_options(pin_dir: Option<PathBuf>) -> DatapathOptions {
    DatapathOptions {
        max_services: 16,
        max_backends: 4096,
        max_table_size: 251,
        conntrack_size: 65_536,
        ring_bytes: 1 << 20,
        node_id: 1,
        pin_dir,
        ..Default::default()
    }
}

impl DpLab {
    /// Build the namespaces, servers and decap programs; the load balancer is
    /// started separately ([`DpLab::start_datapath`]) so tests can restart it.
    pub fn up(prefix: &str, n_backends: usize) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, BPF)");
        }
        let sw = NetNs::new(&format!("{prefix}sw"))?;
        let client = NetNs::new(&format!("{prefix}cl"))?;
        let lb = NetNs::new(&format!("{prefix}lb"))?;
        sw.ip("link add br0 type bridge")?;
        sw.ip("link set br0 up")?;
        for ns in [&client, &lb] {
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        veth(&client, "c0", &sw, "pc0")?;
        veth(&lb, LB_IF, &sw, "pl0")?;
        sw.ip("link set pc0 master br0")?;
        sw.ip("link set pl0 master br0")?;
        // A real NIC computes checksums on transmit; a veth leaves them to
        // the receiver (CHECKSUM_PARTIAL), metadata that is lost when the
        // frame passes through XDP. So the client computes them in software.
        client.exec(&["ethtool", "-K", "c0", "tx", "off"])?;
        client.ip(&format!("addr add {CLIENT4}/24 dev c0"))?;
        client.ip(&format!("addr add {CLIENT6}/64 dev c0 nodad"))?;
        client.ip("route add 10.77.100.0/24 via 10.77.0.2")?;
        client.ip("route add fd77:100::/64 via fd77::2")?;
        lb.ip(&format!("addr add 10.77.0.2/24 dev {LB_IF}"))?;
        lb.ip(&format!("addr add fd77::2/64 dev {LB_IF} nodad"))?;
        // Unresolved next hops are forwarded by the kernel (encapsulated).
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        lb.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        lb.sysctl(&format!("net.ipv4.conf.{LB_IF}.rp_filter"), "0")?;
        lb.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        lb.sysctl(&format!("net.ipv4.conf.{LB_IF}.send_redirects"), "0")?;

        // XDP_TX on l0 hands frames to pl0: give pl0 an XDP program (NAPI).
        let pl0 = sw.ifindex("pl0")?;
        let nop = sw.run(move || -> Result<Nop> {
            let mut nop = Nop::load()?;
            nop.attach(pl0)?;
            Ok(nop)
        })??;

        let stop = Arc::new(AtomicBool::new(false));
        let mut backends = Vec::new();
        let mut decaps = Vec::new();
        let mut servers = Vec::new();
        for i in 1..=n_backends {
            let be = NetNs::new(&format!("{prefix}b{i}"))?;
            be.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            be.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            be.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            veth(&be, "b0", &sw, &format!("pb{i}"))?;
            sw.ip(&format!("link set pb{i} master br0"))?;
            be.ip(&format!("addr add {}/24 dev b0", backend_v4(i)))?;
            be.ip(&format!("addr add {}/64 dev b0 nodad", backend_v6(i)))?;
            be.ip(&format!("addr add {VIP4}/32 dev lo"))?;
            be.ip(&format!("addr add {VIP6}/128 dev lo nodad"))?;
            be.sysctl("net.ipv4.conf.b0.rp_filter", "0")?;
            let decap = be.run(|| -> Result<Decap> {
                let mut d = Decap::load()?;
                d.add_vip(VIP4.parse()?)?;
                d.add_vip(VIP6.parse()?)?;
                d.attach("b0", AttachMode::Native)?;
                Ok(d)
            })??;
            decaps.push(decap);
            servers.extend(start_servers(&be, i, stop.clone())?);
            backends.push(be);
        }
        Ok(Self {
            datapath: None,
            decaps,
            _nop: nop,
            stop,
            servers,
            backends,
            lb,
            client,
            sw,
            pin_dir: None,
        })
    }

    /// Load (or adopt from `pin_dir`), attach to l0 natively and apply `cfg`.
    pub fn start_datapath(&mut self, opts: DatapathOptions, cfg: DatapathConfig) -> Result<()> {
        self.start_datapath_mode(opts, cfg, AttachMode::Native)
    }

    pub fn start_datapath_mode(
        &mut self,
        opts: DatapathOptions,
        cfg: DatapathConfig,
        mode: AttachMode,
    ) -> Result<()> {
        self.pin_dir = opts.pin_dir.clone();
        let dp = self.lb.run(move || -> Result<Datapath> {
            let mut dp = Datapath::load(opts)?;
            dp.attach(LB_IF, mode)?;
            dp.apply(&cfg)?;
            Ok(dp)
        })??;
        self.datapath = Some(dp);
        Ok(())
    }

    /// Simulate the agent exiting: drop the datapath without tearing it
    /// down. With a pin dir the program stays attached and the maps stay.
    pub fn kill_agent(&mut self) {
        drop(self.datapath.take());
    }

    /// The id of the XDP program attached to l0, if any.
    pub fn attached_prog_id(&self) -> Result<Option<u32>> {
        let out = self.lb.ip(&format!("-d link show {LB_IF}"))?;
        Ok(out
            .split("prog/xdp id ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|id| id.parse().ok()))
    }

    pub fn dp(&mut self) -> Result<&mut Datapath> {
        self.datapath
            .as_mut()
            .ok_or_else(|| anyhow!("datapath not started"))
    }

    /// Decap counters of backend `i` (1-based).
    pub fn decap_ok(&self, i: usize) -> Result<u64> {
        Ok(self.decaps[i - 1].stats()?.c[datapath_ebpf::abi::decap_stat::OK])
    }

    /// Open `n` TCP connections from the client to the VIP.
    pub fn tcp_connect(&self, n: usize, v6: bool) -> Result<Vec<TcpConn>> {
        let vip: IpAddr = if v6 { VIP6 } else { VIP4 }.parse()?;
        self.client.run(move || -> Result<Vec<TcpConn>> {
            (0..n)
                .map(|_| {
                    let s = TcpStream::connect_timeout(
                        &SocketAddr::new(vip, TCP_PORT),
                        Duration::from_secs(3),
                    )
                    .context("connecting to the VIP")?;
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    s.set_nodelay(true)?;
                    Ok(TcpConn {
                        reader: BufReader::new(s.try_clone()?),
                        stream: s,
                    })
                })
                .collect()
        })?
    }

    /// A UDP socket of the client (bound to an ephemeral port).
    pub fn udp_socket(&self, v6: bool) -> Result<UdpFlow> {
        self.client.run(move || -> Result<UdpFlow> {
            let sock = UdpSocket::bind(if v6 { "[fd77::100]:0" } else { "10.77.0.100:0" })?;
            sock.set_read_timeout(Some(Duration::from_millis(1500)))?;
            let vip: IpAddr = if v6 { VIP6 } else { VIP4 }.parse()?;
            Ok(UdpFlow {
                sock,
                to: SocketAddr::new(vip, UDP_PORT),
            })
        })?
    }
}

impl Drop for DpLab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
        // A datapath with a pin dir leaves its pins unless torn down: tear
        // them down here so nothing outlives the lab.
        if let Some(dp) = self.datapath.take() {
            let _ = dp.teardown();
        }
        if let Some(dir) = &self.pin_dir {
            let _ = datapath_ebpf::loader::remove_pins(dir);
        }
    }
}

/// A client TCP connection; each exchange sends a line and reads the echo.
pub struct TcpConn {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpConn {
    pub fn local(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Send `msg`, return the index of the backend that echoed it.
    pub fn exchange(&mut self, msg: &str) -> Result<usize> {
        self.stream.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        parse_reply(&line, msg)
    }
}

/// A client UDP flow to the VIP.
pub struct UdpFlow {
    pub sock: UdpSocket,
    to: SocketAddr,
}

impl UdpFlow {
    pub fn local(&self) -> Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }

    /// One request/response; returns the answering backend's index.
    pub fn exchange(&self, msg: &str) -> Result<usize> {
        self.sock.send_to(msg.as_bytes(), self.to)?;
        let mut buf = [0u8; 1500];
        let (n, from) = self.sock.recv_from(&mut buf).context("no UDP answer")?;
        if from != self.to {
            bail!("answer from {from}, not from the VIP {}", self.to);
        }
        parse_reply(&String::from_utf8_lossy(&buf[..n]), msg)
    }
}

fn parse_reply(line: &str, msg: &str) -> Result<usize> {
    let line = line.trim_end();
    let (who, echoed) = line
        .split_once(' ')
        .ok_or_else(|| anyhow!("malformed reply {line:?}"))?;
    if echoed != msg {
        bail!("wrong answer: sent {msg:?}, got {echoed:?}");
    }
    who.strip_prefix("be")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("reply without backend name: {line:?}"))
}

fn start_servers(be: &NetNs, i: usize, stop: Arc<AtomicBool>) -> Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::new();
    for vip in [VIP4, VIP6] {
        let addr = SocketAddr::new(vip.parse()?, TCP_PORT);
        let listener = be.run(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let stop2 = stop.clone();
        handles.push(std::thread::spawn(move || tcp_echo(listener, i, stop2)));
        let uaddr = SocketAddr::new(vip.parse()?, UDP_PORT);
        let sock = be.run(move || UdpSocket::bind(uaddr))??;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop3 = stop.clone();
        handles.push(std::thread::spawn(move || udp_answer(sock, i, stop3)));
    }
    Ok(handles)
}

fn tcp_echo(listener: TcpListener, i: usize, stop: Arc<AtomicBool>) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                let stop = stop.clone();
                conns.push(std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut w = match s.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    let mut r = BufReader::new(s);
                    let mut line = String::new();
                    while !stop.load(Ordering::Relaxed) {
                        match r.read_line(&mut line) {
                            Ok(0) => return,
                            Ok(_) if line.ends_with('\n') => {
                                if w.write_all(format!("be{i} {line}").as_bytes()).is_err() {
                                    return;
                                }
                                line.clear();
                            }
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return,
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn udp_answer(sock: UdpSocket, i: usize, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let reply = format!("be{i} {}", String::from_utf8_lossy(&buf[..n]));
            let _ = sock.send_to(reply.as_bytes(), from);
        }
    }
}
