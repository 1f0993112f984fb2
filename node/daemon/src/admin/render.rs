//! `/metrics`: the Prometheus text format of everything the node knows.

use std::sync::atomic::Ordering;

use holdfast_metrics::Writer;

use crate::node::Node;

use crate::admin::status::local_status;

/// Prometheus text format of everything the node knows.
pub fn render_metrics(node: &Node) -> String {
    let mut out = String::new();
    let mut w = Writer(&mut out);
    let st = local_status(node);
    w.family(
        "holdfast_raft_role",
        "1 for the node's current Raft role",
        "gauge",
    );
    for role in ["leader", "follower", "candidate", "learner", "shutdown"] {
        w.sample(
            "holdfast_raft_role",
            &[("role", role.into())],
            if st.role == role { 1.0 } else { 0.0 },
        );
    }
    w.gauge(
        "holdfast_raft_term",
        "Current Raft term",
        &[],
        st.term as f64,
    );
    w.gauge(
        "holdfast_raft_leader",
        "Node id of the current leader (0: none)",
        &[],
        st.leader.unwrap_or(0) as f64,
    );
    w.gauge(
        "holdfast_raft_last_applied_index",
        "Index of the last log entry applied to the state machine",
        &[],
        st.last_applied_index.unwrap_or(0) as f64,
    );
    w.gauge(
        "holdfast_config_epoch",
        "Epoch of the replicated config held here",
        &[],
        st.config_epoch as f64,
    );
    w.gauge(
        "holdfast_ready",
        "1 if the node would announce its VIPs (readiness: datapath at the committed epoch, healthy, leader known, warm join done, not drained)",
        &[],
        if node.readiness().decide().is_ok() { 1.0 } else { 0.0 },
    );
    if let Some(a) = st.bgp_announced {
        w.gauge(
            "holdfast_bgp_announced",
            "1 if the VIPs are announced over BGP (absent: BGP off)",
            &[],
            if a { 1.0 } else { 0.0 },
        );
    }
    w.gauge(
        "holdfast_datapath_applied_epoch",
        "Config epoch programmed into this node's datapath",
        &[],
        st.applied_epoch as f64,
    );
    w.histogram(
        "holdfast_raft_commit_latency_seconds",
        "Write submitted on the leader until committed and applied",
        &node.metrics.commit_latency,
    );
    w.histogram(
        "holdfast_datapath_apply_seconds",
        "Committed config epoch until programmed into the datapath",
        &node.metrics.datapath_apply,
    );
    w.counter(
        "holdfast_datapath_apply_errors_total",
        "Config epochs the datapath refused",
        &[],
        node.metrics.datapath_apply_errors.load(Ordering::Relaxed),
    );
    w.counter(
        "holdfast_commands_rejected_total",
        "Commands the state machine rejected",
        &[],
        node.metrics.commands_rejected.load(Ordering::Relaxed),
    );
    w.counter(
        "holdfast_quic_handshakes_refused_total",
        "QUIC peers refused (certificate not from the cluster CA, not a node, revoked, or over the connection limits)",
        &[],
        node.transport.stats.refused.load(Ordering::Relaxed),
    );
    w.counter(
        "holdfast_quic_rpcs_oversized_total",
        "Raft RPCs refused for exceeding the size limit or the shared read budget",
        &[],
        node.transport.stats.oversized.load(Ordering::Relaxed),
    );
    w.counter(
        "holdfast_raft_rpcs_refused_total",
        "Raft RPCs refused: the sender is not a member, or is not the node the RPC claims to come from",
        &[],
        node.metrics.raft_rpcs_refused.load(Ordering::Relaxed),
    );
    w.family(
        "holdfast_admin_refused_total",
        "Admin API connections and calls refused, by reason",
        "counter",
    );
    for (i, reason) in holdfast_api::auth::Refusal::REASONS.iter().enumerate() {
        w.sample(
            "holdfast_admin_refused_total",
            &[("reason", reason.to_string())],
            node.metrics.admin_refused[i].load(Ordering::Relaxed) as f64,
        );
    }
    let creds = &node.credentials;
    w.counter(
        "holdfast_tls_reloads_total",
        "Certificate rotations picked up from the files without a restart",
        &[],
        creds.reloads.load(Ordering::Relaxed),
    );
    w.counter(
        "holdfast_tls_reload_errors_total",
        "Changed certificate files that did not form a valid identity (the old one stays)",
        &[],
        creds.reload_errors.load(Ordering::Relaxed),
    );
    w.gauge(
        "holdfast_tls_certificate_expiry_timestamp_seconds",
        "When the node's current certificate expires (Unix time)",
        &[],
        creds.cert().not_after as f64,
    );
    if let Some(sy) = node.sync.get() {
        let m = &sy.metrics;
        let st = sy.status();
        w.gauge(
            "holdfast_sync_ready",
            "1 once the warm join is done",
            &[],
            if st.ready { 1.0 } else { 0.0 },
        );
        w.histogram(
            "holdfast_sync_lag_seconds",
            "Replication lag: entry created on the origin until applied here",
            &m.lag,
        );
        w.histograms(
            "holdfast_sync_lag_stage_seconds",
            "Where the replication lag goes: entry created on the origin until read from its \
             ring buffer (ring), taken into a peer's batch (queued), handed to QUIC (sent), all \
             on the origin; read off the stream here (received)",
            "stage",
            &[
                ("ring", &m.stages.ring),
                ("queued", &m.stages.queued),
                ("sent", &m.stages.sent),
                ("received", &m.stages.received),
            ],
        );
        w.counter(
            "holdfast_sync_batches_sent_total",
            "Batches sent to peers",
            &[],
            m.batches_sent.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_batch_entries_total",
            "Entries in the batches sent (divide by batches for the mean batch size)",
            &[],
            m.entries_in_batches.load(Ordering::Relaxed),
        );
        let t = &node.tables;
        w.counter(
            "holdfast_tables_prepared_total",
            "Divergent replication: table changes prepared here (next tables shared before the switch)",
            &[],
            t.prepares.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_tables_shared_total",
            "Divergent replication: own entries a table change moved, shared by the share walk",
            &[],
            t.shared.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_tables_switches_total",
            "Divergent replication: table switches made here",
            &[],
            t.switches.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_tables_switches_at_once_total",
            "Divergent replication: switches made at once (only backends that are down or gone left)",
            &[],
            t.immediate.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_tables_activations_total",
            "Divergent replication: table switches this node committed as the leader",
            &[],
            t.activations.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_refused_total",
            "Replication streams refused: not a member, wrong origin, bad message",
            &[],
            m.refused.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_snapshot_entries_total",
            "Entries received by snapshot pulls (warm join, resync)",
            &[],
            m.snapshot_entries.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_resyncs_total",
            "Snapshot pulls after lost entries",
            &[],
            m.resyncs.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_refresh_sent_total",
            "Own live entries re-sent to every peer in refresh rounds",
            &[],
            m.refresh_sent.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_refresh_received_total",
            "Entries received in peers' refresh rounds",
            &[],
            m.refreshed.load(Ordering::Relaxed),
        );
        w.counter(
            "holdfast_sync_expired_total",
            "Idle conntrack entries expired",
            &[],
            m.expired.load(Ordering::Relaxed),
        );
        for (name, help, get) in [
            (
                "holdfast_sync_sent_total",
                "Entries sent to the peer",
                0usize,
            ),
            (
                "holdfast_sync_received_total",
                "Entries received from the peer",
                1,
            ),
            (
                "holdfast_sync_applied_total",
                "Entries from the peer written into conntrack",
                2,
            ),
            (
                "holdfast_sync_rejected_total",
                "Entries from the peer refused by the merge rule",
                3,
            ),
            (
                "holdfast_sync_queue_depth",
                "Entries queued for the peer",
                4,
            ),
        ] {
            w.family(name, help, if get == 4 { "gauge" } else { "counter" });
            for p in &st.peers {
                let v = [p.sent, p.received, p.applied, p.rejected, p.queued][get];
                w.sample(name, &[("peer", p.peer.to_string())], v as f64);
            }
        }
        w.family(
            "holdfast_sync_peer_connected",
            "1 while the replication session to the peer is up",
            "gauge",
        );
        for p in &st.peers {
            w.sample(
                "holdfast_sync_peer_connected",
                &[("peer", p.peer.to_string())],
                if p.connected { 1.0 } else { 0.0 },
            );
        }
    }
    if let Some(h) = &node.datapath {
        let dp = h.dp.lock().expect("dp");
        if let Ok(s) = dp.stats() {
            for (name, i) in datapath_ebpf::abi::STAT_NAMES {
                let metric = format!(
                    "holdfast_datapath_{}_total",
                    name.trim_start_matches("LB_STAT_").to_lowercase()
                );
                w.counter(&metric, datapath_stat_help(name), &[], s.c[*i]);
            }
        }
        if let Some(n) = st.conntrack_entries {
            w.gauge(
                "holdfast_conntrack_entries",
                "Entries in the conntrack map",
                &[],
                n as f64,
            );
        }
        if let Ok(per) = dp.service_stats() {
            let state = node.sm.current();
            for (name, i) in datapath_ebpf::abi::SVC_STAT_NAMES {
                let metric = format!(
                    "holdfast_service_{}_total",
                    name.trim_start_matches("LB_SVC_").to_lowercase()
                );
                w.family(&metric, service_stat_help(name), "counter");
                for (key, v) in &per {
                    let svc = state
                        .state
                        .services
                        .values()
                        .find(|s| {
                            datapath_ebpf::abi::SvcKey::new(
                                s.vip,
                                s.port,
                                match s.proto {
                                    raft_store::cluster::Proto::Tcp => 6,
                                    raft_store::cluster::Proto::Udp => 17,
                                },
                            ) == *key
                        })
                        .map(|s| s.name.clone())
                        .unwrap_or_else(|| "unknown".into());
                    w.sample(&metric, &[("service", svc)], v.c[*i] as f64);
                }
            }
        }
    }
    {
        let mut w = Writer(&mut out);
        node.health.render(&mut w, &node.sm.current().state);
    }
    out
}

/// Help text of each datapath counter (`holdfast_datapath_<name>_total`).
fn datapath_stat_help(stat: &str) -> &'static str {
    match stat {
        "LB_STAT_FWD_PACKETS" => "Packets forwarded to a backend (IPIP)",
        "LB_STAT_FWD_BYTES" => "Bytes forwarded to backends, before encapsulation",
        "LB_STAT_NEW_FLOWS" => "Flows entered into conntrack by a Maglev pick",
        "LB_STAT_CT_HITS" => "Packets forwarded by an existing conntrack entry",
        "LB_STAT_MIDFLOW_MISS" => {
            "Mid-flow packets (TCP without SYN) with no conntrack entry: each a connection that may have broken"
        }
        "LB_STAT_REPICK_GONE" => "Conntrack entries whose backend was removed, re-picked by Maglev",
        "LB_STAT_REPICK_STALE" => "SYN or UDP packets that re-picked a stale conntrack entry",
        "LB_STAT_RING_LOST" => "New-flow events lost because the ring buffer to the agent was full",
        "LB_STAT_FIB_NO_NEIGH" => "Packets handed to the kernel to forward because the next hop was unresolved",
        "LB_STAT_FIB_FAIL" => "Packets dropped because no route led to the backend",
        "LB_STAT_ICMP_TOO_BIG" => "ICMP fragmentation-needed / packet-too-big sent for oversized packets",
        "LB_STAT_ICMP_ERR_FWD" => "ICMP errors about VIP flows sent on to their backends",
        "LB_STAT_PASS_MALFORMED" => "Malformed frames not addressed to a VIP, passed to the kernel",
        "LB_STAT_PASS_VIP_OTHER" => "VIP packets for a port or protocol with no service, passed to the kernel",
        "LB_STAT_DROP_MALFORMED" => "Malformed packets to a VIP, dropped",
        "LB_STAT_DROP_FRAGMENT" => "Fragments to a VIP (not balanceable), dropped",
        "LB_STAT_DROP_NO_BACKEND" => "Packets for a service with no active backend, dropped",
        "LB_STAT_DROP_UNSUPPORTED" => "VIP packets of an unsupported kind (IP options, extension headers), dropped",
        "LB_STAT_DROP_ADJUST" => "Packets dropped because the frame could not be grown for encapsulation",
        "LB_STAT_PASS_OTHERHOST" => "Unicast frames for another MAC (flooded or promiscuous), left to the kernel",
        "LB_STAT_SYN_FLOOD" => {
            "SYNs forwarded by Maglev without a conntrack entry because their CPU was over the SYN flood rate"
        }
        "LB_STAT_FLOOD_HANDSHAKE" => {
            "TCP packets without an entry during a SYN flood (handshakes completing), entered by Maglev"
        }
        "LB_STAT_SNAT_FWD" => "Packets forwarded to a backend with SNAT (also counted as forwarded)",
        "LB_STAT_SNAT_REPLIES" => "Backend replies to a SNAT address translated back to their client",
        "LB_STAT_SNAT_NO_ENTRY" => {
            "Packets to a SNAT address (or SNAT ICMP errors) with no binding, passed to the kernel or dropped"
        }
        "LB_STAT_SNAT_EXHAUSTED" => {
            "New SNAT flows dropped because no free source port was found (alert: the port range of a backend is full)"
        }
        "LB_STAT_SNAT_NO_ADDR" => {
            "SNAT packets dropped because this node (or the entry's slot) has no SNAT address of the family"
        }
        "LB_STAT_SNAT_ICMP" => "ICMP errors about SNAT flows translated, either way",
        "LB_STAT_DROP_TTL" => "SNAT packets whose TTL or hop limit would reach 0, dropped",
        "LB_STAT_SNAT_HALF_OPEN" => "SYNs of SNAT services bound half-open during a SYN flood",
        "LB_STAT_SNAT_STRAY" => {
            "SYN-ACKs to a half-open SNAT binding that do not acknowledge its client's SYN, dropped"
        }
        "LB_STAT_SNAT_MIDFLOW" => {
            "SNAT TCP packets past the SYN with no entry on this node, dropped (a new port would reset the connection; the retransmission finds the replicated entry)"
        }
        "LB_STAT_SRC_REFUSED" => {
            "Packets dropped because their source is outside their service's source ranges"
        }
        "LB_STAT_AFFINITY_HITS" => {
            "New flows of services with client affinity sent to their client's backend"
        }
        "LB_STAT_AFFINITY_NEW" => {
            "Client affinity entries made (a client's first flow, or its first after the entry ended)"
        }
        "LB_STAT_AFFINITY_RELEASED" => {
            "Client affinity entries whose backend was removed, drained or marked down: the client picked anew"
        }
        "LB_STAT_AFFINITY_EXPIRED" => {
            "Client affinity entries idle past their service's timeout: the client picked anew"
        }
        _ => "Datapath counter (see docs/operations.md)",
    }
}

/// Help text of each per-service counter (`holdfast_service_<name>_total`).
fn service_stat_help(stat: &str) -> &'static str {
    match stat {
        "LB_SVC_PACKETS" => "Packets forwarded for the service",
        "LB_SVC_BYTES" => "Bytes forwarded for the service, before encapsulation",
        "LB_SVC_NEW_FLOWS" => "New flows of the service",
        "LB_SVC_CT_HITS" => "Packets of the service forwarded by conntrack",
        "LB_SVC_MIDFLOW_MISS" => "Mid-flow packets of the service with no conntrack entry",
        "LB_SVC_DROPS" => "Packets of the service dropped",
        "LB_SVC_SNAT_EXHAUSTED" => {
            "New flows of the service dropped for want of a free SNAT port (alert)"
        }
        "LB_SVC_REPLIES" => "Backend replies of the service translated back to clients (SNAT)",
        "LB_SVC_SRC_REFUSED" => {
            "Packets dropped because their source is outside the service's source ranges"
        }
        _ => "Per-service datapath counter",
    }
}
