//! The bench's datapath config and its flow generator (shared by the
//! latency bench and the scale bench).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use datapath_ebpf::{
    packet::{Packet, TCP_SYN},
    testrun, BackendSpec, BackendState, Datapath, DatapathConfig, Proto, ServiceSpec,
};

pub fn config() -> DatapathConfig {
    DatapathConfig {
        epoch: 1,
        services: vec![ServiceSpec {
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
            vip: "10.200.0.1".parse().expect("static"),
            port: 80,
            proto: Proto::Tcp,
            table_size: 65_537,
            backends: (1..=3)
                .map(|i| BackendSpec {
                    id: i,
                    addr: format!("10.99.0.1{i}").parse().expect("static"),
                    weight: 1,
                    state: BackendState::Active,
                    port: 0,
                })
                .collect(),
            forwarding: Default::default(),
        }],
        snat: Default::default(),
    }
}

/// Create flows `[from, to)` on `dp` (distinct client addresses), pacing to
/// `rate` per second if given.
pub fn generate(dp: &Arc<Mutex<Datapath>>, from: u32, to: u32, rate: Option<u32>) -> Result<()> {
    let mut frame = Packet::tcp("100.64.0.0", 40000, "10.200.0.1", 80, TCP_SYN).frame();
    let fd = dp.lock().expect("dp").program().fd()?.try_clone()?;
    let start = Instant::now();
    for (i, n) in (from..to).enumerate() {
        frame[26..30].copy_from_slice(&(0x6440_0000u32 + n).to_be_bytes());
        testrun::run_fd(std::os::fd::AsFd::as_fd(&fd), &frame, 0)?;
        // Pace every flow: a steady arrival rate (bursts would let the three
        // generator threads starve the replication runtime on 2 cores).
        if let Some(r) = rate {
            let due = start + Duration::from_secs_f64(i as f64 / f64::from(r));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(())
}
