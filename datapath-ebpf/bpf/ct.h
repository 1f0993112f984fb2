/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * ct.h - backend selection: conntrack first, Maglev for new flows.
 *
 * An entry is followed (even if the Maglev choice changed since, and even if
 * its backend is draining) unless:
 *  - its backend was removed (state EMPTY): re-pick (REPICK_GONE);
 *  - a TCP SYN (without ACK) finds it stale: backend not active, the client
 *    closed it (FIN/RST seen), or idle past the TCP timeout: re-pick;
 *  - a UDP packet finds it idle past the UDP timeout: re-pick (new flow).
 *
 * Benign races: two CPUs may create the entry of one new flow at once; both
 * pick the same backend (Maglev is deterministic), so the last write wins
 * harmlessly. last_seen_ns and flags are written in place without atomics: a
 * lost update only delays a refresh by one packet. A peer may write an entry
 * concurrently through replication; the userspace merge rule (never override
 * a newer local entry) applies to those writes.
 */
#ifndef LB_CT_H
#define LB_CT_H

#include "lb_maps.h"
#include "jhash.h"
#include "parse.h"
#include "stats.h"

static __always_inline struct lb_backend *backend_get(__u32 id)
{
	struct lb_backend *be = bpf_map_lookup_elem(&lb_backends, &id);

	if (!be || be->state == LB_BACKEND_EMPTY)
		return NULL;
	return be;
}

static __always_inline struct lb_backend *maglev_pick(const struct pkt *p, const struct lb_svc *svc,
						      __u32 *bid)
{
	if (svc->ring_size == 0)
		return NULL;
	__u32 idx = svc->ring_base + lb_flow_hash(&p->flow, lb_hash_seed) % svc->ring_size;
	__u32 *slot = bpf_map_lookup_elem(&lb_maglev, &idx);

	if (!slot || *slot == LB_NO_BACKEND)
		return NULL;
	*bid = *slot;
	struct lb_backend *be = backend_get(*bid);
	if (!be || be->state != LB_BACKEND_ACTIVE)
		return NULL;
	return be;
}

static __always_inline struct lb_backend *select_backend(const struct pkt *p,
							 const struct lb_svc *svc,
							 struct lb_stats *st,
							 struct lb_svc_stats *ss)
{
	__u64 now = bpf_ktime_get_ns();
	int tcp = p->flow.proto == IPPROTO_TCP_;
	int syn = tcp && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	struct lb_ct_val *ct = bpf_map_lookup_elem(&lb_conntrack, &p->flow);
	struct lb_backend *be;
	__u32 bid;

	if (ct) {
		be = backend_get(ct->backend_id);
		if (!be) {
			stat_add(st, LB_STAT_REPICK_GONE, 1);
			goto pick;
		}
		__u64 last = ct->last_seen_ns;
		__u64 idle = now > last ? now - last : 0;
		if (tcp) {
			if (syn && (be->state != LB_BACKEND_ACTIVE || (ct->flags & LB_CT_F_CLOSING) ||
				    idle > lb_tcp_timeout_ns)) {
				stat_add(st, LB_STAT_REPICK_STALE, 1);
				goto pick;
			}
		} else if (idle > lb_udp_timeout_ns) {
			stat_add(st, LB_STAT_REPICK_STALE, 1);
			goto pick;
		}
		if (!p->icmp_err) {
			if (idle > lb_ct_refresh_ns)
				ct->last_seen_ns = now;
			if (tcp && (p->tcp_flags & (TCP_FIN | TCP_RST)) &&
			    !(ct->flags & LB_CT_F_CLOSING))
				ct->flags |= LB_CT_F_CLOSING;
		}
		stat_add(st, LB_STAT_CT_HITS, 1);
		svc_stat_add(ss, LB_SVC_CT_HITS, 1);
		return be;
	}
	if (tcp && !syn && !p->icmp_err) {
		stat_add(st, LB_STAT_MIDFLOW_MISS, 1);
		svc_stat_add(ss, LB_SVC_MIDFLOW_MISS, 1);
	}

pick:
	be = maglev_pick(p, svc, &bid);
	if (!be)
		return NULL;
	/* An ICMP error never creates state: it follows or borrows the flow's pick. */
	if (p->icmp_err)
		return be;

	struct lb_flow_event ev = {};
	ev.key = p->flow;
	ev.val.backend_id = bid;
	ev.val.origin = (__u16)lb_node_id;
	ev.val.created_ns = now;
	ev.val.last_seen_ns = now;
	bpf_map_update_elem(&lb_conntrack, &p->flow, &ev.val, BPF_ANY);
	if (bpf_ringbuf_output(&lb_flow_events, &ev, sizeof(ev), 0))
		stat_add(st, LB_STAT_RING_LOST, 1);
	stat_add(st, LB_STAT_NEW_FLOWS, 1);
	svc_stat_add(ss, LB_SVC_NEW_FLOWS, 1);
	return be;
}

#endif /* LB_CT_H */
