//! t16: the bare-metal systemd units (deploy/systemd, with their drop-ins)
//! pass `systemd-analyze verify` with no warning, with the ExecStart binaries
//! pointed at the ones this build made; their sandbox lets the node write
//! what the example node.toml says it writes; and the command lines they
//! run are accepted by the binaries' own argument parsers.

use std::{collections::BTreeSet, path::Path, process::Command};

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn key<'a>(unit: &'a str, k: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{k}=")))
        .collect()
}

#[test]
fn t16_units_verify_and_match_the_example_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut units = Vec::new();
    for e in std::fs::read_dir(deploy().join("systemd")).expect("deploy/systemd") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "service") {
            let text = std::fs::read_to_string(&p).expect("unit");
            let local = text
                .replace(
                    "/usr/local/bin/holdfast-node",
                    env!("CARGO_BIN_EXE_holdfast-node"),
                )
                .replace(
                    "/usr/local/bin/holdfast-decap",
                    holdfast_node::testing::workspace_bin("holdfast-decap", "holdfast-decap")
                        .to_str()
                        .expect("a UTF-8 path"),
                );
            let dst = dir.path().join(p.file_name().expect("name"));
            std::fs::write(&dst, local).expect("write");
            units.push((p, text, dst));
        }
    }
    // Drop-ins (holdfast-node.service.d/frr.conf: FRR as the speaker)
    // beside their units, so the verification reads them too.
    let mut dropins = BTreeSet::new();
    for e in std::fs::read_dir(deploy().join("systemd")).expect("deploy/systemd") {
        let p = e.expect("entry").path();
        if p.is_dir() && p.extension().is_some_and(|x| x == "d") {
            let dst = dir.path().join(p.file_name().expect("name"));
            std::fs::create_dir_all(&dst).expect("mkdir");
            for f in std::fs::read_dir(&p).expect("drop-in dir") {
                let f = f.expect("entry").path();
                std::fs::copy(&f, dst.join(f.file_name().expect("name"))).expect("copy");
                dropins.insert(format!(
                    "{}/{}",
                    p.file_name().expect("n").to_string_lossy(),
                    f.file_name().expect("n").to_string_lossy()
                ));
            }
        }
    }
    assert_eq!(
        dropins,
        BTreeSet::from(["holdfast-node.service.d/frr.conf".to_string()])
    );
    let names: BTreeSet<String> = units
        .iter()
        .map(|(p, _, _)| p.file_name().expect("n").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "bird-holdfast.service".to_string(),
            "bird-holdfast-bfd.service".to_string(),
            "holdfast-decap.service".to_string(),
            "holdfast-node.service".to_string()
        ])
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units.iter().map(|(_, _, d)| d))
        .output()
        .expect("systemd-analyze must be installed (package systemd; scripts/install-deps.sh)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    // The check itself catches a bad unit.
    let bad = dir.path().join("bad.service");
    std::fs::write(
        &bad,
        "[Service]\nExecStart=/bin/true\nProtectSystem=sometimes\n",
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&bad)
        .output()
        .expect("systemd-analyze");
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());

    // holdfast-node: reads /etc/holdfast/node.toml; may write its data dir,
    // bpffs and BIRD's control socket — what node.example.toml names.
    let node = &units
        .iter()
        .find(|(p, _, _)| p.ends_with("holdfast-node.service"))
        .expect("node unit")
        .1;
    assert!(key(node, "ExecStart")[0].ends_with("--config /etc/holdfast/node.toml"));
    let rw: BTreeSet<&str> = key(node, "ReadWritePaths")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    let cfg = holdfast_node::config::NodeConfig::parse(
        &std::fs::read_to_string(deploy().join("baremetal/node.example.toml")).expect("example"),
    )
    .expect("node.example.toml parses");
    let under = |p: &Path| rw.iter().any(|d| p.starts_with(d));
    assert!(
        under(&cfg.data_dir),
        "data_dir {:?} not writable",
        cfg.data_dir
    );
    if let Some(pin) = &cfg.datapath.pin_dir {
        assert!(under(pin), "pin_dir {pin:?} not writable");
    }
    assert!(
        under(&cfg.bgp.bird_ctl),
        "bird_ctl {:?} not writable",
        cfg.bgp.bird_ctl
    );
    // The files it renders for BIRD: rewritten through a rename, so their
    // directory must be writable.
    for f in [&cfg.bgp.bird_state_file, &cfg.bgp.snat_routes_file]
        .into_iter()
        .flatten()
    {
        let d = f.parent().expect("a directory");
        assert!(under(d), "{d:?} (for {f:?}) not writable");
    }
    assert!(
        cfg.bgp.bird_state_file.is_some(),
        "the example keeps BIRD's state across a graceful restart"
    );
    // ExecStartPre's --check accepts the example config and refuses a bad one.
    let pre = key(node, "ExecStartPre")[0];
    assert!(
        pre.ends_with("--config /etc/holdfast/node.toml --check"),
        "{pre}"
    );
    let check = |path: &Path| {
        Command::new(env!("CARGO_BIN_EXE_holdfast-node"))
            .arg("--config")
            .arg(path)
            .arg("--check")
            .env_remove("HOLDFAST_NODE_ID")
            .output()
            .expect("holdfast-node --check")
    };
    let ok = check(&deploy().join("baremetal/node.example.toml"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("--check prints JSON");
    assert_eq!(shown["node_id"], serde_json::json!(cfg.node_id));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "node_id = 0\nraft_addr = \"nowhere\"\n").expect("write");
    let refused = check(&bad);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "a bad config must be refused"
    );
    assert!(!refused.stderr.is_empty());
    let help = Command::new(env!("CARGO_BIN_EXE_holdfast-node"))
        .arg("--help")
        .output()
        .expect("holdfast-node --help");
    assert!(help.status.success(), "--help is not an error");

    // holdfast-decap: its ExecStart arguments parse (`--help` after them
    // stops once they are all accepted).
    let decap = &units
        .iter()
        .find(|(p, _, _)| p.ends_with("holdfast-decap.service"))
        .expect("decap unit")
        .1;
    let args: Vec<&str> = key(decap, "ExecStart")[0]
        .split_whitespace()
        .skip(1)
        .collect();
    let run = Command::new(holdfast_node::testing::workspace_bin(
        "holdfast-decap",
        "holdfast-decap",
    ))
    .args(&args)
    .arg("--help")
    .output()
    .expect("holdfast-decap");
    assert!(
        run.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(key(decap, "RuntimeDirectory")[0] == "holdfast-decap");
    assert!(args.contains(&"/run/holdfast-decap/ready"));
}
