/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * parse.h - packet parsing into a flow tuple.
 *
 * Rules (docs/architecture.md, "Malformed input"):
 *  - not IPv4/IPv6 (ARP, LLDP, QinQ...): XDP_PASS, not counted;
 *  - L2/L3 header truncated or invalid, or an IP length beyond the frame:
 *    XDP_PASS, counted PASS_MALFORMED (the kernel validates and drops it; we
 *    never take a packet we cannot prove is ours);
 *  - addressed to a VIP but a fragment: XDP_DROP, counted DROP_FRAGMENT
 *    (non-first fragments carry no ports, so no consistent backend exists);
 *  - addressed to a VIP with a truncated L4 header: XDP_DROP, DROP_MALFORMED.
 * Every header access is preceded by a bounds check against data_end.
 */
#ifndef LB_PARSE_H
#define LB_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "include/lb_abi.h"
#include "lb_consts.h"
#include "lb_maps.h"

/* Our own ICMP headers: linux/icmp.h drags in libc's socket headers. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	union {
		struct {
			__be16 __unused;
			__be16 mtu;
		} frag;
		__be32 gateway;
	} un;
};

struct icmp6hdr {
	__u8 icmp6_type;
	__u8 icmp6_code;
	__sum16 icmp6_cksum;
	__be32 icmp6_mtu;
};

struct vlan_hdr_ {
	__be16 tci;
	__be16 proto;
};

enum parse_res {
	PARSE_OK = 0,       /* flow filled: look the service up */
	PARSE_NOT_IP,       /* pass, uncounted */
	PARSE_MALFORMED_L3, /* pass, counted */
	PARSE_FRAGMENT,     /* drop if the destination is a VIP, else pass */
	PARSE_BAD_L4,       /* drop if the destination is a VIP, else pass */
	PARSE_OTHER_L4,     /* not TCP/UDP/ICMP error: pass (counted if VIP) */
	PARSE_NOT_VIP,      /* valid L3 for an address that is no VIP: pass, uncounted */
};

/*
 * May this (folded) destination address be a VIP? One inlined array read
 * (see LB_VIP_FILTER_WORDS); everything that is ours — balanced flows,
 * fragments, bad L4 headers, other protocols, ICMP errors quoting a VIP
 * flow — has a VIP as the outer destination, so a clear bit is a pass.
 */
static __always_inline int maybe_vip(__u32 folded)
{
	__u32 h = (folded * LB_VIP_HASH_MUL) >> 16;
	__u32 w = h >> 6;
	__u64 *word = bpf_map_lookup_elem(&lb_vip_filter, &w);

	return word && ((*word >> (h & 63)) & 1);
}

struct pkt {
	struct lb_ct_key flow; /* client -> VIP (for ICMP errors: the reversed quoted tuple) */
	__u32 l3_off;          /* 14, or 18 with one 802.1Q tag */
	__u32 l3_len;          /* IPv4 total length / IPv6 40 + payload length */
	__u16 l4_off;          /* frame offset of the TCP/UDP/ICMP header */
	__u16 in_off;          /* ICMP errors: frame offset of the quoted IP header */
	__u8 tcp_flags;
	__u8 tos;
	__u8 icmp_err; /* ICMP error quoting a VIP flow (or a SNAT address's flow) */
	__u8 pad;
};

static __always_inline void addr_v4(__u8 *dst, __be32 a)
{
	*(__be32 *)dst = a;
}

static __always_inline void addr_v6(__u8 *dst, const struct in6_addr *a)
{
	__builtin_memcpy(dst, a, 16);
}

/* Ports of a TCP/UDP header quoted in an ICMP error (first 4 bytes suffice). */
struct l4_ports {
	__be16 src;
	__be16 dst;
};

/*
 * ICMPv4 error: the quoted packet was sent by a backend from VIP:port to the
 * client, so the flow it belongs to is the reverse of the quoted tuple.
 */
static __always_inline int parse_icmp4(void *data, void *data_end, void *l4, struct iphdr *iph,
				       struct pkt *p)
{
	struct icmphdr *icmp = l4;

	if ((void *)(icmp + 1) > data_end)
		return PARSE_BAD_L4;
	if (icmp->type != ICMP_DEST_UNREACH_ && icmp->type != ICMP_TIME_EXCEEDED_ &&
	    icmp->type != ICMP_PARAMETERPROB_)
		return PARSE_OTHER_L4;

	struct iphdr *in = (void *)(icmp + 1);
	if ((void *)(in + 1) > data_end)
		return PARSE_BAD_L4;
	if (in->ihl != 5 || in->version != 4)
		return PARSE_BAD_L4;
	if (in->protocol != IPPROTO_TCP_ && in->protocol != IPPROTO_UDP_)
		return PARSE_OTHER_L4;
	struct l4_ports *ports = (void *)(in + 1);
	if ((void *)(ports + 1) > data_end)
		return PARSE_BAD_L4;
	/* Only errors about packets the VIP sent concern a VIP flow. */
	if (in->saddr != iph->daddr)
		return PARSE_OTHER_L4;

	addr_v4(p->flow.saddr, in->daddr);
	addr_v4(p->flow.daddr, in->saddr);
	p->flow.sport = ports->dst;
	p->flow.dport = ports->src;
	p->flow.proto = in->protocol;
	p->icmp_err = 1;
	p->in_off = (void *)in - data;
	return PARSE_OK;
}

static __always_inline int parse_icmp6(void *data, void *data_end, void *l4, struct ipv6hdr *ip6,
				       struct pkt *p)
{
	struct icmp6hdr *icmp = l4;

	if ((void *)(icmp + 1) > data_end)
		return PARSE_BAD_L4;
	if (icmp->icmp6_type != ICMPV6_DEST_UNREACH_ && icmp->icmp6_type != ICMPV6_PKT_TOOBIG_ &&
	    icmp->icmp6_type != ICMPV6_TIME_EXCEED_ && icmp->icmp6_type != ICMPV6_PARAMPROB_)
		return PARSE_OTHER_L4;

	struct ipv6hdr *in = (void *)(icmp + 1);
	if ((void *)(in + 1) > data_end)
		return PARSE_BAD_L4;
	if (in->nexthdr != IPPROTO_TCP_ && in->nexthdr != IPPROTO_UDP_)
		return PARSE_OTHER_L4;
	struct l4_ports *ports = (void *)(in + 1);
	if ((void *)(ports + 1) > data_end)
		return PARSE_BAD_L4;
	if (__builtin_memcmp(&in->saddr, &ip6->daddr, 16) != 0)
		return PARSE_OTHER_L4;

	addr_v6(p->flow.saddr, &in->daddr);
	addr_v6(p->flow.daddr, &in->saddr);
	p->flow.sport = ports->dst;
	p->flow.dport = ports->src;
	p->flow.proto = in->nexthdr;
	p->icmp_err = 1;
	p->in_off = (void *)in - data;
	return PARSE_OK;
}

static __always_inline int parse_l4(void *data_end, void *l4, __u8 proto, struct pkt *p)
{
	if (proto == IPPROTO_TCP_) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end || th->doff < 5)
			return PARSE_BAD_L4;
		p->flow.sport = th->source;
		p->flow.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		return PARSE_OK;
	}
	if (proto == IPPROTO_UDP_) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return PARSE_BAD_L4;
		p->flow.sport = uh->source;
		p->flow.dport = uh->dest;
		return PARSE_OK;
	}
	return PARSE_OTHER_L4;
}

static __always_inline int parse_ipv4(void *data, void *data_end, struct pkt *p)
{
	struct iphdr *iph = data + p->l3_off;

	if ((void *)(iph + 1) > data_end)
		return PARSE_MALFORMED_L3;
	if (iph->version != 4 || iph->ihl < 5)
		return PARSE_MALFORMED_L3;
	__u32 hlen = (iph->ihl & 0xF) * 4;
	__u32 tot = bpf_ntohs(iph->tot_len);
	if (tot < hlen || (void *)iph + tot > data_end)
		return PARSE_MALFORMED_L3;
	if (!maybe_vip(iph->daddr))
		return PARSE_NOT_VIP;

	p->flow.family = LB_FAMILY_V4;
	p->flow.proto = iph->protocol;
	p->l3_len = tot;
	p->tos = iph->tos;
	addr_v4(p->flow.saddr, iph->saddr);
	addr_v4(p->flow.daddr, iph->daddr);

	if (iph->frag_off & (IP_MF_BE | IP_OFFSET_BE))
		return PARSE_FRAGMENT;

	void *l4 = (void *)iph + hlen;
	p->l4_off = l4 - data;
	if (iph->protocol == IPPROTO_ICMP_)
		return parse_icmp4(data, data_end, l4, iph, p);
	return parse_l4(data_end, l4, iph->protocol, p);
}

static __always_inline int parse_ipv6(void *data, void *data_end, struct pkt *p)
{
	struct ipv6hdr *ip6 = data + p->l3_off;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_MALFORMED_L3;
	if (ip6->version != 6)
		return PARSE_MALFORMED_L3;
	__u32 plen = bpf_ntohs(ip6->payload_len);
	if ((void *)(ip6 + 1) + plen > data_end)
		return PARSE_MALFORMED_L3;
	if (!maybe_vip(ip6->daddr.in6_u.u6_addr32[0] ^ ip6->daddr.in6_u.u6_addr32[1] ^
		       ip6->daddr.in6_u.u6_addr32[2] ^ ip6->daddr.in6_u.u6_addr32[3]))
		return PARSE_NOT_VIP;

	p->flow.family = LB_FAMILY_V6;
	p->l3_len = sizeof(*ip6) + plen;
	p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	addr_v6(p->flow.saddr, &ip6->saddr);
	addr_v6(p->flow.daddr, &ip6->daddr);

	__u8 nh = ip6->nexthdr;
	__u32 off = sizeof(*ip6);
	int frag = 0;

	/* Step over a bounded number of extension headers. */
#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT; i++) {
		if (nh != IPV6_EXT_HOP && nh != IPV6_EXT_ROUTING && nh != IPV6_EXT_FRAG &&
		    nh != IPV6_EXT_DSTOPTS)
			break;
		__u8 *ext = (void *)ip6 + (off & 0x3FF);
		if ((void *)(ext + 8) > data_end)
			return PARSE_MALFORMED_L3;
		if (nh == IPV6_EXT_FRAG) {
			frag = 1;
			off += 8;
		} else {
			off += ((__u32)ext[1] + 1) * 8;
		}
		nh = ext[0];
		if (off > 512)
			return PARSE_MALFORMED_L3;
	}
	p->flow.proto = nh;
	if (frag)
		return PARSE_FRAGMENT;
	if (nh == IPV6_EXT_HOP || nh == IPV6_EXT_ROUTING || nh == IPV6_EXT_FRAG ||
	    nh == IPV6_EXT_DSTOPTS)
		return PARSE_OTHER_L4; /* more extension headers than we step over */

	void *l4 = (void *)ip6 + (off & 0x3FF);
	p->l4_off = l4 - data;
	if (nh == IPPROTO_ICMPV6_)
		return parse_icmp6(data, data_end, l4, ip6, p);
	return parse_l4(data_end, l4, nh, p);
}

static __always_inline int parse_packet(struct xdp_md *ctx, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return PARSE_MALFORMED_L3;
	__be16 proto = eth->h_proto;
	p->l3_off = ETH_HLEN;
	if (proto == ETH_P_8021Q_BE) {
		struct vlan_hdr_ *vh = (void *)(eth + 1);
		if ((void *)(vh + 1) > data_end)
			return PARSE_MALFORMED_L3;
		proto = vh->proto;
		p->l3_off = ETH_HLEN + VLAN_HLEN;
	}
	if (proto == ETH_P_IP_BE)
		return parse_ipv4(data, data_end, p);
	if (proto == ETH_P_IPV6_BE)
		return parse_ipv6(data, data_end, p);
	return PARSE_NOT_IP;
}

#endif /* LB_PARSE_H */
