//! Holdfast's datapath: the XDP load balancer and the backend decapsulator
//! (C programs under `bpf/`, built by build.rs with clang-19), their aya
//! loader, typed maps, and the Maglev table builder.
//!
//! ```text
//! client -> [router ECMP] -> LB node XDP (holdfast_lb) --IPIP--> backend XDP (holdfast_decap)
//!                                                                  |
//! client <------------------------ direct server return ----------+
//! ```

pub mod abi;
pub mod config;
pub mod conntrack;
pub mod decap;
pub mod error;
pub mod events;
pub mod hash;
pub mod impair;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod packet;
pub mod prog;
pub(crate) mod ranges;
pub mod snat;
pub mod sys;
pub mod testbed;
pub mod testrun;

pub use config::{
    BackendSpec, BackendState, DatapathConfig, DatapathOptions, Forwarding, Proto, ServiceSpec,
    SnatConfig, SnatSlot, SourceRange,
};
pub use error::{Error, Result};
pub use loader::Datapath;
pub use prog::AttachMode;

/// The embedded BPF objects by file name (the ABI layout test reads their BTF).
pub fn objects() -> [(&'static str, &'static [u8]); 3] {
    [
        ("lb.bpf.o", loader::LB_OBJ),
        ("decap.bpf.o", decap::DECAP_OBJ),
        ("nop.bpf.o", testrun::NOP_OBJ),
    ]
}
