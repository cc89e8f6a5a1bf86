#!/usr/bin/env bash
# Where Redis spends its instructions on the claim scripts: redis-server under valgrind
# callgrind, a fixed number of claims per workload (PING -P 16, return 1, the one-claim
# claim.lua of lua-bench.py's --old-rev, lua/claim.lua at 1, 8, 32 and 64 claims per call and
# at 64 without request ids, lua/claim_batch.lua at the same sizes), Ir per claim and the hot
# spots of claim.lua's 1-per-call and 64-per-call runs.
#
#   scripts/lua-profile.sh                                   # the system redis-server
#   scripts/lua-profile.sh --redis-bin /path/to/redis-server # e.g. a build with symbols
#   scripts/lua-profile.sh --sizes 1,32 --no-batch --cg-claims 640   # a quicker look
#
# Debian's redis-server is stripped: Lua's internal functions show as addresses. A build of
# the same source with symbols names them (see loadtest/results/*-lua-cost.md for how).
# Takes ~10 minutes (valgrind runs Redis ~50x slower). Starts its own redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind callgrind_control callgrind_annotate redis-benchmark python3; do
  command -v "$tool" >/dev/null || { echo "lua-profile: $tool not found" >&2; exit 1; }
done
exec timeout 3600 python3 scripts/lua-bench.py --callgrind "$@"
