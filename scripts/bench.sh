#!/usr/bin/env bash
# The claimgate benchmark: ONE run on ONE machine, ceilings and gateway side by side.
#
#   scripts/bench.sh                 # writes loadtest/results/<UTC date>.md and updates BENCHMARKS.md
#   BENCH_SECONDS=5 PERSIST_SECONDS=20 scripts/bench.sh   # a shorter run
#
# It starts its own redis-server (free port, no persistence) and its own PostgreSQL
# database (dropped at the end), builds the release binaries, and measures:
#   1. the ceiling: redis-benchmark running lua/claim.lua by EVALSHA (-P 1 and -P 16), and
#      GET /healthz through the gateway (the HTTP ceiling);
#   2. the gateway on the redis backend: max successful claims/s (closed loop), then open
#      loop at 25/50/75% of that rate (latency from intended send times); again with the
#      persister off (the claim path alone, as with dedicated persister instances);
#   3b. 3x overload against bounded admission (p99 of admitted requests, memory);
#   3. the sold-out phase (answers from memory) and its Redis calls;
#   4. the embedded backend (max claims/s and its HTTP ceiling), product lookups/s and
#      checkout quotes/s (20-item cart, 50-coupon wallet) on it;
#   4c. checkouts (claim -> wallet reads -> lock -> redeem) on each backend: claims/s,
#      hot-wallet reads/s and lock+redeem pairs/s of the same run, with --verify;
#   4b. a bulk grant job of GRANT_USERS (100,000) users per backend: users granted/s
#      (scripts/bench-grants.sh);
#   5. persistence: a PERSIST_SECONDS claim run per database with the backlog sampled every
#      second, the drain time after it, and persister rows/s (PostgreSQL and SQLite);
# plus CPU seconds per 1,000 claims (gateway, redis-server) and Redis commands per claim.
# The main load generator runs also draw charts (claimgate-loadtest --report: throughput,
# latency percentiles and the persistence backlog over time), kept beside the results as
# loadtest/results/<date>-<run>.svg and shown in the report.
# Every load generator run is bounded in time and targets 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${BENCH_SECONDS:-10}
PSECS=${PERSIST_SECONDS:-60}
CONNS=${BENCH_CONNECTIONS:-50}
PG_ADMIN=${CLAIMGATE_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}
DATE=$(date -u +%Y-%m-%d)
OUT_DIR=loadtest/results
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/$DATE.md"
WORK=$(mktemp -d)
PIDS=()
PGDB="claimgate_bench_$$"

log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for db in "$PGDB" "${PGDB}_p"; do
    psql "$PG_ADMIN" -qtAc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

log "building release binaries"
cargo build --release --locked -p claimgate -p claimgate-loadtest >&2
BIN=target/release/claimgate
LT=target/release/claimgate-loadtest

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" \
  --logfile "$WORK/redis.log" --daemonize no &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
R="redis-cli -p $RPORT"
psql "$PG_ADMIN" -qtAc "CREATE DATABASE $PGDB" >/dev/null
PG_URL="${PG_ADMIN%/*}/$PGDB"

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
tick_hz=$(getconf CLK_TCK)
evalsha_calls() { $R info commandstats | tr -d '\r' | awk -F'[=,]' '/^cmdstat_evalsha:/{print $2}' | grep . || echo 0; }
all_calls() { $R info commandstats | tr -d '\r' | awk -F'[=,]' '/^cmdstat_/{s+=$2} END{print s+0}'; }
jget() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$1" "$2"; }

. scripts/bench-gateway.sh  # start_gateway, stop_gateway, metric
wait_drained() { # phases start quiescent: the persister has written everything so far
  for _ in $(seq 1 1200); do
    [ "$(metric claimgate_persist_backlog)" = 0 ] && { sleep 2; return; }
    sleep 0.25
  done
  log "warning: persistence backlog not drained after 300 s"
}
lt() { "$LT" --url "http://127.0.0.1:$GPORT" -q "$@"; }
CHARTS=""
chart() { # chart NAME CAPTION: sets CHART to the run's SVG (kept in $OUT_DIR) and lists it in the report
  CHART="$OUT_DIR/$DATE-$1.svg"
  CHARTS+="### $2"$'\n\n'"![$2]($DATE-$1.svg)"$'\n\n'
}

# ---------------------------------------------------------------- 1. ceilings: redis-benchmark
log "ceiling: redis-benchmark EVALSHA claim.lua"
SHA=$($R SCRIPT LOAD "$(cat lua/claim.lua)")
K="cg:{rb:0}"
$R --eval lua/setup.lua "$K:meta" "$K:stock" "$K:deny" "$K:xseq" , 1000000000 11 \
  fp bench state active start 0 end 9999999999999 limit 1000000 daily 0 vdays 7 vfrom 0 vto 0 shards 1 ver 1 >/dev/null
CLAIM_KEYS="8 $K:meta $K:stock $K:users $K:daily $K:req $K:log $K:deny $K:claimed"
# ARGV: n=1 claim, max log 0, batch rb, shard 0, day offset 0, then user, request id, nonce
rb() { # rb PIPELINE -> requests/s
  local n=$(( ${1} == 1 ? 40000 * SECS / 10 * 10 : 150000 * SECS / 10 * 10 ))
  redis-benchmark -p "$RPORT" -c "$CONNS" -n "$n" -P "$1" -r 100000000 --csv \
    EVALSHA "$SHA" $CLAIM_KEYS 1 0 rb 0 0 u__rand_int__ r__rand_int__ n | tail -n1 | cut -d'"' -f4
}
RB_P1=$(rb 1)
RB_P16=$(rb 16)
$R del "$K:log" >/dev/null
RB_CMD="redis-benchmark -c $CONNS -P 1 -r 100000000 EVALSHA <sha of lua/claim.lua> $CLAIM_KEYS 1 0 rb 0 0 u__rand_int__ r__rand_int__ n"

# ---------------------------------------------------------------- 2. gateway, redis backend
log "gateway (redis backend): HTTP ceiling, max claims/s, open loop"
start_gateway --backend redis --redis-url "redis://127.0.0.1:$RPORT" --database-url "$PG_URL"
# trivial and sold-out phases: 2 generator threads on both sides of the ratio (with 1 thread
# the generator, not the gateway, is the bottleneck of a POST-with-body workload)
lt --scenario trivial --threads 2 --connections "$CONNS" --duration "${SECS}s" --json "$WORK/trivial.json"
TRIVIAL=$(jget "$WORK/trivial.json" 'round(d["rps"])')

c0_gw=$(cpu_ticks "$GPID"); c0_rd=$(cpu_ticks "$REDIS_PID"); e0=$(evalsha_calls); a0=$(all_calls)
chart max 'redis backend, persister on: max claims/s (closed loop)'
lt --scenario flash-sale --seed 11 --users 10000000 --stock 100000000 --connections "$CONNS" \
  --duration "${SECS}s" --json "$WORK/max.json" --report "$CHART"
c1_gw=$(cpu_ticks "$GPID"); c1_rd=$(cpu_ticks "$REDIS_PID"); e1=$(evalsha_calls); a1=$(all_calls)
MAX=$(jget "$WORK/max.json" 'round(d["claims_per_s"])')
MAX_OK=$(jget "$WORK/max.json" 'd["claims_ok"]')
MAX_P99=$(jget "$WORK/max.json" 'd["latency_ms"]["p99"]')
GW_CPU=$(python3 -c "print(round(($c1_gw-$c0_gw)/$tick_hz/$MAX_OK*1000, 4))")
RD_CPU=$(python3 -c "print(round(($c1_rd-$c0_rd)/$tick_hz/$MAX_OK*1000, 4))")
CMDS_PER_CLAIM=$(python3 -c "print(round(($e1-$e0)/$MAX_OK, 4))")
ALL_PER_CLAIM=$(python3 -c "print(round(($a1-$a0)/$MAX_OK, 4))")

OPEN_ROWS=""
seed=20
for pct in 25 50 75; do
  rate=$(( MAX * pct / 100 ))
  [ "$rate" -ge 1 ] || rate=1
  seed=$((seed + 1))
  report_args=()
  if [ "$pct" = 50 ]; then
    chart open50 'redis backend, persister on: open loop at 50% of max'
    report_args=(--report "$CHART")
  fi
  lt --scenario flash-sale --seed "$seed" --users 10000000 --stock 100000000 --connections "$CONNS" \
    --rate "$rate" --duration "${SECS}s" --json "$WORK/open$pct.json" "${report_args[@]}"
  OPEN_ROWS+="| ${pct}% | $rate | $(jget "$WORK/open$pct.json" 'round(d["claims_per_s"])') | $(jget "$WORK/open$pct.json" 'd["latency_ms"]["p50"]') | $(jget "$WORK/open$pct.json" 'd["latency_ms"]["p90"]') | $(jget "$WORK/open$pct.json" 'd["latency_ms"]["p99"]') | $(jget "$WORK/open$pct.json" 'd["latency_ms"]["p999"]') | $(jget "$WORK/open$pct.json" 'd["unsent"]') |"$'\n'
done
P99_AT_50=$(jget "$WORK/open50.json" 'd["latency_ms"]["p99"]')
wait_drained

# ---------------------------------------------------------------- 2b. claim path alone
# The same gateway with its persister off, as when dedicated persister instances (and the
# database) run on other machines: here they would share these two cores.
log "gateway (redis backend, persister off): max claims/s, p99 at 50%"
stop_gateway
start_gateway --backend redis --redis-url "redis://127.0.0.1:$RPORT" --database-url "$PG_URL" \
  --set persister.enabled=false
e0=$(evalsha_calls)
chart np-max 'redis backend, persister off: max claims/s (closed loop)'
lt --scenario flash-sale --seed 12 --users 10000000 --stock 100000000 --connections "$CONNS" \
  --duration "${SECS}s" --json "$WORK/np-max.json" --report "$CHART"
e1=$(evalsha_calls)
NP_MAX=$(jget "$WORK/np-max.json" 'round(d["claims_per_s"])')
NP_P99=$(jget "$WORK/np-max.json" 'd["latency_ms"]["p99"]')
NP_CMDS=$(python3 -c "print(round(($e1-$e0)/$(jget "$WORK/np-max.json" 'd["claims_ok"]'), 4))")
lt --scenario flash-sale --seed 13 --users 10000000 --stock 100000000 --connections "$CONNS" \
  --rate "$(( NP_MAX / 2 ))" --duration "${SECS}s" --json "$WORK/np-open50.json"
NP_P99_AT_50=$(jget "$WORK/np-open50.json" 'd["latency_ms"]["p99"]')
NP_P50_AT_50=$(jget "$WORK/np-open50.json" 'd["latency_ms"]["p50"]')
stop_gateway
start_gateway --backend redis --redis-url "redis://127.0.0.1:$RPORT" --database-url "$PG_URL"

# ---------------------------------------------------------------- 3. sold-out phase
log "sold-out phase"
wait_drained   # the persister-off phase left its claims for this instance to persist
lt --scenario flash-sale --seed 31 --users 200 --stock 20 --connections 8 --requests 400 --json "$WORK/drain.json"
sleep 1.5   # the sold-out flag and the winners reach this instance
s0_eval=$(evalsha_calls)
s0_path=$(( $(metric claimgate_backend_calls_total 'script="claim"') + $(metric claimgate_backend_calls_total 'script="replay"') ))
chart soldout 'sold-out answers (from memory)'
lt --scenario sold-out --threads 2 --batch lt-31 --seed 32 --users 100000 --connections "$CONNS" --duration "${SECS}s" \
  --json "$WORK/soldout.json" --report "$CHART"
s1_eval=$(evalsha_calls)
s1_path=$(( $(metric claimgate_backend_calls_total 'script="claim"') + $(metric claimgate_backend_calls_total 'script="replay"') ))
SOLD=$(jget "$WORK/soldout.json" 'round(d["rps"])')
SOLD_410=$(jget "$WORK/soldout.json" 'd["by_outcome"].get("410 sold_out", 0)')
SOLD_REQ=$(jget "$WORK/soldout.json" 'd["requests"]')
SOLD_EVAL=$((s1_eval - s0_eval))
SOLD_PATH=$((s1_path - s0_path))
# ---------------------------------------------------------------- 4c. checkouts, redis backend
log "checkouts (redis backend, PostgreSQL wallet)"
checkout_run() { # checkout_run NAME SEED: a checkout run on the gateway at $GPORT; sets CHECKOUT_ROW
  lt --scenario checkout --seed "$2" --connections "$CONNS" --duration "${SECS}s" --verify \
    --json "$WORK/checkout-$1.json" || log "warning: checkout $1: --verify failed (shown in its row)"
  CHECKOUT_ROW=$(python3 - "$WORK/checkout-$1.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); c = d["checkout"]; l = c["latency_ms"]
p = lambda s: f'{l[s]["p50"]}/{l[s]["p99"]}'
print(f'{round(c["claims_per_s"])} /s claims, {round(c["wallet_reads_per_s"])} /s wallet reads, '
      f'{round(c["lock_redeem_pairs_per_s"])} /s lock+redeem pairs ({c["checkouts"]} checkouts; '
      f'lock 404 not yet persisted {c["lock_not_persisted_404"]}, gave up {c["lock_gave_up"]}, '
      f'409 {c["conflicts_409"]}; p50/p99 ms claim {p("claim")}, wallet {p("wallet")}, '
      f'lock {p("lock")}, redeem {p("redeem")}; verify {d["verify"]["passed"]} passed, '
      f'{d["verify"]["failed"]} failed)')
PY
)
}
checkout_run redis 33
CHECKOUT_REDIS=$CHECKOUT_ROW
stop_gateway

# ---------------------------------------------------------------- 3b. 3x overload
log "overload: open loop at 3x max with admission control"
OVER_INFLIGHT=16
start_gateway --backend redis --redis-url "redis://127.0.0.1:$RPORT" --database-url "$PG_URL" \
  --set limits.max_inflight=$OVER_INFLIGHT --set limits.admission_wait_ms=2
wait_drained
rss() { awk '/VmRSS/{print $2}' "/proc/$GPID/status"; }
lt --scenario flash-sale --seed 35 --users 10000000 --stock 100000000 --connections 100 \
  --rate "$(( MAX * 3 ))" --duration "${SECS}s" --timeout-ms 3000 --expect-shedding >/dev/null
RSS0=$(rss)
chart overload '3x overload with admission control (503 overloaded expected)'
lt --scenario flash-sale --seed 36 --users 10000000 --stock 100000000 --connections 100 \
  --rate "$(( MAX * 3 ))" --duration "${SECS}s" --timeout-ms 3000 --expect-shedding \
  --json "$WORK/over.json" --history "$WORK/over.jsonl" --report "$CHART"
RSS1=$(rss)
read -r OVER_ADMITTED OVER_SHED OVER_P99 OVER_P999 OVER_P99_SEND < <(python3 - "$WORK/over.jsonl" <<'PY'
import json, sys
lat, srv, shed = [], [], 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("phase") not in (None, "measure"):
        continue
    if r.get("status") == 503:
        shed += 1
    elif r.get("status") in (200, 201, 409, 410) and r.get("recv_us") is not None:
        start = r.get("intended_us") if r.get("intended_us") is not None else r["send_us"]
        lat.append((r["recv_us"] - start) / 1000.0)
        srv.append((r["recv_us"] - r["send_us"]) / 1000.0)
lat.sort(); srv.sort()
q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
print(len(lat), shed, round(q(lat, 0.99), 3), round(q(lat, 0.999), 3), round(q(srv, 0.99), 3))
PY
)
OVER_SENT=$(jget "$WORK/over.json" 'd["requests"]')
OVER_UNSENT=$(jget "$WORK/over.json" 'd["unsent"]')
OVER_P99_ALL=$(jget "$WORK/over.json" 'd["latency_ms"]["p99"]')
stop_gateway

# ---------------------------------------------------------------- 4. embedded backend
log "gateway (embedded backend)"
start_gateway --backend embedded --database-url "sqlite://$WORK/emb.db?mode=rwc" \
  --set "embedded.aof_path=\"$WORK/emb.aof\""
lt --scenario trivial --connections "$CONNS" --duration "${SECS}s" --json "$WORK/etrivial.json"
ETRIVIAL=$(jget "$WORK/etrivial.json" 'round(d["rps"])')
c0=$(cpu_ticks "$GPID")
chart emax 'embedded backend: max claims/s (closed loop)'
lt --scenario flash-sale --seed 41 --users 10000000 --stock 100000000 --connections "$CONNS" \
  --duration "${SECS}s" --json "$WORK/emax.json" --report "$CHART"
c1=$(cpu_ticks "$GPID")
EMAX=$(jget "$WORK/emax.json" 'round(d["claims_per_s"])')
EMAX_OK=$(jget "$WORK/emax.json" 'd["claims_ok"]')
EMAX_P99=$(jget "$WORK/emax.json" 'd["latency_ms"]["p99"]')
EGW_CPU=$(python3 -c "print(round(($c1-$c0)/$tick_hz/$EMAX_OK*1000, 4))")
erate=$(( EMAX / 2 ))
lt --scenario flash-sale --seed 42 --users 10000000 --stock 100000000 --connections "$CONNS" \
  --rate "$erate" --duration "${SECS}s" --json "$WORK/eopen50.json"
EP99_AT_50=$(jget "$WORK/eopen50.json" 'd["latency_ms"]["p99"]')
# campaign tools on this gateway: product pages (from memory), quotes (wallet in SQLite)
log "campaign tools: product lookups, quotes"
lt --scenario product-lookup --seed 43 --connections "$CONNS" --duration "${SECS}s" --json "$WORK/plookup.json"
PLOOKUP=$(jget "$WORK/plookup.json" 'round(d["rps"])'); PLOOKUP_P99=$(jget "$WORK/plookup.json" 'd["latency_ms"]["p99"]')
lt --scenario quote --seed 44 --connections "$CONNS" --duration "${SECS}s" --json "$WORK/quote.json"
QUOTE=$(jget "$WORK/quote.json" 'round(d["rps"])'); QUOTE_P99=$(jget "$WORK/quote.json" 'd["latency_ms"]["p99"]')
log "checkouts (embedded backend, SQLite wallet)"
checkout_run embedded 45
CHECKOUT_EMBEDDED=$CHECKOUT_ROW
stop_gateway

# ---------------------------------------------------------------- 4b. a bulk grant job
# One job of GRANT_USERS users per backend, on a gateway, redis-server and database of its
# own (scripts/bench-grants.sh: upload start to `done`, persister on).
GRANT_USERS=${GRANT_USERS:-100000}
grant_job() { # grant_job BACKEND -> "<wall s> <users/s>"
  local out
  out=$(CLAIMGATE_TEST_PG="$PG_ADMIN" scripts/bench-grants.sh "$1" "$GRANT_USERS")
  python3 -c 'import re,sys; m=re.search(r"wall ([0-9.]+) s, ([0-9,]+) users", sys.argv[1]); print(m.group(1), m.group(2).replace(",", ""))' "$out"
}
log "bulk grants: one job of $GRANT_USERS users per backend"
read -r GRANT_E_WALL GRANT_E_RATE < <(grant_job embedded)
read -r GRANT_R_WALL GRANT_R_RATE < <(grant_job redis)

# ---------------------------------------------------------------- 5. persistence under load
persist_run() { # persist_run NAME ARGS... ; appends to PERSIST_ROWS, writes $WORK/backlog-NAME.csv
  local name=$1; shift
  $R FLUSHALL >/dev/null   # nothing left over from the earlier phases
  start_gateway "$@"
  local csv="$WORK/backlog-$name.csv"
  echo "t_s,backlog,rows_total" >"$csv"
  (
    t=0
    while kill -0 "$GPID" 2>/dev/null; do
      echo "$t,$(metric claimgate_persist_backlog),$(metric claimgate_persist_rows_total)" >>"$csv"
      sleep 1; t=$((t + 1))
    done
  ) &
  local sampler=$!
  local r0; r0=$(metric claimgate_persist_rows_total)
  chart "persist-$name" "persistence under load: $name (backlog from /readyz)"
  lt --scenario flash-sale --seed "$RANDOM" --users 10000000 --stock 100000000 --connections "$CONNS" \
    --duration "${PSECS}s" --json "$WORK/persist-$name.json" \
    --report "$CHART"
  local end; end=$(date +%s.%N)
  local ok; ok=$(jget "$WORK/persist-$name.json" 'd["claims_ok"]')
  local peak; peak=$(awk -F, 'NR>1 && $2>m {m=$2} END{print m+0}' "$csv")
  local drained="" r_end; r_end=$(metric claimgate_persist_rows_total)
  for _ in $(seq 1 1200); do
    if [ "$(metric claimgate_persist_backlog)" = 0 ] && [ "$(( $(metric claimgate_persist_rows_total) - r0 ))" -ge "$ok" ]; then
      drained=$(python3 -c "print(round($(date +%s.%N) - $end, 2))"); break
    fi
    sleep 0.25
  done
  local rows=$(( $(metric claimgate_persist_rows_total) - r0 ))
  local wall; wall=$(python3 -c "print($(date +%s.%N) - $end + $(jget "$WORK/persist-$name.json" 'd["elapsed_s"]'))")
  local drain_rate; drain_rate=$(python3 -c "d='${drained}'; print(round(($rows - ($r_end - $r0)) / float(d)) if d else 'n/a')")
  PERSIST_ROWS+="| $name | $PSECS | $ok | $(jget "$WORK/persist-$name.json" 'round(d["claims_per_s"])') | $peak | ${drained:-not drained in 300 s} | $rows | $(python3 -c "print(round($rows/$wall))") | $drain_rate |"$'\n'
  stop_gateway
  kill "$sampler" 2>/dev/null || true
  cp "$csv" "$OUT_DIR/$DATE-backlog-$name.csv"
}
PERSIST_ROWS=""
log "persistence: PostgreSQL (${PSECS}s)"
psql "$PG_ADMIN" -qtAc "CREATE DATABASE ${PGDB}_p" >/dev/null
persist_run postgres --backend redis --redis-url "redis://127.0.0.1:$RPORT" --database-url "${PG_ADMIN%/*}/${PGDB}_p"
log "persistence: SQLite (${PSECS}s)"
persist_run sqlite --backend embedded --database-url "sqlite://$WORK/persist.db?mode=rwc" \
  --set "embedded.aof_path=\"$WORK/persist.aof\""

# ---------------------------------------------------------------- report
ratio() { python3 -c "print(round($1/$2, 2) if $2 else 'n/a')"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
cat >"$REPORT" <<EOF
# claimgate benchmark, $DATE

Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; load generator, gateway and
redis-server share it. Versions: claimgate $(git rev-parse --short HEAD 2>/dev/null || echo "?"),
$(rustc --version), $(redis-server --version | cut -d' ' -f1-3), $(psql --version).
Command: \`BENCH_SECONDS=$SECS PERSIST_SECONDS=$PSECS BENCH_CONNECTIONS=$CONNS scripts/bench.sh\`
(phases of ${SECS}s, $CONNS connections; release profile with lto = "fat", codegen-units = 1).

## Ceiling and gateway, same run

| measure | figure | ratio |
|---|---|---|
| redis-benchmark EVALSHA claim.lua, -P 1, -c $CONNS | $RB_P1 /s | 1.00 |
| redis-benchmark EVALSHA claim.lua, -P 16, -c $CONNS | $RB_P16 /s | $(ratio "$RB_P16" "$RB_P1") |
| HTTP ceiling: GET /healthz (redis backend gateway) | $TRIVIAL /s | |
| **redis backend, persister on: successful claims/s (closed loop)** | **$MAX /s** (p99 $MAX_P99 ms) | **$(ratio "$MAX" "$RB_P1") × redis-benchmark -P 1** |
| redis backend, persister on: p99 at 50% of max rate (open loop) | $P99_AT_50 ms | |
| **redis backend, persister off (claim path alone): successful claims/s** | **$NP_MAX /s** (p99 $NP_P99 ms; $NP_CMDS EVALSHA/claim) | **$(ratio "$NP_MAX" "$RB_P1") × redis-benchmark -P 1** |
| redis backend, persister off: p50 / p99 at 50% of max rate (open loop) | $NP_P50_AT_50 / $NP_P99_AT_50 ms | |
| sold-out answers/s (from memory) | $SOLD /s ($SOLD_410 × 410 of $SOLD_REQ) | **$(ratio "$SOLD" "$TRIVIAL") × trivial endpoint** |
| embedded backend: successful claims/s | $EMAX /s (p99 $EMAX_P99 ms; p99 at 50% rate $EP99_AT_50 ms) | **$(ratio "$EMAX" "$MAX") × redis backend** |
| embedded HTTP ceiling: GET /healthz | $ETRIVIAL /s | |
| product lookups/s (embedded gateway, from memory; 40 batches over 1,000 products) | $PLOOKUP /s (p99 $PLOOKUP_P99 ms) | $(ratio "$PLOOKUP" "$ETRIVIAL") × embedded HTTP ceiling |
| checkout quotes/s (embedded gateway; 20-item cart, wallet of 50 coupons in SQLite) | $QUOTE /s (p99 $QUOTE_P99 ms) | |
| checkouts, redis backend + PostgreSQL (claim, 3 wallet reads, lock, redeem per checkout) | $CHECKOUT_REDIS | |
| checkouts, embedded backend + SQLite | $CHECKOUT_EMBEDDED | |
| grant job, embedded + SQLite: $GRANT_USERS users (scripts/bench-grants.sh) | $GRANT_E_RATE users/s ($GRANT_E_WALL s) | |
| grant job, Redis + PostgreSQL: $GRANT_USERS users | $GRANT_R_RATE users/s ($GRANT_R_WALL s) | |

## Targets

| target | figure | verdict |
|---|---|---|
| claims/s ≥ 0.8 × redis-benchmark -P 1 -c $CONNS, persister on (PostgreSQL, persister, gateway, Redis and load generator on 2 cores) | $(ratio "$MAX" "$RB_P1") | $(verdict "$MAX >= 0.8 * $RB_P1") |
| the same, claim path alone (persister off) | $(ratio "$NP_MAX" "$RB_P1") | $(verdict "$NP_MAX >= 0.8 * $RB_P1") |
| p99 ≤ 5 ms at 50% of max rate, open loop, persister on | $P99_AT_50 ms | $(verdict "$P99_AT_50 <= 5") |
| the same, claim path alone | $NP_P99_AT_50 ms | $(verdict "$NP_P99_AT_50 <= 5") |
| at most 1 Redis command (round trip) per successful claim (group commit: one call carries the claims queued for its shard) | $CMDS_PER_CLAIM EVALSHA per claim (all callers, background loops and persister included; inside the scripts Redis counts $ALL_PER_CLAIM commands per claim: claim.lua's per-call reads and writes shared by the claims of a call, one XADD each, plus the persister's stream reads and acks) | $(verdict "$CMDS_PER_CLAIM <= 1.02") |
| 0 Redis calls for sold-out answers | $SOLD_PATH request-path script calls; $SOLD_EVAL EVALSHA in all during the phase (background refresh/persister included) | $(verdict "$SOLD_PATH == 0") |
| sold-out answers ≥ 0.8 × trivial endpoint | $(ratio "$SOLD" "$TRIVIAL") | $(verdict "$SOLD >= 0.8 * $TRIVIAL") |
| embedded ≥ redis backend | $(ratio "$EMAX" "$MAX") | $(verdict "$EMAX >= $MAX") |

## Open loop, redis backend (latency from intended send time, ms)

| share of max | target rate /s | achieved claims/s | p50 | p90 | p99 | p99.9 | unsent |
|---|---|---|---|---|---|---|---|
$OPEN_ROWS
## 3× overload (issue: admission control)

Open loop at 3 × the max claim rate ($(( MAX * 3 ))/s target, 100 connections) against a gateway with
\`limits.max_inflight=$OVER_INFLIGHT\`, \`limits.admission_wait_ms=2\`. On two shared cores the generator
cannot send 3 × what the gateway serves: the unsent column counts what it could not send, and
latency from the *intended* send time includes its own queue; latency from the *actual*
send time is what the gateway adds.

| requests sent | admitted and answered | shed (503 overloaded) | unsent by the generator | p99 admitted, from actual send | p99 / p99.9 admitted, from intended send | gateway RSS before → after |
|---|---|---|---|---|---|---|
| $OVER_SENT | $OVER_ADMITTED | $OVER_SHED | $OVER_UNSENT | $OVER_P99_SEND ms | $OVER_P99 / $OVER_P999 ms | $RSS0 kB → $RSS1 kB |

## Cost per claim (redis backend, closed-loop phase)

| | CPU seconds per 1,000 claims |
|---|---|
| gateway | $GW_CPU |
| redis-server | $RD_CPU |
| gateway, embedded backend (no redis-server) | $EGW_CPU |

## Persistence under sustained load

Backlog sampled every second (files \`$DATE-backlog-<db>.csv\` beside this report); the
drain time is from the end of the load until the backlog is 0 and every claim is a row.

| database | load s | claims | claims/s | peak backlog | drain s | rows | rows/s (load + drain) | rows/s while draining (no claim load) |
|---|---|---|---|---|---|---|---|---|
$PERSIST_ROWS
## Charts

Throughput, latency percentiles (p50/p90/p99 per interval) and the persistence backlog over
each run's measured phase, drawn by \`claimgate-loadtest --report\` (files
\`$DATE-<run>.svg\` beside this report).

$CHARTS
## Commands

- ceiling: \`$RB_CMD\` (and \`-P 16\`)
- HTTP ceiling: \`claimgate-loadtest --scenario trivial --threads 2 --connections $CONNS --duration ${SECS}s\`
- max claims: \`claimgate-loadtest --scenario flash-sale --users 10000000 --stock 100000000 --connections $CONNS --duration ${SECS}s\`
- open loop: the same with \`--rate <25|50|75% of max>\`
- sold out: \`claimgate-loadtest --scenario sold-out --threads 2 --batch lt-31 --users 100000 --connections $CONNS --duration ${SECS}s\` after draining lt-31
- product lookups: \`claimgate-loadtest --scenario product-lookup --connections $CONNS --duration ${SECS}s\` (creates 40 batches first)
- quotes: \`claimgate-loadtest --scenario quote --connections $CONNS --duration ${SECS}s\` (creates 50 batches, claims one coupon of each and waits for the wallet first)
- checkouts: \`claimgate-loadtest --scenario checkout --connections $CONNS --duration ${SECS}s --verify\` (claims one warm-up coupon of a batch created after the run's and waits for its wallet first)
- claim phases use one generator thread (measured: two threads leave less CPU to the gateway and Redis and lower the figure)
- gateway: \`claimgate --backend redis|embedded --set limits.claim_per_user.per_second=0 --set limits.max_inflight=100000 serve\`
EOF
# BENCHMARKS.md lives at the top of the tree: point its chart links into $OUT_DIR.
sed "s#]($DATE-#]($OUT_DIR/$DATE-#g" "$REPORT" >BENCHMARKS.md
log "wrote $REPORT and BENCHMARKS.md"
cat "$REPORT"
