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

/*
 * SNAT reverse bindings (see struct lb_snat_rev). A plain hash, not an LRU:
 * a binding must never be evicted while its flow lives, or its port could
 * be given to another flow. Inserted with BPF_NOEXIST by the datapath (the
 * port allocation) and by replication; deleted by the agent's expiry after
 * the flow's entry, never before it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_SNAT_SIZE);
	__type(key, struct lb_ct_key);
	__type(value, struct lb_snat_rev);
} lb_snat_rev SEC(".maps");

/*
 * SYN flood mode: half-open SNAT bindings (key and value as lb_snat_rev;
 * pad is the client's ISN + 1, which the backend's SYN-ACK must
 * acknowledge). An LRU of its own, so a flood evicts only other half-open
 * bindings, never an established flow or its port; the handshake's ACK
 * moves a binding into lb_snat_rev and conntrack.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_SNAT_HALF_OPEN_SIZE);
	__type(key, struct lb_ct_key);
	__type(value, struct lb_snat_rev);
} lb_snat_half_open SEC(".maps");

/* Every node's SNAT addresses by slot (see struct lb_snat_addr). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_SNAT_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_snat_addr);
} lb_snat_addrs SEC(".maps");

/* This node's SNAT slot + 1 (element 0; 0: this node has no SNAT address). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} lb_snat_own SEC(".maps");

/*
 * Bits of SNAT address hashes, as lb_vip_filter (whose bits the SNAT
 * addresses also set, so their packets are parsed): a packet whose
 * destination sets a bit here looks for a reverse binding first.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_VIP_FILTER_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} lb_snat_filter SEC(".maps");

/*
 * Next hop towards clients (SNAT replies), per CPU, direct-mapped by a hash
 * of the client address: the reply path's bpf_fib_lookup saved, as
 * lb_nh_cache saves the forward path's.
 */
#define LB_NH_CLIENT_SLOTS 256
struct lb_nh_client {
	__u8 addr[16];
	struct lb_nh nh;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_NH_CLIENT_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_nh_client);
} lb_nh_client SEC(".maps");

/*
 * Per-CPU scratch space for large temporaries that would not fit the
 * stack that a program and its calls share (512 bytes): an ICMP error's
 * translation or a source-range key (b, never both at once), a FIB
 * lookup's parameters (fib). Not part of the ABI.
 */
struct lb_scratch {
	__u8 b[128];
	struct bpf_fib_lookup fib;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_scratch);
} lb_scratch SEC(".maps");

/* Source ranges of restricted services (see struct lb_src_range_key). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, LB_MAX_SRC_RANGES);
	__type(key, struct lb_src_range_key);
	__type(value, __u32);
} lb_src_ranges SEC(".maps");

/* Per-service other Maglev table by stats slot (see struct lb_svc_alt). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct lb_svc_alt);
} lb_svc_alt SEC(".maps");

/* Per-service policy by stats slot (see struct lb_svc_policy). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct lb_svc_policy);
} lb_svc_policy SEC(".maps");

LB_ABI_ANCHOR_MAP;

#endif /* LB_MAPS_H */
