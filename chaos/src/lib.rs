//! Holdfast's lab and fault scenarios in network namespaces.
//!
//! `dplab` is the datapath lab: client, one LB node running the XDP load
//! balancer, and backends with the decap program and real TCP/UDP servers.

pub mod dplab;
