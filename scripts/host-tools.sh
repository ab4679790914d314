#!/usr/bin/env bash
# The tools the multi-host topology (tests/support/topology.py, benchmarks/topology.py) needs:
# `ip` (iproute2) for network namespaces and veths, `nsenter` (util-linux) to run a role inside
# one, `nft` (nftables) for the firewall rules a test sets. Installs what is missing (root, apt).
set -euo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nsenter >/dev/null || missing+=(util-linux)
command -v nft >/dev/null || missing+=(nftables)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
  echo "installed ${missing[*]}"
fi
