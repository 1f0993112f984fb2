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
 * SYN floods: while a CPU sees more new SYNs than the configured rate, a
 * SYN is forwarded by Maglev and makes no entry (nor event); the
 * handshake's first non-SYN packet (the client's ACK) picks the same
 * backend and makes the entry. Spoofed SYNs, which never complete, thus
 * cannot evict established flows here nor fill the peers' maps. (A half-open
 * table for flooded SYNs was measured: its inserts cost 40-250 ns more per
 * SYN than no state, by its size; see docs/architecture.md.)
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
						      __u32 *bid, __u32 *hash)
{
	if (svc->ring_size == 0)
		return NULL;
	*hash = lb_flow_hash(&p->flow, lb_hash_seed);
	__u32 idx = svc->ring_base + *hash % svc->ring_size;
	__u32 *slot = bpf_map_lookup_elem(&lb_maglev, &idx);

	if (!slot || *slot == LB_NO_BACKEND)
		return NULL;
	*bid = *slot;
	struct lb_backend *be = backend_get(*bid);
	if (!be || be->state != LB_BACKEND_ACTIVE)
		return NULL;
	return be;
}

/*
 * Whether a new entry of service `svc` must be announced to peers. Always,
 * unless the service is divergent (LB_SVC_F_DIVERGENT): then only if a
 * peer that finds no entry could pick another backend - a SNAT entry
 * (its binding is this node's), a backend that is not the current table's
 * pick `mbid` (client affinity), or one the service's other table (the
 * prepared next one, or the previous one just after a switch) would not
 * pick. `hash` is the flow's Maglev hash.
 */
static __always_inline int ct_share(const struct lb_svc *svc, __u32 bid, __u32 mbid, __u32 hash,
				    __be16 snat_port)
{
	if (!(svc->flags & LB_SVC_F_DIVERGENT) || snat_port || bid != mbid)
		return 1;
	__u32 sid = svc->id;
	const struct lb_svc_alt *alt = bpf_map_lookup_elem(&lb_svc_alt, &sid);

	if (!alt || !alt->size)
		return 0;
	if (alt->size == LB_ALT_ALL)
		return 1;
	__u32 idx = alt->base + hash % alt->size;
	const __u32 *slot = bpf_map_lookup_elem(&lb_maglev, &idx);

	return !slot || *slot != bid;
}

/*
 * Write a new entry for p->flow (flags `ct_flags`) and, if `share`, mark it
 * SHARED and announce it. A SNAT entry (snat_port != 0) carries its
 * binding: this node's slot and the port; its ring record carries the port
 * in the key's pad (peers know every node's slot). Returns the map
 * update's result.
 */
static __always_inline int ct_create(const struct pkt *p, __u32 bid, __u64 now, __u16 ct_flags,
				     struct lb_stats *st, struct lb_svc_stats *ss, __be16 snat_port,
				     __u16 snat_slot, int share)
{
	struct lb_ct_val val = {
		.backend_id = bid,
		.flags = ct_flags | (snat_port ? LB_CT_F_SNAT : 0) | (share ? LB_CT_F_SHARED : 0),
		.origin = (__u16)lb_node_id,
		.created_ns = now,
		.last_seen_ns = now,
		.snat_port = snat_port,
		.snat_slot = snat_slot,
	};
	int err = bpf_map_update_elem(&lb_conntrack, &p->flow, &val, BPF_ANY);
	if (err)
		return err;

	stat_add(st, LB_STAT_NEW_FLOWS, 1);
	svc_stat_add(ss, LB_SVC_NEW_FLOWS, 1);
	if (!share)
		return 0;
	/* (SHARED stays off the record: on the ring it marks an entry made
	 * earlier and shared now, see holdfast_ct_share.) */
	struct lb_flow_event ev = {
		.key = p->flow,
		.backend_id = bid,
		.flags = (val.flags & ~LB_CT_F_SHARED) | (snat_slot << 8),
		.origin = val.origin,
		.created_ns = now,
	};
	ev.key.pad = snat_port;
	if (bpf_ringbuf_output(&lb_flow_events, &ev, sizeof(ev), 0))
		stat_add(st, LB_STAT_RING_LOST, 1);
	return 0;
}

/*
 * An own entry turned CLOSING (client FIN or RST): announced on the ring like
 * a new flow, with the CLOSING flag, so that peers' copies expire after the
 * closing timeout too (the merge rule takes the flag) without a refresh round.
 */
static __always_inline void ct_closing_event(const struct lb_ct_key *key,
					     const struct lb_ct_val *ct,
					     struct lb_stats *st)
{
	struct lb_flow_event ev = {
		.key = *key,
		.backend_id = ct->backend_id,
		.flags = LB_CT_F_CLOSING | (ct->flags & LB_CT_F_SNAT) |
			 ((ct->flags & LB_CT_F_SNAT) ? ct->snat_slot << 8 : 0),
		.origin = ct->origin,
		.created_ns = ct->created_ns,
	};
	ev.key.pad = ct->snat_port;
	if (bpf_ringbuf_output(&lb_flow_events, &ev, sizeof(ev), 0))
		stat_add(st, LB_STAT_RING_LOST, 1);
}

/*
 * SYN flood detection, per CPU: a SYN that would create state counts in the
 * current window; this CPU is flooded while the current or the previous
 * window holds more than lb_syn_window_max of them. So at the onset of a
 * flood at most lb_syn_window_max SYNs per CPU reach conntrack, and flood
 * mode ends one to two windows after the flood does.
 */
static __always_inline int syn_flood(__u64 now)
{
	__u32 zero = 0;
	struct lb_syn_rate *r;

	if (!lb_syn_window_max)
		return 0;
	r = bpf_map_lookup_elem(&lb_syn_rate, &zero);
	if (!r)
		return 0;
	__u64 age = now - r->window_ns;
	if (age >= lb_syn_window_ns) {
		r->prev = age < 2 * lb_syn_window_ns ? r->count : 0;
		r->window_ns = now;
		r->count = 0;
	}
	r->count++;
	return r->count > lb_syn_window_max || r->prev > lb_syn_window_max;
}

/*
 * Whether this CPU is in SYN flood mode, without counting a SYN: the
 * state syn_flood() would return (the current window, or the previous one
 * if the current has not been opened yet).
 */
static __always_inline int cpu_flooded(__u64 now)
{
	__u32 zero = 0;
	struct lb_syn_rate *r;

	if (!lb_syn_window_max)
		return 0;
	r = bpf_map_lookup_elem(&lb_syn_rate, &zero);
	if (!r)
		return 0;
	__u64 age = now - r->window_ns;
	if (age >= 2 * lb_syn_window_ns)
		return 0;
	if (age >= lb_syn_window_ns)
		return r->count > lb_syn_window_max;
	return r->count > lb_syn_window_max || r->prev > lb_syn_window_max;
}

/*
 * The conntrack-hit path's clock: what the agent published in lb_clock (a
 * few milliseconds of accuracy are plenty for idle timeouts, last-seen
 * refreshes and the next-hop cache; a helper call costs ~30 ns per hit on
 * SRSO-mitigated CPUs, an inlined array read nothing). On every 64th hit of
 * a CPU, and when nothing was published, the kernel's coarse clock too, the
 * later of the two: an agent that stopped publishing leaves the other 63
 * with an old time, which only makes entries look less idle (no refresh is
 * written with it: last_seen stays at the later time) — never expires or
 * re-picks a flow early.
 */
static __always_inline __u64 hit_clock(const struct lb_stats *st)
{
	__u32 zero = 0;
	const __u64 *c = bpf_map_lookup_elem(&lb_clock, &zero);
	__u64 now = c ? *c : 0;

	if (!now || !st || (st->c[LB_STAT_CT_HITS] & 63) == 0) {
		__u64 k = bpf_ktime_get_coarse_ns();

		if (k > now)
			now = k;
	}
	return now;
}

/*
 * Clocks: the conntrack-hit path reads hit_clock (above); a new entry's
 * created_ns uses the precise clock, because replication lag is measured
 * from it. All count CLOCK_MONOTONIC, so they compare.
 *
 * For TCP past its SYN the entry comes first, before the service: an
 * established flow's packet needs neither the service lookup (a hash of
 * the 20-byte service key, 20-40 ns per hit here) nor the Maglev table,
 * and its backend names its service's stats slot (lb_backend.svc_ref; a
 * backend id belongs to one service). A hit is only possible for a VIP
 * flow: entries are made for VIP flows only (here and by peers), and a
 * removed service's backends are emptied in the same apply, so its entries
 * re-pick, find no service and pass. SYNs and UDP, mostly new flows, look
 * the service up first (lb.bpf.c says why).
 *
 * (Inserting a SYN's entry with BPF_NOEXIST before any lookup was measured
 * slower on 6.18 than lookup-then-insert: LRU updates with NOEXIST cost more.)
 */

/* A TCP SYN without ACK (not quoted in an ICMP error): a new connection. */
static __always_inline int pkt_is_syn(const struct pkt *p)
{
	return p->flow.proto == IPPROTO_TCP_ && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN &&
	       !p->icmp_err;
}

/*
 * Whether the entry `ct` of p->flow is followed: its backend, or NULL with
 * *why the stat that says why it must be re-picked.
 */
static __always_inline struct lb_backend *ct_follow(const struct pkt *p, const struct lb_ct_val *ct,
						    __u64 now, enum lb_stat *why)
{
	struct lb_backend *be = backend_get(ct->backend_id);

	if (!be) {
		*why = LB_STAT_REPICK_GONE;
		return NULL;
	}
	__u64 last = ct->last_seen_ns;
	__u64 idle = now > last ? now - last : 0;
	if (p->flow.proto == IPPROTO_TCP_) {
		if (pkt_is_syn(p) && (be->state != LB_BACKEND_ACTIVE || (ct->flags & LB_CT_F_CLOSING) ||
			    idle > lb_tcp_timeout_ns)) {
			*why = LB_STAT_REPICK_STALE;
			return NULL;
		}
	} else if (idle > lb_udp_timeout_ns) {
		*why = LB_STAT_REPICK_STALE;
		return NULL;
	}
	return be;
}

/*
 * The entry of p->flow, or NULL. If there is one: *now is the hit clock and
 * *be its backend if it is followed, else NULL with *why (see ct_follow).
 */
static __always_inline struct lb_ct_val *ct_find(const struct pkt *p, const struct lb_stats *st,
						 struct lb_backend **be, __u64 *now,
						 enum lb_stat *why)
{
	struct lb_ct_val *ct = bpf_map_lookup_elem(&lb_conntrack, &p->flow);

	if (ct) {
		*now = hit_clock(st);
		*be = ct_follow(p, ct, *now, why);
	}
	return ct;
}

/*
 * A followed entry: refresh last_seen, note a client's FIN/RST, count.
 * Returns whether last_seen was refreshed.
 */
static __always_inline int ct_hit(const struct pkt *p, struct lb_ct_val *ct, __u64 now,
				  struct lb_stats *st, struct lb_svc_stats *ss)
{
	int refreshed = 0;

	if (!p->icmp_err) {
		__u64 last = ct->last_seen_ns;

		if (now > last && now - last > lb_ct_refresh_ns) {
			ct->last_seen_ns = now;
			refreshed = 1;
		}
		if (p->flow.proto == IPPROTO_TCP_ && (p->tcp_flags & (TCP_FIN | TCP_RST)) &&
		    !(ct->flags & LB_CT_F_CLOSING)) {
			ct->flags |= LB_CT_F_CLOSING;
			/* Own shared entries only: peers accept a node's
			 * events for the entries it created, and hold only
			 * the shared ones. */
			if (ct->origin == (__u16)lb_node_id && (ct->flags & LB_CT_F_SHARED))
				ct_closing_event(&p->flow, ct, st);
		}
	}
	stat_add(st, LB_STAT_CT_HITS, 1);
	svc_stat_add(ss, LB_SVC_CT_HITS, 1);
	return refreshed;
}

/*
 * A new pick for p->flow (no entry, or one that is not followed: `had_ct`):
 * Maglev. *bid and *now are set; *state says what the caller writes:
 * PICK_ENTRY an entry (and, for SNAT, a binding), PICK_STATELESS nothing —
 * an ICMP error, which follows or borrows the flow's pick — or
 * PICK_FLOODED nothing either (a new flow's SYN on a flooded CPU; a SNAT
 * service binds it in the half-open table instead).
 */
enum pick_state {
	PICK_ENTRY = 0,
	PICK_STATELESS,
	PICK_FLOODED,
};

static __always_inline struct lb_backend *ct_pick(const struct pkt *p, const struct lb_svc *svc,
						  int had_ct, struct lb_stats *st,
						  struct lb_svc_stats *ss, __u32 *bid_out,
						  __u32 *hash_out, __u64 *now_out,
						  enum pick_state *state)
{
	int tcp = p->flow.proto == IPPROTO_TCP_;
	int syn = pkt_is_syn(p);
	struct lb_backend *be;
	__u64 now;
	__u32 bid;

	if (!had_ct && tcp && !syn && !p->icmp_err) {
		/* During a SYN flood, SYNs make no entry: a handshake's first
		 * non-SYN packet lands here, and is not a broken flow. */
		if (cpu_flooded(bpf_ktime_get_ns())) {
			stat_add(st, LB_STAT_FLOOD_HANDSHAKE, 1);
		} else {
			stat_add(st, LB_STAT_MIDFLOW_MISS, 1);
			svc_stat_add(ss, LB_SVC_MIDFLOW_MISS, 1);
		}
	}

	be = maglev_pick(p, svc, &bid, hash_out);
	if (!be)
		return NULL;
	now = bpf_ktime_get_ns();
	*bid_out = bid;
	*now_out = now;
	/* A new flow's SYN on a flooded CPU: forwarded by Maglev, no state (a
	 * SYN that found a stale entry re-picks it: its next packet looks there). */
	if (syn && !had_ct && syn_flood(now)) {
		stat_add(st, LB_STAT_SYN_FLOOD, 1);
		*state = PICK_FLOODED;
		return be;
	}
	/* An ICMP error never creates state: it follows or borrows the flow's pick. */
	*state = p->icmp_err ? PICK_STATELESS : PICK_ENTRY;
	return be;
}

#endif /* LB_CT_H */
