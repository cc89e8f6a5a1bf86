# The gateway under benchmark, for the benchmark scripts (sourced, not run). Needs BIN (the
# claimgate binary), WORK, PIDS and free_port (scripts/bench-common.sh has them).
#   start_gateway ARGS...   starts `$BIN ... ARGS serve` on a free port with the local rate
#                           limits lifted; sets GPID, GPORT; exits if it does not come up
#   stop_gateway            graceful stop (SIGTERM) of the last one started
#   metric NAME [FILTER]    the sum of the gateway's series NAME (those whose labels contain
#                           FILTER), as an integer
start_gateway() {
  GPORT=$(free_port)
  "$BIN" --listen "127.0.0.1:$GPORT" \
    --set limits.claim_per_user.per_second=0 --set limits.max_inflight=100000 \
    --set limits.admission_wait_ms=1000 --set log.level=\"warn\" "$@" serve >"$WORK/gw-$GPORT.log" 2>&1 &
  GPID=$!
  PIDS+=("$GPID")
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$GPORT/healthz" >/dev/null && return; sleep 0.1; done
  echo "gateway did not start:" >&2; cat "$WORK/gw-$GPORT.log" >&2; exit 1
}
stop_gateway() { kill -TERM "$GPID"; wait "$GPID" 2>/dev/null || true; }
metric() {
  curl -s "http://127.0.0.1:$GPORT/metrics" | awk -v n="$1" -v f="${2:-}" \
    '$1 ~ "^"n"({|$)" && index($1, f) {s+=$2} END{printf "%.0f\n", s+0}'
}
