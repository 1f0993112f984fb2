#!/usr/bin/env bash
# The main job: the BGP/ECMP lab demo in network namespaces (needs root).
# A router (BIRD, ECMP, BFD), 3 LB nodes (holdfast-node + BIRD), 4 backends
# and a client with 1000 TCP connections and 200 UDP flows; shows
# `clusterctl members` and live counters, kills an LB node silently and
# shows every connection surviving; then tears everything down.
# Options go to `chaos demo` (e.g. --sync off to see what replication prevents).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p chaos -p clusterctl
exec target/release/chaos demo "$@"
