// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * nop.bpf.c - a trivial XDP program. The benchmark subtracts its cost (the
 * test-run harness overhead) from the load balancer's; the lab attaches it to
 * veth peers so that XDP_TX / redirect into them has a NAPI context.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int holdfast_nop(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
