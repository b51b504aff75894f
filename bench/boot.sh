#!/usr/bin/env bash
# Boot to serving under QEMU, as a user powering a node on sees it.
#
#   bench/boot.sh                     # server1 alone, 3 boots (the first, then 2 more)
#   BOOTS=5 NODES="server1 server2" bench/boot.sh
#
# Builds the images if target/images lacks them (scripts/build-images), then runs
# `tandem-qemu boot-time`: per boot, the host's wall time from QEMU's start to the kernel's
# banner, PID 1's first line, "system up", each service ready (as the supervisor reports it
# on the serial console) and the first 200 of https://<node>/node.html (balancer → nginx).
# Each node boots alone on a fresh overlay: its first boot makes the data partition, keys and
# the database. Accelerator: TCG unless a probe proves KVM works (see qemu/src/accel.rs).
#
# Talks only to the VM inside the bench's own network namespace. Not a test: it reports.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export PATH="$HOME/.cargo/bin:$PATH"
BOOTS=${BOOTS:-3}
NODES=${NODES:-server1}
cargo build -q --release --locked -p qemu
if [[ ! -e target/images/server1.qcow2 ]]; then
    scripts/build-images
fi
args=()
for n in $NODES; do args+=(--node "$n"); done
echo "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) before the run" >&2
exec target/release/tandem-qemu boot-time --images target/images --boots "$BOOTS" "${args[@]}"
