//! Programming the SNAT maps: every node's SNAT addresses by slot
//! (`lb_snat_addrs`), this node's slot (`lb_snat_own`) and the filter of
//! SNAT address hashes (`lb_snat_filter`) that sends a packet to a SNAT
//! address down the reply path (`bpf/snat.h`). A SNAT address is also in
//! the VIP prefilter and in `lb_vips` (flagged), which the loader writes
//! with the VIPs.

use std::collections::BTreeMap;

use aya::maps::{Array, MapData};

use crate::{
    abi::{addr_bytes, vip_filter_bit, SnatAddr, SvcKey, SNAT_F_V4, SNAT_F_V6, SNAT_SLOTS},
    config::SnatConfig,
    error::{Error, Result},
    maps::{M_SNAT_ADDRS, M_SNAT_FILTER, M_SNAT_OWN},
};

const VIP_FILTER_WORDS_USIZE: usize = crate::abi::VIP_FILTER_WORDS as usize;

/// What the SNAT maps hold, as this process wrote or read them.
#[derive(Debug, Default)]
pub(crate) struct SnatState {
    slots: BTreeMap<u32, SnatAddr>,
    own: u32,
    filter: Vec<u64>,
    keys: Vec<SvcKey>,
}

impl SnatState {
    /// The SNAT addresses, as VIP-only service keys (for the prefilter).
    pub(crate) fn keys(&self) -> &[SvcKey] {
        &self.keys
    }
}

/// Every SNAT address of the config as a VIP-only service key.
pub(crate) fn snat_keys(cfg: &SnatConfig) -> Vec<SvcKey> {
    cfg.addrs()
        .map(|(_, a)| SvcKey::new(a, 0, 0).vip_only())
        .collect()
}

fn slot_value(s: &crate::config::SnatSlot) -> SnatAddr {
    let mut v = SnatAddr::default();
    if let Some(a) = s.v4 {
        v.v4[..4].copy_from_slice(&a.octets());
        v.flags |= SNAT_F_V4;
    }
    if let Some(a) = s.v6 {
        v.v6 = a.octets();
        v.flags |= SNAT_F_V6;
    }
    v
}

fn v4_of(b: &[u8; 16]) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn filter_words(keys: &[SvcKey]) -> Vec<u64> {
    let mut words = vec![0u64; VIP_FILTER_WORDS_USIZE];
    for k in keys {
        let (w, b) = vip_filter_bit(&k.addr, k.family);
        words[w as usize] |= 1 << b;
    }
    words
}

fn array<'a, V: aya::Pod>(
    bpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<Array<&'a mut MapData, V>> {
    Array::try_from(bpf.map_mut(name).ok_or(Error::MissingMap { map: name })?)
        .map_err(Error::map(name))
}

impl SnatState {
    /// Read what the (adopted) SNAT maps hold.
    pub(crate) fn recover(bpf: &mut aya::Ebpf) -> Result<Self> {
        let addrs: Array<&mut MapData, SnatAddr> = array(bpf, M_SNAT_ADDRS)?;
        let mut slots = BTreeMap::new();
        for i in 0..SNAT_SLOTS {
            let v = addrs.get(&i, 0).map_err(Error::map(M_SNAT_ADDRS))?;
            if v.flags != 0 {
                slots.insert(i, v);
            }
        }
        let own: Array<&mut MapData, u32> = array(bpf, M_SNAT_OWN)?;
        let own = own.get(&0, 0).map_err(Error::map(M_SNAT_OWN))?;
        let filter: Array<&mut MapData, u64> = array(bpf, M_SNAT_FILTER)?;
        let filter = (0..VIP_FILTER_WORDS_USIZE as u32)
            .map(|i| filter.get(&i, 0).map_err(Error::map(M_SNAT_FILTER)))
            .collect::<Result<Vec<u64>>>()?;
        let mut keys = Vec::new();
        for v in slots.values() {
            if v.flags & SNAT_F_V4 != 0 {
                keys.push(SvcKey::new(v4_of(&v.v4).into(), 0, 0).vip_only());
            }
            if v.flags & SNAT_F_V6 != 0 {
                keys.push(SvcKey::new(std::net::Ipv6Addr::from(v.v6).into(), 0, 0).vip_only());
            }
        }
        Ok(SnatState {
            slots,
            own,
            filter,
            keys,
        })
    }

    /// Write the config's slots, this node's slot and the filter bits of
    /// its addresses (added to the old ones: `prune` takes those out
    /// once no service needs them).
    pub(crate) fn write(
        &mut self,
        bpf: &mut aya::Ebpf,
        cfg: &SnatConfig,
        keys: &[SvcKey],
    ) -> Result<()> {
        let mut addrs: Array<&mut MapData, SnatAddr> = array(bpf, M_SNAT_ADDRS)?;
        let mut written = Vec::new();
        for s in &cfg.slots {
            let v = slot_value(s);
            let slot = u32::from(s.slot);
            if self.slots.get(&slot) != Some(&v) {
                addrs.set(slot, v, 0).map_err(Error::map(M_SNAT_ADDRS))?;
                written.push((slot, v));
            }
        }
        self.slots.extend(written);
        let own = cfg.own.map_or(0, |o| u32::from(o) + 1);
        if own != self.own {
            let mut arr: Array<&mut MapData, u32> = array(bpf, M_SNAT_OWN)?;
            arr.set(0, own, 0).map_err(Error::map(M_SNAT_OWN))?;
            self.own = own;
        }
        let want = filter_words(keys);
        let union: Vec<u64> = want
            .iter()
            .zip(self.filter.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a | b)
            .collect();
        self.write_filter(bpf, union)?;
        self.keys = keys.to_vec();
        Ok(())
    }

    /// Clear the slots the config no longer has and the filter bits of
    /// addresses that are gone.
    pub(crate) fn prune(
        &mut self,
        bpf: &mut aya::Ebpf,
        cfg: &SnatConfig,
        keys: &[SvcKey],
    ) -> Result<()> {
        let keep: Vec<u32> = cfg.slots.iter().map(|s| u32::from(s.slot)).collect();
        let gone: Vec<u32> = self
            .slots
            .keys()
            .copied()
            .filter(|s| !keep.contains(s))
            .collect();
        if !gone.is_empty() {
            let mut addrs: Array<&mut MapData, SnatAddr> = array(bpf, M_SNAT_ADDRS)?;
            for s in &gone {
                addrs
                    .set(*s, SnatAddr::default(), 0)
                    .map_err(Error::map(M_SNAT_ADDRS))?;
            }
            for s in gone {
                self.slots.remove(&s);
            }
        }
        self.write_filter(bpf, filter_words(keys))
    }

    fn write_filter(&mut self, bpf: &mut aya::Ebpf, words: Vec<u64>) -> Result<()> {
        let old = std::mem::take(&mut self.filter);
        let mut arr: Array<&mut MapData, u64> = array(bpf, M_SNAT_FILTER)?;
        for (i, w) in words.iter().enumerate() {
            if old.get(i) != Some(w) {
                arr.set(i as u32, *w, 0)
                    .map_err(Error::map(M_SNAT_FILTER))?;
            }
        }
        self.filter = words;
        Ok(())
    }
}

/// The reverse key a backend's reply to `snat:sport` carries.
pub fn rev_key(
    backend: std::net::IpAddr,
    backend_port: u16,
    snat: std::net::IpAddr,
    sport: u16,
    proto: u8,
) -> crate::abi::CtKey {
    let (saddr, family) = addr_bytes(backend);
    let (daddr, _) = addr_bytes(snat);
    crate::abi::CtKey {
        saddr,
        daddr,
        sport: backend_port.to_be(),
        dport: sport.to_be(),
        proto,
        family,
        pad: 0,
    }
}
