#!/usr/bin/env bash
# Where the gateway spends its CPU on the claim path: one short, bounded run on 127.0.0.1.
#
#   scripts/profile-gateway.sh                  # redis backend, persister off
#   PROFILE_SECONDS=10 PERSISTER=true scripts/profile-gateway.sh
#
# It starts its own redis-server (free port, no persistence) and a release gateway on an
# embedded SQLite file (the persister is off by default: the claim path alone), then:
#   1. GET /healthz, closed loop: the gateway's CPU per request (the HTTP floor);
#   2. claims (flash-sale scenario, fresh users, stock never runs out), closed loop, under
#      `perf record -g` of the gateway: CPU per claim, and the profile's top symbols.
# It prints both CPU figures, their ratio (issue 14: gateway CPU per claim <= 2 x its CPU
# per GET /healthz) and the top of the profile (self time, by symbol), and leaves
# perf.data in $OUT (default target/profile).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${PROFILE_SECONDS:-8}
CONNS=${PROFILE_CONNECTIONS:-50}
PERSISTER=${PERSISTER:-false}
OUT=${OUT:-target/profile}
mkdir -p "$OUT"
. scripts/bench-common.sh

build_release
start_redis

GPORT=$(free_port)
"$BIN" --listen "127.0.0.1:$GPORT" --backend redis --redis-url "redis://127.0.0.1:$RPORT" \
  --database-url "sqlite://$WORK/p.db?mode=rwc" \
  --set limits.claim_per_user.per_second=0 --set limits.max_inflight=100000 \
  --set limits.admission_wait_ms=1000 --set log.level=\"warn\" \
  --set persister.enabled="$PERSISTER" serve >"$WORK/gw.log" 2>&1 &
GPID=$!
PIDS+=("$GPID")
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$GPORT/healthz" >/dev/null && break; sleep 0.1; done
lt() { "$LT" --url "http://127.0.0.1:$GPORT" -q "$@"; }

log "GET /healthz, ${SECS}s"
c0=$(cpu_ticks "$GPID")
lt --scenario trivial --threads 2 --connections "$CONNS" --duration "${SECS}s" --json "$WORK/t.json"
c1=$(cpu_ticks "$GPID")
T_N=$(jget "$WORK/t.json" 'd["requests"] if "requests" in d else round(d["rps"] * d["elapsed_s"])')
T_US=$(python3 -c "print(round(($c1-$c0)/$tick_hz/$T_N*1e6, 2))")

log "claims under perf, ${SECS}s"
perf record -F 499 --call-graph "${CALLGRAPH:-dwarf}" -o "$OUT/perf.data" -p "$GPID" -- sleep "$((SECS + 2))" 2>"$WORK/perf.log" &
PERF=$!
sleep 0.5
c0=$(cpu_ticks "$GPID")
lt --scenario flash-sale --seed 7 --users 10000000 --stock 100000000 --connections "$CONNS" \
  --duration "${SECS}s" --json "$WORK/c.json"
c1=$(cpu_ticks "$GPID")
wait "$PERF" || true
C_N=$(jget "$WORK/c.json" 'd["claims_ok"]')
C_US=$(python3 -c "print(round(($c1-$c0)/$tick_hz/$C_N*1e6, 2))")
RATIO=$(python3 -c "print(round($C_US/$T_US, 2))")

echo "gateway CPU per GET /healthz: $T_US us ($T_N requests)"
echo "gateway CPU per successful claim: $C_US us ($C_N claims), ratio $RATIO x (target <= 2)"
echo "top symbols (self):"
perf report -i "$OUT/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
  | grep -E "^ +[0-9]" | head -n "${TOP:-40}" || true
