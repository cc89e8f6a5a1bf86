#!/usr/bin/env bash
# Group commit (issue 14 item 1), measured: ONE run on ONE machine, the gateway with group
# commit on (stock.group_max_claims, default 64) and off (= 1), beside the ceilings of the
# same Redis instance.
#
#   scripts/bench-group.sh                          # prints a markdown table
#   GROUP_SECONDS=5 GROUP_CONNECTIONS=256 scripts/bench-group.sh
#   GROUP_PERSIST=1 scripts/bench-group.sh          # the persister on (SQLite), its Redis cost counted
#
# It starts its own redis-server (free port, no persistence) and release gateways (redis
# backend, persister off: the claim path alone; an embedded SQLite file they never write),
# and measures, each phase bounded in time and against 127.0.0.1 only:
#   1. redis-benchmark PING -P 16 at the same connection count: Redis CPU per PING;
#   2. redis-benchmark EVALSHA lua/claim.lua with ONE claim per call, -P 1 -c 50: claims/s
#      (the issue's ceiling for the gateway's successful claims/s) and Redis CPU per claim;
#   3. GET /healthz through the gateway: its CPU per request (the HTTP floor);
#   4. flash-sale claims (fresh users, stock never runs out), closed loop, group commit on,
#      then off: successful claims/s, Redis CPU and gateway CPU per successful claim, the
#      calls made and the mean claims per call (from the gateway's own metrics).
# Redis CPU = INFO cpu (used_cpu_user + used_cpu_sys) deltas of the whole redis-server;
# gateway CPU = /proc/<pid>/stat utime + stime deltas. With GROUP_PERSIST=1 the gateways run
# their persister (into a SQLite file), so Redis CPU per claim includes the persister's log
# reads and acks, and the table adds the log entries appended (XADD) and the persister's
# stream commands (XREADGROUP, XAUTOCLAIM, XACK, XDEL) per successful claim.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${GROUP_SECONDS:-8}
CONNS=${GROUP_CONNECTIONS:-256}
PERSIST=${GROUP_PERSIST:-0}
if [ "$PERSIST" = 1 ]; then PERSISTER=true; else PERSISTER=false; fi
. scripts/bench-common.sh

build_release
start_redis
R="redis-cli -p $RPORT"
rcpu() { $R info cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.6f", s}'; }
calls_of() { $R info commandstats | tr -d '\r' | awk -F'[=,:]' -v c="cmdstat_$1" '$1 == c {print $3}'; }

log "redis-benchmark PING -P 16 -c $CONNS"
$R config resetstat >/dev/null
c0=$(rcpu)
redis-benchmark -p "$RPORT" -c "$CONNS" -P 16 -n $((400000 * SECS / 8)) -q ping >/dev/null 2>&1 || true
c1=$(rcpu)
PINGS=$(calls_of ping)
PING_US=$(calc "round(($c1 - $c0) / $PINGS * 1e6, 3)")

log "redis-benchmark EVALSHA claim.lua (1 claim per call) -P 1 -c 50"
SHA=$($R script load "$(cat lua/claim.lua)")
B=rb
for k in meta stock users daily req log deny claimed; do KEYS+=("cg:{$B:0}:$k"); done
$R hset "cg:{$B:0}:meta" state active start 0 end 99999999999999 limit 1 daily 0 vdays 7 \
  vfrom 0 vto 0 ver 1 >/dev/null
$R set "cg:{$B:0}:stock" 1000000000 >/dev/null
$R config resetstat >/dev/null
c0=$(rcpu)
t0=$(date +%s.%N)
timeout $((SECS * 3)) redis-benchmark -p "$RPORT" -c 50 -P 1 -n $((12000 * SECS)) -r 1000000000 \
  evalsha "$SHA" 8 "${KEYS[@]}" 1 0 "$B" 0 0 u__rand_int__ r__rand_int__ n >/dev/null 2>&1 || true
t1=$(date +%s.%N)
c1=$(rcpu)
RB_CLAIMS=$($R get "cg:{$B:0}:claimed")
RB_RATE=$(calc "round($RB_CLAIMS / ($t1 - $t0))")
RB_US=$(calc "round(($c1 - $c0) / $RB_CLAIMS * 1e6, 2)")
$R flushall >/dev/null

. scripts/bench-gateway.sh
lt() { "$LT" --url "http://127.0.0.1:$GPORT" -q "$@"; }

declare -A RATE REDIS_US GW_US CALLS PER_CALL XADDS STREAM_OPS
for G in 64 1; do
  start_gateway --backend redis --redis-url "redis://127.0.0.1:$RPORT" \
    --database-url "sqlite://$WORK/p$G.db?mode=rwc" --set persister.enabled=$PERSISTER \
    --set stock.group_max_claims="$G"
  if [ "$G" = 64 ]; then
    log "GET /healthz, ${SECS}s, $CONNS connections"
    g0=$(cpu_ticks "$GPID")
    lt --scenario trivial --threads 2 --connections "$CONNS" --duration "${SECS}s" --json "$WORK/t.json"
    g1=$(cpu_ticks "$GPID")
    T_N=$(jget "$WORK/t.json" 'd["requests"] if "requests" in d else round(d["rps"] * d["elapsed_s"])')
    T_US=$(calc "round(($g1 - $g0) / $tick_hz / $T_N * 1e6, 2)")
  fi
  log "claims, group_max_claims=$G, ${SECS}s, $CONNS connections"
  m0=$(metric claimgate_claim_calls_total); m0=${m0:-0}
  k0=$(metric claimgate_claim_call_claims_total); k0=${k0:-0}
  $R config resetstat >/dev/null
  c0=$(rcpu); g0=$(cpu_ticks "$GPID")
  lt --scenario flash-sale --seed "$G" --users 1000000000 --stock 1000000000 --threads 2 \
    --connections "$CONNS" --duration "${SECS}s" --json "$WORK/c$G.json"
  c1=$(rcpu); g1=$(cpu_ticks "$GPID")
  m1=$(metric claimgate_claim_calls_total); k1=$(metric claimgate_claim_call_claims_total)
  N=$(jget "$WORK/c$G.json" 'd["claims_ok"]')
  RATE[$G]=$(jget "$WORK/c$G.json" 'round(d["claims_ok"] / d["elapsed_s"])')
  REDIS_US[$G]=$(calc "round(($c1 - $c0) / $N * 1e6, 2)")
  GW_US[$G]=$(calc "round(($g1 - $g0) / $tick_hz / $N * 1e6, 2)")
  CALLS[$G]=$(calc "round($m1 - $m0)")
  PER_CALL[$G]=$(calc "round(($k1 - $k0) / max(1, $m1 - $m0), 2)")
  x=$(calls_of xadd)
  XADDS[$G]=$(calc "round(${x:-0} / $N, 3)")
  ops=0
  for c in xreadgroup xautoclaim xack xdel; do v=$(calls_of $c); ops=$((ops + ${v:-0})); done
  STREAM_OPS[$G]=$(calc "round($ops / $N, 3)")
  stop_gateway
  $R flushall >/dev/null
done

cat <<EOF
| measure (one run, $CONNS closed-loop connections, ${SECS} s per phase) | group commit on (64) | off (1) | target |
|---|---|---|---|
| successful claims/s | ${RATE[64]} | ${RATE[1]} | |
| x redis-benchmark -P 1 -c 50 of claim.lua, 1 claim per call ($RB_RATE claims/s) | $(calc "round(${RATE[64]} / $RB_RATE, 2)") | $(calc "round(${RATE[1]} / $RB_RATE, 2)") | >= 1.5 |
| claim calls made / mean claims per call | ${CALLS[64]} / ${PER_CALL[64]} | ${CALLS[1]} / ${PER_CALL[1]} | |
| Redis CPU per successful claim, us | ${REDIS_US[64]} | ${REDIS_US[1]} | |
| x Redis CPU per PING -P 16 ($PING_US us) | $(calc "round(${REDIS_US[64]} / $PING_US, 1)") | $(calc "round(${REDIS_US[1]} / $PING_US, 1)") | <= 5 |
| gateway CPU per successful claim, us | ${GW_US[64]} | ${GW_US[1]} | |
| x gateway CPU per GET /healthz ($T_US us) | $(calc "round(${GW_US[64]} / $T_US, 2)") | $(calc "round(${GW_US[1]} / $T_US, 2)") | <= 2 |
| persister | $PERSISTER | $PERSISTER | |
| log entries appended (XADD) per successful claim | ${XADDS[64]} | ${XADDS[1]} | |
| persister stream commands (XREADGROUP, XAUTOCLAIM, XACK, XDEL) per successful claim | ${STREAM_OPS[64]} | ${STREAM_OPS[1]} | |

redis-benchmark of claim.lua alone (1 claim per call, -P 1 -c 50): $RB_RATE claims/s, $RB_US us of Redis CPU per claim.
EOF
