/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * lb_abi.h - the ONLY definitions shared between the BPF programs and Rust.
 *
 * Every struct has fixed-width fields, explicit padding and a static size
 * assertion. The Rust mirror (src/abi.rs) is checked against the BTF of the
 * compiled object by tests/abi_layout.rs, field by field, so a change here
 * that is not made in Rust fails the build's tests, not production.
 */
#ifndef LB_ABI_H
#define LB_ABI_H

#include <linux/types.h>

/* (The version the Rust loader stamps into lb_meta is abi.rs ABI_VERSION.) */

/* Address families as stored in keys (not AF_* which differ per OS). */
#define LB_FAMILY_V4 4
#define LB_FAMILY_V6 6

/* Backend states. 0 means "no backend in this slot" (removed). */
#define LB_BACKEND_EMPTY 0
#define LB_BACKEND_ACTIVE 1
#define LB_BACKEND_DRAINING 2

/* Maglev slot value meaning "no backend": the service has no active backend. */
#define LB_NO_BACKEND 0xFFFFFFFFu

/* Conntrack entry flags (lb_ct_val.flags). */
#define LB_CT_F_CLOSING 0x0001 /* client sent FIN or RST: a SYN may start a new connection */
#define LB_CT_F_REMOTE 0x0002  /* written by a peer's replication, not by this datapath */
#define LB_CT_F_SNAT 0x0004    /* forwarded with SNAT (snat_slot, snat_port), not DSR */
#define LB_CT_F_AFFINITY 0x0008 /* not a flow: a client's affinity entry (see below) */
#define LB_CT_F_AFFINE 0x0010   /* a flow of a service with client affinity: its refreshes refresh the client's affinity entry */
#define LB_CT_F_SHARED 0x0020   /* announced to peers; a divergent service leaves it off entries any node's tables rebuild */

/*
 * Client affinity (Kubernetes sessionAffinity: ClientIP). A client's
 * affinity entry lives in the conntrack map beside the flows, so it is
 * replicated, refreshed, merged, pulled by a warm join and expired like
 * them: its key is the client -> service tuple with source port 0 and pad
 * LB_CT_PAD_AFFINITY (no flow's key has a non-zero pad), its value a
 * conntrack value with LB_CT_F_AFFINITY and the client's backend. On the
 * ring and on the wire the flag alone marks it (the pad is set again from
 * it).
 */
#define LB_CT_PAD_AFFINITY 0xaff1

/* lb_vips values: the number of services on the address, or'd with this
 * flag when the address is a node's SNAT address. */
#define LB_VIPS_F_SNAT 0x80000000u

/* Service flags (lb_svc.flags). */
#define LB_SVC_F_SNAT 0x0001 /* new flows are forwarded with SNAT (else DSR over IPIP) */
#define LB_SVC_F_AFFINITY 0x0002 /* client affinity: timeout in lb_svc_policy.affinity_s */
#define LB_SVC_F_DIVERGENT 0x0004 /* replicate only entries the tables cannot rebuild (ct_share in ct.h) */

/*
 * Service key: (VIP, port, protocol). An IPv4 address uses addr[0..4] and
 * leaves the rest zero. port is in network byte order; port 0 matches every
 * port of the VIP.
 */
struct lb_svc_key {
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 family;
};
_Static_assert(sizeof(struct lb_svc_key) == 20, "lb_svc_key size");

/*
 * Service value. ring_base/ring_size locate the service's current Maglev
 * table inside the shared `maglev` array; a new table is written into the
 * service's other region and switched by one update of this value.
 */
struct lb_svc {
	__u32 id; /* index into per-service stats; < max services */
	__u32 flags;
	__u32 ring_base;
	__u32 ring_size;
};
_Static_assert(sizeof(struct lb_svc) == 16, "lb_svc size");

/*
 * Backend, indexed by its cluster-wide id in the `backends` array.
 * svc_ref is the stats slot (lb_svc.id) + 1 of the one service it belongs
 * to, so that a conntrack hit counts there without looking the service up;
 * 0 (the zero flags word of builds before it) means not known: a hit then
 * looks the service up as before. port is the backend's port (network
 * order) that flows are sent to; 0 keeps the client's destination port. A
 * DSR flow to another port carries the service port to the backend's
 * decap agent in the outer header (encap.h).
 */
struct lb_backend {
	__u8 addr[16];
	__u32 svc_ref;
	__u8 family;
	__u8 state;
	__be16 port;
};
_Static_assert(sizeof(struct lb_backend) == 24, "lb_backend size");

/*
 * Next-hop cache entry (per CPU, indexed by backend id): the result of the
 * last successful bpf_fib_lookup towards that backend, valid until
 * expires_ns. The loader zeroes the entries of backends it changes.
 */
struct lb_nh {
	__u64 expires_ns;
	__u32 ifindex;
	__u8 smac[6];
	__u8 dmac[6];
};
_Static_assert(sizeof(struct lb_nh) == 24, "lb_nh size");

/* Conntrack key: the full 5-tuple of the client -> VIP direction. */
struct lb_ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};
_Static_assert(sizeof(struct lb_ct_key) == 40, "lb_ct_key size");

/*
 * Conntrack value. Times are CLOCK_MONOTONIC nanoseconds of this host
 * (bpf_ktime_get_ns); replication converts them on the wire. A SNAT entry
 * (LB_CT_F_SNAT) also names the source the backend sees: the SNAT address
 * of slot snat_slot (lb_snat_addrs; the slot of the node that created the
 * entry, which every node knows from the config) and snat_port (network
 * order), allocated by the creating node from its own address only.
 */
struct lb_ct_val {
	__u32 backend_id;
	__u16 flags;
	__u16 origin; /* node id (low 16 bits) of the LB node that created it */
	__u64 created_ns;
	__u64 last_seen_ns;
	__be16 snat_port;
	__u16 snat_slot;
	__u32 ranges_gen; /* the service's source ranges generation this flow's source was found in (0: not checked) */
};
_Static_assert(sizeof(struct lb_ct_val) == 32, "lb_ct_val size");
_Static_assert(sizeof(struct lb_ct_key) + sizeof(struct lb_ct_val) <= 72, "ct entry budget");

/*
 * SNAT reverse binding (lb_snat_rev): the key is the backend's reply as it
 * arrives — saddr = backend, daddr = SNAT address, sport = backend port,
 * dport = SNAT port — and the value the client -> VIP flow it belongs to,
 * with its backend (for per-service counters). One binding per (backend
 * address, backend port, protocol, SNAT address, SNAT port): a port is
 * allocated with BPF_NOEXIST on this map, which never evicts, so no two
 * live flows share it.
 */
struct lb_snat_rev {
	struct lb_ct_key flow;
	__u32 backend_id;
	__u32 pad;
};
_Static_assert(sizeof(struct lb_snat_rev) == 48, "lb_snat_rev size");

/*
 * A node's SNAT addresses (lb_snat_addrs, indexed by slot), each in the
 * 16-byte form of keys (an IPv4 address in the first 4 bytes, the rest
 * zero): flags say which families it has. lb_snat_own holds this node's
 * slot + 1 (0: none).
 */
#define LB_SNAT_SLOTS 256
#define LB_SNAT_F_V4 0x1
#define LB_SNAT_F_V6 0x2
struct lb_snat_addr {
	__u8 v4[16];
	__u8 v6[16];
	__u32 flags;
	__u32 pad;
};
_Static_assert(sizeof(struct lb_snat_addr) == 40, "lb_snat_addr size");

/*
 * Source ranges (lb_src_ranges, an LPM trie): one key per (service, CIDR)
 * of a service restricted to client ranges (Kubernetes
 * loadBalancerSourceRanges). The prefix covers the service's stats slot
 * (network order) and the family before the address, so prefixlen = 40 +
 * the CIDR's length; a lookup uses 40 + 32 or 40 + 128.
 */
#define LB_SRC_RANGE_BASE_BITS 40
struct lb_src_range_key {
	__u32 prefixlen;
	__be32 svc;
	__u8 family;
	__u8 addr[16];
	__u8 pad[3];
};
_Static_assert(sizeof(struct lb_src_range_key) == 28, "lb_src_range_key size");

/*
 * A service's other Maglev table during a table change (lb_svc_alt, indexed
 * by its stats slot): the prepared next table before the switch, the
 * previous one for a grace period after it; size 0: none. A divergent
 * service replicates a new entry whose backend the other table would not
 * pick, and the share program (holdfast_ct_share) finds the entries made
 * before that the other table sends elsewhere.
 */
struct lb_svc_alt {
	__u32 base;
	__u32 size;
};
/* lb_svc_alt.size: every entry of the service diverges (its pick changes in
 * a way no table shows: client affinity or the forwarding mode switched). */
#define LB_ALT_ALL 0xFFFFFFFFu
_Static_assert(sizeof(struct lb_svc_alt) == 8, "lb_svc_alt size");

/*
 * A service's policy (lb_svc_policy, indexed by its stats slot).
 * ranges_gen: 0 when any source may reach it; else the generation of its
 * source ranges, new (never reused) each time they change. A conntrack
 * entry remembers the generation its source was found in, so an
 * established flow's packets skip the trie until the ranges change.
 */
struct lb_svc_policy {
	__u32 ranges_gen;
	__u32 affinity_s; /* client affinity: seconds an idle client keeps its backend (0: none) */
};
_Static_assert(sizeof(struct lb_svc_policy) == 8, "lb_svc_policy size");

/*
 * New-flow event written to the ring buffer for the replication layer: the
 * entry as created (last_seen_ns == created_ns, so it is not repeated).
 * 56 bytes + the ring's 8-byte record header = one 64-byte cache line. For a
 * SNAT entry the key's pad carries its snat_port and the flags' high byte
 * its snat_slot (entry flags use the low byte).
 */
struct lb_flow_event {
	struct lb_ct_key key;
	__u32 backend_id;
	__u16 flags;
	__u16 origin;
	__u64 created_ns;
};
_Static_assert(sizeof(struct lb_flow_event) == 56, "lb_flow_event size");

/*
 * A batch of peers' conntrack entries for the apply program
 * (holdfast_ct_apply, run with BPF_PROG_TEST_RUN): this header, then
 * `count` (key, value) pairs of struct lb_ct_key + struct lb_ct_val, 72
 * bytes each, as the packet data. The program fills in the counts.
 * LB_CT_BATCH_MAX pairs fit the one page a test run's packet gets.
 */
struct lb_ct_batch {
	__u32 count;
	__u32 applied;   /* written: new, or merged into an existing entry */
	__u32 unchanged; /* already equal */
	__u32 rejected;  /* the local entry is newer */
	__u32 failed;    /* the map refused the write (memory) */
	__u32 pad;
};
_Static_assert(sizeof(struct lb_ct_batch) == 24, "lb_ct_batch size");
#define LB_CT_BATCH_ENTRY 72
#define LB_CT_BATCH_MAX 48

/*
 * What one run of the share program (holdfast_ct_share) did, written back
 * into its packet: entries visited, own entries announced because a
 * service's other table sends them elsewhere, and those it could not
 * announce (the ring was full: run it again once the ring drained).
 */
struct lb_share_report {
	__u64 visited;
	__u64 shared;
	__u64 ring_full;
};
_Static_assert(sizeof(struct lb_share_report) == 24, "lb_share_report size");

/*
 * Loader metadata (not read by the datapath): lets a restarted agent check
 * that pinned maps match this ABI and know which config epoch they hold.
 */
struct lb_meta {
	__u64 epoch;
	__u32 abi_version;
	__u32 max_table;
};
_Static_assert(sizeof(struct lb_meta) == 16, "lb_meta size");

/*
 * An interface the program is attached to, with its MAC (lb_iface_slots).
 * Frames whose unicast destination MAC is not the interface's are not ours:
 * a NIC in promiscuous mode, or a switch flooding a dead node's MAC,
 * delivers them to XDP, and forwarding them would duplicate another LB
 * node's traffic. The map is an array (its lookups are inlined; a hash
 * lookup is a call) with open addressing: interface `ifindex` is in slot
 * (ifindex + i) % LB_IFACE_SLOTS for some i < LB_IFACE_PROBES; ifindex 0
 * ends a probe sequence, LB_IFACE_TOMBSTONE (a detached interface) does not.
 */
#define LB_IFACE_SLOTS 64
#define LB_IFACE_PROBES 4
#define LB_IFACE_TOMBSTONE 0xffffffffu
struct lb_iface_slot {
	__u32 ifindex;
	__u8 mac[6];
	__u16 flags;
};
_Static_assert(sizeof(struct lb_iface_slot) == 12, "lb_iface_slot size");

/*
 * VIP prefilter (lb_vip_filter, an array of LB_VIP_FILTER_WORDS 64-bit
 * words): one bit per hash of a VIP address, so a packet for any other
 * address is passed after one inlined array read instead of two service
 * hash lookups. Hash: fold the address into 32 bits (IPv4: its 4 bytes as
 * loaded; IPv6: the XOR of its four 32-bit words), multiply by 0x9E3779B1,
 * keep the top 16 bits h; the bit is h % 64 of word h / 64. A set bit only
 * means "maybe a VIP": the service lookup decides.
 */
#define LB_VIP_FILTER_WORDS 1024
#define LB_VIP_HASH_MUL 0x9E3779B1u

/* Global per-CPU counters: index into lb_stats.c. */
enum lb_stat {
	LB_STAT_FWD_PACKETS = 0,  /* packets encapsulated towards a backend */
	LB_STAT_FWD_BYTES,        /* their L3 bytes before encapsulation */
	LB_STAT_NEW_FLOWS,        /* conntrack entries created */
	LB_STAT_CT_HITS,          /* packets that followed an existing entry */
	LB_STAT_MIDFLOW_MISS,     /* TCP non-SYN of a VIP with no entry: a flow that may break */
	LB_STAT_REPICK_GONE,      /* entry's backend was removed: re-picked */
	LB_STAT_REPICK_STALE,     /* SYN/new UDP flow on a stale entry: re-picked */
	LB_STAT_RING_LOST,        /* new-flow events lost because the ring was full */
	LB_STAT_FIB_NO_NEIGH,     /* next hop unresolved: passed encapsulated to the kernel */
	LB_STAT_FIB_FAIL,         /* no route to the backend: dropped */
	LB_STAT_ICMP_TOO_BIG,     /* ICMP frag-needed / packet-too-big sent to a client */
	LB_STAT_ICMP_ERR_FWD,     /* ICMP errors about a VIP flow forwarded to its backend */
	LB_STAT_PASS_MALFORMED,   /* L2/L3 too short or invalid: left to the kernel */
	LB_STAT_PASS_VIP_OTHER,   /* VIP traffic we do not balance (ICMP echo...): to the kernel */
	LB_STAT_DROP_MALFORMED,   /* VIP packet with a truncated/invalid L4 header */
	LB_STAT_DROP_FRAGMENT,    /* IP fragment addressed to a VIP */
	LB_STAT_DROP_NO_BACKEND,  /* service has no active backend */
	LB_STAT_DROP_UNSUPPORTED, /* e.g. IPv6 client to an IPv4-only backend */
	LB_STAT_DROP_ADJUST,      /* bpf_xdp_adjust_head/tail failed */
	LB_STAT_PASS_OTHERHOST,   /* unicast frame for another MAC (promiscuous port): to the kernel */
	LB_STAT_SYN_FLOOD,        /* SYN flood mode: a SYN forwarded by Maglev without state */
	LB_STAT_FLOOD_HANDSHAKE,  /* SYN flood mode: a TCP non-SYN with no entry (a handshake completing) */
	LB_STAT_SNAT_FWD,         /* packets forwarded to a backend with SNAT (also in FWD_PACKETS) */
	LB_STAT_SNAT_REPLIES,     /* backend -> client packets translated back */
	LB_STAT_SNAT_NO_ENTRY,    /* packet to a SNAT address with no binding: to the kernel */
	LB_STAT_SNAT_EXHAUSTED,   /* no free SNAT port for a new flow: dropped */
	LB_STAT_SNAT_NO_ADDR,     /* SNAT service, but this node has no SNAT address of the family: dropped */
	LB_STAT_SNAT_ICMP,        /* ICMP errors about SNAT flows translated (either way) */
	LB_STAT_DROP_TTL,         /* SNAT: TTL / hop limit would reach 0: dropped */
	LB_STAT_SNAT_HALF_OPEN,   /* SYN flood mode: a SNAT SYN bound in the half-open table */
	LB_STAT_SNAT_STRAY,       /* SNAT reply that does not match its half-open binding: dropped */
	LB_STAT_SNAT_MIDFLOW,     /* SNAT TCP packet past its SYN with no entry here: dropped */
	LB_STAT_SRC_REFUSED,      /* source outside its service's source ranges: dropped */
	LB_STAT_AFFINITY_HITS,    /* new flows sent to their client's affinity backend */
	LB_STAT_AFFINITY_NEW,     /* affinity entries made (first flow of a client, or after one ended) */
	LB_STAT_AFFINITY_RELEASED, /* affinity entries whose backend went away or is no longer active: re-picked */
	LB_STAT_AFFINITY_EXPIRED, /* affinity entries idle past the service's timeout: re-picked */
	LB_STAT_MAX = 48,
};

struct lb_stats {
	__u64 c[LB_STAT_MAX];
};
_Static_assert(sizeof(struct lb_stats) == 384, "lb_stats size");

/* Per-service per-CPU counters: index into lb_svc_stats.c. */
enum lb_svc_stat {
	LB_SVC_PACKETS = 0,
	LB_SVC_BYTES,
	LB_SVC_NEW_FLOWS,
	LB_SVC_CT_HITS,
	LB_SVC_MIDFLOW_MISS,
	LB_SVC_DROPS,
	LB_SVC_SNAT_EXHAUSTED, /* new flows dropped for want of a free SNAT port */
	LB_SVC_REPLIES,        /* SNAT: backend -> client packets translated */
	LB_SVC_SRC_REFUSED,    /* packets from outside the service's source ranges: dropped */
	LB_SVC_STAT_MAX = 16,
};

struct lb_svc_stats {
	__u64 c[LB_SVC_STAT_MAX];
};
_Static_assert(sizeof(struct lb_svc_stats) == 128, "lb_svc_stats size");

/* Decap program: VIPs it accepts (value is unused flags). */
struct lb_decap_key {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};
_Static_assert(sizeof(struct lb_decap_key) == 20, "lb_decap_key size");

/*
 * Decap: a DSR flow whose backend listens on another port than the
 * service's (lb_decap_ports, an LRU): the key is the backend's answer as
 * it leaves — vip = its source, client = its destination, target_port =
 * its source port, client_port = its destination port (ports in network
 * order) — and the value the service port (network order, in the low 16
 * bits) that the answer's source port becomes. Written by the XDP
 * program from the service port the LB put in the outer header; read by
 * the egress program.
 */
struct lb_decap_port_key {
	__u8 vip[16];
	__u8 client[16];
	__be16 target_port;
	__be16 client_port;
	__u8 proto;
	__u8 family;
	__u16 pad;
};
_Static_assert(sizeof(struct lb_decap_port_key) == 40, "lb_decap_port_key size");

enum lb_decap_stat {
	LB_DECAP_OK = 0,    /* IPIP packets decapsulated */
	LB_DECAP_NOT_VIP,   /* IPIP whose inner destination is not a configured VIP: passed */
	LB_DECAP_MALFORMED, /* truncated inner header: passed untouched */
	LB_DECAP_PORT_FLOWS, /* flows to a target port recorded (new or changed) */
	LB_DECAP_PORT_OUT,  /* answers whose source port was turned back to the service's */
	LB_DECAP_STAT_MAX = 8,
};

struct lb_decap_stats {
	__u64 c[LB_DECAP_STAT_MAX];
};
_Static_assert(sizeof(struct lb_decap_stats) == 64, "lb_decap_stats size");

/*
 * Types that travel through maps without being a map's key or value (ring
 * buffer records, counter indices). Each program declares one `lb_abi_anchor`
 * map holding this struct so clang emits their BTF and tests/abi_layout.rs can
 * check them against Rust. The map itself is never read or written.
 */
struct lb_abi_anchor {
	struct lb_flow_event ev;
	struct lb_ct_batch batch;
	struct lb_share_report share;
	enum lb_stat stat;
	enum lb_svc_stat svc_stat;
	enum lb_decap_stat decap_stat;
	__u32 pad;
};

#define LB_ABI_ANCHOR_MAP                                                      \
	struct {                                                               \
		__uint(type, BPF_MAP_TYPE_ARRAY);                              \
		__uint(max_entries, 1);                                        \
		__type(key, __u32);                                            \
		__type(value, struct lb_abi_anchor);                           \
	} lb_abi_anchor SEC(".maps")

#endif /* LB_ABI_H */
