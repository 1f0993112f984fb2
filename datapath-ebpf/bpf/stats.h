/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * stats.h - per-CPU counters. The datapath never logs; it counts, and the
 * node exports the sums as metrics. Per-CPU slots need no atomics.
 */
#ifndef LB_STATS_H
#define LB_STATS_H

#include "lb_maps.h"

static __always_inline struct lb_stats *stats_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&lb_stats, &zero);
}

static __always_inline void stat_add(struct lb_stats *st, enum lb_stat idx, __u64 n)
{
	if (st)
		st->c[idx] += n;
}

static __always_inline void svc_stat_add(struct lb_svc_stats *ss, enum lb_svc_stat idx, __u64 n)
{
	if (ss)
		ss->c[idx] += n;
}

#endif /* LB_STATS_H */
