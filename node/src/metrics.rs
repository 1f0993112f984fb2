//! A small Prometheus text-format registry: counters, gauges and
//! fixed-bucket histograms with stable names and help text.

use std::{fmt::Write as _, sync::atomic::AtomicU64};

pub use sync::hist::Histogram;

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
    /// Admin API refusals by [`crate::auth::Refusal::index`].
    pub admin_refused: [AtomicU64; crate::auth::Refusal::REASONS.len()],
    /// Raft RPCs refused (sender not a member, or not whom it claims).
    pub raft_rpcs_refused: std::sync::Arc<AtomicU64>,
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
