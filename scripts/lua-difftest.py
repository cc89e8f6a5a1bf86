#!/usr/bin/env python3
"""Differential test of lua/claim_batch.lua against today's lua/claim.lua, in Lua-land only.

Runs the same random sequence of claims (duplicate users, repeated request ids = replays,
users at their limit, daily limits with yesterday's counts, deny list, pause / window
changes, an empty shard that is refilled, a shard whose meta vanishes) through claim.lua one
claim at a time and through claim_batch.lua in batches of random size, each against its own
shard of the same redis-server, and checks that every answer matches (coupon ids may differ
only by the epoch segment; times only by when each script ran), and that the final per-user
counts, day counts, stock, sequence and claim logs match.

Then directed checks of what claim.lua cannot be compared with: validate-then-write (a bad
argument anywhere fails the whole call and changes nothing), the backlog bound, fencing, the
epoch, the 'replay' op, and request-id retention (generation rotation and expiry).

Usage: scripts/lua-difftest.py [--seeds N] [--first-seed S] [--steps N] [--max-batch N]
                              [--script lua/claim_batch.lua]
Starts its own redis-server on a free port (no persistence) and kills it (by PID) at the end.
Exit status 0 = every check passed.
"""
import argparse
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

try:
    import redis
except ImportError:  # pragma: no cover
    sys.exit("lua-difftest: needs the redis package (pip install redis)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = 86400000
HOUR = 3600000
BATCH_SCRIPT = os.path.join(ROOT, "lua/claim_batch.lua")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """A throwaway redis-server; stopped by its own PID only."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="lua-difftest-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.r = redis.Redis(port=self.port, decode_responses=True, socket_timeout=10)
        for _ in range(100):
            try:
                self.r.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Old:
    """One shard driven by lua/claim.lua, one claim per call."""

    def __init__(self, r, batch, shard):
        self.r, self.batch, self.shard = r, batch, str(shard)
        tag = f"{{{batch}:{shard}}}"
        self.k = {x: f"cg:{tag}:{x}" for x in
                  ["meta", "stock", "users", "daily", "req", "log", "deny", "claimed"]}
        self.sha = r.script_load(open(os.path.join(ROOT, "lua/claim.lua")).read())

    def keys(self):
        k = self.k
        return [k["meta"], k["stock"], k["users"], k["daily"], k["req"], k["log"], k["deny"],
                k["claimed"]]

    def claim(self, user, rid, nonce, maxlog=0):
        return self.r.evalsha(self.sha, 8, *self.keys(), user, rid, maxlog, self.batch,
                              self.shard, nonce)


class New:
    """One shard driven by lua/claim_batch.lua, many claims per call."""

    def __init__(self, r, batch, shard):
        self.r, self.batch, self.shard = r, batch, str(shard)
        tag = f"{{{batch}:{shard}}}"
        self.k = {x: f"cg:{tag}:{x}" for x in
                  ["meta", "stock", "users", "req", "log", "deny", "claimed"]}
        self.sha = r.script_load(open(BATCH_SCRIPT).read())

    def keys(self):
        k = self.k
        return [k["meta"], k["stock"], k["users"], k["req"], k["log"], k["deny"], k["claimed"]]

    def call(self, claims, op="claim", maxlog=0, retention=HOUR, raw_args=None):
        args = raw_args if raw_args is not None else (
            [op, len(claims), maxlog, retention] + [c[0] for c in claims]
            + [c[1] for c in claims] + [c[2] for c in claims])
        return self.r.evalsha(self.sha, 7, *self.keys(), *args)


def norm_old(rep):
    """claim.lua's answer, reduced to what claim_batch.lua must agree on."""
    if rep[0] == 1:
        _, coupon, vf, vt, at = rep
        b, s, seq = coupon.split(".")
        return ("new", int(seq)), (int(at), int(vf), int(vt), b, s)
    if rep[0] == 2:
        _, coupon, vf, vt, at, nonce = rep
        b, s, seq = coupon.split(".")
        return ("replay", int(seq), nonce), (int(at), int(vf), int(vt), b, s)
    return ("refused", rep[1]), None


def norm_new(rep, i):
    epoch, _seq_after, at, vf, vt = rep[:5]
    r = rep[5 + i]
    if isinstance(r, list):
        _, e, seq, rvf, rvt, rat, nonce = r
        return ("replay", seq, nonce), (rat, rvf, rvt, e)
    if r > 0:
        return ("new", r), (at, vf, vt, epoch)
    return ("refused", r), None


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def time_close(a, b, what, slack_ms=5000):
    check(abs(a - b) <= slack_ms, f"{what}: {a} vs {b} differ by more than {slack_ms} ms")


def validity_ok(meta, at, vf, vt, what):
    if int(meta["vdays"]) > 0:
        check(vf == at and vt == at + int(meta["vdays"]) * DAY, f"{what}: relative validity")
    else:
        check((vf, vt) == (int(meta["vfrom"]), int(meta["vto"])), f"{what}: fixed validity")


def setup_pair(r, seed, rng):
    old, new = Old(r, f"o{seed}", 3), New(r, f"n{seed}", 3)
    now = int(time.time() * 1000)
    today = now // DAY
    meta = {"state": "active", "start": now - HOUR, "end": now + 10 * HOUR,
            "limit": rng.choice([1, 2, 3]), "daily": rng.choice([0, 0, 1, 2]),
            "vdays": rng.choice([0, 1, 7]), "vfrom": now - DAY, "vto": now + 30 * DAY,
            "ver": 1, "fp": "f"}
    stock = rng.choice([3, 10, 40, 200])
    for side in (old, new):
        r.hset(side.k["meta"], mapping=meta)
        r.set(side.k["stock"], stock)
    # users with history: some at their lifetime limit, some with yesterday's day count
    for u in range(0, 40, 7):
        user = f"u{u}"
        c = rng.randint(0, int(meta["limit"]))
        if c == 0:
            continue
        r.hset(old.k["users"], user, c)
        if rng.random() < 0.5:
            d, dc = today - rng.choice([0, 1]), rng.randint(1, 2)
            r.hset(old.k["daily"], user, f"{d}:{dc}")
            r.hset(new.k["users"], user, f"{c}:{d}:{dc}")
        else:
            r.hset(new.k["users"], user, str(c))
    # denied users
    for u in rng.sample(range(40), 3):
        r.sadd(old.k["deny"], f"u{u}")
        r.sadd(new.k["deny"], f"u{u}")
    return old, new, meta


def admin_event(r, rng, old, new, meta):
    """A change applied identically to both shards between calls."""
    now = int(time.time() * 1000)
    kind = rng.choice(["refill", "refill", "refill", "pause", "resume", "resume", "early",
                       "late", "window", "window", "deny", "nometa", "limit", "daily"])
    if kind == "refill":
        add = rng.randint(1, 20)
        for s in (old, new):
            r.incrby(s.k["stock"], add)
    elif kind in ("pause", "resume"):
        meta["state"] = "paused" if kind == "pause" else "active"
    elif kind == "early":
        meta["start"], meta["end"] = now + HOUR, now + 2 * HOUR
    elif kind == "late":
        meta["start"], meta["end"] = now - 2 * HOUR, now - HOUR
    elif kind == "window":
        meta["start"], meta["end"] = now - HOUR, now + 10 * HOUR
    elif kind == "deny":
        u = f"u{rng.randrange(40)}"
        for s in (old, new):
            r.sadd(s.k["deny"], u)
    elif kind == "limit":
        meta["limit"] = rng.choice([1, 2, 3, 5, 8])
    elif kind == "daily":
        meta["daily"] = rng.choice([0, 1, 2])
    for s in (old, new):
        if r.exists(s.k["meta"] + ":away"):
            r.rename(s.k["meta"] + ":away", s.k["meta"])
    if kind == "nometa":
        # the shard's meta vanishes (kept aside, so it comes back whole at the next event)
        for s in (old, new):
            r.rename(s.k["meta"], s.k["meta"] + ":away")
        return kind
    for s in (old, new):
        r.hset(s.k["meta"], mapping=meta)
    return kind


def run_seed(r, seed, steps, max_batch):
    rng = random.Random(seed)
    old, new, meta = setup_pair(r, seed, rng)
    nusers = rng.choice([5, 12, 40, 200])
    # (user, rid) -> what each side answered when it minted: (seq, nonce, at, vf, vt)
    minted_old, minted_new = {}, {}
    stats = {"claims": 0, "calls": 0, "events": 0}
    codes = {}
    i = 0
    while i < steps:
        if rng.random() < 0.12:
            admin_event(r, rng, old, new, meta)
            stats["events"] += 1
            continue
        size = min(rng.randint(1, max_batch), steps - i)
        claims = []
        for _ in range(size):
            if claims and rng.random() < 0.15:
                # the same user and request id again within the call (a retry queued
                # beside its original), with its own nonce
                u, rid, _ = rng.choice(claims)
                claims.append((u, rid, f"{rng.getrandbits(64):016x}"))
                continue
            u = f"u{rng.randrange(nusers)}"
            rid = rng.choice(["", f"r{rng.randrange(6)}", f"r{rng.randrange(6)}",
                              f"~{rng.getrandbits(32):08x}"])
            nonce = rng.choice(["", f"{rng.getrandbits(64):016x}"])
            claims.append((u, rid, nonce))
        old_reps = [old.claim(*c) for c in claims]
        new_rep = new.call(claims)
        stats["calls"] += 1
        check(len(new_rep) == 5 + size, f"seed {seed}: reply length {len(new_rep)}")
        m = r.hgetall(new.k["meta"])
        for j, c in enumerate(claims):
            a, at_o = norm_old(old_reps[j])
            b, at_n = norm_new(new_rep, j)
            where = f"seed {seed} step {i + j} claim {c}"
            check(a == b, f"{where}: claim.lua {old_reps[j]} vs claim_batch.lua {new_rep[5 + j]}"
                          f" (reply {new_rep})")
            codes[a[0] if a[0] != "refused" else a[1]] = codes.get(
                a[0] if a[0] != "refused" else a[1], 0) + 1
            if a[0] == "new":
                (ato, vfo, vto, bo, so), (atn, vfn, vtn, ep) = at_o, at_n
                check((bo, so) == (old.batch, old.shard), f"{where}: old coupon id")
                check(ep == int(m.get("epoch", 1)), f"{where}: epoch {ep}")
                time_close(ato, atn, f"{where}: claimed_at")
                validity_ok(m, atn, vfn, vtn, f"{where} (new)")
                validity_ok(m, ato, vfo, vto, f"{where} (old)")
                if c[1]:
                    minted_old[(c[0], c[1])] = (a[1], c[2], ato, vfo, vto)
                    minted_new[(c[0], c[1])] = (b[1], c[2], atn, vfn, vtn)
            elif a[0] == "replay":
                key = (c[0], c[1])
                check(key in minted_new, f"{where}: replay of a request id never minted")
                seq, nonce, at, vf, vt = minted_new[key]
                check(b[1:] == (seq, nonce), f"{where}: replay {b} vs minted {seq, nonce}")
                check(at_n[:3] == (at, vf, vt), f"{where}: replayed times {at_n} vs {at, vf, vt}")
                check(at_o[:3] == minted_old[key][2:], f"{where}: claim.lua replayed times")
            # both sequences after the call must agree, and seq_after must be the counter
        check(int(r.get(old.k["claimed"]) or 0) == new_rep[1] or new_rep[0] == 0,
              f"seed {seed}: seq_after {new_rep[1]} vs claim.lua counter "
              f"{r.get(old.k['claimed'])}")
        i += size
        stats["claims"] += size

    # final state: counts, day counts, stock, sequence, logs (a vanished meta comes back)
    for side in (old, new):
        if r.exists(side.k["meta"] + ":away"):
            r.rename(side.k["meta"] + ":away", side.k["meta"])
    ou, od = r.hgetall(old.k["users"]), r.hgetall(old.k["daily"])
    nu = r.hgetall(new.k["users"])
    check(set(ou) == set(nu), f"seed {seed}: users differ {set(ou) ^ set(nu)}")
    gen = f"{new.k['req']}:{r.hget(new.k['meta'], 'rqc')}"
    with_rid = {}  # user -> successes with a request id, from claim.lua's log
    for _, f in r.xrange(old.k["log"]):
        if f["r"]:
            with_rid[f["u"]] = with_rid.get(f["u"], 0) + 1
    for u, v in nu.items():
        mm = re.fullmatch(r"(\d+)(?::(\d+):(\d+))?((?:/\d+\.\d+)*)", v)
        check(mm, f"seed {seed}: user field of {u}: {v!r}")
        count, d, dc, refs = mm.groups()
        check(int(count) == int(ou[u]), f"seed {seed}: count of {u}: {ou[u]} vs {v}")
        if d is not None:
            check(od.get(u) == f"{d}:{dc}", f"seed {seed}: day of {u}: {od.get(u)} vs {v}")
        else:
            check(u not in od, f"seed {seed}: day of {u}: {od.get(u)} vs {v}")
        # one reference per call with a success of u that had a request id; each names a
        # record that holds such a claim of u
        refs = refs.split("/")[1:]
        check(len(refs) == len(set(refs)) and len(refs) <= with_rid.get(u, 0)
              and (len(refs) > 0) == (with_rid.get(u, 0) > 0),
              f"seed {seed}: references of {u}: {v} ({with_rid.get(u, 0)} with request id)")
        for ref in refs:
            rec = r.hget(gen, "@" + ref)
            check(rec is not None, f"seed {seed}: reference {ref} of {u} names no record")
            p = rec.split("|")[6:]
            check(any(p[3 * k] == u and p[3 * k + 1] for k in range(len(p) // 3)),
                  f"seed {seed}: record {ref} holds no claim of {u} with a request id")
    for k in ("stock", "claimed"):
        check(r.get(old.k[k]) == r.get(new.k[k]), f"seed {seed}: {k} {r.get(old.k[k])} vs "
                                                  f"{r.get(new.k[k])}")
    old_log = [(int(f["c"].split(".")[2]), f["u"], f["r"], int(f["t"]), int(f["vf"]),
                int(f["vt"])) for _, f in r.xrange(old.k["log"])]
    new_log = []
    for eid, flat in raw_xrange(r, new.k["log"]):
        check(len(flat) == 4 and flat[0] == "h" and flat[2] == "c",
              f"seed {seed}: log entry fields {flat}")
        ver, epoch, q, t, vf, vt = flat[1].split("|")
        check(ver == "2" and epoch == (r.hget(new.k["meta"], "epoch") or "1"),
              f"seed {seed}: log header {flat[1]}")
        time_close(int(eid.split("-")[0]), int(t), f"seed {seed}: entry id vs t", 1000)
        parts = flat[3].split("|")
        check(len(parts) % 3 == 0, f"seed {seed}: log claims {flat[3]}")
        for k in range(len(parts) // 3):
            new_log.append((int(q) + k, parts[3 * k], parts[3 * k + 1], int(t), int(vf),
                            int(vt)))
    check([x[:3] for x in old_log] == [x[:3] for x in new_log],
          f"seed {seed}: logs differ:\n {old_log}\n {new_log}")
    for o, n in zip(old_log, new_log):
        time_close(o[3], n[3], f"seed {seed}: log claimed_at")
    check([x[0] for x in new_log] == list(range(1, len(new_log) + 1)),
          f"seed {seed}: log sequences not 1..n")
    return stats, codes


def raw_xrange(r, key):
    """XRANGE keeping each entry's fields as a flat list (field names repeat)."""
    raw = redis.Redis(connection_pool=r.connection_pool)
    raw.set_response_callback("XRANGE", lambda reply, **_: reply)
    return [(e[0], e[1]) for e in raw.xrange(key)]


def snapshot(r):
    """Every key with its type, value and TTL: what 'nothing written' must leave unchanged."""
    return (r.execute_command("DEBUG", "DIGEST"),
            sorted((k, r.execute_command("PEXPIRETIME", k)) for k in r.keys("*")))


def directed(r):
    n_checks = 0
    now = int(time.time() * 1000)
    meta = {"state": "active", "start": now - HOUR, "end": now + HOUR, "limit": 2, "daily": 0,
            "vdays": 7, "vfrom": 0, "vto": 0, "ver": 1, "fp": "f"}

    def fresh(batch):
        s = New(r, batch, 0)
        r.hset(s.k["meta"], mapping=meta)
        r.set(s.k["stock"], 100)
        return s

    # 1. validate-then-write: bad arguments anywhere fail the whole call, nothing written.
    s = fresh("v")
    s.call([("a", "r1", "n")])  # a first success, so the shard has every key
    good = [("u1", "r1", "n1"), ("u2", "r2", "n2"), ("u3", "r3", "n3")]

    def cols(claims):
        return [c[0] for c in claims] + [c[1] for c in claims] + [c[2] for c in claims]

    flat = cols(good)
    bad = {
        "op": ["grab", 3, 0, HOUR] + flat,
        "n zero": ["claim", 0, 0, HOUR],
        "n too big": ["claim", 1001, 0, HOUR] + ["u"] * 1001 + ["r"] * 1001 + ["n"] * 1001,
        "n not integer": ["claim", "2.5", 0, HOUR] + flat,
        "count mismatch": ["claim", 4, 0, HOUR] + flat,
        "bad maxlog": ["claim", 3, "-1", HOUR] + flat,
        "bad retention": ["claim", 3, 0, "0"] + flat,
        "retention not a number": ["claim", 3, 0, "1h"] + flat,
        "empty user (middle)": ["claim", 3, 0, HOUR] + cols([good[0], ("", "r", "n"), good[2]]),
        "| in last request id": ["claim", 3, 0, HOUR] + cols(good[:2] + [("u3", "r|3", "n")]),
        "| in first user": ["claim", 3, 0, HOUR] + cols([("u|1", "r1", "n")] + good[1:]),
        "| in a middle user": ["claim", 3, 0, HOUR] + cols([good[0], ("u|2", "r2", "n"), good[2]]),
        "| in last nonce": ["claim", 3, 0, HOUR] + cols(good[:2] + [("u3", "r3", "n|")]),
    }
    for what, args in bad.items():
        before = snapshot(r)
        try:
            s.call(None, raw_args=args)
            raise Failure(f"validate: {what}: accepted")
        except redis.ResponseError as e:
            check("claim_batch" in str(e), f"validate: {what}: unexpected error {e}")
        check(snapshot(r) == before, f"validate: {what}: something was written")
        n_checks += 1
    # corrupt state read before any write: stock, a user record, the meta
    for what, key, fix in [("stock", s.k["stock"], lambda: r.set(s.k["stock"], "ten")),
                           ("user record", s.k["users"], lambda: r.hset(s.k["users"], "u2", "x")),
                           ("meta vdays", s.k["meta"], lambda: r.hset(s.k["meta"], "vdays", "x")),
                           ("meta epoch", s.k["meta"], lambda: r.hset(s.k["meta"], "epoch", "e"))]:
        saved = r.dump(key)
        fix()
        before = snapshot(r)
        try:
            s.call(good)
            raise Failure(f"validate: corrupt {what}: accepted")
        except redis.ResponseError:
            pass
        check(snapshot(r) == before, f"validate: corrupt {what}: something was written")
        r.restore(key, 0, saved, replace=True)
        n_checks += 1

    # 2. backlog bound: counted in log entries, checked once per call, replays still answered
    s = fresh("bl")
    rep = s.call([("a", "ra", "na")], maxlog=2)
    check(rep[5] == 1, f"backlog: first claim {rep}")
    rep = s.call([("b", "rb", "nb")], maxlog=2)
    check(rep[5] == 2, f"backlog: second claim {rep}")
    before = snapshot(r)
    rep = s.call([("c", "rc", "nc"), ("a", "ra", "zz"), ("d", "", "")], maxlog=2)
    check(rep[5] == -9 and rep[7] == -9 and rep[6][:3] == [2, 1, 1] and rep[6][6] == "na",
          f"backlog: at bound {rep}")
    check(snapshot(r) == before, "backlog: a refused call wrote something")
    rep = s.call([("c", "rc", "nc")], maxlog=3)
    check(rep[5] == 3, f"backlog: below bound {rep}")
    n_checks += 3

    # 3. fencing and missing meta: whole call refused, nothing written
    s = fresh("f")
    s.call([("a", "ra", "na")])
    r.hset(s.k["meta"], "fenced", "1")
    before = snapshot(r)
    rep = s.call([("a", "ra", "na"), ("b", "rb", "nb")])
    check(rep[5:] == [-11, -11], f"fenced: {rep}")
    check(snapshot(r) == before, "fenced: something was written")
    r.hset(s.k["meta"], "fenced", "0")
    r.delete(s.k["meta"])
    before = snapshot(r)
    rep = s.call([("a", "ra", "na"), ("b", "rb", "nb")])
    check(rep == [0, 0, 0, 0, 0, -1, -1], f"no meta: {rep}")
    check(snapshot(r) == before, "no meta: something was written")
    n_checks += 2

    # 4. epoch: the sequence continues, a replay keeps the epoch it was minted in
    s = fresh("e")
    rep = s.call([("a", "ra", "na"), ("b", "rb", "nb")])
    check(rep[0] == 1 and rep[5:] == [1, 2], f"epoch 1: {rep}")
    r.hset(s.k["meta"], "epoch", 3)
    rep = s.call([("c", "rc", "nc"), ("a", "ra", "xx")])
    check(rep[0] == 3 and rep[1] == 3 and rep[5] == 3 and rep[6][:3] == [2, 1, 1]
          and rep[6][6] == "na", f"epoch 3: {rep}")
    entries = raw_xrange(r, s.k["log"])
    check(entries[-1][1][1].split("|")[1:3] == ["3", "3"], f"epoch: log entry {entries[-1]}")
    n_checks += 1

    # 5. the 'replay' op: answers from records, -10 otherwise, writes nothing
    before = snapshot(r)
    rep = s.call([("a", "ra", "q"), ("c", "rc", "q"), ("c", "nope", "q"), ("z", "", "q")],
                 op="replay")
    check(rep[5][:3] == [2, 1, 1] and rep[6][:3] == [2, 3, 3] and rep[7:] == [-10, -10]
          and rep[1] == 3, f"replay op: {rep}")
    check(snapshot(r) == before, "replay op: something was written")
    n_checks += 1

    # 5b. a record holds a call's claims; a (user, request id) found across an entry boundary
    # is not a match: user x, request id y must not replay user q's claim (rid x, nonce y)
    s = fresh("x")
    r.hset(s.k["meta"], "limit", 3)
    rep = s.call([("q", "x", "y"), ("x", "r0", "n0")])
    check(rep[5:] == [1, 2], f"boundary: first call {rep}")
    rep = s.call([("x", "y", "n1"), ("x", "r0", "n2")])
    check(rep[5] == 3 and rep[6][:3] == [2, 1, 2] and rep[6][6] == "n0",
          f"boundary: second call {rep}")
    users = r.hget(s.k["users"], "x")
    check(users == "2/1.1/1.3", f"boundary: user field {users}")
    n_checks += 1

    # 6. retention: generations rotate, records live between W and 2W, then vanish; a user's
    # references to records of expired generations are dropped when its field is written
    W = 400
    s = fresh("w")
    r.hset(s.k["meta"], "limit", 5)
    t0 = time.time()
    rep = s.call([("a", "ra", "na")], retention=W)
    check(rep[5] == 1, f"retention: claim {rep}")
    gen1 = r.hget(s.k["meta"], "rqc")
    k1 = f"{s.k['req']}:{gen1}"
    check(r.hexists(k1, "@1.1") and 0 < r.pttl(k1) <= 2 * W
          and r.hget(s.k["users"], "a") == "1/1.1" and r.hget(s.k["meta"], "rqcq") == "1",
          f"retention: generation {k1} {r.hgetall(k1)} {r.hgetall(s.k['meta'])}")
    rep = s.call([("a", "ra", "x")], retention=W)
    check(isinstance(rep[5], list) and rep[5][2] == 1, f"retention: replay within W {rep}")
    while time.time() < t0 + 1.3 * W / 1000:
        time.sleep(0.01)
    rep = s.call([("b", "rb", "nb"), ("a", "ra", "x")], retention=W)  # rotates
    check(rep[5] == 2 and isinstance(rep[6], list) and rep[6][2] == 1,
          f"retention: after rotation {rep}")
    m = r.hgetall(s.k["meta"])
    gen2 = m["rqc"]
    check(m["rqp"] == gen1 and gen2 != gen1 and m["rqcq"] == "2" and m["rqpq"] == "1",
          f"retention: rotation meta {m}")
    check(r.hexists(f"{s.k['req']}:{gen2}", "@1.2"), "retention: new record in new generation")
    while time.time() < t0 + 2.3 * W / 1000:
        time.sleep(0.01)
    check(not r.exists(k1), "retention: first generation did not expire")
    rep = s.call([("a", "ra", "x")], op="replay", retention=W)
    check(rep[5] == -10, f"retention: expired record still found {rep}")
    rep = s.call([("b", "rb", "x")], op="replay", retention=W)
    check(isinstance(rep[5], list), f"retention: second record lost too early {rep}")
    # a third generation: a's next success drops its reference to the expired first one
    while time.time() < t0 + 2.7 * W / 1000:
        time.sleep(0.01)
    rep = s.call([("a", "ra2", "n")], retention=W)
    check(rep[5] == 3 and r.hget(s.k["users"], "a") == "2/1.3",
          f"retention: pruned references {rep} {r.hget(s.k['users'], 'a')}")
    # a long pause: both generations are dropped at once
    while time.time() < t0 + 5.5 * W / 1000:
        time.sleep(0.01)
    rep = s.call([("c", "rc", "nc")], retention=W)
    m = r.hgetall(s.k["meta"])
    check(rep[5] == 4 and m["rqp"] == "" and m["rqpq"] == "", f"retention: long pause {rep} {m}")
    rep = s.call([("a", "ra3", "n")], retention=W)
    check(rep[5] == 5 and r.hget(s.k["users"], "a") == "3/1.5",
          f"retention: all references expired {rep} {r.hget(s.k['users'], 'a')}")
    n_checks += 7

    # 7. daily limit across a day boundary (yesterday's count does not count today)
    s = fresh("d")
    today = int(time.time() * 1000) // DAY
    r.hset(s.k["meta"], mapping={"daily": 1, "limit": 5})
    r.hset(s.k["users"], mapping={"y": f"1:{today - 1}:1", "t": f"1:{today}:1", "p": "2"})
    rep = s.call([("y", "", ""), ("t", "", ""), ("p", "", ""), ("p", "", "")])
    check(rep[5:] == [1, -7, 2, -7], f"daily: {rep}")
    check(r.hmget(s.k["users"], "y", "t", "p") == [f"2:{today}:1", f"1:{today}:1",
                                                   f"3:{today}:1"],
          f"daily: records {r.hgetall(s.k['users'])}")
    n_checks += 1
    return n_checks


def main():
    global BATCH_SCRIPT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--script", default=BATCH_SCRIPT,
                    help="the batched script to test (default lua/claim_batch.lua)")
    a = ap.parse_args()
    BATCH_SCRIPT = a.script
    srv = Server()
    try:
        r = srv.r
        total, codes = {"claims": 0, "calls": 0, "events": 0}, {}
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            st, cd = run_seed(r, seed, a.steps, a.max_batch)
            for k in total:
                total[k] += st[k]
            for k, v in cd.items():
                codes[k] = codes.get(k, 0) + v
        print(f"random: {a.seeds} seeds, {total['claims']} claims in {total['calls']} "
              f"claim_batch calls, {total['events']} admin events: every answer and final "
              f"state matched")
        print("answers seen: " + ", ".join(f"{k}={v}" for k, v in
                                          sorted(codes.items(), key=lambda x: str(x[0]))))
        n = directed(r)
        print(f"directed: {n} checks passed")
    except Failure as e:
        print(f"FAIL: {e}")
        return 1
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
