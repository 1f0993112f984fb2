//! Link impairment for the lab (`bpf/impair.bpf.c`): on a bridge port,
//! drop a share of the IPv4 frames between hosts of one subnet (not to or
//! from one excluded address) and redirect the rest to a delay line. This
//! kernel has no netem, fq or etf, so loss is done here and delay by a
//! userspace delay line reading the redirect target (chaos::impair).

use std::net::Ipv4Addr;

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{tc::TcAttachType, SchedClassifier},
    Ebpf, EbpfLoader,
};

use crate::{
    error::{Error, Result},
    prog::verify,
};

static IMPAIR_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/impair.bpf.o"));
const PROGRAM: &str = "holdfast_impair";
const M_STATS: &str = "impair_stats";

/// What to impair and how.
#[derive(Clone, Copy, Debug)]
pub struct ImpairSpec {
    /// The subnet whose hosts' frames to each other are impaired.
    pub net: Ipv4Addr,
    pub prefix: u8,
    /// Frames to or from this address pass untouched (the router).
    pub exclude: Ipv4Addr,
    /// Dropped per million.
    pub loss_ppm: u32,
    /// Where the others go (0: on, unchanged).
    pub redirect_ifindex: u32,
}

/// Frames the program matched, dropped and redirected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImpairStats {
    pub matched: u64,
    pub dropped: u64,
    pub redirected: u64,
}

/// The program, attached at ingress of one interface until dropped.
pub struct Impair {
    bpf: Ebpf,
}

impl Impair {
    /// Attach at ingress of `iface` in the calling thread's namespace.
    pub fn attach(iface: &str, spec: &ImpairSpec) -> Result<Self> {
        if spec.prefix > 32 || spec.loss_ppm > 1_000_000 {
            return Err(Error::InvalidConfig {
                field: "impair".into(),
                reason: format!(
                    "prefix {} / loss {} ppm out of range",
                    spec.prefix, spec.loss_ppm
                ),
            });
        }
        let mask = if spec.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - spec.prefix)
        };
        let net = (u32::from(spec.net) & mask).to_be();
        let mask = mask.to_be();
        let exclude = u32::from(spec.exclude).to_be();
        let mut bpf = EbpfLoader::new()
            .override_global("impair_net", &net, true)
            .override_global("impair_mask", &mask, true)
            .override_global("impair_exclude", &exclude, true)
            .override_global("impair_loss_ppm", &spec.loss_ppm, true)
            .override_global("impair_redirect_ifindex", &spec.redirect_ifindex, true)
            .load(IMPAIR_OBJ)
            .map_err(|e| Error::Load {
                object: "impair.bpf.o",
                source: Box::new(e),
            })?;
        let prog: &mut SchedClassifier = bpf
            .program_mut(PROGRAM)
            .ok_or(Error::MissingMap { map: PROGRAM })?
            .try_into()
            .map_err(Error::program(PROGRAM))?;
        verify(PROGRAM, || prog.load())?;
        prog.attach(iface, TcAttachType::Ingress)
            .map_err(Error::program(PROGRAM))?;
        Ok(Self { bpf })
    }

    pub fn stats(&self) -> Result<ImpairStats> {
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.bpf
                .map(M_STATS)
                .ok_or(Error::MissingMap { map: M_STATS })?,
        )
        .map_err(Error::map(M_STATS))?;
        let sum = |i: u32| -> Result<u64> {
            Ok(arr.get(&i, 0).map_err(Error::map(M_STATS))?.iter().sum())
        };
        Ok(ImpairStats {
            matched: sum(0)?,
            dropped: sum(1)?,
            redirected: sum(2)?,
        })
    }
}
