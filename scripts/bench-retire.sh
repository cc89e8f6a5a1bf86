#!/usr/bin/env bash
# Redis memory per live claim and per retired batch (issue 14 item 3, targets: 100 bytes
# per live claim, 0 bytes and 0 keys for a retired batch). One redis-server of its own and
# one gateway (redis backend, PostgreSQL persister) with retirement and request-id retention
# sped up: a batch retires 61 s after its window ends (the transfer markers live 1 s),
# request-id records live 8 to 16 s, checked every second. Steps:
#   1. a batch "ret" with a 45 s window: CLAIMS claims with request ids, concurrently;
#   2. the persister drains: the batch's keys and bytes (MEMORY USAGE of each key) per live
#      claim, and used_memory against the empty server;
#   3. the request-id records expire (no `req`/`req2` key of the batch left): bytes per live
#      claim again, and every sampled replay returns its coupon from the database while the
#      window is open;
#   4. the window ends, then the retirer drops it: keys and bytes again (0 and 0 expected),
#      and used_memory;
#   5. afterwards every sampled replay returns its coupon from the database (200, same
#      id), a new claim is `409 ended`, and `claimgate reconcile --batch ret` exits 0.
#
#   scripts/bench-retire.sh [LABEL]    # writes loadtest/results/<UTC date>-retirement.md
#
# Starts its own redis-server (free port, no persistence) and PostgreSQL database (dropped
# at the end); every request goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-common.sh
source scripts/bench-gateway.sh

LABEL=${1:-$(git rev-parse --short HEAD)}
CLAIMS=${BENCH_CLAIMS:-20000}
SHARDS=${BENCH_SHARDS:-16}
WINDOW_S=45
RETENTION_MS=8000
OUT="loadtest/results/$(date -u +%Y-%m-%d)-retirement.md"

build_release
start_redis
start_pg_db claimgate_retbench
R() { redis-cli -p "$RPORT" "$@"; }
used_memory() { R info memory | awk -F: '/^used_memory:/ {print $2+0}'; }
# keys of the batch, and the sum of their MEMORY USAGE (bytes)
batch_keys() { R --scan --pattern 'cg:{ret:*' | grep -c . || true; }
batch_bytes() {
  R --scan --pattern 'cg:{ret:*' | while read -r k; do echo "MEMORY USAGE $k SAMPLES 0"; done \
    | R | awk '{s+=$1} END{printf "%.0f\n", s+0}'
}

SETTINGS=(--set stock.transfer_marker_ttl_s=1 --set batches.retire_after_ms=61000
  --set batches.retire_every_ms=1000 --set batches.request_id_retention_ms=$RETENTION_MS)
start_gateway --backend redis --redis-url "redis://127.0.0.1:$RPORT" --database-url "$PG_URL" \
  "${SETTINGS[@]}"
EMPTY=$(used_memory)

log "batch ret: $CLAIMS claims with request ids over $SHARDS shards, window ${WINDOW_S} s"
end=$(date -u -d "+$WINDOW_S seconds" +%Y-%m-%dT%H:%M:%SZ)
curl -sf -XPOST "http://127.0.0.1:$GPORT/v1/batches" -d '{
  "id": "ret", "name": "retirement bench", "stock": '"$CLAIMS"', "per_user_limit": 1,
  "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "'"$end"'"},
  "validity": {"days_after_claim": 30},
  "discount": {"kind": "threshold", "threshold": 10000, "amount": 500},
  "scope": {"kind": "all"}, "shards": '"$SHARDS"'}' >/dev/null
python3 - "$GPORT" "$CLAIMS" "$WORK/claims.json" <<'PY'
import http.client, json, sys, threading
port, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
won, bad, lock = {}, [], threading.Lock()
def worker(k, step):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(k, n, step):
        body = json.dumps({"user_id": f"u{i}", "request_id": f"r{i}"})
        c.request("POST", "/v1/batches/ret/claims", body, {"content-type": "application/json"})
        r = c.getresponse(); v = json.loads(r.read())
        with lock:
            if r.status == 201: won[i] = v["coupon_id"]
            else: bad.append((r.status, v))
ts = [threading.Thread(target=worker, args=(k, 32)) for k in range(32)]
[t.start() for t in ts]; [t.join() for t in ts]
json.dump(won, open(out, "w"))
if bad or len(won) != n:
    sys.exit(f"{len(won)} of {n} claims won; first refusals: {bad[:3]}")
PY

log "waiting for the persister to drain"
for _ in $(seq 1 600); do
  [ "$(psql "$PG_URL" -qtAc "SELECT count(*) FROM coupons WHERE batch_id = 'ret'")" = "$CLAIMS" ] && break
  sleep 0.1
done
LIVE_KEYS=$(batch_keys); LIVE_BYTES=$(batch_bytes); LIVE_USED=$(used_memory)

# sampled replays of winning request ids: "<same> of <sample> ..." (argument: what is asked)
replays() {
  python3 - "$GPORT" "$WORK/claims.json" "$1" <<'PY'
import http.client, json, random, sys
port, won, new = int(sys.argv[1]), json.load(open(sys.argv[2])), sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
same = 0; sample = random.Random(7).sample(sorted(won), min(500, len(won)))
for i in sample:
    c.request("POST", "/v1/batches/ret/claims", json.dumps({"user_id": f"u{i}", "request_id": f"r{i}"}))
    r = c.getresponse(); v = json.loads(r.read())
    same += r.status == 200 and v.get("coupon_id") == won[i]
c.request("POST", "/v1/batches/ret/claims", json.dumps({"user_id": new}))
r = c.getresponse(); v = json.loads(r.read())
print(f"{same} of {len(sample)} replays returned their coupon; a new claim: {r.status} {v.get('error') or 'claimed'}")
PY
}
req_keys() { R --scan --pattern 'cg:{ret:*' | grep -cE ':req2?$' || true; }

log "waiting for the request-id records to expire (retention $RETENTION_MS ms)"
for _ in $(seq 1 600); do
  [ "$(req_keys)" = 0 ] && break
  sleep 0.1
done
EXP_REQ=$(req_keys); EXP_KEYS=$(batch_keys); EXP_BYTES=$(batch_bytes); EXP_USED=$(used_memory)
ROTATED=$(metric claimgate_request_id_rotations_total 'outcome="rotated"')
ROT_WAITING=$(metric claimgate_request_id_rotations_total 'outcome="waiting"')
EXP_REPLAYS=$(replays newcomer-live)
LOOKUPS_REPLAYED=$(metric claimgate_request_id_lookups_total 'outcome="replayed"')
LOOKUPS_NEW=$(metric claimgate_request_id_lookups_total 'outcome="new"')
log "after expiry: $EXP_REPLAYS"

log "waiting for the window to end and the batch to retire (61 s after the end)"
for _ in $(seq 1 1800); do
  [ "$(metric claimgate_batch_retirements_total 'outcome="retired"')" -ge 1 ] && break
  sleep 0.1
done
RETIRED=$(metric claimgate_batch_retirements_total 'outcome="retired"')
WAITING=$(metric claimgate_batch_retirements_total 'outcome="waiting"')
RET_KEYS=$(batch_keys); RET_BYTES=$(batch_bytes); RET_USED=$(used_memory)
ELSEWHERE=$(R dbsize)
# what is left, by key kind (the hash tag's first part), with the longest TTL of each kind
LEFT=$(R --scan | python3 -c '
import collections, subprocess, sys
port = sys.argv[1]
kinds = collections.defaultdict(list)
for k in sys.stdin.read().split():
    kinds[k.split("{")[1].split(":")[0] + ":" if "{" in k else k].append(k)
for kind, ks in sorted(kinds.items()):
    cmds = "".join(f"PTTL {k}\n" for k in ks)
    ttls = [int(t) for t in subprocess.run(["redis-cli", "-p", port], input=cmds,
            capture_output=True, text=True).stdout.split()]
    print(f"`{kind}*` {len(ks)} keys, longest PTTL {max(ttls)} ms (-1: none);", end=" ")
' "$RPORT")

log "replays from the database, a new claim, reconcile"
REPLAYS=$(replays newcomer)
if "$BIN" --backend redis --redis-url "redis://127.0.0.1:$RPORT" --database-url "$PG_URL" \
  "${SETTINGS[@]}" --set log.level=\"warn\" reconcile --batch ret >"$WORK/reconcile.txt" 2>&1; then
  RECONCILE="clean (exit 0)"
else
  RECONCILE="DIFFERENCES: $(head -c 300 "$WORK/reconcile.txt")"
fi
stop_gateway

per() { calc "round($1 / $CLAIMS, 1)"; }
cat > "$OUT" <<MD
# Redis memory of a live and a retired batch, $(date -u +%Y-%m-%d) ($LABEL)

Issue 14 item 3 ("Memory with a bound"; targets: 100 bytes per live claim, 0 bytes for a
retired batch).
\`scripts/bench-retire.sh\` (BENCH_CLAIMS=$CLAIMS, BENCH_SHARDS=$SHARDS): one redis-server of
its own, a gateway (redis backend, PostgreSQL persister) with \`batches.retire_after_ms=61000\`,
\`stock.transfer_marker_ttl_s=1\`, \`batches.retire_every_ms=1000\`,
\`batches.request_id_retention_ms=$RETENTION_MS\` (production defaults: a week, a day, a minute,
a day). $CLAIMS claims with request ids on one batch of $SHARDS shards, then
the request-id records expire, then the window ends and the retirer runs. Bytes are the sum of \`MEMORY USAGE\` over the batch's
keys (\`cg:{ret:*\`), and \`used_memory\` against the empty server.

Machine: $(nproc) cores; $(redis-server --version | cut -d' ' -f3), $(psql --version | cut -d' ' -f3-).

| | batch keys | batch bytes (MEMORY USAGE) | per claim | used_memory above the empty server |
|---|---|---|---|---|
| live, log drained into PostgreSQL | $LIVE_KEYS | $LIVE_BYTES | $(per "$LIVE_BYTES") B | $((LIVE_USED - EMPTY)) B |
| live, request-id records expired ($EXP_REQ \`req\`/\`req2\` keys left) | $EXP_KEYS | $EXP_BYTES | $(per "$EXP_BYTES") B | $((EXP_USED - EMPTY)) B |
| retired | $RET_KEYS | $RET_BYTES | $(per "$RET_BYTES") B | $((RET_USED - EMPTY)) B |

- request-id rotations (\`batches.request_id_retention_ms=$RETENTION_MS\`): $ROTATED shard
  rotations, $ROT_WAITING passes waited for the persister
- while live, after the records expired: $EXP_REPLAYS (database look-ups: $LOOKUPS_REPLAYED
  replayed, $LOOKUPS_NEW new)
- retirements: $RETIRED retired, $WAITING passes waited (a log not drained, or a transfer open)
- keys left in the whole server after the retirement: $ELSEWHERE ($LEFT\`cg:{w:<user>}\` is a
  user's recent coupons, \`lua/recent.lua\`: it lives \`wallet.recent_window_ms\`, 10 min, after
  the user's last claim or change, whatever batch it was)
- after the retirement: $REPLAYS
- \`claimgate reconcile --batch ret\`: $RECONCILE
MD
log "wrote $OUT"
cat "$OUT"
