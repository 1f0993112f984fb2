/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * encap.h - IPIP encapsulation in Katran's format, and ICMP "too big" replies.
 *
 * Outer header: IPv4 (proto 4) for IPv4 backends; IPv6 for IPv6 backends
 * (next header 41 for IPv6 clients, 4 for IPv4 clients). The outer source is
 * derived from the client's address and source port (172.16.0.0/16 or
 * 100::/64) so a backend NIC's RSS spreads flows over its queues. TTL 64,
 * TOS / traffic class copied from the inner packet. One 802.1Q tag is kept.
 */
#ifndef LB_ENCAP_H
#define LB_ENCAP_H

#include "parse.h"
#include "csum.h"

/* Katran's create_encap_ipv4_src: 172.16.(sport ^ low 16 bits of the client). */
static __always_inline __be32 encap_src_v4(const struct pkt *p)
{
	__u32 src = *(const __u32 *)p->flow.saddr;
	__u32 suffix = (__u32)p->flow.sport << 16;

	suffix ^= src;
	return (0xFFFF0000 & suffix) | IPIP_V4_PREFIX_BE;
}

/* Katran's create_encap_ipv6_src: 100::(first 32 bits of the client ^ sport). */
static __always_inline void encap_src_v6(const struct pkt *p, __u32 *saddr)
{
	saddr[0] = IPIP_V6_PREFIX0_BE;
	saddr[1] = 0;
	saddr[2] = 0;
	saddr[3] = *(const __u32 *)p->flow.saddr ^ (__u32)p->flow.sport;
}

static __always_inline int encap_overhead(const struct lb_backend *be)
{
	return be->family == LB_FAMILY_V4 ? (int)sizeof(struct iphdr) : (int)sizeof(struct ipv6hdr);
}

/*
 * Prepend the outer header. l2 is the constant L2 header length (14 or 18);
 * the L2 header is moved to the new front, its EtherType set for the outer
 * header. Returns 0, or -1 if the frame could not be grown. (A flow to a
 * target port then gets the service port in it: dsr_target_port.)
 */
static __always_inline int encap_ipip(struct xdp_md *ctx, const struct pkt *p,
				      const struct lb_backend *be, const __u32 l2)
{
	void *data, *data_end;

	if (be->family == LB_FAMILY_V4) {
		if (bpf_xdp_adjust_head(ctx, 0 - (int)sizeof(struct iphdr)))
			return -1;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + l2 + sizeof(struct iphdr) > data_end)
			return -1;
		__builtin_memcpy(data, data + sizeof(struct iphdr), l2);
		*(__be16 *)(data + l2 - 2) = ETH_P_IP_BE;

		struct iphdr *o = data + l2;
		o->version = 4;
		o->ihl = 5;
		o->tos = p->tos;
		o->tot_len = bpf_htons(p->l3_len + sizeof(struct iphdr));
		o->id = 0;
		o->frag_off = 0;
		o->ttl = ENCAP_TTL;
		o->protocol = IPPROTO_IPIP_;
		o->check = 0;
		o->saddr = encap_src_v4(p);
		o->daddr = *(const __u32 *)be->addr;
		o->check = ipv4_hdr_csum(o);
		return 0;
	}

	if (bpf_xdp_adjust_head(ctx, 0 - (int)sizeof(struct ipv6hdr)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + l2 + sizeof(struct ipv6hdr) > data_end)
		return -1;
	__builtin_memcpy(data, data + sizeof(struct ipv6hdr), l2);
	*(__be16 *)(data + l2 - 2) = ETH_P_IPV6_BE;

	struct ipv6hdr *o = data + l2;
	o->version = 6;
	o->priority = p->tos >> 4;
	o->flow_lbl[0] = (p->tos & 0x0F) << 4;
	o->flow_lbl[1] = 0;
	o->flow_lbl[2] = 0;
	o->payload_len = bpf_htons(p->l3_len);
	o->nexthdr = p->flow.family == LB_FAMILY_V4 ? IPPROTO_IPIP_ : IPPROTO_IPV6_;
	o->hop_limit = ENCAP_TTL;
	encap_src_v6(p, (__u32 *)&o->saddr);
	__builtin_memcpy(&o->daddr, be->addr, 16);
	return 0;
}

/* Swap the MACs of a frame being sent back, copying the rest of L2 (tag, type). */
static __always_inline void l2_reply(void *data, __u32 shift, const __u32 l2)
{
	struct ethhdr *neth = data;
	struct ethhdr *oeth = data + shift;

	__builtin_memcpy(neth->h_dest, oeth->h_source, ETH_ALEN);
	__builtin_memcpy(neth->h_source, oeth->h_dest, ETH_ALEN);
	__builtin_memcpy(data + 2 * ETH_ALEN, data + shift + 2 * ETH_ALEN, l2 - 2 * ETH_ALEN);
}

/*
 * Turn an IPv4 frame that is too big after encapsulation into an ICMP
 * "fragmentation needed" to its sender, quoting ICMP_QUOTE bytes of it.
 */
static __always_inline int send_too_big_v4(struct xdp_md *ctx, __u16 mtu, const __u32 l2)
{
	const __u32 shift = sizeof(struct iphdr) + sizeof(struct icmphdr);
	void *data, *data_end;

	if (bpf_xdp_adjust_head(ctx, 0 - (int)shift))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + l2 + shift + ICMP_QUOTE > data_end)
		return -1;

	l2_reply(data, shift, l2);
	struct iphdr *orig = data + l2 + shift;
	struct iphdr *ip = data + l2;
	struct icmphdr *ic = data + l2 + sizeof(struct iphdr);

	__be32 client = orig->saddr, vip = orig->daddr;
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(shift + ICMP_QUOTE);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = ENCAP_TTL;
	ip->protocol = IPPROTO_ICMP_;
	ip->check = 0;
	ip->saddr = vip;
	ip->daddr = client;
	ip->check = ipv4_hdr_csum(ip);

	ic->type = ICMP_DEST_UNREACH_;
	ic->code = ICMP_FRAG_NEEDED_;
	ic->checksum = 0;
	ic->un.frag.__unused = 0;
	ic->un.frag.mtu = bpf_htons(mtu);
	__s64 sum = bpf_csum_diff(0, 0, (void *)ic, sizeof(*ic) + ICMP_QUOTE, 0);
	ic->checksum = csum_fold((__u32)sum);

	int delta = (int)(l2 + shift + ICMP_QUOTE) - (int)(data_end - data);
	if (bpf_xdp_adjust_tail(ctx, delta))
		return -1;
	return 0;
}

/* IPv6 counterpart: ICMPv6 "packet too big" (RFC 4443), checksum with pseudo-header. */
static __always_inline int send_too_big_v6(struct xdp_md *ctx, __u32 mtu, const __u32 l2)
{
	const __u32 shift = sizeof(struct ipv6hdr) + sizeof(struct icmp6hdr);
	void *data, *data_end;

	if (bpf_xdp_adjust_head(ctx, 0 - (int)shift))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + l2 + shift + ICMP_QUOTE > data_end)
		return -1;

	l2_reply(data, shift, l2);
	struct ipv6hdr *orig = data + l2 + shift;
	struct ipv6hdr *ip6 = data + l2;
	struct icmp6hdr *ic = data + l2 + sizeof(struct ipv6hdr);
	struct in6_addr client = orig->saddr, vip = orig->daddr;

	ip6->version = 6;
	ip6->priority = 0;
	ip6->flow_lbl[0] = 0;
	ip6->flow_lbl[1] = 0;
	ip6->flow_lbl[2] = 0;
	ip6->payload_len = bpf_htons(sizeof(struct icmp6hdr) + ICMP_QUOTE);
	ip6->nexthdr = IPPROTO_ICMPV6_;
	ip6->hop_limit = ENCAP_TTL;
	ip6->saddr = vip;
	ip6->daddr = client;

	ic->icmp6_type = ICMPV6_PKT_TOOBIG_;
	ic->icmp6_code = 0;
	ic->icmp6_cksum = 0;
	ic->icmp6_mtu = bpf_htonl(mtu);

	__be32 pseudo[2] = {bpf_htonl(sizeof(struct icmp6hdr) + ICMP_QUOTE),
			    bpf_htonl(IPPROTO_ICMPV6_)};
	__s64 sum = bpf_csum_diff(0, 0, (void *)&ip6->saddr, 32, 0);
	sum = bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), (__u32)sum);
	sum = bpf_csum_diff(0, 0, (void *)ic, sizeof(*ic) + ICMP_QUOTE, (__u32)sum);
	ic->icmp6_cksum = csum_fold((__u32)sum);

	int delta = (int)(l2 + shift + ICMP_QUOTE) - (int)(data_end - data);
	if (bpf_xdp_adjust_tail(ctx, delta))
		return -1;
	return 0;
}

#endif /* LB_ENCAP_H */
