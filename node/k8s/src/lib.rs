//! The Kubernetes controller: LoadBalancer Services (of our
//! loadBalancerClass) and their EndpointSlices become Raft config.
//!
//! It runs on the Raft leader only and moves with leadership: every node
//! runs [`leader_loop`], which starts the controller when the node becomes
//! leader and stops it when it is not. The controller lists and watches
//! Services and EndpointSlices (kube-rs reflectors: a 410 Gone or an API
//! server restart means a relist, done by the watcher), and after every
//! burst of changes (debounced) computes [`plan::plan`] — the difference
//! between what the objects ask for and the committed config — and commits
//! it as a few batches. The plan is a pure function of the objects and the
//! committed state, so a new leader converges from its relist and nothing
//! is applied twice. Then it writes the VIPs into `status.loadBalancer` and
//! records Events for objects it had to skip.

pub mod plan;
pub mod testapi;

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Event, ObjectReference, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{reflector, watcher, WatchStreamExt},
};
use raft_store::{Command, Request};
use serde::{Deserialize, Serialize};
use tracing::{info, info_span, warn, Instrument};

use holdfast_api::wire::HealthTable;
use raft_store::{state_machine::SmData, Response};

/// What the controller needs from the node it runs in: whether it leads,
/// the committed config, the tier's health table, and a way to commit. The
/// daemon implements it; the controller never sees the node itself.
pub trait Host: Send + Sync + 'static {
    /// This node's id.
    fn id(&self) -> u64;
    /// Whether this node is the Raft leader now.
    fn is_leader(&self) -> bool;
    /// Resolves when the node's Raft state (leader, role) may have changed.
    fn leadership_changed(&self) -> impl std::future::Future<Output = ()> + Send;
    /// Whether the node is shutting down.
    fn is_shutting_down(&self) -> bool;
    /// Confirm that this node still leads and has applied everything
    /// committed so far (a new leader may not have applied its
    /// predecessor's last entries yet).
    fn ensure_leading(&self) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// The config this node has applied.
    fn config(&self) -> Arc<SmData>;
    /// The tier's health verdicts and every node's views (`GET /health`).
    fn health_table(&self, state: &raft_store::ClusterState) -> HealthTable;
    /// Commit one request; the error as text.
    fn commit(
        &self,
        req: Request,
    ) -> impl std::future::Future<Output = Result<Response, String>> + Send;
    /// Commit several requests pipelined, in order; one result each.
    fn commit_pipelined(
        &self,
        reqs: Vec<Request>,
    ) -> impl std::future::Future<Output = Vec<Result<Response, String>>> + Send;
}

/// `[kubernetes]` of node.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sSection {
    /// Run the controller (on whichever node leads).
    pub enabled: bool,
    /// API server URL; none: in-cluster service account or kubeconfig.
    pub api_url: Option<String>,
    /// CA certificate (PEM) of the API server, with `api_url`.
    pub ca_file: Option<PathBuf>,
    /// Bearer token file, with `api_url`.
    pub token_file: Option<PathBuf>,
    /// Services of type LoadBalancer with this spec.loadBalancerClass are ours.
    pub load_balancer_class: String,
    /// Also own Services whose spec.externalIPs fall in a VIP pool.
    pub external_ips: bool,
    /// Wait this long after a change for more before reconciling.
    pub debounce_ms: u64,
    /// Reconcile at least this often even without changes.
    pub resync_s: u64,
    /// Maglev table size of the services it creates (prime).
    pub table_size: u32,
}

impl Default for K8sSection {
    fn default() -> Self {
        Self {
            enabled: false,
            api_url: None,
            ca_file: None,
            token_file: None,
            load_balancer_class: "holdfast.io/l4".into(),
            external_ips: false,
            debounce_ms: 20,
            resync_s: 30,
            table_size: 1021,
        }
    }
}

/// Commands per Raft entry.
const MAX_BATCH: usize = 500;

/// The API calls the controller makes — exactly what its RBAC must grant
/// (checked against deploy/kubernetes by the manifest test).
pub const API_CALLS: &[(&str, &str, &str)] = &[
    // (API group, resource, verb)
    ("", "services", "list"),
    ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("", "services/status", "patch"),
    ("", "events", "create"),
];

async fn client(cfg: &K8sSection) -> Result<kube::Client> {
    let config = match &cfg.api_url {
        Some(url) => {
            let mut c = kube::Config::new(url.parse().context("kubernetes.api_url")?);
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                let ders: Vec<Vec<u8>> = rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
                    .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| {
                        c.map(|c| c.to_vec())
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow!("{}: {e}", ca.display()))?;
                c.root_cert = Some(ders);
            }
            if let Some(t) = &cfg.token_file {
                let tok = std::fs::read_to_string(t)
                    .with_context(|| format!("reading {}", t.display()))?;
                c.auth_info.token = Some(tok.trim().to_string().into());
            }
            c.read_timeout = Some(Duration::from_secs(330));
            c
        }
        None => kube::Config::infer()
            .await
            .context("no kubernetes.api_url and no in-cluster/kubeconfig configuration")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Start the controller when this node leads, stop it when it does not.
pub async fn leader_loop<H: Host>(node: Arc<H>, cfg: K8sSection) {
    // Aborted when dropped: the controller dies with this loop.
    let mut running: Option<AbortOnDrop> = None;
    loop {
        let leader = node.is_leader();
        if running.as_ref().is_some_and(|t| t.0.is_finished()) {
            running = None;
        }
        match (leader && !node.is_shutting_down(), running.is_some()) {
            (true, false) => {
                info!("leading: starting the Kubernetes controller");
                let n = node.clone();
                let cfg = cfg.clone();
                running = Some(AbortOnDrop(tokio::spawn(async move {
                    if let Err(e) = run(n, cfg).await {
                        warn!(error = %format!("{e:#}"), "Kubernetes controller stopped");
                        // Restarted by the loop after a pause.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                })));
            }
            (false, true) => {
                info!("not leading: stopping the Kubernetes controller");
                running = None;
            }
            _ => {}
        }
        tokio::select! {
            _ = node.leadership_changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn run<H: Host>(node: Arc<H>, cfg: K8sSection) -> Result<()> {
    let client = client(&cfg).await?;
    let (svc_store, svc_w) = reflector::store::<Service>();
    let (sl_store, sl_w) = reflector::store::<EndpointSlice>();
    let changed = Arc::new(tokio::sync::Notify::new());
    let (c1, c2) = (changed.clone(), changed.clone());
    // Watch events since the last reconcile (its span's `events`).
    let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (e1, e2) = (events.clone(), events.clone());
    let svc_stream = reflector(
        svc_w,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(move |ev| {
        if let Err(e) = ev {
            warn!(error = %e, "watching Services");
        }
        e1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c1.notify_one();
        futures::future::ready(())
    });
    let sl_stream = reflector(
        sl_w,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(move |ev| {
        if let Err(e) = ev {
            warn!(error = %e, "watching EndpointSlices");
        }
        e2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c2.notify_one();
        futures::future::ready(())
    });
    let streams = tokio::spawn(async move {
        tokio::join!(svc_stream, sl_stream);
    });
    let _abort = AbortOnDrop(streams);
    // Never reconcile from a half-filled cache: that would delete services.
    svc_store
        .wait_until_ready()
        .await
        .context("Service cache")?;
    sl_store
        .wait_until_ready()
        .await
        .context("EndpointSlice cache")?;
    info!("Kubernetes caches synced");
    let mut recorded: HashSet<plan::Note> = HashSet::new();
    let pcfg = plan::PlanConfig {
        load_balancer_class: cfg.load_balancer_class.clone(),
        external_ips: cfg.external_ips,
        table_size: cfg.table_size,
    };
    loop {
        let span = info_span!(
            "k8s_reconcile",
            events = events.swap(0, std::sync::atomic::Ordering::Relaxed),
            commands = tracing::field::Empty
        );
        reconcile(&node, &client, &svc_store, &sl_store, &pcfg, &mut recorded)
            .instrument(span)
            .await?;
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(cfg.resync_s.max(1))) => {}
        }
        // Let a burst finish: many changes, one plan.
        tokio::time::sleep(Duration::from_millis(cfg.debounce_ms)).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn reconcile<H: Host>(
    node: &Arc<H>,
    client: &kube::Client,
    svc_store: &reflector::Store<Service>,
    sl_store: &reflector::Store<EndpointSlice>,
    pcfg: &plan::PlanConfig,
    recorded: &mut HashSet<plan::Note>,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    // Plan against everything committed so far (a new leader may not
    // have applied its predecessor's last entries yet).
    node.ensure_leading()
        .await
        .map_err(|e| anyhow!("not leading any more: {e}"))?;
    let services: Vec<Service> = svc_store.state().iter().map(|s| (**s).clone()).collect();
    let slices: Vec<EndpointSlice> = sl_store.state().iter().map(|s| (**s).clone()).collect();
    let state = node.config().state.clone();
    let t_read = t0.elapsed();
    let mut p = plan::plan(&services, &slices, &state, pcfg);
    p.notes.extend(plan::view_notes(
        &services,
        &state,
        &node.health_table(&state),
    ));
    let t_plan = t0.elapsed();
    tracing::Span::current().record("commands", p.commands.len());
    if !p.commands.is_empty() {
        info!(commands = p.commands.len(), "committing Kubernetes changes");
    }
    // Every batch at once (pipelined, in order): the second does not wait
    // for the first one's commit.
    let chunks: Vec<&[Command]> = p.commands.chunks(MAX_BATCH).collect();
    let reqs = chunks
        .iter()
        .map(|chunk| Request {
            id: Some(format!("k8s-{}-{}", state.epoch, digest(chunk))),
            command: Command::Batch {
                commands: chunk.to_vec(),
            },
            trace: None,
        })
        .collect();
    let results = node.commit_pipelined(reqs).await;
    for (chunk, r) in chunks.into_iter().zip(results) {
        let r = r.map_err(|e| anyhow!("{e}"))?;
        if let Some(why) = r.rejected {
            // One bad command must not block the others: apply them one
            // by one and report what is refused. (A later batch that
            // depended on this one was refused too and comes next.)
            warn!(reason = %why, "batch refused; applying one by one");
            for c in chunk {
                let r = node
                    .commit(Request {
                        id: None,
                        command: c.clone(),
                        trace: None,
                    })
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                if let Some(why) = r.rejected {
                    warn!(command = ?c, reason = %why, "Kubernetes change refused");
                }
            }
        }
    }
    if !p.commands.is_empty() {
        tracing::debug!(
            read_ms = t_read.as_secs_f64() * 1e3,
            plan_ms = (t_plan - t_read).as_secs_f64() * 1e3,
            commit_ms = (t0.elapsed() - t_plan).as_secs_f64() * 1e3,
            "reconcile timing"
        );
    }
    // status.loadBalancer.ingress, written concurrently (after a restart
    // or a relist there may be hundreds to write; one at a time that
    // would hold up the next reconcile).
    let patches: Vec<_> = p
        .statuses
        .iter()
        .filter_map(|((ns, name), vips)| {
            let have: Vec<String> = services
                .iter()
                .find(|s| {
                    s.metadata.namespace.as_deref() == Some(ns)
                        && s.metadata.name.as_deref() == Some(name)
                })
                .and_then(|s| s.status.as_ref())
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .map(|i| i.iter().filter_map(|x| x.ip.clone()).collect())
                .unwrap_or_default();
            let want: Vec<String> = vips.iter().map(|v| v.to_string()).collect();
            (have != want).then_some((ns, name, want))
        })
        .collect();
    futures::stream::iter(patches)
        .for_each_concurrent(STATUS_CONCURRENCY, |(ns, name, want)| async move {
            let api: Api<Service> = Api::namespaced(client.clone(), ns);
            let body = serde_json::json!({"status": {"loadBalancer": {"ingress":
                want.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>()}}});
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
                .await
            {
                Ok(_) => info!(service = %format!("{ns}/{name}"), vips = ?want, "status written"),
                Err(e) => warn!(service = %format!("{ns}/{name}"), error = %e, "writing status"),
            }
        })
        .await;
    // Events for what was skipped (once per object and reason).
    for n in p.notes {
        if recorded.contains(&n) {
            continue;
        }
        warn!(object = %format!("{} {}/{}", n.kind, n.namespace, n.name), reason = n.reason, message = %n.message, "skipped");
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some("holdfast-".into()),
                namespace: Some(n.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                kind: Some(n.kind.into()),
                api_version: Some(
                    if n.kind == "EndpointSlice" {
                        "discovery.k8s.io/v1"
                    } else {
                        "v1"
                    }
                    .into(),
                ),
                namespace: Some(n.namespace.clone()),
                name: Some(n.name.clone()),
                uid: (!n.uid.is_empty()).then(|| n.uid.clone()),
                ..Default::default()
            },
            reason: Some(n.reason.into()),
            message: Some(n.message.clone()),
            type_: Some("Warning".into()),
            reporting_component: Some("holdfast.io/controller".into()),
            reporting_instance: Some(format!("node-{}", node.id())),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some("holdfast-controller".into()),
                host: None,
            }),
            count: Some(1),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(client.clone(), &n.namespace);
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => {
                recorded.insert(n);
            }
            Err(e) => warn!(error = %e, "recording an Event"),
        }
    }
    Ok(())
}

/// Status patches in flight at once.
const STATUS_CONCURRENCY: usize = 16;

/// A short stable digest of commands (request ids of retried batches).
fn digest(cmds: &[Command]) -> String {
    let s = serde_json::to_string(cmds).unwrap_or_default();
    // FNV-1a 64.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}
