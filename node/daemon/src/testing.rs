//! In-process clusters for the cluster tests and `config-bench`: real nodes
//! (Raft over QUIC with mutual TLS on loopback, redb in a temporary
//! directory, a real BPF datapath each with small maps, not attached),
//! started, killed and restarted at will. Panics on failure (test support).

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    config::{DatapathSection, NodeConfig, RaftTuning, SyncSection, TlsConfig},
    node::Node,
};
use datapath_ebpf::{
    abi::{CtKey, CT_F_REMOTE, IPPROTO_TCP},
    packet::{Packet, TCP_SYN},
    testrun,
};
use holdfast_pki as tls;
use raft_store::{
    cluster::{ForwardingMode, Proto, Service},
    Command, Request, Response,
};
use tempfile::TempDir;

/// `HOLDFAST_TEST_LOG=<filter>` prints the nodes' logs (once per process).
pub fn init_test_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(f) = std::env::var("HOLDFAST_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(f))
                .with_test_writer()
                .try_init();
        }
    });
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "cluster tests load a BPF datapath per node: run them as root"
    );
}

/// A loopback port free for both TCP and UDP right now.
/// A binary of another workspace crate (`clusterctl`, `holdfast-decap`),
/// built with the profile of the running test and returned by path. Cargo
/// gives a test only its own package's binaries; this builds the other one
/// once per test process (a no-op when `cargo test --workspace` built it).
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target directory");
    let mut built = BUILT.lock().expect("built binaries");
    if !built.iter().any(|b| b == bin) {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", package, "--bin", bin])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("running cargo build");
        assert!(
            out.status.success(),
            "cargo build -p {package} --bin {bin} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        built.push(bin.to_string());
    }
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A port free for TCP and UDP on 127.0.0.1, below the kernel's ephemeral
/// range (32768 and up by default): a port the kernel handed out as
/// ephemeral could be handed again to another test's outgoing connection
/// before the node binds it. Each call takes the next port of this
/// process's share of 20000..32000.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 60) * 200;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (20_000 + (base - 20_000 + n) % 12_000) as u16;
        let Ok(_t) = std::net::TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn make_ca(dir: &Path, name: &str) {
    let (c, k) = tls::generate_ca(name).expect("CA");
    tls::write_pair(dir, "ca", &c, &k).expect("write CA");
}

/// Issue `subject` from `dir`'s CA into `dir/<stem>.pem/.key`, valid as
/// given: (certificate PEM, key PEM).
pub fn issue_into(
    dir: &Path,
    stem: &str,
    subject: &tls::Subject,
    validity: tls::Validity,
) -> (String, String) {
    let ca = std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem");
    let key = std::fs::read_to_string(dir.join("ca.key")).expect("ca.key");
    let (c, k) = tls::issue_with(&ca, &key, subject, validity).expect("issue");
    tls::write_pair(dir, stem, &c, &k).expect("write cert");
    (c, k)
}

/// Issue `node-<id>.pem/.key` (for 127.0.0.1) in `dir`.
pub fn issue_node(dir: &Path, id: u64) {
    issue_into(
        dir,
        &format!("node-{id}"),
        &tls::Subject::Node {
            id,
            ips: vec!["127.0.0.1".parse().expect("ip")],
        },
        tls::Validity::days(30),
    );
}

/// Issue a client certificate `client-<name>.pem/.key` with `role` in `dir`.
pub fn issue_client(dir: &Path, name: &str, role: holdfast_api::auth::Role) {
    issue_client_valid(dir, name, role, tls::Validity::days(30));
}

/// As [`issue_client`], valid as given (an expired one, say).
pub fn issue_client_valid(
    dir: &Path,
    name: &str,
    role: holdfast_api::auth::Role,
    validity: tls::Validity,
) {
    issue_into(
        dir,
        &format!("client-{name}"),
        &tls::Subject::Client {
            name: name.into(),
            role: role.as_str().into(),
        },
        validity,
    );
}

/// A validity that ended yesterday.
pub fn expired() -> tls::Validity {
    let day = Duration::from_secs(86_400);
    tls::Validity {
        not_before: std::time::SystemTime::now() - 2 * day,
        not_after: std::time::SystemTime::now() - day,
    }
}

/// Config writes in the background (backend weight changes of `backend`,
/// each with its own request id, through `addrs` in turn, every
/// `every`), counted until [`BackgroundWrites::stop`].
pub struct BackgroundWrites {
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub ok: Arc<std::sync::atomic::AtomicU64>,
    pub failed: Arc<std::sync::atomic::AtomicU64>,
    /// Slowest successful write, ms.
    pub worst_ms: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BackgroundWrites {
    pub fn start(
        client: holdfast_api::client::Client,
        addrs: Vec<String>,
        backend: u32,
        tag: &str,
        every: Duration,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed, worst_ms) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, o, f, w, tag) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            worst_ms.clone(),
            tag.to_string(),
        );
        let task = tokio::task::spawn_blocking(move || {
            let mut k = 0u32;
            while !s.load(Ordering::Relaxed) {
                k += 1;
                let req = Request {
                    id: Some(format!("{tag}-{k}")),
                    command: Command::SetBackendWeight {
                        id: backend,
                        weight: 1 + k % 7,
                    },
                    trace: None,
                };
                let addr = &addrs[k as usize % addrs.len()];
                let t0 = Instant::now();
                match client.post_retry::<_, Response>(
                    std::slice::from_ref(addr),
                    "/command",
                    &req,
                    Duration::from_secs(5),
                ) {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::Relaxed);
                        w.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("{tag}: write {k} through {addr} failed: {e}");
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(every);
            }
        });
        Self {
            stop,
            ok,
            failed,
            worst_ms,
            task,
        }
    }

    /// Stop and wait: (writes that succeeded, writes that failed).
    pub async fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("background writer");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The identity in `dir`'s `ca.pem` and `<stem>.pem/.key`.
pub fn identity(dir: &Path, stem: &str) -> tls::Identity {
    tls::Identity::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{stem}.pem")),
        &dir.join(format!("{stem}.key")),
    )
    .expect("load identity")
}

/// An admin API client presenting `dir`'s `<stem>.pem` certificate.
pub fn client_from(dir: &Path, stem: &str) -> holdfast_api::client::Client {
    holdfast_api::client::Client::from_identity(&identity(dir, stem)).expect("client")
}

pub struct Cluster {
    pub dir: TempDir,
    pub pki: PathBuf,
    pub cfgs: BTreeMap<u64, NodeConfig>,
    pub nodes: BTreeMap<u64, Arc<Node>>,
    pub raft: RaftTuning,
    pub datapath: bool,
    /// `[kubernetes]` of every node started from now on.
    pub kubernetes: holdfast_k8s::K8sSection,
    /// `[datapath] max_services` of every node started from now on.
    pub max_services: u32,
    /// `[[service]]` seed of the bootstrap node.
    pub seed: Vec<crate::config::SeedService>,
    /// `[sync] mode` of every node started from now on.
    pub sync_mode: sync::service::SyncMode,
}

impl Cluster {
    /// Start `n` nodes: node 1 bootstraps, the others join through it.
    pub async fn start(n: u64) -> Self {
        Self::start_with(n, RaftTuning::default(), true).await
    }

    pub async fn start_with(n: u64, raft: RaftTuning, datapath: bool) -> Self {
        Self::start_full(n, raft, datapath, Default::default()).await
    }

    /// Start `n` nodes whose config has this `[kubernetes]` section.
    pub async fn start_full(
        n: u64,
        raft: RaftTuning,
        datapath: bool,
        kubernetes: holdfast_k8s::K8sSection,
    ) -> Self {
        Self::start_sized(n, raft, datapath, kubernetes, 64).await
    }

    /// As [`Cluster::start_full`], with room for `max_services` services.
    pub async fn start_sized(
        n: u64,
        raft: RaftTuning,
        datapath: bool,
        kubernetes: holdfast_k8s::K8sSection,
        max_services: u32,
    ) -> Self {
        Self::start_seeded(n, raft, datapath, kubernetes, max_services, vec![]).await
    }

    /// As [`Cluster::start_sized`], node 1 seeding these services.
    pub async fn start_seeded(
        n: u64,
        raft: RaftTuning,
        datapath: bool,
        kubernetes: holdfast_k8s::K8sSection,
        max_services: u32,
        seed: Vec<crate::config::SeedService>,
    ) -> Self {
        Self::start_opts(
            n,
            raft,
            datapath,
            kubernetes,
            max_services,
            seed,
            Default::default(),
        )
        .await
    }

    /// Start `n` nodes with datapaths replicating in `mode`.
    pub async fn start_sync_mode(n: u64, mode: sync::service::SyncMode) -> Self {
        Self::start_opts(
            n,
            RaftTuning::default(),
            true,
            Default::default(),
            64,
            vec![],
            mode,
        )
        .await
    }

    async fn start_opts(
        n: u64,
        raft: RaftTuning,
        datapath: bool,
        kubernetes: holdfast_k8s::K8sSection,
        max_services: u32,
        seed: Vec<crate::config::SeedService>,
        sync_mode: sync::service::SyncMode,
    ) -> Self {
        init_test_logging();
        if datapath {
            require_root();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        make_ca(&pki, "test");
        for role in holdfast_api::auth::Role::ALL {
            issue_client(&pki, role.as_str(), role);
        }
        let mut c = Self {
            dir,
            pki,
            cfgs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            raft,
            datapath,
            kubernetes,
            max_services,
            seed,
            sync_mode,
        };
        for id in 1..=n {
            c.add_node(id).await;
        }
        c.wait_members((1..=n).collect(), Duration::from_secs(20))
            .await;
        c
    }

    pub fn config(&self, id: u64, pki: &Path) -> NodeConfig {
        let join = if id == 1 || self.cfgs.is_empty() {
            vec![]
        } else {
            self.nodes
                .values()
                .map(|n| n.cfg.admin_addr)
                .collect::<Vec<SocketAddr>>()
        };
        let join_empty = join.is_empty();
        NodeConfig {
            node_id: id,
            data_dir: self.dir.path().join(format!("node{id}")),
            raft_addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            admin_addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            metrics_addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            admin: Default::default(),
            bgp_next_hop: None,
            bootstrap: join.is_empty(),
            join,
            leave_on_shutdown: false,
            tls: TlsConfig {
                ca_cert: pki.join("ca.pem"),
                cert: pki.join(format!("node-{id}.pem")),
                key: pki.join(format!("node-{id}.key")),
                reload_interval_ms: 500,
            },
            raft: self.raft.clone(),
            datapath: DatapathSection {
                enabled: self.datapath,
                max_services: self.max_services,
                max_backends: 4096,
                conntrack_size: 4096,
                ring_bytes: 1 << 16,
                ..Default::default()
            },
            sync: SyncSection {
                refresh_interval_s: 2,
                mode: self.sync_mode,
                ..Default::default()
            },
            bgp: Default::default(),
            kubernetes: self.kubernetes.clone(),
            services: if join_empty {
                self.seed.clone()
            } else {
                vec![]
            },
            snat: None,
            pools: vec![],
        }
    }

    /// Start a new node `id` (joining the live ones).
    pub async fn add_node(&mut self, id: u64) -> Arc<Node> {
        issue_node(&self.pki, id);
        let cfg = self.config(id, &self.pki.clone());
        let node = Node::start(cfg.clone()).await.expect("start node");
        self.cfgs.insert(id, cfg);
        self.nodes.insert(id, node.clone());
        node
    }

    /// Stop a node abruptly: no leave, Raft and endpoint shut down.
    pub async fn kill(&mut self, id: u64) {
        let n = self.nodes.remove(&id).expect("live node");
        n.shutdown(false).await;
    }

    /// Restart a killed node from its data directory.
    pub async fn restart(&mut self, id: u64) -> Arc<Node> {
        let mut cfg = self.cfgs[&id].clone();
        cfg.bootstrap = false;
        cfg.join = vec![];
        let node = Node::start(cfg).await.expect("restart node");
        self.nodes.insert(id, node.clone());
        node
    }

    /// An admin API client with the `admin` role (certificates made at start).
    pub fn client(&self) -> holdfast_api::client::Client {
        self.client_as(holdfast_api::auth::Role::Admin)
    }

    /// An admin API client with `role`.
    pub fn client_as(&self, role: holdfast_api::auth::Role) -> holdfast_api::client::Client {
        client_from(&self.pki, &format!("client-{}", role.as_str()))
    }

    /// The environment that gives clusterctl the `role` client certificate.
    pub fn clusterctl_env(&self, role: holdfast_api::auth::Role) -> [(&'static str, PathBuf); 3] {
        let stem = format!("client-{}", role.as_str());
        [
            ("HOLDFAST_CA", self.pki.join("ca.pem")),
            ("HOLDFAST_CERT", self.pki.join(format!("{stem}.pem"))),
            ("HOLDFAST_KEY", self.pki.join(format!("{stem}.key"))),
        ]
    }

    /// Run clusterctl as the admin client against a live node.
    pub fn clusterctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(workspace_bin("clusterctl", "clusterctl"))
            .arg("--node")
            .arg(
                self.nodes
                    .values()
                    .next()
                    .expect("a live node")
                    .cfg
                    .admin_addr
                    .to_string(),
            )
            .arg("--ca")
            .arg(self.pki.join("ca.pem"))
            .arg("--cert")
            .arg(self.pki.join("client-admin.pem"))
            .arg("--key")
            .arg(self.pki.join("client-admin.key"))
            .args(args)
            .output()
            .expect("run clusterctl")
    }

    /// clusterctl's output of a command that must succeed.
    pub fn clusterctl_ok(&self, args: &[&str]) -> String {
        let o = self.clusterctl(args);
        assert!(
            o.status.success(),
            "clusterctl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Admin addresses of the live nodes.
    pub fn admin_addrs(&self) -> Vec<String> {
        self.nodes
            .values()
            .map(|n| n.cfg.admin_addr.to_string())
            .collect()
    }

    /// Open `n` flows on node `id`'s datapath (BPF_PROG_TEST_RUN of a SYN each).
    pub fn open_flows(&self, id: u64, vip: &str, first: u16, n: u16) -> Vec<CtKey> {
        let dp = self
            .node(id)
            .datapath
            .as_ref()
            .expect("datapath")
            .dp
            .lock()
            .expect("dp");
        (first..first + n)
            .map(|p| {
                let syn = Packet::tcp("192.0.2.10", p, vip, 80, TCP_SYN);
                testrun::run(dp.program(), &syn.frame(), 0).expect("test run");
                CtKey::new(
                    "192.0.2.10".parse().expect("ip"),
                    p,
                    vip.parse().expect("vip"),
                    80,
                    IPPROTO_TCP,
                )
            })
            .collect()
    }

    /// Wait until node `id`'s replication is ready (its warm join done).
    pub async fn wait_sync_ready(&self, id: u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.node(id).sync.get().expect("sync on").is_ready() {
            assert!(Instant::now() < deadline, "node {id} never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Node `id`'s conntrack entry for `key`.
    pub fn ct_entry(&self, id: u64, key: &CtKey) -> Option<datapath_ebpf::abi::CtVal> {
        self.node(id)
            .datapath
            .as_ref()
            .expect("datapath")
            .dp
            .lock()
            .expect("dp")
            .ct_get(key)
            .expect("lookup")
    }

    /// Wait until node `id` holds every key as a replicated entry of
    /// `origin` with the origin's backend.
    pub async fn wait_entries(&self, id: u64, keys: &[CtKey], origin: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (found, ok) = {
                let dp = self
                    .node(id)
                    .datapath
                    .as_ref()
                    .expect("dp")
                    .dp
                    .lock()
                    .expect("dp");
                let src = self
                    .node(origin as u64)
                    .datapath
                    .as_ref()
                    .expect("dp")
                    .dp
                    .lock()
                    .expect("dp");
                let mut found = 0;
                let mut ok = true;
                for k in keys {
                    if let Some(v) = dp.ct_get(k).expect("lookup") {
                        found += 1;
                        let want = src.ct_get(k).expect("lookup").expect("origin has it");
                        ok &= v.backend_id == want.backend_id && v.origin == origin;
                        ok &= v.flags & CT_F_REMOTE != 0;
                    }
                }
                (found, ok)
            };
            assert!(ok, "node {id}: replicated entries differ from the origin's");
            if found == keys.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} has {found}/{} entries",
                keys.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn node(&self, id: u64) -> &Arc<Node> {
        &self.nodes[&id]
    }

    /// Wait until exactly one live node leads and every live node agrees.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<u64> = self
                .nodes
                .values()
                .filter(|n| n.role() == "leader")
                .map(|n| n.id())
                .collect();
            if let [l] = leaders[..] {
                if self
                    .nodes
                    .values()
                    .all(|n| n.raft.metrics().borrow().current_leader == Some(l))
                {
                    return l;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no single agreed leader: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until `ids` are exactly the voters and all are registered members.
    pub async fn wait_members(&self, ids: HashSet<u64>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.nodes.values().all(|n| {
                let voters: HashSet<u64> = n
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect();
                let members: HashSet<u64> = n.sm.current().state.members.keys().copied().collect();
                voters == ids && members == ids
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "members did not become {ids:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until every live node has applied (to its datapath) the same
    /// epoch as the leader's config. Returns that epoch.
    pub async fn wait_converged(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let epochs: Vec<(u64, u64)> = self
                .nodes
                .values()
                .map(|n| {
                    (
                        n.sm.current().state.epoch,
                        n.applied_epoch.load(std::sync::atomic::Ordering::Relaxed),
                    )
                })
                .collect();
            let first = epochs[0].0;
            if epochs.iter().all(|&(c, a)| c == first && a == first) {
                return first;
            }
            assert!(
                Instant::now() < deadline,
                "not converged: (config, applied) {epochs:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submit on the current leader, retrying through elections.
    pub async fn write(&self, cmd: Command) -> Response {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let leader = self.wait_leader(Duration::from_secs(10)).await;
            match self.nodes[&leader].write(cmd.clone().into()).await {
                Ok(r) => return r,
                Err(e) => {
                    assert!(Instant::now() < deadline, "write failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    pub async fn write_req(&self, req: Request) -> Response {
        let leader = self.wait_leader(Duration::from_secs(10)).await;
        self.nodes[&leader].write(req).await.expect("write")
    }
}

pub fn service(name: &str, vip: &str, port: u16) -> Command {
    Command::PutService {
        service: Service {
            name: name.into(),
            vip: vip.parse().expect("vip"),
            port,
            proto: Proto::Tcp,
            table_size: 251,
            mode: ForwardingMode::Dsr,
            health_check: None,
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
        },
    }
}

pub fn backend(service: &str, addr: &str, port: u16) -> Command {
    Command::AddBackend {
        service: service.into(),
        addr: addr.parse().expect("addr"),
        port,
        weight: 1,
    }
}
