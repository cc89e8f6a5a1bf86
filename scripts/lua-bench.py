#!/usr/bin/env python3
"""Redis cost of the claim scripts, measured on the script alone (scripts/bench-lua.sh runs it).

Starts its own redis-server (free port, no persistence, killed by PID at the end) and, for each
connection count and pipeline depth, runs redis-benchmark (closed loop) on:
  PING, a `return 1` script, lua/claim.lua (one claim per call), and lua/claim_batch.lua
  with 1, 8 and 32 claims per call.
Argument variety: redis-benchmark 7.0 replaces EVERY `__rand_int__` of a command (and of each
pipelined copy) with its own random 12-digit number (checked at start: `check_rand`), so each
claim of a call gets its own user, request id and nonce (u<12 digits>, r<12>, n<12>, as
today's bench of claim.lua). -r 10^9 (the most atoi takes): repeats are rare; every claim that succeeds is counted.
Each measurement: redis-server CPU (INFO cpu, user + sys, whole process) and wall time around
one redis-benchmark run of about --seconds seconds (the request count is calibrated by a short
run first), calls (INFO commandstats) and successful claims (the shard's sequence counter).
The server is flushed before each run. Runs are repeated --repeats times, interleaved across
the configurations (round-robin, so slow phases of the shared machine hit all alike), and the
median is reported.
Then memory: used_memory per claim after N claims (realistic id sizes), after the claim log
is deleted as the persister would, and after the request-id records are gone.
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import redis
except ImportError:  # pragma: no cover
    sys.exit("lua-bench: needs the redis package (pip install redis)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOUR = 3600000
MEM_W = 5000  # request-id retention of the memory run (ms): short, so expiry is observed
MAXLOG = "100000000"  # > 0 so the backlog check runs, never reached


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Server:
    def __init__(self, extra=()):
        self.dir = tempfile.mkdtemp(prefix="lua-bench-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--maxclients", "2000", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.r = redis.Redis(port=self.port, decode_responses=True, socket_timeout=120)
        for _ in range(200):
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("redis-server did not start")

    def cpu(self):
        i = self.r.info("cpu")
        return float(i["used_cpu_user"]) + float(i["used_cpu_sys"])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def old_keys(tag):
    return [f"cg:{{{tag}}}:{x}" for x in
            ["meta", "stock", "users", "daily", "req", "log", "deny", "claimed"]]


def new_keys(tag):
    return [f"cg:{{{tag}}}:{x}" for x in ["meta", "stock", "users", "req", "log", "deny", "claimed"]]


META = {"state": "active", "start": 0, "end": 2 ** 50, "limit": 1, "daily": 0, "vdays": 7,
        "vfrom": 0, "vto": 0, "ver": 1, "fp": "bench"}


def setup(r, daily=0):
    r.flushall()
    for keys in (old_keys("bo:0"), new_keys("bn:0")):
        r.hset(keys[0], mapping=dict(META, daily=daily))
        r.set(keys[1], 10 ** 12)


class Config:
    def __init__(self, name, kind, args, claims_per_call):
        self.name, self.kind, self.args, self.per = name, kind, args, claims_per_call


def configs(sha_old, sha_new, sha_one, sizes):
    out = [Config("PING", "ping", ["PING"], 0),
           Config("return 1", "evalsha", ["EVALSHA", sha_one, "0"], 0),
           Config("claim.lua", "evalsha",
                  ["EVALSHA", sha_old, "8", *old_keys("bo:0"), "u__rand_int__", "r__rand_int__",
                   MAXLOG, "bo", "0", "n__rand_int__"], 1),
           # ARGV 7: the batch's UTC offset (issue 11 item 3, a batch in Asia/Shanghai)
           Config("claim.lua, day offset", "evalsha",
                  ["EVALSHA", sha_old, "8", *old_keys("bo:0"), "u__rand_int__", "r__rand_int__",
                   MAXLOG, "bo", "0", "n__rand_int__", "28800000"], 1)]
    def batch(n, rid="r__rand_int__", nonce="n__rand_int__"):
        return (["EVALSHA", sha_new, "7", *new_keys("bn:0"), "claim", str(n), MAXLOG, str(HOUR)]
                + ["u__rand_int__"] * n + [rid] * n + [nonce] * n)

    for n in sizes:
        out.append(Config(f"claim_batch.lua x{n}", "evalsha", batch(n), n))
    return out


def variants(sha_new, sizes):
    """Extra rows (first connection count, -P 16 only): the levers outside the script."""
    def batch(n, rid="r__rand_int__", nonce="n__rand_int__"):
        return (["EVALSHA", sha_new, "7", *new_keys("bn:0"), "claim", str(n), MAXLOG, str(HOUR)]
                + ["u__rand_int__"] * n + [rid] * n + [nonce] * n)
    n = max(sizes)
    return [Config(f"claim_batch.lua x{n}, nonce ''", "evalsha", batch(n, nonce=""), n),
            Config(f"claim_batch.lua x{n}, no request id", "evalsha", batch(n, rid="", nonce=""),
                   n),
            Config(f"claim_batch.lua x{2 * n}", "evalsha", batch(2 * n), 2 * n)]


def claimed(r, cfg):
    if cfg.per == 0:
        return 0
    key = old_keys("bo:0")[7] if cfg.name.startswith("claim.lua") else new_keys("bn:0")[6]
    return int(r.get(key) or 0)


def calls(r, cfg):
    stats = r.info("commandstats")
    key = "cmdstat_ping" if cfg.kind == "ping" else "cmdstat_evalsha"
    return int(stats.get(key, {}).get("calls", 0))


def errors(r):
    return sum(v["count"] for v in r.info("errorstats").values())


def run_once(srv, cfg, conns, pipeline, requests, daily):
    r = srv.r
    setup(r, daily)
    time.sleep(0.2)
    e0 = errors(r)
    c0, n0, k0 = srv.cpu(), calls(r, cfg), claimed(r, cfg)
    t0 = time.monotonic()
    p = subprocess.run(
        ["redis-benchmark", "-p", str(srv.port), "-c", str(conns), "-P", str(pipeline),
         "-n", str(requests), "-r", "1000000000", "-q", *cfg.args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    t1 = time.monotonic()
    c1, n1, k1 = srv.cpu(), calls(r, cfg), claimed(r, cfg)
    if p.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {p.stderr[-500:]}")
    if errors(r) != e0:
        raise RuntimeError(f"{cfg.name}: errors in Redis: {r.info('errorstats')}")
    ncalls, nclaims = n1 - n0, k1 - k0
    return {"wall": t1 - t0, "cpu": c1 - c0, "calls": ncalls, "claims": nclaims,
            "mem": int(r.info("memory")["used_memory"])}


def check_rand(srv):
    """redis-benchmark must give each __rand_int__ of a command (and of each pipelined copy)
    its own number, or the batched calls would repeat one user."""
    r = srv.r
    r.flushall()
    subprocess.run(["redis-benchmark", "-p", str(srv.port), "-c", "1", "-P", "4", "-n", "8",
                    "-r", "1000000000", "-q", "RPUSH", "chk", "__rand_int__", "__rand_int__",
                    "__rand_int__"], stdout=subprocess.DEVNULL, check=True, timeout=60)
    vals = r.lrange("chk", 0, -1)
    if len(vals) != 24 or len(set(vals)) < 23:
        raise RuntimeError(f"redis-benchmark repeats __rand_int__: {vals}")
    r.flushall()


def bench(a):
    srv = Server()
    try:
        check_rand(srv)
        r = srv.r
        sha_old = r.script_load(open(os.path.join(ROOT, "lua/claim.lua")).read())
        sha_new = r.script_load(open(os.path.join(ROOT, a.script)).read())
        sha_one = r.script_load("return 1")
        cfgs = configs(sha_old, sha_new, sha_one, a.sizes)
        grid = [(c, conns, p) for conns in a.conns for p in a.pipelines for c in cfgs]
        extra = [] if a.no_variants else variants(sha_new, a.sizes)
        grid += [(c, a.conns[0], 16) for c in extra]
        cfgs = cfgs + extra
        # calibrate: requests for about --seconds seconds
        reqs = {}
        for cfg, conns, p in grid:
            probe = max(2000, a.probe_claims // cfg.per) if cfg.per else max(20000, conns * p * 20)
            m = run_once(srv, cfg, conns, p, probe, a.daily)
            rate = m["calls"] / m["wall"]
            reqs[(cfg.name, conns, p)] = max(probe, int(rate * a.seconds))
            print(f"calibrate {cfg.name:22s} c={conns:<3d} P={p:<2d} {rate:10.0f} calls/s",
                  file=sys.stderr, flush=True)
        results = {k: [] for k in reqs}
        for rep in range(a.repeats):
            for cfg, conns, p in grid:
                m = run_once(srv, cfg, conns, p, reqs[(cfg.name, conns, p)], a.daily)
                results[(cfg.name, conns, p)].append(m)
                per = m["cpu"] / (m["claims"] or m["calls"]) * 1e6
                print(f"run {rep + 1}/{a.repeats} {cfg.name:22s} c={conns:<3d} P={p:<2d} "
                      f"{m['calls'] / m['wall']:10.0f} calls/s {m['claims'] / m['wall']:10.0f} "
                      f"claims/s {per:7.2f} us/unit ({m['wall']:.1f}s)",
                      file=sys.stderr, flush=True)
        return cfgs, results
    finally:
        srv.stop()


def table(a, cfgs, results):
    lines = []
    for conns in a.conns:
        lines.append(f"\n### {conns} connections\n")
        lines.append("| script | -P | calls/s | claims/s | claims/call | redis CPU us per claim "
                     "(per call if no claim) | x PING -P 16 | runs (us/unit) | claims in the "
                     "shard at the end |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        ping16 = None
        rows = []
        for p in a.pipelines + ([16] if 16 not in a.pipelines else []):
            for cfg in cfgs:
                ms = results.get((cfg.name, conns, p))
                if not ms:
                    continue
                units = [m["cpu"] / (m["claims"] if cfg.per else m["calls"]) * 1e6 for m in ms]
                med = statistics.median(units)
                if cfg.kind == "ping" and p == 16:
                    ping16 = med
                rows.append((cfg, p, ms, units, med))
        for cfg, p, ms, units, med in rows:
            cps = statistics.median(m["calls"] / m["wall"] for m in ms)
            kps = statistics.median(m["claims"] / m["wall"] for m in ms)
            per_call = statistics.median(m["claims"] / m["calls"] for m in ms) if cfg.per else 0
            ratio = f"{med / ping16:.1f}" if ping16 else "n/a"
            size = statistics.median(m["claims"] for m in ms) if cfg.per else 0
            lines.append(f"| {cfg.name} | {p} | {cps:.0f} | {kps:.0f} | {per_call:.2f} | "
                         f"{med:.2f} | {ratio} | {' '.join(f'{u:.2f}' for u in units)} | "
                         f"{size:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- memory

def memory(a):
    """used_memory per claim, realistic id sizes: user 'u' + 9 digits, request id '~' + 16 hex
    (the gateway's internal id) or a 24-character client id, nonce 16 hex or ''."""
    srv = Server()
    out = []
    try:
        r = srv.r
        sha_old = r.script_load(open(os.path.join(ROOT, "lua/claim.lua")).read())
        sha_new = r.script_load(open(os.path.join(ROOT, a.script)).read())
        N = a.mem_claims
        variants = [("claim.lua", "nonce 16 hex", 0), ("claim_batch.lua x32", "nonce 16 hex", 0),
                    ("claim_batch.lua x32", "nonce ''", 0),
                    ("claim.lua", "nonce 16 hex, daily limit on", 1),
                    ("claim_batch.lua x32", "nonce 16 hex, daily limit on", 1)]
        for script, label, daily in variants:
            r.flushall()
            r.execute_command("MEMORY", "PURGE")
            setup(r, daily)
            time.sleep(0.3)
            base = int(r.info("memory")["used_memory"])
            pipe = r.pipeline(transaction=False)
            empty_nonce = "''" in label
            claims = [(f"u{100000000 + i}", f"~{i * 2654435761 % 2 ** 64:016x}",
                       "" if empty_nonce else f"{i * 40503 % 2 ** 64:016x}") for i in range(N)]
            if script == "claim.lua":
                k = old_keys("bo:0")
                for u, rid, nonce in claims:
                    pipe.evalsha(sha_old, 8, *k, u, rid, MAXLOG, "bo", "0", nonce)
                    if len(pipe) >= 1000:
                        pipe.execute()
                logk, reqk = k[5], [k[4]]
            else:
                k = new_keys("bn:0")
                for i in range(0, N, 32):
                    part = claims[i:i + 32]
                    cols = ([c[0] for c in part] + [c[1] for c in part]
                            + [c[2] for c in part])
                    pipe.evalsha(sha_new, 7, *k, "claim", len(part), MAXLOG, str(MEM_W), *cols)
                    if len(pipe) >= 100:
                        pipe.execute()
                logk = k[4]
            pipe.execute()
            seq = int(r.get(k[-1]))
            assert seq == N, f"{script}: {seq} claims of {N}"
            time.sleep(0.3)
            m1 = int(r.info("memory")["used_memory"])
            # the persister: XACK + XDEL of every entry, in chunks
            ids = [e[0] for e in r.xrange(logk)]
            for j in range(0, len(ids), 500):
                r.xdel(logk, *ids[j:j + 500])
            time.sleep(0.3)
            m2 = int(r.info("memory")["used_memory"])
            if script == "claim.lua":
                # claim.lua's request-id records never expire: deleted here for comparison
                r.delete(*reqk)
            else:
                # the generations expire by themselves (PEXPIRE at start + 2W): wait for it
                deadline = time.time() + 10 * MEM_W / 1000
                while r.keys(f"{k[3]}:*") and time.time() < deadline:
                    time.sleep(0.2)
                assert not r.keys(f"{k[3]}:*"), "request-id generations did not expire"
            time.sleep(0.3)
            m3 = int(r.info("memory")["used_memory"])
            enc = r.object("encoding", k[2])
            out.append((script, label, N, (m1 - base) / N, (m2 - base) / N, (m3 - base) / N, enc))
            print(f"memory {script} {label}: {(m1 - base) / N:.1f} {(m2 - base) / N:.1f} "
                  f"{(m3 - base) / N:.1f} B/claim (users hash {enc})", file=sys.stderr,
                  flush=True)
    finally:
        srv.stop()
    lines = ["\n### Redis memory per live claim (used_memory delta / claims)\n",
             f"{N} claims on one shard, distinct users `u` + 9 digits, request id `~` + 16 hex "
             "(the gateway's internal one), limit 1.\n",
             f"claim_batch.lua runs with retention W = {MEM_W} ms and the last column is "
             "measured once its request-id generations expired by themselves; claim.lua's "
             "records never expire, so that column deletes its req hash.\n",
             "| script | variant | after the claims (log, request ids, users) | after the "
             "persister deleted the log entries | after the request-id records expired "
             "(users only) |",
             "|---|---|---|---|---|"]
    for script, label, n, a1, a2, a3, enc in out:
        lines.append(f"| {script} | {label} | {a1:.1f} | {a2:.1f} | {a3:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- callgrind

HOT = [  # (label, function) for the inclusive breakdown; names need a binary with symbols
    ("Lua VM, script body (luaV_execute, incl. everything below)", "lvm.c:luaV_execute"),
    ("redis.call glue + the commands it runs (luaRedisGenericCommand)",
     "script_lua.c:luaRedisGenericCommand"),
    ("the Redis commands themselves (call from scripts)", "server.c:call'2"),
    ("Lua string creation (luaS_newlstr)", "lstring.c:luaS_newlstr"),
    ("Lua tables (luaH_set: inserts, resizes)", "ltable.c:luaH_set"),
    ("Lua garbage collector (luaC_step)", "lgc.c:luaC_step"),
    ("string.format", "lstrlib.c:str_format"),
    ("table.concat", "ltablib.c:tconcat"),
    ("tonumber", "lbaselib.c:luaB_tonumber"),
    ("KEYS/ARGV into Lua (luaCreateArray)", "script_lua.c:luaCreateArray"),
    ("replies into Lua (parseReply)", "resp_parser.c:parseReply"),
    ("Lua args into Redis (luaArgsToRedisArgv)", "script_lua.c:luaArgsToRedisArgv"),
    ("HSET", "t_hash.c:hsetCommand"),
    ("HMGET", "t_hash.c:hmgetCommand"),
    ("XADD", "t_stream.c:xaddCommand"),
    ("protocol parsing (processMultibulkBuffer)", "networking.c:processMultibulkBuffer"),
]


def callgrind(a):
    """Instructions (callgrind Ir) per claim for a fixed number of claims, and where they go."""
    work = tempfile.mkdtemp(prefix="lua-callgrind-")
    port = free_port()
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.%p.out",
         a.redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = str(proc.pid)
    r = redis.Redis(port=port, decode_responses=True, socket_timeout=600)
    try:
        for _ in range(600):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.2)
        sha_old = r.script_load(open(os.path.join(ROOT, "lua/claim.lua")).read())
        sha_new = r.script_load(open(os.path.join(ROOT, a.script)).read())
        sha_one = r.script_load("return 1")
        setup(r)
        ko, kn = old_keys("bo:0"), new_keys("bn:0")
        off = [10 ** 8]
        N = a.cg_claims

        def users(k, rid=True):
            base = off[0]
            off[0] += k
            us = [f"u{base + i:012d}" for i in range(k)]
            rs = [f"r{base + i:012d}" if rid else "" for i in range(k)]
            ns = [f"n{base + i:012d}" if rid else "" for i in range(k)]
            return us, rs, ns

        def run_old(k):
            p = r.pipeline(transaction=False)
            us, rs, ns = users(k)
            for u, rid, nonce in zip(us, rs, ns):
                p.evalsha(sha_old, 8, *ko, u, rid, MAXLOG, "bo", "0", nonce)
            p.execute()

        def run_new(per, rid=True):
            def go(k):
                p = r.pipeline(transaction=False)
                for _ in range(k // per):
                    us, rs, ns = users(per, rid)
                    p.evalsha(sha_new, 7, *kn, "claim", per, MAXLOG, str(HOUR), *us, *rs, *ns)
                p.execute()
            return go

        def run_one(k):
            p = r.pipeline(transaction=False)
            for _ in range(k):
                p.evalsha(sha_one, 0)
            p.execute()

        def run_ping(k):
            subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-P", "16", "-n",
                            str(k), "-q", "PING"], stdout=subprocess.DEVNULL, check=True,
                           timeout=1200)

        loads = [("PING -P 16 (redis-benchmark, 50 connections)", run_ping, 20 * N, "call"),
                 ("return 1", run_one, N, "call"), ("claim.lua", run_old, N, "claim")]
        for per in a.sizes:
            loads.append((f"claim_batch.lua x{per}", run_new(per), N, "claim"))
        big = max(a.sizes)
        loads.append((f"claim_batch.lua x{big}, no request id", run_new(big, False), N, "claim"))
        rows, dumps = [], {}
        for name, fn, units, unit in loads:
            if unit == "claim":
                fn(2048)  # warm: the shard's hashes are hashtables, as in a sale
            subprocess.run(["callgrind_control", "-z", pid], check=True,
                           stdout=subprocess.DEVNULL, timeout=120)
            fn(units)
            tag = re.sub(r"[^a-z0-9]+", "_", name.lower())[:40]
            subprocess.run(["callgrind_control", "-d", tag, pid], check=True,
                           stdout=subprocess.DEVNULL, timeout=120)
            time.sleep(0.5)
            f = max((os.path.join(work, x) for x in os.listdir(work) if ".out." in x),
                    key=os.path.getmtime)
            total = 0
            for line in open(f):
                if line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
            rows.append((name, total / units, unit))
            dumps[name] = f
            print(f"callgrind {name}: {total / units:.0f} Ir per {unit}", file=sys.stderr,
                  flush=True)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    ping = rows[0][1]
    keep = []
    for name in [f"claim_batch.lua x{min(a.sizes)}", f"claim_batch.lua x{max(a.sizes)}"]:
        keep.append(annotate(dumps[name], True))
        keep.append(annotate(dumps[name], False))
    if a.cg_keep:
        print(f"callgrind dumps kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"\n### Instructions per claim (callgrind, {a.redis_bin}, {N} claims per row)\n",
             "| workload | Ir per unit | unit | x PING -P 16 |", "|---|---|---|---|"]
    for name, ir, unit in rows:
        lines.append(f"| {name} | {ir:.0f} | {unit} | {ir / ping:.1f} |")
    for q, name in enumerate([f"claim_batch.lua x{min(a.sizes)}",
                              f"claim_batch.lua x{max(a.sizes)}"]):
        inc, exc = keep[2 * q], keep[2 * q + 1]
        total = inc.get("__total__", 1)
        lines.append(f"\n#### {name}: where the instructions go (share of all)\n")
        lines.append("| part (inclusive: with what it calls) | share |")
        lines.append("|---|---|")
        for label, fn in HOT:
            name = fn.split(":")[-1]  # a stripped binary names only exported functions
            v = max([x for k, x in inc.items() if k.split(":")[-1] == name] or [0])
            if v:
                lines.append(f"| {label} | {100 * v / total:.1f}% |")
        lines.append("\n| top functions by own instructions (exclusive) | share |")
        lines.append("|---|---|")
        for k, v in sorted(((k, v) for k, v in exc.items() if k != "__total__"),
                           key=lambda x: -x[1])[:15]:
            lines.append(f"| {k} | {100 * v / total:.1f}% |")
    return "\n".join(lines)


def annotate(path, inclusive):
    p = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no",
                        f"--inclusive={'yes' if inclusive else 'no'}", path],
                       capture_output=True, text=True, timeout=600)
    out = {}
    section = 0  # 1: the totals line, 2: the function list
    for line in p.stdout.splitlines():
        if "PROGRAM TOTALS" in line:
            out["__total__"] = int(line.split()[0].replace(",", ""))
            continue
        if "file:function" in line:
            section = 2
            continue
        if section != 2 or line.startswith("--"):
            if section == 2 and line.startswith("--") and len(out) > 1:
                break
            continue
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+)", line)
        if not m:
            continue
        v, fn = int(m.group(1).replace(",", "")), m.group(2)
        if fn.endswith(("libc-start.c:__libc_start_main@@GLIBC_2.34", ":main", "(below")) \
                or "0x000000000001ab70" in fn or "libc_start_call_main" in fn:
            continue
        fn = re.sub(r"^.*/(src|deps/lua/src)/", "", fn)
        fn = re.sub(r"^\./.*/", "", fn)
        out[fn] = max(out.get(fn, 0), v)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    ap.add_argument("--probe-claims", type=int, default=40000,
                    help="claims in the calibration run of a claim script")
    ap.add_argument("--no-variants", action="store_true",
                    help="skip the extra rows (nonce '', no request id, twice the size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conns", type=lambda s: [int(x) for x in s.split(",")], default=[256, 50])
    ap.add_argument("--pipelines", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 16])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 8, 32])
    ap.add_argument("--daily", type=int, default=0, help="daily limit of the benched batch")
    ap.add_argument("--script", default="lua/claim_batch.lua")
    ap.add_argument("--mem-claims", type=int, default=100000)
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the raw runs here")
    ap.add_argument("--callgrind", action="store_true",
                    help="instead: run redis-server under valgrind callgrind, fixed claim counts")
    ap.add_argument("--redis-bin", default="redis-server",
                    help="redis-server binary for --callgrind (one with symbols names the "
                         "Lua internals)")
    ap.add_argument("--cg-claims", type=int, default=3200)
    ap.add_argument("--cg-keep", action="store_true", help="keep the callgrind dumps")
    a = ap.parse_args()
    print(f"# claim script cost: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
          f"{subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start")
    print(f"script {a.script}; runs of ~{a.seconds:g}s, median of {a.repeats}; daily limit "
          f"{a.daily}; successful claims only are counted as claims")
    if a.callgrind:
        print(callgrind(a))
        return
    if not a.no_cpu:
        cfgs, results = bench(a)
        print(table(a, cfgs, results))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({f"{k[0]}|c{k[1]}|P{k[2]}": v for k, v in results.items()}, f,
                          indent=1)
    if not a.no_memory:
        print(memory(a))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
