#!/usr/bin/env bash
# Rebuild time: a one-line change in appliance/ to new images, warm (scripts/build-images).
#
#   bench/rebuild.sh                  # 3 changes, default cluster (the README's main command)
#   ROUNDS=5 BUILD_ARGS=--generic bench/rebuild.sh
#   PROFILE=--dist bench/rebuild.sh   # the shipping profile, for comparison
#
# Warms up with one untimed build, then per round changes one line of appliance/src/init.rs
# (a log message: the binary changes, so every image does) and runs scripts/build-images,
# which prints its cargo and image-builder times; image-builder's own step lines give the
# breakdown of the second part. The file is restored at the end (and rebuilt, untimed).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
ROUNDS=${ROUNDS:-3}
PROFILE=${PROFILE:-}
read -r -a build_args <<<"${BUILD_ARGS:-}"
file=appliance/src/init.rs
needle='"PID 1 started"'
grep -q "$needle" "$file" || { echo "rebuild: $needle not in $file" >&2; exit 1; }
backup=$(mktemp)
cp "$file" "$backup"
restore() { cp "$backup" "$file"; rm -f "$backup"; }
trap restore EXIT

build() { scripts/build-images $PROFILE "${build_args[@]}" 2>&1; }
echo "warm-up build (untimed)..." >&2
build >/dev/null
echo "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq "$ROUNDS"); do
    sed -i "s/$needle/\"PID 1 started (rebuild bench $r $$)\"/" "$file"
    out=$(build)
    cp "$backup" "$file"
    echo "round $r: $(grep '^build-images' <<<"$out")"
    grep -E '^\[[ 0-9]+/[0-9]+\] .*: done in' <<<"$out" | awk '{
        sub(/^\[[ 0-9]+\/[0-9]+\] /, ""); sub(/ \(total.*/, ""); print "    " $0 }'
done
echo "restoring $file (untimed rebuild)..." >&2
build >/dev/null
