#!/usr/bin/env bash
# The long run of the property tests ("fuzzing" on the stable toolchain: cargo-fuzz needs
# nightly). CI runs every `fuzz_*` test with proptest's default 256 cases; this runs them with
# CASES each (default 100000), in release mode, and prints how long each crate took.
#
#   bench/fuzz.sh                 # 100000 cases per property
#   CASES=1000000 bench/fuzz.sh
#
# Targets: the balancer's HTTP/1 framing tracker (split invariance on arbitrary bytes, HTTP-like
# streams and request sequences), the config parser (arbitrary and mutated cluster.toml), and
# the log monitor's parsers (access, status and stored lines, times, db status, certificates).
# A failure prints the minimal input and saves it under the crate's proptest-regressions/,
# where the next CI run replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cases=${CASES:-100000}
cargo build --release --locked --tests -p balancer -p cluster-config -p logmon
for crate in balancer cluster-config logmon; do
    start=$SECONDS
    PROPTEST_CASES=$cases cargo test --release --locked -q -p "$crate" fuzz_ -- --test-threads 2
    echo "fuzz: $crate: $cases cases per property in $((SECONDS - start)) s"
done
