//! The replication wire format: versioned bincode 2, converted from and to
//! the kernel's conntrack structs (never raw kernel bytes). Times travel as
//! Unix-epoch nanoseconds; each side converts from/to its own monotonic
//! clock. Decoding is bounded: a frame larger than [`MAX_FRAME`] or a batch
//! longer than [`MAX_BATCH`] is an error, never an allocation.
//!
//! Versions: 1 has [`Msg::Batch`] with full entries; 2 adds the compact
//! batch ([`frame_compact`]: times as differences, ports as fixed bytes —
//! 25 instead of 37 bytes for an IPv4 entry). A node speaks both: a sender
//! opens with `Hello { version: 1 }` (what every version accepts), the
//! receiver answers with its own `Hello`, and only once that says 2 or more
//! does the sender switch to compact batches. So a rolling upgrade mixes
//! versions freely. The decoder turns a compact batch back into
//! [`Msg::Batch`], exactly (the conversion is lossless).

use bincode::{Decode, Encode};

/// Newest wire format version this node speaks.
pub const VERSION: u16 = 2;
/// Oldest version it still accepts (a peer below it is refused).
pub const MIN_VERSION: u16 = 1;
/// Largest encoded message.
pub const MAX_FRAME: usize = 1 << 20;
/// Most entries in one batch, refresh or snapshot chunk.
pub const MAX_BATCH: usize = 4096;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// A conntrack entry on the wire. IPv4 addresses take 4 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
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

/// Frame a message for a peer that speaks version 2: a `Batch` in the
/// compact encoding, anything else as [`frame`] does.
pub fn frame_compact(msg: &Msg) -> Vec<u8> {
    let Msg::Batch {
        origin,
        incarnation,
        seq,
        base,
        entries,
    } = msg
    else {
        return frame(msg);
    };
    let t0 = entries.first().map_or(0, |e| e.created);
    frame(&Msg::CompactBatch {
        origin: *origin,
        incarnation: *incarnation,
        seq: *seq,
        base: *base,
        t0,
        entries: entries
            .iter()
            .map(|e| CompactEntry::from_entry(e, t0))
            .collect(),
    })
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
