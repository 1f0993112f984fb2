//! `clusterctl top`: per-service rates summed over every node and per-node
//! health, from two samples of each member's `/metrics` and the members
//! table. Blocking (clusterctl and tests call it).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use holdfast_api::{
    client::{Client, ClientError},
    wire::MemberRow,
};

/// Per-service counters that `top` turns into rates.
const SERVICE_COUNTERS: [&str; 4] = ["packets", "bytes", "new_flows", "midflow_miss"];

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceRates {
    pub service: String,
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
    pub new_flows_per_s: f64,
    pub midflow_misses_per_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopView {
    pub interval_s: f64,
    pub services: Vec<ServiceRates>,
    pub nodes: Vec<MemberRow>,
    /// Nodes whose metrics could not be read (their rates are missing).
    pub unreachable: Vec<String>,
}

/// `holdfast_service_{counter}_total{service="x"} v` samples of one scrape:
/// (service, counter) -> value.
fn parse(text: &str) -> BTreeMap<(String, &'static str), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        for c in SERVICE_COUNTERS {
            let prefix = format!("holdfast_service_{c}_total{{service=\"");
            if let Some(rest) = line.strip_prefix(&prefix) {
                if let Some((svc, tail)) = rest.split_once("\"}") {
                    if let Ok(v) = tail.trim().parse::<f64>() {
                        *out.entry((svc.to_string(), c)).or_insert(0.0) += v;
                    }
                }
            }
        }
    }
    out
}

fn scrape(
    client: &Client,
    addrs: &[(u64, String)],
    timeout: Duration,
) -> (BTreeMap<(String, &'static str), f64>, Vec<String>) {
    let mut sum = BTreeMap::new();
    let mut bad = Vec::new();
    for (id, a) in addrs {
        match client
            .clone()
            .for_node(*id)
            .get_text(a, "/metrics", timeout)
        {
            Ok(text) => {
                for (k, v) in parse(&text) {
                    *sum.entry(k).or_insert(0.0) += v;
                }
            }
            Err(_) => bad.push(a.clone()),
        }
    }
    (sum, bad)
}

/// Sample every member twice, `interval` apart, through `node` (any
/// member), with `client`'s certificate (viewer suffices).
pub fn sample(client: &Client, node: &str, interval: Duration) -> Result<TopView, ClientError> {
    let timeout = Duration::from_secs(3);
    let nodes: Vec<MemberRow> = client.get(node, "/cluster/members", timeout)?;
    let addrs: Vec<(u64, String)> = nodes
        .iter()
        .filter_map(|n| n.admin_addr.clone().map(|a| (n.node_id, a)))
        .collect();
    let t0 = Instant::now();
    let (a, _) = scrape(client, &addrs, timeout);
    std::thread::sleep(interval.saturating_sub(t0.elapsed()));
    let t1 = Instant::now();
    let (b, unreachable) = scrape(client, &addrs, timeout);
    let dt = t1.duration_since(t0).as_secs_f64().max(1e-3);
    let mut by_svc: BTreeMap<String, ServiceRates> = BTreeMap::new();
    for ((svc, c), v1) in &b {
        let v0 = a.get(&(svc.clone(), c)).copied().unwrap_or(*v1);
        // A restarted node's counters start again: no negative rates.
        let rate = ((v1 - v0) / dt).max(0.0);
        let e = by_svc.entry(svc.clone()).or_insert_with(|| ServiceRates {
            service: svc.clone(),
            ..Default::default()
        });
        match *c {
            "packets" => e.packets_per_s = rate,
            "bytes" => e.bytes_per_s = rate,
            "new_flows" => e.new_flows_per_s = rate,
            _ => e.midflow_misses_per_s = rate,
        }
    }
    Ok(TopView {
        interval_s: dt,
        services: by_svc.into_values().collect(),
        nodes,
        unreachable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_counters_and_ignores_the_rest() {
        let text = "# TYPE holdfast_service_packets_total counter\n\
            holdfast_service_packets_total{service=\"web\"} 10\n\
            holdfast_service_bytes_total{service=\"web\"} 1500\n\
            holdfast_service_packets_total{service=\"dns\"} 3\n\
            holdfast_datapath_fwd_packets_total 99\n\
            holdfast_service_packets_total{service=\"bad\"} x\n";
        let m = parse(text);
        assert_eq!(m[&("web".to_string(), "packets")], 10.0);
        assert_eq!(m[&("web".to_string(), "bytes")], 1500.0);
        assert_eq!(m[&("dns".to_string(), "packets")], 3.0);
        assert!(!m.contains_key(&("bad".to_string(), "packets")));
        assert_eq!(m.len(), 3);
    }
}
