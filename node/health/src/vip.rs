//! Checks through the VIP path (`via = "vip"`): the check packet is
//! addressed to the VIP and sent to the backend encapsulated the way the
//! datapath sends client packets (IPIP for IPv4, IPv6-in-IPv6 for IPv6),
//! from this node's own address. The backend's decap agent must strip the
//! outer header and its server must listen on the VIP, and its answer
//! comes back from the VIP straight to this node (DSR) — so a pass proves
//! the decap agent, the VIP on the backend's loopback and the server, which
//! a direct check to the backend's address does not.
//!
//! UDP and DNS checks receive the answer on an ordinary UDP socket; a TCP
//! check sends a SYN and waits for the SYN-ACK on a raw TCP socket (this
//! node's kernel answers it with a reset, as for any unexpected SYN-ACK).
//! Raw sockets need CAP_NET_RAW. Blocking calls: run on the blocking pool.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

const IPPROTO_IPIP: i32 = 4;
const IPPROTO_IPV6: i32 = 41;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What to send through the VIP path.
pub enum Probe<'a> {
    /// A SYN; passes on the SYN-ACK.
    TcpSyn,
    /// A datagram; the answer (from VIP:port) is returned.
    Udp(&'a [u8]),
}

/// Send `probe` to `vip:port` through backend `backend`; the UDP answer's
/// bytes (empty for TCP) or why it failed.
pub fn exchange(
    probe: Probe<'_>,
    backend: IpAddr,
    vip: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    if backend.is_ipv4() != vip.is_ipv4() {
        return Err(format!("backend {backend} and VIP {vip} differ in family"));
    }
    let deadline = Instant::now() + timeout;
    let local = source_towards(backend)?;
    match probe {
        Probe::Udp(payload) => {
            let sock = UdpSocket::bind((local, 0)).map_err(|e| format!("UDP socket: {e}"))?;
            let sport = sock
                .local_addr()
                .map_err(|e| format!("UDP socket: {e}"))?
                .port();
            let l4 = udp_segment(local, vip, sport, port, payload);
            send_encapsulated(local, backend, vip, IPPROTO_UDP, &l4)?;
            let mut buf = vec![0u8; 4096];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "no answer from {vip}:{port} through {backend} in time"
                    ));
                }
                sock.set_read_timeout(Some(left))
                    .map_err(|e| format!("UDP socket: {e}"))?;
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) if from == SocketAddr::new(vip, port) => {
                        buf.truncate(n);
                        return Ok(buf);
                    }
                    Ok(_) => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Err(format!(
                            "no answer from {vip}:{port} through {backend} in time"
                        ))
                    }
                    Err(e) => return Err(format!("UDP receive: {e}")),
                }
            }
        }
        Probe::TcpSyn => {
            // Hold the source port while the probe runs, so no connection
            // of this host uses it.
            let hold =
                std::net::TcpListener::bind((local, 0)).map_err(|e| format!("TCP socket: {e}"))?;
            let sport = hold
                .local_addr()
                .map_err(|e| format!("TCP socket: {e}"))?
                .port();
            let rx = RawFd::open(
                if vip.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                },
                i32::from(IPPROTO_TCP),
            )?;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default();
            let seq = nanos ^ (u32::from(sport) << 16);
            let l4 = tcp_syn(local, vip, sport, port, seq);
            send_encapsulated(local, backend, vip, IPPROTO_TCP, &l4)?;
            let mut buf = vec![0u8; 2048];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "no SYN-ACK from {vip}:{port} through {backend} in time"
                    ));
                }
                let Some((n, from)) = rx.recv(&mut buf, left)? else {
                    return Err(format!(
                        "no SYN-ACK from {vip}:{port} through {backend} in time"
                    ));
                };
                if from != vip {
                    continue;
                }
                // IPv4 raw sockets hand the IP header too; IPv6 ones do not.
                let off = if vip.is_ipv4() {
                    usize::from(buf.first().map(|b| b & 0x0f).unwrap_or(5)) * 4
                } else {
                    0
                };
                let Some(t) = buf.get(off..n).filter(|t| t.len() >= 20) else {
                    continue;
                };
                let (sp, dp) = (
                    u16::from_be_bytes([t[0], t[1]]),
                    u16::from_be_bytes([t[2], t[3]]),
                );
                if sp != port || dp != sport {
                    continue;
                }
                let flags = t[13];
                if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                    return Ok(Vec::new());
                }
                if flags & TCP_RST != 0 {
                    return Err(format!(
                        "reset by {vip}:{port} through {backend}: nothing listens on the VIP"
                    ));
                }
            }
        }
    }
}

/// This node's address on the route to `to`.
fn source_towards(to: IpAddr) -> Result<IpAddr, String> {
    let any: SocketAddr = match to {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).map_err(|e| format!("UDP socket: {e}"))?;
    s.connect((to, 9))
        .map_err(|e| format!("no route to {to}: {e}"))?;
    Ok(s.local_addr().map_err(|e| format!("UDP socket: {e}"))?.ip())
}

/// An inner packet `local → vip` carrying `l4`, sent to `backend` in an
/// outer IPIP (IPv4) or IPv6-in-IPv6 header that the kernel adds.
fn send_encapsulated(
    local: IpAddr,
    backend: IpAddr,
    vip: IpAddr,
    proto: u8,
    l4: &[u8],
) -> Result<(), String> {
    let (family, outer, inner) = match (local, vip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            h[6] = 0x40; // DF
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = checksum(&[&h]);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(l4);
            (libc::AF_INET, IPPROTO_IPIP, h)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            h.extend_from_slice(l4);
            (libc::AF_INET6, IPPROTO_IPV6, h)
        }
        _ => return Err("address families differ".into()),
    };
    let tx = RawFd::open(family, outer)?;
    tx.send_to(&inner, backend)
}

/// Sum for the Internet checksum over `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for p in parts {
        for &b in *p {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => {}
    }
    p
}

fn udp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut c = checksum(&[&pseudo_header(src, dst, IPPROTO_UDP, len), &u]);
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

fn tcp_syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    let mut t = vec![0u8; 24];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 6 << 4; // 24-byte header: one option
    t[13] = TCP_SYN;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // MSS option: 1400 leaves room for the encapsulation on the way in.
    t[20..24].copy_from_slice(&[2, 4, 0x05, 0x78]);
    let c = checksum(&[&pseudo_header(src, dst, IPPROTO_TCP, t.len()), &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A raw socket, closed on drop.
struct RawFd(i32);

impl RawFd {
    fn open(family: i32, proto: i32) -> Result<Self, String> {
        // SAFETY: plain socket(2); the descriptor is owned by the result.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(format!(
                "raw socket (protocol {proto}): {} (checks through the VIP need CAP_NET_RAW)",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self(fd))
    }

    fn send_to(&self, data: &[u8], to: IpAddr) -> Result<(), String> {
        let (sa, len) = sockaddr(to);
        // SAFETY: `sa` is a valid sockaddr of `len` bytes; `data` is readable.
        let n = unsafe {
            libc::sendto(
                self.0,
                data.as_ptr().cast(),
                data.len(),
                0,
                (&sa as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if n < 0 {
            return Err(format!(
                "sending the encapsulated check to {to}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// One packet and its source address, or None at the timeout.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<Option<(usize, IpAddr)>, String> {
        let mut pfd = libc::pollfd {
            fd: self.0,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        if r == 0 {
            return Ok(None);
        }
        // SAFETY: zeroed sockaddr_storage is a valid out-parameter.
        let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `buf` is writable for its length; `sa`/`len` as above.
        let n = unsafe {
            libc::recvfrom(
                self.0,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut sa as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(Some((0, IpAddr::from([0, 0, 0, 0]))));
            }
            return Err(format!("raw receive: {e}"));
        }
        Ok(Some((n as usize, from_sockaddr(&sa))))
    }
}

impl Drop for RawFd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn sockaddr(ip: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; filled in below.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match ip {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> IpAddr {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            IpAddr::from(sin6.sin6_addr.s6_addr)
        }
        _ => IpAddr::from([0, 0, 0, 0]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let (s, d): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.200.0.1".parse().unwrap());
        let u = udp_segment(s, d, 40000, 53, b"hello");
        // A correct checksum sums (with the pseudo header) to 0.
        assert_eq!(
            checksum(&[&pseudo_header(s, d, IPPROTO_UDP, u.len()), &u]),
            0
        );
        let t = tcp_syn(s, d, 40000, 80, 7);
        assert_eq!(
            checksum(&[&pseudo_header(s, d, IPPROTO_TCP, t.len()), &t]),
            0
        );
        let (s6, d6): (IpAddr, IpAddr) =
            ("fd00::1".parse().unwrap(), "fd00:200::1".parse().unwrap());
        let u = udp_segment(s6, d6, 1, 2, b"odd");
        assert_eq!(
            checksum(&[&pseudo_header(s6, d6, IPPROTO_UDP, u.len()), &u]),
            0
        );
    }
}
