//! t13: every metric the Grafana dashboard (deploy/grafana) queries is
//! exported by a running node with a datapath, a service and replication:
//! a renamed metric breaks this test, not a dashboard in production. And
//! the whole exposition passes a Prometheus-conventions lint.

use std::{collections::BTreeSet, time::Duration};

use holdfast_node::testing::{backend, service, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t13_dashboard_metrics_exist() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/grafana/holdfast-dashboard.json"),
    )
    .expect("dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut used = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        for t in p["targets"].as_array().expect("targets") {
            let e = t["expr"].as_str().expect("expr");
            let mut rest = e;
            while let Some(i) = rest.find("holdfast_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let mut name = &tail[..end];
                for suffix in ["_bucket", "_sum", "_count"] {
                    name = name.strip_suffix(suffix).unwrap_or(name);
                }
                used.insert(name.to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    // And every metric of the alerting rules (deploy/prometheus).
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/prometheus/holdfast-alerts.yaml"),
    )
    .expect("alert rules");
    let before = used.len();
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
    {
        let mut rest = line;
        while let Some(i) = rest.find("holdfast_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            used.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    assert!(used.len() > before, "the alert rules query metrics");

    let c = Cluster::start(1).await;
    c.write(service("web", "10.200.0.9", 80)).await;
    c.write(backend("web", "10.1.0.9", 80)).await;
    c.wait_converged(Duration::from_secs(10)).await;
    let admin = c.node(1).cfg.metrics_addr.to_string();
    let metrics = metrics(&admin).await;
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // BGP is off in this cluster: its gauge is absent by design.
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| m.as_str() != "holdfast_bgp_announced" && !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}"
    );
}

/// The exposition of a node with a datapath, a service, backends and a
/// peer follows the Prometheus conventions operators rely on: every family
/// has its own help text and a type, names are `holdfast_*` in base units,
/// counters (and only counters) end in `_total`, histograms are complete
/// and cumulative, and everything the issue asks to observe is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t13_metric_names_and_help_follow_prometheus_conventions() {
    let c = Cluster::start_with(2, Default::default(), true).await;
    c.write(service("web", "10.200.0.9", 80)).await;
    c.write(backend("web", "10.1.0.9", 80)).await;
    c.wait_converged(Duration::from_secs(10)).await;
    let admin = c.node(1).cfg.metrics_addr.to_string();
    // Once the replication session to node 2 is up.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = metrics(&admin).await;
        if text
            .lines()
            .any(|l| l == "holdfast_sync_peer_connected{peer=\"2\"} 1")
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replication session to peer 2 never showed as connected:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let problems = lint(&text);
    assert!(problems.is_empty(), "{problems:#?}\n{text}");
    for want in [
        "holdfast_service_packets_total",
        "holdfast_service_bytes_total",
        "holdfast_service_new_flows_total",
        "holdfast_service_midflow_miss_total",
        "holdfast_conntrack_entries",
        "holdfast_datapath_midflow_miss_total",
        "holdfast_sync_lag_seconds",
        "holdfast_sync_lag_stage_seconds",
        "holdfast_sync_sent_total",
        "holdfast_raft_role",
        "holdfast_raft_term",
        "holdfast_raft_commit_latency_seconds",
        "holdfast_ready",
    ] {
        assert!(
            text.contains(&format!("# TYPE {want} ")),
            "{want} is not exported"
        );
    }
    // The lag's stages, one labelled histogram each.
    for stage in ["ring", "queued", "sent", "received"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!(
                "holdfast_sync_lag_stage_seconds_count{{stage=\"{stage}\"}} "
            ))),
            "no lag stage {stage}"
        );
    }
    // Per-peer replication state carries the peer.
    assert!(
        text.lines()
            .any(|l| l.starts_with("holdfast_sync_sent_total{peer=\"2\"}")),
        "no per-peer replication series for peer 2"
    );

    // The linter itself catches what it is meant to.
    for (bad, why) in [
        ("# HELP holdfast_x_total x\n# TYPE holdfast_x_total gauge\nholdfast_x_total 1\n", "_total"),
        ("# TYPE holdfast_y counter\nholdfast_y 1\n", "HELP"),
        ("# HELP holdfast_z_ms z\n# TYPE holdfast_z_ms gauge\nholdfast_z_ms 1\n", "unit"),
        ("# HELP holdfast_h h\n# TYPE holdfast_h histogram\nholdfast_h_bucket{le=\"1\"} 2\nholdfast_h_bucket{le=\"+Inf\"} 1\nholdfast_h_sum 1\nholdfast_h_count 1\n", "cumulative"),
        ("# HELP holdfast_h h\n# TYPE holdfast_h histogram\nholdfast_h_bucket{s=\"a\",le=\"1\"} 2\nholdfast_h_bucket{s=\"a\",le=\"+Inf\"} 2\nholdfast_h_sum{s=\"a\"} 1\nholdfast_h_count{s=\"a\"} 2\nholdfast_h_bucket{s=\"b\",le=\"1\"} 2\nholdfast_h_bucket{s=\"b\",le=\"+Inf\"} 1\nholdfast_h_sum{s=\"b\"} 1\nholdfast_h_count{s=\"b\"} 1\n", "s=\"b\"}: buckets not ordered or not cumulative"),
    ] {
        let p = lint(bad);
        assert!(p.iter().any(|m| m.contains(why)), "lint missed {why}: {p:?}");
    }
}

/// A node's `/metrics` text (its plain metrics listener).
async fn metrics(addr: &str) -> String {
    let a = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let (status, text) =
            holdfast_api::client::get_plain(&a, "/metrics", Duration::from_secs(5))
                .expect("GET /metrics");
        assert_eq!(status, 200, "{text}");
        text
    })
    .await
    .expect("task")
}

/// A histogram as exposed: buckets (le, cumulative count) in order, whether
/// it has a _sum, its _count.
type Hist = (Vec<(f64, f64)>, bool, Option<f64>);

/// Problems with a Prometheus text exposition (empty when it is clean).
fn lint(text: &str) -> Vec<String> {
    use std::collections::BTreeMap;
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut kind: BTreeMap<String, String> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut hist: BTreeMap<String, Hist> = BTreeMap::new();
    let name_ok = |n: &str| {
        n.starts_with("holdfast_")
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !n.ends_with('_')
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (n, h) = rest.split_once(' ').unwrap_or((rest, ""));
            if h.trim().is_empty() {
                problems.push(format!("{n}: empty HELP"));
            }
            if help.insert(n.to_string(), h.to_string()).is_some() {
                problems.push(format!("{n}: HELP twice (family declared twice)"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (n, k) = rest.split_once(' ').unwrap_or((rest, ""));
            if !["counter", "gauge", "histogram"].contains(&k) {
                problems.push(format!("{n}: unknown TYPE {k}"));
            }
            if !help.contains_key(n) {
                problems.push(format!("{n}: TYPE without HELP"));
            }
            if !name_ok(n) {
                problems.push(format!("{n}: not a holdfast_[a-z0-9_] name"));
            }
            if (k == "counter") != n.ends_with("_total") {
                problems.push(format!("{n}: {k}, so the _total suffix is wrong"));
            }
            for unit in ["_ms", "_milliseconds", "_us", "_microseconds", "_kb", "_mb"] {
                if n.ends_with(unit) || n.contains(&format!("{unit}_")) {
                    problems.push(format!("{n}: not a base unit ({unit})"));
                }
            }
            if k == "histogram"
                && !(n.ends_with("_seconds") || n.ends_with("_bytes") || n.ends_with("_entries"))
            {
                problems.push(format!("{n}: histogram without a unit suffix"));
            }
            if kind.insert(n.to_string(), k.to_string()).is_some() {
                problems.push(format!("{n}: TYPE twice"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => {
                problems.push(format!("malformed sample line: {line}"));
                continue;
            }
        };
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            _ => match value.parse() {
                Ok(v) => v,
                Err(_) => {
                    problems.push(format!("{series}: value {value:?} is not a number"));
                    continue;
                }
            },
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                l.strip_suffix('}').unwrap_or_else(|| {
                    problems.push(format!("{series}: unterminated labels"));
                    ""
                }),
            ),
            None => (series, ""),
        };
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let ok = pair.split_once('=').is_some_and(|(k, v)| {
                !k.is_empty()
                    && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    && v.len() >= 2
                    && v.starts_with('"')
                    && v.ends_with('"')
            });
            if !ok {
                problems.push(format!("{series}: bad label {pair}"));
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| kind.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        match kind.get(family).map(String::as_str) {
            None => problems.push(format!("{name}: sample before (or without) its TYPE")),
            Some("histogram") => {
                // One histogram per label set (its labels but `le`).
                let set: Vec<&str> = labels
                    .split(',')
                    .filter(|p| !p.is_empty() && !p.starts_with("le="))
                    .collect();
                let h = hist
                    .entry(format!("{family}{{{}}}", set.join(",")))
                    .or_default();
                if name.ends_with("_bucket") {
                    let le = labels
                        .split(',')
                        .find_map(|p| p.strip_prefix("le="))
                        .map(|s| s.trim_matches('"'))
                        .unwrap_or("");
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::NAN)
                    };
                    h.0.push((le, v));
                } else if name.ends_with("_sum") {
                    h.1 = true;
                } else if name.ends_with("_count") {
                    h.2 = Some(v);
                } else {
                    problems.push(format!("{name}: histogram sample without a suffix"));
                }
            }
            Some(_) => {}
        }
    }
    for (f, (buckets, sum, count)) in &hist {
        if !buckets.last().is_some_and(|(le, _)| le.is_infinite()) {
            problems.push(format!("{f}: no +Inf bucket"));
        }
        if buckets
            .windows(2)
            .any(|w| w[1].0 <= w[0].0 || w[1].1 < w[0].1)
        {
            problems.push(format!("{f}: buckets not ordered or not cumulative"));
        }
        if !sum {
            problems.push(format!("{f}: no _sum"));
        }
        if count.is_none() || buckets.last().map(|b| b.1) != *count {
            problems.push(format!("{f}: _count differs from the +Inf bucket"));
        }
    }
    let mut seen: BTreeMap<&String, &String> = BTreeMap::new();
    for (n, h) in &help {
        if let Some(other) = seen.insert(h, n) {
            problems.push(format!("{n} and {other} share the help text {h:?}"));
        }
    }
    problems
}
