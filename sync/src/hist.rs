//! A fixed-bucket latency histogram that also keeps samples for quantiles.

use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

/// Bucket upper bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
    samples: Mutex<Vec<u64>>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: Default::default(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            samples: Mutex::new(Vec::new()),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.observe_many(std::iter::once(d));
    }

    /// Record many observations under one lock.
    pub fn observe_many(&self, ds: impl IntoIterator<Item = Duration>) {
        let mut samples = self.samples.lock().expect("histogram lock");
        for d in ds {
            let s = d.as_secs_f64();
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    self.counts[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            self.count.fetch_add(1, Ordering::Relaxed);
            self.sum_ns
                .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
            if samples.len() < 1_000_000 {
                samples.push(d.as_nanos() as u64);
            }
        }
    }

    /// Forget the samples kept for quantiles (the buckets stay): a bench
    /// measures one load step after another.
    pub fn reset_samples(&self) {
        self.samples.lock().expect("histogram lock").clear();
    }

    /// Quantile (0..=1) of the recorded samples (the first million since
    /// the start or the last reset), if any.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.samples.lock().expect("histogram lock").clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        Some(Duration::from_nanos(v[i]))
    }

    /// Append the histogram in Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}
