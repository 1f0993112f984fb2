/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * ct_share.h - a divergent service's table change, in the kernel: find this
 * node's entries that the service's other table (lb_svc_alt: the prepared
 * next table) would send to another backend, and announce them.
 *
 * A divergent service announces only the entries that a peer finding none
 * could pick differently (ct_share in ct.h). Its entries made under the
 * current table match that table; before the next one goes live, those it
 * would send elsewhere must reach the peers, or a node that dies after the
 * switch leaves their flows to a survivor that picks anew. The agent runs
 * holdfast_ct_share with BPF_PROG_TEST_RUN once the next tables are in
 * lb_svc_alt: one bpf_for_each_map_elem walk over conntrack in the kernel
 * (no dump to userspace), which marks each such entry SHARED and writes it
 * on the ring with the SHARED flag, which the agent reads as "an entry
 * made earlier, announced now" (its last_seen: the announcement's time).
 * An entry whose record does not fit the ring stays unmarked and is
 * counted; the agent runs the walk again once the ring drained.
 */
#ifndef LB_CT_SHARE_H
#define LB_CT_SHARE_H

#include "lb_maps.h"
#include "jhash.h"

struct ct_share_ctx {
	struct lb_share_report r;
};

struct bpf_map;

static long ct_share_entry(struct bpf_map *map, const struct lb_ct_key *key, struct lb_ct_val *v,
			   struct ct_share_ctx *c)
{
	c->r.visited++;
	/* Own, not yet shared (SNAT and affinity entries always are). */
	if (v->origin != (__u16)lb_node_id || (v->flags & (LB_CT_F_SHARED | LB_CT_F_REMOTE)))
		return 0;
	__u32 bid = v->backend_id;
	const struct lb_backend *be = bpf_map_lookup_elem(&lb_backends, &bid);
	if (!be || !be->svc_ref)
		return 0;
	__u32 sid = be->svc_ref - 1;
	const struct lb_svc_alt *alt = bpf_map_lookup_elem(&lb_svc_alt, &sid);
	if (!alt || !alt->size)
		return 0;
	if (alt->size != LB_ALT_ALL) {
		__u32 idx = alt->base + lb_flow_hash(key, lb_hash_seed) % alt->size;
		const __u32 *slot = bpf_map_lookup_elem(&lb_maglev, &idx);
		if (slot && *slot == bid)
			return 0;
	}
	struct lb_flow_event ev = {
		.key = *key,
		.backend_id = bid,
		.flags = v->flags | LB_CT_F_SHARED,
		.origin = v->origin,
		.created_ns = v->created_ns,
	};
	if (bpf_ringbuf_output(&lb_flow_events, &ev, sizeof(ev), 0)) {
		c->r.ring_full++;
		return 0;
	}
	v->flags |= LB_CT_F_SHARED;
	c->r.shared++;
	return 0;
}

/*
 * One walk; the report (struct lb_share_report) is written over the
 * packet, which must hold it. XDP_PASS, or XDP_ABORTED for a short packet.
 */
SEC("xdp")
int holdfast_ct_share(struct xdp_md *ctx)
{
	struct ct_share_ctx c = {};

	bpf_for_each_map_elem(&lb_conntrack, ct_share_entry, &c, 0);

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_share_report *r = data;
	if ((void *)(r + 1) > data_end)
		return XDP_ABORTED;
	*r = c.r;
	return XDP_PASS;
}

#endif /* LB_CT_SHARE_H */
