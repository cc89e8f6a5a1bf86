#!/usr/bin/env bash
# Scaling out and failover, measured in ONE run on ONE machine (issue "Scale out on Redis
# Cluster"): writes loadtest/results/<UTC date>-scaling.md.
#
#   scripts/bench-failover.sh                  # BENCH_SECONDS=10 per load phase
#   BENCH_SECONDS=5 scripts/bench-failover.sh  # shorter
#
# It starts its own redis-servers (free ports, no persistence) and its own PostgreSQL
# database (dropped at the end), builds the release binaries, and measures, for one hot
# batch (16 shards, closed loop, BENCH_CONNECTIONS connections, the persister on):
#   1. one primary with one replica: redis.ack = "leader" against "replica" (WAIT 1):
#      claims/s, p50/p99, CPU per claim of the gateway and of the primary;
#   2. Redis memory per claim after the persister drained (INFO used_memory, per claim);
#   3. a Redis Cluster of 3 primaries: claims/s and each primary's CPU per claim (the load
#      must spread: the batch's 16 shards hash to every primary), against phase 1's single
#      primary in the same run;
#   4. a failover: the primary is killed with -9 mid-sale while its replica lags (cut off
#      first), the replica is promoted and a gateway starts on it: how long the rolled-back
#      shards answered 503 (claimgate_shard_repair_duration_seconds), the ids minted again
#      (coupon conflicts) and what reconcile says.
# Every load generator run is bounded in time and targets 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${BENCH_SECONDS:-10}
CONNS=${BENCH_CONNECTIONS:-64}
PG_ADMIN=${CLAIMGATE_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}
DATE=$(date -u +%Y-%m-%d)
OUT_DIR=loadtest/results
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/$DATE-scaling.md"
WORK=$(mktemp -d)
PIDS=()
PGDBS=()

log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for db in "${PGDBS[@]}"; do
    psql "$PG_ADMIN" -qtAc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

log "building release binaries"
cargo build --release --locked -p claimgate -p claimgate-loadtest >&2
BIN=target/release/claimgate
LT=target/release/claimgate-loadtest
tick_hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
jget() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$1" "$2"; }
per_claim_us() { python3 -c "print(round(($2-$1)/$tick_hz/$3*1e6, 1))"; }

new_db() { # new_db -> URL of a fresh database
  local name="claimgate_scaling_$$_$1"
  psql "$PG_ADMIN" -qtAc "CREATE DATABASE $name" >/dev/null
  PGDBS+=("$name")
  echo "${PG_ADMIN%/*}/$name"
}
redis_start() { # redis_start PORT [ARGS...]; sets RS_PID
  local port=$1; shift
  mkdir -p "$WORK/r$port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK/r$port" \
    --logfile "$WORK/r$port/log" "$@" >/dev/null 2>&1 &
  RS_PID=$!
  PIDS+=("$RS_PID")
  for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis-server on $port did not start:" >&2; cat "$WORK/r$port/log" >&2; exit 1
}
. scripts/bench-gateway.sh # start_gateway, stop_gateway, metric (integers)
metric_f() { # metric_f NAME [FILTER]: the sum of the gateway's matching series, with decimals
  curl -s "http://127.0.0.1:$GPORT/metrics" | awk -v n="$1" -v f="${2:-}" \
    '$1 ~ "^"n"({|$)" && index($1, f) {s+=$2} END{printf "%.6f\n", s+0}'
}
wait_drained() {
  for _ in $(seq 1 1200); do
    [ "$(metric claimgate_persist_backlog | cut -d. -f1)" = 0 ] && { sleep 1; return; }
    sleep 0.25
  done
  log "warning: persistence backlog not drained after 300 s"
}
lt() { "$LT" --url "http://127.0.0.1:$GPORT" -q "$@"; }
used_memory() { redis-cli -p "$1" info memory | tr -d '\r' | awk -F: '/^used_memory:/{print $2}'; }

# ---------------------------------------------------------------- 1-2. leader vs replica
P=$(free_port); R=$(free_port)
redis_start "$P"; PPID_=$RS_PID
redis_start "$R" --replicaof 127.0.0.1 "$P"
for _ in $(seq 1 100); do redis-cli -p "$R" info replication | grep -q master_link_status:up && break; sleep 0.1; done

declare -A RPS P50 P99 GWUS RDUS OK
seed=1
for mode in leader replica; do
  log "one primary + one replica, redis.ack = $mode"
  start_gateway --backend redis --redis-url "redis://127.0.0.1:$P" --database-url "$(new_db "$mode")" \
    --set "redis.ack=\"$mode\""
  g0=$(cpu_ticks "$GPID"); r0=$(cpu_ticks "$PPID_"); m0=$(used_memory "$P")
  lt --scenario flash-sale --seed $((seed++)) --users 10000000 --stock 100000000 \
    --connections "$CONNS" --duration "${SECS}s" --json "$WORK/$mode.json"
  g1=$(cpu_ticks "$GPID"); r1=$(cpu_ticks "$PPID_")
  OK[$mode]=$(jget "$WORK/$mode.json" 'd["claims_ok"]')
  RPS[$mode]=$(jget "$WORK/$mode.json" 'round(d["claims_per_s"])')
  P50[$mode]=$(jget "$WORK/$mode.json" 'd["latency_ms"]["p50"]')
  P99[$mode]=$(jget "$WORK/$mode.json" 'd["latency_ms"]["p99"]')
  GWUS[$mode]=$(per_claim_us "$g0" "$g1" "${OK[$mode]}")
  RDUS[$mode]=$(per_claim_us "$r0" "$r1" "${OK[$mode]}")
  if [ "$mode" = leader ]; then
    wait_drained
    m1=$(used_memory "$P")
    MEM_PER_CLAIM=$(python3 -c "print(round(($m1-$m0)/${OK[leader]}))")
    MEM_CLAIMS=${OK[leader]}
  fi
  stop_gateway
done

# ---------------------------------------------------------------- 3. a cluster of 3 primaries
log "Redis Cluster: 3 primaries"
CPORTS=(); CPIDS=()
for i in 0 1 2; do
  port=$(free_port)
  CPORTS+=("$port")
  redis_start "$port" --cluster-enabled yes --cluster-config-file "nodes-$port.conf"
  CPIDS+=("$RS_PID")
done
redis-cli --cluster create "127.0.0.1:${CPORTS[0]}" "127.0.0.1:${CPORTS[1]}" "127.0.0.1:${CPORTS[2]}" \
  --cluster-replicas 0 --cluster-yes >/dev/null
cluster_ok() {
  for port in "${CPORTS[@]}"; do
    redis-cli -p "$port" cluster info | tr -d '\r' | grep -q '^cluster_slots_ok:16384' || return 1
    redis-cli -p "$port" cluster info | tr -d '\r' | grep -q '^cluster_state:ok' || return 1
  done
}
for _ in $(seq 1 200); do cluster_ok && break; sleep 0.1; done
sleep 1   # every node has gossiped the whole slot map
start_gateway --backend redis --redis-url "redis-cluster://127.0.0.1:${CPORTS[0]}" --database-url "$(new_db cluster)"
g0=$(cpu_ticks "$GPID")
declare -a C0
for i in 0 1 2; do C0[$i]=$(cpu_ticks "${CPIDS[$i]}"); done
lt --scenario flash-sale --seed 9 --users 10000000 --stock 100000000 \
  --connections "$CONNS" --duration "${SECS}s" --json "$WORK/cluster.json"
g1=$(cpu_ticks "$GPID")
CL_OK=$(jget "$WORK/cluster.json" 'd["claims_ok"]')
CL_RPS=$(jget "$WORK/cluster.json" 'round(d["claims_per_s"])')
CL_P99=$(jget "$WORK/cluster.json" 'd["latency_ms"]["p99"]')
CL_GW=$(per_claim_us "$g0" "$g1" "$CL_OK")
CL_ROWS=""
CL_SUM=0
for i in 0 1 2; do
  c1=$(cpu_ticks "${CPIDS[$i]}")
  us=$(per_claim_us "${C0[$i]}" "$c1" "$CL_OK")
  share=$(python3 -c "print(round(($c1-${C0[$i]})/$tick_hz/$SECS*100, 1))")
  CL_ROWS+="| primary $((i+1)) (port ${CPORTS[$i]}) | $us µs | ${share}% of a core |"$'\n'
  CL_SUM=$(python3 -c "print(round($CL_SUM + $us, 1))")
done
stop_gateway

# ---------------------------------------------------------------- 4. a failover
log "failover: the primary dies while its replica lags"
FP=$(free_port); FR=$(free_port)
redis_start "$FP"; FPPID=$RS_PID
redis_start "$FR" --replicaof 127.0.0.1 "$FP"
for _ in $(seq 1 100); do redis-cli -p "$FR" info replication | grep -q master_link_status:up && break; sleep 0.1; done
FDB=$(new_db failover)
start_gateway --backend redis --redis-url "redis://127.0.0.1:$FP" --database-url "$FDB"
lt --scenario flash-sale --seed 21 --users 100000 --stock 10000000 \
  --connections 16 --duration 2s --json "$WORK/fo1.json"
BATCH=$(jget "$WORK/fo1.json" 'd["batch_id"]')
redis-cli -p "$FR" replicaof no one >/dev/null   # the replica is cut off: it lags from here
lt --scenario flash-sale --seed 22 --users 100000 --batch "$BATCH" \
  --connections 16 --duration 2s --json "$WORK/fo2.json"
LAGGED=$(jget "$WORK/fo2.json" 'd["claims_ok"]')
wait_drained
stop_gateway
kill -9 "$FPPID"
start_gateway --backend redis --redis-url "redis://127.0.0.1:$FR" --database-url "$FDB"
# 503s for the rolled-back shards until they are repaired: not a failure of this script
lt --scenario flash-sale --seed 23 --users 100000 --batch "$BATCH" \
  --connections 16 --duration 3s --json "$WORK/fo3.json" || true
FO_503=$(jget "$WORK/fo3.json" 'sum(v for k, v in d["by_outcome"].items() if "503" in k)')
REPAIRS=$(metric claimgate_shard_repairs_total 'result="repaired"' | cut -d. -f1)
FAULTS=$(metric claimgate_shard_faults_total | cut -d. -f1)
REPAIR_SUM=$(metric_f claimgate_shard_repair_duration_seconds_sum)
REPAIR_CNT=$(metric_f claimgate_shard_repair_duration_seconds_count)
REPAIR_MS=$(python3 -c "c=float('$REPAIR_CNT'); print(round(float('$REPAIR_SUM')/c*1000) if c else '-')")
WRITTEN_OFF=$(metric claimgate_stock_written_off_total | cut -d. -f1)
wait_drained
RECONCILE=$(curl -s "http://127.0.0.1:$GPORT/v1/admin/reconcile?batch=$BATCH")
CONFLICTS=$(psql "$FDB" -qtAc "SELECT COUNT(*) FROM coupon_conflicts")
stop_gateway

ratio() { python3 -c "print(round($1/$2, 2))"; }
cat > "$REPORT" <<EOF
# Scaling out and failover — $DATE

\`scripts/bench-failover.sh\` (BENCH_SECONDS=$SECS, $CONNS connections, one hot batch of 16
shards, the persister on, release build), on $(nproc) cores, in one run. CPU per claim is
CPU seconds of the process over successful claims.

## redis.ack: leader against replica (one primary, one replica)

| ack | claims/s | p50 | p99 | gateway CPU/claim | primary CPU/claim |
|---|---|---|---|---|---|
| leader | ${RPS[leader]} | ${P50[leader]} ms | ${P99[leader]} ms | ${GWUS[leader]} µs | ${RDUS[leader]} µs |
| replica (WAIT 1) | ${RPS[replica]} | ${P50[replica]} ms | ${P99[replica]} ms | ${GWUS[replica]} µs | ${RDUS[replica]} µs |

replica / leader: throughput $(ratio "${RPS[replica]}" "${RPS[leader]}")×, p99 $(ratio "${P99[replica]}" "${P99[leader]}")×.

## Redis memory

$MEM_PER_CLAIM bytes of Redis memory per claim after the persister drained
($MEM_CLAIMS claims: per-user counts and request-id records stay in Redis), i.e.
$(python3 -c "print(round($MEM_PER_CLAIM * 1e6 / 2**20))") MiB per million claims.

## One hot batch on 3 primaries

| | claims/s | p99 | gateway CPU/claim |
|---|---|---|---|
| 1 primary (phase 1, leader) | ${RPS[leader]} | ${P99[leader]} ms | ${GWUS[leader]} µs |
| Redis Cluster, 3 primaries | $CL_RPS | $CL_P99 ms | $CL_GW µs |

Redis CPU per claim on each primary (the batch's 16 shards hash to every primary):

| primary | CPU per claim (all claims) | load |
|---|---|---|
$CL_ROWS
Sum over the primaries: $CL_SUM µs per claim (one primary: ${RDUS[leader]} µs).

## Failover

The replica was cut off from its primary (it lags from that moment), $LAGGED more claims
were acknowledged (ack = leader) and persisted, then the primary was killed with -9 and a
gateway started on the promoted replica:

| measure | value |
|---|---|
| shard faults seen | $FAULTS |
| shards repaired | $REPAIRS |
| mean time a faulty shard stayed fenced (fault to repaired) | $REPAIR_MS ms |
| claims answered 503 during the 3 s after the failover | $FO_503 |
| stock written off | $WRITTEN_OFF |
| coupon ids minted twice (coupon_conflicts) | $CONFLICTS |
| reconcile after | \`$RECONCILE\` |
EOF
log "wrote $REPORT"
cat "$REPORT"
