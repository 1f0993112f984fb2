//! holdfast-node: the Holdfast LB node daemon.
//!
//! `holdfast-node --config node.toml`. On SIGTERM or SIGINT it leaves the
//! cluster (if `leave_on_shutdown`), stops Raft and its QUIC endpoint, and
//! keeps the pinned datapath forwarding or detaches it
//! (`datapath.keep_on_shutdown`). Exit codes: 0 clean stop, 2 bad config,
//! 1 any other start-up failure.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use node::{config::NodeConfig, telemetry, Node};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(version, about = "Holdfast LB node daemon")]
struct Args {
    /// The node's TOML config file (HOLDFAST_* environment variables override it).
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("holdfast-node: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(run(args));
    // Do not wait for stray blocking calls (e.g. an HTTP call to a dead peer).
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

async fn run(args: Args) -> ExitCode {
    let _telemetry = match telemetry::init("holdfast-node") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("holdfast-node: {e:#}");
            return ExitCode::from(1);
        }
    };
    let cfg = match NodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("holdfast-node: {e}");
            return ExitCode::from(2);
        }
    };
    let leave = cfg.leave_on_shutdown;
    let node = match Node::start(cfg).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("holdfast-node: {e:#}");
            return ExitCode::from(1);
        }
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("holdfast-node: cannot install signal handlers");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    node.shutdown(leave).await;
    ExitCode::SUCCESS
}
