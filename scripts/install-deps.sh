#!/usr/bin/env bash
# Installs what Holdfast needs on a Debian bookworm machine, idempotently:
# only missing packages are installed, and apt-get update runs only then.
set -euo pipefail

PACKAGES=(clang-19 llvm-19 libbpf-dev bpftool iproute2 ethtool linux-libc-dev procps nftables conntrackd conntrack bird2 frr frr-pythontools systemd iputils-ping)

# Sourced by the README's two scripts: from a user's shell they run again
# as root through sudo (BPF programs, network namespaces and apt-get need
# root); a root shell, where sudo is often absent, runs them directly.
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    echo "install-deps: not root; running $0 again through sudo" >&2
    exec sudo env "PATH=$PATH" bash "$0" "$@"
  fi
  echo "install-deps: run as root (BPF programs, network namespaces, apt-get); there is no sudo here" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "install-deps: no Rust toolchain (cargo) found; install Rust 1.95 with rustup" >&2
    exit 1
  fi
fi

# bpffs for pinned maps and links.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
