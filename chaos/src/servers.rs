//! The lab's backend servers: a TCP echo service and a UDP request/response
//! service (DNS-like), both answering `be{N} <request>` so the client knows
//! which backend answered. One tokio runtime on a thread inside the
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
                    let l = TcpListener::bind(tcp)
                        .await
                        .with_context(|| format!("binding TCP {tcp}"))?;
                    let u = UdpSocket::bind(udp)
                        .await
                        .with_context(|| format!("binding UDP {udp}"))?;
                    anyhow::Ok((l, u))
                }
                .await;
                let (listener, sock) = match bound {
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
                let tcp_task = tokio::spawn(tcp_echo(listener, name.clone(), rx.clone()));
                let udp_task = tokio::spawn(udp_answer(sock, name));
                let mut rx = rx;
                let _ = rx.wait_for(|s| *s).await;
                tcp_task.abort();
                udp_task.abort();
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
        let Ok((s, _)) = listener.accept().await else {
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
                            if w.write_all(format!("{name} {l}\n").as_bytes()).await.is_err() {
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
            let reply = format!("{name} {}", String::from_utf8_lossy(&buf[..n]));
            let _ = sock.send_to(reply.as_bytes(), from).await;
        }
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
