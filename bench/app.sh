#!/usr/bin/env bash
# The demo application alone, against a real MariaDB: one revision's app against the work tree's,
# same run, same server, same load.
#
#   bench/app.sh                           # the work tree against OLD_REV (default 07d7f69)
#   OLD_REV=main ROUNDS=5 DURATION=10 bench/app.sh
#
# Each side is the `app` crate of its revision (with `api`, which it may use) built in release
# mode into a small runner that does what `appliance app` does: `app::run(Config::from_env())`
# (system allocator on both sides, no log subscriber). One MariaDB configured like a node's
# (ROW binlog, sync_binlog = 1, innodb_flush_log_at_trx_commit = 1, TLS with a certificate for
# 127.0.0.1 from a CA made here, the application's account REQUIRE SSL) serves both.
#
# Load: wrk, $CONNECTIONS keep-alive connections (a side that answers `Connection: close` costs
# wrk a reconnect per request, as it cost nginx). `GET /` reads a page of 50 notes of 200 bytes;
# `POST /notes` is a form post, each from another X-Forwarded-For address out of 5000 (so no
# rate limit applies: the app believes the last entry when it trusts no proxy) into an emptied
# table (so the 10 000-note cap is never reached; the script says so if it was). Rounds
# alternate the order (old new, new old, ...) because this machine is noisy; medians are
# reported.
#
# Sends traffic to 127.0.0.1 only. Not a test: it asserts nothing.
set -euo pipefail

OLD_REV=${OLD_REV:-07d7f69}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-16}
WRK_THREADS=${WRK_THREADS:-1}
DB_PORT=${DB_PORT:-13306}
APP_PORT=${APP_PORT:-18000}

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
cache=${BENCH_CACHE:-/tmp/tandem-app-bench}

need_tools wrk:wrk openssl:openssl mariadbd:mariadb-server

bench_workdir tandem-app-bench

# --- the two sides ----------------------------------------------------------------------------

# $1: side name; $2: a directory holding services/app and services/api; $3: that revision's root
# Cargo.toml; $4: its Cargo.lock. Builds $cache/$1/target/release/runner.
build_side() {
    local side=$1 src=$2 manifest=$3 lock=$4 ws=$cache/$1
    rm -rf "$ws/services" "$ws/runner"
    mkdir -p "$ws/services" "$ws/runner/src"
    cp -r "$src/services/app" "$src/services/api" "$ws/services/"
    # The revision's workspace manifest, with only these members.
    python3 - "$manifest" "$ws/Cargo.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
text = re.sub(r"members = \[[^\]]*\]", 'members = ["services/app", "services/api", "runner"]', text, count=1)
open(sys.argv[2], "w").write(text)
EOF
    cp "$lock" "$ws/Cargo.lock"
    cat >"$ws/runner/Cargo.toml" <<'EOF'
[package]
name = "runner"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
app.workspace = true
EOF
    cat >"$ws/runner/src/main.rs" <<'EOF'
//! What `appliance app` runs.
fn main() -> std::process::ExitCode {
    match app::Config::from_env().and_then(app::run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("app: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
EOF
    echo "building the $side app (release)..." >&2
    (cd "$ws" && CARGO_TARGET_DIR=$ws/target cargo build -q --release -p runner)
}

mkdir -p "$work/old"
git -C "$here" archive "$OLD_REV" services/app services/api Cargo.toml Cargo.lock | tar -x -C "$work/old"
old_desc="$(git -C "$here" rev-parse --short "$OLD_REV")"
build_side old "$work/old" "$work/old/Cargo.toml" "$work/old/Cargo.lock"
build_side new "$here" "$here/Cargo.toml" "$here/Cargo.lock"
new_desc="work tree at $(git -C "$here" rev-parse --short HEAD)$(git -C "$here" diff --quiet HEAD -- services/app services/api Cargo.toml || echo '+changes')"

# --- MariaDB ----------------------------------------------------------------------------------

db=$work/db
mkdir -p "$db/data" "$db/tmp"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$db/ca.key" -out "$db/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$db/key.pem" -out "$db/server.csr" 2>/dev/null
openssl x509 -req -in "$db/server.csr" -CA "$db/ca.pem" -CAkey "$db/ca.key" -CAcreateserial -days 2 \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1\n') -out "$db/cert.pem" 2>/dev/null
cat >"$db/my.cnf" <<EOF
[mariadbd]
user = $(id -un)
datadir = $db/data
tmpdir = $db/tmp
socket = $db/mysqld.sock
pid-file = $db/mysqld.pid
bind-address = 127.0.0.1
port = $DB_PORT
skip-name-resolve
server_id = 1
log_bin = binlog
binlog_format = ROW
sync_binlog = 1
innodb_flush_log_at_trx_commit = 1
innodb_buffer_pool_size = 128M
performance_schema = OFF
ssl_ca = $db/ca.pem
ssl_cert = $db/cert.pem
ssl_key = $db/key.pem
tls_version = TLSv1.2,TLSv1.3
EOF
mariadb-install-db --defaults-file="$db/my.cnf" --auth-root-authentication-method=normal --skip-test-db \
    --datadir="$db/data" >"$db/install.log" 2>&1
/usr/sbin/mariadbd --defaults-file="$db/my.cnf" 2>"$db/mariadbd.log" &
pids+=($!)
root() { mariadb --socket="$db/mysqld.sock" -uroot --batch --skip-column-names -e "$1"; }
for _ in $(seq 100); do root "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
root "CREATE DATABASE app; CREATE USER 'tandem_app'@'%' IDENTIFIED BY 'bench-password' REQUIRE SSL;
      GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP ON app.* TO 'tandem_app'@'%';
      CREATE TABLE app.notes (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, node VARCHAR(64) NOT NULL,
        body TEXT NOT NULL, created TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3))
        ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;"
printf '{"node":"bench","role":"primary","primary":{"name":"bench","address":"127.0.0.1","port":%s},"healthy":true,"error":null,"lag_s":null,"read_only":false,"io_running":null,"sql_running":null,"gtid_current_pos":null,"gtid_slave_pos":null,"gtid_binlog_pos":null,"updated_ms":1}\n' \
    "$DB_PORT" >"$work/db-status.json"

# --- load ------------------------------------------------------------------------------------

cat >"$work/post.lua" <<'EOF'
-- A form post per request, each from another of 5000 client addresses.
local threads = 0
id = 0
function setup(thread)
    thread:set("id", threads)
    threads = threads + 1
end
local n = 0
function request()
    n = n + 1
    local c = (n * 7 + id * 2503) % 5000
    local ip = string.format("10.9.%d.%d", math.floor(c / 250), c % 250 + 1)
    return wrk.format("POST", "/notes", {
        ["Content-Type"] = "application/x-www-form-urlencoded",
        ["X-Forwarded-For"] = ip,
    }, "body=a+benchmark+note+" .. n)
end
EOF

start_app() {
    local side=$1 run=$work/run-$1
    mkdir -p "$run"
    TANDEM_NODE=bench TANDEM_APP_ADDR=127.0.0.1 TANDEM_APP_PORT=$APP_PORT TANDEM_APP_RUN_DIR=$run \
        TANDEM_DB_HOST=127.0.0.1 TANDEM_DB_PORT=$DB_PORT TANDEM_DB_STATUS_FILE=$work/db-status.json \
        TANDEM_DB_SSL_CA=$db/ca.pem TANDEM_DB_USER=tandem_app TANDEM_DB_PASSWORD=bench-password \
        "$cache/$side/target/release/runner" 2>"$work/app-$side.log" &
    app_pid=$!
    pids+=("$app_pid")
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$APP_PORT") 2>/dev/null && return
        sleep 0.1
    done
    echo "the $side app did not start:" >&2
    cat "$work/app-$side.log" >&2
    exit 1
}

stop_app() {
    kill "$app_pid" 2>/dev/null || true
    wait "$app_pid" 2>/dev/null || true
}

# $1: a label; the rest: wrk's arguments. wrk's Requests/sec, or 0; failures (non-2xx/3xx
# answers, socket errors) and the latency percentiles go to stderr.
rps() {
    local label=$1 out
    shift
    out=$(wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$@" 2>&1)
    grep -E "Non-2xx|Socket errors| 50%| 99%" <<<"$out" | sed "s|^ *|    ($label) |" >&2 || true
    awk '/^Requests\/sec:/ {print $2; found=1} END {if (!found) print 0}' <<<"$out"
}

seed_page() {
    root "USE app; TRUNCATE notes; INSERT INTO notes (node, body)
          SELECT 'bench', REPEAT('n', 200) FROM seq_1_to_50;"
}

declare -A get post
for round in $(seq "$ROUNDS"); do
    order="old new"
    ((round % 2 == 0)) && order="new old"
    for side in $order; do
        start_app "$side"
        seed_page
        wrk -t1 -c4 -d1s "http://127.0.0.1:$APP_PORT/" >/dev/null 2>&1 # warm-up
        g=$(rps "$side GET /" "http://127.0.0.1:$APP_PORT/")
        root "TRUNCATE app.notes"
        p=$(rps "$side POST /notes" -s "$work/post.lua" "http://127.0.0.1:$APP_PORT/notes")
        get[$side]+="$g " post[$side]+="$p "
        rows=$(root "SELECT COUNT(*) FROM app.notes")
        ((rows >= 10000)) && echo "    ($side) the table reached the note cap: shorten DURATION" >&2
        stop_app
        echo "round $round $side: GET / $g/s, POST /notes $p/s ($rows notes written)" >&2
    done
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "demo app, requests/s (median of $ROUNDS rounds, wrk -c$CONNECTIONS -d${DURATION}s, MariaDB over TLS)"
printf '%-10s %14s %14s %8s\n' "" "old $old_desc" "new" "new/old"
for what in GET POST; do
    if [ "$what" = GET ]; then o=$(median "${get[old]}") n=$(median "${get[new]}"); label="GET /"
    else o=$(median "${post[old]}") n=$(median "${post[new]}"); label="POST /notes"; fi
    printf '%-12s %12s %14s %8s\n' "$label" "$o" "$n" "$(awk -v a="$n" -v b="$o" 'BEGIN {printf (b > 0 ? "%.1fx" : "-"), a / b}')"
done
echo "(new: $new_desc)"
