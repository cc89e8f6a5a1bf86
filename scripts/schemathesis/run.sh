#!/usr/bin/env bash
# The contract run: schemathesis (--checks all, every phase, stateful included through the
# document's links) against docs/openapi.json as an embedded gateway serves it, with user
# auth on (a JWT signed here) so that claims and wallet calls are the production shape.
# Fixed seed, bounded examples and time: well under a minute. Per-operation settings (the
# statuses a check counts as accepted) are in scripts/schemathesis/schemathesis.toml.
#
# Installs schemathesis from PyPI into a virtualenv under target/ when it is not there;
# when that cannot be done (no network, no python3-venv) it says so and skips (exit 0).
# Usage: scripts/schemathesis/run.sh [path/to/claimgate]   (default target/debug/claimgate)
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN="${1:-target/debug/claimgate}"
VENV=target/schemathesis-venv
SEED=20261130          # fixed: the same cases every run
MAX_EXAMPLES=25        # per operation and phase
MAX_TIME_S=40          # the whole run (fuzzing and stateful stop when it is spent)
READY_S=30
log() { printf '==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/st" ]; then
  log "schemathesis: installing into $VENV (PyPI)"
  if ! { python3 -m venv "$VENV" >/dev/null 2>&1 \
         && timeout 300 "$VENV/bin/pip" install -q --disable-pip-version-check schemathesis >/dev/null 2>&1; }; then
    rm -rf "$VENV"
    log "schemathesis: SKIPPED (could not install it: PyPI unreachable or python3-venv missing)"
    exit 0
  fi
fi

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
secret="schemathesis-user-token-secret-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
"$BIN" serve --listen "127.0.0.1:$port" --database-url "sqlite://$work/st.db?mode=rwc" \
  --set "embedded.aof_path=\"$work/st.aof\"" --set limits.claim_per_user.per_second=0 \
  --set log.level=\"warn\" --set "auth.user_token_secret=\"$secret\"" 2>"$work/gateway.log" &
gw=$!
trap 'kill -9 $gw 2>/dev/null || true; rm -rf "$work"' EXIT
deadline=$((SECONDS + READY_S))
until curl -sf --max-time 2 "http://127.0.0.1:$port/healthz" >/dev/null; do
  kill -0 $gw 2>/dev/null || { cat "$work/gateway.log" >&2; echo "contract gateway exited" >&2; exit 1; }
  [ "$SECONDS" -lt "$deadline" ] || { echo "contract gateway not healthy in ${READY_S}s" >&2; exit 1; }
  sleep 0.1
done
# A user token (HS256, sub st-user, one hour), signed with the gateway's secret.
jwt=$(SECRET="$secret" python3 -c '
import base64, hashlib, hmac, json, os, time
b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = b(json.dumps({"sub": "st-user", "exp": int(time.time()) + 3600}).encode())
s = b(hmac.new(os.environ["SECRET"].encode(), f"{h}.{p}".encode(), hashlib.sha256).digest())
print(f"{h}.{p}.{s}")')
log "schemathesis: seed $SEED, $MAX_EXAMPLES examples, at most ${MAX_TIME_S}s"
set +e
# run from the scratch directory: schemathesis keeps a cache (.schemathesis/) in its cwd
(cd "$work" && SCHEMATHESIS_HOOKS="$OLDPWD/scripts/schemathesis/hooks.py" \
  timeout --kill-after=10s $((MAX_TIME_S + 40)) "$OLDPWD/$VENV/bin/st" \
  --config-file "$OLDPWD/scripts/schemathesis/schemathesis.toml" run "http://127.0.0.1:$port/openapi.json" \
  --checks all --seed "$SEED" --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME_S" \
  --workers 1 --request-timeout 10 --no-color \
  -H "Authorization: Bearer $jwt") >"$work/st.txt" 2>&1
status=$?
set -e
if [ "$status" != 0 ]; then
  cat "$work/st.txt"
  echo "schemathesis found failures (exit $status)" >&2
  exit "$status"
fi
grep -E '^(Test cases:|  [0-9]+ generated)|passed|in [0-9.]+s' "$work/st.txt" | tail -3
kill -TERM $gw; wait $gw || true
