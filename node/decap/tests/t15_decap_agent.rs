//! t15: the `holdfast-decap` binary (the worker-node DaemonSet's process), run
//! for real in a network namespace: an IPIP frame for a VIP in its `--vip`
//! CIDR reaches a UDP socket bound to the VIP with the client's address; an
//! IPIP frame for another address is not decapsulated (counted `not_vip`);
//! SIGTERM detaches it and prints its counters; bad arguments are refused
//! with a clear message before anything is loaded.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Stdio,
    time::{Duration, Instant},
};

use datapath_ebpf::packet::{ipip_frame, Packet};
use netns::{veth, NetNs};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast-decap");

/// Send one raw Ethernet frame out of `ifname` (in the calling thread's
/// namespace).
fn send_frame(ifindex: u32, frame: &[u8]) {
    // SAFETY: plain socket/sendto calls with a correctly sized sockaddr_ll
    // and a live buffer; the fd is owned and closed by OwnedFd.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn run_bad(args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .args(args)
        .output()
        .expect("run holdfast-decap");
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_arguments_are_refused_clearly() {
    assert!(run_bad(&["--vip", "10.0.0.1"]).contains("no --iface"));
    assert!(run_bad(&["--iface", "eth0"]).contains("no --vip"));
    assert!(run_bad(&["--iface", "eth0", "--vip", "not-an-ip"]).contains("not an IP"));
    assert!(run_bad(&["--iface", "eth0", "--vip", "10.0.0.0/8"]).contains("at most"));
    assert!(run_bad(&["--iface", "eth0", "--vip", "10.0.0.1/24"]).contains("host bits"));
    assert!(run_bad(&["--iface", "eth0", "--vip", "10.0.0.0/33"]).contains("prefix length"));
    assert!(run_bad(&["--iface", "eth0", "--vip", "10.0.0.1", "--mode", "x"]).contains("--mode"));
    assert!(run_bad(&["--bogus"]).contains("unknown argument"));
    assert!(run_bad(&["--iface"]).contains("needs a value"));
}

#[test]
fn decapsulates_vip_traffic_and_nothing_else() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates network namespaces and loads XDP: run as root"
    );
    let worker = NetNs::new("hfdw").expect("worker netns");
    let lb = NetNs::new("hfdl").expect("lb netns");
    veth(&worker, "w0", &lb, "l0").expect("veth");
    worker.ip("addr add 10.77.0.2/24 dev w0").expect("addr");
    lb.ip("addr add 10.77.0.1/24 dev l0").expect("addr");
    worker.ip("addr add 10.77.100.1/32 dev lo").expect("vip");
    for k in ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.w0.rp_filter"] {
        worker.sysctl(k, "0").expect("rp_filter");
    }
    let vip = Ipv4Addr::new(10, 77, 100, 1);
    let sock: UdpSocket = worker
        .run(move || UdpSocket::bind(SocketAddr::new(IpAddr::V4(vip), 5353)))
        .expect("run")
        .expect("bind the VIP");
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");

    let dir = tempfile::tempdir().expect("tempdir");
    let ready = dir.path().join("ready");
    let mut child = Reap(Some(
        worker
            .command(BIN)
            .expect("command")
            .args(["--iface", "w0", "--vip", "10.77.100.0/30", "--ready-file"])
            .arg(&ready)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast-decap"),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        if let Some(st) = child.get().try_wait().expect("wait") {
            let out = child.take().wait_with_output().expect("output");
            panic!(
                "holdfast-decap exited ({st}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "holdfast-decap never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let shown = worker.ip("-d link show w0").expect("link");
    assert!(
        shown.contains("holdfast_decap"),
        "no decap program on w0: {shown}"
    );

    let w_mac = worker.mac("w0").expect("mac");
    let l_mac = lb.mac("l0").expect("mac");
    let l_if = lb.ifindex("l0").expect("ifindex");
    let client: IpAddr = "10.99.0.7".parse().expect("ip");
    let backend: IpAddr = "10.77.0.2".parse().expect("ip");
    let frame = |dst: &str, payload: &[u8]| {
        let inner = Packet::udp("10.99.0.7", 40000, dst, 5353)
            .with_payload(payload.to_vec())
            .l3();
        ipip_frame(w_mac, l_mac, None, backend, client, 40000, 0, &inner)
    };
    // Not a VIP: must not come out decapsulated (and there is no socket).
    let other = frame("10.77.200.1", b"not-for-us");
    let vip_frame = frame("10.77.100.1", b"hello-dsr");
    lb.run(move || {
        send_frame(l_if, &other);
        send_frame(l_if, &vip_frame);
    })
    .expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("the decapsulated datagram never reached the VIP socket");
    assert_eq!(&buf[..n], b"hello-dsr");
    assert_eq!(from, "10.99.0.7:40000".parse::<SocketAddr>().expect("addr"));

    // SIGTERM: detach, print counters, remove the ready file.
    // SAFETY: kill with a valid pid of our child.
    unsafe {
        libc::kill(child.get().id() as i32, libc::SIGTERM);
    }
    let out = child.take().wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("counters as JSON on stdout");
    assert_eq!(stats["decapsulated"], 1, "{stats}");
    assert_eq!(stats["not_vip"], 1, "{stats}");
    assert_eq!(stats["malformed"], 0, "{stats}");
    assert!(!ready.exists(), "ready file left behind");
    let shown = worker.ip("-d link show w0").expect("link");
    assert!(!shown.contains("holdfast_decap"), "still attached: {shown}");
}

/// The agent process, killed if the test fails before it is stopped.
struct Reap(Option<std::process::Child>);

impl Reap {
    fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("child")
    }
    fn take(&mut self) -> std::process::Child {
        self.0.take().expect("child")
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
