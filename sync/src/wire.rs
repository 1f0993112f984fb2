//! The replication wire format: versioned bincode 2, converted from and to
//! the kernel's conntrack structs (never raw kernel bytes). Times travel as
//! Unix-epoch nanoseconds; each side converts from/to its own monotonic
//! clock. Decoding is bounded: a frame larger than [`MAX_FRAME`] or a batch
//! longer than [`MAX_BATCH`] is an error, never an allocation.

use bincode::{Decode, Encode};

/// Wire format version; a peer speaking another version is refused.
pub const VERSION: u16 = 1;
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
    #[error("peer speaks wire version {0}, this node {VERSION}")]
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
        msg.validate()?;
        Ok(msg)
    }

    fn validate(&self) -> Result<(), WireError> {
        let (what, entries) = match self {
            Msg::Hello { version, .. } if *version != VERSION => {
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
