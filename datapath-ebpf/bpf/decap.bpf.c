// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * decap.bpf.c - IPIP decapsulation for backends (DSR).
 *
 * Strips the outer IPv4/IPv6 header of IPIP packets (IPv4-in-IPv4,
 * IPv6-in-IPv6, IPv4-in-IPv6) whose inner destination is a configured VIP,
 * then passes the inner packet to the kernel, which delivers it to the socket
 * bound to the VIP on lo. The backend answers the client directly. Anything
 * else passes untouched. Use it where the kernel has no ipip/ip6tnl module,
 * or to avoid tunnel devices altogether.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "include/lb_abi.h"
#include "lb_consts.h"

#ifndef LB_MAX_DECAP_VIPS
#define LB_MAX_DECAP_VIPS 1024
#endif

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_DECAP_VIPS);
	__type(key, struct lb_decap_key);
	__type(value, __u32);
} lb_decap_vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_decap_stats);
} lb_decap_stats SEC(".maps");

LB_ABI_ANCHOR_MAP;

static __always_inline int count(enum lb_decap_stat idx, int verdict)
{
	__u32 zero = 0;
	struct lb_decap_stats *st = bpf_map_lookup_elem(&lb_decap_stats, &zero);

	if (st)
		st->c[idx]++;
	return verdict;
}

/* Is the inner packet at `inner` (of the given family) addressed to a VIP? -1: truncated. */
static __always_inline int inner_is_vip(void *inner, void *data_end, __u8 family)
{
	struct lb_decap_key k = {};

	k.family = family;
	if (family == LB_FAMILY_V4) {
		struct iphdr *ip = inner;
		if ((void *)(ip + 1) > data_end)
			return -1;
		*(__be32 *)k.addr = ip->daddr;
	} else {
		struct ipv6hdr *ip6 = inner;
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		__builtin_memcpy(k.addr, &ip6->daddr, 16);
	}
	return bpf_map_lookup_elem(&lb_decap_vips, &k) ? 1 : 0;
}

static __always_inline int strip(struct xdp_md *ctx, const __u32 l2, const __u32 outer,
				 __be16 inner_proto)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	if (data + outer + l2 > data_end)
		return count(LB_DECAP_MALFORMED, XDP_PASS);
	/* outer >= 20 > l2: source and destination do not overlap. */
	__builtin_memcpy(data + outer, data, l2);
	*(__be16 *)(data + outer + l2 - 2) = inner_proto;
	if (bpf_xdp_adjust_head(ctx, (int)outer))
		return count(LB_DECAP_MALFORMED, XDP_PASS);
	return count(LB_DECAP_OK, XDP_PASS);
}

static __always_inline int decap_l3(struct xdp_md *ctx, __be16 proto, const __u32 l2)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	if (proto == ETH_P_IP_BE) {
		struct iphdr *ip = data + l2;
		if ((void *)(ip + 1) > data_end)
			return XDP_PASS;
		if (ip->protocol != IPPROTO_IPIP_ || ip->ihl != 5)
			return XDP_PASS;
		if (ip->frag_off & (IP_MF_BE | IP_OFFSET_BE))
			return XDP_PASS;
		int vip = inner_is_vip(ip + 1, data_end, LB_FAMILY_V4);
		if (vip < 0)
			return count(LB_DECAP_MALFORMED, XDP_PASS);
		if (!vip)
			return count(LB_DECAP_NOT_VIP, XDP_PASS);
		return strip(ctx, l2, sizeof(struct iphdr), ETH_P_IP_BE);
	}
	if (proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = data + l2;
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		__u8 fam;
		__be16 inner;
		if (ip6->nexthdr == IPPROTO_IPV6_) {
			fam = LB_FAMILY_V6;
			inner = ETH_P_IPV6_BE;
		} else if (ip6->nexthdr == IPPROTO_IPIP_) {
			fam = LB_FAMILY_V4;
			inner = ETH_P_IP_BE;
		} else {
			return XDP_PASS;
		}
		int vip = inner_is_vip(ip6 + 1, data_end, fam);
		if (vip < 0)
			return count(LB_DECAP_MALFORMED, XDP_PASS);
		if (!vip)
			return count(LB_DECAP_NOT_VIP, XDP_PASS);
		return strip(ctx, l2, sizeof(struct ipv6hdr), inner);
	}
	return XDP_PASS;
}

SEC("xdp")
int holdfast_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == ETH_P_8021Q_BE) {
		__be16 *inner = (void *)(eth + 1) + 2;
		if ((void *)(inner + 1) > data_end)
			return XDP_PASS;
		return decap_l3(ctx, *inner, ETH_HLEN + VLAN_HLEN);
	}
	return decap_l3(ctx, eth->h_proto, ETH_HLEN);
}

char _license[] SEC("license") = "GPL";
