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

/// Samples kept for quantiles by default: the most recent million.
pub const DEFAULT_SAMPLES: usize = 1_000_000;

pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
    samples: Mutex<Samples>,
}

/// The most recent `cap` samples: a ring once full, so quantiles follow
/// what happens now (a node that replicated its first million entries
/// long ago still reports today's lag).
struct Samples {
    v: Vec<u64>,
    cap: usize,
    /// Where the next sample goes once `v` is full (the oldest one).
    next: usize,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::with_samples(DEFAULT_SAMPLES)
    }
}

impl Histogram {
    /// A histogram keeping the most recent `cap` (at least 1) samples for quantiles.
    pub fn with_samples(cap: usize) -> Self {
        Self {
            counts: Default::default(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            samples: Mutex::new(Samples {
                v: Vec::new(),
                cap: cap.max(1),
                next: 0,
            }),
        }
    }

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
            let ns = d.as_nanos() as u64;
            if samples.v.len() < samples.cap {
                samples.v.push(ns);
            } else {
                let i = samples.next;
                samples.v[i] = ns;
                samples.next = (i + 1) % samples.cap;
            }
        }
    }

    /// Forget the samples kept for quantiles (the buckets stay): a bench
    /// measures one load step after another.
    pub fn reset_samples(&self) {
        let mut s = self.samples.lock().expect("histogram lock");
        s.v.clear();
        s.next = 0;
    }

    /// Quantile (0..=1) of the kept samples (the most recent million, by
    /// default, since the start or the last reset), if any.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.samples.lock().expect("histogram lock").v.clone();
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
        self.render_samples(out, name, "");
    }

    /// Append the samples of one member of a histogram family whose
    /// `# HELP`/`# TYPE` lines the caller wrote; `labels` is `key="value"`
    /// pairs, comma-separated and already escaped (empty for none).
    pub fn render_samples(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braced} {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count{braced} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quantiles_follow_the_most_recent_samples() {
        let h = Histogram::with_samples(4);
        h.observe_many((1..=4).map(ms));
        assert_eq!(h.quantile(0.0), Some(ms(1)));
        // Four more: the first four are gone, the buckets still count all.
        h.observe_many((10..=13).map(ms));
        assert_eq!(h.quantile(0.0), Some(ms(10)));
        assert_eq!(h.quantile(1.0), Some(ms(13)));
        h.observe(ms(20));
        assert_eq!(h.quantile(0.0), Some(ms(11)));
        assert_eq!(h.quantile(1.0), Some(ms(20)));
        let mut out = String::new();
        h.render_prometheus(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_count 9\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 4\n"), "{out}");
        h.reset_samples();
        assert_eq!(h.quantile(0.5), None);
        h.observe(ms(7));
        assert_eq!(h.quantile(0.5), Some(ms(7)));
    }

    #[test]
    fn labelled_samples_keep_the_labels_on_every_line() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        let mut out = String::new();
        h.render_samples(&mut out, "lag_seconds", "stage=\"ring\"");
        assert!(
            out.contains("lag_seconds_bucket{stage=\"ring\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("lag_seconds_bucket{stage=\"ring\",le=\"+Inf\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("lag_seconds_sum{stage=\"ring\"} 0.0003\n"),
            "{out}"
        );
        assert!(
            out.contains("lag_seconds_count{stage=\"ring\"} 1\n"),
            "{out}"
        );
        assert_eq!(out.lines().count(), BUCKETS.len() + 3);
    }
}
