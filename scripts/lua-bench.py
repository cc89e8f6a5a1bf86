#!/usr/bin/env python3
"""Redis cost of the claim scripts, measured on the script alone (scripts/bench-lua.sh runs it).

Starts its own redis-server (free port, no persistence, killed by PID at the end) and, for each
connection count and pipeline depth, runs redis-benchmark (closed loop) on:
  PING, a `return 1` script, lua/claim.lua (the group-commit script: n claims of one shard per
  call) with 1, 8, 32 and 64 claims per call, lua/claim_batch.lua (the older prototype, its
  own storage format) with the same sizes for comparison, and the one-claim claim.lua of
  --old-rev (read with `git show`, skipped if that revision is not in the repository).
Argument variety: redis-benchmark 7.0 replaces EVERY `__rand_int__` of a command (and of each
pipelined copy) with its own random 12-digit number (checked at start: `check_rand`), so each
claim of a call gets its own user, request id and nonce (u<12 digits>, r<12>, n<12>, as
the bench of claim.lua in scripts/bench.sh). -r 10^9 (the most atoi takes): repeats are rare;
every claim that succeeds is counted.
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
MEM_W = 5000  # request-id retention of claim_batch.lua in the memory run (ms): expiry observed
MAXLOG = "100000000"  # > 0 so the backlog check runs, never reached
# The last commit whose lua/claim.lua is the one-claim script (ARGV user, rid, max log, batch,
# shard, nonce[, offset]); its row is the baseline of the group-commit rewrite.
OLD_REV = "bdc84e5a20d58c8a1c62e2eae16ad848caed6f3c"


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


# One shard per script, each with its own hash tag: claim.lua {bc:0}, the one-claim claim.lua
# {bo:0} (the same 8 keys), claim_batch.lua {bn:0} (7 keys).
def claim_keys(tag):
    return [f"cg:{{{tag}}}:{x}" for x in
            ["meta", "stock", "users", "daily", "req", "log", "deny", "claimed"]]


def batch_keys(tag):
    return [f"cg:{{{tag}}}:{x}" for x in ["meta", "stock", "users", "req", "log", "deny", "claimed"]]


TAGS = ("bc:0", "bo:0", "bn:0", "br:0")
# {br:0}: claim.lua on a shard whose request ids were rotated (lua/rotate.lua): the current
# generation is KEYS[5], the previous one (KEYS[11]) holds records and some were dropped
# before, so a request id not found in the current one is looked up in the previous one
ROTATED = {"rqc": "0", "rqo": "1", "rqd": "1"}
META = {"state": "active", "start": 0, "end": 2 ** 50, "limit": 1, "daily": 0, "vdays": 7,
        "vfrom": 0, "vto": 0, "ver": 1, "fp": "bench"}


def setup(r, daily=0):
    r.flushall()
    for tag in TAGS:
        keys = claim_keys(tag)
        r.hset(keys[0], mapping=dict(META, daily=daily))
        r.set(keys[1], 10 ** 12)
    r.hset(claim_keys("br:0")[0], mapping=ROTATED)
    r.hset("cg:{br:0}:req2", "someone|r0", "br.0.1|0|0|0|n")


def old_script(rev):
    """The one-claim claim.lua of git revision rev, or None if it is not there."""
    if not rev:
        return None
    p = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:lua/claim.lua"], capture_output=True,
                       text=True)
    if p.returncode != 0 or "one claim against" not in p.stdout[:200]:
        print(f"lua-bench: no one-claim claim.lua at {rev}: its row is skipped", file=sys.stderr)
        return None
    return p.stdout


def load(r, a):
    """SCRIPT LOAD every script; returns {name: sha} (no 'old' if --old-rev has none)."""
    shas = {"claim": r.script_load(open(os.path.join(ROOT, a.claim)).read()),
            "batch": r.script_load(open(os.path.join(ROOT, a.script)).read()),
            "one": r.script_load("return 1"),
            "recent": r.script_load(open(os.path.join(ROOT, "lua/recent.lua")).read())}
    old = old_script(a.old_rev)
    if old is not None:
        shas["old"] = r.script_load(old)
    return shas


class Config:
    def __init__(self, name, kind, args, claims_per_call, seq_key=None):
        self.name, self.kind, self.args, self.per = name, kind, args, claims_per_call
        self.seq_key = seq_key


def claim_args(sha, n, rid="r__rand_int__", nonce="n__rand_int__", offset="0", states=False,
               tag="bc:0"):
    """EVALSHA of claim.lua with n claims: n, max log, batch, shard, day offset, users, rids,
    nonces. `states`: with KEYS 9 (codes, unused here) and 10 (the coupon states the gateway
    passes since read-your-writes: one entry written per coupon), and 11 (the second
    request-id generation, as the gateway passes it since request-id retention)."""
    keys = claim_keys(tag)
    if states:
        keys = keys + [f"cg:{{{tag}}}:codes", f"cg:{{{tag}}}:coupons", f"cg:{{{tag}}}:req2"]
    batch = tag.split(":")[0]
    return (["EVALSHA", sha, str(len(keys)), *keys, str(n), MAXLOG, batch, "0", offset]
            + ["u__rand_int__"] * n + [rid] * n + [nonce] * n)


def batch_args(sha, n, rid="r__rand_int__", nonce="n__rand_int__"):
    return (["EVALSHA", sha, "7", *batch_keys("bn:0"), "claim", str(n), MAXLOG, str(HOUR)]
            + ["u__rand_int__"] * n + [rid] * n + [nonce] * n)


def configs(shas, a):
    ck, bk = claim_keys("bc:0")[7], batch_keys("bn:0")[6]
    out = [Config("PING", "ping", ["PING"], 0),
           Config("return 1", "evalsha", ["EVALSHA", shas["one"], "0"], 0)]
    if "old" in shas:
        out.append(Config(f"one-claim claim.lua ({a.old_rev[:7]})", "evalsha",
                          ["EVALSHA", shas["old"], "8", *claim_keys("bo:0"), "u__rand_int__",
                           "r__rand_int__", MAXLOG, "bo", "0", "n__rand_int__"], 1,
                          claim_keys("bo:0")[7]))
    for n in a.sizes:
        out.append(Config(f"claim.lua x{n}", "evalsha", claim_args(shas["claim"], n), n, ck))
    if not a.no_batch:
        for n in a.sizes:
            out.append(Config(f"claim_batch.lua x{n}", "evalsha", batch_args(shas["batch"], n),
                              n, bk))
    return out


def variants(shas, a):
    """Extra rows (first connection count, -P 16 only): the levers outside the script."""
    ck = claim_keys("bc:0")[7]
    n = max(a.sizes)
    return [Config(f"claim.lua x{n}, no request id", "evalsha",
                   claim_args(shas["claim"], n, rid="", nonce=""), n, ck),
            Config("claim.lua x1, day offset +8 h", "evalsha",
                   claim_args(shas["claim"], 1, offset="28800000"), 1, ck),
            Config("claim.lua x1, coupon states", "evalsha",
                   claim_args(shas["claim"], 1, states=True), 1, ck),
            Config(f"claim.lua x{n}, coupon states", "evalsha",
                   claim_args(shas["claim"], n, states=True), n, ck),
            # after a request-id rotation: fresh request ids miss the current generation and
            # are looked up in the previous one too
            Config("claim.lua x1, coupon states, request ids rotated", "evalsha",
                   claim_args(shas["claim"], 1, states=True, tag="br:0"), 1,
                   claim_keys("br:0")[7]),
            Config(f"claim.lua x{n}, coupon states, request ids rotated", "evalsha",
                   claim_args(shas["claim"], n, states=True, tag="br:0"), n,
                   claim_keys("br:0")[7]),
            # the read-your-writes touch of the user's recent set before a 201 (one per
            # claim, its own slot): counted as one claim per call
            Config("recent.lua touch", "evalsha",
                   ["EVALSHA", shas["recent"], "1", "cg:{w:u__rand_int__}:recent", "touch",
                    "600000", str(int(time.time() * 1000)), "1000", "bc.0.__rand_int__"], 1)]


def claimed(r, cfg):
    if cfg.per == 0:
        return 0
    if cfg.seq_key is None:  # not a claim script (the recent touch): one per call
        return calls(r, cfg)
    return int(r.get(cfg.seq_key) or 0)


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
    if cfg.per and nclaims < 0.95 * ncalls * cfg.per:
        raise RuntimeError(f"{cfg.name}: only {nclaims} claims succeeded of {ncalls * cfg.per}")
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


def check_claim(r, shas):
    """One call of each size through claim.lua answers n claims that all succeed."""
    setup(r)
    for n in (1, 3):
        args = claim_args(shas["claim"], n)[3:]
        args = [x.replace("__rand_int__", f"{n}{i}") for i, x in enumerate(args)]
        rep = r.evalsha(shas["claim"], 8, *args)
        if len(rep) != n or any(x[0] != 1 for x in rep):
            raise RuntimeError(f"claim.lua x{n}: unexpected reply {rep}")
    r.flushall()


def bench(a):
    srv = Server()
    try:
        check_rand(srv)
        r = srv.r
        shas = load(r, a)
        check_claim(r, shas)
        cfgs = configs(shas, a)
        grid = [(c, conns, p) for conns in a.conns for p in a.pipelines for c in cfgs]
        extra = [] if a.no_variants else variants(shas, a)
        grid += [(c, a.conns[0], 16) for c in extra]
        cfgs = cfgs + extra
        # calibrate: requests for about --seconds seconds
        reqs = {}
        for cfg, conns, p in grid:
            probe = max(2000, a.probe_claims // cfg.per) if cfg.per else max(20000, conns * p * 20)
            m = run_once(srv, cfg, conns, p, probe, a.daily)
            rate = m["calls"] / m["wall"]
            reqs[(cfg.name, conns, p)] = max(probe, int(rate * a.seconds))
            print(f"calibrate {cfg.name:30s} c={conns:<3d} P={p:<2d} {rate:10.0f} calls/s",
                  file=sys.stderr, flush=True)
        results = {k: [] for k in reqs}
        for rep in range(a.repeats):
            for cfg, conns, p in grid:
                m = run_once(srv, cfg, conns, p, reqs[(cfg.name, conns, p)], a.daily)
                m["load1"] = os.getloadavg()[0]
                results[(cfg.name, conns, p)].append(m)
                per = m["cpu"] / (m["claims"] or m["calls"]) * 1e6
                print(f"run {rep + 1}/{a.repeats} {cfg.name:30s} c={conns:<3d} P={p:<2d} "
                      f"{m['calls'] / m['wall']:10.0f} calls/s {m['claims'] / m['wall']:10.0f} "
                      f"claims/s {per:7.2f} us/unit ({m['wall']:.1f}s, load "
                      f"{m['load1']:.2f})", file=sys.stderr, flush=True)
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
    loads = [m["load1"] for ms in results.values() for m in ms]
    if loads:
        lines.append(f"\n1-minute load average after the measured runs: min {min(loads):.2f}, "
                     f"median {statistics.median(loads):.2f}, max {max(loads):.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- memory

def memory(a):
    """used_memory per claim, realistic id sizes: user 'u' + 9 digits, request id '~' + 16 hex
    (the gateway's internal id), nonce 16 hex or ''."""
    srv = Server()
    out = []
    try:
        r = srv.r
        shas = load(r, a)
        N = a.mem_claims
        runs = [("claim.lua", 1, "nonce 16 hex", 0), ("claim.lua", 32, "nonce 16 hex", 0),
                ("claim.lua", 32, "nonce 16 hex, daily limit on", 1),
                ("claim.lua", 32, "nonce 16 hex, coupon states", 0)]
        if not a.no_batch:
            runs += [("claim_batch.lua", 32, "nonce 16 hex", 0),
                     ("claim_batch.lua", 32, "nonce ''", 0),
                     ("claim_batch.lua", 32, "nonce 16 hex, daily limit on", 1)]
        for script, per, label, daily in runs:
            r.flushall()
            r.execute_command("MEMORY", "PURGE")
            setup(r, daily)
            time.sleep(0.3)
            base = int(r.info("memory")["used_memory"])
            pipe = r.pipeline(transaction=False)
            empty_nonce = "''" in label
            claims = [(f"u{100000000 + i}", f"~{i * 2654435761 % 2 ** 64:016x}",
                       "" if empty_nonce else f"{i * 40503 % 2 ** 64:016x}") for i in range(N)]
            for i in range(0, N, per):
                part = claims[i:i + per]
                cols = [c[0] for c in part] + [c[1] for c in part] + [c[2] for c in part]
                if script == "claim.lua":
                    k = claim_keys("bc:0")
                    extra = (["cg:{bc:0}:codes", "cg:{bc:0}:coupons"]
                             if "coupon states" in label else [])
                    pipe.evalsha(shas["claim"], 8 + len(extra), *k, *extra, len(part), MAXLOG,
                                 "bc", "0", "0", *cols)
                else:
                    k = batch_keys("bn:0")
                    pipe.evalsha(shas["batch"], 7, *k, "claim", len(part), MAXLOG, str(MEM_W),
                                 *cols)
                if len(pipe) * per >= 3200:
                    pipe.execute()
            pipe.execute()
            logk = k[-3]
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
                r.delete(k[4])
            else:
                # the generations expire by themselves (PEXPIRE at start + 2W): wait for it
                deadline = time.time() + 10 * MEM_W / 1000
                while r.keys(f"{k[3]}:*") and time.time() < deadline:
                    time.sleep(0.2)
                assert not r.keys(f"{k[3]}:*"), "request-id generations did not expire"
            time.sleep(0.3)
            m3 = int(r.info("memory")["used_memory"])
            name = f"{script} x{per}"
            out.append((name, label, (m1 - base) / N, (m2 - base) / N, (m3 - base) / N))
            print(f"memory {name} {label}: {(m1 - base) / N:.1f} {(m2 - base) / N:.1f} "
                  f"{(m3 - base) / N:.1f} B/claim (users hash {r.object('encoding', k[2])})",
                  file=sys.stderr, flush=True)
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
    for name, label, a1, a2, a3 in out:
        lines.append(f"| {name} | {label} | {a1:.1f} | {a2:.1f} | {a3:.1f} |")
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
        shas = load(r, a)
        setup(r)
        ko, kc, kb = claim_keys("bo:0"), claim_keys("bc:0"), batch_keys("bn:0")
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
                p.evalsha(shas["old"], 8, *ko, u, rid, MAXLOG, "bo", "0", nonce)
            p.execute()

        def run_claim(per, rid=True):
            def go(k):
                p = r.pipeline(transaction=False)
                for _ in range(k // per):
                    us, rs, ns = users(per, rid)
                    p.evalsha(shas["claim"], 8, *kc, per, MAXLOG, "bc", "0", "0", *us, *rs, *ns)
                p.execute()
            return go

        def run_batch(per, rid=True):
            def go(k):
                p = r.pipeline(transaction=False)
                for _ in range(k // per):
                    us, rs, ns = users(per, rid)
                    p.evalsha(shas["batch"], 7, *kb, "claim", per, MAXLOG, str(HOUR), *us, *rs,
                              *ns)
                p.execute()
            return go

        def run_one(k):
            p = r.pipeline(transaction=False)
            for _ in range(k):
                p.evalsha(shas["one"], 0)
            p.execute()

        def run_ping(k):
            subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-P", "16", "-n",
                            str(k), "-q", "PING"], stdout=subprocess.DEVNULL, check=True,
                           timeout=1200)

        loads = [("PING -P 16 (redis-benchmark, 50 connections)", run_ping, 20 * N, "call"),
                 ("return 1", run_one, N, "call")]
        if "old" in shas:
            loads.append((f"one-claim claim.lua ({a.old_rev[:7]})", run_old, N, "claim"))
        for per in a.sizes:
            loads.append((f"claim.lua x{per}", run_claim(per), N, "claim"))
        big = max(a.sizes)
        loads.append((f"claim.lua x{big}, no request id", run_claim(big, False), N, "claim"))
        if not a.no_batch:
            for per in a.sizes:
                loads.append((f"claim_batch.lua x{per}", run_batch(per), N, "claim"))
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
    hot = [f"claim.lua x{min(a.sizes)}", f"claim.lua x{max(a.sizes)}"]
    keep = []
    for name in hot:
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
    for q, name in enumerate(hot):
        inc, exc = keep[2 * q], keep[2 * q + 1]
        total = inc.get("__total__", 1)
        lines.append(f"\n#### {name}: where the instructions go (share of all)\n")
        lines.append("| part (inclusive: with what it calls) | share |")
        lines.append("|---|---|")
        for label, fn in HOT:
            fname = fn.split(":")[-1]  # a stripped binary names only exported functions
            v = max([x for k, x in inc.items() if k.split(":")[-1] == fname] or [0])
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


def sizes(s):
    out = [int(x) for x in s.split(",")]
    if not out or any(not 1 <= n <= 1000 for n in out):
        raise argparse.ArgumentTypeError("claims per call: integers in 1..1000")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    ap.add_argument("--probe-claims", type=int, default=40000,
                    help="claims in the calibration run of a claim script")
    ap.add_argument("--no-variants", action="store_true",
                    help="skip the extra rows (claim.lua at the largest size without request "
                         "ids, claim.lua x1 with a day offset)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conns", type=lambda s: [int(x) for x in s.split(",")], default=[256, 50])
    ap.add_argument("--pipelines", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 16])
    ap.add_argument("--sizes", type=sizes, default=[1, 8, 32, 64],
                    help="claims per call of claim.lua and claim_batch.lua (comma-separated)")
    ap.add_argument("--daily", type=int, default=0, help="daily limit of the benched batch")
    ap.add_argument("--claim", default="lua/claim.lua", help="the group-commit claim script")
    ap.add_argument("--script", default="lua/claim_batch.lua",
                    help="the prototype compared with it (its own storage format)")
    ap.add_argument("--no-batch", action="store_true", help="skip the claim_batch.lua rows")
    ap.add_argument("--old-rev", default=OLD_REV,
                    help="git revision whose lua/claim.lua is the one-claim script measured as "
                         "the baseline row ('' = no such row)")
    ap.add_argument("--mem-claims", type=int, default=100000)
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the raw runs here")
    ap.add_argument("--callgrind", action="store_true",
                    help="instead: run redis-server under valgrind callgrind, fixed claim counts")
    ap.add_argument("--redis-bin", default="redis-server",
                    help="redis-server binary for --callgrind (one with symbols names the "
                         "Lua internals)")
    ap.add_argument("--cg-claims", type=int, default=3200,
                    help="claims per callgrind row (a multiple of every size)")
    ap.add_argument("--cg-keep", action="store_true", help="keep the callgrind dumps")
    a = ap.parse_args()
    if a.callgrind and any(a.cg_claims % n for n in a.sizes):
        ap.error("--cg-claims must be a multiple of every --sizes value")
    print(f"# claim script cost: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
          f"{subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start")
    print(f"scripts {a.claim} (x{', x'.join(map(str, a.sizes))})"
          f"{'' if a.no_batch else f', {a.script} (same sizes)'}"
          f"{f', one-claim claim.lua of {a.old_rev[:7]}' if a.old_rev else ''}; runs of "
          f"~{a.seconds:g}s, median of {a.repeats}; daily limit {a.daily}; successful claims "
          f"only are counted as claims")
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
