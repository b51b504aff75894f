#!/usr/bin/env bash
# What the root filesystem holds (the A/B slots' content, what an update bundle carries).
#
#   bench/size.sh
#
# Builds the root filesystem alone (`image-builder build --root-only` into a temporary
# directory, the cached Debian base reused) and prints image-builder's own count (files,
# directories and links in 4 KiB blocks, and the filesystem made for them), the blocks the
# filesystem uses (dumpe2fs), the appliance binary as installed, and the biggest directories
# of the tree. rootfs/hooks/customize.sh and rootfs/strip.txt say what is left out and why.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export PATH="$HOME/.cargo/bin:$PATH"
cargo build -q --release --locked -p appliance -p image-builder
work=$(mktemp -d /tmp/tandem-size.XXXXXX)
trap 'rm -rf "$work"' EXIT
target/release/image-builder build --root-only --out "$work" >"$work/build.log" 2>&1 ||
    { cat "$work/build.log" >&2; exit 1; }
grep -E 'of files in a' "$work/build.log" | sed 's/^ */root tree: /'
dumpe2fs -h "$work/root.ext4" 2>/dev/null | awk -F: '
    /^Block count/ {n=$2} /^Free blocks/ {f=$2} /^Block size/ {b=$2}
    END {printf "root.ext4: %.1f MiB used of %.1f MiB\n", (n-f)*b/1048576, n*b/1048576}'
key=$(sed -n 's/.*"base_cache_key": *"\([0-9a-f]*\)".*/\1/p' "$work/manifest.json")
base=$HOME/.cache/tandem/base-$key/rootfs
strip_size=$(objcopy --strip-debug target/release/appliance "$work/appliance" && stat -c %s "$work/appliance")
printf 'appliance binary as installed: %.1f MiB\n' "$(awk -v s="$strip_size" 'BEGIN {print s/1048576}')"
echo "biggest directories of the Debian base ($base), MiB:"
du -xm --max-depth=3 "$base" 2>/dev/null | sort -rn | sed -n '2,16p' | sed "s|$base||" | awk '{printf "  %6s  %s\n", $1, $2}'
