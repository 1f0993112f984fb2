//! Phase 3 of sync-bench: Netfilter's conntrackd (FTFW over UDP) between two
//! network namespaces, replicating the same number of new flows at the same
//! rate, measured from outside: flows are created by real UDP packets in
//! namespace A (kernel conntrack), conntrackd A sends them to conntrackd B,
//! and B's external cache is polled until it holds them all.

use std::{
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use netns::NetNs;

pub struct Report {
    pub applied_per_s: f64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub bytes_per_entry: f64,
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn conf(
    dir: &std::path::Path,
    name: &str,
    me: &str,
    peer: &str,
    iface: &str,
) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.conf"));
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "Sync {{\n\tMode FTFW {{\n\t}}\n\tUDP {{\n\t\tIPv4_address {me}\n\t\tIPv4_Destination_Address {peer}\n\t\tPort 3780\n\t\tInterface {iface}\n\t\tSndSocketBuffer 8388608\n\t\tRcvSocketBuffer 8388608\n\t\tChecksum on\n\t}}\n}}\nGeneral {{\n\tHashSize 131072\n\tHashLimit 1048576\n\tLogFile {d}/{name}.log\n\tSyslog off\n\tLockFile {d}/{name}.lock\n\tUNIX {{\n\t\tPath {d}/{name}.ctl\n\t}}\n\tNetlinkBufferSize 16777216\n\tNetlinkBufferSizeMaxGrowth 67108864\n\tFilter From Userspace {{\n\t\tProtocol Accept {{\n\t\t\tTCP\n\t\t\tUDP\n\t\t}}\n\t\tAddress Ignore {{\n\t\t\tIPv4_address 127.0.0.1\n\t\t\tIPv4_address 10.88.0.1\n\t\t\tIPv4_address 10.88.0.2\n\t\t}}\n\t}}\n}}\n"
        ),
    )?;
    Ok(path)
}

fn stat(ns: &NetNs, conf: &std::path::Path, what: &str, key: &str) -> Result<u64> {
    let out = ns
        .exec(&["conntrackd", "-C", &conf.display().to_string(), "-s", what])
        .context("conntrackd -s")?;
    out.lines()
        .find(|l| l.contains(key))
        .and_then(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
        .with_context(|| format!("no {key:?} in conntrackd -s {what}: {out}"))
}

pub fn run(rate: u32, secs: u64) -> Result<Report> {
    if Command::new("conntrackd").arg("-v").output().is_err() {
        bail!("conntrackd is not installed (scripts/install-deps.sh installs it)");
    }
    let n = rate as usize * secs as usize;
    let dir = std::env::temp_dir().join(format!("hf-conntrackd-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let a = NetNs::new("hfctda")?;
    let b = NetNs::new("hfctdb")?;
    netns::veth(&a, "ctdaif", &b, "ctdbif")?;
    a.ip("addr add 10.88.0.1/24 dev ctdaif")?;
    a.ip("addr add 10.88.1.1/24 dev ctdaif")?;
    b.ip("addr add 10.88.0.2/24 dev ctdbif")?;
    a.ip("route add 10.89.0.0/16 via 10.88.0.2")?;
    a.exec(&["nft", "add table inet hf"])?;
    a.exec(&[
        "nft",
        "add chain inet hf out { type filter hook output priority 0 ; }",
    ])?;
    a.exec(&["nft", "add rule inet hf out ct state new counter"])?;
    let ca = conf(&dir, "a", "10.88.0.1", "10.88.0.2", "ctdaif")?;
    let cb = conf(&dir, "b", "10.88.0.2", "10.88.0.1", "ctdbif")?;
    let spawn = |ns: &NetNs, c: &std::path::Path| -> Result<Daemon> {
        Ok(Daemon(
            Command::new("ip")
                .args(["netns", "exec", ns.name(), "conntrackd", "-C"])
                .arg(c)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting conntrackd")?,
        ))
    };
    let _da = spawn(&a, &ca)?;
    let _db = spawn(&b, &cb)?;
    std::thread::sleep(Duration::from_millis(800));

    // Create n flows at `rate` in A: distinct UDP tuples towards 10.89/16.
    let t0 = Instant::now();
    let gen = a.spawn(move || -> std::io::Result<()> {
        let s = std::net::UdpSocket::bind("10.88.1.1:7000")?;
        let start = Instant::now();
        for i in 0..n {
            let dst = std::net::Ipv4Addr::new(10, 89, (i / 60_000) as u8, 1);
            s.send_to(b"x", (dst, (i % 60_000) as u16 + 1))?;
            let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
        }
        Ok(())
    });
    let created_at = |k: usize| Duration::from_secs_f64(k as f64 / f64::from(rate));
    let (mut t50, mut t99, mut tall) = (None, None, None);
    let deadline = t0 + Duration::from_secs(secs + 60);
    while tall.is_none() {
        let have = stat(&b, &cb, "cache", "cache:external")? as usize;
        let now = t0.elapsed();
        if t50.is_none() && have * 2 >= n {
            t50 = Some(now);
        }
        if t99.is_none() && have * 100 >= n * 99 {
            t99 = Some(now);
        }
        if have >= n {
            tall = Some(now);
        }
        if Instant::now() > deadline {
            bail!(
                "conntrackd replicated {have} of {n} flows in {} s",
                secs + 60
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    gen.join()
        .map_err(|_| anyhow::anyhow!("generator panicked"))??;
    let bytes = stat(&a, &ca, "network", "Bytes sent")?;
    let ms = |t: Option<Duration>, k: usize| {
        t.map_or(f64::NAN, |t| {
            t.saturating_sub(created_at(k)).as_secs_f64() * 1e3
        })
    };
    let report = Report {
        applied_per_s: n as f64 / tall.expect("set").as_secs_f64(),
        lag_p50_ms: ms(t50, n / 2),
        lag_p99_ms: ms(t99, n * 99 / 100),
        bytes_per_entry: bytes as f64 / n as f64,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}
