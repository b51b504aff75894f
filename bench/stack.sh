#!/usr/bin/env bash
# Requests per second of the whole default stack on this machine (client → balancer → nginx →
# demo app → MariaDB), before and after a change, in one run with one command.
#
#   bench/stack.sh                        # base ee67a85 against this checkout's working tree
#   bench/stack.sh <rev>                  # or BASE=<rev> bench/stack.sh
#   AFTER=<rev> bench/stack.sh <rev>      # both sides from revisions
#   ROUNDS=5 DURATION=10 bench/stack.sh
#   BUILD=0 bench/stack.sh                # measure again the binaries the last run built
#
# Builds: `cargo build --release -p appliance` of the base revision in a git worktree outside the
# checkout ($WORK/base, its own target directory, seeded once from this checkout's target/release
# so that only Tandem's crates compile), and the same command in this checkout as it is (or, with
# AFTER=<rev>, in the worktree $WORK/after). Each binary is copied to $WORK/bin/<side> first, so
# a rebuild by someone else during the run changes nothing.
#
# The stack: each revision's own examples/local-cluster.toml under `appliance run`, both nodes
# (server1 on 127.0.0.11, server2 on 127.0.0.12; each with its balancer, nginx, demo app,
# MariaDB, db-agent, log monitor and admin server; server2's MariaDB is the primary). One change:
# the floating IP is 127.0.0.1, the address every client on this machine connects from. That
# makes it a trusted proxy to the app, so the app takes the client from the X-Forwarded-For the
# load generator sends, and its write limit (20 at once, 2/s per client address) applies per
# simulated client ($CLIENTS of them) instead of to the whole benchmark as one client.
#
# Rounds alternate the order (base after, after base, ...); only one cluster runs at a time.
# Each round starts the cluster, deletes every note, writes $SEED notes through the stack (a
# full first page is 50), waits until the replica has them, warms up ($WARMUP s of GET /), then
# runs wrk for $DURATION s per scenario, HTTP/1.1 keep-alive, $CONNECTIONS connections:
#   GET / end to end        https://<floating IP>:<https>/   balancer (TLS) → nginx of either
#                           node (round robin) → its app → its local MariaDB
#   POST /notes end to end  the same path; a ~100-byte form note; the app writes to the primary
#   balancer -> nginx file  https://<floating IP>:<https>/node.html (nginx serves a file)
#   nginx file              http://<primary>:<web>/node.html
#   nginx -> app GET /      http://<primary>:<web>/    (no balancer)
#   app GET /               http://<primary>:<app>/    (the app and its database alone)
# While POST runs, a root `mariadb` client on the primary deletes all but the newest $KEEP
# notes every second (the app refuses writes at 10 000 notes).
#
# Where the time goes: during both end-to-end runs the CPU time of every process of both nodes
# is read from /proc/<pid>/stat before and after (utime+stime; children a process reaped, such
# as the old app's one `mariadb` client per query, from its cutime+cstime), summed per kind of
# process and printed as CPU µs per request and % of one core, beside the busy time of the
# stack's CPUs (/proc/stat: the kernel's softirq work and anyone else's processes included).
#
# CPUs: the whole stack (every process inherits the affinity) on $STACK_CPUS (default: the last
# CPU), wrk on $LOAD_CPUS (the others). On a 2-core machine: the stack on CPU 1, wrk on CPU 0,
# so the stack's processes share one core: their µs per request add up to what a request
# costs, and the largest one is the bottleneck. The machine is shared and noisy: figures are
# comparable only within one run; medians (and min-max) over the rounds are reported.
#
# Needs root (the services drop to their own users), nginx, MariaDB and Tandem's users
# (scripts/setup-host); installs wrk if missing. Holds $LOCK while a cluster runs (tests that
# bind the local cluster's addresses take it too). Sends traffic to 127.0.0.0/8 only. Not a
# test: it asserts nothing.
set -euo pipefail

BASE=${1:-${BASE:-ee67a85}}
AFTER=${AFTER:-}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-1}
SEED=${SEED:-50}
KEEP=${KEEP:-500}
CLIENTS=${CLIENTS:-4096}
NCPU=$(nproc)
STACK_CPUS=${STACK_CPUS:-$((NCPU - 1))}
LOAD_CPUS=${LOAD_CPUS:-0-$((NCPU > 1 ? NCPU - 2 : 0))}
WORK=${WORK:-/var/tmp/tandem-bench}
LOCK=${LOCK:-/tmp/tandem-tests.lock}
FLOATING_IP=127.0.0.1
READY_TIMEOUT=${READY_TIMEOUT:-180}
BUILD=${BUILD:-1}

here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
HZ=$(getconf CLK_TCK)

say() { echo "stack.sh: $*" >&2; }
die() { say "$*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (the services drop to their own users)"
for p in nginx mariadbd mariadb curl taskset git; do
    command -v "$p" >/dev/null 2>&1 || die "$p not found: run scripts/setup-host"
done
getent passwd tandem-app >/dev/null || die "Tandem's service users are missing: run scripts/setup-host"
if ! command -v wrk >/dev/null 2>&1; then
    say "installing wrk"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi

# --- builds -------------------------------------------------------------------------------

# A detached worktree of `rev` at `dir`, outside the checkout, with its own target directory.
worktree() {
    local dir=$1 rev=$2
    if [[ -d $dir && $(git -C "$dir" rev-parse --show-toplevel 2>/dev/null) == "$(cd "$dir" && pwd -P)" ]]; then
        [[ $(cd "$dir" && pwd -P) != "$(cd "$here" && pwd -P)" ]] || die "$dir is this checkout, not a worktree of its own"
        git -C "$dir" checkout -q -f --detach "$rev"
    else
        git -C "$here" worktree prune
        git -C "$here" worktree add -q -f --detach "$dir" "$rev"
    fi
    if [[ ! -d $dir/target/release && -d $here/target/release ]]; then
        say "seeding $dir/target/release from $here/target/release"
        mkdir -p "$dir/target"
        cp -a --reflink=auto "$here/target/release" "$dir/target/"
    fi
}

# build side source-dir target-dir: builds and copies the binary to $WORK/bin/<side>.
build() {
    local side=$1 src=$2 target=$3
    # Both revisions with the shipping settings (the `dist` profile's), whatever their own
    # Cargo.toml says `release` is: older ones shipped from it, newer ones build it incremental.
    export CARGO_PROFILE_RELEASE_INCREMENTAL=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
    say "building $side: cargo build --release -p appliance in $src"
    (cd "$src" && CARGO_TARGET_DIR=$target cargo build -q --release -p appliance) ||
        die "the $side build failed in $src (mid-edit? retry later, or set AFTER=<rev>)"
    mkdir -p "$WORK/bin/$side"
    cp "$target/release/appliance" "$WORK/bin/$side/appliance.new"
    mv "$WORK/bin/$side/appliance.new" "$WORK/bin/$side/appliance"
    cp "$src/examples/local-cluster.toml" "$WORK/bin/$side/local-cluster.toml"
}

mkdir -p "$WORK"
chmod 0755 "$WORK"
declare -A label
if [[ $BUILD == 0 ]]; then
    for side in base after; do
        [[ -x $WORK/bin/$side/appliance ]] || die "BUILD=0: no $WORK/bin/$side/appliance from an earlier run"
        label[$side]=$(cat "$WORK/bin/$side/label")
    done
    say "BUILD=0: measuring the binaries of the last build (base ${label[base]}, after ${label[after]})"
else
    base_rev=$(git -C "$here" rev-parse --verify "$BASE^{commit}") || die "no such revision: $BASE"
    label[base]=$(git -C "$here" rev-parse --short "$base_rev")
    worktree "$WORK/base" "$base_rev"
    build base "$WORK/base" "$WORK/base/target"
    if [[ -n $AFTER ]]; then
        after_rev=$(git -C "$here" rev-parse --verify "$AFTER^{commit}") || die "no such revision: $AFTER"
        label[after]=$(git -C "$here" rev-parse --short "$after_rev")
        worktree "$WORK/after" "$after_rev"
        build after "$WORK/after" "$WORK/after/target"
    else
        label[after]=$(git -C "$here" rev-parse --short HEAD)
        if [[ -n $(git -C "$here" status --porcelain) ]]; then label[after]+="+dirty"; fi
        build after "$here" "${CARGO_TARGET_DIR:-$here/target}"
    fi
    for side in base after; do echo "${label[$side]}" >"$WORK/bin/$side/label"; done
fi

# --- the cluster --------------------------------------------------------------------------

# Only one cluster on these addresses at a time, ours or a test's.
exec 9>"$LOCK"
if ! flock -n 9; then
    say "waiting for $LOCK (a test or another bench holds the local cluster's addresses)"
    # In short waits, so that a signal is acted on while waiting.
    until flock -w 2 9; do :; done
fi

work=$WORK/run
rm -rf "$work"
mkdir -p "$work"
chmod 0755 "$work"

# The cluster's config per side: the revision's example with the floating IP moved.
declare -A cfg # side.key -> value
for side in base after; do
    d=$work/$side
    mkdir -p "$d"
    grep -q '^floating_ip *=' "$WORK/bin/$side/local-cluster.toml" ||
        die "${label[$side]}: examples/local-cluster.toml has no floating_ip line"
    sed "s/^floating_ip *=.*/floating_ip = \"$FLOATING_IP\"/" "$WORK/bin/$side/local-cluster.toml" >"$d/cluster.toml"
    "$WORK/bin/$side/appliance" check-config "$d/cluster.toml" >/dev/null ||
        die "${label[$side]}: the bench's cluster.toml does not validate"
    # [[node]] blocks: name, address, db_role; [ports]: web, app, https.
    nodes=$(awk -F'"' '/^\[\[node\]\]/ {n++; in_node = 1; next} /^\[/ {in_node = 0} in_node && /^name *=/ {name[n] = $2} in_node && /^address *=/ {addr[n] = $2} in_node && /^db_role *=/ {role[n] = $2} END {for (i = 1; i <= n; i++) print name[i], addr[i], role[i]}' "$d/cluster.toml")
    cfg[$side.nodes]=$(awk '{printf "%s ", $1}' <<<"$nodes")
    while read -r name addr role; do
        cfg[$side.addr.$name]=$addr
        if [[ $role == primary ]]; then cfg[$side.primary]=$name; fi
    done <<<"$nodes"
    for key in web app https; do
        cfg[$side.$key]=$(awk -v k="$key" '/^\[ports\]/ {p=1; next} /^\[/ {p=0} p && $1 == k {print $3}' "$d/cluster.toml")
        [[ -n ${cfg[$side.$key]} ]] || die "${label[$side]}: no ports.$key in the example config"
    done
    [[ -n ${cfg[$side.primary]:-} ]] || die "${label[$side]}: no primary node in the example config"
done

stack_pids=()  # the `appliance run` of each node of the cluster running now
stack_nodes=() # their node names
trimmer=''

# A process and all its descendants.
descendants() {
    ps -e -o pid=,ppid= | awk -v root="$1" '{parent[$1] = $2}
        END {keep[root] = 1; do {added = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) {keep[p] = 1; added = 1}} while (added); for (p in keep) print p}'
}

stop_cluster() {
    ((${#stack_pids[@]})) || return 0
    local all p alive
    all=$(for p in "${stack_pids[@]}"; do descendants "$p"; done)
    kill -TERM "${stack_pids[@]}" 2>/dev/null || true
    for _ in $(seq 300); do
        alive=0
        for p in "${stack_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    if ((alive)); then
        say "a supervisor did not stop within 30 s: killing its processes"
        for p in $all; do kill -KILL "$p" 2>/dev/null || true; done
    fi
    wait "${stack_pids[@]}" 2>/dev/null || true
    stack_pids=()
    stack_nodes=()
    roles=()
}

cleanup() {
    if [[ -n $trimmer ]]; then kill "$trimmer" 2>/dev/null || true; fi
    stop_cluster
}
trap cleanup EXIT
trap 'exit 130' INT TERM

logs() {
    local side=$1 n
    for n in ${cfg[$side.nodes]}; do
        echo "--- $side $n: last 30 lines of $work/$side/$n.log ---" >&2
        tail -n 30 "$work/$side/$n.log" >&2 || true
    done
}

sql() { # side node statement -> rows, as root over the node's MariaDB socket
    mariadb --socket="$work/$1/$2/run/mysqld/mysqld.sock" --user=root --batch --skip-column-names -e "$3"
}

http_code() { # curl args... -> the status code (000: no answer)
    curl -sk -o /dev/null -w '%{http_code}' --max-time 10 "$@" || true
}

start_cluster() {
    local side=$1 n fip=$FLOATING_IP https=${cfg[$1.https]} code started=$SECONDS
    for n in ${cfg[$side.nodes]}; do
        local a=${cfg[$side.addr.$n]}
        for port in "${cfg[$side.web]}" "${cfg[$side.app]}" "$https"; do
            if ss -Hltn "src $a:$port" | grep -q .; then die "something already listens on $a:$port"; fi
        done
        RUST_LOG=${RUST_LOG:-info} taskset -c "$STACK_CPUS" "$WORK/bin/$side/appliance" run \
            --config "$work/$side/cluster.toml" --node "$n" --state-dir "$work/$side/$n" \
            >>"$work/$side/$n.log" 2>&1 </dev/null &
        stack_pids+=($!)
        stack_nodes+=("$n")
    done
    # Ready: the floating IP, every nginx and every app answer GET /.
    local deadline=$((SECONDS + READY_TIMEOUT)) ok p
    while :; do
        ok=1
        [[ $(http_code "https://$fip:$https/") == 200 ]] || ok=0
        for n in ${cfg[$side.nodes]}; do
            [[ $(http_code "http://${cfg[$side.addr.$n]}:${cfg[$side.web]}/") == 200 ]] || ok=0
            [[ $(http_code "http://${cfg[$side.addr.$n]}:${cfg[$side.app]}/") == 200 ]] || ok=0
        done
        ((ok)) && break
        for p in "${stack_pids[@]}"; do
            kill -0 "$p" 2>/dev/null || { logs "$side"; die "${label[$side]}: an appliance run exited"; }
        done
        ((SECONDS < deadline)) || { logs "$side"; die "${label[$side]}: the cluster did not answer within ${READY_TIMEOUT}s"; }
        sleep 0.2
    done
    local ready=$SECONDS
    # The notes: the first write creates the schema; then exactly $SEED, on every node.
    local primary=${cfg[$side.primary]} i
    code=$(http_code -H "X-Forwarded-For: 10.255.255.1" --data-urlencode "body=schema" "https://$fip:$https/notes")
    [[ $code == 2* || $code == 3* ]] || { logs "$side"; die "${label[$side]}: POST /notes answered $code"; }
    sql "$side" "$primary" "DELETE FROM app.notes"
    for ((i = 1; i <= SEED; i++)); do
        code=$(http_code -H "X-Forwarded-For: 10.255.$((i / 256)).$((i % 256))" \
            --data-urlencode "body=seed note $i: a sentence or two, as people write them in a notes app." \
            "https://$fip:$https/notes")
        [[ $code == 2* || $code == 3* ]] || { logs "$side"; die "${label[$side]}: seeding: POST /notes answered $code"; }
    done
    for n in ${cfg[$side.nodes]}; do
        for ((i = 0; ; i++)); do
            [[ $(sql "$side" "$n" "SELECT COUNT(*) FROM app.notes" 2>/dev/null) == "$SEED" ]] && break
            ((i < 300)) || { logs "$side"; die "${label[$side]}: $n never had the $SEED seed notes"; }
            sleep 0.1
        done
    done
    say "${label[$side]}: ready after $((ready - started)) s, $SEED notes on every node after $((SECONDS - ready)) s more"
    taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" --timeout 10s "https://$fip:$https/" >/dev/null 2>&1 || true
}

# --- load and measurements ----------------------------------------------------------------

# wrk's script: statuses counted, and for POST a form body and a client address per request.
cat >"$work/bench.lua" <<'EOF'
local threads = {}
local next_id = 1
function setup(thread)
    thread:set("id", next_id)
    next_id = next_id + 1
    table.insert(threads, thread)
end

statuses = {}
local post = os.getenv("BENCH_POST") == "1"
local clients = tonumber(os.getenv("BENCH_CLIENTS") or "4096")
local n = 0

function init(args)
    if post then
        wrk.method = "POST"
        wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
        wrk.body = "body=" .. string.rep("a+benchmark+note+", 6)
    end
end

if post then
    function request()
        n = n + 1
        local i = n % clients
        wrk.headers["X-Forwarded-For"] =
            string.format("10.%d.%d.%d", id % 255, math.floor(i / 256) % 256, i % 256)
        return wrk.format()
    end
end

function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
    local all = {}
    for _, t in ipairs(threads) do
        for status, count in pairs(t:get("statuses")) do
            all[status] = (all[status] or 0) + count
        end
    end
    local list, bad = {}, 0
    for status, count in pairs(all) do
        table.insert(list, status .. ":" .. count)
        if status >= 400 then bad = bad + count end
    end
    table.sort(list)
    local e = summary.errors
    io.write(string.format("BENCH %d %d %d %d %s\n", summary.requests, summary.duration,
        latency:percentile(99), bad + e.connect + e.read + e.write + e.timeout,
        (#list > 0 and table.concat(list, ",") or "-") ..
        string.format(",sock:%d/%d/%d/%d", e.connect, e.read, e.write, e.timeout)))
end
EOF

# The stack CPUs, one per line.
stack_cpu_list=$(tr ',' '\n' <<<"$STACK_CPUS" | awk -F- '{for (i = $1; i <= ($2 == "" ? $1 : $2); i++) print i}' | paste -sd,)

declare -A roles # pid -> kind of process, for the cluster running now

role() { # pid -> the kind of process; a `mariadb` client is its parent's child
    local -a argv=() f=()
    local comm='' line=''
    mapfile -d "" -t argv 2>/dev/null <"/proc/$1/cmdline" || true
    read -r comm 2>/dev/null <"/proc/$1/comm" || true
    case ${argv[0]:-$comm} in
    "nginx: master"*) echo nginx-master ;;
    "nginx: worker"*) echo nginx-worker ;;
    */appliance | appliance)
        if [[ ${argv[1]:-} == run ]]; then echo supervisor; else echo "${argv[1]:-appliance}"; fi
        ;;
    */mariadb | mariadb)
        read -r line 2>/dev/null <"/proc/$1/stat" || true
        read -r -a f <<<"${line##*") "}"
        echo "$(role "${f[1]:-0}")-children"
        ;;
    *)
        line=${argv[0]:-$comm}
        echo "${line##*/}"
        ;;
    esac
}

# "time <s>" and "busy <ticks of the stack CPUs>", then "pid kind self-ticks reaped-children-ticks"
# per process of the cluster. Builtins only after the process list: it takes milliseconds.
cpu_snapshot() {
    local pid line busy=0
    local -a f pids
    mapfile -t pids < <(for pid in "${stack_pids[@]}"; do descendants "$pid"; done)
    for pid in "${pids[@]}"; do
        [[ -n ${roles[$pid]:-} ]] || roles[$pid]=$(role "$pid")
    done
    echo "time $EPOCHREALTIME"
    while read -r -a f; do
        if [[ ${f[0]} == cpu[0-9]* && ,$stack_cpu_list, == *",${f[0]#cpu},"* ]]; then
            busy=$((busy + f[1] + f[2] + f[3] + f[6] + f[7] + f[8]))
        fi
    done </proc/stat
    echo "busy $busy"
    for pid in "${pids[@]}"; do
        read -r line 2>/dev/null <"/proc/$pid/stat" || continue
        read -r -a f <<<"${line##*") "}"
        echo "$pid ${roles[$pid]} $((f[11] + f[12])) $((f[13] + f[14]))"
    done
}

# before-file after-file -> "window <s>", then "kind ticks" (what a kind reaped: "<kind>-children").
cpu_delta() {
    awk 'FNR == NR {if ($1 == "time") t0 = $2; else if ($1 == "busy") b0 = $2; else {s0[$1] = $3; c0[$1] = $4}; next}
        $1 == "time" {print "window", $2 - t0; next}
        $1 == "busy" {print "stack-cpus-busy", $2 - b0; next}
        {self = $3 - s0[$1]; kids = $4 - c0[$1]; t[$2] += self; if (kids > 0) t[$2 "-children"] += kids; all += self + kids}
        END {for (r in t) print r, t[r]; print "all-stack-processes", all}' "$1" "$2"
}

declare -A results # side@scenario@what -> values of every round, space separated

# measure side scenario url [post] [cpu]: one wrk run, results appended.
measure() {
    local side=$1 scenario=$2 url=$3 post=${4:-0} cpu=${5:-0} out line
    if ((cpu)); then cpu_snapshot >"$work/cpu.before"; fi
    out=$(BENCH_POST=$post BENCH_CLIENTS=$CLIENTS taskset -c "$LOAD_CPUS" \
        wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s -s "$work/bench.lua" "$url" 2>&1) || true
    if ((cpu)); then cpu_snapshot >"$work/cpu.after"; fi
    line=$(grep '^BENCH ' <<<"$out") || { echo "$out" >&2; die "wrk gave no result for $url"; }
    local requests duration p99 errors statuses rps
    read -r _ requests duration p99 errors statuses <<<"$line"
    rps=$(awk -v n="$requests" -v d="$duration" 'BEGIN {printf "%.1f", (d > 0 ? n / (d / 1e6) : 0)}')
    results[$side@$scenario@rps]+="$rps "
    results[$side@$scenario@p99]+="$(awk -v p="$p99" 'BEGIN {printf "%.1f", p / 1000}') "
    results[$side@$scenario@err]+="$errors "
    results[$side@$scenario@statuses]+="$statuses "
    printf '  %-6s %-26s %9s req/s  p99 %8.1f ms  %s\n' "$side" "$scenario" "$rps" "$(awk -v p="$p99" 'BEGIN {print p / 1000}')" "$statuses" >&2
    if ((cpu)); then
        local secs=1 r ticks
        while read -r r ticks; do
            if [[ $r == window ]]; then
                secs=$ticks
                continue
            fi
            results[$side@$scenario@cpu@$r@us]+="$(awk -v t="$ticks" -v hz="$HZ" -v n="$requests" 'BEGIN {printf "%.0f", (n > 0 ? t / hz * 1e6 / n : 0)}') "
            results[$side@$scenario@cpu@$r@pct]+="$(awk -v t="$ticks" -v hz="$HZ" -v s="$secs" 'BEGIN {printf "%.1f", t / hz / s * 100}') "
        done < <(cpu_delta "$work/cpu.before" "$work/cpu.after")
    fi
}

trim_start() { # side: keeps the primary's notes table small while POST runs
    local side=$1 primary=${cfg[$1.primary]}
    while sleep 1; do
        echo "DELETE FROM app.notes WHERE id < (SELECT m FROM (SELECT CAST(MAX(id) AS SIGNED) - $KEEP AS m FROM app.notes) t);"
    done | mariadb --force --socket="$work/$side/$primary/run/mysqld/mysqld.sock" --user=root >/dev/null 2>&1 &
    trimmer=$!
}
trim_stop() {
    if [[ -n $trimmer ]]; then kill "$trimmer" 2>/dev/null || true; wait "$trimmer" 2>/dev/null || true; fi
    trimmer=''
}

scenarios=("GET / end to end" "POST /notes end to end" "balancer -> nginx file" "nginx file" "nginx -> app GET /" "app GET /")

round() {
    local side=$1 fip=$FLOATING_IP https=${cfg[$1.https]} p=${cfg[$1.addr.${cfg[$1.primary]}]}
    say "${label[$side]} ($side): starting the local cluster"
    start_cluster "$side"
    measure "$side" "${scenarios[0]}" "https://$fip:$https/" 0 1
    measure "$side" "${scenarios[2]}" "https://$fip:$https/node.html"
    measure "$side" "${scenarios[3]}" "http://$p:${cfg[$side.web]}/node.html"
    measure "$side" "${scenarios[4]}" "http://$p:${cfg[$side.web]}/"
    measure "$side" "${scenarios[5]}" "http://$p:${cfg[$side.app]}/"
    trim_start "$side"
    measure "$side" "${scenarios[1]}" "https://$fip:$https/notes" 1 1
    trim_stop
    local stopping=$SECONDS
    stop_cluster
    say "${label[$side]}: stopped in $((SECONDS - stopping)) s"
}

say "stack on CPU $STACK_CPUS, wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s on CPU $LOAD_CPUS; $ROUNDS rounds; base ${label[base]}, after ${label[after]}"
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then order="base after"; else order="after base"; fi
    for side in $order; do round "$side"; done
    say "round $r/$ROUNDS done"
done

# --- tables -------------------------------------------------------------------------------

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR] = $1} END {if (NR == 0) print 0; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
spread() { tr ' ' '\n' | awk 'NF' | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%s-%s", lo, hi}'; }
sum() { tr ' ' '\n' | awk 'NF {s += $1} END {print s + 0}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "n/a"; else printf "%.2f", a / b}'; }
# Every round's statuses merged: "200:100,303:5,sock:0/0/0/0 ..." -> "200:300 sock:0/1/0/0".
merge_statuses() {
    tr -s ' ,' '\n' | awk -F: 'NF == 2 && $1 != "sock" {n[$1] += $2} $1 == "sock" {split($2, s, "/"); for (i = 1; i <= 4; i++) k[i] += s[i]}
        END {for (c in n) printf "%s:%d ", c, n[c]; if (k[1] + k[2] + k[3] + k[4]) printf "socket-errors(connect/read/write/timeout):%d/%d/%d/%d", k[1], k[2], k[3], k[4]}'
}

echo
echo "End-to-end and per-hop requests/s: base ${label[base]} vs after ${label[after]}, $ROUNDS rounds of ${DURATION}s, wrk -c$CONNECTIONS"
echo "(stack on CPU $STACK_CPUS, wrk on CPU $LOAD_CPUS; the median, then min-max over rounds; errors: statuses >= 400 and socket errors, all rounds)"
printf "%-24s %-14s %24s %10s %8s %10s\n" "scenario" "rev" "req/s median (min-max)" "p99 ms" "errors" "after/base"
for s in "${scenarios[@]}"; do
    for side in base after; do
        k="$side@$s"
        rps=$(median <<<"${results[$k@rps]}")
        if [[ $side == after ]]; then
            rat=$(ratio "$rps" "$(median <<<"${results[base@$s@rps]}")")
            name=''
        else
            rat=''
            name=$s
        fi
        printf "%-24s %-14s %24s %10s %8s %10s\n" "$name" "${label[$side]}" \
            "$rps ($(spread <<<"${results[$k@rps]}"))" "$(median <<<"${results[$k@p99]}")" \
            "$(sum <<<"${results[$k@err]}")" "$rat"
    done
done

for s in "${scenarios[0]}" "${scenarios[1]}"; do
    echo
    echo "Where the time goes, $s: CPU µs per request and % of one core, per kind of process (both nodes), medians"
    printf "%-28s %12s %10s %12s %10s\n" "process" "${label[base]} µs" "%core" "${label[after]} µs" "%core"
    measured=$(for k in "${!results[@]}"; do
        [[ $k == "base@$s@cpu@"*"@us" || $k == "after@$s@cpu@"*"@us" ]] || continue
        r=${k#*@cpu@}
        echo "${r%@us}"
    done)
    # The stack's own processes first, then anything else found, then the totals.
    order=$({
        printf '%s\n' balancer nginx-worker nginx-master app app-children mariadbd mariadb \
            supervisor logmon admin db-agent db-agent-children
        grep -vx -e all-stack-processes -e stack-cpus-busy <<<"$measured" | sort
        printf '%s\n' all-stack-processes stack-cpus-busy
    } | awk 'NF && !seen[$0]++')
    for r in $order; do
        grep -qx -- "$r" <<<"$measured" || continue
        printf "%-28s %12s %10s %12s %10s\n" "$r" \
            "$(median <<<"${results[base@$s@cpu@$r@us]:-}")" "$(median <<<"${results[base@$s@cpu@$r@pct]:-}")" \
            "$(median <<<"${results[after@$s@cpu@$r@us]:-}")" "$(median <<<"${results[after@$s@cpu@$r@pct]:-}")"
    done
done
echo
echo "statuses, all rounds:"
for s in "${scenarios[@]}"; do
    for side in base after; do
        printf "  %-24s %-14s %s\n" "$s" "${label[$side]}" "$(merge_statuses <<<"${results[$side@$s@statuses]}")"
    done
done
echo
echo "raw: $(for k in "${!results[@]}"; do [[ $k == *"@cpu@"* ]] || echo -n "$k=[${results[$k]% }] "; done)"
