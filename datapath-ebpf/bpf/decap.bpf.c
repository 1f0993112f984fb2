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
 *
 * Target ports: when the LB sent a flow to another port than the
 * service's (the backend listens on 8080 behind VIP:80), the outer header
 * carries the service port (IPv4 ID / IPv6 flow label, see encap.h). The
 * XDP program records the flow in lb_decap_ports; the egress program
 * (holdfast_decap_egress, TC) turns its answers' source port back to the
 * service port, so the client sees VIP:80 answer, with its own address
 * preserved end to end.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
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

#ifndef LB_DECAP_PORTS
#define LB_DECAP_PORTS 262144
#endif

/* Flows to a target port (see struct lb_decap_port_key). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_DECAP_PORTS);
	__type(key, struct lb_decap_port_key);
	__type(value, __u32);
} lb_decap_ports SEC(".maps");

/* Element 0 turns 1 with the first flow to a target port: until then the
 * egress program passes every packet after one array read. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} lb_decap_xlate SEC(".maps");

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

/*
 * Record the flow of the inner packet at `inner` (family `fam`), which the
 * LB sent to the backend's port instead of service port `svc_port`, so
 * that its answers get `svc_port` back. -1: truncated.
 */
static __always_inline int record_port(void *inner, void *data_end, __u8 fam, __be16 svc_port)
{
	struct lb_decap_port_key k = {};
	__be16 *ports;

	k.family = fam;
	if (fam == LB_FAMILY_V4) {
		struct iphdr *ip = inner;
		if ((void *)(ip + 1) > data_end)
			return -1;
		if (ip->frag_off & (IP_MF_BE | IP_OFFSET_BE))
			return 0;
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
			return 0;
		k.proto = ip->protocol;
		__builtin_memcpy(k.vip, &ip->daddr, 4);
		__builtin_memcpy(k.client, &ip->saddr, 4);
		ports = inner + (ip->ihl & 0xf) * 4;
	} else {
		struct ipv6hdr *ip6 = inner;
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return 0;
		k.proto = ip6->nexthdr;
		__builtin_memcpy(k.vip, &ip6->daddr, 16);
		__builtin_memcpy(k.client, &ip6->saddr, 16);
		ports = (void *)(ip6 + 1);
	}
	if ((void *)(ports + 2) > data_end)
		return -1;
	k.client_port = ports[0];
	k.target_port = ports[1];
	__u32 want = svc_port;
	__u32 *have = bpf_map_lookup_elem(&lb_decap_ports, &k);
	if (have && *have == want)
		return 0;
	bpf_map_update_elem(&lb_decap_ports, &k, &want, BPF_ANY);
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&lb_decap_xlate, &zero);
	if (on && !*on)
		*on = 1;
	count(LB_DECAP_PORT_FLOWS, 0);
	return 0;
}

/*
 * Does the outer header name a service port? Only a Holdfast LB's does:
 * its outer source is in the encapsulation prefix (172.16.0.0/16,
 * 100::/64), and an IPv4 one has DF and a nonzero ID. Any other sender's
 * ID or flow label (a kernel's, a health check's raw socket) is no port.
 */
static __always_inline int lb_names_port_v4(const struct iphdr *ip)
{
	return ip->id && (ip->frag_off & IP_DF_BE) &&
	       (ip->saddr & bpf_htonl(0xFFFF0000)) == IPIP_V4_PREFIX_BE;
}

static __always_inline int lb_encap_src_v6(const struct ipv6hdr *ip6)
{
	const __u32 *a = (const __u32 *)&ip6->saddr;

	return a[0] == IPIP_V6_PREFIX0_BE && a[1] == 0;
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
		if (lb_names_port_v4(ip) && record_port(ip + 1, data_end, LB_FAMILY_V4, ip->id) < 0)
			return count(LB_DECAP_MALFORMED, XDP_PASS);
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
		__be16 svc_port;
		__builtin_memcpy(&svc_port, &ip6->flow_lbl[1], 2);
		if (svc_port && lb_encap_src_v6(ip6) &&
		    record_port(ip6 + 1, data_end, fam, svc_port) < 0)
			return count(LB_DECAP_MALFORMED, XDP_PASS);
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

/*
 * Answers of flows to a target port: source port back to the service's
 * (checksum updated: bpf_l4_csum_replace also does right by a checksum
 * the NIC is yet to finish). Everything else passes untouched.
 */
SEC("classifier")
int holdfast_decap_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&lb_decap_xlate, &zero);

	if (!on || !*on)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct lb_decap_port_key k = {};
	__u32 l4;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == ETH_P_IP_BE) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_OK;
		if (ip->frag_off & (IP_MF_BE | IP_OFFSET_BE))
			return TC_ACT_OK;
		k.proto = ip->protocol;
		k.family = LB_FAMILY_V4;
		__builtin_memcpy(k.vip, &ip->saddr, 4);
		__builtin_memcpy(k.client, &ip->daddr, 4);
		l4 = ETH_HLEN + (ip->ihl & 0xf) * 4;
	} else if (eth->h_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		k.proto = ip6->nexthdr;
		k.family = LB_FAMILY_V6;
		__builtin_memcpy(k.vip, &ip6->saddr, 16);
		__builtin_memcpy(k.client, &ip6->daddr, 16);
		l4 = ETH_HLEN + sizeof(struct ipv6hdr);
	} else {
		return TC_ACT_OK;
	}
	if (k.proto != IPPROTO_TCP && k.proto != IPPROTO_UDP)
		return TC_ACT_OK;
	__be16 *ports = data + l4;
	if ((void *)(ports + 2) > data_end)
		return TC_ACT_OK;
	k.target_port = ports[0];
	k.client_port = ports[1];
	__u32 *v = bpf_map_lookup_elem(&lb_decap_ports, &k);
	if (!v)
		return TC_ACT_OK;
	__be16 old = k.target_port, new = (__be16)*v;
	__u32 csum = l4 + (k.proto == IPPROTO_TCP ? 16 : 6);
	__u64 flags = sizeof(__be16) | (k.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);

	if (bpf_l4_csum_replace(skb, csum, old, new, flags))
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, l4, &new, sizeof(new), 0))
		return TC_ACT_OK;
	count(LB_DECAP_PORT_OUT, 0);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
