//! t13: every command the README and docs/*.md print runs as written, at
//! least as far as `--help`. Each documented invocation of a workspace
//! binary (`cargo run [--release] -p P [--bin B] [-- ARGS]`,
//! `target/release/B ARGS`, `clusterctl ARGS`, `holdfast-node ARGS`,
//! `holdfast-decap ARGS`) is resolved to its binary the way cargo would —
//! `cargo run -p P` without `--bin` must find exactly one binary or a
//! `default-run` — and run with its subcommand words and `--help`, which
//! must exit 0. A documented subcommand that does not exist fails here.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Workspace packages: name -> (binaries, default-run).
fn packages() -> BTreeMap<String, (BTreeSet<String>, Option<String>)> {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    v["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let bins = p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .filter(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "bin"))
                })
                .map(|t| t["name"].as_str().expect("name").to_string())
                .collect();
            (
                p["name"].as_str().expect("name").to_string(),
                (bins, p["default_run"].as_str().map(str::to_string)),
            )
        })
        .collect()
}

/// Shell-like words of a command line, up to a comment or a pipe.
fn words(line: &str) -> Vec<String> {
    let mut v = Vec::new();
    for w in line.split_whitespace() {
        if w.starts_with('#') || w == "|" || w == ">" || w == "&&" || w == ";" {
            break;
        }
        v.push(w.trim_matches('`').to_string());
    }
    v
}

/// The leading subcommand words of `args` (before the first option or
/// placeholder: `<x>`, `[x]`, or an upper-case word like `ID`, `NAME`).
fn subcommand(args: &[String]) -> Vec<String> {
    args.iter()
        .take_while(|a| {
            !a.starts_with('-')
                && !a.starts_with('<')
                && !a.starts_with('[')
                && !a.contains('=')
                && !a.contains('/')
                && !a.contains('.')
                && !a.contains('|')
                && !a
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        .cloned()
        .collect()
}

/// Command lines in fenced blocks and in inline code of a markdown text.
fn command_lines(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            out.push(line.trim().trim_start_matches("$ ").to_string());
        } else {
            for (i, part) in line.split('`').enumerate() {
                if i % 2 == 1 {
                    out.push(part.trim().to_string());
                }
            }
        }
    }
    out
}

#[test]
fn t13_every_documented_command_runs() {
    let bin_dir: PathBuf = Path::new(env!("CARGO_BIN_EXE_chaos"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let pkgs = packages();
    let all_bins: BTreeSet<String> = pkgs.values().flat_map(|(b, _)| b.clone()).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut docs = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).expect("docs") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    let mut checked = BTreeSet::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).expect("read doc");
        for line in command_lines(&text) {
            let mut w = words(&line);
            if w.first().is_some_and(|x| x == "sudo") {
                w.remove(0);
            }
            let Some(first) = w.first().cloned() else {
                continue;
            };
            let (bin, args): (String, Vec<String>) = if first == "cargo"
                && w.get(1).is_some_and(|x| x == "run")
            {
                let pkg = w
                    .iter()
                    .position(|x| x == "-p")
                    .and_then(|i| w.get(i + 1))
                    .unwrap_or_else(|| panic!("{}: `{line}` names no package", doc.display()))
                    .clone();
                let (bins, default) = pkgs
                    .get(&pkg)
                    .unwrap_or_else(|| panic!("{}: `{line}`: no package {pkg}", doc.display()));
                let bin = match w.iter().position(|x| x == "--bin").and_then(|i| w.get(i + 1)) {
                    Some(b) => b.clone(),
                    None if bins.len() == 1 => bins.iter().next().expect("one").clone(),
                    None => default.clone().unwrap_or_else(|| {
                        panic!(
                            "{}: `{line}`: cargo cannot tell which of {bins:?} to run (no --bin, no default-run)",
                            doc.display()
                        )
                    }),
                };
                assert!(
                    bins.contains(&bin),
                    "{}: `{line}`: {pkg} has no binary {bin}",
                    doc.display()
                );
                let args = match w.iter().position(|x| x == "--") {
                    Some(i) => w[i + 1..].to_vec(),
                    None => vec![],
                };
                (bin, args)
            } else if let Some(b) = first.strip_prefix("target/release/") {
                (b.to_string(), w[1..].to_vec())
            } else if ["clusterctl", "holdfast-node", "holdfast-decap"].contains(&first.as_str())
                && w.len() > 1
            {
                (first.clone(), w[1..].to_vec())
            } else {
                continue;
            };
            assert!(
                all_bins.contains(&bin),
                "{}: `{line}`: no workspace binary {bin}",
                doc.display()
            );
            let sub = subcommand(&args);
            if !checked.insert((bin.clone(), sub.clone())) {
                continue;
            }
            let exe = bin_dir.join(&bin);
            assert!(
                exe.exists(),
                "{} is not built: run the workspace's tests (`cargo test --workspace` builds every binary)",
                exe.display()
            );
            let out = std::process::Command::new(&exe)
                .args(&sub)
                .arg("--help")
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
            assert!(
                out.status.success(),
                "{}: `{line}`: `{bin} {} --help` exited {:?}: {}{}",
                doc.display(),
                sub.join(" "),
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    println!("checked {} commands: {checked:?}", checked.len());
    for b in [
        "chaos",
        "clusterctl",
        "holdfast-node",
        "datapath-bench",
        "sync-bench",
        "config-bench",
        "k8s-bench",
    ] {
        assert!(
            checked.iter().any(|(x, _)| x == b),
            "no documented command of {b} was found (the scan is broken)"
        );
    }
}
