//! A small Prometheus text-format registry: counters, gauges and
//! fixed-bucket histograms with stable names and help text.

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
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        let mut samples = self.samples.lock().expect("histogram lock");
        if samples.len() < 100_000 {
            samples.push(d.as_nanos() as u64);
        }
    }

    /// Quantile (0..=1) of the recorded samples (first 100k), if any.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.samples.lock().expect("histogram lock").clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        Some(Duration::from_nanos(v[i]))
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
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

/// The node's own metrics (Raft and datapath gauges are read at render time).
#[derive(Default)]
pub struct Metrics {
    /// Admin-API writes: submit → committed and applied on the leader.
    pub commit_latency: Histogram,
    /// Committed epoch → programmed into this node's datapath.
    pub datapath_apply: Histogram,
    pub datapath_apply_errors: AtomicU64,
    pub commands_rejected: AtomicU64,
    pub writes_forwarded: AtomicU64,
}

/// Helpers to write metric families.
pub struct Writer<'a>(pub &'a mut String);

impl Writer<'_> {
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, String)], v: f64) {
        self.family(name, help, "gauge");
        self.sample(name, labels, v);
    }

    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, String)], v: u64) {
        self.family(name, help, "counter");
        self.sample(name, labels, v as f64);
    }

    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, String)], v: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            let _ = writeln!(self.0, "{name}{{{}}} {v}", l.join(","));
        }
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        h.render(self.0, name, help);
    }
}
