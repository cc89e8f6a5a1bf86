# Shared by the benchmark scripts (sourced, not run): a work directory removed at exit, the
# processes started (PIDS) killed at exit, and small helpers.
#   log MSG            progress on stderr
#   free_port          a free TCP port on 127.0.0.1
#   cpu_ticks PID      utime + stime of PID, in ticks of $tick_hz
#   jget FILE EXPR     a value of a JSON file (EXPR over d, Python syntax)
#   calc EXPR          Python arithmetic
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
tick_hz=$(getconf CLK_TCK)
jget() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$1" "$2"; }
calc() { python3 -c "print($1)"; }
