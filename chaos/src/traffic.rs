//! The lab's traffic generator: K long-lived TCP connections and U UDP
//! flows to the VIP, each sending a numbered request every `interval` and
//! checking every answer. A flow is *broken* at its first reset, close,
//! wrong answer (another request's echo, or another backend than the one
//! that answered before: its state is gone) or when a request stays
//! unanswered for `broken_after`; broken flows stop and keep their record
//! (what, when). Every flow also records its longest stall: the longest
//! time any of its requests waited for the answer.
//!
//! Besides, short connections can be opened at a set rate (`short_per_s`):
//! each connects, sends one request, checks the answer and closes. A short
//! connection fails when it cannot connect, is reset or gets no or a wrong
//! answer within `short_timeout`; failures are counted per second of the
//! run, so a failover's effect on new connections shows, not only on
//! long-lived ones.
//!
//! All flows run on one tokio runtime on a thread inside the client's
//! namespace.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use netns::NetNs;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, UdpSocket},
    sync::watch,
    task::JoinSet,
};

#[derive(Clone, Debug)]
pub struct TrafficSpec {
    pub tcp: usize,
    pub udp: usize,
    pub vip: IpAddr,
    pub tcp_port: u16,
    pub udp_port: u16,
    /// The client's source address.
    pub src: IpAddr,
    /// Pause between a flow's answer and its next request.
    pub interval: Duration,
    /// A request unanswered this long breaks its flow.
    pub broken_after: Duration,
    /// UDP: resend an unanswered request after this long.
    pub udp_retry: Duration,
    /// Short TCP connections opened per second (0: none).
    pub short_per_s: u32,
    /// A short connection must connect, be answered and close within this.
    pub short_timeout: Duration,
}

impl TrafficSpec {
    pub fn new(vip: IpAddr, src: IpAddr, tcp: usize, udp: usize) -> Self {
        Self {
            tcp,
            udp,
            vip,
            tcp_port: crate::lab::TCP_PORT,
            udp_port: crate::lab::UDP_PORT,
            src,
            interval: Duration::from_millis(200),
            broken_after: Duration::from_secs(10),
            udp_retry: Duration::from_millis(250),
            short_per_s: 0,
            short_timeout: Duration::from_secs(3),
        }
    }
}

/// Why and when (since traffic start) a flow broke.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub at_ms: u64,
    pub what: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    pub proto: &'static str,
    pub id: usize,
    pub local: String,
    /// The backend (`be{N}`) that answers this flow.
    pub backend: Option<usize>,
    pub answers: u64,
    pub max_stall_ms: u64,
    /// When the longest wait ended, ms after the traffic started.
    pub max_stall_at_ms: u64,
    pub failure: Option<Failure>,
}

/// Counters readable while the traffic runs.
#[derive(Default, Debug)]
pub struct Live {
    pub answers: AtomicU64,
    pub tcp_broken: AtomicUsize,
    pub udp_broken: AtomicUsize,
    /// Flows answered at least once since the last [`Traffic::mark`].
    pub answered_since_mark: AtomicUsize,
    pub mark: AtomicU64,
    pub max_stall_us: AtomicU64,
    /// Short connections that completed, and that failed.
    pub short_ok: AtomicU64,
    pub short_failed: AtomicU64,
    /// When (ms since the start) the latest failed short connection was
    /// opened; 0: none failed.
    pub last_short_failure_ms: AtomicU64,
    /// Broken long-lived flows by the backend that served them (None: it
    /// never answered).
    pub broken_by_backend: std::sync::Mutex<std::collections::BTreeMap<Option<usize>, usize>>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct LiveSnapshot {
    pub tcp_total: usize,
    pub udp_total: usize,
    pub tcp_broken: usize,
    pub udp_broken: usize,
    pub answers: u64,
    pub max_stall_ms: u64,
    pub short_ok: u64,
    pub short_failed: u64,
}

/// Short connections of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShortReport {
    pub ok: u64,
    pub failed: u64,
    /// Failed short connections by the second (since traffic start) they
    /// were opened in.
    pub failed_per_s: std::collections::BTreeMap<u64, u64>,
    /// A few failures.
    pub examples: Vec<Failure>,
}

impl ShortReport {
    /// Failures of connections opened outside the given windows (ms since
    /// traffic start, inclusive).
    pub fn failed_outside(&self, windows: &[(u64, u64)]) -> u64 {
        self.failed_per_s
            .iter()
            .filter(|(s, _)| {
                !windows
                    .iter()
                    .any(|(a, b)| **s * 1000 + 999 >= *a && **s * 1000 <= *b)
            })
            .map(|(_, n)| n)
            .sum()
    }
}

/// What a traffic run saw.
#[derive(Clone, Debug, Serialize)]
pub struct TrafficReport {
    pub tcp_total: usize,
    pub tcp_broken: usize,
    pub udp_total: usize,
    pub udp_broken: usize,
    pub answers: u64,
    pub max_stall_ms: u64,
    /// Flows per answering backend (`be{N}` → count).
    pub per_backend: std::collections::BTreeMap<String, usize>,
    /// Every broken flow.
    pub broken: Vec<FlowRecord>,
    /// The three flows that stalled longest.
    pub slowest: Vec<FlowRecord>,
    pub short: ShortReport,
}

/// What the generator's thread hands back: every long-lived flow, and the
/// short connections.
type Flows = (Vec<FlowRecord>, ShortReport);

pub struct Traffic {
    spec: TrafficSpec,
    live: Arc<Live>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<Flows>>>,
    started: Instant,
}

impl Traffic {
    /// Open every flow from inside `ns` and start the exchanges; returns
    /// once every TCP connection is established (or fails).
    pub fn start(ns: &NetNs, spec: TrafficSpec) -> Result<Self> {
        let live = Arc::new(Live::default());
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let started = Instant::now();
        let (l, s) = (live.clone(), spec.clone());
        let thread = ns.spawn(move || -> Result<Flows> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(s, l, stop_rx, ready_tx, started))
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                return Err(match thread.join() {
                    Ok(Err(e)) => e,
                    _ => anyhow!("the traffic generator died while connecting"),
                })
            }
        }
        Ok(Self {
            spec,
            live,
            stop,
            thread: Some(thread),
            started,
        })
    }

    /// Time since the traffic started (the clock of [`Failure::at_ms`]).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn live(&self) -> LiveSnapshot {
        LiveSnapshot {
            tcp_total: self.spec.tcp,
            udp_total: self.spec.udp,
            tcp_broken: self.live.tcp_broken.load(Ordering::Relaxed),
            udp_broken: self.live.udp_broken.load(Ordering::Relaxed),
            answers: self.live.answers.load(Ordering::Relaxed),
            max_stall_ms: self.live.max_stall_us.load(Ordering::Relaxed) / 1000,
            short_ok: self.live.short_ok.load(Ordering::Relaxed),
            short_failed: self.live.short_failed.load(Ordering::Relaxed),
        }
    }

    /// Broken long-lived flows by the backend that served them.
    pub fn broken_by_backend(&self) -> std::collections::BTreeMap<Option<usize>, usize> {
        self.live.broken_by_backend.lock().expect("broken").clone()
    }

    /// When (time since the start) the latest failed short connection
    /// was opened, if any failed.
    pub fn last_short_failure(&self) -> Option<Duration> {
        match self.live.last_short_failure_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Start counting flows answered from now on.
    pub fn mark(&self) {
        self.live.answered_since_mark.store(0, Ordering::Relaxed);
        self.live.mark.fetch_add(1, Ordering::Relaxed);
    }

    /// Wait until every flow that is not broken has been answered since
    /// the last [`Traffic::mark`].
    pub fn wait_all_answered(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let l = self.live();
            let alive = l.tcp_total + l.udp_total - l.tcp_broken - l.udp_broken;
            let n = self.live.answered_since_mark.load(Ordering::Relaxed);
            if n >= alive {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {n} of {alive} flows answered within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop every flow and collect the report.
    pub fn stop(mut self) -> Result<TrafficReport> {
        let _ = self.stop.send(true);
        let (flows, short) = self
            .thread
            .take()
            .expect("running")
            .join()
            .map_err(|_| anyhow!("the traffic generator panicked"))??;
        let mut per_backend = std::collections::BTreeMap::new();
        for f in &flows {
            if let Some(b) = f.backend {
                *per_backend.entry(format!("be{b}")).or_insert(0) += 1;
            }
        }
        let broken: Vec<FlowRecord> = flows
            .iter()
            .filter(|f| f.failure.is_some())
            .cloned()
            .collect();
        Ok(TrafficReport {
            tcp_total: flows.iter().filter(|f| f.proto == "tcp").count(),
            udp_total: flows.iter().filter(|f| f.proto == "udp").count(),
            tcp_broken: broken.iter().filter(|f| f.proto == "tcp").count(),
            udp_broken: broken.iter().filter(|f| f.proto == "udp").count(),
            answers: flows.iter().map(|f| f.answers).sum(),
            max_stall_ms: flows.iter().map(|f| f.max_stall_ms).max().unwrap_or(0),
            per_backend,
            broken,
            slowest: {
                let mut v = flows.clone();
                v.sort_by_key(|f| std::cmp::Reverse(f.max_stall_ms));
                v.truncate(3);
                v
            },
            short,
        })
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(
    spec: TrafficSpec,
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<()>>,
    started: Instant,
) -> Result<Flows> {
    // Connect every TCP flow first (200 at a time), then start them all.
    let mut streams = Vec::with_capacity(spec.tcp);
    let to = SocketAddr::new(spec.vip, spec.tcp_port);
    let mut set = JoinSet::new();
    let mut connect_err = None;
    for id in 0..spec.tcp {
        let src = spec.src;
        set.spawn(async move {
            let mut last = None;
            for _ in 0..3 {
                let sock = match src {
                    IpAddr::V4(_) => TcpSocket::new_v4(),
                    IpAddr::V6(_) => TcpSocket::new_v6(),
                }?;
                sock.bind(SocketAddr::new(src, 0))?;
                match tokio::time::timeout(Duration::from_secs(3), sock.connect(to)).await {
                    Ok(Ok(s)) => return Ok((id, s)),
                    Ok(Err(e)) => last = Some(anyhow!(e)),
                    Err(_) => last = Some(anyhow!("timed out")),
                }
            }
            Err(last
                .unwrap_or_else(|| anyhow!("no attempt"))
                .context(format!("TCP flow {id}: connecting to {to}")))
        });
        if set.len() >= 200 || id + 1 == spec.tcp {
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(s)) => streams.push(s),
                    Ok(Err(e)) => connect_err = Some(e),
                    Err(e) => connect_err = Some(anyhow!(e)),
                }
            }
        }
    }
    if let Some(e) = connect_err {
        let _ = ready.send(Err(e));
        bail!("connecting failed");
    }
    let mut udp = Vec::with_capacity(spec.udp);
    for id in 0..spec.udp {
        let s = UdpSocket::bind(SocketAddr::new(spec.src, 0))
            .await
            .context("binding a UDP flow")?;
        s.connect(SocketAddr::new(spec.vip, spec.udp_port)).await?;
        udp.push((id, s));
    }
    let _ = ready.send(Ok(()));

    let mut tasks = JoinSet::new();
    for (id, s) in streams {
        tasks.spawn(tcp_flow(
            id,
            s,
            spec.clone(),
            live.clone(),
            stop.clone(),
            started,
        ));
    }
    for (id, s) in udp {
        tasks.spawn(udp_flow(
            id,
            s,
            spec.clone(),
            live.clone(),
            stop.clone(),
            started,
        ));
    }
    let short = (spec.short_per_s > 0).then(|| {
        tokio::spawn(short_connections(
            spec.clone(),
            live.clone(),
            stop.clone(),
            started,
        ))
    });
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.map_err(|e| anyhow!("flow task: {e}"))?);
    }
    out.sort_by_key(|f| (f.proto, f.id));
    let short = match short {
        Some(t) => t.await.map_err(|e| anyhow!("short connections: {e}"))?,
        None => ShortReport::default(),
    };
    Ok((out, short))
}

/// Open `short_per_s` connections a second until stopped: connect, one
/// request, check the answer, close.
async fn short_connections(
    spec: TrafficSpec,
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
    started: Instant,
) -> ShortReport {
    let every = Duration::from_secs_f64(1.0 / f64::from(spec.short_per_s));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut set: JoinSet<(u64, u64, Result<(), String>)> = JoinSet::new();
    let mut report = ShortReport::default();
    let mut n = 0u64;
    let record =
        |report: &mut ShortReport, (sec, opened_ms, r): (u64, u64, Result<(), String>)| match r {
            Ok(()) => {
                report.ok += 1;
                live.short_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(what) => {
                report.failed += 1;
                live.short_failed.fetch_add(1, Ordering::Relaxed);
                live.last_short_failure_ms
                    .fetch_max(opened_ms.max(1), Ordering::Relaxed);
                *report.failed_per_s.entry(sec).or_insert(0) += 1;
                if report.examples.len() < 10 {
                    report.examples.push(Failure {
                        at_ms: sec * 1000,
                        what,
                    });
                }
            }
        };
    while !*stop.borrow() {
        tick.tick().await;
        n += 1;
        let (src, to, timeout) = (
            spec.src,
            SocketAddr::new(spec.vip, spec.tcp_port),
            spec.short_timeout,
        );
        let opened_ms = started.elapsed().as_millis() as u64;
        let sec = opened_ms / 1000;
        set.spawn(async move {
            let r = tokio::time::timeout(timeout, short_one(src, to, n)).await;
            let r = match r {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            };
            (sec, opened_ms, r)
        });
        while let Some(done) = set.try_join_next() {
            if let Ok(x) = done {
                record(&mut report, x);
            }
        }
    }
    while let Some(done) = set.join_next().await {
        if let Ok(x) = done {
            record(&mut report, x);
        }
    }
    report
}

async fn short_one(src: IpAddr, to: SocketAddr, n: u64) -> Result<(), String> {
    let sock = match src {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    sock.bind(SocketAddr::new(src, 0))
        .map_err(|e| format!("bind: {e}"))?;
    let s = sock
        .connect(to)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let msg = format!("s{n}:1");
    w.write_all(format!("{msg}\n").as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut lines = BufReader::new(r).lines();
    match lines.next_line().await {
        Ok(Some(l)) if l.trim_end().split_once(' ').is_some_and(|(_, m)| m == msg) => Ok(()),
        Ok(Some(l)) => Err(format!("wrong answer {l:?} to {msg:?}")),
        Ok(None) => Err("closed before the answer".into()),
        Err(e) => Err(format!("receive: {e}")),
    }
}

/// Per-flow bookkeeping shared by the TCP and UDP loops.
struct Book {
    rec: FlowRecord,
    live: Arc<Live>,
    started: Instant,
    mark_seen: u64,
}

impl Book {
    fn new(
        proto: &'static str,
        id: usize,
        local: String,
        live: Arc<Live>,
        started: Instant,
    ) -> Self {
        Self {
            rec: FlowRecord {
                proto,
                id,
                local,
                backend: None,
                answers: 0,
                max_stall_ms: 0,
                max_stall_at_ms: 0,
                failure: None,
            },
            live,
            started,
            mark_seen: u64::MAX,
        }
    }

    /// An answer arrived `waited` after its request; Err if it breaks the flow.
    fn answered(&mut self, waited: Duration, reply: &str, expect: &str) -> Result<(), String> {
        let (who, echoed) = reply
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| format!("malformed answer {reply:?}"))?;
        if echoed != expect {
            return Err(format!("wrong answer: sent {expect:?}, got {echoed:?}"));
        }
        let be: usize = who
            .strip_prefix("be")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("answer without a backend name: {reply:?}"))?;
        match self.rec.backend {
            None => self.rec.backend = Some(be),
            Some(b) if b != be => {
                return Err(format!("backend changed: answered by be{be}, was be{b}"))
            }
            _ => {}
        }
        self.rec.answers += 1;
        let us = waited.as_micros() as u64;
        if us / 1000 > self.rec.max_stall_ms {
            self.rec.max_stall_ms = us / 1000;
            self.rec.max_stall_at_ms = self.started.elapsed().as_millis() as u64;
        }
        self.live.max_stall_us.fetch_max(us, Ordering::Relaxed);
        self.live.answers.fetch_add(1, Ordering::Relaxed);
        let mark = self.live.mark.load(Ordering::Relaxed);
        if mark != self.mark_seen {
            self.mark_seen = mark;
            self.live
                .answered_since_mark
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn broke(mut self, what: String) -> FlowRecord {
        let counter = if self.rec.proto == "tcp" {
            &self.live.tcp_broken
        } else {
            &self.live.udp_broken
        };
        counter.fetch_add(1, Ordering::Relaxed);
        *self
            .live
            .broken_by_backend
            .lock()
            .expect("broken")
            .entry(self.rec.backend)
            .or_insert(0) += 1;
        self.rec.failure = Some(Failure {
            at_ms: self.started.elapsed().as_millis() as u64,
            what,
        });
        self.rec
    }
}

fn jitter(id: usize, interval: Duration) -> Duration {
    // Spread the flows' first requests over one interval.
    let n = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    Duration::from_micros(n % (interval.as_micros() as u64).max(1))
}

async fn tcp_flow(
    id: usize,
    s: tokio::net::TcpStream,
    spec: TrafficSpec,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
    started: Instant,
) -> FlowRecord {
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut book = Book::new("tcp", id, local, live, started);
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    tokio::time::sleep(jitter(id, spec.interval)).await;
    let mut seq = 0u64;
    loop {
        if *stop.borrow() {
            return book.rec;
        }
        seq += 1;
        let msg = format!("t{id}:{seq}");
        let t0 = Instant::now();
        if let Err(e) = w.write_all(format!("{msg}\n").as_bytes()).await {
            return book.broke(format!("send failed: {e}"));
        }
        let line = tokio::select! {
            r = tokio::time::timeout(spec.broken_after, lines.next_line()) => r,
            // Stopping while a request is in flight: wait for its answer a
            // little, so a stall at the very end is still judged.
            _ = stopped(&mut stop) => {
                match tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await {
                    Ok(Ok(Some(l))) => {
                        if let Err(e) = book.answered(t0.elapsed(), &l, &msg) {
                            return book.broke(e);
                        }
                        return book.rec;
                    }
                    Ok(Ok(None)) => return book.broke("closed by the peer".into()),
                    Ok(Err(e)) => return book.broke(format!("{e}")),
                    Err(_) => return book.rec,
                }
            }
        };
        match line {
            Ok(Ok(Some(l))) => {
                if let Err(e) = book.answered(t0.elapsed(), &l, &msg) {
                    return book.broke(e);
                }
            }
            Ok(Ok(None)) => return book.broke("closed by the peer".into()),
            Ok(Err(e)) => return book.broke(format!("{e}")),
            Err(_) => {
                return book.broke(format!(
                    "timeout: no answer in {} ms",
                    spec.broken_after.as_millis()
                ))
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(spec.interval) => {}
            _ = stopped(&mut stop) => return book.rec,
        }
    }
}

async fn udp_flow(
    id: usize,
    s: UdpSocket,
    spec: TrafficSpec,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
    started: Instant,
) -> FlowRecord {
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut book = Book::new("udp", id, local, live, started);
    tokio::time::sleep(jitter(id + 7919, spec.interval)).await;
    let mut buf = vec![0u8; 1500];
    let mut seq = 0u64;
    loop {
        if *stop.borrow() {
            return book.rec;
        }
        seq += 1;
        let msg = format!("u{id}:{seq}");
        let t0 = Instant::now();
        let answered = loop {
            if t0.elapsed() >= spec.broken_after {
                break None;
            }
            // ICMP errors surface as send/recv errors on a connected
            // socket; the request is simply retried.
            let _ = s.send(msg.as_bytes()).await;
            let until = Instant::now() + spec.udp_retry;
            let got = loop {
                let left = until.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, s.recv(&mut buf)).await {
                    Ok(Ok(n)) => {
                        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
                        // Late answers to earlier (resent) requests are fine.
                        if reply
                            .split_once(' ')
                            .is_some_and(|(_, m)| m != msg && m.starts_with(&format!("u{id}:")))
                        {
                            continue;
                        }
                        break Some(reply);
                    }
                    Ok(Err(_)) => continue,
                    Err(_) => break None,
                }
            };
            if got.is_some() {
                break got;
            }
            if *stop.borrow() && t0.elapsed() > Duration::from_secs(2) {
                return book.rec;
            }
        };
        match answered {
            Some(reply) => {
                if let Err(e) = book.answered(t0.elapsed(), &reply, &msg) {
                    return book.broke(e);
                }
            }
            None => {
                return book.broke(format!(
                    "timeout: no answer in {} ms",
                    spec.broken_after.as_millis()
                ))
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(spec.interval) => {}
            _ = stopped(&mut stop) => return book.rec,
        }
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
