//! The backend-side decapsulator (`bpf/decap.bpf.c`).

use std::net::IpAddr;

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        tc::{SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        SchedClassifier, Xdp,
    },
    Ebpf,
};

use crate::{
    abi::{DecapKey, DecapStats},
    error::{Error, Result},
    prog::{ifindex, load_xdp, percpu_sum, verify, xdp, xdp_mut, AttachMode},
};

pub(crate) static DECAP_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap.bpf.o"));

pub const DECAP_PROGRAM: &str = "holdfast_decap";
/// The egress program that turns target-port answers back (TC).
pub const EGRESS_PROGRAM: &str = "holdfast_decap_egress";
const M_VIPS: &str = "lb_decap_vips";
const M_STATS: &str = "lb_decap_stats";

/// Strips IPIP from packets for configured VIPs on a backend, and turns
/// the answers of flows sent to a target port back to the service port.
pub struct Decap {
    bpf: Ebpf,
    links: Vec<XdpLink>,
    egress: Vec<SchedClassifierLink>,
}

fn egress_mut(bpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    bpf.program_mut(EGRESS_PROGRAM)
        .ok_or(Error::MissingMap {
            map: EGRESS_PROGRAM,
        })?
        .try_into()
        .map_err(Error::program(EGRESS_PROGRAM))
}

impl Decap {
    pub fn load() -> Result<Self> {
        let mut bpf = load_xdp(DECAP_OBJ, "decap.bpf.o", DECAP_PROGRAM)?;
        let egress = egress_mut(&mut bpf)?;
        verify(EGRESS_PROGRAM, || egress.load())?;
        Ok(Self {
            bpf,
            links: Vec::new(),
            egress: Vec::new(),
        })
    }

    pub fn program(&self) -> &Xdp {
        xdp(&self.bpf, DECAP_PROGRAM)
    }

    /// Attach to `ifname` in the calling thread's network namespace.
    pub fn attach(&mut self, ifname: &str, mode: AttachMode) -> Result<()> {
        let ifindex = ifindex(ifname)?;
        let prog = xdp_mut(&mut self.bpf, DECAP_PROGRAM)?;
        let id = prog
            .attach_to_if_index(ifindex, mode.xdp())
            .map_err(Error::program(DECAP_PROGRAM))?;
        self.links
            .push(prog.take_link(id).map_err(Error::program(DECAP_PROGRAM))?);
        let eg = egress_mut(&mut self.bpf)?;
        let id = eg
            .attach(ifname, TcAttachType::Egress)
            .map_err(Error::program(EGRESS_PROGRAM))?;
        self.egress
            .push(eg.take_link(id).map_err(Error::program(EGRESS_PROGRAM))?);
        Ok(())
    }

    /// Accept IPIP packets whose inner destination is `vip`.
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<()> {
        let mut m: BpfHashMap<&mut MapData, DecapKey, u32> = BpfHashMap::try_from(
            self.bpf
                .map_mut(M_VIPS)
                .ok_or(Error::MissingMap { map: M_VIPS })?,
        )
        .map_err(Error::map(M_VIPS))?;
        m.insert(DecapKey::new(vip), 1, 0)
            .map_err(Error::map(M_VIPS))
    }

    pub fn remove_vip(&mut self, vip: IpAddr) -> Result<()> {
        let mut m: BpfHashMap<&mut MapData, DecapKey, u32> = BpfHashMap::try_from(
            self.bpf
                .map_mut(M_VIPS)
                .ok_or(Error::MissingMap { map: M_VIPS })?,
        )
        .map_err(Error::map(M_VIPS))?;
        match m.remove(&DecapKey::new(vip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(Error::map(M_VIPS)(e)),
        }
    }

    /// Counters summed over CPUs.
    pub fn stats(&self) -> Result<DecapStats> {
        percpu_sum(&self.bpf, M_STATS, 0)
    }
}
