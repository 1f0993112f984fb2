//! t01: clusterctl as an operator meets it without a cluster: help, bad
//! arguments (exit 2, the argument named), no credentials (exit 7 with
//! what to give), and the certificate commands, which need no cluster.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_clusterctl");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        // No clusterctl.toml or credentials of the machine's user.
        .env("HOME", "/nonexistent")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("HOLDFAST_ADMIN")
        .env_remove("HOLDFAST_CA")
        .env_remove("HOLDFAST_CERT")
        .env_remove("HOLDFAST_KEY")
        .output()
        .expect("running clusterctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn t01_help_bad_arguments_and_missing_credentials() {
    let o = run(&["--help"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("members"), "{}", text(&o));

    let o = run(&["members", "--bogus"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--bogus"), "{}", text(&o));

    let o = run(&["backends", "add", "--service", "web", "--addr", "not-an-ip"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--addr"), "{}", text(&o));

    let o = run(&[
        "services",
        "add",
        "web",
        "--vip",
        "10.200.0.1",
        "--port",
        "80",
        "--forwarding",
        "nat",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--forwarding"), "{}", text(&o));
    assert!(text(&o).contains("use dsr or snat"), "{}", text(&o));

    let o = run(&["members"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("no client certificate"), "{}", text(&o));
}

#[test]
fn t01_certificates_without_a_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let o = run(&["certs", "init", "--dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["certs", "init", "--dir", d]);
    assert_eq!(o.status.code(), Some(6), "a CA is never overwritten");
    assert!(text(&o).contains("refusing to overwrite"), "{}", text(&o));
    let o = run(&[
        "certs", "issue", "--dir", d, "--client", "alice", "--role", "viewer",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        "certs", "issue", "--dir", d, "--client", "bob", "--role", "root",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("--role"), "{}", text(&o));
    let pem = dir.path().join("client-alice.pem");
    let o = run(&["-o", "json", "certs", "show", pem.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["cn"], "alice");
    assert_eq!(v["ou"], "viewer");
}
