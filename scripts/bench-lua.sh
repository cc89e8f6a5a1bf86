#!/usr/bin/env bash
# Redis cost of the claim scripts alone (no gateway): CPU per claim and memory per claim.
#
#   scripts/bench-lua.sh                       # full run (~20 min), markdown on stdout
#   scripts/bench-lua.sh --conns 256,50 --pipelines 16   # -P 16 only (~9 min)
#   scripts/bench-lua.sh --seconds 2 --repeats 1 --conns 256 --pipelines 16   # a quick look
#   scripts/bench-lua.sh --help                # every option
#
# Starts its own redis-server (free port, no persistence; killed by its PID at the end) and
# runs redis-benchmark (closed loop) at 256 and 50 connections, -P 1 and -P 16, on: PING, a
# `return 1` script, lua/claim.lua (the group-commit script: n claims of one shard per call)
# with 1, 8, 32 and 64 claims per call, lua/claim_batch.lua (the prototype, for comparison)
# with the same sizes, and the one-claim claim.lua of an earlier commit (git show; the
# baseline) (plus, at 256 connections -P 16: claim.lua x64 without request ids, claim.lua x1
# with a day offset).
# Argument variety: redis-benchmark 7.0 draws a new number for EVERY __rand_int__ of a
# command (and of each pipelined copy); the driver checks that before measuring. Each claim
# of a call thus has its own user, request id and nonce.
# Reports, per configuration, the median of --repeats runs (interleaved): calls/s, claims/s,
# redis-server CPU us per successful claim (INFO cpu user+sys deltas) and its ratio to PING
# -P 16 measured in the same run; then Redis bytes per live claim (used_memory deltas).
# Every run is bounded (timeouts in the driver); only 127.0.0.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in redis-server redis-benchmark python3; do
  command -v "$tool" >/dev/null || { echo "bench-lua: $tool not found" >&2; exit 1; }
done
python3 -c 'import redis' 2>/dev/null || {
  echo "bench-lua: needs the Python redis package (pip install redis)" >&2; exit 1; }

exec timeout 7200 python3 scripts/lua-bench.py "$@"
