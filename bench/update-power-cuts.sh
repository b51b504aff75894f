#!/usr/bin/env bash
# Power cuts at many moments of an install: runs the end-to-end update scenario
# (tests/e2e/updates.rs) with the VM hard-killed at each fraction of the payload bytes
# verified and written (default: 2 % to 98 %, 11 moments; the root filesystem is the first
# ~97 %, kernel and initrd the rest), each followed by a boot that must come up on the old slot
# with the new one empty. CI runs the same scenario with three moments.
#   CUTS=0.05,0.5,0.95 bench/update-power-cuts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
CUTS=${CUTS:-0.02,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.98}
scripts/build-images
scripts/build-test-bundles
start=$SECONDS
status=0
TANDEM_POWER_CUTS=$CUTS TANDEM_IMAGES="$PWD/target/images" \
    cargo test --locked -p tests --test e2e updates -- --nocapture || status=$?
echo "power cuts at $CUTS: $((SECONDS - start)) s, exit $status (the scenario stops at the first cut that does not boot the old slot)"
exit $status
