#!/usr/bin/env bash
# The floating IP's failover as a client sees it.
#
#   bench/vip-failover.sh                     # 5 trials, default cluster
#   TRIALS=10 bench/vip-failover.sh
#   CONFIG=my-cluster.toml bench/vip-failover.sh --settle 60   # extra args go to the subcommand
#
# Builds the release binaries and the images (scripts/build-images), boots the cluster in QEMU
# (`tandem-qemu failover`, run dir target/qemu-failover), waits until every node serves and one
# holds the floating IP, then per trial: a client in the cluster's namespace GETs
# https://<floating IP>/node.html every 20 ms (new TCP+TLS connection each, 1 s timeout), the
# holder's VM is killed (SIGKILL to QEMU: a power cut) after 3 s, probing goes on 5 s, and the
# node is started again (does the address move back?). Prints each trial's longest gap between
# two answers, failures, holders before/after, then the median and max gap.
#
# Exits non-zero when a trial left no new holder. Needs root (namespaces, taps). Sends traffic
# only inside the cluster's private namespace. Not a test: it asserts nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
config=()
if [[ -n ${CONFIG:-} ]]; then config=(--config "$CONFIG"); fi
scripts/build-images "${config[@]}"
exec target/release/tandem-qemu failover --trials "${TRIALS:-5}" "${config[@]}" "$@"
