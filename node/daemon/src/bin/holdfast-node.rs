//! holdfast-node: the Holdfast LB node daemon.
//!
//! `holdfast-node --config node.toml`. On SIGTERM or SIGINT it leaves the
//! cluster (if `leave_on_shutdown`), stops Raft and its QUIC endpoint, and
//! keeps the pinned datapath forwarding or detaches it
//! (`datapath.keep_on_shutdown`). Exit codes: 0 clean stop, 2 bad config,
//! 1 any other start-up failure.

use std::process::ExitCode;

fn main() -> ExitCode {
    holdfast_node::daemon::main_from(std::env::args_os())
}
