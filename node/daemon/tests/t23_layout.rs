//! t23: the workspace keeps the layout a newcomer can read.
//!
//! - `node/` is a folder of crates, one concern each (at least six), no
//!   file under it is longer than 1000 lines, and the daemon is the only
//!   crate that depends on every library crate under `node/` (nothing
//!   depends on the daemon but the lab harness);
//! - `clusterctl` builds without the daemon, the Kubernetes controller, the
//!   health checks, replication and the datapath (its normal dependency
//!   graph, as `cargo metadata` resolves it);
//! - no import circle between modules anywhere in the workspace: in every
//!   crate, the graph of module files where an edge is a path one module
//!   names in another (`crate::a::b`, `super::x`, `self::x`, or a child
//!   module's name) has no cycle. Method calls on a type defined elsewhere
//!   are not imports; a re-export in a parent counts as an edge to the
//!   child, so a child that reaches back into its parent is a circle.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The host's target triple (`cargo metadata` resolves for it only, so no
/// other platform's crates need to be present).
fn host_triple() -> String {
    let out = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

fn metadata() -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--filter-platform"])
        .arg(host_triple())
        .current_dir(workspace())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("metadata JSON")
}

/// Workspace packages: name -> (manifest directory, normal dependencies by name).
fn packages(meta: &serde_json::Value) -> BTreeMap<String, (PathBuf, BTreeSet<String>)> {
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(|m| m.as_str().expect("id"))
        .collect();
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| members.contains(p["id"].as_str().expect("id")))
        .map(|p| {
            let dir = Path::new(p["manifest_path"].as_str().expect("manifest"))
                .parent()
                .expect("dir")
                .to_path_buf();
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().expect("name").to_string())
                .collect();
            (p["name"].as_str().expect("name").to_string(), (dir, deps))
        })
        .collect()
}

/// Every package in the normal (non-dev, non-build) dependency closure of
/// `root`, from the resolved graph.
fn normal_closure(meta: &serde_json::Value, root: &str) -> BTreeSet<String> {
    let nodes = meta["resolve"]["nodes"].as_array().expect("resolve");
    let name_of = |id: &str| -> String {
        meta["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .find(|p| p["id"] == id)
            .and_then(|p| p["name"].as_str())
            .expect("package of id")
            .to_string()
    };
    let root_id = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == root)
        .and_then(|p| p["id"].as_str())
        .expect("root package")
        .to_string();
    let mut seen = BTreeSet::new();
    let mut todo = vec![root_id];
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let node = nodes.iter().find(|n| n["id"] == id.as_str()).expect("node");
        for d in node["deps"].as_array().expect("deps") {
            let normal = d["dep_kinds"]
                .as_array()
                .expect("dep_kinds")
                .iter()
                .any(|k| k["kind"].is_null());
            if normal {
                todo.push(d["pkg"].as_str().expect("pkg").to_string());
            }
        }
    }
    seen.iter().map(|id| name_of(id)).collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn t23_node_is_a_folder_of_crates_and_clusterctl_needs_no_daemon() {
    let meta = metadata();
    let pkgs = packages(&meta);
    let node_dir = workspace().join("node");
    let under_node: BTreeMap<&String, &BTreeSet<String>> = pkgs
        .iter()
        .filter(|(_, (dir, _))| dir.starts_with(&node_dir))
        .map(|(n, (_, deps))| (n, deps))
        .collect();
    assert!(
        under_node.len() >= 6,
        "crates under node/: {:?}",
        under_node.keys()
    );
    assert!(
        !node_dir.join("src").exists() && !node_dir.join("Cargo.toml").exists(),
        "node/ itself is no crate any more"
    );

    let mut files = Vec::new();
    rust_files(&node_dir, &mut files);
    for f in &files {
        let lines = std::fs::read_to_string(f).expect("read").lines().count();
        assert!(lines <= 1000, "{} has {lines} lines", f.display());
    }

    // The library crates under node/ (those with a lib target others use).
    let libs: BTreeSet<&String> = under_node
        .keys()
        .copied()
        .filter(|n| under_node.values().any(|deps| deps.contains(*n)))
        .collect();
    for (name, deps) in &under_node {
        let all = libs
            .iter()
            .filter(|l| **l != *name)
            .all(|l| deps.contains(*l));
        assert_eq!(
            all,
            name.as_str() == "holdfast-node",
            "{name} depends on every library crate under node/: {all} (libraries: {libs:?})"
        );
    }
    for (name, (_, deps)) in &pkgs {
        if deps.contains("holdfast-node") {
            assert_eq!(name, "chaos", "{name} depends on the daemon");
        }
    }

    let cli = normal_closure(&meta, "clusterctl");
    for never in [
        "holdfast-node",
        "holdfast-k8s",
        "holdfast-health",
        "holdfast-bgp",
        "sync",
        "datapath-ebpf",
        "kube",
        "aya",
        "quinn",
    ] {
        assert!(
            !cli.contains(never),
            "clusterctl's dependency graph holds {never}"
        );
    }
    assert!(cli.contains("holdfast-api"), "{cli:?}");
}

/// Source with comments, string and character literals blanked (their
/// bytes replaced by spaces), so that paths are found in code only.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if b[i] == b'r'
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
            && b.get(i + 1).is_some_and(|&c| c == b'"' || c == b'#')
        {
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let start = i + 2 + hashes;
            let end = b[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| start + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', '\u{7f}'), not a lifetime.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    blank(&mut out, i, e + 1);
                    i = e + 1;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("still UTF-8: only ASCII bytes were replaced")
}

/// The paths written after position `at` (just past a `::`): a plain path
/// `a::b::C`, or a group `{a::b, c::{d, e}, self}`, as segment lists.
fn paths_after(s: &[u8], at: usize) -> Vec<Vec<String>> {
    fn skip_ws(s: &[u8], mut i: usize) -> usize {
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    }
    fn parse(s: &[u8], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
        let mut segs = prefix;
        loop {
            i = skip_ws(s, i);
            if i < s.len() && s[i] == b'{' {
                i += 1;
                loop {
                    i = skip_ws(s, i);
                    if i < s.len() && s[i] == b'}' {
                        return i + 1;
                    }
                    i = parse(s, i, segs.clone(), out);
                    i = skip_ws(s, i);
                    match s.get(i) {
                        Some(b',') => i += 1,
                        Some(b'}') => return i + 1,
                        _ => return i,
                    }
                }
            }
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
                i += 1;
            }
            if start == i {
                out.push(segs);
                return i;
            }
            segs.push(String::from_utf8_lossy(&s[start..i]).into_owned());
            let j = skip_ws(s, i);
            if s[j..].starts_with(b"::") {
                i = j + 2;
            } else {
                out.push(segs);
                return i;
            }
        }
    }
    let mut out = Vec::new();
    parse(s, at, Vec::new(), &mut out);
    out
}

/// Module path of a source file inside `src`: `lib.rs`/`main.rs` is the
/// root, `a/mod.rs` and `a.rs` are `a`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut segs: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segs.len() == 1 && (segs[0] == "lib" || segs[0] == "main")
        || segs.last().is_some_and(|s| s == "mod")
    {
        segs.pop();
    }
    segs
}

fn ident_at(s: &[u8], at: usize, word: &str) -> bool {
    let w = word.as_bytes();
    s[at..].starts_with(w)
        && (at == 0
            || !(s[at - 1].is_ascii_alphanumeric() || s[at - 1] == b'_' || s[at - 1] == b':'))
        && s.get(at + w.len())
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
}

/// For each byte, how many inline `mod name { .. }` blocks enclose it.
fn inline_mod_depth(s: &[u8]) -> Vec<u8> {
    let mut depth = vec![0u8; s.len() + 1];
    // (brace depth at which an inline module's block opened)
    let mut open: Vec<usize> = Vec::new();
    let mut braces = 0usize;
    let mut i = 0;
    while i < s.len() {
        if ident_at(s, i, "mod") {
            let mut j = i + 3;
            while j < s.len() && s[j].is_ascii_whitespace() {
                j += 1;
            }
            while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == b'_') {
                j += 1;
            }
            while j < s.len() && s[j].is_ascii_whitespace() {
                j += 1;
            }
            if s.get(j) == Some(&b'{') {
                open.push(braces);
                braces += 1;
                for d in &mut depth[i..=j] {
                    *d = open.len() as u8;
                }
                i = j + 1;
                continue;
            }
        }
        match s[i] {
            b'{' => braces += 1,
            b'}' => {
                braces = braces.saturating_sub(1);
                if open.last() == Some(&braces) {
                    open.pop();
                }
            }
            _ => {}
        }
        depth[i] = open.len() as u8;
        i += 1;
    }
    depth
}

/// The module-level import edges of one crate's `src` (its binaries under
/// `src/bin` are crates of their own and left out).
fn module_edges(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.retain(|f| !f.strip_prefix(src).expect("under src").starts_with("bin"));
    let mods: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|f| (module_of(src, f), f.clone()))
        .collect();
    let resolve = |segs: &[String]| -> Option<Vec<String>> {
        (0..=segs.len())
            .rev()
            .map(|k| segs[..k].to_vec())
            .find(|m| mods.contains_key(m))
    };
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, f) in &mods {
        let code = code_only(&std::fs::read_to_string(f).expect("read"));
        let s = code.as_bytes();
        let children: Vec<String> = mods
            .keys()
            .filter(|c| c.len() == m.len() + 1 && c.starts_with(m))
            .map(|c| c[m.len()].clone())
            .collect();
        let set = edges.entry(m.clone()).or_default();
        let depth = inline_mod_depth(s);
        let mut i = 0;
        while i < s.len() {
            let mut base: Option<(Vec<String>, usize)> = None;
            // Inside an inline `mod x { .. }` (tests), `super` is this
            // file's module; the file is the unit here.
            let up = if depth[i] > 0 {
                m.clone()
            } else {
                m[..m.len().saturating_sub(1)].to_vec()
            };
            for (kw, b) in [("crate", Vec::new()), ("super", up), ("self", m.clone())] {
                if ident_at(s, i, kw) && s[i + kw.len()..].starts_with(b"::") {
                    base = Some((b, i + kw.len() + 2));
                }
            }
            for c in &children {
                if ident_at(s, i, c) && s[i + c.len()..].starts_with(b"::") {
                    let mut b = m.clone();
                    b.push(c.clone());
                    base = Some((b, i + c.len() + 2));
                }
            }
            match base {
                Some((b, at)) => {
                    for path in paths_after(s, at) {
                        let mut full = b.clone();
                        let mut rest = path.as_slice();
                        while rest.first().is_some_and(|x| x == "super") {
                            full.pop();
                            rest = &rest[1..];
                        }
                        full.extend(rest.iter().cloned());
                        if let Some(t) = resolve(&full) {
                            if &t != m {
                                set.insert(t);
                            }
                        }
                    }
                    i = at;
                }
                None => i += 1,
            }
        }
    }
    edges
}

/// A cycle of the graph, if any (depth-first search with colours).
fn find_cycle(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    fn visit(
        v: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        state.insert(v.clone(), 1);
        stack.push(v.clone());
        for w in edges.get(v).into_iter().flatten() {
            match state.get(w).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(w, edges, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let at = stack.iter().position(|x| x == w).expect("on the stack");
                    return Some(stack[at..].to_vec());
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(v.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for v in edges.keys() {
        if state.get(v).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(v, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn t23_the_checker_finds_an_import_circle() {
    // Two sibling modules naming each other, and a child reaching into its
    // parent that re-exports it, are circles; a chain is not.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("p")).expect("mkdir");
    let write = |rel: &str, text: &str| std::fs::write(src.join(rel), text).expect("write");
    write("lib.rs", "mod a;\nmod b;\nmod c;\nmod p;\n");
    write("a.rs", "use crate::b::X; // crate::c::Y in a comment\n");
    write("b.rs", "pub struct X;\nconst S: &str = \"crate::a::Z\";\n");
    write("c.rs", "pub struct Y;\n");
    write("p/mod.rs", "mod q;\npub use q::Q;\n");
    write("p/q.rs", "pub struct Q;\n");
    assert_eq!(find_cycle(&module_edges(&src)), None);
    write(
        "b.rs",
        "pub struct X;\nfn f() { let _ = crate::{c::Y, a::{self}}; }\n",
    );
    let c = find_cycle(&module_edges(&src)).expect("a <-> b");
    assert_eq!(c.len(), 2, "{c:?}");
    write("b.rs", "pub struct X;\n");
    write(
        "p/q.rs",
        "pub struct Q;\npub fn f() -> super::R { todo!() }\n",
    );
    write("p/mod.rs", "mod q;\npub use q::Q;\npub struct R;\n");
    let c = find_cycle(&module_edges(&src)).expect("p <-> p::q");
    assert_eq!(c.len(), 2, "{c:?}");
}

#[test]
fn t23_no_import_circle_between_modules_anywhere() {
    let meta = metadata();
    let mut checked = 0;
    for (name, (dir, _)) in packages(&meta) {
        let src = dir.join("src");
        if !src.exists() {
            continue;
        }
        // The library (or main binary), and each binary with modules of
        // its own (`src/bin/NAME/main.rs`).
        let mut roots = vec![src.clone()];
        if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
            roots.extend(
                bins.map(|e| e.expect("entry").path())
                    .filter(|p| p.join("main.rs").exists()),
            );
        }
        for root in roots {
            let edges = module_edges(&root);
            checked += edges.len();
            if let Some(c) = find_cycle(&edges) {
                let names: Vec<String> = c
                    .iter()
                    .map(|m| {
                        if m.is_empty() {
                            "(root)".into()
                        } else {
                            m.join("::")
                        }
                    })
                    .collect();
                panic!(
                    "{name} ({}): import circle {}",
                    root.display(),
                    names.join(" -> ")
                );
            }
        }
    }
    assert!(checked > 50, "only {checked} modules found");
}
