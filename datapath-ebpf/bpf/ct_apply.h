/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * ct_apply.h - the merge rule, and the program that applies a batch of
 * peers' conntrack entries with it in the kernel.
 *
 * The merge rule (the only copy: replication applies every peer entry
 * through holdfast_ct_apply, and tests/ct_apply.rs checks its properties).
 * An entry is named by its creation, (created_ns, origin): the later
 * created is the newer, the lower origin on equal times. Its route is
 * (backend, SNAT binding).
 *
 *  1. No local entry: store the peer's, marked REMOTE (unless it is this
 *     node's own, coming back after a restart).
 *  2. Same route: one flow, forwarded alike - keep it under the newer
 *     name, take the later last_seen; CLOSING as the newer name has it
 *     (both copies' if it is one entry). So an affinity entry that another
 *     node announces again, or a flow that two nodes each made an entry
 *     for, merges instead of one node's copy being refused.
 *  3. Another route: the newer entry wins whole - the newer connection on
 *     a reused tuple, or a re-pick after a backend was removed. A peer's
 *     entry never overrides a newer local one.
 *
 * Whatever order the copies of a flow's entries come in, every node ends
 * with the newest name and its route (tests/ct_apply.rs checks it over
 * random histories), so no two nodes forward an established flow apart.
 *
 * Why a program: one BPF_PROG_TEST_RUN applies up to LB_CT_BATCH_MAX
 * entries (one lookup and at most one write each, inside the kernel),
 * where the agent paid a syscall per entry (two or three for an existing
 * one). docs/benchmarks.md has the figures (sync-bench --apply).
 */
#ifndef LB_CT_APPLY_H
#define LB_CT_APPLY_H

#include "lb_maps.h"

enum ct_merge {
	CT_MERGE_STORE = 0, /* write *out */
	CT_MERGE_KEEP,      /* the local entry stays as it is */
	CT_MERGE_REJECT,    /* the local entry is newer */
};

/*
 * What to store for a peer's entry `remote` given the local entry `l`
 * (NULL: none). For CT_MERGE_STORE, *out is the value to write.
 */
static __always_inline enum ct_merge ct_merge(const struct lb_ct_val *l,
					      const struct lb_ct_val *remote,
					      struct lb_ct_val *out)
{
	if (!l) {
		*out = *remote;
		if (remote->origin != (__u16)lb_node_id)
			out->flags |= LB_CT_F_REMOTE;
		return CT_MERGE_STORE;
	}
	int remote_newer = remote->created_ns > l->created_ns ||
			   (remote->created_ns == l->created_ns && remote->origin < l->origin);
	if (l->backend_id == remote->backend_id &&
	    (l->flags & LB_CT_F_SNAT) == (remote->flags & LB_CT_F_SNAT) &&
	    l->snat_slot == remote->snat_slot && l->snat_port == remote->snat_port) {
		*out = *l;
		if (remote_newer) {
			out->created_ns = remote->created_ns;
			out->origin = remote->origin;
			out->flags = remote->flags;
			if (remote->origin != (__u16)lb_node_id)
				out->flags |= LB_CT_F_REMOTE;
		} else if (remote->created_ns == l->created_ns && remote->origin == l->origin) {
			out->flags |= remote->flags & LB_CT_F_CLOSING;
		}
		if (remote->last_seen_ns > out->last_seen_ns)
			out->last_seen_ns = remote->last_seen_ns;
		if (out->last_seen_ns == l->last_seen_ns && out->flags == l->flags &&
		    out->created_ns == l->created_ns && out->origin == l->origin)
			return CT_MERGE_KEEP;
		return CT_MERGE_STORE;
	}
	if (remote_newer) {
		*out = *remote;
		if (remote->origin != (__u16)lb_node_id)
			out->flags |= LB_CT_F_REMOTE;
		return CT_MERGE_STORE;
	}
	return CT_MERGE_REJECT;
}

/* Apply one entry; returns the counter of struct lb_ct_batch it adds to. */
enum ct_apply_result {
	CT_APPLIED = 0,
	CT_UNCHANGED,
	CT_REJECTED,
	CT_FAILED,
};

static __always_inline enum ct_apply_result ct_apply_one(const struct lb_ct_key *key,
							 const struct lb_ct_val *remote)
{
	struct lb_ct_val out;

	/* Twice at most: a datapath CPU may create the flow's entry between
	 * our lookup and our BPF_NOEXIST insert; then it is merged with. */
	for (int attempt = 0; attempt < 2; attempt++) {
		struct lb_ct_val *l = bpf_map_lookup_elem(&lb_conntrack, key);

		switch (ct_merge(l, remote, &out)) {
		case CT_MERGE_KEEP:
			return CT_UNCHANGED;
		case CT_MERGE_REJECT:
			return CT_REJECTED;
		case CT_MERGE_STORE:
			break;
		}
		if (l && l->created_ns == out.created_ns && l->origin == out.origin) {
			/* Same entry, later last_seen / CLOSING: in place, as
			 * the datapath refreshes it. */
			l->last_seen_ns = out.last_seen_ns;
			l->flags = out.flags;
			return CT_APPLIED;
		}
		int err = bpf_map_update_elem(&lb_conntrack, key, &out, l ? BPF_ANY : BPF_NOEXIST);
		if (!err)
			return CT_APPLIED;
		if (err != -17 /* EEXIST */)
			return CT_FAILED;
	}
	return CT_FAILED;
}

struct ct_apply_ctx {
	struct xdp_md *xdp;
	__u32 applied;
	__u32 unchanged;
	__u32 rejected;
	__u32 failed;
};

static long ct_apply_entry(__u64 i, void *arg)
{
	struct ct_apply_ctx *c = arg;
	void *data = (void *)(long)c->xdp->data;
	void *data_end = (void *)(long)c->xdp->data_end;

	if (i >= LB_CT_BATCH_MAX)
		return 1;
	void *e = data + sizeof(struct lb_ct_batch) + i * LB_CT_BATCH_ENTRY;
	if (e + LB_CT_BATCH_ENTRY > data_end)
		return 1;
	struct lb_ct_key key;
	struct lb_ct_val val;
	__builtin_memcpy(&key, e, sizeof(key));
	__builtin_memcpy(&val, e + sizeof(key), sizeof(val));
	switch (ct_apply_one(&key, &val)) {
	case CT_APPLIED:
		c->applied++;
		break;
	case CT_UNCHANGED:
		c->unchanged++;
		break;
	case CT_REJECTED:
		c->rejected++;
		break;
	default:
		c->failed++;
		break;
	}
	return 0;
}

/*
 * Apply the batch in the packet (struct lb_ct_batch, then the entries).
 * XDP_PASS with the counts filled in, or XDP_ABORTED for a malformed batch
 * (nothing applied). Never attached to an interface: the agent runs it with
 * BPF_PROG_TEST_RUN (the packet is its own copy).
 */
SEC("xdp")
int holdfast_ct_apply(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_ct_batch *b = data;

	if ((void *)(b + 1) > data_end)
		return XDP_ABORTED;
	__u32 n = b->count;
	if (n > LB_CT_BATCH_MAX ||
	    (__u64)(data_end - data) < sizeof(*b) + (__u64)n * LB_CT_BATCH_ENTRY)
		return XDP_ABORTED;

	struct ct_apply_ctx c = { .xdp = ctx };
	bpf_loop(n, ct_apply_entry, &c, 0);

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	b = data;
	if ((void *)(b + 1) > data_end)
		return XDP_ABORTED;
	b->applied = c.applied;
	b->unchanged = c.unchanged;
	b->rejected = c.rejected;
	b->failed = c.failed;
	return XDP_PASS;
}

#endif /* LB_CT_APPLY_H */
