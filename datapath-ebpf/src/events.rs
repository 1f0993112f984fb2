//! The new-flow ring buffer, consumed asynchronously on tokio.

use std::{io, mem::size_of};

use aya::maps::{MapData, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    abi::FlowEvent,
    error::{Error, Result},
    maps::M_EVENTS,
};

/// Consumer of `lb_flow_events`. Events lost because the ring was full are
/// counted by the datapath (`stat::RING_LOST`), never silently dropped.
pub struct FlowEvents {
    ring: RingBuf<MapData>,
    fd: Option<AsyncFd<std::os::fd::OwnedFd>>,
}

fn parse(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is Pod (any bit pattern valid) and bytes holds at least
    // size_of::<FlowEvent>() bytes; read_unaligned tolerates any alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

impl FlowEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Result<Self> {
        Ok(Self { ring, fd: None })
    }

    /// Take what is in the ring now, up to `max` events, without waiting.
    pub fn drain(&mut self, out: &mut Vec<FlowEvent>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(item) = self.ring.next() else { break };
            if let Some(ev) = parse(&item) {
                out.push(ev);
                n += 1;
            }
        }
        n
    }

    /// Wait until at least one event is available, then take up to `max`.
    /// Must be called within a tokio runtime.
    pub async fn recv(&mut self, out: &mut Vec<FlowEvent>, max: usize) -> Result<usize> {
        loop {
            let n = self.drain(out, max);
            if n > 0 {
                return Ok(n);
            }
            let afd = match self.fd.take() {
                Some(afd) => afd,
                None => {
                    let dup = std::os::fd::AsFd::as_fd(&self.ring)
                        .try_clone_to_owned()
                        .map_err(|source| Error::Syscall {
                            call: "dup",
                            map: M_EVENTS,
                            source,
                        })?;
                    // SAFETY: the AsyncFd owns the duplicated fd, so it stays
                    // open for as long as it is registered.
                    unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }.map_err(
                        |e| Error::Syscall {
                            call: "epoll register",
                            map: M_EVENTS,
                            source: e.into(),
                        },
                    )?
                }
            };
            let waited = afd.readable().await.map(|mut guard| guard.clear_ready());
            self.fd = Some(afd);
            waited.map_err(|source: io::Error| Error::Syscall {
                call: "epoll wait",
                map: M_EVENTS,
                source,
            })?;
            let n = self.drain(out, max);
            if n > 0 {
                return Ok(n);
            }
        }
    }
}
