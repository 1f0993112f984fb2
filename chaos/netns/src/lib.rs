//! Network namespaces for tests and the lab.
//!
//! [`NetNs::new`] creates a uniquely named namespace (prefix, pid, counter)
//! and [`Drop`] deletes it — after killing any process still inside — also
//! when a test panics. [`sweep_stale`] removes namespaces left by processes
//! that died without unwinding (SIGKILL). Code runs inside a namespace on a
//! thread that has `setns`-ed into it ([`NetNs::run`], [`NetNs::spawn`]):
//! sockets created there stay in that namespace.

pub mod frr;

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("running `{cmd}`: {source} (is iproute2 installed? run as root)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering namespace {name}: {source}")]
    Setns {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Run a command; its stdout on success, stderr in the error otherwise.
pub fn sh(args: &[&str]) -> Result<String> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| Error::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SIGKILL a daemon we started (not our child: it forked away) and wait
/// up to a second until it is gone or a zombie nobody reaps.
pub fn kill_daemon(pid: i32) {
    // SAFETY: signalling a daemon the caller started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for _ in 0..100 {
        if daemon_gone(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Has daemon `pid` exited (gone, or a zombie nobody reaps)?
pub fn daemon_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only probes.
    is_zombie(pid) || unsafe { libc::kill(pid, 0) } != 0
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_default()
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// A network namespace owned by this process.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create `{prefix}-{pid}-{n}` with loopback up. `prefix` should be short
    /// and say which test or lab made it.
    pub fn new(prefix: &str) -> Result<Self> {
        sweep_stale(prefix);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        sh(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME <args>` (args split on whitespace).
    pub fn ip(&self, args: &str) -> Result<String> {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend(args.split_whitespace());
        sh(&v)
    }

    /// `ip netns exec NAME <args>`.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Set a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Move the calling thread into this namespace until the guard drops.
    pub fn enter(&self) -> Result<NsGuard> {
        let orig = File::open("/proc/thread-self/ns/net").map_err(|source| Error::Setns {
            name: "(current)".into(),
            source,
        })?;
        setns(&self.path(), &self.name)?;
        Ok(NsGuard { orig })
    }

    /// Run `f` on a new thread inside the namespace and wait for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let h = self.spawn(f);
        Ok(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    }

    /// Start `f` on a new thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = self.path();
        let name = self.name.clone();
        std::thread::spawn(move || {
            setns(&path, &name).unwrap_or_else(|e| panic!("{e}"));
            f()
        })
    }

    /// A command whose process starts inside this namespace (by `setns`
    /// between fork and exec: unlike `ip netns exec`, the mount namespace
    /// and so /sys/fs/bpf stay the caller's). The child is in its own
    /// process group so a signal to the group reaches its children too.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        use std::os::unix::process::CommandExt;
        let f = File::open(self.path()).map_err(|source| Error::Setns {
            name: self.name.clone(),
            source,
        })?;
        let mut cmd = Command::new(program);
        cmd.process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made (setns); `f` stays open in the parent until the closure drops.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Interface index of `ifname` inside the namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let out = self.exec(&["cat", &format!("/sys/class/net/{ifname}/ifindex")])?;
        out.trim().parse().map_err(|_| Error::Command {
            cmd: format!("ifindex of {ifname} in {}", self.name),
            stderr: out,
        })
    }

    /// MAC address of `ifname` inside the namespace.
    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let out = self.exec(&["cat", &format!("/sys/class/net/{ifname}/address")])?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = out.trim().split(':').collect();
        if parts.len() != 6 {
            return Err(Error::Command {
                cmd: format!("mac of {ifname}"),
                stderr: out,
            });
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16).map_err(|_| Error::Command {
                cmd: format!("mac of {ifname}"),
                stderr: out.clone(),
            })?;
        }
        Ok(mac)
    }
}

fn setns(path: &std::path::Path, name: &str) -> Result<()> {
    let f = File::open(path).map_err(|source| Error::Setns {
        name: name.into(),
        source,
    })?;
    // SAFETY: f is an open namespace file; setns only affects this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(Error::Setns {
            name: name.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Restores the thread's original namespace on drop.
pub struct NsGuard {
    orig: File,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        // SAFETY: orig is the thread's original namespace file.
        unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

fn kill_inside(name: &str) {
    if let Ok(pids) = sh(&["ip", "netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if pid != std::process::id() as i32 {
                // SAFETY: sending a signal has no memory-safety implications.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        kill_inside(&self.name);
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Delete namespaces named `{prefix}-{pid}-{n}` whose pid is no longer alive.
pub fn sweep_stale(prefix: &str) {
    let Ok(list) = sh(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            kill_inside(name);
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}

/// A veth pair between two namespaces (`a_if` in `a`, `b_if` in `b`), both up.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    a.ip(&format!(
        "link add {a_if} type veth peer name {b_if} netns {}",
        b.name()
    ))?;
    a.ip(&format!("link set {a_if} up"))?;
    b.ip(&format!("link set {b_if} up"))?;
    Ok(())
}
