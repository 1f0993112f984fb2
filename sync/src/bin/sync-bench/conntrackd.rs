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

    // Create n flows at `rate` in A: distinct UDP tuples towards 10.89/16;
    // the generator records when it sent each (since t0).
    let t0 = Instant::now();
    let gen = a.spawn(move || -> std::io::Result<Vec<Duration>> {
        let s = std::net::UdpSocket::bind("10.88.1.1:7000")?;
        let start = Instant::now();
        let mut sent = Vec::with_capacity(n);
        for i in 0..n {
            let dst = std::net::Ipv4Addr::new(10, 89, (i / 60_000) as u8, 1);
            s.send_to(b"x", (dst, (i % 60_000) as u16 + 1))?;
            sent.push(t0.elapsed());
            let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
        }
        Ok(sent)
    });
    // B's external cache count over time: (when, how many it holds).
    let mut seen: Vec<(Duration, usize)> = Vec::new();
    let deadline = t0 + Duration::from_secs(secs + 60);
    loop {
        let have = stat(&b, &cb, "cache", "cache:external")? as usize;
        let now = t0.elapsed();
        if seen.last().is_none_or(|l| l.1 != have) {
            seen.push((now, have));
        }
        if have >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "conntrackd replicated {have} of {n} flows in {} s",
                secs + 60
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = gen
        .join()
        .map_err(|_| anyhow::anyhow!("generator panicked"))??;
    let bytes = stat(&a, &ca, "network", "Bytes sent")?;
    let lags = lags(&sent, &seen);
    let q = |p: usize| lags.get((lags.len() * p / 100).min(lags.len().saturating_sub(1)));
    let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let report = Report {
        applied_per_s: n as f64 / seen.last().map_or(f64::NAN, |l| l.0.as_secs_f64()),
        lag_p50_ms: ms(q(50)),
        lag_p99_ms: ms(q(99)),
        bytes_per_entry: bytes as f64 / n as f64,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Each flow's lag, sorted: from when it was sent (`sent[k]`) to the first
/// sample in which the receiver held more than `k` flows (the flows arrive
/// in order); every quantile then comes from this one sample set.
fn lags(sent: &[Duration], seen: &[(Duration, usize)]) -> Vec<Duration> {
    let mut out = Vec::with_capacity(sent.len());
    let mut j = 0;
    for (k, at) in sent.iter().enumerate() {
        while j < seen.len() && seen[j].1 <= k {
            j += 1;
        }
        if let Some((when, _)) = seen.get(j) {
            out.push(when.saturating_sub(*at));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_one_sample_set() {
        let ms = Duration::from_millis;
        // 4 flows sent at 0, 10, 20, 30 ms; the receiver held 1 at 15 ms,
        // 3 at 25 ms and 4 at 100 ms.
        let sent = [ms(0), ms(10), ms(20), ms(30)];
        let seen = [(ms(15), 1), (ms(25), 3), (ms(100), 4)];
        assert_eq!(lags(&sent, &seen), vec![ms(5), ms(15), ms(15), ms(70)]);
        // Never decreasing, so p50 ≤ p99 whatever the samples.
        let l = lags(&sent, &seen);
        assert!(l.windows(2).all(|w| w[0] <= w[1]));
    }
}
