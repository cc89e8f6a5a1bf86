#!/usr/bin/env bash
# bench-grants.sh: one bulk grant job of N users, timed, on a gateway of its own.
#
#   scripts/bench-grants.sh embedded [USERS]   # SQLite + the embedded backend (append-only file)
#   scripts/bench-grants.sh redis [USERS]      # PostgreSQL ($CLAIMGATE_TEST_PG) + a redis-server
#                                              # of its own (appendonly yes, everysec)
#
# Uses target/release/claimgate (build it first: cargo build --release). Starts the gateway
# on a free port with its data in a temporary directory, creates a batch with stock = USERS
# (default 100000), per_user_limit 1, 16 shards, streams USERS user ids as NDJSON to
# POST /v1/batches/{id}/grants, and polls GET /v1/jobs/{id} every 20 ms until the job ends.
# Prints: upload time (the 202 comes once the upload is spooled), job time (the 202 to the
# poll that saw `done`), wall time (upload start to done), users granted per second over the
# wall time, the job's counts, the batch's claimed count (must equal USERS), the CPU time
# the gateway (and redis-server) used over the wall time, and the load average. Extra
# `--set` overrides for the gateway: GRANTS_BENCH_SET="grants.concurrency=128 ...".
# Exit status 1 if the job did not grant every user exactly once.
set -euo pipefail

backend=${1:?usage: scripts/bench-grants.sh embedded|redis [USERS]}
users=${2:-100000}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CLAIMGATE_BIN:-$root/target/release/claimgate}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }
tmp=$(mktemp -d)
pids=()
pgdb=""
pg_admin=${CLAIMGATE_TEST_PG:-postgres://claimgate_test:claimgate_test@127.0.0.1:5432/postgres}
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$pgdb" ]; then psql "$pg_admin" -qtAc "DROP DATABASE IF EXISTS $pgdb WITH (FORCE)" >/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
base=http://127.0.0.1:$port
sets=(--set limits.claim_per_user.per_second=0)
for s in ${GRANTS_BENCH_SET:-}; do sets+=(--set "$s"); done

case $backend in
  embedded)
    args=(--backend embedded --database-url "sqlite://$tmp/bench.db?mode=rwc"
          --set "embedded.aof_path=\"$tmp/bench.aof\"")
    ;;
  redis)
    rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --dir "$tmp" --appendonly yes \
      --appendfsync everysec --save '' --daemonize no >"$tmp/redis.log" 2>&1 &
    pids+=($!)
    redis_pid=$!
    pgdb="claimgate_bench_$$"
    psql "$pg_admin" -qtAc "CREATE DATABASE $pgdb" >/dev/null
    args=(--backend redis --redis-url "redis://127.0.0.1:$rport" --database-url "${pg_admin%/*}/$pgdb")
    for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
    ;;
  *) echo "backend must be embedded or redis" >&2; exit 2 ;;
esac

CLAIMGATE_LOG__LEVEL=warn "$bin" "${args[@]}" "${sets[@]}" --listen "127.0.0.1:$port" serve \
  >"$tmp/gateway.out" 2>"$tmp/gateway.log" &
pids+=($!)
gw_pid=$!
redis_pid=${redis_pid:-}
# CPU seconds (user + system) a process used so far
cpu() { [ -n "$1" ] && awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) / t}' "/proc/$1/stat" || echo 0; }
for _ in $(seq 200); do curl -sf "$base/healthz" >/dev/null && break; sleep 0.05; done

start=$(date -u -d '1 hour ago' +%Y-%m-%dT%H:%M:%SZ)
end=$(date -u -d '30 days' +%Y-%m-%dT%H:%M:%SZ)
curl -sf -XPOST "$base/v1/batches" -d '{
  "id": "bench-grants", "name": "bulk grant bench", "stock": '"$users"', "per_user_limit": 1,
  "claim_window": {"start": "'"$start"'", "end": "'"$end"'"},
  "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
  "scope": {"kind": "all"}, "shards": 16}' >/dev/null

seq 0 $((users - 1)) | sed 's/.*/{"user_id": "user&"}/' >"$tmp/users.ndjson"
now() { date +%s.%N; }
c0=$(cpu "$gw_pid"); r0=$(cpu "$redis_pid")
t0=$(now)
accepted=$(curl -sf -XPOST "$base/v1/batches/bench-grants/grants" \
  -H 'content-type: application/x-ndjson' -T "$tmp/users.ndjson")
t1=$(now)
job=$(jq -r .job_id <<<"$accepted")
while :; do
  view=$(curl -sf "$base/v1/jobs/$job")
  [ "$(jq -r .state <<<"$view")" != running ] && break
  sleep 0.02
done
t2=$(now)
c1=$(cpu "$gw_pid"); r1=$(cpu "$redis_pid")
claimed=$(curl -sf "$base/v1/batches/bench-grants" | jq .stock.claimed)
granted=$(jq .counts.granted <<<"$view")

python3 - "$t0" "$t1" "$t2" "$users" "$granted" "$c0" "$c1" "$r0" "$r1" <<'EOF'
import os, sys
t0, t1, t2 = map(float, sys.argv[1:4]); users, granted = int(sys.argv[4]), int(sys.argv[5])
c0, c1, r0, r1 = map(float, sys.argv[6:10])
wall = t2 - t0
cpu = f"gateway CPU {c1 - c0:.1f} s" + (f", redis-server CPU {r1 - r0:.1f} s" if r1 else "")
print(f"upload {t1 - t0:.2f} s, job {t2 - t1:.2f} s, wall {wall:.2f} s, "
      f"{granted / wall:,.0f} users granted/s; {cpu}; load {os.getloadavg()[0]:.1f}")
EOF
echo "job: $(jq -c '{state, total, processed, counts, errors: (.errors | length)}' <<<"$view")"
echo "batch claimed: $claimed"
[ "$granted" = "$users" ] && [ "$claimed" = "$users" ]
