//! Compiles the C BPF programs under bpf/ with clang-19 into OUT_DIR; the
//! crate embeds the objects with `include_bytes_aligned!`.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

const PROGRAMS: &[&str] = &["lb", "decap", "nop", "impair"];

fn find_clang() -> String {
    if let Ok(c) = env::var("HOLDFAST_CLANG") {
        return c;
    }
    for cand in ["clang-19", "clang"] {
        if Command::new(cand).arg("--version").output().is_ok() {
            return cand.to_string();
        }
    }
    "clang-19".to_string()
}

fn main() -> Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let bpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("bpf");
    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    println!("cargo:rerun-if-env-changed=HOLDFAST_CLANG");
    let clang = find_clang();
    let arch_include = format!("/usr/include/{}-linux-gnu", env::consts::ARCH);

    for prog in PROGRAMS {
        let src = bpf_dir.join(format!("{prog}.bpf.c"));
        let obj = out.join(format!("{prog}.bpf.o"));
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{arch_include}"))
            .arg("-I")
            .arg(&bpf_dir)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .with_context(|| {
                format!(
                    "running {clang}: install clang-19 llvm-19 libbpf-dev \
                     (scripts/install-deps.sh does it)"
                )
            })?;
        if !output.status.success() {
            bail!(
                "{clang} failed on {}:\n{}",
                src.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
