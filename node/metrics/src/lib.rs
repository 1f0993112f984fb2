//! The Prometheus text format as Holdfast writes it: counters, gauges and
//! fixed-bucket histograms with stable names and help text ([`Writer`]),
//! and the latency histogram that also keeps recent samples for quantiles
//! ([`Histogram`]). Shared by the daemon, replication and health checks;
//! depends on no other Holdfast crate.

mod hist;

use std::fmt::Write as _;

pub use hist::{Histogram, DEFAULT_SAMPLES};

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
            let _ = writeln!(self.0, "{name}{{{}}} {v}", label_pairs(labels));
        }
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        h.render_prometheus(self.0, name, help);
    }

    /// One histogram family with a member per value of the label `key`.
    pub fn histograms(
        &mut self,
        name: &str,
        help: &str,
        key: &str,
        members: &[(&str, &Histogram)],
    ) {
        self.family(name, help, "histogram");
        for (value, h) in members {
            h.render_samples(self.0, name, &label_pairs(&[(key, value.to_string())]));
        }
    }
}

/// `k="v"` pairs, comma-separated, values escaped.
fn label_pairs(labels: &[(&str, String)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(",")
}
