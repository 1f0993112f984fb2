// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * lb.bpf.c - the Holdfast XDP load balancer.
 *
 * VIP traffic -> service -> backend (conntrack, else Maglev) -> IPIP
 * encapsulation (DSR) or SNAT -> next hop by bpf_fib_lookup -> XDP_TX /
 * redirect; a backend's reply to a SNAT address -> its binding -> back to
 * the client. Everything else goes to the kernel untouched. See
 * docs/architecture.md.
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
#include "affinity.h"
#include "snat.h"
#include "stats.h"
#include "ct_apply.h"
#include "ct_share.h"

#define AF_INET_ 2
#define AF_INET6_ 10

static __always_inline int drop(struct lb_stats *st, struct lb_svc_stats *ss, enum lb_stat why)
{
	stat_add(st, why, 1);
	svc_stat_add(ss, LB_SVC_DROPS, 1);
	return XDP_DROP;
}

/*
 * The parameters of a bpf_fib_lookup, zeroed, in the per-CPU scratch space
 * (64 bytes the stack that the program and its calls share has no room
 * for).
 */
static __always_inline struct bpf_fib_lookup *scratch_fib(void)
{
	__u32 zero = 0;
	struct lb_scratch *s = bpf_map_lookup_elem(&lb_scratch, &zero);

	if (!s)
		return NULL;
	__builtin_memset(&s->fib, 0, sizeof(s->fib));
	return &s->fib;
}

/*
 * Next hop towards a backend: the per-CPU cache if fresh, else
 * bpf_fib_lookup (only successful lookups are cached; an unresolved neighbour
 * is retried on every packet so the kernel's resolution is seen at once).
 * The lookup's source is `src` (SNAT) or the encapsulation's (NULL).
 * Returns a BPF_FIB_LKUP_RET_* code; on success *nh is filled.
 */
static __always_inline int next_hop(struct xdp_md *ctx, const struct pkt *p,
				    const struct lb_backend *be, __u32 bid, __u64 now,
				    struct lb_nh *nh, const __u8 *src)
{
	struct lb_nh *cached = bpf_map_lookup_elem(&lb_nh_cache, &bid);

	if (cached && cached->expires_ns > now) {
		*nh = *cached;
		return BPF_FIB_LKUP_RET_SUCCESS;
	}

	struct bpf_fib_lookup *fib = scratch_fib();

	if (!fib)
		return BPF_FIB_LKUP_RET_NOT_FWDED;
	fib->ifindex = ctx->ingress_ifindex;
	if (be->family == LB_FAMILY_V4) {
		fib->family = AF_INET_;
		fib->ipv4_src = src ? *(const __u32 *)src : encap_src_v4(p);
		fib->ipv4_dst = *(const __u32 *)be->addr;
	} else {
		fib->family = AF_INET6_;
		if (src)
			__builtin_memcpy(fib->ipv6_src, src, 16);
		else
			encap_src_v6(p, fib->ipv6_src);
		__builtin_memcpy(fib->ipv6_dst, be->addr, 16);
	}
	int rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc;
	nh->ifindex = fib->ifindex;
	__builtin_memcpy(nh->smac, fib->smac, ETH_ALEN);
	__builtin_memcpy(nh->dmac, fib->dmac, ETH_ALEN);
	nh->expires_ns = now + lb_nh_cache_ns;
	if (cached && lb_nh_cache_ns)
		*cached = *nh;
	return rc;
}

/*
 * DSR to a backend that listens on another port than the service's
 * (Kubernetes targetPort), after encapsulation: the inner destination port
 * becomes the backend's (checksum updated; an IPv4 UDP checksum of 0 stays
 * 0) and the service port rides in the outer header for the backend's
 * decap agent, which turns the answers' source port back: in the outer
 * IPv4 ID, with DF (such a packet is never fragmented, so its ID names no
 * fragments), or in the low 16 bits of the outer IPv6 flow label. Out of
 * line: the program's stack is full, and most services need none of it.
 */
static __noinline int dsr_target_port(struct xdp_md *ctx, const struct pkt *p,
				      const struct lb_backend *be)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *outer = data + (p->l3_off & 0x1f);
	__be16 svc_port = p->flow.dport, port = be->port;
	__u32 l4_off = p->l4_off & 0x3ff;

	if (be->family == LB_FAMILY_V4) {
		struct iphdr *o = outer;

		if ((void *)(o + 1) > end)
			return -1;
		__u64 acc = csum_word(0, o->id, svc_port);
		acc = csum_word(acc, o->frag_off, IP_DF_BE);
		o->id = svc_port;
		o->frag_off = IP_DF_BE;
		o->check = csum_apply(o->check, acc);
		l4_off += sizeof(struct iphdr);
	} else {
		struct ipv6hdr *o = outer;

		if ((void *)(o + 1) > end)
			return -1;
		__builtin_memcpy(&o->flow_lbl[1], &svc_port, 2);
		l4_off += sizeof(struct ipv6hdr);
	}
	void *l4 = data + (l4_off & 0x7ff);
	if (p->flow.proto == IPPROTO_TCP_) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end)
			return -1;
		th->check = csum_apply(th->check, csum_word(0, th->dest, port));
		th->dest = port;
		return 0;
	}
	struct udphdr *uh = l4;

	if ((void *)(uh + 1) > end)
		return -1;
	if (uh->check || p->flow.family == LB_FAMILY_V6) {
		__u16 c = csum_apply(uh->check, csum_word(0, uh->dest, port));

		uh->check = c ? c : 0xffff;
	}
	uh->dest = port;
	return 0;
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
	int rc = next_hop(ctx, p, be, bid, now, &nh, NULL);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(st, ss, LB_STAT_FIB_FAIL);

	if (encap_ipip(ctx, p, be, l2))
		return drop(st, ss, LB_STAT_DROP_ADJUST);
	/* (An ICMP error quotes the client's packet: it goes untranslated.) */
	if (be->port && be->port != p->flow.dport && !p->icmp_err &&
	    dsr_target_port(ctx, p, be))
		return drop(st, ss, LB_STAT_DROP_MALFORMED);

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

/* Send a rewritten frame to next hop `nh` (or to the kernel, `rc` NO_NEIGH). */
static __always_inline int send_to(struct xdp_md *ctx, const struct lb_nh *nh, int rc,
				   struct lb_stats *st, struct lb_svc_stats *ss)
{
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The kernel forwards the rewritten packet and resolves the neighbour. */
		stat_add(st, LB_STAT_FIB_NO_NEIGH, 1);
		return XDP_PASS;
	}
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return drop(st, ss, LB_STAT_DROP_ADJUST);
	__builtin_memcpy(eth->h_dest, nh->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, nh->smac, ETH_ALEN);
	if (nh->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(nh->ifindex, 0);
}

/* The stats of backend `be`'s service (NULL if not known). */
static __always_inline struct lb_svc_stats *backend_svc_stats(const struct lb_backend *be)
{
	if (!be || !be->svc_ref)
		return NULL;
	__u32 sid = be->svc_ref - 1;

	return bpf_map_lookup_elem(&lb_svc_stats, &sid);
}

/* The scratch space for an ICMP error's translation target. */
static __always_inline struct nat_icmp_to *scratch_icmp_to(void)
{
	__u32 zero = 0;
	struct lb_scratch *s = bpf_map_lookup_elem(&lb_scratch, &zero);

	_Static_assert(sizeof(struct nat_icmp_to) <= sizeof(struct lb_scratch), "scratch");
	if (s)
		__builtin_memset(s, 0, sizeof(struct nat_icmp_to));
	return (void *)s;
}

/* Count a packet forwarded to a backend with SNAT. */
static __always_inline void count_snat_fwd(const struct pkt *p, struct lb_stats *st,
					   struct lb_svc_stats *ss)
{
	stat_add(st, LB_STAT_FWD_PACKETS, 1);
	stat_add(st, LB_STAT_FWD_BYTES, p->l3_len);
	stat_add(st, LB_STAT_SNAT_FWD, 1);
	svc_stat_add(ss, LB_SVC_PACKETS, 1);
	svc_stat_add(ss, LB_SVC_BYTES, p->l3_len);
}

/*
 * A SNAT flow's packet from the client to its backend, from the address of
 * the binding's slot and its port (`binding` = slot << 16 | port). Out of
 * line: the program and its calls share 512 bytes of stack.
 */
static __noinline int snat_forward(struct xdp_md *ctx, const struct pkt *p, __u32 bid,
				   __u32 binding, __u64 now)
{
	struct lb_stats *st = stats_get();
	const struct lb_backend *be = backend_get(bid);
	struct lb_svc_stats *ss = backend_svc_stats(be);
	__u32 slot = binding >> 16;
	__be16 sport = (__be16)binding;
	const __u8 *src = snat_addr(slot, p->flow.family);
	struct lb_nh nh;

	if (!be)
		return drop(st, ss, LB_STAT_DROP_NO_BACKEND);
	if (!src)
		return drop(st, ss, LB_STAT_SNAT_NO_ADDR);
	if (be->family != p->flow.family)
		return drop(st, ss, LB_STAT_DROP_UNSUPPORTED);
	int rc = next_hop(ctx, p, be, bid, now, &nh, src);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(st, ss, LB_STAT_FIB_FAIL);
	int r = nat_rewrite(ctx, p, src, be->addr, sport, backend_port(be, p));
	if (r > 0)
		return drop(st, ss, LB_STAT_DROP_TTL);
	if (r < 0)
		return drop(st, ss, LB_STAT_DROP_MALFORMED);
	count_snat_fwd(p, st, ss);
	return send_to(ctx, &nh, rc, st, ss);
}

/*
 * An ICMP error from the client's side about a SNAT flow, to its backend
 * as if about the packet the backend sent (out of line: a rare path whose
 * translation needs a frame of its own).
 */
static __noinline int snat_forward_icmp(struct xdp_md *ctx, const struct pkt *p, __u32 bid,
					__u32 slot, __be16 sport)
{
	struct lb_stats *st = stats_get();
	const struct lb_backend *be = backend_get(bid);
	struct lb_svc_stats *ss = backend_svc_stats(be);
	const __u8 *src = snat_addr(slot, p->flow.family);
	struct nat_icmp_to *t = scratch_icmp_to();
	struct lb_nh nh;

	if (!be)
		return drop(st, ss, LB_STAT_DROP_NO_BACKEND);
	if (!t)
		return drop(st, ss, LB_STAT_DROP_ADJUST);
	if (!src)
		return drop(st, ss, LB_STAT_SNAT_NO_ADDR);
	if (be->family != p->flow.family)
		return drop(st, ss, LB_STAT_DROP_UNSUPPORTED);
	int rc = next_hop(ctx, p, be, bid, hit_clock(st), &nh, src);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(st, ss, LB_STAT_FIB_FAIL);
	addr_copy(t->os, src);
	__builtin_memcpy(t->od, be->addr, 16);
	__builtin_memcpy(t->qs, be->addr, 16);
	addr_copy(t->qd, src);
	t->qsp = backend_port(be, p);
	t->qdp = sport;
	int r = nat_icmp(ctx, p, t);
	if (r > 0)
		return drop(st, ss, LB_STAT_DROP_TTL);
	if (r < 0)
		return drop(st, ss, LB_STAT_DROP_MALFORMED);
	stat_add(st, LB_STAT_SNAT_ICMP, 1);
	stat_add(st, LB_STAT_ICMP_ERR_FWD, 1);
	count_snat_fwd(p, st, ss);
	return send_to(ctx, &nh, rc, st, ss);
}

/*
 * A new flow (or a re-pick) of a SNAT service: bind a port of this node's
 * address (in flood mode, a half-open binding for a new SYN; the
 * handshake's ACK moves it into lb_snat_rev). Returns the binding, slot <<
 * 16 | port, for the caller to write the entry with and forward, or
 * -(verdict + 1) when the packet was dropped here. Out of line (a BPF-to-BPF call): the
 * binding's keys need a frame of their own. `how` is (an entry existed)
 * << 48 | the pick state << 32 | the service's stats slot.
 */
static __noinline __s64 snat_new(struct xdp_md *ctx, const struct pkt *p, __u32 bid, __u64 how)
{
	enum pick_state state = (how >> 32) & 0xffff;
	int had_entry = (how >> 48) & 1;
	__u32 sid = (__u32)how;
	struct lb_stats *st = stats_get();
	struct lb_svc_stats *ss = bpf_map_lookup_elem(&lb_svc_stats, &sid);
	const struct lb_backend *be = backend_get(bid);
	enum lb_stat why;
	__be16 port = 0;

	if (!be) {
		why = LB_STAT_DROP_NO_BACKEND;
		goto out;
	}
	/* An ICMP error about a flow without an entry: nothing to translate with. */
	if (state == PICK_STATELESS) {
		why = LB_STAT_SNAT_NO_ENTRY;
		goto out;
	}
	int slot = snat_own_slot();
	const __u8 *src = slot >= 0 ? snat_addr(slot, p->flow.family) : NULL;

	if (!src) {
		why = LB_STAT_SNAT_NO_ADDR;
		goto out;
	}
	if (be->family != p->flow.family) {
		why = LB_STAT_DROP_UNSUPPORTED;
		goto out;
	}
	__u32 flood = snat_flood_min();
	int half_open = state == PICK_FLOODED;
	struct lb_ct_key rk = {};
	struct lb_snat_rev rv = {
		.flow = p->flow,
		.backend_id = bid,
	};

	snat_rev_key(&rk, p, be, src);
	if (!half_open && p->flow.proto == IPPROTO_TCP_ && !pkt_is_syn(p)) {
		port = snat_promote(p, &rk, &rv);
		/*
		 * Past its SYN, with no entry and no half-open binding here: a
		 * new port would reach the backend as a connection it does not
		 * know, which it resets. Dropped instead: most likely ECMP moved
		 * the flow here a moment after it began and its entry is on its
		 * way by replication; the retransmission finds it. (An entry
		 * whose backend is gone binds anew: that connection is lost, and
		 * the backend's reset says so at once.)
		 */
		if (!port && !had_entry) {
			why = LB_STAT_SNAT_MIDFLOW;
			goto out;
		}
	}
	if (!port) {
		if (half_open) {
			rv.pad = syn_expected_ack(ctx, p);
			port = snat_bind(p, &rk, &rv, &lb_snat_half_open, flood, lb_snat_port_max);
		} else {
			port = snat_bind(p, &rk, &rv, &lb_snat_rev, lb_snat_port_min, flood - 1);
		}
	}
	if (port) {
		if (half_open)
			stat_add(st, LB_STAT_SNAT_HALF_OPEN, 1);
		return (__s64)slot << 16 | port;
	}
	svc_stat_add(ss, LB_SVC_SNAT_EXHAUSTED, 1);
	why = LB_STAT_SNAT_EXHAUSTED;
out:
	return -(__s64)drop(st, ss, why) - 1;
}

/* Next hop towards a client (SNAT replies): the per-CPU cache, else the FIB. */
static __always_inline int client_hop(struct xdp_md *ctx, const struct lb_ct_key *f, __u64 now,
				      struct lb_nh *nh)
{
	const __u32 *a = (const __u32 *)f->saddr;
	__u32 folded = f->family == LB_FAMILY_V4 ? a[0] : a[0] ^ a[1] ^ a[2] ^ a[3];
	__u32 k = (folded * LB_VIP_HASH_MUL) >> 24;
	struct lb_nh_client *c = bpf_map_lookup_elem(&lb_nh_client, &k);

	if (c && c->nh.expires_ns > now && __builtin_memcmp(c->addr, f->saddr, 16) == 0) {
		*nh = c->nh;
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	struct bpf_fib_lookup *fib = scratch_fib();

	if (!fib)
		return BPF_FIB_LKUP_RET_NOT_FWDED;
	fib->ifindex = ctx->ingress_ifindex;
	if (f->family == LB_FAMILY_V4) {
		fib->family = AF_INET_;
		fib->ipv4_src = *(const __u32 *)f->daddr;
		fib->ipv4_dst = *(const __u32 *)f->saddr;
	} else {
		fib->family = AF_INET6_;
		__builtin_memcpy(fib->ipv6_src, f->daddr, 16);
		__builtin_memcpy(fib->ipv6_dst, f->saddr, 16);
	}
	int rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc;
	nh->ifindex = fib->ifindex;
	__builtin_memcpy(nh->smac, fib->smac, ETH_ALEN);
	__builtin_memcpy(nh->dmac, fib->dmac, ETH_ALEN);
	nh->expires_ns = now + lb_nh_cache_ns;
	if (c && lb_nh_cache_ns) {
		__builtin_memcpy(c->addr, f->saddr, 16);
		c->nh = *nh;
	}
	return rc;
}

/* snat_reply's answer when the packet has no binding and is no SNAT address's. */
#define SNAT_NOT_OURS (-1)

/*
 * The binding of a packet to a SNAT address, or NULL (with the verdict
 * SNAT_NOT_OURS, or the packet counted and passed or dropped): a reply
 * with no binding goes to the kernel, counted; a SYN-ACK for a half-open
 * binding must acknowledge the client's ISN (else it is another flow's:
 * dropped).
 */
static __always_inline const struct lb_snat_rev *snat_binding(struct xdp_md *ctx,
							       const struct pkt *p,
							       struct lb_stats *st, int *verdict)
{
	const struct lb_snat_rev *rv = bpf_map_lookup_elem(&lb_snat_rev, &p->flow);

	if (rv)
		return rv;
	if (p->flow.proto == IPPROTO_TCP_ && !p->icmp_err &&
	    (p->tcp_flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK)) {
		rv = bpf_map_lookup_elem(&lb_snat_half_open, &p->flow);
		if (rv) {
			void *data = (void *)(long)ctx->data;
			void *end = (void *)(long)ctx->data_end;
			struct tcphdr *th = data + (p->l4_off & 0x3ff);

			if ((void *)(th + 1) <= end && bpf_ntohl(th->ack_seq) == rv->pad)
				return rv;
			*verdict = drop(st, NULL, LB_STAT_SNAT_STRAY);
			return NULL;
		}
	}
	struct lb_svc_key vk = {};

	__builtin_memcpy(vk.addr, p->flow.daddr, 16);
	vk.family = p->flow.family;
	__u32 *v = bpf_map_lookup_elem(&lb_vips, &vk);
	if (v && (*v & LB_VIPS_F_SNAT)) {
		stat_add(st, LB_STAT_SNAT_NO_ENTRY, 1);
		*verdict = XDP_PASS;
	} else {
		*verdict = SNAT_NOT_OURS;
	}
	return NULL;
}

/* Count a reply translated back to its client. */
static __always_inline void count_snat_reply(const struct pkt *p, struct lb_stats *st,
					     struct lb_svc_stats *ss)
{
	stat_add(st, LB_STAT_SNAT_REPLIES, 1);
	svc_stat_add(ss, LB_SVC_REPLIES, 1);
	svc_stat_add(ss, LB_SVC_BYTES, p->l3_len);
}

/*
 * A backend's reply to a SNAT address, back to the client as if from the
 * VIP. A FIN or RST from the backend turns the flow's entry CLOSING (and
 * peers' copies, by the ring). Out of line: most packets are no reply.
 */
static __noinline int snat_reply(struct xdp_md *ctx, const struct pkt *p)
{
	struct lb_stats *st = stats_get();
	int verdict = SNAT_NOT_OURS;
	const struct lb_snat_rev *rv = snat_binding(ctx, p, st, &verdict);

	if (!rv)
		return verdict;
	const struct lb_ct_key *f = &rv->flow;
	struct lb_svc_stats *ss = backend_svc_stats(backend_get(rv->backend_id));
	struct lb_nh nh;
	int rc = client_hop(ctx, f, hit_clock(st), &nh);

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(st, ss, LB_STAT_FIB_FAIL);
	int r = nat_rewrite(ctx, p, f->daddr, f->saddr, f->dport, f->sport);
	if (r > 0)
		return drop(st, ss, LB_STAT_DROP_TTL);
	if (r < 0)
		return drop(st, ss, LB_STAT_DROP_MALFORMED);
	if (f->proto == IPPROTO_TCP_ && (p->tcp_flags & (TCP_FIN | TCP_RST))) {
		struct lb_ct_val *ct = bpf_map_lookup_elem(&lb_conntrack, f);

		if (ct && !(ct->flags & LB_CT_F_CLOSING)) {
			ct->flags |= LB_CT_F_CLOSING;
			if (ct->origin == (__u16)lb_node_id)
				ct_closing_event(f, ct, st);
		}
	}
	count_snat_reply(p, st, ss);
	return send_to(ctx, &nh, rc, st, ss);
}

/* An ICMP error from the backend's side about a SNAT flow, to its client as if from the VIP. */
static __noinline int snat_reply_icmp(struct xdp_md *ctx, const struct pkt *p)
{
	struct lb_stats *st = stats_get();
	int verdict = SNAT_NOT_OURS;
	const struct lb_snat_rev *rv = snat_binding(ctx, p, st, &verdict);

	if (!rv)
		return verdict;
	struct nat_icmp_to *t = scratch_icmp_to();
	struct lb_svc_stats *ss = backend_svc_stats(backend_get(rv->backend_id));

	if (!t)
		return drop(st, ss, LB_STAT_DROP_ADJUST);
	__builtin_memcpy(t->os, rv->flow.daddr, 16);
	__builtin_memcpy(t->od, rv->flow.saddr, 16);
	__builtin_memcpy(t->qs, rv->flow.saddr, 16);
	__builtin_memcpy(t->qd, rv->flow.daddr, 16);
	t->qsp = rv->flow.sport;
	t->qdp = rv->flow.dport;
	struct lb_nh nh;
	int rc = client_hop(ctx, &rv->flow, hit_clock(st), &nh);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(st, ss, LB_STAT_FIB_FAIL);
	int r = nat_icmp(ctx, p, t);
	if (r > 0)
		return drop(st, ss, LB_STAT_DROP_TTL);
	if (r < 0)
		return drop(st, ss, LB_STAT_DROP_MALFORMED);
	stat_add(st, LB_STAT_SNAT_ICMP, 1);
	count_snat_reply(p, st, ss);
	return send_to(ctx, &nh, rc, st, ss);
}

/*
 * May the packet's source reach service `sid` (its source ranges, if it has
 * any)? An entry remembers the ranges generation its source was found in:
 * until the ranges change, its packets skip the trie. The trie's key is
 * built in the per-CPU scratch space, not on the stack that the program
 * and its calls share (512 bytes).
 */
static __always_inline int src_allowed(const struct pkt *p, __u32 sid, struct lb_ct_val *ct)
{
	const struct lb_svc_policy *pol = bpf_map_lookup_elem(&lb_svc_policy, &sid);

	if (!pol || !pol->ranges_gen || (ct && ct->ranges_gen == pol->ranges_gen))
		return 1;
	__u32 zero = 0;
	struct lb_src_range_key *k = bpf_map_lookup_elem(&lb_scratch, &zero);

	_Static_assert(sizeof(*k) <= sizeof(struct lb_scratch), "scratch");
	if (!k)
		return 0;
	k->prefixlen = LB_SRC_RANGE_BASE_BITS + (p->flow.family == LB_FAMILY_V4 ? 32 : 128);
	k->svc = bpf_htonl(sid);
	k->family = p->flow.family;
	__builtin_memcpy(k->addr, p->flow.saddr, 16);
	__builtin_memset(k->pad, 0, sizeof(k->pad));
	if (!bpf_map_lookup_elem(&lb_src_ranges, k))
		return 0;
	if (ct)
		ct->ranges_gen = pol->ranges_gen;
	return 1;
}

static __always_inline int src_refused(struct lb_stats *st, struct lb_svc_stats *ss)
{
	svc_stat_add(ss, LB_SVC_SRC_REFUSED, 1);
	return drop(st, ss, LB_STAT_SRC_REFUSED);
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

	/* A SNAT address's packet: a backend's reply, translated back. */
	if (maybe_snat(&p)) {
		int r = p.icmp_err ? snat_reply_icmp(ctx, &p) : snat_reply(ctx, &p);

		if (r != SNAT_NOT_OURS)
			return r;
	}

	/* TCP past its SYN: mostly established flows (see below). */
	int est = p.flow.proto == IPPROTO_TCP_ && !pkt_is_syn(&p);
	struct lb_ct_val *ct = NULL;
	enum lb_stat why = 0;
	struct lb_backend *be = NULL;
	struct lb_svc_stats *ss;
	__u32 bid, binding;
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
			if (!src_allowed(&p, hsid, ct))
				return src_refused(st, ss);
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
	if (!src_allowed(&p, sid, ct))
		return src_refused(st, ss);
	if (ct && be)
		goto hit; /* a followed entry whose backend has no svc_ref */
	if (why)
		stat_add(st, why, 1);
	bid = 0;
	__u32 hash = 0;
	enum pick_state state = PICK_ENTRY;
	be = ct_pick(&p, svc, ct != NULL, st, ss, &bid, &hash, &now, &state);
	if (!be)
		return drop(st, ss, LB_STAT_DROP_NO_BACKEND);
	__u32 mbid = bid;
	if (svc->flags & LB_SVC_F_AFFINITY) {
		bid = affinity_pick(&p, svc, sid, now, state == PICK_ENTRY);
		be = backend_get(bid);
		if (!be)
			return drop(st, ss, LB_STAT_DROP_NO_BACKEND);
	}
	binding = 0;
	if (svc->flags & LB_SVC_F_SNAT) {
		__s64 r = snat_new(ctx, &p, bid,
				   (__u64)(ct != NULL) << 48 | ((__u64)state << 32) | sid);

		if (r < 0)
			return (int)(-r - 1);
		binding = (__u32)r;
	}
	/* A failed insert (map full of locked buckets) still forwards: best effort. */
	if (state == PICK_ENTRY)
		ct_create(&p, bid, now, (svc->flags & LB_SVC_F_AFFINITY) ? LB_CT_F_AFFINE : 0, st,
			  ss, (__be16)binding, binding >> 16,
			  ct_share(svc, bid, mbid, hash, (__be16)binding));
	if (binding)
		goto snat;
	goto forward;

hit:
	if (ct_hit(&p, ct, now, st, ss) && (ct->flags & LB_CT_F_AFFINE))
		affinity_touch(&p.flow, ct->backend_id, now);
	bid = ct->backend_id;
	/* An entry keeps the mode it was made with. */
	if (ct->flags & LB_CT_F_SNAT) {
		binding = (__u32)ct->snat_slot << 16 | ct->snat_port;
		goto snat;
	}
forward:
	if (p.l3_off == ETH_HLEN)
		return lb_forward(ctx, &p, be, bid, now, st, ss, ETH_HLEN);
	return lb_forward(ctx, &p, be, bid, now, st, ss, ETH_HLEN + VLAN_HLEN);
snat:
	if (p.icmp_err)
		return snat_forward_icmp(ctx, &p, bid, binding >> 16, (__be16)binding);
	return snat_forward(ctx, &p, bid, binding, now);
}

char _license[] SEC("license") = "GPL";
