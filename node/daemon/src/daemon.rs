//! The holdfast-node daemon's entry point, as a library function so the
//! chaos lab can run the very same daemon (`chaos _node`) in a network
//! namespace without a second binary to find.

use std::{path::PathBuf, process::ExitCode};

use crate::{config::NodeConfig, node::Node, telemetry};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(name = "holdfast-node", version, about = "Holdfast LB node daemon")]
struct Args {
    /// The node's TOML config file (HOLDFAST_* environment variables override it).
    #[arg(long, short)]
    config: PathBuf,
    /// Only load and validate the config (with the environment applied),
    /// print it as JSON and exit: 0 if it would start, 2 if not.
    #[arg(long)]
    check: bool,
}

pub fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
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
    if args.check {
        match serde_json::to_string_pretty(&cfg) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("holdfast-node: {e}"),
        }
        return ExitCode::SUCCESS;
    }
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
