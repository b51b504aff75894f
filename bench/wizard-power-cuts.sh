#!/usr/bin/env bash
# Power cuts at many moments of a first-boot setup: runs the end-to-end wizard scenario
# (tests/e2e/wizard.rs) once per delay, the VM hard-killed that many milliseconds after the
# serial wizard's last answer (before, during or after the settings service's check and its
# one transaction). Each boot after the cut must come up in the wizard (nothing stored) or fully
# configured, never half; the scenario says which, and completes the setup either way.
# CI runs the same scenario with the cut at once (0 ms).
#   DELAYS=0,1500,4000 bench/wizard-power-cuts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DELAYS=${DELAYS:-0,250,500,1000,1500,2000,3000,5000}
scripts/build-images --generic
start=$SECONDS
status=0
results=()
for ms in ${DELAYS//,/ }; do
    log=$(mktemp)
    if TANDEM_SETUP_CUT_MS=$ms TANDEM_IMAGES="$PWD/target/images" \
        cargo test --locked -p tests --test e2e a_generic_image -- --nocapture >"$log" 2>&1; then
        outcome=$(grep -o 'STILL IN THE WIZARD\|FULLY CONFIGURED' "$log" | head -1)
    else
        outcome="FAILED (log: $log)"
        status=1
    fi
    results+=("cut ${ms} ms after the last answer: ${outcome}")
    echo "${results[-1]}"
done
echo "wizard power cuts: $((SECONDS - start)) s"
printf '%s\n' "${results[@]}"
exit $status
