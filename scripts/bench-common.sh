# Shared by the benchmark scripts (sourced, not run): a work directory removed at exit, the
# processes started (PIDS) killed at exit, and small helpers.
#   log MSG            progress on stderr
#   free_port          a free TCP port on 127.0.0.1
#   cpu_ticks PID      utime + stime of PID, in ticks of $tick_hz
#   jget FILE EXPR     a value of a JSON file (EXPR over d, Python syntax)
#   calc EXPR          Python arithmetic
#   build_release      builds the release binaries; sets BIN and LT
#   start_redis        a redis-server of its own (no persistence) on a free port; sets RPORT
#   start_pg_db PREFIX a throwaway PostgreSQL database PREFIX_<pid> on the server of
#                      CLAIMGATE_TEST_PG (as the tests use it), dropped at exit; sets PG_URL
WORK=$(mktemp -d)
PIDS=()
PGDB=
PG_ADMIN=${CLAIMGATE_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if [ -n "$PGDB" ]; then
    psql "$PG_ADMIN" -qtAc "DROP DATABASE IF EXISTS $PGDB WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
tick_hz=$(getconf CLK_TCK)
jget() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$1" "$2"; }
calc() { python3 -c "print($1)"; }
build_release() {
  log "building release binaries"
  cargo build --release --locked -p claimgate -p claimgate-loadtest >&2
  BIN=target/release/claimgate
  LT=target/release/claimgate-loadtest
}
start_redis() {
  RPORT=$(free_port)
  redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --logfile "$WORK/redis-$RPORT.log" &
  PIDS+=("$!")
  for _ in $(seq 1 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis-server did not start" >&2; exit 1
}
start_pg_db() {
  PGDB="$1_$$"
  psql "$PG_ADMIN" -qtAc "CREATE DATABASE $PGDB" >/dev/null
  PG_URL="${PG_ADMIN%/*}/$PGDB"
}
