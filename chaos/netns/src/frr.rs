//! FRR in a namespace (the lab, tests): one FRR instance per namespace, a
//! pathspace of its own (`/etc/frr/NAME`, `/var/run/frr/NAME`), with
//! zebra, bgpd and bfdd and a configuration applied with vtysh.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use crate::{Error, NetNs, Result};

fn fail(cmd: impl Into<String>, why: impl Into<String>) -> Error {
    Error::Command {
        cmd: cmd.into(),
        stderr: why.into(),
    }
}

/// Poll `f` every 20 ms until it is true or `timeout` passes.
fn wait(what: &str, timeout: Duration, f: impl Fn() -> bool) -> Result<()> {
    let t0 = std::time::Instant::now();
    while !f() {
        if t0.elapsed() > timeout {
            return Err(fail(what, format!("timed out after {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The daemons of one instance, in start order.
const DAEMONS: [&str; 3] = ["zebra", "bgpd", "bfdd"];

/// A running FRR instance; killed (and its directories removed) on drop.
pub struct Frr {
    pub name: String,
    etc: PathBuf,
    run: PathBuf,
}

/// Whether FRR is installed where the lab starts it from.
fn installed() -> bool {
    DAEMONS
        .iter()
        .all(|d| Path::new("/usr/lib/frr").join(d).exists())
}

impl Frr {
    /// Start FRR `name` (a pathspace: letters, digits, `-`) in `ns` with
    /// `conf`; logs go to `dir`.
    pub fn start(ns: &NetNs, dir: &Path, name: &str, conf: &str) -> Result<Self> {
        if !installed() {
            return Err(fail(
                "/usr/lib/frr/bgpd",
                "FRR is not installed (apt-get install frr frr-pythontools: scripts/install-deps.sh)",
            ));
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(fail("frr -N", format!("{name:?} is not a pathspace name")));
        }
        let etc = PathBuf::from("/etc/frr").join(name);
        let run = PathBuf::from("/var/run/frr").join(name);
        let me = Self {
            name: name.into(),
            etc: etc.clone(),
            run: run.clone(),
        };
        let io = |what: &str, e: std::io::Error| fail(what, e.to_string());
        std::fs::create_dir_all(&etc).map_err(|e| io("mkdir /etc/frr/NAME", e))?;
        std::fs::create_dir_all(&run).map_err(|e| io("mkdir /var/run/frr/NAME", e))?;
        std::fs::write(etc.join("vtysh.conf"), "service integrated-vtysh-config\n")
            .map_err(|e| io("writing vtysh.conf", e))?;
        let conf_path = etc.join("frr.conf");
        std::fs::write(&conf_path, conf).map_err(|e| io("writing frr.conf", e))?;
        crate::sh(&[
            "chown",
            "-R",
            "frr:frr",
            etc.to_str().unwrap_or_default(),
            run.to_str().unwrap_or_default(),
        ])?;
        for d in DAEMONS {
            me.start_daemon(ns, dir, d)?;
        }
        // The daemons' sockets, then the configuration.
        wait("FRR's vty sockets", Duration::from_secs(5), || {
            DAEMONS
                .iter()
                .all(|d| run.join(format!("{d}.vty")).exists())
        })?;
        me.apply(ns, &conf_path)?;
        Ok(me)
    }

    /// Start one daemon of the instance and wait for its pid file.
    fn start_daemon(&self, ns: &NetNs, dir: &Path, d: &str) -> Result<()> {
        let io = |what: &str, e: std::io::Error| fail(what, e.to_string());
        let name = &self.name;
        let log = dir.join(format!("{name}.{d}.log"));
        let out = ns
            .command(format!("/usr/lib/frr/{d}"))?
            .args(["-d", "-N", name, "-u", "frr", "-g", "frr", "-i"])
            .arg(self.run.join(format!("{d}.pid")))
            .arg("--log")
            .arg(format!("file:{}", log.display()))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io(d, e))?;
        if !out.status.success() {
            return Err(fail(
                format!("/usr/lib/frr/{d}"),
                format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
            ));
        }
        wait(
            &format!("FRR's {d} pid file"),
            Duration::from_secs(5),
            || self.pid(d).is_some(),
        )
    }

    /// Restart one daemon the way watchfrr does: stop it with `signal`,
    /// start it again, and give it its part of the saved frr.conf (`vtysh
    /// -b -d DAEMON`). The other daemons (bfdd, zebra) keep running.
    pub fn restart_daemon(&self, ns: &NetNs, dir: &Path, d: &str, signal: i32) -> Result<()> {
        if !DAEMONS.contains(&d) {
            return Err(fail(
                "frr restart",
                format!("{d:?} is not one of {DAEMONS:?}"),
            ));
        }
        let vty = self.run.join(format!("{d}.vty"));
        if let Some(pid) = self.pid(d) {
            // SAFETY: signalling a daemon this instance started.
            unsafe { libc::kill(pid, signal) };
            wait(
                &format!("FRR's {d} to exit"),
                Duration::from_secs(10),
                || crate::daemon_gone(pid),
            )?;
        }
        let _ = std::fs::remove_file(self.run.join(format!("{d}.pid")));
        let _ = std::fs::remove_file(&vty);
        self.start_daemon(ns, dir, d)?;
        wait(
            &format!("FRR's {d} vty socket"),
            Duration::from_secs(5),
            || vty.exists(),
        )?;
        self.configure(ns, &["-b", "-d", d])
    }

    /// Apply a configuration file to the running instance (`vtysh -f`):
    /// Err with FRR's answer if it refuses a line.
    pub fn apply(&self, ns: &NetNs, conf: &Path) -> Result<()> {
        self.configure(ns, &["-f", &conf.display().to_string()])
    }

    /// vtysh in this instance with `args` that configure it: Err with
    /// FRR's answer if it fails or refuses a line (`% ...`).
    fn configure(&self, ns: &NetNs, args: &[&str]) -> Result<()> {
        let what = format!("vtysh {}", args.join(" "));
        let out = ns
            .command("vtysh")?
            .args(["-N", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| fail(what.clone(), e.to_string()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.lines().any(|l| l.trim_start().starts_with('%')) {
            return Err(fail(what, text));
        }
        Ok(())
    }

    fn pid(&self, daemon: &str) -> Option<i32> {
        std::fs::read_to_string(self.run.join(format!("{daemon}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// vtysh in this instance: its output.
    pub fn vtysh(&self, ns: &NetNs, cmd: &str) -> Result<String> {
        let out = ns
            .command("vtysh")?
            .args(["-N", &self.name, "-c", cmd])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| fail("vtysh", e.to_string()))?;
        if !out.status.success() {
            return Err(fail(
                format!("vtysh -c {cmd:?}"),
                String::from_utf8_lossy(&out.stderr),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL every daemon (by its pid file: other FRR instances may run).
    pub fn kill(&self) {
        for d in DAEMONS.iter().rev() {
            if let Some(pid) = self.pid(d) {
                crate::kill_daemon(pid);
            }
            let _ = std::fs::remove_file(self.run.join(format!("{d}.pid")));
        }
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.etc);
        let _ = std::fs::remove_dir_all(&self.run);
    }
}
