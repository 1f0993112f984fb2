//! Frame builder for packet tests, the fuzz test and the benchmark: builds
//! whole Ethernet frames (optional 802.1Q tag, IPv4 with options and fragment
//! fields, IPv6, TCP/UDP/ICMP) with correct checksums, and the IPIP frames
//! the datapath is expected to emit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Layer 4 of a test packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (v4 or v6 by the packet's family): type, code, the 4 bytes after
    /// the checksum, then `body` (e.g. a quoted packet).
    Icmp {
        typ: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Any protocol number with raw bytes.
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

/// A test packet; [`Packet::frame`] renders it.
#[derive(Clone, Debug)]
pub struct Packet {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub tos: u8,
    pub ttl: u8,
    /// IPv4 options (padded to 4 bytes by the caller).
    pub ip_options: Vec<u8>,
    /// IPv4 flags+fragment offset field (host order), e.g. 0x2000 = MF.
    pub frag: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];

impl Packet {
    fn new(src: &str, dst: &str, l4: L4) -> Self {
        Self {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            src: src.parse().expect("test address"),
            dst: dst.parse().expect("test address"),
            tos: 0,
            ttl: 64,
            ip_options: Vec::new(),
            frag: 0,
            l4,
            payload: b"holdfast".to_vec(),
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    pub fn icmp(src: &str, dst: &str, typ: u8, code: u8, rest: [u8; 4], body: Vec<u8>) -> Self {
        let mut p = Self::new(
            src,
            dst,
            L4::Icmp {
                typ,
                code,
                rest,
                body,
            },
        );
        p.payload.clear();
        p
    }

    pub fn with_payload(mut self, payload: Vec<u8>) -> Self {
        self.payload = payload;
        self
    }

    pub fn with_vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    pub fn with_tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    /// L4 header + payload bytes with a correct checksum.
    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = Vec::with_capacity(20 + self.payload.len());
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&1000u32.to_be_bytes()); // seq
                h.extend_from_slice(&(if flags & TCP_ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
                h.push(5 << 4);
                h.push(*flags);
                h.extend_from_slice(&64240u16.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
                h.extend_from_slice(&self.payload);
                let c = l4_checksum(self.src, self.dst, 6, &h);
                h[16..18].copy_from_slice(&c.to_be_bytes());
                (6, h)
            }
            L4::Udp { sport, dport } => {
                let mut h = Vec::with_capacity(8 + self.payload.len());
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(&self.payload);
                let c = l4_checksum(self.src, self.dst, 17, &h);
                h[6..8].copy_from_slice(&c.to_be_bytes());
                (17, h)
            }
            L4::Icmp {
                typ,
                code,
                rest,
                body,
            } => {
                let v6 = self.src.is_ipv6();
                let mut h = vec![*typ, *code, 0, 0];
                h.extend_from_slice(rest);
                h.extend_from_slice(body);
                h.extend_from_slice(&self.payload);
                let c = if v6 {
                    l4_checksum(self.src, self.dst, 58, &h)
                } else {
                    checksum(&h)
                };
                h[2..4].copy_from_slice(&c.to_be_bytes());
                (if v6 { 58 } else { 1 }, h)
            }
            L4::Raw { proto, bytes } => (*proto, bytes.clone()),
        }
    }

    /// The IP packet (L3 header onwards).
    pub fn l3(&self) -> Vec<u8> {
        let (proto, l4) = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_header(
                s,
                d,
                proto,
                self.tos,
                self.ttl,
                self.frag,
                &self.ip_options,
                &l4,
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, proto, self.tos, self.ttl, &l4),
            _ => panic!("test packet with mixed address families"),
        }
    }

    /// The whole Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let ethertype = if self.src.is_ipv4() {
            ETH_P_IP
        } else {
            ETH_P_IPV6
        };
        let mut f = eth(self.dst_mac, self.src_mac, self.vlan, ethertype);
        f.extend_from_slice(&self.l3());
        f
    }
}

/// Ethernet header (with one 802.1Q tag if `vlan`).
pub fn eth(dst: Mac, src: Mac, vlan: Option<u16>, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(18);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(id) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&(id & 0x0FFF).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP/UDP/ICMPv6 checksum with the pseudo-header.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + l4.len());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.push(0);
            pseudo.push(proto);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    pseudo.extend_from_slice(l4);
    checksum(&pseudo)
}

/// An IPv4 packet: header (with options) + payload.
#[allow(clippy::too_many_arguments)]
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    tos: u8,
    ttl: u8,
    frag: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let hlen = 20 + options.len();
    assert!(
        hlen.is_multiple_of(4) && hlen <= 60,
        "bad IPv4 options length"
    );
    let mut h = Vec::with_capacity(hlen + payload.len());
    h.push(0x40 | (hlen / 4) as u8);
    h.push(tos);
    h.extend_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes()); // id
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(ttl);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let c = checksum(&h[..hlen]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet: fixed header + payload.
pub fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    tclass: u8,
    hop: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = Vec::with_capacity(40 + payload.len());
    let word = (6u32 << 28) | (u32::from(tclass) << 20);
    h.extend_from_slice(&word.to_be_bytes());
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(hop);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// Katran's outer IPv4 source for a client address and source port.
pub fn katran_src_v4(client: IpAddr, sport: u16) -> Ipv4Addr {
    let c = match client {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[0], o[1], o[2], o[3]]
        }
    };
    let p = sport.to_be_bytes();
    Ipv4Addr::new(172, 16, c[2] ^ p[0], c[3] ^ p[1])
}

/// Katran's outer IPv6 source: 100::/64 with the client's first 32 bits
/// XOR the source port (in network order) in the last 32 bits.
pub fn katran_src_v6(client: IpAddr, sport: u16) -> Ipv6Addr {
    let c = match client {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[0], o[1], o[2], o[3]]
        }
    };
    let p = sport.to_be_bytes();
    let mut o = [0u8; 16];
    o[0] = 0x01;
    o[12] = c[0] ^ p[0];
    o[13] = c[1] ^ p[1];
    o[14] = c[2];
    o[15] = c[3];
    Ipv6Addr::from(o)
}

#[allow(clippy::too_many_arguments)]
/// The frame the load balancer should emit for `inner` (an L3 packet from
/// `client`:`sport`) sent to `backend`: L2 (`vlan` kept) + outer header + inner.
pub fn ipip_frame(
    dst_mac: Mac,
    src_mac: Mac,
    vlan: Option<u16>,
    backend: IpAddr,
    client: IpAddr,
    sport: u16,
    tos: u8,
    inner: &[u8],
) -> Vec<u8> {
    let inner_v4 = (inner[0] >> 4) == 4;
    match backend {
        IpAddr::V4(b) => {
            let mut f = eth(dst_mac, src_mac, vlan, ETH_P_IP);
            f.extend_from_slice(&ipv4_header(
                katran_src_v4(client, sport),
                b,
                4,
                tos,
                64,
                0,
                &[],
                inner,
            ));
            f
        }
        IpAddr::V6(b) => {
            let mut f = eth(dst_mac, src_mac, vlan, ETH_P_IPV6);
            f.extend_from_slice(&ipv6_packet(
                katran_src_v6(client, sport),
                b,
                if inner_v4 { 4 } else { 41 },
                tos,
                64,
                inner,
            ));
            f
        }
    }
}
