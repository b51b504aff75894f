#!/usr/bin/env bash
# The floating IP left alone: does it stay put?
#
#   bench/vip-soak.sh                         # 10 minutes, default cluster
#   MINUTES=60 bench/vip-soak.sh
#   CONFIG=my-cluster.toml bench/vip-soak.sh   # extra args go to the subcommand
#
# Builds the release binaries and the images (scripts/build-images), boots the cluster in QEMU
# (`tandem-qemu soak`, run dir target/qemu-soak), waits until every node serves, then a client in
# the cluster's namespace GETs https://<floating IP>/node.html every 20 ms for MINUTES while the
# holder is looked up by ARP every 5 s. Nothing is killed, so every holder change is a spurious
# failover. A progress line every 30 s; at the end: requests, failures, longest gap between two
# answers, holder changes (and looks with nobody or several holders).
#
# Needs root (namespaces, taps). Sends traffic only inside the cluster's private namespace.
# Not a test: it asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
config=()
if [[ -n ${CONFIG:-} ]]; then config=(--config "$CONFIG"); fi
scripts/build-images "${config[@]}"
exec target/release/tandem-qemu soak --minutes "${MINUTES:-10}" "${config[@]}" "$@"
