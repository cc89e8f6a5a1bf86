#!/usr/bin/env bash
# Checkouts with read-your-writes (issue 10 "Measured"): claim -> wallet reads -> lock ->
# redeem, closed loop, on each backend, with the persister on; claims/s, hot-wallet reads/s
# and lock+redeem pairs/s of the same run, how many wallet reads missed the coupon just
# claimed and how many locks were answered 404 (both 0 with read-your-writes), where the
# wallet pages came from (cache / database), and the CPU per checkout of the gateway and
# redis-server.
#
#   scripts/bench-checkout.sh [LABEL]    # writes loadtest/results/<UTC date>-checkout-rw.md
#
# Starts its own redis-server (free port, no persistence) and PostgreSQL database (dropped
# at the end); every load generator run is bounded in time and targets 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-common.sh
source scripts/bench-gateway.sh

LABEL=${1:-$(git rev-parse --short HEAD)}
SECS=${BENCH_SECONDS:-10}
CONNS=${BENCH_CONNECTIONS:-50}
OUT="loadtest/results/$(date -u +%Y-%m-%d)-checkout-rw.md"

build_release
start_redis
start_pg_db claimgate_ckbench

run() { # run NAME SEED REDIS_PID|-: one checkout run on the gateway at $GPORT; sets ROW
  local name=$1 seed=$2 rpid=$3 g0 r0=0 g1 r1=0
  g0=$(cpu_ticks "$GPID"); [ "$rpid" = - ] || r0=$(cpu_ticks "$rpid")
  timeout 300 "$LT" --url "http://127.0.0.1:$GPORT" -q --scenario checkout --seed "$seed" \
    --connections "$CONNS" --duration "${SECS}s" --verify --json "$WORK/$name.json" \
    || log "warning: $name: --verify failed (shown in its row)"
  g1=$(cpu_ticks "$GPID"); [ "$rpid" = - ] || r1=$(cpu_ticks "$rpid")
  local cache db partial changes
  cache=$(metric claimgate_wallet_reads_total 'source="cache"')
  db=$(metric claimgate_wallet_reads_total 'source="database"')
  partial=$(metric claimgate_wallet_reads_total 'source="partial"')
  changes=$(metric claimgate_coupon_changes_total 'outcome="written"')
  ROW=$(python3 - "$WORK/$name.json" "$name" "$((g1 - g0))" "$((r1 - r0))" "$tick_hz" \
    "$cache" "$db" "$partial" "$changes" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); c = d["checkout"]; l = c["latency_ms"]
name, gt, rt, hz, cache, db, partial, changes = sys.argv[2], *map(int, sys.argv[3:])
n = max(c["checkouts"], 1)
us = lambda t: f'{t / hz / n * 1e6:.0f}'
p = lambda s: f'{l[s]["p50"]} / {l[s]["p99"]}'
print(f'| {name} | {c["checkouts"]:,} | {c["claims_per_s"]:,.0f} | {c["wallet_reads_per_s"]:,.0f} '
      f'| {c["lock_redeem_pairs_per_s"]:,.0f} | {c["wallet_reads_without_coupon"]} of {c["wallet_reads"]:,} '
      f'| {c["lock_not_persisted_404"]} | {c["conflicts_409"]} | {cache:,} / {db:,} / {partial} | {changes:,} '
      f'| {us(gt)} | {us(rt) if rt else "-"} | {p("claim")} | {p("wallet")} | {p("lock")} | {p("redeem")} '
      f'| {d["verify"]["passed"]} passed, {d["verify"]["failed"]} failed |')
PY
)
}

log "redis backend, PostgreSQL"
RPID=${PIDS[-1]}
start_gateway --backend redis --redis-url "redis://127.0.0.1:$RPORT" --database-url "$PG_URL"
run redis 33 "$RPID"; ROW_REDIS=$ROW
stop_gateway
log "embedded backend, SQLite"
start_gateway --backend embedded --database-url "sqlite://$WORK/emb.db?mode=rwc" \
  --set embedded.aof_path="\"$WORK/emb.aof\""
run embedded 45 -; ROW_EMB=$ROW
stop_gateway

cat > "$OUT" <<MD
# Checkouts with read-your-writes, $(date -u +%Y-%m-%d) ($LABEL)

Issue 10, "Measured": in the checkout scenario (claim -> $(printf '%s' 3) wallet reads -> lock
-> redeem, closed loop, $CONNS connections, ${SECS} s, persister on), hot-wallet reads/s and
lock+redeem pairs/s beside the claim rate of the same run. \`scripts/bench-checkout.sh\`.

Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load
average before the run $(cut -d' ' -f1-3 /proc/loadavg); $(redis-server --version | cut -d' ' -f3),
$(psql --version | cut -d' ' -f3-); release build. Gateway, redis-server, PostgreSQL and the load
generator share the machine: read the ratios within a row, not the absolute rates.

| backend | checkouts | claims/s | wallet reads/s | lock+redeem pairs/s | wallet reads without the new coupon | locks 404 | 409 | wallet pages cache / database / partial | changes written on shards | gateway CPU µs per checkout | redis-server CPU µs per checkout | p50 / p99 ms claim | wallet | lock | redeem | verify |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
$ROW_REDIS
$ROW_EMB
MD
log "wrote $OUT"
cat "$OUT"
