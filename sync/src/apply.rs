//! Writing peers' entries into the local conntrack map under the merge
//! rule. The rule runs in the kernel: the datapath's apply program
//! (datapath-ebpf bpf/ct_apply.h, [`Conntrack::apply`]) takes up to 48
//! entries per syscall, looks each up and writes it if the rule says so.
//! SNAT entries then get their reverse bindings, from what the map holds.

use datapath_ebpf::{
    abi::{CtKey, CtVal, CT_F_SNAT},
    conntrack::Conntrack,
};

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
) -> datapath_ebpf::Result<ApplyStats> {
    let counts = ct.apply(entries)?;
    let mut st = ApplyStats {
        applied: counts.applied,
        rejected: counts.rejected,
        unchanged: counts.unchanged,
        unbound: 0,
    };
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
