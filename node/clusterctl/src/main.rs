//! clusterctl: the operator's CLI for a Holdfast cluster. Talks to the admin
//! API of any node (`--node`, or HOLDFAST_ADMIN) over HTTPS with a client
//! certificate from the cluster CA (`--cert/--key/--ca`, HOLDFAST_CERT /
//! HOLDFAST_KEY / HOLDFAST_CA, or clusterctl.toml); writes go to the leader.
//!
//! Exit codes: 0 success; 2 bad arguments or request; 3 node unreachable;
//! 4 no leader / cluster unavailable; 5 command rejected (the reason is
//! printed); 6 any other failure; 7 refused: no or untrusted certificate,
//! role too weak, or the server's certificate does not verify.

mod args;
mod certs;
mod ctx;
mod error;
mod nodes;
mod pools;
mod services;
mod settings;
mod snat;
mod top;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use holdfast_api::client::ClientError;

use crate::{
    args::{Cli, Cmd},
    ctx::Ctx,
    error::Failure,
    settings::Settings,
};

fn run(cli: &Cli) -> Result<(), Failure> {
    if let Cmd::Certs { cmd } = &cli.cmd {
        if let Some(r) = certs::local(cli, cmd) {
            return r;
        }
    }
    let settings = Settings::resolve(cli)?;
    let mut cx = Ctx {
        cli,
        client: settings.client()?,
        node: settings.node.clone(),
    };
    if let Cmd::Drain {
        node_id: Some(id), ..
    }
    | Cmd::Undrain { node_id: Some(id) } = &cli.cmd
    {
        cx.node = nodes::admin_addr_of(&cx, *id)?;
    }
    match &cli.cmd {
        Cmd::Top { interval_s, once } => nodes::top(&cx, *interval_s, *once),
        Cmd::Drain {
            wait,
            quiet_ms,
            max_wait_s,
            ..
        } => {
            if *wait {
                nodes::post_drain(&cx, true)?;
                nodes::wait_moved(
                    &cx,
                    Duration::from_millis(*quiet_ms),
                    Duration::from_secs(*max_wait_s),
                )
            } else {
                nodes::drain(&cx, true)
            }
        }
        Cmd::Undrain { .. } => nodes::drain(&cx, false),
        Cmd::Status => nodes::status(&cx),
        Cmd::Members => nodes::members(&cx),
        Cmd::Config => nodes::config(&cx),
        Cmd::Services { cmd } => services::services(&cx, cmd.as_ref()),
        Cmd::Backends { cmd } => services::backends(&cx, cmd.as_ref()),
        Cmd::Join {
            node_id,
            raft_addr,
            admin_addr,
            bgp_next_hop,
        } => nodes::join(&cx, node_id, raft_addr, admin_addr, bgp_next_hop),
        Cmd::Leave { node_id } | Cmd::Remove { node_id } => nodes::remove(&cx, node_id),
        Cmd::Conntrack {
            node_id,
            vip,
            limit,
        } => nodes::conntrack(&cx, node_id, vip, limit),
        Cmd::Certs { cmd } => certs::remote(&cx, cmd),
        Cmd::Snat { cmd } => snat::snat(&cx, cmd.as_ref()),
        Cmd::Pools { cmd } => pools::pools(&cx, cmd.as_ref()),
    }
}

/// What to do about a refusal, added to the server's reason.
fn hint(e: &ClientError) -> &'static str {
    match e {
        ClientError::Api { status: 403, .. } => {
            "\nhint: your certificate's role is too weak for this; use a certificate with the role named above (`clusterctl certs show FILE` shows yours)"
        }
        ClientError::Api { status: 401, .. } => {
            "\nhint: use a current, unrevoked client certificate issued by this cluster's CA (`clusterctl certs issue --client NAME --role ROLE`)"
        }
        _ => "",
    }
}

fn main() -> ExitCode {
    holdfast_pki::install_crypto_provider();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Client(e)) => {
            eprintln!("clusterctl: {e}{}", hint(&e));
            ExitCode::from(e.exit_code() as u8)
        }
        Err(Failure::Usage(why)) => {
            eprintln!("clusterctl: {why}");
            ExitCode::from(2)
        }
        Err(Failure::Auth(why)) => {
            eprintln!("clusterctl: {why}");
            ExitCode::from(7)
        }
        Err(Failure::Other(e)) => {
            eprintln!("clusterctl: {e:#}");
            ExitCode::from(6)
        }
    }
}
