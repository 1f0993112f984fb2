//! Maglev table properties: balance, minimal disruption, weights and
//! determinism (a golden table checked in: any change to the algorithm or
//! its hashes would make LB nodes of different versions disagree).
//! `HOLDFAST_BLESS=1 cargo test -p datapath-ebpf --test maglev` rewrites the
//! golden files — only ever on purpose, with a version bump of the ABI.

use std::collections::HashMap;

use datapath_ebpf::maglev::{build_table, MaglevBackend, DEFAULT_TABLE_SIZE};

fn equal(ids: impl IntoIterator<Item = u32>) -> Vec<MaglevBackend> {
    ids.into_iter()
        .map(|id| MaglevBackend { id, weight: 1 })
        .collect()
}

fn shares(table: &[u32]) -> HashMap<u32, usize> {
    let mut m = HashMap::new();
    for &b in table {
        *m.entry(b).or_default() += 1;
    }
    m
}

#[test]
fn balance_100_backends() {
    let t = build_table(&equal(0..100), DEFAULT_TABLE_SIZE).expect("table");
    let s = shares(&t);
    assert_eq!(s.len(), 100);
    let max = *s.values().max().expect("max") as f64;
    let min = *s.values().min().expect("min") as f64;
    println!(
        "100 backends, M=65537: min {min} max {max} ratio {:.4}",
        max / min
    );
    assert!(
        max / min <= 1.01,
        "largest/smallest share {} > 1.01",
        max / min
    );
}

#[test]
fn minimal_disruption_on_removal() {
    let n = 50u32;
    let before = build_table(&equal(0..n), DEFAULT_TABLE_SIZE).expect("table");
    let victim = 17;
    let after =
        build_table(&equal((0..n).filter(|&i| i != victim)), DEFAULT_TABLE_SIZE).expect("table");
    let m = before.len() as f64;
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64;
    let between_survivors = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| a != b && **a != victim)
        .count() as f64;
    println!(
        "remove 1 of {n}: {:.4} of slots changed (ideal {:.4}), {:.4} moved between survivors",
        changed / m,
        1.0 / f64::from(n),
        between_survivors / m
    );
    assert!(after.iter().all(|&b| b != victim));
    assert!(
        changed / m <= 1.0 / f64::from(n) + 0.01,
        "too many slots changed"
    );
    assert!(
        between_survivors / m <= 0.01,
        "too much churn between survivors"
    );
}

#[test]
fn minimal_disruption_on_addition() {
    let n = 10u32;
    let before = build_table(&equal(0..n), DEFAULT_TABLE_SIZE).expect("table");
    let after = build_table(&equal(0..=n), DEFAULT_TABLE_SIZE).expect("table");
    let m = before.len() as f64;
    let to_new = after.iter().filter(|&&b| b == n).count() as f64;
    let between_old = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| a != b && **b != n)
        .count() as f64;
    println!(
        "add 1 to {n}: {:.4} to the new backend, {:.4} between old ones",
        to_new / m,
        between_old / m
    );
    assert!((to_new / m - 1.0 / f64::from(n + 1)).abs() < 0.01);
    assert!(between_old / m <= 0.02);
}

#[test]
fn weights_are_honoured() {
    let b = vec![
        MaglevBackend { id: 1, weight: 1 },
        MaglevBackend { id: 2, weight: 2 },
        MaglevBackend { id: 3, weight: 5 },
    ];
    let t = build_table(&b, DEFAULT_TABLE_SIZE).expect("table");
    let s = shares(&t);
    let m = t.len() as f64;
    for (id, w) in [(1u32, 1.0), (2, 2.0), (3, 5.0)] {
        let got = s[&id] as f64 / m;
        assert!((got - w / 8.0).abs() < 0.005, "backend {id}: share {got}");
    }
}

#[test]
fn input_order_does_not_matter() {
    let mut b = equal([5, 9, 1, 77, 23]);
    let t1 = build_table(&b, 251).expect("table");
    b.reverse();
    assert_eq!(t1, build_table(&b, 251).expect("table"));
}

fn fnv1a(table: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in table {
        for byte in v.to_le_bytes() {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("HOLDFAST_BLESS").is_some() {
        std::fs::write(&path, actual).expect("write golden");
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (HOLDFAST_BLESS=1 creates it)", path.display()));
    assert_eq!(actual, want, "Maglev output changed: {}", path.display());
}

#[test]
fn golden_tables() {
    let small = build_table(
        &[
            MaglevBackend { id: 3, weight: 1 },
            MaglevBackend { id: 10, weight: 1 },
            MaglevBackend { id: 11, weight: 2 },
            MaglevBackend { id: 42, weight: 1 },
            MaglevBackend {
                id: 1000,
                weight: 3,
            },
        ],
        251,
    )
    .expect("table");
    let text: Vec<String> = small.iter().map(u32::to_string).collect();
    golden("maglev_251.txt", &(text.join("\n") + "\n"));
    let big = build_table(&equal(0..10), DEFAULT_TABLE_SIZE).expect("table");
    golden(
        "maglev_65537_10_fnv1a.txt",
        &format!("{:016x}\n", fnv1a(&big)),
    );
}
