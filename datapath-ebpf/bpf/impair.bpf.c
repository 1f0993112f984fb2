// SPDX-License-Identifier: GPL-2.0
/*
 * Link impairment for the lab (this kernel has no netem, fq or etf): a tc
 * program on a bridge port that takes the IPv4 unicast frames between two
 * hosts of one subnet (both ends in `impair_net`/`impair_mask`, neither of
 * them `impair_exclude`: the LB nodes' traffic to each other, not to the
 * router), drops `impair_loss_ppm` per million of them at random, and
 * redirects the rest to `impair_redirect_ifindex` — a veth whose other end
 * a userspace delay line reads, holds and sends back into the bridge.
 * Everything else passes untouched. Counters: matched, dropped,
 * redirected.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

volatile const __u32 impair_net = 0;  /* network address, big endian */
volatile const __u32 impair_mask = 0; /* netmask, big endian */
volatile const __u32 impair_exclude = 0; /* an address left alone (the router), big endian */
volatile const __u32 impair_loss_ppm = 0;
volatile const __u32 impair_redirect_ifindex = 0;

enum { IMPAIR_MATCHED, IMPAIR_DROPPED, IMPAIR_REDIRECTED, IMPAIR_NSTATS };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, IMPAIR_NSTATS);
	__type(key, __u32);
	__type(value, __u64);
} impair_stats SEC(".maps");

static __always_inline void count(__u32 k)
{
	__u64 *v = bpf_map_lookup_elem(&impair_stats, &k);
	if (v)
		*v += 1;
}

static __always_inline int in_net(__u32 a)
{
	return (a & impair_mask) == impair_net && a != impair_exclude;
}

SEC("classifier")
int holdfast_impair(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || (eth->h_dest[0] & 1))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (!in_net(ip->saddr) || !in_net(ip->daddr))
		return TC_ACT_OK;
	count(IMPAIR_MATCHED);
	if (impair_loss_ppm && bpf_get_prandom_u32() % 1000000 < impair_loss_ppm) {
		count(IMPAIR_DROPPED);
		return TC_ACT_SHOT;
	}
	if (impair_redirect_ifindex) {
		count(IMPAIR_REDIRECTED);
		return bpf_redirect(impair_redirect_ifindex, 0);
	}
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
