/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * jhash.h - Bob Jenkins' lookup3 hash (public domain), as in the Linux
 * kernel's include/linux/jhash.h, and the flow hash built on it.
 *
 * The flow hash must be identical on every LB node so that every node picks
 * the same backend for a new flow: it depends only on the 5-tuple and the
 * cluster-wide seed. src/hash.rs mirrors it bit for bit (tested).
 */
#ifndef LB_JHASH_H
#define LB_JHASH_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include "include/lb_abi.h"

#define JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

#define __jhash_mix(a, b, c)                                                   \
	{                                                                      \
		a -= c;                                                        \
		a ^= rol32(c, 4);                                              \
		c += b;                                                        \
		b -= a;                                                        \
		b ^= rol32(a, 6);                                              \
		a += c;                                                        \
		c -= b;                                                        \
		c ^= rol32(b, 8);                                              \
		b += a;                                                        \
		a -= c;                                                        \
		a ^= rol32(c, 16);                                             \
		c += b;                                                        \
		b -= a;                                                        \
		b ^= rol32(a, 19);                                             \
		a += c;                                                        \
		c -= b;                                                        \
		c ^= rol32(b, 4);                                              \
		b += a;                                                        \
	}

#define __jhash_final(a, b, c)                                                 \
	{                                                                      \
		c ^= b;                                                        \
		c -= rol32(b, 14);                                             \
		a ^= c;                                                        \
		a -= rol32(c, 11);                                             \
		b ^= a;                                                        \
		b -= rol32(a, 25);                                             \
		c ^= b;                                                        \
		c -= rol32(b, 16);                                             \
		a ^= c;                                                        \
		a -= rol32(c, 4);                                              \
		b ^= a;                                                        \
		b -= rol32(a, 14);                                             \
		c ^= b;                                                        \
		c -= rol32(b, 24);                                             \
	}

static __always_inline __u32 jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += JHASH_INITVAL + (3 << 2) + initval;
	b += JHASH_INITVAL + (3 << 2) + initval;
	c += JHASH_INITVAL + (3 << 2) + initval;
	__jhash_final(a, b, c);
	return c;
}

/* jhash2 over exactly 9 words (IPv6 addresses + ports). */
static __always_inline __u32 jhash_9words(const __u32 *k, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + (9 << 2) + initval;
	a += k[0];
	b += k[1];
	c += k[2];
	__jhash_mix(a, b, c);
	a += k[3];
	b += k[4];
	c += k[5];
	__jhash_mix(a, b, c);
	a += k[6];
	b += k[7];
	c += k[8];
	__jhash_final(a, b, c);
	return c;
}

/* Words are the key's bytes read as native (little-endian) u32s. */
static __always_inline __u32 lb_flow_hash(const struct lb_ct_key *k, __u32 seed)
{
	const __u32 *s = (const __u32 *)k->saddr;
	const __u32 *d = (const __u32 *)k->daddr;
	__u32 ports = *(const __u32 *)&k->sport;
	__u32 init = seed ^ k->proto;

	if (k->family == LB_FAMILY_V4)
		return jhash_3words(s[0], d[0], ports, init);

	__u32 w[9] = {s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], ports};
	return jhash_9words(w, init);
}

#endif /* LB_JHASH_H */
