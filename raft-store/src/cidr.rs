//! CIDR prefixes: parsing (the address must be the network address) and
//! membership.

use std::net::IpAddr;

/// "addr/len" split and checked: an address and a prefix length that fits
/// its family (host bits not looked at).
fn parse_parts(cidr: &str) -> Result<(IpAddr, u8), String> {
    let (a, l) = cidr
        .split_once('/')
        .ok_or_else(|| format!("{cidr:?} is not a CIDR (addr/len)"))?;
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IP address"))?;
    let len: u8 = l
        .parse()
        .map_err(|_| format!("{l:?} is not a prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} > {max}"));
    }
    Ok((addr, len))
}

/// Parse "addr/len"; the address must be the network address.
pub fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = parse_parts(cidr)?;
    if mask(addr, len) != addr {
        return Err(format!("{cidr} has host bits set"));
    }
    Ok((addr, len))
}

pub(crate) fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// Is `ip` inside `net`?
pub fn cidr_contains(net: (IpAddr, u8), ip: IpAddr) -> bool {
    net.0.is_ipv4() == ip.is_ipv4() && mask(ip, net.1) == mask(net.0, net.1)
}

/// "addr/len" with its host bits cleared (as Kubernetes reads
/// loadBalancerSourceRanges), or why it is no CIDR.
pub fn canonical_cidr(cidr: &str) -> Result<String, String> {
    let (addr, len) = parse_parts(cidr.trim())?;
    Ok(format!("{}/{len}", mask(addr, len)))
}
