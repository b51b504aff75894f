#!/usr/bin/env bash
# Tandem's balancer against HAProxy, same run, same backends, same load.
#
#   bench/balancer.sh                 # defaults below
#   ROUNDS=5 DURATION=10 bench/balancer.sh
#
# Two real nginx backends on loopback (127.0.0.11/12), HAProxy (Debian package) and Tandem's
# balancer (the `bench_balancer` example, release build) configured alike: round robin over both,
# HTTP checks every 2 s, keep-alive to the backends, X-Forwarded-For, HSTS on HTTPS, the same
# ECDSA P-256 certificate, TLS 1.2+1.3, ALPN h2/http1.1.
#
# Both proxies get the same number of threads ($THREADS) and are pinned to the same CPUs
# ($PROXY_CPUS); wrk and the backends run on the other CPUs ($LOAD_CPUS). Rounds alternate the
# order (A B, B A, ...) because this machine is noisy; the medians are reported.
#
# Prints requests/s and p99 latency for plain HTTP and HTTPS (keep-alive, wrk), TLS handshakes
# per second (openssl s_time -new, full handshakes), and the ratios Tandem/HAProxy.
#
# Sends traffic to 127.0.0.0/8 only. Not a test: it asserts nothing.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
NCPU=$(nproc)
PROXY_CPUS=${PROXY_CPUS:-$((NCPU - 1))}
LOAD_CPUS=${LOAD_CPUS:-0-$((NCPU > 1 ? NCPU - 2 : 0))}
WRK_THREADS=${WRK_THREADS:-1}
HANDSHAKE_SECONDS=${HANDSHAKE_SECONDS:-3}
WEB_PORT=${WEB_PORT:-18081}
T_HTTP=127.0.0.1:18080 T_HTTPS=127.0.0.1:18443
H_HTTP=127.0.0.1:28080 H_HTTPS=127.0.0.1:28443

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target}

need_tools haproxy:haproxy wrk:wrk h2load:nghttp2-client nginx:nginx-light openssl:openssl taskset:util-linux

echo "building bench_balancer (release)..." >&2
(cd "$here" && cargo build -q --release -p balancer --example bench_balancer)
tandem_bin=$CARGO_TARGET_DIR/release/examples/bench_balancer

bench_workdir tandem-bench

# One certificate for both proxies.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" >"$work/haproxy.pem"

for n in 1 2; do
    d=$work/nginx$n
    mkdir -p "$d"
    cat >"$d/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $d/body; proxy_temp_path $d/proxy; fastcgi_temp_path $d/fcgi;
  uwsgi_temp_path $d/uwsgi; scgi_temp_path $d/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {
    listen 127.0.0.1$n:$WEB_PORT;
    location = /healthz { return 200 "ok\n"; }
    location / { return 200 "backend server$n: a small page, as a health or API answer would be\n"; }
  }
}
EOF
    taskset -c "$LOAD_CPUS" nginx -c "$d/nginx.conf" -p "$d" &
    pids+=($!)
done

# The proxies start with both backends listening (a first failed check takes a backend down).
for n in 1 2; do
    for _ in $(seq 100); do
        curl -fs -o /dev/null "http://127.0.0.1$n:$WEB_PORT/healthz" && break
        sleep 0.1
    done
done

cat >"$work/haproxy.cfg" <<EOF
global
  nbthread $THREADS
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.2
  ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
  ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305
defaults
  mode http
  timeout connect 3s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s
  timeout http-keep-alive 60s
  option http-keep-alive
  option forwardfor
frontend fe_http
  bind $H_HTTP
  http-request set-header X-Forwarded-Proto http
  default_backend be
frontend fe_https
  bind $H_HTTPS ssl crt $work/haproxy.pem alpn h2,http/1.1
  http-request set-header X-Forwarded-Proto https
  http-response set-header Strict-Transport-Security "max-age=31536000"
  default_backend be
backend be
  balance roundrobin
  option httpchk GET /healthz
  http-check expect status 200
  server s1 127.0.0.11:$WEB_PORT check inter 2s rise 2 fall 3
  server s2 127.0.0.12:$WEB_PORT check inter 2s rise 2 fall 3
EOF
taskset -c "$PROXY_CPUS" haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)

RUST_LOG=warn taskset -c "$PROXY_CPUS" "$tandem_bin" \
    --backend 127.0.0.11:$WEB_PORT --backend 127.0.0.12:$WEB_PORT \
    --http $T_HTTP --https $T_HTTPS --cert "$work/cert.pem" --key "$work/key.pem" \
    --workers "$THREADS" --state "$work/tandem-state" >"$work/tandem.log" 2>&1 &
pids+=($!)

for a in $T_HTTP $H_HTTP; do
    for _ in $(seq 100); do
        curl -fs -o /dev/null "http://$a/" && break
        sleep 0.1
    done
    curl -fs -o /dev/null "http://$a/" || { echo "proxy on $a does not answer" >&2; cat "$work"/*.log >&2; exit 1; }
done
curl -fsk -o /dev/null --resolve bench.test:18443:127.0.0.1 https://bench.test:18443/
curl -fsk -o /dev/null --resolve bench.test:28443:127.0.0.1 https://bench.test:28443/

# wrk prints e.g. "Requests/sec:  12345.67" and, with --latency, "     99%    3.21ms".
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f\n", v}'; }
run_wrk() { # url -> "rps p99ms errors"
    local out rps p99 errs
    out=$(taskset -c "$LOAD_CPUS" wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$1" 2>&1)
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out" | to_ms)
    errs=$(awk '/Non-2xx/ {n+=$NF} /Socket errors/ {gsub(/,/,""); n+=$4+$6+$8+$10} END {print n+0}' <<<"$out")
    echo "$rps $p99 $errs"
}
run_handshakes() { # host:port -> handshakes/s
    local out n
    out=$(taskset -c "$LOAD_CPUS" openssl s_time -connect "$1" -new -time "$HANDSHAKE_SECONDS" 2>&1 </dev/null)
    n=$(awk '/connections in [0-9.]+s;/ {print $1; exit}' <<<"$out")
    awk -v n="${n:-0}" -v t="$HANDSHAKE_SECONDS" 'BEGIN {printf "%.1f\n", n / t}'
}

declare -A results
measure() { # name http https
    local name=$1
    read -r rps p99 errs <<<"$(run_wrk "http://$2/")"
    results[$name.http.rps]+="$rps "
    results[$name.http.p99]+="$p99 "
    results[$name.http.err]+="$errs "
    read -r rps p99 errs <<<"$(run_wrk "https://$3/")"
    results[$name.https.rps]+="$rps "
    results[$name.https.p99]+="$p99 "
    results[$name.https.err]+="$errs "
    results[$name.hs]+="$(run_handshakes "$3") "
}

echo "proxies on CPU $PROXY_CPUS with $THREADS thread(s); wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s and backends on CPU $LOAD_CPUS; $ROUNDS rounds" >&2
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then order="tandem haproxy"; else order="haproxy tandem"; fi
    for who in $order; do
        if [[ $who == tandem ]]; then measure tandem $T_HTTP $T_HTTPS; else measure haproxy $H_HTTP $H_HTTPS; fi
    done
    echo "round $r/$ROUNDS done" >&2
done

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR]=$1} END {if (NR==0) {print 0} else if (NR%2) {print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }
sum() { tr ' ' '\n' | awk 'NF {s+=$1} END {print s+0}'; }
m() { median <<<"${results[$1]}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "n/a"; else printf "%.2f", a / b}'; }

echo
echo "Tandem balancer vs HAProxy $(haproxy -v | awk 'NR==1 {print $3}') — medians of $ROUNDS rounds"
printf "%-28s %14s %14s %16s\n" "" "Tandem" "HAProxy" "Tandem/HAProxy"
for proto in http https; do
    tr=$(m tandem.$proto.rps) hr=$(m haproxy.$proto.rps)
    tp=$(m tandem.$proto.p99) hp=$(m haproxy.$proto.p99)
    printf "%-28s %14s %14s %16s\n" "$proto req/s" "$tr" "$hr" "$(ratio "$tr" "$hr")"
    printf "%-28s %14s %14s %16s\n" "$proto p99 ms" "$tp" "$hp" "$(ratio "$tp" "$hp")"
    printf "%-28s %14s %14s\n" "$proto errors (all rounds)" "$(sum <<<"${results[tandem.$proto.err]}")" "$(sum <<<"${results[haproxy.$proto.err]}")"
done
th=$(m tandem.hs) hh=$(m haproxy.hs)
printf "%-28s %14s %14s %16s\n" "TLS handshakes/s" "$th" "$hh" "$(ratio "$th" "$hh")"
echo
echo "raw: $(for k in "${!results[@]}"; do echo -n "$k=[${results[$k]% }] "; done)"
