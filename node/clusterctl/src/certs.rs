//! `clusterctl certs …`: the cluster CA, node and client certificates (on
//! local files), and the revocation list (in the cluster config).

use anyhow::{anyhow, Context};
use holdfast_api::auth::Role;
use holdfast_pki as tls;
use raft_store::{cluster::Revocation, ClusterState, Command};
use rustls_pki_types::pem::PemObject;

use crate::{
    args::{CertCmd, Cli},
    ctx::{applied, command, print, table, Ctx},
    error::Failure,
};

/// The certificate commands that need no cluster (None: it needs one).
pub fn local(cli: &Cli, cmd: &CertCmd) -> Option<Result<(), Failure>> {
    Some(match cmd {
        CertCmd::Init { dir, cluster } => (|| {
            if dir.join("ca.key").exists() {
                return Err(anyhow!(
                    "{} already holds a CA; refusing to overwrite it",
                    dir.display()
                )
                .into());
            }
            let (cert, key) = tls::generate_ca(cluster)?;
            tls::write_pair(dir, "ca", &cert, &key)?;
            println!("wrote {0}/ca.pem and {0}/ca.key", dir.display());
            Ok(())
        })(),
        CertCmd::Issue {
            dir,
            node_id,
            ip,
            client,
            role,
            admin,
            days,
        } => (|| {
            if *days == 0 || *days > 36_500 {
                return Err(anyhow!("--days must be 1..=36500").into());
            }
            let (subject, name) = match (node_id, client, admin) {
                (Some(id), None, None) if role.is_none() => (
                    tls::Subject::Node {
                        id: *id,
                        ips: ip.clone(),
                    },
                    format!("node-{id}"),
                ),
                (None, Some(c), None) => {
                    let Some(r) = role.as_deref() else {
                        return Err(anyhow!("--client needs --role admin|operator|viewer").into());
                    };
                    let r = Role::parse(r)
                        .ok_or_else(|| anyhow!("--role {r:?}: use admin, operator or viewer"))?;
                    (
                        tls::Subject::Client {
                            name: c.clone(),
                            role: r.as_str().into(),
                        },
                        format!("client-{c}"),
                    )
                }
                (None, None, Some(a)) if role.is_none() => (
                    tls::Subject::Client {
                        name: a.clone(),
                        role: Role::Admin.as_str().into(),
                    },
                    format!("client-{a}"),
                ),
                _ => {
                    return Err(anyhow!(
                    "give exactly one of --node-id N, --client NAME --role ROLE, or --admin NAME"
                )
                    .into())
                }
            };
            if !ip.is_empty() && node_id.is_none() {
                return Err(anyhow!("--ip is for node certificates (--node-id)").into());
            }
            let ca = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
            let ca_key = std::fs::read_to_string(dir.join("ca.key")).context("reading ca.key")?;
            let (cert, key) = tls::issue_with(&ca, &ca_key, &subject, tls::Validity::days(*days))?;
            tls::write_pair(dir, &name, &cert, &key)?;
            let info = tls::Identity::from_pem(&ca, &cert, &key)?.info()?;
            println!(
                "wrote {0}/{name}.pem and {0}/{name}.key ({1}, serial {2})",
                dir.display(),
                info.subject(),
                info.serial
            );
            Ok(())
        })(),
        CertCmd::Show { file } => (|| {
            let der = rustls_pki_types::CertificateDer::from_pem_file(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let info = tls::cert_info(&der)?;
            print(cli.output, &info, |i| {
                format!(
                    "subject {}\nissuer  {}\nserial  {}\nvalid   {} .. {} (Unix time)\n",
                    i.subject(),
                    i.issuer,
                    i.serial,
                    i.not_before,
                    i.not_after
                )
            })
        })(),
        _ => return None,
    })
}

/// The certificate commands that read or change the cluster config.
pub fn remote(cx: &Ctx, cmd: &CertCmd) -> Result<(), Failure> {
    match cmd {
        CertCmd::Revoke { serial, file, note } => {
            let serial = match (serial, file) {
                (Some(s), None) => tls::normalize_serial(s)?,
                (None, Some(f)) => {
                    let der = rustls_pki_types::CertificateDer::from_pem_file(f)
                        .with_context(|| format!("reading {}", f.display()))?;
                    tls::cert_info(&der)?.serial
                }
                _ => return Err(anyhow!("give exactly one of --serial or --file").into()),
            };
            let r = command(
                cx,
                Command::RevokeCertificate {
                    revocation: Revocation {
                        serial,
                        note: note.clone(),
                    },
                },
            )?;
            applied(cx.cli, r)
        }
        CertCmd::Unrevoke { serial } => {
            let serial = tls::normalize_serial(serial)?;
            let r = command(cx, Command::UnrevokeCertificate { serial })?;
            applied(cx.cli, r)
        }
        CertCmd::Revoked => {
            let c: ClusterState = cx.get("/config")?;
            let list: Vec<&Revocation> = c.revoked.values().collect();
            print(cx.cli.output, &list, |l| {
                table(
                    &["SERIAL", "NOTE"],
                    l.iter()
                        .map(|r| vec![r.serial.clone(), r.note.clone()])
                        .collect(),
                )
            })
        }
        _ => Err(anyhow!("not a cluster command").into()),
    }
}
