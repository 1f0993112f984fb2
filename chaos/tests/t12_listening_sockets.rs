//! t12: no port opens unnoticed. `ss -ltnup` inside a lab LB node lists
//! every listening socket (holdfast-node, its BIRD and its BFD-only BIRD);
//! the set of (protocol, port, process) must equal the table in
//! docs/operations.md ("Listening sockets"; rows marked transient may be
//! missing), and every socket belongs to one of those three processes.

use std::collections::BTreeSet;

use chaos::lab::{Lab, LabSpec};

/// A documented row: (proto, port, process); port 0 stands for
/// "ephemeral" (the kernel's local port range).
type Row = (String, u16, String);

/// The documented rows: (required, transient). Transient sockets exist
/// for moments only and may or may not be caught.
fn documented() -> (BTreeSet<Row>, BTreeSet<Row>) {
    let doc = include_str!("../../docs/operations.md");
    let start = doc
        .find("<!-- listening-sockets: begin")
        .expect("docs/operations.md has the listening-sockets table");
    let end = doc[start..]
        .find("<!-- listening-sockets: end -->")
        .expect("table end")
        + start;
    let (mut required, mut transient) = (BTreeSet::new(), BTreeSet::new());
    for l in doc[start..end]
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| proto"))
    {
        let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
        let port = match cells[1] {
            "ephemeral" => 0,
            p => p.parse().unwrap_or_else(|_| panic!("bad port in {l:?}")),
        };
        let row = (cells[0].to_string(), port, cells[2].to_string());
        if cells[4].starts_with("transient") {
            transient.insert(row);
        } else {
            required.insert(row);
        }
    }
    (required, transient)
}

/// The kernel's ephemeral port range inside a namespace.
fn ephemeral(ns: &netns::NetNs) -> std::ops::RangeInclusive<u16> {
    let r = ns
        .exec(&["cat", "/proc/sys/net/ipv4/ip_local_port_range"])
        .expect("port range");
    let v: Vec<u16> = r
        .split_whitespace()
        .map(|x| x.parse().expect("port"))
        .collect();
    v[0]..=v[1]
}

#[test]
fn t12_listening_sockets_match_the_documented_list() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "t12 needs root (namespaces, BPF, BIRD)"
    );
    let dir = std::env::temp_dir().join(format!("holdfast-t12-{}", std::process::id()));
    let mut spec = LabSpec::new("hfs", dir.clone(), env!("CARGO_BIN_EXE_chaos").into());
    spec.nodes = 2;
    spec.backends = 1;
    let lab = Lab::up(spec).expect("lab up");
    let mut per_node = Vec::new();
    for i in 1..=2 {
        let n = lab.lb(i);
        let (node_pid, bird_pid, bfd_pid) = (
            n.node_pid().expect("node runs"),
            n.bird_pid().expect("BIRD runs"),
            n.bfd_pid().expect("the BFD BIRD runs"),
        );
        let eph = ephemeral(&n.ns);
        let out = n.ns.exec(&["ss", "-ltnupH"]).expect("ss");
        let mut seen = BTreeSet::new();
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let proto = f[0].to_string();
            let port: u16 = f[4]
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or_else(|| panic!("no port in {line:?}"));
            let pid: u32 = line
                .split("pid=")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no process for {line:?}"));
            let who = if pid == node_pid {
                "holdfast-node"
            } else if pid == bird_pid {
                "bird"
            } else if pid == bfd_pid {
                "bird-bfd"
            } else {
                panic!("node {i}: a socket of another process: {line}")
            };
            let port = if eph.contains(&port) { 0 } else { port };
            seen.insert((proto, port, who.to_string()));
        }
        println!("node {i}:\n{out}");
        per_node.push((i, seen, out));
    }
    drop(lab);
    let _ = std::fs::remove_dir_all(dir);
    let (required, transient) = documented();
    assert!(required.len() >= 3, "{required:?}");
    for (i, seen, out) in per_node {
        let missing: Vec<_> = required.difference(&seen).collect();
        let undocumented: Vec<_> = seen
            .iter()
            .filter(|r| !required.contains(*r) && !transient.contains(*r))
            .collect();
        assert!(
            missing.is_empty() && undocumented.is_empty(),
            "node {i}: listening sockets differ from docs/operations.md: \
             documented but not open {missing:?}, open but not documented {undocumented:?}:\n{out}"
        );
    }
}
