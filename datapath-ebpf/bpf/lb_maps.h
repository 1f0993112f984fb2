/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/* lb_maps.h - the maps of the load balancer program. */
#ifndef LB_MAPS_H
#define LB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "include/lb_abi.h"
#include "lb_consts.h"

/* (VIP, port, proto) -> service. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc);
} lb_services SEC(".maps");

/*
 * VIP addresses (key with port 0 and proto 0) -> number of services on it.
 * Only consulted on rare paths: fragments and unbalanced protocols to a VIP.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct lb_svc_key);
	__type(value, __u32);
} lb_vips SEC(".maps");

/* Backend id -> backend. An array: ids are dense cluster-wide ids. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_backend);
} lb_backends SEC(".maps");

/* Backend id -> cached next hop (per CPU: no cache-line sharing). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_nh);
} lb_nh_cache SEC(".maps");

/*
 * All Maglev tables: two regions of LB_MAX_TABLE slots per service
 * (2 * LB_MAX_SERVICES * LB_MAX_TABLE entries). A slot holds a backend id.
 * Memory-mapped by the agent, which writes tables without syscalls.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 2 * LB_MAX_SERVICES * LB_MAX_TABLE);
	__type(key, __u32);
	__type(value, __u32);
} lb_maglev SEC(".maps");

/*
 * Conntrack. Shared (not per-CPU): replication writes peers' entries into
 * it, and ECMP may move a flow between CPUs' queues.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_CT_SIZE);
	__type(key, struct lb_ct_key);
	__type(value, struct lb_ct_val);
} lb_conntrack SEC(".maps");

/* Per-CPU rate of SYNs that create state (not part of the ABI). */
struct lb_syn_rate {
	__u64 window_ns; /* start of the current window */
	__u32 count;     /* SYNs in it */
	__u32 prev;      /* SYNs in the window before, if it was the previous one */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_syn_rate);
} lb_syn_rate SEC(".maps");

/* New-flow events for the replication layer. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, LB_RING_BYTES);
} lb_flow_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_stats);
} lb_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct lb_svc_stats);
} lb_svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_meta);
} lb_meta SEC(".maps");

/* Interfaces the program is attached to, with their MACs (see lb_iface_slot). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_IFACE_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_iface_slot);
} lb_iface_slots SEC(".maps");

/* Bits of VIP address hashes: the non-VIP fast path (see LB_VIP_FILTER_WORDS). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_VIP_FILTER_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} lb_vip_filter SEC(".maps");

/*
 * CLOCK_MONOTONIC as the agent publishes it every few milliseconds (element
 * 0, memory-mapped by the agent): the conntrack-hit path reads it instead
 * of calling bpf_ktime_get_coarse_ns (see hit_clock in ct.h).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lb_clock SEC(".maps");

LB_ABI_ANCHOR_MAP;

#endif /* LB_MAPS_H */
