// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * lb.bpf.c - the Holdfast XDP load balancer.
 *
 * VIP traffic -> service -> backend (conntrack, else Maglev) -> IPIP
 * encapsulation (DSR) -> next hop by bpf_fib_lookup -> XDP_TX / redirect.
 * Everything else goes to the kernel untouched. See docs/architecture.md.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "include/lb_abi.h"
#include "lb_consts.h"
#include "lb_maps.h"
#include "parse.h"
#include "csum.h"
#include "encap.h"
#include "ct.h"
#include "stats.h"

#define AF_INET_ 2
#define AF_INET6_ 10

static __always_inline int drop(struct lb_stats *st, struct lb_svc_stats *ss, enum lb_stat why)
{
	stat_add(st, why, 1);
	svc_stat_add(ss, LB_SVC_DROPS, 1);
	return XDP_DROP;
}

/*
 * Next hop towards a backend: the per-CPU cache if fresh, else
 * bpf_fib_lookup (only successful lookups are cached; an unresolved neighbour
 * is retried on every packet so the kernel's resolution is seen at once).
 * Returns a BPF_FIB_LKUP_RET_* code; on success *nh is filled.
 */
static __always_inline int next_hop(struct xdp_md *ctx, const struct pkt *p,
				    const struct lb_backend *be, __u32 bid, __u64 now,
				    struct lb_nh *nh)
{
	struct lb_nh *cached = bpf_map_lookup_elem(&lb_nh_cache, &bid);

	if (cached && cached->expires_ns > now) {
		*nh = *cached;
		return BPF_FIB_LKUP_RET_SUCCESS;
	}

	struct bpf_fib_lookup fib = {};
	fib.ifindex = ctx->ingress_ifindex;
	if (be->family == LB_FAMILY_V4) {
		fib.family = AF_INET_;
		fib.ipv4_src = encap_src_v4(p);
		fib.ipv4_dst = *(const __u32 *)be->addr;
	} else {
		fib.family = AF_INET6_;
		encap_src_v6(p, fib.ipv6_src);
		__builtin_memcpy(fib.ipv6_dst, be->addr, 16);
	}
	int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc;
	nh->ifindex = fib.ifindex;
	__builtin_memcpy(nh->smac, fib.smac, ETH_ALEN);
	__builtin_memcpy(nh->dmac, fib.dmac, ETH_ALEN);
	nh->expires_ns = now + lb_nh_cache_ns;
	if (cached && lb_nh_cache_ns)
		*cached = *nh;
	return rc;
}

static __always_inline int lb_forward(struct xdp_md *ctx, const struct pkt *p,
				      const struct lb_backend *be, __u32 bid, __u64 now,
				      struct lb_stats *st, struct lb_svc_stats *ss,
				      const __u32 l2)
{
	int overhead = encap_overhead(be);

	if (p->flow.family == LB_FAMILY_V6 && be->family != LB_FAMILY_V6)
		return drop(st, ss, LB_STAT_DROP_UNSUPPORTED);

	if (p->l3_len + overhead > lb_mtu) {
		/* Never answer an ICMP error with an ICMP error. */
		if (p->icmp_err)
			return drop(st, ss, LB_STAT_DROP_UNSUPPORTED);
		__u32 mtu = lb_mtu - overhead;
		int rc = p->flow.family == LB_FAMILY_V4 ? send_too_big_v4(ctx, mtu, l2)
							: send_too_big_v6(ctx, mtu, l2);
		if (rc)
			return drop(st, ss, LB_STAT_DROP_ADJUST);
		stat_add(st, LB_STAT_ICMP_TOO_BIG, 1);
		return XDP_TX;
	}

	struct lb_nh nh;
	int rc = next_hop(ctx, p, be, bid, now, &nh);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(st, ss, LB_STAT_FIB_FAIL);

	if (encap_ipip(ctx, p, be, l2))
		return drop(st, ss, LB_STAT_DROP_ADJUST);

	stat_add(st, LB_STAT_FWD_PACKETS, 1);
	stat_add(st, LB_STAT_FWD_BYTES, p->l3_len);
	svc_stat_add(ss, LB_SVC_PACKETS, 1);
	svc_stat_add(ss, LB_SVC_BYTES, p->l3_len);
	if (p->icmp_err)
		stat_add(st, LB_STAT_ICMP_ERR_FWD, 1);

	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The kernel forwards the encapsulated frame and resolves the neighbour. */
		stat_add(st, LB_STAT_FIB_NO_NEIGH, 1);
		return XDP_PASS;
	}

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return drop(st, ss, LB_STAT_DROP_ADJUST);
	__builtin_memcpy(eth->h_dest, nh.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, nh.smac, ETH_ALEN);
	if (nh.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(nh.ifindex, 0);
}

/* Fragments, bad L4 headers and unbalanced protocols: drop or pass by whether a VIP is hit. */
static __always_inline int lb_unbalanced(const struct pkt *p, int res)
{
	struct lb_svc_key vk = {};

	__builtin_memcpy(vk.addr, p->flow.daddr, 16);
	vk.family = p->flow.family;
	if (!bpf_map_lookup_elem(&lb_vips, &vk))
		return XDP_PASS;

	struct lb_stats *st = stats_get();
	if (res == PARSE_FRAGMENT)
		return drop(st, NULL, LB_STAT_DROP_FRAGMENT);
	if (res == PARSE_BAD_L4)
		return drop(st, NULL, LB_STAT_DROP_MALFORMED);
	stat_add(st, LB_STAT_PASS_VIP_OTHER, 1);
	return XDP_PASS;
}

/* The attached interface `ifx`, or NULL (see lb_iface_slot). */
static __always_inline const struct lb_iface_slot *iface_find(__u32 ifx)
{
#pragma unroll
	for (__u32 i = 0; i < LB_IFACE_PROBES; i++) {
		__u32 k = (ifx + i) & (LB_IFACE_SLOTS - 1);
		const struct lb_iface_slot *s = bpf_map_lookup_elem(&lb_iface_slots, &k);

		if (!s || s->ifindex == 0)
			return NULL;
		if (s->ifindex == ifx)
			return s;
	}
	return NULL;
}

SEC("xdp")
int holdfast_lb(struct xdp_md *ctx)
{
	struct pkt p = {};

	/* Only frames addressed to this interface (or multicast/broadcast). */
	{
		void *data = (void *)(long)ctx->data;
		void *end = (void *)(long)ctx->data_end;
		const struct lb_iface_slot *ifc = iface_find(ctx->ingress_ifindex);

		if (ifc && data + ETH_HLEN <= end) {
			const __u8 *d = data;

			if (!(d[0] & 1) && (*(const __u32 *)d != *(const __u32 *)ifc->mac ||
					    *(const __u16 *)(d + 4) != *(const __u16 *)(ifc->mac + 4))) {
				stat_add(stats_get(), LB_STAT_PASS_OTHERHOST, 1);
				return XDP_PASS;
			}
		}
	}

	int res = parse_packet(ctx, &p);

	if (res == PARSE_NOT_VIP || res == PARSE_NOT_IP)
		return XDP_PASS;
	if (res == PARSE_MALFORMED_L3) {
		stat_add(stats_get(), LB_STAT_PASS_MALFORMED, 1);
		return XDP_PASS;
	}
	if (res != PARSE_OK)
		return lb_unbalanced(&p, res);

	struct lb_stats *st = stats_get();
	/* TCP past its SYN: mostly established flows (see below). */
	int est = p.flow.proto == IPPROTO_TCP_ && !pkt_is_syn(&p);
	struct lb_ct_val *ct = NULL;
	enum lb_stat why = 0;
	struct lb_backend *be = NULL;
	struct lb_svc_stats *ss;
	__u32 bid;
	__u64 now = 0;

	/*
	 * A TCP packet past the SYN looks its entry up first: a followed one
	 * needs no service (see ct.h). A SYN and a UDP packet look the service
	 * up first and then the entry, right before a new flow's insert: they
	 * are mostly new flows (a DNS query from a new port is one), and with
	 * the entry first a new flow cost ~100 ns more, measured side by side
	 * (SYN and UDP, docs/benchmarks.md).
	 */
	if (est) {
		ct = ct_find(&p, st, &be, &now, &why);
		if (ct && be && be->svc_ref) {
			__u32 hsid = be->svc_ref - 1;

			ss = bpf_map_lookup_elem(&lb_svc_stats, &hsid);
			goto hit;
		}
	}

	struct lb_svc_key sk = {};
	__builtin_memcpy(sk.addr, p.flow.daddr, 16);
	sk.port = p.flow.dport;
	sk.proto = p.flow.proto;
	sk.family = p.flow.family;
	struct lb_svc *svc = bpf_map_lookup_elem(&lb_services, &sk);
	if (!svc) {
		sk.port = 0;
		svc = bpf_map_lookup_elem(&lb_services, &sk);
		if (!svc)
			return XDP_PASS;
	}

	__u32 sid = svc->id;
	ss = bpf_map_lookup_elem(&lb_svc_stats, &sid);
	if (!est)
		ct = ct_find(&p, st, &be, &now, &why);
	if (ct && be)
		goto hit; /* a followed entry whose backend has no svc_ref */
	if (why)
		stat_add(st, why, 1);
	bid = 0;
	be = ct_pick(&p, svc, ct != NULL, st, ss, &bid, &now);
	if (!be)
		return drop(st, ss, LB_STAT_DROP_NO_BACKEND);
	goto forward;

hit:
	ct_hit(&p, ct, now, st, ss);
	bid = ct->backend_id;
forward:
	if (p.l3_off == ETH_HLEN)
		return lb_forward(ctx, &p, be, bid, now, st, ss, ETH_HLEN);
	return lb_forward(ctx, &p, be, bid, now, st, ss, ETH_HLEN + VLAN_HLEN);
}

char _license[] SEC("license") = "GPL";
