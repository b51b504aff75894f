#!/usr/bin/env bash
# The floating IP's failover as a client sees it.
#
#   bench/vip-failover.sh                     # 5 trials, default cluster, the holder's VM killed
#   BALANCER_ONLY=1 bench/vip-failover.sh     # only the holder's balancer killed (machine alive)
#   REBOOT=1 bench/vip-failover.sh            # the holder rebooted on purpose (Ctrl-Alt-Del)
#   TRIALS=10 bench/vip-failover.sh
#   CONFIG=my-cluster.toml bench/vip-failover.sh --settle 60   # extra args go to the subcommand
#
# Builds the release binaries and the images (scripts/build-images), boots the cluster in QEMU
# (`tandem-qemu failover`, run dir target/qemu-failover), waits until every node serves and one
# holds the floating IP, then per trial: waits until a 3 s probe is clean (no failure, no gap over
# 250 ms: a node that just booted stalls its peer under TCG), then a client in the cluster's
# namespace GETs https://<floating IP>/node.html every 20 ms (new TCP+TLS connection each, 1 s
# timeout), the holder's VM is killed (SIGKILL to QEMU: a power cut) after 3 s, probing goes on
# 5 s, and the node is started again (does the address move back?). With BALANCER_ONLY=1 the
# holder's balancer gets SIGKILL through the peer API instead (a client certificate from the
# cluster CA is made here with openssl) and the supervisor restarts it. With REBOOT=1 the holder
# gets Ctrl-Alt-Del: its supervisor stops every service in order and hands the address over
# (each request is then given 5 s, so a SYN sent again is not a loss). Prints each trial's
# longest gap between two answers, failures, holders before/after, then the median and max gap.
#
# Exits non-zero when a trial left no new holder. Needs root (namespaces, taps). Sends traffic
# only inside the cluster's private namespace. Not a test: it asserts nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
config=()
if [[ -n ${CONFIG:-} ]]; then config=(--config "$CONFIG"); fi
scripts/build-images "${config[@]}"
mode=()
if [[ ${BALANCER_ONLY:-0} == 1 ]]; then
    ca_dir=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ca_dir"])' target/images/manifest.json)
    certs=target/qemu-failover-certs
    mkdir -p "$certs"
    # The peer API takes a certificate only if its SAN names a node: the bench acts as the
    # first node's tooling.
    peer=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0])' target/images/manifest.json)
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$peer" \
        -keyout "$certs/peer.key" -out "$certs/peer.csr" 2>/dev/null
    openssl x509 -req -in "$certs/peer.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
        -CAcreateserial -days 2 \
        -extfile <(printf 'extendedKeyUsage=clientAuth\nsubjectAltName=DNS:%s\n' "$peer") \
        -out "$certs/peer.crt" 2>/dev/null
    mode=(--balancer-only --peer-cert "$certs/peer.crt" --peer-key "$certs/peer.key")
fi
if [[ ${REBOOT:-0} == 1 ]]; then mode=(--reboot); fi
exec target/release/tandem-qemu failover --trials "${TRIALS:-5}" "${mode[@]}" "${config[@]}" "$@"
