#!/usr/bin/env bash
# Runs the whole claimgate test suite on a Debian machine, installing and starting what it
# needs: redis-server (the tests start their own on free ports), PostgreSQL (the tests
# create and drop their own throwaway databases on it), promtool (metrics format check),
# python3-venv (schemathesis, the contract run, goes into a virtualenv under target/).
# System packages are installed with apt-get, through sudo when not run as root.
# Touches no data it did not create: it only adds a `claimgate_test` login role if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Bounds, so that the suite itself can never hang (each test also arms its own watchdog).
# The whole `cargo test` run: generous (a full run takes a few minutes on 2 cores), finite.
TEST_TIMEOUT="${CLAIMGATE_TEST_TIMEOUT:-40m}"
# After TERM at a bound, KILL whatever is still running this much later.
KILL_AFTER=60s
# The smoke gateway must answer /healthz within this many seconds, and exit this long
# after SIGTERM; the load test against it is bounded too.
SMOKE_READY_S=30
SMOKE_STOP_S=30
SMOKE_LOADTEST_TIMEOUT=5m

log() { printf '==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v curl >/dev/null || missing+=(curl)
command -v psql >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  required=()
  for p in "${missing[@]}"; do [ "$p" = prometheus ] || [ "$p" = python3-venv ] || required+=("$p"); done
  if [ ${#required[@]} -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${required[@]}" >/dev/null
  fi
  # promtool is optional: the metrics test prints a skip line without it
  if [[ " ${missing[*]} " == *" prometheus "* ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
      || log "promtool unavailable; its check will be skipped"
  fi
  # python3-venv is optional too: without it the contract run says it is skipped
  if [[ " ${missing[*]} " == *" python3-venv "* ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null \
      || log "python3-venv unavailable; the schemathesis run will be skipped"
  fi
fi
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.94) is required: https://rustup.rs" >&2; exit 1; }

# PostgreSQL: start the local cluster if nothing answers on 127.0.0.1:5432.
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
if ! pg_up; then
  log "starting PostgreSQL"
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
  pg_up || { echo "PostgreSQL did not start" >&2; exit 1; }
fi

# A login role for the tests (password auth works with Debian's default pg_hba).
pg_super() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- psql -qtAX "$@"; else sudo -u postgres psql -qtAX "$@"; fi
}
if ! PGPASSWORD=claimgate_test psql "postgres://claimgate_test@127.0.0.1:5432/postgres" -qtAc 'select 1' >/dev/null 2>&1; then
  log "creating PostgreSQL role claimgate_test"
  pg_super -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'claimgate_test') THEN
        CREATE ROLE claimgate_test LOGIN CREATEDB PASSWORD 'claimgate_test';
      ELSE
        ALTER ROLE claimgate_test LOGIN CREATEDB PASSWORD 'claimgate_test';
      END IF; END \$\$;"
fi
export CLAIMGATE_TEST_PG="postgres://claimgate_test:claimgate_test@127.0.0.1:5432/postgres"

log "smoke: claimgate-loadtest --verify against an embedded gateway"
cargo build --workspace --locked --quiet
smoke=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/debug/claimgate --listen "127.0.0.1:$port" --backend embedded \
  --database-url "sqlite://$smoke/smoke.db?mode=rwc" --set "embedded.aof_path=\"$smoke/smoke.aof\"" \
  --set limits.claim_per_user.per_second=0 --set log.level=\"warn\" serve &
gw=$!
trap 'kill -9 $gw 2>/dev/null || true; rm -rf "$smoke"' EXIT
# Bounded wait for the gateway: each probe has its own time limit, the whole wait too.
ready=0
deadline=$((SECONDS + SMOKE_READY_S))
while [ "$SECONDS" -lt "$deadline" ]; do
  if curl -sf --max-time 2 "http://127.0.0.1:$port/healthz" >/dev/null; then ready=1; break; fi
  kill -0 $gw 2>/dev/null || { echo "smoke gateway exited before it was healthy" >&2; exit 1; }
  sleep 0.1
done
[ "$ready" = 1 ] || { echo "smoke gateway not healthy within ${SMOKE_READY_S}s" >&2; exit 1; }
timeout --kill-after="$KILL_AFTER" "$SMOKE_LOADTEST_TIMEOUT" \
  target/debug/claimgate-loadtest --url "http://127.0.0.1:$port" -q --scenario flash-sale \
  --users 2000 --stock 300 --connections 16 --requests 3000 \
  --verify --database-url "sqlite://$smoke/smoke.db" --drain-timeout 30s
# Bounded stop: SIGTERM, then SIGKILL (and a failure) if it has not exited in time.
kill -TERM $gw
deadline=$((SECONDS + SMOKE_STOP_S))
while kill -0 $gw 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
if kill -0 $gw 2>/dev/null; then
  kill -9 $gw 2>/dev/null || true
  echo "smoke gateway did not exit within ${SMOKE_STOP_S}s of SIGTERM" >&2
  exit 1
fi
wait $gw

# The OpenAPI contract: a bounded schemathesis run (fixed seed, under a minute) against an
# embedded gateway; skipped, saying so, when schemathesis cannot be installed from PyPI.
log "contract: schemathesis against docs/openapi.json"
scripts/schemathesis/run.sh target/debug/claimgate

# Static checks of Dockerfile, docker-compose.yml, Grafana provisioning and the systemd
# unit (about a second; no network: a tool that is not installed is skipped, saying so).
log "packaging checks"
scripts/check-packaging.sh

log "cargo test (workspace)"
results=$(mktemp)
set +e
# timeout signals its whole process group: cargo, the test binaries and the servers they
# started (redis-server) all stop at the bound.
timeout --kill-after="$KILL_AFTER" "$TEST_TIMEOUT" \
  cargo test --workspace --locked "$@" 2>&1 | tee "$results"
status=${PIPESTATUS[0]}
set -e
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "cargo test did not finish within $TEST_TIMEOUT (CLAIMGATE_TEST_TIMEOUT): stopped" >&2
fi
# one closing line for the whole suite (cargo's own last lines are doc-test summaries)
awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$results"
rm -f "$results"
exit "$status"
