//! Writing peers' entries into the local conntrack map under the merge rule,
//! with batched syscalls: new keys go in with `BPF_NOEXIST` in one call per
//! run; only keys that exist already are looked up, merged and written one
//! by one.

use datapath_ebpf::{
    abi::{CtKey, CtVal, CT_F_SNAT},
    conntrack::Conntrack,
};

use crate::merge::{merge, Merge};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Written (new, or merged into an existing entry).
    pub applied: u64,
    /// Refused: the local entry is newer.
    pub rejected: u64,
    /// Already equal.
    pub unchanged: u64,
    /// SNAT entries whose binding could not be made here (their backend or
    /// SNAT address is not in this node's config).
    pub unbound: u64,
}

pub fn apply_remote(
    ct: &Conntrack,
    entries: &[(CtKey, CtVal)],
    local_node: u16,
) -> datapath_ebpf::Result<ApplyStats> {
    let mut st = ApplyStats::default();
    // Entries from peers are stored marked REMOTE (merge() sets it).
    let marked: Vec<(CtKey, CtVal)> = entries
        .iter()
        .map(|(k, v)| match merge(None, v, local_node) {
            Merge::Store(m) => (*k, m),
            _ => (*k, *v),
        })
        .collect();
    let mut rest: &[(CtKey, CtVal)] = &marked;
    while !rest.is_empty() {
        let (n, existing) = ct.insert_new(rest)?;
        st.applied += n as u64;
        match existing {
            None => break,
            Some(i) => {
                let (k, v) = rest[i];
                match merge(ct.get(&k)?.as_ref(), &v, local_node) {
                    Merge::Store(m) => {
                        ct.insert_batch(&[(k, m)])?;
                        st.applied += 1;
                    }
                    Merge::Keep => st.unchanged += 1,
                    Merge::Reject => st.rejected += 1,
                }
                rest = &rest[i + 1..];
            }
        }
    }
    // SNAT entries: their bindings, from what the map now holds (a merge
    // may have kept a newer local entry).
    let snat: Vec<CtKey> = entries
        .iter()
        .filter(|(_, v)| v.flags & CT_F_SNAT != 0)
        .map(|(k, _)| *k)
        .collect();
    if !snat.is_empty() {
        st.unbound += ct.bind(&snat)?.unresolved as u64;
    }
    Ok(st)
}
