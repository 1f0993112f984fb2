//! The merge rule: what a node stores when a peer's entry arrives for a flow.
//!
//! 1. No local entry: store the peer's (marked `REMOTE`).
//! 2. Same backend (and, for SNAT entries, the same binding): keep the
//!    entry, take the later `last_seen` and the peer's `CLOSING` flag.
//! 3. Different backend: the entry created later wins — it is the newer
//!    connection on a reused tuple, or a re-pick after a backend was
//!    removed; on equal creation times the lower origin id wins, so every
//!    node decides alike. A peer's entry never overrides a newer local one.

use datapath_ebpf::abi::{CtVal, CT_F_CLOSING, CT_F_REMOTE, CT_F_SNAT};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Write this value.
    Store(CtVal),
    /// The local entry stays as it is.
    Keep,
    /// The local entry is newer: the peer's is rejected.
    Reject,
}

pub fn merge(local: Option<&CtVal>, remote: &CtVal, local_node: u16) -> Merge {
    let mut incoming = *remote;
    if remote.origin != local_node {
        incoming.flags |= CT_F_REMOTE;
    }
    let Some(l) = local else {
        return Merge::Store(incoming);
    };
    let same_binding = (l.flags & CT_F_SNAT, l.snat_slot, l.snat_port)
        == (remote.flags & CT_F_SNAT, remote.snat_slot, remote.snat_port);
    if l.backend_id == remote.backend_id && same_binding {
        let mut m = *l;
        m.last_seen_ns = m.last_seen_ns.max(remote.last_seen_ns);
        m.flags |= remote.flags & CT_F_CLOSING;
        return if m == *l {
            Merge::Keep
        } else {
            Merge::Store(m)
        };
    }
    let remote_newer = (remote.created_ns, std::cmp::Reverse(remote.origin))
        > (l.created_ns, std::cmp::Reverse(l.origin));
    if remote_newer {
        Merge::Store(incoming)
    } else {
        Merge::Reject
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(backend: u32, origin: u16, created: u64, last: u64) -> CtVal {
        CtVal {
            backend_id: backend,
            flags: 0,
            origin,
            created_ns: created,
            last_seen_ns: last,
            ..Default::default()
        }
    }

    #[test]
    fn rules() {
        let me = 1;
        assert_eq!(
            merge(None, &v(5, 2, 10, 10), me),
            Merge::Store(CtVal {
                flags: CT_F_REMOTE,
                ..v(5, 2, 10, 10)
            })
        );
        // Same backend: last_seen advances, nothing else changes.
        assert_eq!(
            merge(Some(&v(5, 1, 10, 50)), &v(5, 2, 10, 40), me),
            Merge::Keep
        );
        assert_eq!(
            merge(Some(&v(5, 1, 10, 50)), &v(5, 2, 10, 90), me),
            Merge::Store(v(5, 1, 10, 90))
        );
        // A newer local entry is never overridden.
        assert_eq!(
            merge(Some(&v(5, 1, 20, 20)), &v(6, 2, 10, 99), me),
            Merge::Reject
        );
        // A newer remote entry wins.
        assert!(
            matches!(merge(Some(&v(5, 1, 10, 10)), &v(6, 2, 20, 20), me), Merge::Store(x) if x.backend_id == 6)
        );
        // Tie: lower origin wins, on every node alike.
        assert!(
            matches!(merge(Some(&v(5, 3, 10, 10)), &v(6, 2, 10, 10), 3), Merge::Store(x) if x.backend_id == 6)
        );
        assert_eq!(
            merge(Some(&v(5, 2, 10, 10)), &v(6, 3, 10, 10), 2),
            Merge::Reject
        );
    }
}
