//! Holdfast's labs and fault scenarios in network namespaces.
//!
//! - `dplab`: the datapath lab (client, one LB node running the XDP load
//!   balancer, backends with the decap program and real TCP/UDP servers).
//! - `lab`: the BGP/ECMP lab (router with BIRD, N LB nodes running
//!   holdfast-node and BIRD, backends, client).
//! - `natbench`: Holdfast's SNAT mode against nftables NAT on one LB node.
//! - `traffic`: the client's traffic generator; `servers`: the backends'.
//! - `scenario`: the fault scenarios of `chaos run`.

pub mod dnsload;
pub mod dplab;
pub mod impair;
pub mod lab;
pub mod natbench;
pub mod scenario;
pub mod servers;
pub mod traffic;
