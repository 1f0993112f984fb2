//! The replication protocol core, sans IO: it takes events with the current
//! time and returns messages to send and entries to apply, so it is tested
//! deterministically in virtual time (tests/session.rs).
//!
//! Sender ([`Outbox`], one per peer): local new entries are batched by count
//! (`max_batch`) and by a deadline (`max_delay`); each batch carries the
//! sender's incarnation and a sequence number. Batches stay in a bounded
//! buffer until the peer acknowledges them and are all sent again after a
//! reconnect. If the buffer overflows, the oldest batches are dropped and
//! counted; the peer sees the gap.
//!
//! Receiver ([`Inbox`], one per origin): applies batches in sequence order,
//! exactly once (duplicates are acknowledged and ignored), stashes a few
//! batches that arrive early, and when a gap does not close within
//! `gap_timeout` (or the stash is full) it skips ahead and asks for a resync
//! (a snapshot pull: anti-entropy). A new incarnation of an origin (it
//! restarted) starts a new sequence.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::wire::{Msg, WireEntry};

#[derive(Clone, Debug)]
pub struct OutboxConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Entries kept for resending until acknowledged.
    pub max_unacked_entries: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            max_delay: Duration::from_micros(500),
            max_unacked_entries: 1 << 18,
        }
    }
}

pub struct Outbox {
    cfg: OutboxConfig,
    origin: u64,
    incarnation: u64,
    next_seq: u64,
    pending: Vec<WireEntry>,
    pending_since: Option<Instant>,
    unacked: VecDeque<(u64, Vec<WireEntry>)>,
    unacked_entries: usize,
    /// Batches dropped unacknowledged because the buffer was full.
    pub dropped_batches: u64,
}

impl Outbox {
    pub fn new(origin: u64, incarnation: u64, cfg: OutboxConfig) -> Self {
        Self {
            cfg,
            origin,
            incarnation,
            next_seq: 1,
            pending: Vec::new(),
            pending_since: None,
            unacked: VecDeque::new(),
            unacked_entries: 0,
            dropped_batches: 0,
        }
    }

    pub fn push(&mut self, e: WireEntry, now: Instant) {
        if self.pending.is_empty() {
            self.pending_since = Some(now);
        }
        self.pending.push(e);
    }

    /// Entries queued but not yet batched.
    pub fn queued(&self) -> usize {
        self.pending.len()
    }

    pub fn unacked_entries(&self) -> usize {
        self.unacked_entries
    }

    /// When the pending entries must be flushed at the latest.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + self.cfg.max_delay)
    }

    /// Batches due now (full, or past the deadline).
    pub fn poll(&mut self, now: Instant) -> Vec<Msg> {
        let mut out = Vec::new();
        while self.pending.len() >= self.cfg.max_batch {
            let rest = self.pending.split_off(self.cfg.max_batch);
            let batch = std::mem::replace(&mut self.pending, rest);
            out.push(self.seal(batch));
        }
        if self.pending.is_empty() {
            self.pending_since = None;
        } else if self.deadline().is_some_and(|d| d <= now) {
            let batch = std::mem::take(&mut self.pending);
            self.pending_since = None;
            out.push(self.seal(batch));
        }
        out
    }

    fn seal(&mut self, entries: Vec<WireEntry>) -> Msg {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked_entries += entries.len();
        self.unacked.push_back((seq, entries.clone()));
        while self.unacked_entries > self.cfg.max_unacked_entries {
            match self.unacked.pop_front() {
                Some((_, e)) => {
                    self.unacked_entries -= e.len();
                    self.dropped_batches += 1;
                }
                None => break,
            }
        }
        Msg::Batch {
            origin: self.origin,
            incarnation: self.incarnation,
            seq,
            base: self.base(),
            entries,
        }
    }

    /// The oldest sequence still held (the next one if none is).
    fn base(&self) -> u64 {
        self.unacked.front().map_or(self.next_seq, |(s, _)| *s)
    }

    pub fn on_ack(&mut self, incarnation: u64, seq: u64) {
        if incarnation != self.incarnation {
            return;
        }
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, e) = self.unacked.pop_front().expect("checked");
            self.unacked_entries -= e.len();
        }
    }

    /// After a reconnect: every unacknowledged batch again, in order.
    pub fn on_reconnect(&self) -> Vec<Msg> {
        self.unacked
            .iter()
            .map(|(seq, entries)| Msg::Batch {
                origin: self.origin,
                incarnation: self.incarnation,
                seq: *seq,
                base: self.base(),
                entries: entries.clone(),
            })
            .collect()
    }
}

#[derive(Clone, Debug)]
pub struct InboxConfig {
    pub max_stash: usize,
    pub gap_timeout: Duration,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            max_stash: 64,
            gap_timeout: Duration::from_millis(500),
        }
    }
}

struct Origin {
    incarnation: u64,
    next: u64,
    stash: BTreeMap<u64, Vec<WireEntry>>,
    gap_since: Option<Instant>,
}

/// What the receiver must do after an event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Batches of entries to apply, in order.
    pub apply: Vec<Vec<WireEntry>>,
    /// Acknowledge up to this (incarnation, seq).
    pub ack: Option<(u64, u64)>,
    /// Entries were lost: pull a snapshot from the origin.
    pub resync: bool,
    pub duplicate: bool,
}

pub struct Inbox {
    cfg: InboxConfig,
    origins: HashMap<u64, Origin>,
}

impl Inbox {
    pub fn new(cfg: InboxConfig) -> Self {
        Self {
            cfg,
            origins: HashMap::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn on_batch(
        &mut self,
        origin: u64,
        incarnation: u64,
        seq: u64,
        base: u64,
        entries: Vec<WireEntry>,
        now: Instant,
    ) -> Delivery {
        let mut d = Delivery::default();
        // First contact: start at the sender's oldest unacknowledged batch
        // (what came before was acknowledged by an earlier us, and is in our
        // map or in the snapshot we joined with).
        let o = self.origins.entry(origin).or_insert(Origin {
            incarnation,
            next: base,
            stash: BTreeMap::new(),
            gap_since: None,
        });
        if o.incarnation != incarnation {
            // The origin restarted: a new sequence. Batches its old
            // incarnation never got acknowledged are gone: resync.
            *o = Origin {
                incarnation,
                next: base,
                stash: BTreeMap::new(),
                gap_since: None,
            };
            d.resync = base != 1;
        }
        if base > o.next {
            // The sender dropped batches we never acknowledged.
            o.stash.retain(|s, _| *s >= base);
            o.next = base;
            d.resync = true;
        }
        if seq < o.next {
            d.duplicate = true;
        } else if seq == o.next {
            d.apply.push(entries);
            o.next += 1;
            while let Some(e) = o.stash.remove(&o.next) {
                d.apply.push(e);
                o.next += 1;
            }
            o.gap_since = if o.stash.is_empty() { None } else { Some(now) };
        } else {
            o.stash.insert(seq, entries);
            o.gap_since.get_or_insert(now);
            if o.stash.len() > self.cfg.max_stash {
                Self::skip_gap(o, &mut d);
            }
        }
        d.ack = Some((incarnation, o.next - 1));
        d
    }

    /// Gaps that did not close in time: skip ahead and ask for a resync.
    pub fn poll(&mut self, now: Instant) -> Delivery {
        let mut d = Delivery::default();
        for o in self.origins.values_mut() {
            if o.gap_since
                .is_some_and(|t| now.duration_since(t) >= self.cfg.gap_timeout)
            {
                Self::skip_gap(o, &mut d);
                d.ack = Some((o.incarnation, o.next - 1));
            }
        }
        d
    }

    fn skip_gap(o: &mut Origin, d: &mut Delivery) {
        let keys: Vec<u64> = o.stash.keys().copied().collect();
        for k in keys {
            if let Some(e) = o.stash.remove(&k) {
                d.apply.push(e);
                o.next = k + 1;
            }
        }
        o.gap_since = None;
        d.resync = true;
    }

    /// The next gap deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.origins
            .values()
            .filter_map(|o| o.gap_since.map(|t| t + self.cfg.gap_timeout))
            .min()
    }
}
