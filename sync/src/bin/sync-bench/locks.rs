//! `sync-bench --locks`: the replication service's shared maps, measured
//! the way it touches them — the per-peer table on every batch (lock,
//! then every peer's sender: `broadcast`) and the transport's connection
//! cache on every call (one peer's entry) — with the lock it uses beside
//! `dashmap` (sharded locks) and an `RwLock`, on one thread and on two at
//! once (contended). ns per operation, median of 5 rounds.

use std::{
    collections::HashMap,
    hint::black_box,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use anyhow::Result;
use dashmap::DashMap;
use serde::Serialize;

#[derive(Serialize)]
struct Row {
    peers: u64,
    threads: usize,
    /// Lock the table and visit every peer (the service's broadcast).
    broadcast_mutex_ns: f64,
    broadcast_rwlock_ns: f64,
    broadcast_dashmap_ns: f64,
    /// One peer's entry (the transport's connection cache).
    get_std_mutex_ns: f64,
    get_tokio_mutex_ns: f64,
    get_dashmap_ns: f64,
}

const OPS: u64 = 400_000;
const ROUNDS: usize = 5;

/// Median ns per op of `f` run `OPS` times on each of `threads` threads
/// at once, over `ROUNDS` rounds.
fn measure(threads: usize, f: impl Fn(u64) + Sync) -> f64 {
    let mut per_round: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    let f = &f;
                    s.spawn(move || {
                        for i in 0..OPS {
                            f(i.wrapping_add(t as u64));
                        }
                    });
                }
            });
            t0.elapsed().as_nanos() as f64 / OPS as f64
        })
        .collect();
    per_round.sort_by(|a, b| a.total_cmp(b));
    per_round[ROUNDS / 2]
}

pub fn run(json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for peers in [2u64, 4, 16] {
        // The value stands for a peer's sender / connection: an Arc.
        let std_map: Mutex<HashMap<u64, Arc<u64>>> =
            Mutex::new((0..peers).map(|p| (p, Arc::new(p))).collect());
        let rw_map: RwLock<HashMap<u64, Arc<u64>>> =
            RwLock::new((0..peers).map(|p| (p, Arc::new(p))).collect());
        let dash: DashMap<u64, Arc<u64>> = (0..peers).map(|p| (p, Arc::new(p))).collect();
        let tokio_map: tokio::sync::Mutex<HashMap<u64, Arc<u64>>> =
            tokio::sync::Mutex::new((0..peers).map(|p| (p, Arc::new(p))).collect());
        for threads in [1usize, 2] {
            let row = Row {
                peers,
                threads,
                broadcast_mutex_ns: measure(threads, |_| {
                    for (k, v) in std_map.lock().expect("map").iter() {
                        black_box((k, Arc::clone(v)));
                    }
                }),
                broadcast_rwlock_ns: measure(threads, |_| {
                    for (k, v) in rw_map.read().expect("map").iter() {
                        black_box((k, Arc::clone(v)));
                    }
                }),
                broadcast_dashmap_ns: measure(threads, |_| {
                    for e in dash.iter() {
                        black_box((e.key(), Arc::clone(e.value())));
                    }
                }),
                get_std_mutex_ns: measure(threads, |i| {
                    black_box(std_map.lock().expect("map").get(&(i % peers)).cloned());
                }),
                // lock().await, polled by hand (no runtime in the way).
                get_tokio_mutex_ns: measure(threads, |i| {
                    let fut = async { tokio_map.lock().await.get(&(i % peers)).cloned() };
                    black_box(futures_block_on(fut));
                }),
                get_dashmap_ns: measure(threads, |i| {
                    black_box(dash.get(&(i % peers)).map(|e| Arc::clone(e.value())));
                }),
            };
            if !json {
                println!(
                    "peers {:>2} threads {}: broadcast mutex {:6.1} rwlock {:6.1} dashmap {:6.1} ns | get std mutex {:5.1} tokio mutex {:5.1} dashmap {:5.1} ns",
                    row.peers,
                    row.threads,
                    row.broadcast_mutex_ns,
                    row.broadcast_rwlock_ns,
                    row.broadcast_dashmap_ns,
                    row.get_std_mutex_ns,
                    row.get_tokio_mutex_ns,
                    row.get_dashmap_ns
                );
            }
            rows.push(row);
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "locks": rows }))?
        );
    }
    Ok(())
}

/// Poll a future that is ready at once (an uncontended tokio lock) to
/// completion without a runtime; a future that is not ready is polled
/// again (never the case here: nothing else holds the lock long).
fn futures_block_on<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::hint::spin_loop();
    }
}
