//! The protocol core in virtual time: a sender's Outbox and a receiver's
//! Inbox joined by a simulated connection that loses everything in flight on
//! a disconnect, reorders, duplicates, and a receiver that restarts. Safety:
//! no batch is applied twice. Liveness: once the network heals, every entry
//! is applied — or, only if a gap had to be skipped, a resync is requested.

use std::{
    collections::{HashSet, VecDeque},
    time::{Duration, Instant},
};

use proptest::prelude::*;
use sync::{
    session::{Inbox, InboxConfig, Outbox, OutboxConfig},
    wire::{Msg, WireEntry},
};

fn entry(n: u32) -> WireEntry {
    WireEntry {
        family: 4,
        proto: 6,
        saddr: n.to_be_bytes().to_vec(),
        daddr: vec![10, 200, 0, 1],
        sport: (n % 60000) as u16 + 1024,
        dport: 80,
        backend_id: n % 7,
        flags: 0,
        origin: 1,
        created: 1_000 + u64::from(n),
        last_seen: 1_000 + u64::from(n),
        snat_port: 0,
        snat_slot: 0,
    }
}

#[derive(Clone, Debug)]
enum Op {
    Push(u32),
    Advance(u64),
    Deliver(usize),
    DeliverOutOfOrder(usize),
    Duplicate(usize),
    Disconnect,
    RestartReceiver,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u32..50).prop_map(Op::Push),
        3 => (0u64..2_000).prop_map(Op::Advance),
        4 => (1usize..10).prop_map(Op::Deliver),
        1 => (0usize..10).prop_map(Op::DeliverOutOfOrder),
        1 => (0usize..10).prop_map(Op::Duplicate),
        1 => Just(Op::Disconnect),
        1 => Just(Op::RestartReceiver),
    ]
}

struct Sim {
    now: Instant,
    out: Outbox,
    inbox: Inbox,
    to_rx: VecDeque<Msg>,
    to_tx: VecDeque<Msg>,
    applied_batches: HashSet<(u64, u64)>,
    applied: HashSet<u32>,
    pushed: u32,
    resync: bool,
    twice: Vec<(u64, u64)>,
}

impl Sim {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            now,
            out: Outbox::new(
                1,
                77,
                OutboxConfig {
                    max_batch: 8,
                    max_delay: Duration::from_micros(500),
                    max_unacked_entries: 1 << 20,
                },
            ),
            inbox: Inbox::new(InboxConfig::default()),
            to_rx: VecDeque::new(),
            to_tx: VecDeque::new(),
            applied_batches: HashSet::new(),
            applied: HashSet::new(),
            pushed: 0,
            resync: false,
            twice: Vec::new(),
        }
    }

    fn sender_poll(&mut self) {
        for m in self.out.poll(self.now) {
            self.to_rx.push_back(m);
        }
        while let Some(Msg::Ack { incarnation, seq }) = self.to_tx.pop_front() {
            self.out.on_ack(incarnation, seq);
        }
    }

    fn receive(&mut self, m: Msg) {
        let Msg::Batch {
            origin,
            incarnation,
            seq,
            base,
            entries,
        } = m
        else {
            return;
        };
        let d = self
            .inbox
            .on_batch(origin, incarnation, seq, base, entries, self.now);
        self.resync |= d.resync;
        for batch in d.apply {
            // Identify the batch by its first entry's id (entries are unique).
            let id = u32::from_be_bytes(batch[0].saddr.clone().try_into().expect("4 bytes"));
            if !self.applied_batches.insert((incarnation, u64::from(id))) {
                self.twice.push((incarnation, u64::from(id)));
            }
            for e in batch {
                self.applied
                    .insert(u32::from_be_bytes(e.saddr.try_into().expect("4 bytes")));
            }
        }
        if let Some((inc, s)) = d.ack {
            self.to_tx.push_back(Msg::Ack {
                incarnation: inc,
                seq: s,
            });
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Push(n) => {
                for _ in 0..*n {
                    self.out.push(entry(self.pushed), self.now);
                    self.pushed += 1;
                }
            }
            Op::Advance(us) => {
                self.now += Duration::from_micros(*us);
                let d = self.inbox.poll(self.now);
                self.resync |= d.resync;
            }
            Op::Deliver(k) => {
                for _ in 0..*k {
                    if let Some(m) = self.to_rx.pop_front() {
                        self.receive(m);
                    }
                }
            }
            Op::DeliverOutOfOrder(i) => {
                if !self.to_rx.is_empty() {
                    let i = i % self.to_rx.len();
                    let m = self.to_rx.remove(i).expect("index in range");
                    self.receive(m);
                }
            }
            Op::Duplicate(i) => {
                if !self.to_rx.is_empty() {
                    let i = i % self.to_rx.len();
                    let m = self.to_rx[i].clone();
                    self.to_rx.push_back(m);
                }
            }
            Op::Disconnect => {
                self.to_rx.clear();
                self.to_tx.clear();
                for m in self.out.on_reconnect() {
                    self.to_rx.push_back(m);
                }
            }
            Op::RestartReceiver => {
                // The map (applied set) survives (pinned); protocol state does not.
                self.inbox = Inbox::new(InboxConfig::default());
                self.to_rx.clear();
                self.to_tx.clear();
                for m in self.out.on_reconnect() {
                    self.to_rx.push_back(m);
                }
            }
        }
        self.sender_poll();
    }

    /// The network heals: deliver everything in order until quiet.
    fn heal(&mut self) {
        for _ in 0..10_000 {
            self.now += Duration::from_millis(1);
            self.sender_poll();
            let d = self.inbox.poll(self.now);
            self.resync |= d.resync;
            if self.to_rx.is_empty() && self.out.queued() == 0 && self.out.unacked_entries() == 0 {
                return;
            }
            while let Some(m) = self.to_rx.pop_front() {
                self.receive(m);
            }
        }
        panic!("did not quiesce");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_schedules(ops in prop::collection::vec(op(), 1..120)) {
        let mut sim = Sim::new();
        for o in &ops {
            sim.step(o);
        }
        sim.heal();
        prop_assert!(sim.twice.is_empty(), "batches applied twice: {:?}", sim.twice);
        let missing: Vec<u32> = (0..sim.pushed).filter(|i| !sim.applied.contains(i)).collect();
        prop_assert!(missing.is_empty() || sim.resync, "lost {missing:?} without asking for a resync");
    }
}

#[test]
fn loss_is_repaired_by_resend_after_reconnect() {
    let mut sim = Sim::new();
    sim.step(&Op::Push(40));
    sim.step(&Op::Advance(1000));
    sim.step(&Op::Disconnect); // everything in flight is lost, then resent
    sim.step(&Op::Disconnect);
    sim.heal();
    assert_eq!(sim.applied.len(), 40);
    assert!(!sim.resync, "plain loss needs no resync");
}

#[test]
fn duplicates_are_applied_once() {
    let mut sim = Sim::new();
    sim.step(&Op::Push(16));
    for i in 0..5 {
        sim.step(&Op::Duplicate(i));
    }
    sim.heal();
    assert!(sim.twice.is_empty());
    assert_eq!(sim.applied.len(), 16);
}

#[test]
fn reordering_within_the_stash_needs_no_resync() {
    let mut sim = Sim::new();
    sim.step(&Op::Push(32)); // 4 batches
    sim.step(&Op::DeliverOutOfOrder(3));
    sim.step(&Op::DeliverOutOfOrder(1));
    sim.heal();
    assert_eq!(sim.applied.len(), 32);
    assert!(!sim.resync);
}

#[test]
fn receiver_restart_gets_the_unacked_again() {
    let mut sim = Sim::new();
    sim.step(&Op::Push(24));
    sim.step(&Op::Deliver(1)); // one batch applied, its ack still in flight
    sim.step(&Op::RestartReceiver);
    sim.heal();
    assert_eq!(sim.applied.len(), 24);
}

#[test]
fn batches_flush_by_count_and_by_deadline() {
    let t0 = Instant::now();
    let mut out = Outbox::new(
        1,
        1,
        OutboxConfig {
            max_batch: 4,
            max_delay: Duration::from_millis(1),
            max_unacked_entries: 100,
        },
    );
    for i in 0..5 {
        out.push(entry(i), t0);
    }
    assert_eq!(out.poll(t0).len(), 1, "a full batch goes at once");
    assert_eq!(out.queued(), 1);
    assert!(out.poll(t0 + Duration::from_micros(500)).is_empty());
    assert_eq!(out.deadline(), Some(t0 + Duration::from_millis(1)));
    assert_eq!(
        out.poll(t0 + Duration::from_millis(1)).len(),
        1,
        "the rest at the deadline"
    );
}

#[test]
fn overflow_is_counted_and_the_gap_asks_for_resync() {
    let t0 = Instant::now();
    let mut out = Outbox::new(
        1,
        1,
        OutboxConfig {
            max_batch: 1,
            max_delay: Duration::ZERO,
            max_unacked_entries: 2,
        },
    );
    let mut inbox = Inbox::new(InboxConfig {
        max_stash: 2,
        gap_timeout: Duration::from_millis(5),
    });
    let mut sent = Vec::new();
    for i in 0..6 {
        out.push(entry(i), t0);
        sent.extend(out.poll(t0));
    }
    assert_eq!(out.dropped_batches, 4);
    // Only the first reached the peer before it went away; the rest are
    // resent from the (overflowed) buffer: seq 5 and 6.
    let first = sent.remove(0);
    let mut resync = false;
    for m in std::iter::once(first).chain(out.on_reconnect()) {
        if let Msg::Batch {
            origin,
            incarnation,
            seq,
            base,
            entries,
        } = m
        {
            resync |= inbox
                .on_batch(origin, incarnation, seq, base, entries, t0)
                .resync;
        }
    }
    resync |= inbox.poll(t0 + Duration::from_millis(10)).resync;
    assert!(resync, "the receiver noticed the lost batches");
}
