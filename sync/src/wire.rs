//! The replication wire format: versioned bincode 2, converted from and to
//! the kernel's conntrack structs (never raw kernel bytes). Times travel as
//! Unix-epoch nanoseconds; each side converts from/to its own monotonic
//! clock. Decoding is bounded: a frame larger than [`MAX_FRAME`] or a batch
//! longer than [`MAX_BATCH`] is an error, never an allocation.
//!
//! Versions: 1 has [`Msg::Batch`] with full entries; 2 adds the compact
//! batch (times as differences, ports as fixed bytes — 25 instead of 37
//! bytes for an IPv4 entry); 3 adds SNAT entries (their binding: port and
//! slot) to batches, refreshes and snapshot chunks. A node speaks all of
//! them: a sender opens with `Hello { version: 1 }` (what every version
//! accepts), the receiver answers with its own `Hello`, and the sender
//! then encodes for that version ([`frame_for`]); a warm join's request
//! says the requester's version the same way. A peer below version 3 is
//! sent no SNAT entry (it could only forward it as DSR). So a rolling
//! upgrade mixes versions freely. The decoder turns the compact and
//! version-3 encodings back into [`Msg::Batch`], [`Msg::Refresh`] and
//! [`Msg::SnapshotChunk`], exactly (the conversions are lossless).

use bincode::{Decode, Encode};

/// Newest wire format version this node speaks.
pub const VERSION: u16 = 3;
/// The first version that carries SNAT entries.
pub const SNAT_VERSION: u16 = 3;
/// Oldest version it still accepts (a peer below it is refused).
pub const MIN_VERSION: u16 = 1;
/// Largest encoded message.
pub const MAX_FRAME: usize = 1 << 20;
/// Most entries in one batch, refresh or snapshot chunk.
pub const MAX_BATCH: usize = 4096;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// A conntrack entry on the wire. IPv4 addresses take 4 bytes. Its own
/// encoding (versions 1 and 2) leaves the SNAT fields out; version 3's
/// messages carry them ([`EntryV3`], [`CompactEntryV3`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireEntry {
    pub family: u8,
    pub proto: u8,
    pub saddr: Vec<u8>,
    pub daddr: Vec<u8>,
    pub sport: u16,
    pub dport: u16,
    pub backend_id: u32,
    pub flags: u16,
    /// Node id of the LB node that created the entry.
    pub origin: u16,
    /// Unix nanoseconds.
    pub created: u64,
    /// Unix nanoseconds.
    pub last_seen: u64,
    /// SNAT entries (`CT_F_SNAT`): the port the backend sees, and the slot
    /// of the SNAT address (its origin's); 0 otherwise.
    pub snat_port: u16,
    pub snat_slot: u16,
}

impl WireEntry {
    pub fn is_snat(&self) -> bool {
        self.flags & datapath_ebpf::abi::CT_F_SNAT != 0
    }
}

impl Encode for WireEntry {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        e: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.family.encode(e)?;
        self.proto.encode(e)?;
        self.saddr.encode(e)?;
        self.daddr.encode(e)?;
        self.sport.encode(e)?;
        self.dport.encode(e)?;
        self.backend_id.encode(e)?;
        self.flags.encode(e)?;
        self.origin.encode(e)?;
        self.created.encode(e)?;
        self.last_seen.encode(e)
    }
}

impl<C> Decode<C> for WireEntry {
    fn decode<D: bincode::de::Decoder<Context = C>>(
        d: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Ok(Self {
            family: Decode::decode(d)?,
            proto: Decode::decode(d)?,
            saddr: Decode::decode(d)?,
            daddr: Decode::decode(d)?,
            sport: Decode::decode(d)?,
            dport: Decode::decode(d)?,
            backend_id: Decode::decode(d)?,
            flags: Decode::decode(d)?,
            origin: Decode::decode(d)?,
            created: Decode::decode(d)?,
            last_seen: Decode::decode(d)?,
            snat_port: 0,
            snat_slot: 0,
        })
    }
}
bincode::impl_borrow_decode!(WireEntry);

/// A [`WireEntry`] with its SNAT fields (version 3).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct EntryV3 {
    pub entry: WireEntry,
    pub snat_port: u16,
    pub snat_slot: u16,
}

impl EntryV3 {
    fn from_entry(e: &WireEntry) -> Self {
        Self {
            entry: e.clone(),
            snat_port: e.snat_port,
            snat_slot: e.snat_slot,
        }
    }

    fn into_entry(self) -> WireEntry {
        WireEntry {
            snat_port: self.snat_port,
            snat_slot: self.snat_slot,
            ..self.entry
        }
    }
}

/// A [`CompactEntry`] with the SNAT fields (version 3's batches).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct CompactEntryV3 {
    pub entry: CompactEntry,
    pub snat_port: u16,
    pub snat_slot: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Msg {
    /// First message on a sync stream, both ways.
    Hello {
        version: u16,
        node_id: u64,
        /// Changes every time the sender's process starts: sequence numbers
        /// restart with it.
        incarnation: u64,
    },
    /// New entries of `origin`, numbered: batch `seq` follows `seq - 1`.
    /// `base` is the oldest batch the sender still holds unacknowledged:
    /// everything before it was acknowledged (or, if the sender's buffer
    /// overflowed, lost — the receiver then asks for a resync).
    Batch {
        origin: u64,
        incarnation: u64,
        seq: u64,
        base: u64,
        entries: Vec<WireEntry>,
    },
    /// The receiver has applied every batch up to `seq` of that incarnation.
    Ack { incarnation: u64, seq: u64 },
    /// Long-lived flows still alive: refreshes last_seen on the receiver.
    Refresh { entries: Vec<WireEntry> },
    /// A chunk of a full conntrack snapshot (warm join); `last` ends it.
    SnapshotChunk { entries: Vec<WireEntry>, last: bool },
    /// Version 2's encoding of a [`Msg::Batch`] (see [`frame_compact`]):
    /// `t0` is the first entry's `created`. [`Msg::decode`] never returns
    /// it: it returns the `Batch` it encodes.
    CompactBatch {
        origin: u64,
        incarnation: u64,
        seq: u64,
        base: u64,
        t0: u64,
        entries: Vec<CompactEntry>,
    },
    /// Version 3's encoding of a [`Msg::Batch`]: compact entries with
    /// their SNAT fields. Decoded into the `Batch`.
    BatchV3 {
        origin: u64,
        incarnation: u64,
        seq: u64,
        base: u64,
        t0: u64,
        entries: Vec<CompactEntryV3>,
    },
    /// Version 3's [`Msg::Refresh`] (decoded into it).
    RefreshV3 { entries: Vec<EntryV3> },
    /// Version 3's [`Msg::SnapshotChunk`] (decoded into it).
    SnapshotChunkV3 { entries: Vec<EntryV3>, last: bool },
}

/// A [`WireEntry`] in a compact batch: times as differences (zigzag
/// varints: a new flow's `last_seen` is its `created`, one byte), ports as
/// two fixed bytes each (a varint takes three above 250).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct CompactEntry {
    pub family: u8,
    pub proto: u8,
    pub saddr: Vec<u8>,
    pub daddr: Vec<u8>,
    /// sport, dport, big-endian.
    pub ports: [u8; 4],
    pub backend_id: u32,
    pub flags: u16,
    pub origin: u16,
    /// `created - t0`, wrapping.
    pub created: i64,
    /// `last_seen - created`, wrapping.
    pub last_seen: i64,
}

impl CompactEntry {
    fn from_entry(e: &WireEntry, t0: u64) -> Self {
        let [a, b] = e.sport.to_be_bytes();
        let [c, d] = e.dport.to_be_bytes();
        Self {
            family: e.family,
            proto: e.proto,
            saddr: e.saddr.clone(),
            daddr: e.daddr.clone(),
            ports: [a, b, c, d],
            backend_id: e.backend_id,
            flags: e.flags,
            origin: e.origin,
            created: e.created.wrapping_sub(t0) as i64,
            last_seen: e.last_seen.wrapping_sub(e.created) as i64,
        }
    }

    fn into_entry(self, t0: u64) -> WireEntry {
        let created = t0.wrapping_add(self.created as u64);
        WireEntry {
            family: self.family,
            proto: self.proto,
            saddr: self.saddr,
            daddr: self.daddr,
            sport: u16::from_be_bytes([self.ports[0], self.ports[1]]),
            dport: u16::from_be_bytes([self.ports[2], self.ports[3]]),
            backend_id: self.backend_id,
            flags: self.flags,
            origin: self.origin,
            created,
            last_seen: created.wrapping_add(self.last_seen as u64),
            snat_port: 0,
            snat_slot: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("trailing bytes after the message")]
    Trailing,
    #[error("{what} of {len} entries exceeds {MAX_BATCH}")]
    BatchTooLong { what: &'static str, len: usize },
    #[error("invalid entry: {0}")]
    BadEntry(String),
    #[error("peer speaks wire version {0}, this node {MIN_VERSION} to {VERSION}")]
    Version(u16),
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        bincode::encode_to_vec(self, config()).expect("messages are bounded and always encode")
    }

    /// Decode and validate one message (exactly `buf`).
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        if buf.len() > MAX_FRAME {
            return Err(WireError::TooLarge(buf.len()));
        }
        let (msg, used): (Msg, usize) = bincode::decode_from_slice(buf, config())
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != buf.len() {
            return Err(WireError::Trailing);
        }
        let msg = match msg {
            Msg::CompactBatch {
                origin,
                incarnation,
                seq,
                base,
                t0,
                entries,
            } => Msg::Batch {
                origin,
                incarnation,
                seq,
                base,
                entries: entries.into_iter().map(|e| e.into_entry(t0)).collect(),
            },
            Msg::BatchV3 {
                origin,
                incarnation,
                seq,
                base,
                t0,
                entries,
            } => Msg::Batch {
                origin,
                incarnation,
                seq,
                base,
                entries: entries
                    .into_iter()
                    .map(|e| WireEntry {
                        snat_port: e.snat_port,
                        snat_slot: e.snat_slot,
                        ..e.entry.into_entry(t0)
                    })
                    .collect(),
            },
            Msg::RefreshV3 { entries } => Msg::Refresh {
                entries: entries.into_iter().map(EntryV3::into_entry).collect(),
            },
            Msg::SnapshotChunkV3 { entries, last } => Msg::SnapshotChunk {
                entries: entries.into_iter().map(EntryV3::into_entry).collect(),
                last,
            },
            m => m,
        };
        msg.validate()?;
        Ok(msg)
    }

    fn validate(&self) -> Result<(), WireError> {
        let (what, entries) = match self {
            Msg::Hello { version, .. } if *version < MIN_VERSION => {
                return Err(WireError::Version(*version))
            }
            Msg::Batch { entries, .. } => ("batch", entries),
            Msg::Refresh { entries } => ("refresh", entries),
            Msg::SnapshotChunk { entries, .. } => ("snapshot chunk", entries),
            _ => return Ok(()),
        };
        if entries.len() > MAX_BATCH {
            return Err(WireError::BatchTooLong {
                what,
                len: entries.len(),
            });
        }
        entries.iter().try_for_each(WireEntry::validate)
    }
}

impl WireEntry {
    fn validate(&self) -> Result<(), WireError> {
        let alen = match self.family {
            datapath_ebpf::abi::FAMILY_V4 => 4,
            datapath_ebpf::abi::FAMILY_V6 => 16,
            f => return Err(WireError::BadEntry(format!("family {f}"))),
        };
        if self.saddr.len() != alen || self.daddr.len() != alen {
            return Err(WireError::BadEntry(
                "address length does not match family".into(),
            ));
        }
        if self.proto != datapath_ebpf::abi::IPPROTO_TCP
            && self.proto != datapath_ebpf::abi::IPPROTO_UDP
        {
            return Err(WireError::BadEntry(format!("protocol {}", self.proto)));
        }
        if self.backend_id == datapath_ebpf::abi::NO_BACKEND {
            return Err(WireError::BadEntry("reserved backend id".into()));
        }
        if self.is_snat() {
            if self.snat_port == 0 {
                return Err(WireError::BadEntry("SNAT entry without a port".into()));
            }
            if u32::from(self.snat_slot) >= datapath_ebpf::abi::SNAT_SLOTS {
                return Err(WireError::BadEntry(format!("SNAT slot {}", self.snat_slot)));
            }
        } else if self.snat_port != 0 || self.snat_slot != 0 {
            return Err(WireError::BadEntry(
                "SNAT fields on an entry that is no SNAT entry".into(),
            ));
        }
        Ok(())
    }
}

/// Frame a message for a stream: `[u32 big-endian length][message]`.
pub fn frame(msg: &Msg) -> Vec<u8> {
    let body = msg.encode();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Frame a message for a peer that speaks `version`: batches compact from
/// version 2 on, SNAT entries (and their fields) from version 3 on; a
/// peer below 3 is sent none of them.
pub fn frame_for(version: u16, msg: &Msg) -> Vec<u8> {
    let snat = version >= SNAT_VERSION;
    let keep = |es: &[WireEntry]| -> Vec<WireEntry> {
        es.iter().filter(|e| !e.is_snat()).cloned().collect()
    };
    match msg {
        Msg::Batch {
            origin,
            incarnation,
            seq,
            base,
            entries,
        } if version >= 2 => {
            let t0 = entries.first().map_or(0, |e| e.created);
            let (origin, incarnation, seq, base) = (*origin, *incarnation, *seq, *base);
            if snat {
                frame(&Msg::BatchV3 {
                    origin,
                    incarnation,
                    seq,
                    base,
                    t0,
                    entries: entries
                        .iter()
                        .map(|e| CompactEntryV3 {
                            entry: CompactEntry::from_entry(e, t0),
                            snat_port: e.snat_port,
                            snat_slot: e.snat_slot,
                        })
                        .collect(),
                })
            } else {
                frame(&Msg::CompactBatch {
                    origin,
                    incarnation,
                    seq,
                    base,
                    t0,
                    entries: entries
                        .iter()
                        .filter(|e| !e.is_snat())
                        .map(|e| CompactEntry::from_entry(e, t0))
                        .collect(),
                })
            }
        }
        Msg::Batch {
            origin,
            incarnation,
            seq,
            base,
            entries,
        } => frame(&Msg::Batch {
            origin: *origin,
            incarnation: *incarnation,
            seq: *seq,
            base: *base,
            entries: keep(entries),
        }),
        Msg::Refresh { entries } if snat => frame(&Msg::RefreshV3 {
            entries: entries.iter().map(EntryV3::from_entry).collect(),
        }),
        Msg::Refresh { entries } => frame(&Msg::Refresh {
            entries: keep(entries),
        }),
        Msg::SnapshotChunk { entries, last } if snat => frame(&Msg::SnapshotChunkV3 {
            entries: entries.iter().map(EntryV3::from_entry).collect(),
            last: *last,
        }),
        Msg::SnapshotChunk { entries, last } => frame(&Msg::SnapshotChunk {
            entries: keep(entries),
            last: *last,
        }),
        m => frame(m),
    }
}

/// Frame a message for a peer that speaks version 2 (see [`frame_for`]).
pub fn frame_compact(msg: &Msg) -> Vec<u8> {
    frame_for(2, msg)
}

/// Incremental deframer for a byte stream.
#[derive(Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if any. An error means the stream is bad
    /// and must be closed.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = Msg::decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }
}
