#!/usr/bin/env bash
# The persister's cost at idle and under load, for ONE build (run it once per build to
# compare; the machine is noisy, so compare ratios from runs made back to back).
#
#   BIN=target/release/claimgate LT=target/release/claimgate-loadtest \
#     scripts/bench-persister.sh LABEL >>loadtest/results/<date>-persister.md
#   PHASES=idle (or load) runs parts 1-2 (or 3) only.
#
# Measures, each bounded in time, 127.0.0.1 only:
#   1. idle CPU of `claimgate serve` holding N_ENDED (1000) ended batches of SHARDS (4)
#      shards each (created through the admin API with a claim window in the past), on the
#      embedded backend (SQLite) and on the redis backend (PostgreSQL): CPU seconds of the
#      gateway process over IDLE_SECONDS (30) from /proc/<pid>/stat (utime + stime), after
#      SETTLE_SECONDS (10);
#   2. claim-to-database latency of a batch created just before its first claim: the time
#      from the 201 of the claim until the coupon is in the owner's wallet (the wallet reads
#      the database), LAT_RUNS (5) fresh batches per backend, median and max;
#   3. the embedded gateway (SQLite) at full load: a LOAD_SECONDS (20) closed-loop
#      flash-sale, then the drain time (load end -> backlog 0 and every claim a row) and the
#      persister's rows/s while draining; also claims/s with the persister on and off.
# Prints markdown table rows (one per measure) on stdout; progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

LABEL=${1:-build}
BIN=${BIN:-target/release/claimgate}
LT=${LT:-target/release/claimgate-loadtest}
N_ENDED=${N_ENDED:-1000}
SHARDS=${SHARDS:-4}
IDLE=${IDLE_SECONDS:-30}
SETTLE=${SETTLE_SECONDS:-10}
LAT_RUNS=${LAT_RUNS:-5}
LOAD=${LOAD_SECONDS:-20}
PHASES=${PHASES:-idle load}   # which parts to run: idle (1, 2), load (3)
LOAD_ARGS=${LOAD_ARGS:-}       # extra gateway flags for part 3, e.g. "--set persister.batch_size=2000"
CONNS=${BENCH_CONNECTIONS:-50}
PG_ADMIN=${CLAIMGATE_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}
WORK=$(mktemp -d)
PIDS=()
PGDB="claimgate_pbench_$$"

log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  psql "$PG_ADMIN" -qtAc "DROP DATABASE IF EXISTS $PGDB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
. scripts/bench-gateway.sh  # start_gateway, stop_gateway, metric

# Creates N_ENDED batches whose claim window ended in 2021 (keep-alive HTTP from python).
create_ended() {
  python3 - "$GPORT" "$N_ENDED" "$SHARDS" <<'EOF'
import http.client, json, sys
port, n, shards = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
for i in range(n):
    body = json.dumps({
        "id": f"ended-{i}", "name": "ended", "stock": 1000, "per_user_limit": 1,
        "shards": shards,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2021-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7},
        "discount": {"kind": "fixed", "amount": 100}, "scope": {"kind": "all"},
        "exclusive": False,
        "eligibility": {"deny_users": [], "require_tags": [], "new_users_only": False},
    })
    c.request("POST", "/v1/batches", body, {"content-type": "application/json"})
    r = c.getresponse(); r.read()
    if r.status != 201:
        sys.exit(f"create ended-{i}: {r.status}")
EOF
}

# Median and max seconds from a batch's first claim (201) to the coupon in the wallet.
latency() {
  python3 - "$GPORT" "$LAT_RUNS" "$1" <<'EOF'
import http.client, json, sys, time
port, runs, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
def call(method, path, body=None):
    c.request(method, path, body, {"content-type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"null")
out = []
for i in range(runs):
    bid = f"fresh-{tag}-{i}"
    s, v = call("POST", "/v1/batches", json.dumps({
        "id": bid, "name": "fresh", "stock": 100, "per_user_limit": 1, "shards": 4,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7},
        "discount": {"kind": "fixed", "amount": 100}, "scope": {"kind": "all"},
        "exclusive": False,
        "eligibility": {"deny_users": [], "require_tags": [], "new_users_only": False}}))
    assert s == 201, (s, v)
    user = f"lat-{tag}-{i}"
    s, v = call("POST", f"/v1/batches/{bid}/claims", json.dumps({"user_id": user}))
    assert s == 201, (s, v)
    t0 = time.monotonic()
    coupon = v["coupon_id"]
    while True:
        s, w = call("GET", f"/v1/users/{user}/coupons")
        if s == 200 and coupon in json.dumps(w):
            break
        if time.monotonic() - t0 > 30:
            sys.exit("coupon not in the wallet after 30 s")
        time.sleep(0.002)
    out.append(time.monotonic() - t0)
    time.sleep(0.5)
out.sort()
print(f"{out[len(out)//2]:.3f} {out[-1]:.3f}")
EOF
}

idle_cpu() { # idle_cpu NAME GATEWAY_ARGS...
  local name=$1; shift
  start_gateway "$@"
  log "$name: creating $N_ENDED ended batches of $SHARDS shards"
  create_ended
  sleep "$SETTLE"
  local c0; c0=$(cpu_ticks "$GPID")
  sleep "$IDLE"
  local c1; c1=$(cpu_ticks "$GPID")
  local cpu; cpu=$(python3 -c "print(round(($c1 - $c0) / $TICK, 2))")
  local pct; pct=$(python3 -c "print(round(100 * ($c1 - $c0) / $TICK / $IDLE, 2))")
  log "$name: claim-to-database latency"
  local lat; lat=$(latency "$name")
  echo "| $LABEL | $name | idle CPU s over ${IDLE} s ($N_ENDED ended batches x $SHARDS shards) | $cpu ($pct% of a core) |"
  echo "| $LABEL | $name | claim-to-database s, fresh batch (median, max of $LAT_RUNS) | ${lat% *}, ${lat#* } |"
  stop_gateway
}

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" \
  --logfile "$WORK/redis.log" --daemonize no &
PIDS+=("$!")
for _ in $(seq 1 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
psql "$PG_ADMIN" -qtAc "CREATE DATABASE $PGDB" >/dev/null

if [[ " $PHASES " == *" idle "* ]]; then
idle_cpu embedded --backend embedded --database-url "sqlite://$WORK/idle.db?mode=rwc" \
  --set "embedded.aof_path=\"$WORK/idle.aof\""
idle_cpu redis --backend redis --redis-url "redis://127.0.0.1:$RPORT" \
  --database-url "${PG_ADMIN%/*}/$PGDB"
fi
[[ " $PHASES " == *" load "* ]] || exit 0

# ---- 3. the embedded gateway at full load, SQLite
load_run() { # load_run NAME GATEWAY_ARGS... ; prints claims/s, drain s, rows/s while draining
  local name=$1; shift
  rm -f "$WORK"/load.*
  start_gateway --backend embedded --database-url "sqlite://$WORK/load.db?mode=rwc" \
    --set "embedded.aof_path=\"$WORK/load.aof\"" ${LOAD_ARGS:-} "$@"
  local r0; r0=$(metric claimgate_persist_rows_total)
  "$LT" --url "http://127.0.0.1:$GPORT" -q --scenario flash-sale --seed 7 --users 10000000 \
    --stock 100000000 --connections "$CONNS" --duration "${LOAD}s" --json "$WORK/load.json" >&2
  local end; end=$(date +%s.%N)
  local ok; ok=$(python3 -c "import json; print(json.load(open('$WORK/load.json'))['claims_ok'])")
  local cps; cps=$(python3 -c "import json; print(round(json.load(open('$WORK/load.json'))['claims_per_s']))")
  local r_end; r_end=$(metric claimgate_persist_rows_total)
  local drained=""
  if [ "$name" != off ]; then
    for _ in $(seq 1 1200); do
      if [ "$(metric claimgate_persist_backlog)" = 0 ] && [ "$(( $(metric claimgate_persist_rows_total) - r0 ))" -ge "$ok" ]; then
        drained=$(python3 -c "print(round($(date +%s.%N) - $end, 2))"); break
      fi
      sleep 0.1
    done
  fi
  local rows=$(( $(metric claimgate_persist_rows_total) - r0 ))
  local rate; rate=$(python3 -c "d='$drained'; print(round(($rows - ($r_end - $r0)) / float(d)) if d and float(d) > 0 else 'n/a')")
  stop_gateway
  echo "$cps ${drained:-n/a} $rate $ok $rows"
}
log "embedded + SQLite: ${LOAD}s full load, persister on"
read -r cps_on drain rate ok rows <<<"$(load_run on)"
log "embedded: ${LOAD}s full load, persister off"
read -r cps_off _ _ _ _ <<<"$(load_run off --set persister.enabled=false)"
echo "| $LABEL | embedded+sqlite | ${LOAD} s full load: claims/s persister on / off | $cps_on / $cps_off ($(python3 -c "print(round(100 * (1 - $cps_on / $cps_off), 1))")% cost) |"
echo "| $LABEL | embedded+sqlite | drain s after the load ($ok claims, $rows rows) | $drain |"
echo "| $LABEL | embedded+sqlite | persister rows/s while draining | $rate |"
