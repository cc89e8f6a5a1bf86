#!/usr/bin/env bash
# Code pools (issue 11 item 2), measured: ONE run on ONE machine, a batch with generated
# codes beside the same batch without codes, on the same Redis and gateway.
#
#   scripts/bench-codes.sh                                   # prints a markdown table
#   CODES_SECONDS=8 CODES_CONNECTIONS=256 CODES_STOCK=200000 scripts/bench-codes.sh
#
# It starts its own redis-server (free port, no persistence) and one release gateway (redis
# backend, persister on, into a SQLite file of its own), and measures, each phase bounded in
# time and against 127.0.0.1 only:
#   1. the create of a batch of CODES_STOCK generated codes (generated, stored, loaded into
#      the pool, the shards filled): seconds;
#   2. flash-sale claims (fresh users, stock never runs out) on a batch without codes, then
#      on the batch with codes: successful claims/s, Redis CPU per successful claim;
#   3. an import of CODES_IMPORT partner codes streamed as CSV (10% of them repeated):
#      codes/s, and the answer's counts;
#   4. after the persister drained: the database holds one coupon row per successful claim
#      of the code batch, each with its code, and no code twice;
#   5. the campaign reads on the same gateway: product-page lookups/s (40 batches scoped by
#      products, categories and merchants) and checkout quotes/s (a 20-item cart against a
#      wallet of 50 coupons), each with the loadtest's own set-up.
# Redis CPU = INFO cpu (used_cpu_user + used_cpu_sys) deltas of the whole redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${CODES_SECONDS:-8}
CONNS=${CODES_CONNECTIONS:-256}
STOCK=${CODES_STOCK:-200000}
IMPORT=${CODES_IMPORT:-100000}
. scripts/bench-common.sh

build_release
start_redis
R="redis-cli -p $RPORT"
rcpu() { $R info cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.6f", s}'; }

. scripts/bench-gateway.sh
DB="$WORK/codes.db"
# a create of many generated codes, and a large import, outlast the default request deadline
start_gateway --backend redis --redis-url "redis://127.0.0.1:$RPORT" \
  --database-url "sqlite://$DB?mode=rwc" --set server.request_timeout_ms=300000 \
  --set grants.upload_timeout_ms=300000
U="http://127.0.0.1:$GPORT"
batch() { # id, extra JSON fields
  printf '{"id":"%s","name":"bench","stock":%s,"per_user_limit":1,"shards":16,
    "claim_window":{"start":"2020-01-01T00:00:00Z","end":"2100-01-01T00:00:00Z"},
    "validity":{"days_after_claim":7},"discount":{"kind":"fixed","amount":500},
    "scope":{"kind":"all"}%s}' "$1" "$2" "$3"
}
post() { # path, body, content type: the answer's body, or exit showing it
  local out
  out=$(curl -s -w '\n%{http_code}' -XPOST "$U$1" -H "content-type: ${3:-application/json}" \
    --data-binary "$2")
  case "${out##*$'\n'}" in
    2??) printf '%s\n' "${out%$'\n'*}" ;;
    *) echo "POST $1 answered: $out" >&2; exit 1 ;;
  esac
}

log "create: a batch without codes, and one of $STOCK generated codes"
post /v1/batches "$(batch plain "$STOCK" "")" >/dev/null
t0=$(date +%s.%N)
post /v1/batches "$(batch coded "$STOCK" ',"codes":{"source":"generated","prefix":"B-","length":10}')" >/dev/null
t1=$(date +%s.%N)
CREATE_S=$(calc "round($t1 - $t0, 2)")

declare -A RATE REDIS_US
for B in plain coded; do
  log "claims on $B, ${SECS}s, $CONNS connections"
  c0=$(rcpu)
  "$LT" --url "$U" -q --scenario flash-sale --batch "$B" --seed 7 --users 1000000000 --threads 2 \
    --connections "$CONNS" --duration "${SECS}s" --json "$WORK/$B.json"
  c1=$(rcpu)
  N=$(jget "$WORK/$B.json" 'd["claims_ok"]')
  RATE[$B]=$(jget "$WORK/$B.json" 'round(d["claims_ok"] / d["elapsed_s"])')
  REDIS_US[$B]=$(calc "round(($c1 - $c0) / $N * 1e6, 2)")
  eval "N_$B=$N"
done

log "import: $IMPORT partner codes streamed as CSV"
post /v1/batches "$(batch partner "$IMPORT" ',"codes":{"source":"imported"}')" >/dev/null
python3 -c "
import sys
n = int(sys.argv[1])
print('code')
for i in range(n - n // 10):
    print(f'P{i:09d}')
for i in range(n // 10):
    print(f'P{i:09d}')
" "$IMPORT" >"$WORK/codes.csv"
t0=$(date +%s.%N)
post /v1/batches/partner/codes "@$WORK/codes.csv" text/csv >"$WORK/import.json"
t1=$(date +%s.%N)
IMPORT_RATE=$(calc "round($IMPORT / ($t1 - $t0))")
IMPORT_COUNTS=$(jget "$WORK/import.json" '"added %d, duplicates %d, invalid %d, over capacity %d, total %d" % (d["added"], d["duplicates"], d["invalid"], d["over_capacity"], d["total"])')

log "waiting for the persister to drain"
for _ in $(seq 1 600); do
  ROWS=$(python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(c.execute(\"select count(*) from coupons where batch_id='coded'\").fetchone()[0])" "$DB")
  [ "$ROWS" -ge "$N_coded" ] && break
  sleep 0.1
done
CHECK=$(python3 -c "
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
rows, coded, distinct = c.execute(
    \"select count(*), count(code), count(distinct code) from coupons where batch_id='coded'\").fetchone()
print(f'{rows} coupon rows, {coded} with a code, {distinct} distinct codes')
sys.exit(0 if rows == coded == distinct else 1)
" "$DB") || { echo "code check FAILED: $CHECK" >&2; exit 1; }
for S in product-lookup quote; do
  log "campaign reads: $S, ${SECS}s, 64 connections"
  "$LT" --url "$U" -q --scenario "$S" --seed 9 --threads 2 --connections 64 \
    --duration "${SECS}s" --json "$WORK/$S.json"
done
LOOKUPS=$(jget "$WORK/product-lookup.json" 'round(d["rps"])')
QUOTES=$(jget "$WORK/quote.json" 'round(d["rps"])')
stop_gateway

cat <<EOF
| measure (one run, $CONNS closed-loop connections, ${SECS} s per phase) | batch with codes | same batch without codes |
|---|---|---|
| successful claims/s | ${RATE[coded]} | ${RATE[plain]} |
| ratio, with / without | $(calc "round(${RATE[coded]} / ${RATE[plain]}, 2)") | 1 |
| Redis CPU per successful claim, us | ${REDIS_US[coded]} | ${REDIS_US[plain]} |

- create of $STOCK generated codes (generate, store, load, fill the shards): ${CREATE_S} s
- import of $IMPORT codes streamed as CSV: $IMPORT_RATE codes/s ($IMPORT_COUNTS)
- database after the drain: $CHECK (successful claims answered: $N_coded)
- product-page lookups: $LOOKUPS/s; checkout quotes (20 items, 50 coupons): $QUOTES/s (64 connections)
EOF
