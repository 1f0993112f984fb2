//! Programming the source ranges of services (`lb_src_ranges`, an LPM trie
//! keyed by service slot, family and CIDR) and their policy
//! (`lb_svc_policy`: the ranges' generation, the client affinity timeout). The datapath drops a packet whose source is in none of
//! its service's ranges, on new and established flows alike; an entry caches
//! the generation its source was found in, so a change of the ranges makes
//! every flow of the service look again (see `src_allowed` in lb.bpf.c).

use std::collections::{BTreeSet, HashMap};

use aya::maps::{lpm_trie::Key, Array, LpmTrie, MapData};

use crate::{
    abi::{SrcRangeKey, SvcPolicy},
    error::{Error, Result},
    maps::{M_SRC_RANGES, M_SVC_POLICY},
};

/// The trie's key data: [`SrcRangeKey`] without its prefix length.
type Data = [u8; 24];

fn to_key(k: &SrcRangeKey) -> Key<Data> {
    let mut d = [0u8; 24];
    d[..4].copy_from_slice(&k.svc.to_ne_bytes());
    d[4] = k.family;
    d[5..21].copy_from_slice(&k.addr);
    Key::new(k.prefixlen, d)
}

fn from_key(k: &Key<Data>) -> SrcRangeKey {
    let d = k.data();
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&d[5..21]);
    SrcRangeKey {
        prefixlen: k.prefix_len(),
        svc: u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
        family: d[4],
        addr,
        pad: [0; 3],
    }
}

fn trie(bpf: &mut aya::Ebpf) -> Result<LpmTrie<&mut MapData, Data, u32>> {
    LpmTrie::try_from(
        bpf.map_mut(M_SRC_RANGES)
            .ok_or(Error::MissingMap { map: M_SRC_RANGES })?,
    )
    .map_err(Error::map(M_SRC_RANGES))
}

fn policy(bpf: &mut aya::Ebpf) -> Result<Array<&mut MapData, SvcPolicy>> {
    Array::try_from(
        bpf.map_mut(M_SVC_POLICY)
            .ok_or(Error::MissingMap { map: M_SVC_POLICY })?,
    )
    .map_err(Error::map(M_SVC_POLICY))
}

/// What the range maps hold, as this process wrote or read them.
#[derive(Debug, Default)]
pub(crate) struct RangesState {
    /// Service slot -> (generation, its keys); only restricted services.
    by_slot: HashMap<u32, (u32, BTreeSet<SrcRangeKey>)>,
    /// The generation the next change gets (never 0, never reused while
    /// the maps live: an entry may still hold an old one).
    next_gen: u32,
}

impl RangesState {
    /// Read what the (adopted) maps hold.
    pub(crate) fn recover(bpf: &mut aya::Ebpf, max_services: u32) -> Result<Self> {
        let mut by_slot: HashMap<u32, (u32, BTreeSet<SrcRangeKey>)> = HashMap::new();
        {
            let t = trie(bpf)?;
            for k in t.keys() {
                let k = from_key(&k.map_err(Error::map(M_SRC_RANGES))?);
                by_slot.entry(k.slot()).or_default().1.insert(k);
            }
        }
        let pol = policy(bpf)?;
        let mut max_gen = 0;
        for slot in 0..max_services {
            let p = pol.get(&slot, 0).map_err(Error::map(M_SVC_POLICY))?;
            max_gen = max_gen.max(p.ranges_gen);
            if p.ranges_gen != 0 {
                by_slot.entry(slot).or_default().0 = p.ranges_gen;
            }
        }
        Ok(Self {
            by_slot,
            next_gen: max_gen.wrapping_add(1).max(1),
        })
    }

    /// Give service slot `slot` exactly `want` (empty: no restriction).
    /// Narrowing deletes before the new generation is published, so no flow
    /// can be re-admitted by a range that is going away; lifting every range
    /// publishes 0 before deleting. Returns whether anything changed.
    pub(crate) fn set(
        &mut self,
        bpf: &mut aya::Ebpf,
        slot: u32,
        want: BTreeSet<SrcRangeKey>,
    ) -> Result<bool> {
        let (old_gen, old) = self.by_slot.remove(&slot).unwrap_or_default();
        if old == want && (old_gen != 0) != want.is_empty() {
            if !want.is_empty() {
                self.by_slot.insert(slot, (old_gen, want));
            }
            return Ok(false);
        }
        if want.is_empty() {
            set_policy(bpf, slot, |p| p.ranges_gen = 0)?;
        }
        // Deletions first (the trie's peak is the larger of the two sets);
        // on an error the state says what the trie holds.
        let mut now = old.clone();
        let r = edit(bpf, &old, &want, &mut now);
        if let Err(e) = r {
            if !now.is_empty() {
                self.by_slot.insert(slot, (old_gen, now));
            }
            return Err(e);
        }
        if !want.is_empty() {
            let gen = self.next_gen;
            self.next_gen = self.next_gen.wrapping_add(1).max(1);
            let r = set_policy(bpf, slot, |p| p.ranges_gen = gen);
            self.by_slot
                .insert(slot, (if r.is_ok() { gen } else { old_gen }, want));
            r?;
        }
        Ok(true)
    }
}

/// Change service slot `slot`'s policy (the other fields stay: the
/// loader is its only writer).
fn set_policy(bpf: &mut aya::Ebpf, slot: u32, edit: impl FnOnce(&mut SvcPolicy)) -> Result<()> {
    let mut pol = policy(bpf)?;
    let mut p = pol.get(&slot, 0).map_err(Error::map(M_SVC_POLICY))?;
    edit(&mut p);
    pol.set(slot, p, 0).map_err(Error::map(M_SVC_POLICY))
}

/// Client affinity of service slot `slot`: the seconds an idle client
/// keeps its backend (0: none). Written before the service entry's flag,
/// and cleared after it (see the loader).
pub(crate) fn set_affinity(bpf: &mut aya::Ebpf, slot: u32, secs: u32) -> Result<()> {
    set_policy(bpf, slot, |p| p.affinity_s = secs)
}

/// Take `old` out of the trie and put `want` in; `now` follows what the
/// trie holds, also when a step fails.
fn edit(
    bpf: &mut aya::Ebpf,
    old: &BTreeSet<SrcRangeKey>,
    want: &BTreeSet<SrcRangeKey>,
    now: &mut BTreeSet<SrcRangeKey>,
) -> Result<()> {
    let mut t = trie(bpf)?;
    for k in old.difference(want) {
        match t.remove(&to_key(k)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map(M_SRC_RANGES)(e)),
        }
        now.remove(k);
    }
    for k in want.difference(old) {
        t.insert(&to_key(k), 1u32, 0)
            .map_err(Error::map(M_SRC_RANGES))?;
        now.insert(*k);
    }
    Ok(())
}
