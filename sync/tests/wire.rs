//! The decoder is bounded and total: random bytes and mutated valid frames
//! never panic, and whatever decodes is a valid message (known family,
//! matching address lengths, TCP/UDP, batch within limits). And the wire
//! cost per entry stays within budget.

use proptest::prelude::*;
use sync::wire::{
    frame, frame_compact, frame_for, Deframer, Msg, WireEntry, WireError, MAX_BATCH, MIN_VERSION,
    VERSION,
};

fn entry(i: u32, v6: bool) -> WireEntry {
    let alen = if v6 { 16 } else { 4 };
    let mut s = vec![0u8; alen];
    s[..4].copy_from_slice(&(0xC000_0200u32 + i).to_be_bytes());
    WireEntry {
        family: if v6 { 6 } else { 4 },
        proto: 6,
        saddr: s,
        daddr: vec![10; alen],
        sport: 40_000 + (i % 20_000) as u16,
        dport: 443,
        backend_id: i % 100,
        flags: 0,
        origin: 3,
        created: 1_764_300_000_000_000_000 + u64::from(i) * 1_000,
        last_seen: 1_764_300_000_000_000_000 + u64::from(i) * 1_000,
        snat_port: 0,
        snat_slot: 0,
    }
}

fn batch(n: u32) -> Msg {
    Msg::Batch {
        origin: 3,
        incarnation: 42,
        seq: 9,
        base: 7,
        entries: (0..n).map(|i| entry(i, false)).collect(),
    }
}

#[test]
fn roundtrip() {
    for m in [
        Msg::Hello {
            version: VERSION,
            node_id: 1,
            incarnation: 5,
        },
        batch(10),
        Msg::Ack {
            incarnation: 42,
            seq: 9,
        },
        Msg::Refresh {
            entries: vec![entry(1, true)],
        },
        Msg::SnapshotChunk {
            entries: vec![entry(2, false)],
            last: true,
        },
    ] {
        assert_eq!(Msg::decode(&m.encode()), Ok(m));
    }
}

#[test]
fn bytes_per_entry_within_64() {
    let n = 256;
    let bytes = frame(&batch(n)).len() as f64 / f64::from(n);
    println!("IPv4 batch of {n}: {bytes:.1} bytes/entry on the wire (frame incl.)");
    assert!(bytes <= 64.0, "{bytes} bytes per entry");
}

#[test]
fn refuses_bad_messages() {
    assert_eq!(
        Msg::decode(
            &Msg::Hello {
                version: MIN_VERSION - 1,
                node_id: 1,
                incarnation: 1
            }
            .encode()
        ),
        Err(WireError::Version(MIN_VERSION - 1))
    );
    // Every version from the oldest accepted to the newest (and a newer
    // peer's Hello: it answers with what it speaks, we keep to ours).
    for version in MIN_VERSION..=VERSION + 1 {
        let m = Msg::Hello {
            version,
            node_id: 1,
            incarnation: 1,
        };
        assert_eq!(Msg::decode(&m.encode()), Ok(m));
    }
    let mut e = entry(1, false);
    e.saddr = vec![1, 2, 3];
    assert!(matches!(
        Msg::decode(&Msg::Refresh { entries: vec![e] }.encode()),
        Err(WireError::BadEntry(_))
    ));
    let mut e = entry(1, false);
    e.proto = 1;
    assert!(matches!(
        Msg::decode(&Msg::Refresh { entries: vec![e] }.encode()),
        Err(WireError::BadEntry(_))
    ));
    let big = Msg::Refresh {
        entries: (0..MAX_BATCH as u32 + 1).map(|i| entry(i, false)).collect(),
    };
    assert!(matches!(
        Msg::decode(&big.encode()),
        Err(WireError::BatchTooLong { .. })
    ));
    let mut bytes = batch(2).encode();
    bytes.push(0);
    assert_eq!(Msg::decode(&bytes), Err(WireError::Trailing));
    // A length prefix claiming a huge frame is refused before any allocation.
    let mut d = Deframer::default();
    d.push(&u32::MAX.to_be_bytes());
    assert!(matches!(d.next_msg(), Err(WireError::TooLarge(_))));
}

/// Entries the compact encoding must carry exactly: IPv6 next to IPv4, a
/// refreshed flow created long before the batch's first entry, a closing
/// one, extreme ports and times (differences wrap both ways).
fn awkward_entries() -> Vec<WireEntry> {
    let mut es: Vec<WireEntry> = (0..6).map(|i| entry(i, i % 2 == 1)).collect();
    es[1].created -= 3_600_000_000_000; // an hour before t0
    es[1].last_seen += 5_000_000_000;
    es[2].sport = 0;
    es[2].dport = u16::MAX;
    es[2].flags = 0x8001;
    es[2].proto = 17;
    es[3].created = 0;
    es[3].last_seen = u64::MAX;
    es[4].created = u64::MAX;
    es[4].last_seen = 0;
    es[5].backend_id = u32::MAX - 1; // u32::MAX is reserved
    es[5].origin = u16::MAX;
    es
}

#[test]
fn compact_batches_decode_to_the_same_batch() {
    for entries in [awkward_entries(), vec![entry(7, true)], Vec::new()] {
        let m = Msg::Batch {
            origin: 3,
            incarnation: u64::MAX,
            seq: 1 << 40,
            base: 5,
            entries,
        };
        let mut d = Deframer::default();
        d.push(&frame_compact(&m));
        assert_eq!(d.next_msg(), Ok(Some(m.clone())));
        assert_eq!(d.next_msg(), Ok(None));
    }
    // Anything but a batch is framed as version 1 frames it.
    let ack = Msg::Ack {
        incarnation: 1,
        seq: 2,
    };
    assert_eq!(frame_compact(&ack), frame(&ack));
    // A compact batch is validated like any batch.
    let mut bad = awkward_entries();
    bad[0].daddr = vec![1; 5];
    let mut d = Deframer::default();
    d.push(&frame_compact(&Msg::Batch {
        origin: 1,
        incarnation: 1,
        seq: 1,
        base: 1,
        entries: bad,
    }));
    assert!(matches!(d.next_msg(), Err(WireError::BadEntry(_))));
}

#[test]
fn compact_batches_cost_less_per_entry() {
    let n = 256;
    let full = frame(&batch(n)).len() as f64 / f64::from(n);
    let compact = frame_compact(&batch(n)).len() as f64 / f64::from(n);
    println!("IPv4 batch of {n}: {full:.1} bytes/entry in version 1, {compact:.1} compact");
    // 37 -> 25 bytes of entry: at least a quarter less on the wire.
    assert!(
        compact <= full * 0.75,
        "{compact} vs {full} bytes per entry"
    );
}

#[test]
fn deframer_reassembles_split_frames() {
    let msgs = [
        batch(3),
        Msg::Ack {
            incarnation: 1,
            seq: 2,
        },
        batch(1),
    ];
    let bytes: Vec<u8> = msgs.iter().flat_map(frame).collect();
    let mut d = Deframer::default();
    let mut got = Vec::new();
    for chunk in bytes.chunks(7) {
        d.push(chunk);
        while let Some(m) = d.next_msg().expect("valid stream") {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Msg::decode(&bytes);
        let mut d = Deframer::default();
        d.push(&bytes);
        while let Ok(Some(_)) = d.next_msg() {}
    }

    #[test]
    fn mutated_frames_decode_valid_or_fail(muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut bytes = batch(5).encode();
        for (i, b) in muts {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(Msg::Batch { entries, .. }) = Msg::decode(&bytes) {
            for e in entries {
                let alen = match e.family { 4 => 4, 6 => 16, f => panic!("family {f} decoded") };
                prop_assert_eq!(e.saddr.len(), alen);
                prop_assert_eq!(e.daddr.len(), alen);
                prop_assert!(e.proto == 6 || e.proto == 17);
            }
        }
    }

    #[test]
    fn mutated_compact_frames_decode_valid_or_fail(muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let m = Msg::Batch { origin: 3, incarnation: 42, seq: 9, base: 7, entries: awkward_entries() };
        let mut bytes = frame_compact(&m)[4..].to_vec();
        for (i, b) in muts {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        match Msg::decode(&bytes) {
            Ok(Msg::Batch { entries, .. }) => {
                prop_assert!(entries.len() <= MAX_BATCH);
                for e in entries {
                    let alen = match e.family { 4 => 4, 6 => 16, f => panic!("family {f} decoded") };
                    prop_assert_eq!(e.saddr.len(), alen);
                    prop_assert_eq!(e.daddr.len(), alen);
                    prop_assert!(e.proto == 6 || e.proto == 17);
                }
            }
            Ok(Msg::CompactBatch { .. }) => panic!("a compact batch escaped the decoder"),
            _ => {}
        }
    }
}

fn snat_entry(i: u32) -> WireEntry {
    WireEntry {
        flags: datapath_ebpf::abi::CT_F_SNAT,
        snat_port: 20_000 + i as u16,
        snat_slot: 3,
        ..entry(i, i % 2 == 1)
    }
}

fn deframe(f: &[u8]) -> Msg {
    let mut de = Deframer::default();
    de.push(f);
    de.next_msg().expect("decodes").expect("a whole frame")
}

#[test]
fn version_3_carries_snat_entries_and_older_versions_get_none() {
    let mixed: Vec<WireEntry> = (0..6)
        .map(|i| {
            if i % 3 == 0 {
                snat_entry(i)
            } else {
                entry(i, false)
            }
        })
        .collect();
    let dsr: Vec<WireEntry> = mixed.iter().filter(|e| !e.is_snat()).cloned().collect();
    let msgs = |es: Vec<WireEntry>| {
        vec![
            Msg::Batch {
                origin: 3,
                incarnation: 42,
                seq: 9,
                base: 7,
                entries: es.clone(),
            },
            Msg::Refresh {
                entries: es.clone(),
            },
            Msg::SnapshotChunk {
                entries: es,
                last: false,
            },
        ]
    };
    for (m, want_old) in msgs(mixed).into_iter().zip(msgs(dsr)) {
        // Version 3: exactly what was sent, SNAT fields included.
        assert_eq!(deframe(&frame_for(3, &m)), m);
        // Versions 1 and 2: the SNAT entries left out, the rest exact.
        assert_eq!(deframe(&frame_for(2, &m)), want_old);
        assert_eq!(deframe(&frame_for(1, &m)), want_old);
    }
}

#[test]
fn snat_fields_are_validated() {
    for (e, why) in [
        (
            WireEntry {
                snat_port: 0,
                ..snat_entry(1)
            },
            "without a port",
        ),
        (
            WireEntry {
                snat_slot: 999,
                ..snat_entry(1)
            },
            "SNAT slot",
        ),
        (
            WireEntry {
                snat_port: 5,
                ..entry(1, false)
            },
            "no SNAT entry",
        ),
    ] {
        let f = frame_for(3, &Msg::Refresh { entries: vec![e] });
        let mut de = Deframer::default();
        de.push(&f);
        let err = de.next_msg().expect_err("refused");
        assert!(err.to_string().contains(why), "{err}");
    }
}
