/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/* csum.h - Internet checksum helpers. */
#ifndef LB_CSUM_H
#define LB_CSUM_H

#include <linux/types.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Checksum of a 20-byte IPv4 header (no options) whose check field is 0. */
static __always_inline __u16 ipv4_hdr_csum(const struct iphdr *iph)
{
	const __u16 *w = (const __u16 *)iph;
	__u64 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(struct iphdr) / 2); i++)
		sum += w[i];
	return csum_fold(sum);
}

/*
 * Incremental updates (RFC 1624): a change of 16-bit words adds ~old + new
 * to a one's-complement accumulator; csum_apply folds it into a checksum
 * field. Words are taken as they lie in memory (network order both ways),
 * so no byte swapping is needed.
 */
static __always_inline __u64 csum_word(__u64 acc, __u16 old, __u16 new)
{
	return acc + (__u16)~old + new;
}

/*
 * Accumulate the change of an address: 4 bytes (IPv4) or 16 (IPv6), in
 * 32-bit words (a one's-complement sum folds the same from 32 bits).
 */
static __always_inline __u64 csum_addr(__u64 acc, const void *old, const void *new, const int len)
{
	const __u32 *o = old, *n = new;

#pragma unroll
	for (int i = 0; i < len / 4; i++)
		acc += (__u64)(__u32)~o[i] + n[i];
	return acc;
}

/* The checksum field `check` after the changes in `acc` (a 64-bit sum). */
static __always_inline __u16 csum_apply(__u16 check, __u64 acc)
{
	__u64 s = (__u16)~check + acc;

	s = (s & 0xffffffff) + (s >> 32);
	return csum_fold(s);
}

#endif /* LB_CSUM_H */
