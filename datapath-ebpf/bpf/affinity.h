/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * affinity.h - client affinity (Kubernetes sessionAffinity: ClientIP).
 *
 * A service with LB_SVC_F_AFFINITY sends every new flow of a client to one
 * backend for as long as the client is not idle past the service's timeout
 * (lb_svc_policy.affinity_s), across backend changes that leave that
 * backend active:
 *  - the client's affinity entry (see LB_CT_PAD_AFFINITY) names the
 *    backend; a new flow that finds it fresh, with its backend still
 *    active in this service, follows it;
 *  - otherwise the flow picks by Maglev over the client's address alone
 *    (the tuple with source port 0), so that every LB node picks alike
 *    for as long as the tables do not change, and the entry is written
 *    anew: a backend that went away (removed, drained, down) releases its
 *    clients this way, and so does the timeout;
 *  - each refresh of a client's flow (at most one per lb_ct_refresh_ns per
 *    flow) refreshes its affinity entry, which is announced on the ring
 *    when made and again each time a quarter of the timeout has passed
 *    since its last announcement, so peers' copies stay fresh: the node
 *    that announces takes the entry as its own (origin), since a node
 *    sends only entries of its own origin.
 */
#ifndef LB_AFFINITY_H
#define LB_AFFINITY_H

#include "lb_maps.h"
#include "ct.h"
#include "jhash.h"
#include "stats.h"

#define NS_PER_S 1000000000ULL

/* The affinity timeout of service slot `sid` in ns (0: none). */
static __always_inline __u64 affinity_timeout(__u32 sid)
{
	const struct lb_svc_policy *pol = bpf_map_lookup_elem(&lb_svc_policy, &sid);

	return pol ? (__u64)pol->affinity_s * NS_PER_S : 0;
}

/* Announce affinity entry `k` (backend `bid`, made at `created`) on the ring. */
static __always_inline void affinity_event(const struct lb_ct_key *k, __u32 bid, __u64 created,
					   struct lb_stats *st)
{
	struct lb_flow_event ev = {
		.key = *k,
		.backend_id = bid,
		.flags = LB_CT_F_AFFINITY,
		.origin = (__u16)lb_node_id,
		.created_ns = created,
	};
	if (bpf_ringbuf_output(&lb_flow_events, &ev, sizeof(ev), 0))
		stat_add(st, LB_STAT_RING_LOST, 1);
}

/* Refresh a fresh affinity entry's last_seen; announce it when due. */
static __always_inline void affinity_refresh(const struct lb_ct_key *k, struct lb_ct_val *a,
					     __u64 now, __u64 timeout, struct lb_stats *st)
{
	__u64 last = a->last_seen_ns;

	if (now <= last || now - last <= lb_ct_refresh_ns)
		return;
	a->last_seen_ns = now;
	/* (ranges_gen: an affinity entry is no flow; its last announcement, in s.) */
	__u64 announced = (__u64)a->ranges_gen * NS_PER_S;
	if (now - announced <= timeout / 4)
		return;
	a->origin = (__u16)lb_node_id;
	a->flags &= ~LB_CT_F_REMOTE;
	a->ranges_gen = (__u32)(now / NS_PER_S);
	affinity_event(k, a->backend_id, a->created_ns, st);
}

/*
 * A flow of a service with affinity refreshed its entry: refresh its
 * client's affinity entry too, if it still names the flow's backend. Out of
 * line: once per refresh interval per flow at most, with a key of its own.
 */
static __noinline int affinity_touch(const struct lb_ct_key *flow, __u32 bid, __u64 now)
{
	struct lb_ct_key k = *flow;
	const struct lb_backend *be = backend_get(bid);

	if (!be || !be->svc_ref)
		return 0;
	__u64 timeout = affinity_timeout(be->svc_ref - 1);

	k.sport = 0;
	k.pad = LB_CT_PAD_AFFINITY;
	struct lb_ct_val *a = bpf_map_lookup_elem(&lb_conntrack, &k);
	if (a && (a->flags & LB_CT_F_AFFINITY) && a->backend_id == bid && timeout)
		affinity_refresh(&k, a, now, timeout, stats_get());
	return 0;
}

/*
 * The backend of a new flow of affinity service `svc` (stats slot `sid`):
 * its client's, or a pick by the client's address alone; with `make`, a
 * new pick writes the client's entry (an ICMP error or a flooded SYN makes
 * no state). Returns the backend id, or LB_NO_BACKEND when the service has
 * no active backend. Out of line: the key needs a frame of its own.
 */
static __noinline __u32 affinity_pick(const struct pkt *p, const struct lb_svc *svc, __u32 sid,
				      __u64 now, int make)
{
	struct lb_stats *st = stats_get();
	__u64 timeout = affinity_timeout(sid);
	struct lb_ct_key k = p->flow;

	k.sport = 0;
	k.pad = LB_CT_PAD_AFFINITY;
	struct lb_ct_val *a = bpf_map_lookup_elem(&lb_conntrack, &k);
	if (a && (a->flags & LB_CT_F_AFFINITY)) {
		const struct lb_backend *be = backend_get(a->backend_id);
		__u64 last = a->last_seen_ns;

		if (!be || be->state != LB_BACKEND_ACTIVE || be->svc_ref != sid + 1) {
			stat_add(st, LB_STAT_AFFINITY_RELEASED, 1);
		} else if (now > last && now - last > timeout) {
			stat_add(st, LB_STAT_AFFINITY_EXPIRED, 1);
		} else {
			if (make)
				affinity_refresh(&k, a, now, timeout, st);
			stat_add(st, LB_STAT_AFFINITY_HITS, 1);
			return a->backend_id;
		}
	}
	if (svc->ring_size == 0)
		return LB_NO_BACKEND;
	__u32 idx = svc->ring_base + lb_flow_hash(&k, lb_hash_seed) % svc->ring_size;
	__u32 *slot = bpf_map_lookup_elem(&lb_maglev, &idx);

	if (!slot || *slot == LB_NO_BACKEND)
		return LB_NO_BACKEND;
	__u32 bid = *slot;
	const struct lb_backend *be = backend_get(bid);
	if (!be || be->state != LB_BACKEND_ACTIVE)
		return LB_NO_BACKEND;
	if (!make)
		return bid;

	struct lb_ct_val val = {
		.backend_id = bid,
		.flags = LB_CT_F_AFFINITY | LB_CT_F_SHARED, /* always announced */
		.origin = (__u16)lb_node_id,
		.created_ns = now,
		.last_seen_ns = now,
		.ranges_gen = (__u32)(now / NS_PER_S),
	};
	if (bpf_map_update_elem(&lb_conntrack, &k, &val, BPF_ANY) == 0) {
		affinity_event(&k, bid, now, st);
		stat_add(st, LB_STAT_AFFINITY_NEW, 1);
	}
	return bid;
}

#endif /* LB_AFFINITY_H */
