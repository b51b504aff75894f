#!/usr/bin/env bash
# What mimalloc buys the balancer: instructions per proxied request, mimalloc vs glibc malloc.
#
#   bench/alloc.sh                  # REQUESTS=20000 by default
#
# Builds the `bench_balancer` example twice (dist profile: glibc malloc, what `appliance` ships
# with, and `--features mimalloc`), runs each under callgrind in front of one nginx backend on loopback, and
# drives REQUESTS keep-alive requests through it (plain HTTP, then HTTPS) with h2load --h1.
# Instructions are counted by valgrind, so the figure does not depend on how busy the machine
# is; a run with no requests is subtracted (start-up, certificate load, shutdown).
#
# Prints instructions per request for each allocator and the ratio. Sends traffic to
# 127.0.0.0/8 only. Not a test: it asserts nothing.
set -euo pipefail

REQUESTS=${REQUESTS:-20000}
CONNECTIONS=${CONNECTIONS:-8}
WEB=127.0.0.31:18091 HTTP=127.0.0.1:18180 HTTPS=127.0.0.1:18543

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target}

need_tools valgrind:valgrind h2load:nghttp2-client nginx:nginx-light openssl:openssl

bench_workdir tandem-alloc

echo "building bench_balancer (dist profile, mimalloc and glibc)..." >&2
(cd "$here" && cargo build -q --profile dist -p balancer --example bench_balancer --features mimalloc)
cp "$CARGO_TARGET_DIR/dist/examples/bench_balancer" "$work/mimalloc"
(cd "$here" && cargo build -q --profile dist -p balancer --example bench_balancer)
cp "$CARGO_TARGET_DIR/dist/examples/bench_balancer" "$work/glibc"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body; proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fcgi; uwsgi_temp_path $work/nginx/uwsgi; scgi_temp_path $work/nginx/scgi;
  keepalive_requests 1000000;
  server {
    listen $WEB;
    location = /healthz { return 200 "ok\n"; }
    location / { return 200 "backend: a small page, as a health or API answer would be\n"; }
  }
}
CONF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
for _ in $(seq 100); do curl -fs -o /dev/null "http://$WEB/healthz" && break; sleep 0.1; done

# callgrind's total instruction count ("summary: N") for one balancer run serving `n` requests
# on `scheme`.
instructions() { # binary scheme n
    local bin=$1 scheme=$2 n=$3 out=$work/cg.$RANDOM pid
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" "$work/$bin" \
        --backend "$WEB" --http "$HTTP" --https "$HTTPS" \
        --cert "$work/cert.pem" --key "$work/key.pem" --workers 1 \
        --state "$work/state-$bin" >"$work/$bin.log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do curl -fs -o /dev/null "http://$HTTP/" && break; sleep 0.2; done
    if ((n > 0)); then
        if [[ $scheme == https ]]; then
            h2load --h1 -n "$n" -c "$CONNECTIONS" "https://$HTTPS/" >"$work/h2load.log" 2>&1
        else
            h2load --h1 -n "$n" -c "$CONNECTIONS" "http://$HTTP/" >"$work/h2load.log" 2>&1
        fi
        grep -q "succeeded, 0 failed\|$n succeeded" "$work/h2load.log" ||
            { echo "h2load against $bin failed:" >&2; cat "$work/h2load.log" >&2; exit 1; }
    fi
    kill -INT "$pid"
    wait "$pid" 2>/dev/null || true
    awk '/^summary:/ {print $2}' "$out"
}

printf '%-8s %-10s %14s\n' scheme allocator 'instr/request'
declare -A per
for scheme in http https; do
    for bin in mimalloc glibc; do
        base=$(instructions "$bin" "$scheme" 0)
        full=$(instructions "$bin" "$scheme" "$REQUESTS")
        per[$scheme.$bin]=$(awk -v a="$full" -v b="$base" -v n="$REQUESTS" 'BEGIN {printf "%.0f", (a - b) / n}')
        printf '%-8s %-10s %14s\n' "$scheme" "$bin" "${per[$scheme.$bin]}"
    done
    awk -v m="${per[$scheme.mimalloc]}" -v g="${per[$scheme.glibc]}" -v s="$scheme" \
        'BEGIN {printf "%-8s mimalloc/glibc %.3f (%+.1f %%)\n", s, m / g, (m / g - 1) * 100}'
done
