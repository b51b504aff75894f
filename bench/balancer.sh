#!/usr/bin/env bash
# Tandem's balancer against HAProxy, same run, same backends, same load.
#
#   bench/balancer.sh                 # defaults below
#   ROUNDS=5 DURATION=10 bench/balancer.sh
#
# Two real nginx backends on loopback (127.0.0.11/12), HAProxy (Debian package) and Tandem's
# balancer (the `bench_balancer` example, `dist` (shipping) build, the code path and allocator of
# `appliance balancer`) configured alike: round robin over both, HTTP checks every 2 s,
# keep-alive to the backends, X-Forwarded-For, HSTS on HTTPS, the same ECDSA P-256
# certificate, TLS 1.2+1.3, ALPN h2/http1.1.
#
# Two pairs of proxies run side by side:
# - one thread each ($THREADS), pinned to the same CPU ($PROXY_CPUS, the last one); wrk,
#   h2load, openssl and the backends run on the other CPUs ($LOAD_CPUS);
# - two threads each ($THREADS2), on every CPU ($ALL_CPUS); on a 2-core machine the load
#   generator and the backends share those cores with the proxy (nothing is left to give
#   them alone), the same for both proxies.
# Rounds alternate the order (A B, B A, ...) because this machine is noisy; medians are
# reported, with every row's per-round spread (min-max) and the per-round ratio's spread.
#
# Rows: plain HTTP and HTTPS keep-alive (wrk), TLS handshakes/s (openssl s_time -new, full
# handshakes), HTTP/2 over TLS (h2load, $H2_CLIENTS connections x $H2_STREAMS streams; p99 from
# h2load's per-request log), and the 2-thread HTTPS and HTTP/2 rows; for each, the proxy's own
# CPU time per request, user and system (/proc/<pid>/stat). Then resident memory
# (VmRSS) of both 1-thread proxies idle and holding $HOLD_CONNECTIONS idle HTTPS keep-alive
# connections (each has made one request), then idle 21 s and 51 s after the rounds.
#
# Sends traffic to 127.0.0.0/8 only. Not a test: it asserts nothing.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
THREADS2=${THREADS2:-2}
NCPU=$(nproc)
PROXY_CPUS=${PROXY_CPUS:-$((NCPU - 1))}
LOAD_CPUS=${LOAD_CPUS:-0-$((NCPU > 1 ? NCPU - 2 : 0))}
ALL_CPUS=${ALL_CPUS:-0-$((NCPU - 1))}
WRK_THREADS=${WRK_THREADS:-1}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-10}
HANDSHAKE_SECONDS=${HANDSHAKE_SECONDS:-3}
HOLD_CONNECTIONS=${HOLD_CONNECTIONS:-1000}
WEB_PORT=${WEB_PORT:-18081}
T_HTTP=127.0.0.1:18080 T_HTTPS=127.0.0.1:18443 T_HTTPS2=127.0.0.1:18444
H_HTTP=127.0.0.1:28080 H_HTTPS=127.0.0.1:28443 H_HTTPS2=127.0.0.1:28444

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target}

need_tools haproxy:haproxy wrk:wrk h2load:nghttp2-client nginx:nginx-light openssl:openssl \
    taskset:util-linux python3:python3

echo "building bench_balancer (dist: the shipping profile)..." >&2
(cd "$here" && cargo build -q --profile dist -p balancer --example bench_balancer)
tandem_bin=$CARGO_TARGET_DIR/dist/examples/bench_balancer

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

haproxy_cfg() { # threads http-bind-or-empty https-bind
    cat <<EOF
global
  nbthread $1
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
EOF
    if [[ -n $2 ]]; then
        cat <<EOF
frontend fe_http
  bind $2
  http-request set-header X-Forwarded-Proto http
  default_backend be
EOF
    fi
    cat <<EOF
frontend fe_https
  bind $3 ssl crt $work/haproxy.pem alpn h2,http/1.1
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
}
haproxy_cfg "$THREADS" "$H_HTTP" "$H_HTTPS" >"$work/haproxy.cfg"
haproxy_cfg "$THREADS2" "" "$H_HTTPS2" >"$work/haproxy2.cfg"
taskset -c "$PROXY_CPUS" haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=($!)
taskset -c "$ALL_CPUS" haproxy -f "$work/haproxy2.cfg" -db >"$work/haproxy2.log" 2>&1 &
haproxy2_pid=$!
pids+=($!)

RUST_LOG=warn taskset -c "$PROXY_CPUS" "$tandem_bin" \
    --backend 127.0.0.11:$WEB_PORT --backend 127.0.0.12:$WEB_PORT \
    --http $T_HTTP --https $T_HTTPS --cert "$work/cert.pem" --key "$work/key.pem" \
    --workers "$THREADS" --state "$work/tandem-state" >"$work/tandem.log" 2>&1 &
tandem_pid=$!
pids+=($!)
RUST_LOG=warn taskset -c "$ALL_CPUS" "$tandem_bin" \
    --backend 127.0.0.11:$WEB_PORT --backend 127.0.0.12:$WEB_PORT \
    --https $T_HTTPS2 --cert "$work/cert.pem" --key "$work/key.pem" \
    --workers "$THREADS2" --state "$work/tandem-state2" >"$work/tandem2.log" 2>&1 &
tandem2_pid=$!
pids+=($!)

for a in $T_HTTP $H_HTTP; do
    for _ in $(seq 100); do
        curl -fs -o /dev/null "http://$a/" && break
        sleep 0.1
    done
    curl -fs -o /dev/null "http://$a/" || { echo "proxy on $a does not answer" >&2; cat "$work"/*.log >&2; exit 1; }
done
for a in $T_HTTPS $H_HTTPS $T_HTTPS2 $H_HTTPS2; do
    url=https://bench.test:${a#*:}/ resolve=bench.test:${a#*:}:127.0.0.1
    for _ in $(seq 100); do
        curl -fsk -o /dev/null --resolve "$resolve" "$url" && break
        sleep 0.1
    done
    curl -fsk -o /dev/null --resolve "$resolve" "$url" ||
        { echo "proxy on $a does not answer" >&2; cat "$work"/*.log >&2; exit 1; }
done

# Resident memory: VmRSS in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# Opens N HTTPS keep-alive connections, one request on each, and holds them until stdin closes.
cat >"$work/hold.py" <<'EOF'
import http.client, ssl, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
conns = []
for _ in range(n):
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"status {r.status}")
    conns.append(c)
print("ready", flush=True)
sys.stdin.read()
EOF
hold_rss() { # pid host:port -> VmRSS (KiB) of pid while HOLD_CONNECTIONS are open to host:port
    local fifo=$work/hold.fifo out=$work/hold.out client rss=0
    rm -f "$fifo" "$out"
    mkfifo "$fifo"
    taskset -c "$LOAD_CPUS" python3 "$work/hold.py" "${2%:*}" "${2#*:}" "$HOLD_CONNECTIONS" \
        <"$fifo" >"$out" 2>&1 &
    client=$!
    exec 7>"$fifo" # the client's stdin: it holds its connections until this closes
    for _ in $(seq 600); do
        grep -q '^ready' "$out" 2>/dev/null && break
        kill -0 "$client" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q '^ready' "$out"; then
        sleep 1
        rss=$(rss_kib "$1")
    else
        echo "holding $HOLD_CONNECTIONS connections to $2 failed: $(cat "$out")" >&2
    fi
    exec 7>&-
    wait "$client" 2>/dev/null || true
    echo "$rss"
}
declare -A mem
mem[tandem.idle]=$(rss_kib "$tandem_pid")
mem[haproxy.idle]=$(rss_kib "$haproxy_pid")
mem[tandem.held]=$(hold_rss "$tandem_pid" "$T_HTTPS")
mem[haproxy.held]=$(hold_rss "$haproxy_pid" "$H_HTTPS")
sleep 1

# wrk prints e.g. "Requests/sec:  12345.67" and, with --latency, "     99%    3.21ms".
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f\n", v}'; }
run_wrk() { # cpus threads url -> "rps p99ms errors"
    local out rps p99 errs
    out=$(taskset -c "$1" wrk -t"$2" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$3" 2>&1)
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out" | to_ms)
    errs=$(awk '/Non-2xx/ {n+=$NF} /Socket errors/ {gsub(/,/,""); n+=$4+$6+$8+$10} END {print n+0}' <<<"$out")
    echo "$rps $p99 $errs"
}
# h2load prints "finished in 5.00s, 12345.67 req/s, ...", "requests: T total, S started, D done,
# OK succeeded, F failed, E errored, ..." and "status codes: a 2xx, b 3xx, c 4xx, d 5xx"; its
# per-request log's third column is each request's time in microseconds (p99 from there).
run_h2load() { # cpus threads host:port -> "rps p99ms errors"
    local out rps p99 errs log=$work/h2load.log
    out=$(taskset -c "$1" h2load -t"$2" -c"$H2_CLIENTS" -m"$H2_STREAMS" -D"$DURATION" \
        --log-file="$log" "https://$3/" 2>&1)
    rps=$(awk '/^finished in/ {print $4}' <<<"$out")
    errs=$(awk '/^requests:/ {n+=$10+$12} /^status codes:/ {n+=$5+$7+$9} END {print n+0}' <<<"$out")
    p99=$(awk '{print $3}' "$log" | sort -n |
        awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; printf "%.3f\n", a[i]/1000}')
    rm -f "$log"
    echo "${rps:-0} $p99 $errs"
}
run_handshakes() { # host:port -> handshakes/s
    local out n
    out=$(taskset -c "$LOAD_CPUS" openssl s_time -connect "$1" -new -time "$HANDSHAKE_SECONDS" 2>&1 </dev/null)
    n=$(awk '/connections in [0-9.]+s;/ {print $1; exit}' <<<"$out")
    awk -v n="${n:-0}" -v t="$HANDSHAKE_SECONDS" 'BEGIN {printf "%.1f\n", n / t}'
}

declare -A results
record() { # who row "rps p99 errors"
    local rps p99 errs
    read -r rps p99 errs <<<"$3"
    results[$1.$2.rps]+="$rps "
    results[$1.$2.p99]+="$p99 "
    results[$1.$2.err]+="$errs "
}
# The proxy's own CPU time per request, user and system (the kernel's TCP work on its
# sockets), from /proc/<pid>/stat around a row's run: where a request's time goes.
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
cpu_record() { # who row pid "utime stime" (before) -> results[who.row.usr/.sys] in µs per request
    local u0 s0 u1 s1 rps
    read -r u0 s0 <<<"$4"
    read -r u1 s1 <<<"$(cpu_ticks "$3")"
    rps=$(tr ' ' '\n' <<<"${results[$1.$2.rps]}" | awk 'NF' | tail -1)
    per_req() { awk -v t="$1" -v r="$rps" -v d="$DURATION" -v hz="$hz" \
        'BEGIN {printf "%.2f", (r > 0) ? t * 1e6 / hz / (r * d) : 0}'; }
    results[$1.$2.usr]+="$(per_req $((u1 - u0))) "
    results[$1.$2.sys]+="$(per_req $((s1 - s0))) "
}
measure() { # who pid pid-2-threads http https https-2-threads
    local before
    before=$(cpu_ticks "$2")
    record "$1" http "$(run_wrk "$LOAD_CPUS" "$WRK_THREADS" "http://$4/")"
    cpu_record "$1" http "$2" "$before"
    before=$(cpu_ticks "$2")
    record "$1" https "$(run_wrk "$LOAD_CPUS" "$WRK_THREADS" "https://$5/")"
    cpu_record "$1" https "$2" "$before"
    results[$1.hs.rps]+="$(run_handshakes "$5") "
    before=$(cpu_ticks "$2")
    record "$1" h2 "$(run_h2load "$LOAD_CPUS" 1 "$5")"
    cpu_record "$1" h2 "$2" "$before"
    before=$(cpu_ticks "$3")
    record "$1" https2t "$(run_wrk "$ALL_CPUS" "$THREADS2" "https://$6/")"
    cpu_record "$1" https2t "$3" "$before"
    before=$(cpu_ticks "$3")
    record "$1" h22t "$(run_h2load "$ALL_CPUS" "$THREADS2" "$6")"
    cpu_record "$1" h22t "$3" "$before"
}

split1="1 thread: proxies on CPU $PROXY_CPUS; wrk -t$WRK_THREADS, h2load -t1, openssl and backends on CPU $LOAD_CPUS"
split2="$THREADS2 threads: proxies, wrk -t$THREADS2, h2load -t$THREADS2 and backends all share CPUs $ALL_CPUS"
echo "$split1" >&2
echo "$split2" >&2
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then order="tandem haproxy"; else order="haproxy tandem"; fi
    for who in $order; do
        if [[ $who == tandem ]]; then
            measure tandem "$tandem_pid" "$tandem2_pid" $T_HTTP $T_HTTPS $T_HTTPS2
        else
            measure haproxy "$haproxy_pid" "$haproxy2_pid" $H_HTTP $H_HTTPS $H_HTTPS2
        fi
    done
    echo "round $r/$ROUNDS done" >&2
done
# Idle again: once the balancer's housekeeping has seen a whole idle 10 s interval (it gives
# memory back to the system only then), and once its idle backend connections are past their
# age (30 s) and closed, as HAProxy's pool-purge-delay closes its own, and trimmed after.
sleep 21
mem[tandem.after]=$(rss_kib "$tandem_pid")
mem[haproxy.after]=$(rss_kib "$haproxy_pid")
sleep 30
mem[tandem.later]=$(rss_kib "$tandem_pid")
mem[haproxy.later]=$(rss_kib "$haproxy_pid")

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR]=$1} END {if (NR==0) {print 0} else if (NR%2) {print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }
spread() { tr ' ' '\n' | awk 'NF' | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%s-%s", lo, hi}'; }
sum() { tr ' ' '\n' | awk 'NF {s+=$1} END {print s+0}'; }
m() { median <<<"${results[$1]}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "n/a"; else printf "%.2f", a / b}'; }
# The ratio of each round (the two proxies' values measured back to back).
round_ratios() {
    paste -d' ' <(tr ' ' '\n' <<<"${results[$1]}" | awk 'NF') <(tr ' ' '\n' <<<"${results[$2]}" | awk 'NF') |
        awk '$2 > 0 {printf "%.2f ", $1 / $2}'
}

echo
echo "Tandem balancer vs HAProxy $(haproxy -v | awk 'NR==1 {print $3}') — medians of $ROUNDS rounds, ranges are min-max over the rounds"
echo "$split1"
echo "$split2"
echo "wrk -c$CONNECTIONS -d${DURATION}s; h2load -c$H2_CLIENTS -m$H2_STREAMS -D$DURATION (TLS, ALPN h2); openssl s_time -new -time $HANDSHAKE_SECONDS"
fmt="%-36s %10s %10s %7s %11s %19s %19s\n"
# shellcheck disable=SC2059 # the format is ours
printf "$fmt" "" "Tandem" "HAProxy" "ratio" "ratio range" "Tandem range" "HAProxy range"
row() { # label key
    local t h
    t=$(m "tandem.$2") h=$(m "haproxy.$2")
    # shellcheck disable=SC2059
    printf "$fmt" "$1" "$t" "$h" "$(ratio "$t" "$h")" "$(round_ratios "tandem.$2" "haproxy.$2" | spread)" \
        "$(spread <<<"${results[tandem.$2]}")" "$(spread <<<"${results[haproxy.$2]}")"
}
for proto in http https h2 https2t h22t; do
    case $proto in
        http) label="HTTP keep-alive" ;;
        https) label="HTTPS keep-alive" ;;
        h2) label="HTTP/2 TLS" ;;
        https2t) label="HTTPS, $THREADS2 threads" ;;
        h22t) label="HTTP/2, $THREADS2 threads" ;;
    esac
    row "$label req/s" "$proto.rps"
    row "$label p99 ms" "$proto.p99"
    row "$label CPU µs/req user" "$proto.usr"
    row "$label CPU µs/req sys" "$proto.sys"
    printf "%-36s %10s %10s\n" "$label errors" "$(sum <<<"${results[tandem.$proto.err]}")" \
        "$(sum <<<"${results[haproxy.$proto.err]}")"
done
row "TLS handshakes/s" hs.rps
echo
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
printf "%-44s %10s %10s\n" "VmRSS MiB (the 1-thread proxies)" "Tandem" "HAProxy"
printf "%-44s %10s %10s\n" "idle, at start" "$(mib "${mem[tandem.idle]}")" "$(mib "${mem[haproxy.idle]}")"
printf "%-44s %10s %10s\n" "$HOLD_CONNECTIONS idle HTTPS keep-alive connections" \
    "$(mib "${mem[tandem.held]}")" "$(mib "${mem[haproxy.held]}")"
printf "%-44s %10s %10s\n" "idle, 21 s after the rounds" "$(mib "${mem[tandem.after]}")" "$(mib "${mem[haproxy.after]}")"
printf "%-44s %10s %10s\n" "idle, 51 s after the rounds" "$(mib "${mem[tandem.later]}")" "$(mib "${mem[haproxy.later]}")"
echo
echo "raw: $(for k in "${!results[@]}"; do echo -n "$k=[${results[$k]% }] "; done)"
