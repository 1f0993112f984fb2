#!/usr/bin/env bash
# The main job: the local lab demo in network namespaces (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo run --release -p chaos --bin datapath-demo -- "$@"
