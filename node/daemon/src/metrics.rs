//! The node's own metrics (the text format is `holdfast-metrics`).

use std::sync::atomic::AtomicU64;

use holdfast_metrics::Histogram;

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
    /// Admin API refusals by [`holdfast_api::auth::Refusal::index`].
    pub admin_refused: [AtomicU64; holdfast_api::auth::Refusal::REASONS.len()],
    /// Raft RPCs refused (sender not a member, or not whom it claims).
    pub raft_rpcs_refused: std::sync::Arc<AtomicU64>,
}
