//! nat-bench: Holdfast's SNAT mode against the kernel's nftables NAT
//! (kube-proxy's rules) on one LB node, side by side in one run; see
//! `chaos::natbench`.
//!
//! usage: nat-bench [--json] [--rounds N] [--seconds S] [--conns N[,N..]]
//!                  [--kind rr|crr[,..]] [--backends N] [--bpf-stats] [--perf]
//!                  [--paths direct,nft,holdfast]

use anyhow::{bail, Context, Result};
use chaos::natbench::{Kind, NatLab, Path, Run};

struct Args {
    json: bool,
    rounds: usize,
    seconds: f64,
    conns: Vec<usize>,
    kinds: Vec<Kind>,
    backends: usize,
    bpf_stats: bool,
    paths: Vec<Path>,
    perf: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        json: false,
        rounds: 3,
        seconds: 5.0,
        conns: vec![1, 32],
        kinds: vec![Kind::Rr, Kind::Crr],
        backends: 2,
        bpf_stats: false,
        paths: vec![Path::Direct, Path::Nft, Path::Holdfast],
        perf: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--json" => a.json = true,
            "--bpf-stats" => a.bpf_stats = true,
            "--perf" => a.perf = true,
            "--paths" => {
                a.paths = value("--paths")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_>>()?
            }
            "--rounds" => a.rounds = value("--rounds")?.parse().context("--rounds")?,
            "--seconds" => a.seconds = value("--seconds")?.parse().context("--seconds")?,
            "--backends" => a.backends = value("--backends")?.parse().context("--backends")?,
            "--conns" => {
                a.conns = value("--conns")?
                    .split(',')
                    .map(|c| c.parse().context("--conns"))
                    .collect::<Result<_>>()?
            }
            "--kind" => {
                a.kinds = value("--kind")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_>>()?
            }
            "-h" | "--help" => {
                println!(
                    "usage: nat-bench [--json] [--rounds N] [--seconds S] [--conns N[,N..]] \
                     [--kind rr|crr[,..]] [--backends N] [--bpf-stats] [--perf] \
                     [--paths direct,nft,holdfast]"
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {arg:?} (see --help)"),
        }
    }
    if a.rounds == 0 || !(a.seconds > 0.0 && a.seconds <= 600.0) {
        bail!("--rounds must be at least 1 and --seconds in (0, 600]");
    }
    if a.conns.iter().any(|&c| c == 0 || c > 4096) {
        bail!("--conns must be 1..=4096");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = args()?;
    let mut lab = NatLab::up("hfn", a.backends)?;
    let _stats = if a.bpf_stats {
        Some(BpfStats::on()?)
    } else {
        None
    };
    lab.bpf_stats = a.bpf_stats;
    lab.perf = a.perf;
    let mut runs: Vec<Run> = Vec::new();
    for round in 1..=a.rounds {
        for &kind in &a.kinds {
            for &conns in &a.conns {
                // Interleaved: every path once per round and load.
                for &path in &a.paths {
                    let r = lab
                        .run(path, kind, conns, a.seconds)
                        .with_context(|| format!("round {round}: {path} {kind:?} x{conns}"))?;
                    if !a.json {
                        print_run(round, &r);
                    }
                    runs.push(r);
                }
            }
        }
    }
    let summary = summarize(&runs, &a);
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "runs": runs, "summary": summary }))?
        );
    } else {
        println!("\nmedians over {} rounds:", a.rounds);
        for s in &summary {
            println!("{}", s["line"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// kernel.bpf_stats_enabled while alive (restored on drop).
struct BpfStats(String);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";
    fn on() -> Result<Self> {
        let old = std::fs::read_to_string(Self::PATH).context("reading bpf_stats_enabled")?;
        std::fs::write(Self::PATH, "1").context("enabling BPF statistics")?;
        Ok(Self(old.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

fn print_run(round: usize, r: &Run) {
    println!(
        "round {round} {:<8} {:?} x{:<4} {:>8.0} req/s  p50 {:>5} us  p99 {:>6} us  \
         LB {} us/req{}  all CPUs {:>6.1} us/req{}{}",
        r.path.to_string(),
        r.kind,
        r.conns,
        r.rps,
        r.p50_us,
        r.p99_us,
        r.lb_us_per_req
            .map(|x| format!("{x:>5.2}"))
            .unwrap_or_else(|| "    -".into()),
        r.lb_work_us_per_req
            .map(|x| format!(" (work {x:.2})"))
            .unwrap_or_default(),
        r.cpu_us_per_req,
        r.xdp_us_per_req
            .map(|x| format!("  xdp {x:.2} us/req"))
            .unwrap_or_default(),
        if r.errors > 0 {
            format!("  {} errors", r.errors)
        } else {
            String::new()
        },
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Per load: medians per path, the LB node's CPU per request and the ratio
/// nft / holdfast of it (= requests per LB core, Holdfast over nft).
fn summarize(runs: &[Run], a: &Args) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for &kind in &a.kinds {
        for &conns in &a.conns {
            let pick = |p: Path, f: &dyn Fn(&Run) -> f64| {
                median(
                    runs.iter()
                        .filter(|r| r.path == p && r.kind == kind && r.conns == conns)
                        .map(f)
                        .collect(),
                )
            };
            let cpu = |p| pick(p, &|r| r.cpu_us_per_req);
            let lb = |p| pick(p, &|r| r.lb_us_per_req.unwrap_or(f64::NAN));
            let (lb_nft, lb_hf) = (lb(Path::Nft), lb(Path::Holdfast));
            let ratio = lb_nft / lb_hf;
            let mut line = format!("{kind:?} x{conns}:");
            for p in [Path::Direct, Path::Nft, Path::Holdfast] {
                line.push_str(&format!(
                    "\n    {:<8} {:>7.0} req/s  p50 {:>5.0} us  p99 {:>5.0} us  all CPUs {:>6.1} us/req",
                    p.to_string(),
                    pick(p, &|r| r.rps),
                    pick(p, &|r| r.p50_us as f64),
                    pick(p, &|r| r.p99_us as f64),
                    cpu(p),
                ));
            }
            line.push_str(&format!(
                "\n    LB node CPU per request: nft {lb_nft:.2} us, holdfast {lb_hf:.2} us \
                 -> requests per LB core {ratio:.2}x nft"
            ));
            let (w_nft, w_hf) = (
                pick(Path::Nft, &|r| r.lb_work_us_per_req.unwrap_or(f64::NAN)),
                pick(Path::Holdfast, &|r| {
                    r.lb_work_us_per_req.unwrap_or(f64::NAN)
                }),
            );
            if a.perf {
                line.push_str(&format!(
                    "\n    of which packet work (perf, without switching and wake-ups): \
                     nft {w_nft:.2} us, holdfast {w_hf:.2} us -> {:.2}x",
                    w_nft / w_hf
                ));
            }
            if a.bpf_stats {
                line.push_str(&format!(
                    " (XDP program itself {:.2} us)",
                    pick(Path::Holdfast, &|r| r.xdp_us_per_req.unwrap_or(f64::NAN))
                ));
            }
            out.push(serde_json::json!({
                "kind": kind,
                "conns": conns,
                "rps": {
                    "direct": pick(Path::Direct, &|r| r.rps),
                    "nft": pick(Path::Nft, &|r| r.rps),
                    "holdfast": pick(Path::Holdfast, &|r| r.rps),
                },
                "p99_us": {
                    "direct": pick(Path::Direct, &|r| r.p99_us as f64),
                    "nft": pick(Path::Nft, &|r| r.p99_us as f64),
                    "holdfast": pick(Path::Holdfast, &|r| r.p99_us as f64),
                },
                "lb_cpu_us_per_req": { "nft": lb_nft, "holdfast": lb_hf },
                "all_cpu_us_per_req": {
                    "direct": cpu(Path::Direct),
                    "nft": cpu(Path::Nft),
                    "holdfast": cpu(Path::Holdfast),
                },
                "per_core_ratio": ratio,
                "lb_work_us_per_req": { "nft": w_nft, "holdfast": w_hf },
                "work_ratio": w_nft / w_hf,
                "line": line,
            }));
        }
    }
    out
}
