//! Which of its own entries a node re-sends in a refresh round.
//!
//! Peers expire an entry when its copy has been idle past the protocol's
//! timeout, so a live flow's copy needs a fresh `last_seen` now and then —
//! but not every round: re-sending a million live entries every 10 s cost
//! a quarter of a core and 15 MB/s (docs/benchmarks.md). Instead each
//! entry has a slot (a hash of its key): in a round, the entries of one
//! slot in `k` are re-sent if they saw traffic since their slot's previous
//! turn, where `k` makes a copy at most a quarter of the timeout (plus a
//! round) stale — TCP 3600 s → every 900 s, UDP 300 s → every 60 s at the
//! default 60 s rounds. Entries that turn CLOSING need no round: the
//! datapath announces them on the ring buffer like new flows. After
//! entries were lost on the way (ring-buffer events the datapath could not
//! record, entries dropped at a full peer queue) a round runs at once and
//! is full: every own entry with traffic since the last round.

use std::{collections::VecDeque, time::Duration};

use datapath_ebpf::abi::{CtKey, CtVal, CT_F_AFFINITY, IPPROTO_TCP};

/// Round bookkeeping of one node's refresh task.
pub struct Refresher {
    round: u64,
    /// Start times (CLOCK_MONOTONIC ns) of the last rounds, oldest first;
    /// the first is the task's start.
    marks: VecDeque<u64>,
    k_tcp: u64,
    k_udp: u64,
    ring_lost: Option<u64>,
    /// While losses go on: the start of the last round before them. Full
    /// rounds send everything since then, until a round sees no new loss
    /// (a full round's own send can be dropped at a full queue too).
    full_since: Option<u64>,
}

/// What one round sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub round: u64,
    pub k_tcp: u64,
    pub k_udp: u64,
    /// Every entry with traffic since the last round (ring loss or asked).
    pub full: bool,
    last_round_ns: u64,
    tcp_slot_ns: u64,
    udp_slot_ns: u64,
}

/// Rounds between two turns of one slot: the copy may lag by a quarter of
/// the timeout.
fn rounds_per_turn(timeout: Duration, interval: Duration) -> u64 {
    let i = interval.as_nanos().max(1);
    ((timeout.as_nanos() / 4) / i).clamp(1, 1 << 16) as u64
}

/// The slot hash of a key (FNV-1a over its bytes; only the origin uses it).
fn slot_hash(k: &CtKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    k.saddr.iter().chain(&k.daddr).for_each(|b| eat(*b));
    k.sport.to_ne_bytes().into_iter().for_each(&mut eat);
    k.dport.to_ne_bytes().into_iter().for_each(&mut eat);
    eat(k.proto);
    eat(k.family);
    h
}

impl Refresher {
    pub fn new(
        interval: Duration,
        tcp_timeout: Duration,
        udp_timeout: Duration,
        now_ns: u64,
    ) -> Self {
        Self {
            round: 0,
            marks: VecDeque::from([now_ns]),
            k_tcp: rounds_per_turn(tcp_timeout, interval),
            k_udp: rounds_per_turn(udp_timeout, interval),
            ring_lost: None,
            full_since: None,
        }
    }

    /// Plan the round that starts at `now_ns`. `ring_lost`: the count of
    /// entries lost on the way to peers so far; a rise since the last round
    /// makes it full, as does `force`.
    pub fn plan(&mut self, now_ns: u64, ring_lost: u64, force: bool) -> Plan {
        self.round += 1;
        let lost = self.ring_lost.is_some_and(|l| ring_lost > l);
        self.ring_lost = Some(ring_lost);
        // marks[len-1] started the last round; marks[len-k] started the
        // round k rounds ago (or the oldest we have).
        let back = |k: u64| -> u64 {
            let n = self.marks.len();
            let i = n.saturating_sub(k as usize);
            self.marks[i.min(n - 1)]
        };
        let last_round = back(1);
        if lost {
            self.full_since.get_or_insert(last_round);
        } else {
            self.full_since = None;
        }
        let plan = Plan {
            round: self.round,
            k_tcp: self.k_tcp,
            k_udp: self.k_udp,
            full: force || lost,
            last_round_ns: self.full_since.unwrap_or(last_round),
            tcp_slot_ns: back(self.k_tcp),
            udp_slot_ns: back(self.k_udp),
        };
        self.marks.push_back(now_ns);
        while self.marks.len() as u64 > self.k_tcp.max(self.k_udp) + 1 {
            self.marks.pop_front();
        }
        plan
    }
}

impl Plan {
    /// Does this round re-send entry `(k, v)` of node `me`?
    pub fn wants(&self, k: &CtKey, v: &CtVal, me: u16) -> bool {
        if v.origin != me {
            return false;
        }
        // A client's affinity entry (one per client, not per flow): every
        // round that follows traffic (its timeout may be far shorter than
        // the protocol's; the datapath announces it too, see affinity.h).
        if self.full || v.flags & CT_F_AFFINITY != 0 {
            return v.last_seen_ns >= self.last_round_ns;
        }
        let (turn, since) = if k.proto == IPPROTO_TCP {
            (self.k_tcp, self.tcp_slot_ns)
        } else {
            (self.k_udp, self.udp_slot_ns)
        };
        slot_hash(k) % turn == self.round % turn && v.last_seen_ns >= since
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datapath_ebpf::abi::{CT_F_CLOSING, IPPROTO_UDP};

    const S: u64 = 1_000_000_000;

    fn key(i: u32, proto: u8) -> CtKey {
        CtKey::new(
            std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
            1000 + (i % 1000) as u16,
            "10.200.0.1".parse().unwrap(),
            80,
            proto,
        )
    }

    fn val(last_seen: u64, flags: u16) -> CtVal {
        CtVal {
            backend_id: 1,
            flags,
            origin: 1,
            created_ns: 0,
            last_seen_ns: last_seen,
            ..Default::default()
        }
    }

    fn refresher() -> Refresher {
        Refresher::new(
            Duration::from_secs(60),
            Duration::from_secs(3600),
            Duration::from_secs(300),
            0,
        )
    }

    /// One round.
    const R: u64 = 60 * S;

    #[test]
    fn turns_follow_the_timeouts() {
        let mut r = refresher();
        let p = r.plan(R, 0, false);
        assert_eq!((p.k_tcp, p.k_udp), (15, 1));
        let mut fast = Refresher::new(
            Duration::from_secs(10),
            Duration::from_secs(3600),
            Duration::from_secs(300),
            0,
        );
        let p = fast.plan(10 * S, 0, false);
        assert_eq!((p.k_tcp, p.k_udp), (90, 7));
    }

    /// A flow with traffic all the time is re-sent exactly once per turn,
    /// so its peers' copy is never staler than a quarter of the timeout
    /// plus a round.
    #[test]
    fn busy_flows_go_once_per_turn() {
        let mut r = refresher();
        let keys: Vec<CtKey> = (0..2000)
            .map(|i| key(i, if i % 2 == 0 { IPPROTO_TCP } else { IPPROTO_UDP }))
            .collect();
        let mut sent = vec![Vec::new(); keys.len()];
        for round in 1..=120u64 {
            let now = round * R;
            let p = r.plan(now, 0, false);
            for (i, k) in keys.iter().enumerate() {
                if p.wants(k, &val(now - S, 0), 1) {
                    sent[i].push(round);
                }
            }
        }
        for (i, rounds) in sent.iter().enumerate() {
            let turn = if i % 2 == 0 { 15 } else { 1 };
            assert_eq!(rounds.len() as u64, 120 / turn, "flow {i}: {rounds:?}");
            assert!(
                rounds.windows(2).all(|w| w[1] - w[0] == turn),
                "flow {i}: {rounds:?}"
            );
        }
        // Spread: no round carries much more than its share of TCP flows
        // (1000 / 15 ≈ 67).
        let mut per_round = std::collections::HashMap::<u64, usize>::new();
        for (i, rounds) in sent.iter().enumerate() {
            if i % 2 == 0 {
                for r in rounds {
                    *per_round.entry(*r).or_default() += 1;
                }
            }
        }
        assert!(per_round.values().all(|n| *n < 110), "{per_round:?}");
    }

    /// A flow that saw traffic once between two of its turns is re-sent at
    /// the next turn, however long before the turn the traffic was; an
    /// idle one is not.
    #[test]
    fn traffic_since_the_last_turn_is_not_missed() {
        let k = key(7, IPPROTO_TCP);
        let mut r = refresher();
        let mut turns = Vec::new();
        for round in 1..=60u64 {
            let p = r.plan(round * R, 0, false);
            if slot_hash(&k) % 15 == round % 15 {
                turns.push((round, p));
            }
        }
        let (r1, _) = turns[0];
        let (r2, p2) = turns[1];
        // Traffic just after turn r1 started, then silence.
        let seen = r1 * R + 1;
        assert!(p2.wants(&k, &val(seen, 0), 1), "turn {r2} must carry it");
        let (_, p3) = turns[2];
        assert!(!p3.wants(&k, &val(seen, 0), 1), "idle since: not again");
        // Other rounds never carry it.
        let mut r = refresher();
        for round in 1..=60u64 {
            let p = r.plan(round * R, 0, false);
            if slot_hash(&k) % 15 != round % 15 {
                assert!(!p.wants(&k, &val(round * R - 1, 0), 1), "round {round}");
            }
        }
    }

    #[test]
    fn lost_events_make_a_full_round() {
        let mut r = refresher();
        r.plan(R, 5, false);
        let k = key(1, IPPROTO_TCP);
        let p = r.plan(2 * R, 5, false);
        assert!(!p.full);
        // Some other node's entry: never.
        let mut other = val(2 * R - S, CT_F_CLOSING);
        other.origin = 2;
        assert!(!p.wants(&k, &other, 1));
        // The ring lost events: every entry with traffic since the last round.
        let p = r.plan(3 * R, 6, false);
        assert!(p.full);
        let n = (0..1000)
            .filter(|i| p.wants(&key(*i, IPPROTO_TCP), &val(3 * R - S, 0), 1))
            .count();
        assert_eq!(n, 1000);
        let n = (0..1000)
            .filter(|i| p.wants(&key(*i, IPPROTO_TCP), &val(2 * R - S, 0), 1))
            .count();
        assert_eq!(n, 0, "idle since the last round: no need");
        // Losses go on (the full round's own send was dropped): the next
        // full round still reaches back to before the first loss.
        let p = r.plan(3 * R + S, 7, false);
        assert!(p.full);
        assert!(p.wants(&key(1, IPPROTO_TCP), &val(3 * R - S, 0), 1));
        let p = r.plan(4 * R, 7, false);
        assert!(!p.full, "no new loss");
        assert!(r.plan(5 * R, 7, true).full, "asked");
    }

    /// A client's affinity entry with traffic since the last round goes in
    /// every round (its timeout may be shorter than a turn), an idle one
    /// not, another node's never.
    #[test]
    fn affinity_entries_go_every_round_they_saw_traffic() {
        let mut r = refresher();
        let k = CtKey::affinity(
            "10.0.0.9".parse().unwrap(),
            "10.200.0.1".parse().unwrap(),
            80,
            IPPROTO_TCP,
        );
        r.plan(R, 0, false);
        r.plan(2 * R, 0, false);
        for round in 3..=30u64 {
            let p = r.plan(round * R, 0, false);
            assert!(
                p.wants(&k, &val(round * R - S, CT_F_AFFINITY), 1),
                "round {round}"
            );
            assert!(
                !p.wants(&k, &val(round * R - 2 * R, CT_F_AFFINITY), 1),
                "idle since the last round: round {round}"
            );
            let mut other = val(round * R - S, CT_F_AFFINITY);
            other.origin = 2;
            assert!(!p.wants(&k, &other, 1));
        }
    }
}
