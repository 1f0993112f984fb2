/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/* lb_consts.h - protocol constants, map sizes and load-time tunables. */
#ifndef LB_CONSTS_H
#define LB_CONSTS_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>

/* Map sizes: defaults here, overridden by the Rust loader (EbpfLoader::map_max_entries). */
#ifndef LB_MAX_SERVICES
#define LB_MAX_SERVICES 64
#endif
#ifndef LB_MAX_BACKENDS
#define LB_MAX_BACKENDS 4096
#endif
#ifndef LB_MAX_TABLE
#define LB_MAX_TABLE 65537
#endif
#ifndef LB_MAX_SRC_RANGES
#define LB_MAX_SRC_RANGES 65536
#endif

#ifndef LB_CT_SIZE
#define LB_CT_SIZE 1048576
#endif
#ifndef LB_RING_BYTES
#define LB_RING_BYTES (1 << 20)
#endif
#ifndef LB_SNAT_SIZE
#define LB_SNAT_SIZE 262144
#endif
#ifndef LB_SNAT_HALF_OPEN_SIZE
#define LB_SNAT_HALF_OPEN_SIZE 65536
#endif

#define ETH_P_IP_BE bpf_htons(0x0800)
#define ETH_P_IPV6_BE bpf_htons(0x86DD)
#define ETH_P_8021Q_BE bpf_htons(0x8100)
#define ETH_HLEN 14
#define VLAN_HLEN 4

#define IPPROTO_ICMP_ 1
#define IPPROTO_IPIP_ 4
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_IPV6_ 41
#define IPPROTO_ICMPV6_ 58
/* IPv6 extension headers we step over (bounded). */
#define IPV6_EXT_HOP 0
#define IPV6_EXT_ROUTING 43
#define IPV6_EXT_FRAG 44
#define IPV6_EXT_DSTOPTS 60
#define IPV6_MAX_EXT 4

#define IP_MF_BE bpf_htons(0x2000)
#define IP_DF_BE bpf_htons(0x4000)
#define IP_OFFSET_BE bpf_htons(0x1FFF)

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define ICMP_DEST_UNREACH_ 3
#define ICMP_FRAG_NEEDED_ 4
#define ICMP_TIME_EXCEEDED_ 11
#define ICMP_PARAMETERPROB_ 12
#define ICMPV6_DEST_UNREACH_ 1
#define ICMPV6_PKT_TOOBIG_ 2
#define ICMPV6_TIME_EXCEED_ 3
#define ICMPV6_PARAMPROB_ 4

/* Katran-compatible outer source prefixes: 172.16.0.0/16 and 100::/64. */
#define IPIP_V4_PREFIX_BE bpf_htonl(0xAC100000)
#define IPIP_V6_PREFIX0_BE bpf_htonl(0x01000000)

#define ENCAP_TTL 64
/* Ports tried for a new SNAT flow before it counts as exhausted. */
#define SNAT_PROBES 16
/* Bytes of the offending packet quoted in ICMP too-big replies (needs mtu >= 1280). */
#define ICMP_QUOTE 128

/*
 * Load-time tunables (`volatile const`, set by the loader with
 * EbpfLoader::override_global before the program is verified).
 */
volatile const __u64 lb_tcp_timeout_ns = 3600ULL * 1000000000ULL;
volatile const __u64 lb_udp_timeout_ns = 300ULL * 1000000000ULL;
/* Minimum interval between last-seen updates of one entry (limits cache-line writes). */
volatile const __u64 lb_ct_refresh_ns = 1000000000ULL;
/* How long a successful next-hop lookup is reused (0: look up every packet). */
volatile const __u64 lb_nh_cache_ns = 100000000ULL;
/* Largest outer L3 packet towards backends (the fabric MTU). */
volatile const __u32 lb_mtu = 1500;
/* Origin id stamped into the conntrack entries this node creates. */
volatile const __u32 lb_node_id = 0;
/*
 * SYN flood protection: most SYNs that may create conntrack state on one CPU
 * in one window of lb_syn_window_ns (0: protection off). Above it, and for
 * the whole next window, SYNs are forwarded without state.
 */
volatile const __u32 lb_syn_window_max = 2000;
volatile const __u64 lb_syn_window_ns = 100000000ULL;
/* SNAT source ports this node allocates from its SNAT address (inclusive). */
volatile const __u32 lb_snat_port_min = 1024;
volatile const __u32 lb_snat_port_max = 65535;
/* Seed of the flow hash; must be equal on every LB node of a cluster. */
volatile const __u32 lb_hash_seed = 0x686f6c64; /* "hold" */

#endif /* LB_CONSTS_H */
