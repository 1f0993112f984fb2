/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * snat.h - SNAT forwarding: both addresses of a VIP flow rewritten, so the
 * backend needs nothing of Holdfast and answers through the LB.
 *
 *   client:cport -> VIP:vport   becomes  SNAT:sport -> backend:bport
 *   backend:bport -> SNAT:sport becomes  VIP:vport  -> client:cport
 *
 * SNAT is the address of a node's slot (lb_snat_addrs): every LB node has
 * its own, so two nodes never bind the same (address, port). A new flow
 * binds a port of this node's address in lb_snat_rev with BPF_NOEXIST (no
 * collision is possible: the map never evicts) and its conntrack entry
 * records (slot, port); peers receive both by replication, so after a
 * node's death the survivors forward its flows with its address and port,
 * and the backends' replies, routed to a survivor by BGP (the dead node's
 * address is announced by every node as a less preferred backup), find the
 * binding there.
 *
 * Ports: a new flow tries SNAT_PROBES ports (a hash of its tuple, then
 * steps of the prime 65537, which no range size divides, so the probes are
 * distinct) in
 * [lb_snat_port_min, snat_flood_min()); the top quarter of the range is for
 * SYN flood mode, whose half-open bindings live in their own LRU
 * (lb_snat_half_open) and so never hold a port an established flow could
 * take. Every port of the range is usable per (backend address, backend
 * port, protocol): the binding's key holds all of them.
 *
 * Checksums are updated incrementally (csum.h); an IPv4 UDP checksum of 0
 * stays 0. TTL / hop limit are decremented (a NAT is a router); a packet
 * that would leave with 0 is dropped (LB_STAT_DROP_TTL). ICMP errors about
 * a SNAT flow are translated both ways, the quoted header included, so a
 * frag-needed from the backend's path reaches the client as if from the
 * VIP, and a client-side error reaches the backend as if about its packet.
 */
#ifndef LB_SNAT_H
#define LB_SNAT_H

#include "parse.h"
#include "csum.h"
#include "ct.h"
#include "stats.h"

/* May the destination be a SNAT address? (the hash of maybe_vip) */
static __always_inline int maybe_snat(const struct pkt *p)
{
	const __u32 *d = (const __u32 *)p->flow.daddr;
	__u32 folded = p->flow.family == LB_FAMILY_V4 ? d[0] : d[0] ^ d[1] ^ d[2] ^ d[3];
	__u32 h = (folded * LB_VIP_HASH_MUL) >> 16;
	__u32 w = h >> 6;
	__u64 *word = bpf_map_lookup_elem(&lb_snat_filter, &w);

	return word && ((*word >> (h & 63)) & 1);
}

/* Slot `slot`'s SNAT address of `family`, or NULL. */
static __always_inline const __u8 *snat_addr(__u32 slot, __u8 family)
{
	if (slot >= LB_SNAT_SLOTS)
		return NULL;
	const struct lb_snat_addr *a = bpf_map_lookup_elem(&lb_snat_addrs, &slot);

	if (!a)
		return NULL;
	/* Branches, not a select: the verifier refuses a pointer and'ed with a mask. */
	const __u8 *addr = family == LB_FAMILY_V4 ? a->v4 : a->v6;
	__u32 want = family == LB_FAMILY_V4 ? LB_SNAT_F_V4 : LB_SNAT_F_V6;

	barrier_var(addr);
	if (!(a->flags & want))
		return NULL;
	return addr;
}

/* This node's slot, or -1 if it has none. */
static __always_inline int snat_own_slot(void)
{
	__u32 zero = 0;
	__u32 *own = bpf_map_lookup_elem(&lb_snat_own, &zero);

	return own && *own ? (int)(*own - 1) : -1;
}

/* The first port of the flood range (the top quarter of the ports). */
static __always_inline __u32 snat_flood_min(void)
{
	return lb_snat_port_max - (lb_snat_port_max - lb_snat_port_min + 1) / 4 + 1;
}

/* The destination port a backend gets: its own, or the client's (port 0). */
static __always_inline __be16 backend_port(const struct lb_backend *be, const struct pkt *p)
{
	return be->port ? be->port : p->flow.dport;
}

/* The reverse key of a binding: the backend's reply as it will arrive. */
static __always_inline void snat_rev_key(struct lb_ct_key *rk, const struct pkt *p,
					 const struct lb_backend *be, const __u8 *src)
{
	__builtin_memcpy(rk->saddr, be->addr, 16);
	__builtin_memcpy(rk->daddr, src, 16);
	rk->sport = backend_port(be, p);
	rk->proto = p->flow.proto;
	rk->family = p->flow.family;
}

static __always_inline int flow_eq(const struct lb_ct_key *a, const struct lb_ct_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4])) == 0;
}

/*
 * Bind p->flow to a free port in [lo, hi]: rk is the binding's key with
 * its port to be chosen, rv its value. The map is lb_snat_rev, or
 * lb_snat_half_open in flood mode, which also checks lb_snat_rev. Returns
 * the port (network order), or 0 if SNAT_PROBES ports were taken.
 */
static __always_inline __be16 snat_bind(const struct pkt *p, struct lb_ct_key *rk,
					const struct lb_snat_rev *rv, void *map, __u32 lo,
					__u32 hi)
{
	__u32 range = hi - lo + 1;
	__u32 h = lb_flow_hash(&p->flow, lb_hash_seed ^ 0x736e6174); /* "snat" */
	int half_open = map == (void *)&lb_snat_half_open;

	if (hi < lo || range == 0)
		return 0;
	for (__u32 i = 0; i < SNAT_PROBES; i++) {
		rk->dport = bpf_htons(lo + (__u32)(((__u64)h + (__u64)i * 65537) % range));
		if (half_open && bpf_map_lookup_elem(&lb_snat_rev, rk))
			continue;
		if (!bpf_map_update_elem(map, rk, rv, BPF_NOEXIST))
			return rk->dport;
		/*
		 * Taken by this very tuple's previous connection (a client that
		 * reuses its port after a close, whose old entry this flow's
		 * replaces): the port is this flow's again, as the kernel's NAT
		 * reopens a TIME_WAIT tuple. Any other owner keeps it.
		 */
		if (!half_open) {
			const struct lb_snat_rev *old = bpf_map_lookup_elem(map, rk);

			if (old && flow_eq(&old->flow, &p->flow) &&
			    !bpf_map_update_elem(map, rk, rv, BPF_EXIST))
				return rk->dport;
		}
	}
	return 0;
}

/*
 * Replace an address in place, accumulating its change (each field is
 * written right after its change is summed: the summing never has more
 * than one address's words live).
 */
static __always_inline __u64 addr_swap(__u64 acc, void *field, const __u8 *to, const int len)
{
	acc = csum_addr(acc, field, to, len);
	__builtin_memcpy(field, to, len);
	return acc;
}

/*
 * addr_swap by the csum_diff helper: a call, but no address words in
 * registers (the ICMP paths, which rewrite four addresses, stay small).
 */
static __always_inline __u64 addr_swap_h(__u64 acc, void *field, const __u8 *to, const int len)
{
	acc += (__u32)bpf_csum_diff(field, len, (void *)to, len, 0);
	__builtin_memcpy(field, to, len);
	return acc;
}

/*
 * Rewrite a TCP/UDP packet to (saddr, daddr, sport, dport): addresses of
 * the family's size, TTL / hop limit - 1, checksums. Returns 0, 1 if the
 * TTL ran out, -1 if the headers are not where parsing found them.
 */
static __always_inline int nat_rewrite(struct xdp_md *ctx, const struct pkt *p,
				       const __u8 *saddr, const __u8 *daddr, __be16 sport,
				       __be16 dport)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *l4 = data + (p->l4_off & 0x3ff);
	__u64 acc = 0;

	if (p->flow.proto == IPPROTO_TCP_) {
		if (l4 + sizeof(struct tcphdr) > end)
			return -1;
	} else if (l4 + sizeof(struct udphdr) > end) {
		return -1;
	}
	if (p->flow.family == LB_FAMILY_V4) {
		struct iphdr *ip = data + (p->l3_off & 0x1f);

		if ((void *)(ip + 1) > end)
			return -1;
		if (ip->ttl <= 1)
			return 1;
		acc = addr_swap(acc, &ip->saddr, saddr, 4);
		acc = addr_swap(acc, &ip->daddr, daddr, 4);
		__u16 old = *(__u16 *)&ip->ttl;
		ip->ttl--;
		ip->check = csum_apply(ip->check, csum_word(acc, old, *(__u16 *)&ip->ttl));
	} else {
		struct ipv6hdr *ip6 = data + (p->l3_off & 0x1f);

		if ((void *)(ip6 + 1) > end)
			return -1;
		if (ip6->hop_limit <= 1)
			return 1;
		acc = addr_swap(acc, &ip6->saddr, saddr, 16);
		acc = addr_swap(acc, &ip6->daddr, daddr, 16);
		ip6->hop_limit--;
	}

	if (p->flow.proto == IPPROTO_TCP_) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end)
			return -1;
		acc = csum_word(acc, th->source, sport);
		acc = csum_word(acc, th->dest, dport);
		th->source = sport;
		th->dest = dport;
		th->check = csum_apply(th->check, acc);
	} else {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return -1;
		acc = csum_word(acc, uh->source, sport);
		acc = csum_word(acc, uh->dest, dport);
		uh->source = sport;
		uh->dest = dport;
		/* IPv4 UDP without a checksum stays without one. */
		if (uh->check || p->flow.family == LB_FAMILY_V6) {
			__u16 c = csum_apply(uh->check, acc);

			uh->check = c ? c : 0xFFFF;
		}
	}
	return 0;
}

/* Where an ICMP error about a SNAT flow is translated to. */
struct nat_icmp_to {
	__u8 os[16]; /* outer source */
	__u8 od[16]; /* outer destination */
	__u8 qs[16]; /* quoted source */
	__u8 qd[16]; /* quoted destination */
	__be16 qsp;  /* quoted source port */
	__be16 qdp;  /* quoted destination port */
	__u32 pad;
};

/*
 * Translate an ICMP error about a SNAT flow: the outer header to (os, od),
 * the quoted packet to (qs, qd, qsp, qdp), with the quoted IPv4 header's
 * checksum, the quoted TCP/UDP checksum when the quote holds it, the ICMP
 * checksum (with ICMPv6's pseudo-header) and the outer one. Returns as
 * nat_rewrite.
 */
static __always_inline int nat_icmp(struct xdp_md *ctx, const struct pkt *p,
				    const struct nat_icmp_to *t)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	int tcp = p->flow.proto == IPPROTO_TCP_;
	int v4 = p->flow.family == LB_FAMILY_V4;
	__u64 icmp = 0, l4 = 0;
	__u16 *icheck;
	struct l4_ports *qp;

	if (v4) {
		struct iphdr *ip = data + (p->l3_off & 0x1f);
		struct icmphdr *ic = data + (p->l4_off & 0x7f);
		struct iphdr *q = data + (p->in_off & 0xff);

		if ((void *)(ip + 1) > end || (void *)(ic + 1) > end || (void *)(q + 1) > end)
			return -1;
		qp = (void *)(q + 1);
		if ((void *)(qp + 1) > end)
			return -1;
		if (ip->ttl <= 1)
			return 1;
		/* The quoted addresses: in the quoted L4 pseudo-header, the
		 * quoted IP checksum and the ICMP checksum's data. */
		l4 = addr_swap_h(l4, &q->saddr, t->qs, 4);
		l4 = addr_swap_h(l4, &q->daddr, t->qd, 4);
		__u16 oq = q->check;
		q->check = csum_apply(oq, l4);
		icmp = csum_word(l4, oq, q->check);
		__u64 outer = addr_swap_h(0, &ip->saddr, t->os, 4);
		outer = addr_swap_h(outer, &ip->daddr, t->od, 4);
		__u16 ot = *(__u16 *)&ip->ttl;
		ip->ttl--;
		ip->check = csum_apply(ip->check, csum_word(outer, ot, *(__u16 *)&ip->ttl));
		icheck = &ic->checksum;
	} else {
		struct ipv6hdr *ip6 = data + (p->l3_off & 0x1f);
		struct icmp6hdr *ic = data + (p->l4_off & 0x3ff);
		struct ipv6hdr *q = data + (p->in_off & 0x3ff);

		if ((void *)(ip6 + 1) > end || (void *)(ic + 1) > end || (void *)(q + 1) > end)
			return -1;
		qp = (void *)(q + 1);
		if ((void *)(qp + 1) > end)
			return -1;
		if (ip6->hop_limit <= 1)
			return 1;
		l4 = addr_swap_h(l4, &q->saddr, t->qs, 16);
		l4 = addr_swap_h(l4, &q->daddr, t->qd, 16);
		/* ICMPv6's checksum covers the outer addresses (pseudo-header). */
		icmp = addr_swap_h(l4, &ip6->saddr, t->os, 16);
		icmp = addr_swap_h(icmp, &ip6->daddr, t->od, 16);
		ip6->hop_limit--;
		icheck = &ic->icmp6_cksum;
	}
	/* The quoted ports, and their L4 checksum if the quote reaches it. */
	__u64 ports = csum_word(csum_word(0, qp->src, t->qsp), qp->dst, t->qdp);
	l4 += ports;
	icmp += ports;
	qp->src = t->qsp;
	qp->dst = t->qdp;
	__u16 *qcheck = (void *)qp + (tcp ? 16 : 6);
	if ((void *)(qcheck + 1) <= end) {
		__u16 oc = *qcheck;

		/* A quoted IPv4 UDP checksum of 0 stays 0. */
		if (oc || !v4 || tcp) {
			__u16 nc = csum_apply(oc, l4);

			if (!nc && !tcp)
				nc = 0xFFFF;
			*qcheck = nc;
			icmp = csum_word(icmp, oc, nc);
		}
	}
	/* (Checked again: clang may rebuild the pointer from its offset.) */
	if ((void *)(icheck + 1) > end)
		return -1;
	*icheck = csum_apply(*icheck, icmp);
	return 0;
}

/* Copy an address in the 16-byte form (an IPv4 one zero-padded). */
static __always_inline void addr_copy(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, 16);
}

/*
 * In SYN flood mode, the client's ACK completing a handshake whose SYN was
 * bound half-open: the binding (found among the SYN's candidate ports of
 * the flood range; rk is its key but for the port, rv the value to move)
 * moves into lb_snat_rev. Returns its port, or 0.
 */
static __always_inline __be16 snat_promote(const struct pkt *p, struct lb_ct_key *rk,
					   const struct lb_snat_rev *rv)
{
	__u32 lo = snat_flood_min();
	__u32 range = lb_snat_port_max - lo + 1;
	__u32 h = lb_flow_hash(&p->flow, lb_hash_seed ^ 0x736e6174);

	if (lb_snat_port_max < lo)
		return 0;
	for (__u32 i = 0; i < SNAT_PROBES; i++) {
		rk->dport = bpf_htons(lo + (__u32)(((__u64)h + (__u64)i * 65537) % range));
		struct lb_snat_rev *hv = bpf_map_lookup_elem(&lb_snat_half_open, rk);

		if (!hv || __builtin_memcmp(&hv->flow, &p->flow, sizeof(p->flow)) != 0)
			continue;
		if (bpf_map_update_elem(&lb_snat_rev, rk, rv, BPF_NOEXIST))
			return 0;
		bpf_map_delete_elem(&lb_snat_half_open, rk);
		return rk->dport;
	}
	return 0;
}

/* The client's ISN + 1, which the backend's SYN-ACK acknowledges. */
static __always_inline __u32 syn_expected_ack(struct xdp_md *ctx, const struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct tcphdr *th = data + (p->l4_off & 0x3ff);

	if ((void *)(th + 1) > end)
		return 0;
	return bpf_ntohl(th->seq) + 1;
}

#endif /* LB_SNAT_H */
