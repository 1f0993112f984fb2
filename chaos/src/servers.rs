//! The lab's backend servers: a TCP echo service and a UDP request/response
//! service (DNS-like), both answering `be{N} <request>` so the client knows
//! which backend answered (and `be{N} whoami <address:port>` to the request
//! `whoami`: the client's address as the backend sees it). One tokio runtime on a thread inside the
//! backend's namespace serves every connection; the servers bind the VIP
//! (it is on the backend's `lo`), so answers leave with the VIP as source
//! and go straight to the client (DSR).

use std::{net::SocketAddr, thread::JoinHandle};

use anyhow::{Context, Result};
use netns::NetNs;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UdpSocket},
    sync::watch,
};

/// Servers of one backend; stopped and joined on drop.
pub struct Servers {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Servers {
    /// Start the servers of backend `index` on `tcp` and `udp` inside `ns`.
    pub fn start(ns: &NetNs, index: usize, tcp: SocketAddr, udp: SocketAddr) -> Result<Self> {
        Self::start_on(ns, index, vec![tcp], vec![udp])
    }

    /// The same on several addresses each (the VIP for clients, the host's
    /// own address for health checks): one "process" serving all of them.
    pub fn start_on(
        ns: &NetNs,
        index: usize,
        tcp: Vec<SocketAddr>,
        udp: Vec<SocketAddr>,
    ) -> Result<Self> {
        let (stop, rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = ns.spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let bound = async {
                    let mut ls = Vec::new();
                    for a in &tcp {
                        ls.push(
                            TcpListener::bind(a)
                                .await
                                .with_context(|| format!("binding TCP {a}"))?,
                        );
                    }
                    let mut us = Vec::new();
                    for a in &udp {
                        us.push(
                            UdpSocket::bind(a)
                                .await
                                .with_context(|| format!("binding UDP {a}"))?,
                        );
                    }
                    anyhow::Ok((ls, us))
                }
                .await;
                let (listeners, socks) = match bound {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok(()));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let name = format!("be{index}");
                let mut tasks = Vec::new();
                for l in listeners {
                    tasks.push(tokio::spawn(tcp_echo(l, name.clone(), rx.clone())));
                }
                for u in socks {
                    tasks.push(tokio::spawn(udp_answer(u, name.clone())));
                }
                let mut rx = rx;
                let _ = rx.wait_for(|s| *s).await;
                for t in tasks {
                    t.abort();
                }
            });
        });
        ready_rx
            .recv()
            .context("backend server thread died")?
            .with_context(|| format!("backend {index} servers"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn tcp_echo(listener: TcpListener, name: String, stop: watch::Receiver<bool>) {
    loop {
        let Ok((s, peer)) = listener.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let name = name.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            loop {
                tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(l)) => {
                            let answer = if l == "whoami" {
                                format!("{name} whoami {peer}\n")
                            } else {
                                format!("{name} {l}\n")
                            };
                            if w.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        _ => return,
                    },
                    _ = stopped(&mut stop) => return,
                }
            }
        });
    }
}

async fn udp_answer(sock: UdpSocket, name: String) {
    let mut buf = vec![0u8; 1500];
    loop {
        if let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let req = String::from_utf8_lossy(&buf[..n]);
            let reply = if req == "whoami" {
                format!("{name} whoami {from}")
            } else {
                format!("{name} {req}")
            };
            let _ = sock.send_to(reply.as_bytes(), from).await;
        }
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
