#!/usr/bin/env bash
# The whole test suite, as CI runs it: format, lints, then every test of the
# workspace (the datapath and lab tests need root: BPF and network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
if cargo tree -i aws-lc-sys >/dev/null 2>&1; then
  echo "aws-lc-sys is in the dependency tree: keep default features off on rustls/quinn/rcgen" >&2
  exit 1
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary of the run.
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
