#!/usr/bin/env python3
"""Differential test of lua/claim.lua's group commit: n claims per call vs one claim per call.

lua/claim.lua decides the n claims of one call "one after the other in argument order exactly
as n calls of one claim each would be". This test holds it to that: the same random sequence
of claims runs through claim.lua ONE claim per call (the reference, shard R) and through
claim.lua in groups of 1 .. --max-batch claims per call (the candidate, shard C), each shard
(batch r<seed>, c<seed>; o<seed> for the one-claim script below) with its own hash tag on the
same redis-server, from the same initial state and with the same admin changes between calls. The sequence has duplicate users, a (user, request id) repeated
within a group (a replay of a claim minted earlier in the same call, or a retry of a refused
one), request ids minted in earlier calls (replays), users at their per-user limit, day counts
of today and of earlier days (per-user daily limit, a random UTC offset per seed), old-format
request-id records without a nonce, deny lists, paused / not started / ended windows, a
vanished meta, empty and refilled stock, the claim log's backlog bound (max log set around the
log's length so the bound is hit within a group), fixed and relative validity, coupon-id
epochs.

A third shard runs the one-claim claim.lua of --old-rev (the script before the group commit)
with the same claims: the reference must answer each claim as it did and end in the same
state (the reference and the candidate are the same script, so a change of what ONE claim
does would not show between them).

Checked: every answer (code; coupon sequence; replay nonce; times within --slack-ms, as the
two shards run at different moments, and exactly equal to the minting answer on a replay),
and the final state: users and daily hashes (exact), request-id hashes (same fields; coupon
sequence, nonce exact; times within the slack), stock and claimed counters (exact), the claim
logs entry by entry and field by field except the stream ids (the 9 fields in their order; t,
vf, vt equal to the minting answer of each side exactly and within the slack across sides).

Then directed checks: bad argument lists (n not matching the arguments, n = 0, n = 1001, n
not an integer, an empty user, bad day offsets, bad max log lengths) and corrupt state (stock,
a user's count) fail the whole call with an error and leave DEBUG DIGEST unchanged; a call
whose claims are all refused or replays writes nothing; no meta answers -1 to every claim; a
call of 1000 claims against its one-claim reference.

Usage: scripts/lua-difftest.py [--seeds N] [--first-seed S] [--steps N] [--max-batch N]
                              [--claim lua/claim.lua] [--old-rev REV]
Starts its own redis-server on a free port (no persistence, DEBUG enabled locally) and kills
it (by PID) at the end. Exit status 0 = every check passed; 1 = a difference (printed).
"""
import argparse
import os
import random
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
CLAIM_SCRIPT = os.path.join(ROOT, "lua/claim.lua")
SLACK_MS = 5000
LOG_FIELDS = ["k", "c", "u", "r", "b", "s", "t", "vf", "vt"]  # the one-claim script's entry
# lua/claim.lua's entry: one per call with successes (src/contract/claim_record.rs)
CLAIMS_FIELDS = ["k", "b", "s", "q", "t", "vf", "vt", "u", "r"]
# The last commit whose lua/claim.lua is the one-claim script (ARGV user, rid, max log, batch,
# shard, nonce[, offset]): a third shard runs it, so a change that the reference and the
# candidate share (both are lua/claim.lua) is still seen if it changes what one claim does.
OLD_REV = "bdc84e5a20d58c8a1c62e2eae16ad848caed6f3c"


def old_script(rev):
    """The one-claim claim.lua of git revision rev, or None (with a note) if not there."""
    if not rev:
        return None
    p = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:lua/claim.lua"], capture_output=True,
                       text=True)
    if p.returncode != 0 or "one claim against" not in p.stdout[:200]:
        print(f"lua-difftest: no one-claim claim.lua at {rev}: that check is skipped")
        return None
    return p.stdout


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
        self.r = redis.Redis(port=self.port, decode_responses=True, socket_timeout=30)
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


class Shard:
    """One shard of a batch driven by lua/claim.lua."""

    NAMES = ["meta", "stock", "users", "daily", "req", "log", "deny", "claimed"]

    def __init__(self, r, sha, batch, shard, one_claim=False):
        self.r, self.sha, self.batch, self.shard = r, sha, batch, str(shard)
        self.one_claim = one_claim
        tag = f"{{{batch}:{shard}}}"
        self.k = {x: f"cg:{tag}:{x}" for x in self.NAMES}

    def keys(self):
        return [self.k[x] for x in self.NAMES]

    def call(self, claims, maxlog=0, offset=0):
        """One call with the given (user, request id, nonce) claims; the list of n answers."""
        if self.one_claim:  # the one-claim script: user, rid, max log, batch, shard, nonce, offset
            check(len(claims) == 1, "the one-claim script takes one claim")
            (u, rid, nonce), = claims
            return [self.raw([u, rid, maxlog, self.batch, self.shard, nonce, offset])]
        args = ([len(claims), maxlog, self.batch, self.shard, offset] + [c[0] for c in claims]
                + [c[1] for c in claims] + [c[2] for c in claims])
        return self.raw(args)

    def raw(self, args):
        return self.r.evalsha(self.sha, 8, *self.keys(), *args)


def norm(rep, side):
    """An answer as (what must match exactly, times): times compared with slack."""
    if rep[0] == 1:
        check(len(rep) == 5, f"{side}: claimed answer {rep}")
        _, coupon, vf, vt, at = rep
        return ("new", coupon_seq(coupon, side)), (int(at), int(vf), int(vt))
    if rep[0] == 2:
        check(len(rep) == 6, f"{side}: replay answer {rep}")
        _, coupon, vf, vt, at, nonce = rep
        return ("replay", coupon_seq(coupon, side), nonce), (int(at), int(vf), int(vt))
    check(rep[0] == 0 and len(rep) == 2, f"{side}: refusal {rep}")
    return ("refused", rep[1]), None


def coupon_seq(coupon, side):
    """The sequence part of '<batch>.<shard>.<seq>', checking the batch and shard."""
    b, s, seq = coupon.split(".")
    check((b, s) == (side.batch, side.shard), f"coupon id {coupon} not of {side.batch}.{side.shard}")
    return int(seq)


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def times_close(a, b, what):
    check(all(abs(x - y) <= SLACK_MS for x, y in zip(a, b)),
          f"{what}: times {a} vs {b} differ by more than {SLACK_MS} ms")


def validity_ok(meta, at, vf, vt, what):
    if int(meta["vdays"]) > 0:
        check(vf == at and vt == at + int(meta["vdays"]) * DAY, f"{what}: relative validity")
    else:
        check((vf, vt) == (int(meta["vfrom"]), int(meta["vto"])), f"{what}: fixed validity")


def pick_offset(rng):
    """A UTC offset whose local time is not within 15 minutes of midnight for the next few
    minutes: both shards must count their claims on the same local day."""
    while True:
        off = rng.choice([0, 0, 28800000, -18000000, 19800000, -36000000,
                          rng.randrange(-DAY + 1, DAY)])
        local = (int(time.time() * 1000) + off) % DAY
        if 15 * 60000 < local < DAY - 15 * 60000:
            return off


def setup_pair(r, sha, old_sha, seed, rng):
    ref, cand = Shard(r, sha, f"r{seed}", 3), Shard(r, sha, f"c{seed}", 3)
    old = Shard(r, old_sha, f"o{seed}", 3, one_claim=True) if old_sha else None
    now = int(time.time() * 1000)
    offset = pick_offset(rng)
    today = (now + offset) // DAY
    meta = {"state": "active", "start": now - HOUR, "end": now + 10 * HOUR,
            "limit": rng.choice([1, 2, 3]), "daily": rng.choice([0, 0, 1, 2]),
            "vdays": rng.choice([0, 1, 7]), "vfrom": now - DAY, "vto": now + 30 * DAY,
            "ver": 1, "fp": "f"}
    if rng.random() < 0.5:
        meta["epoch"] = rng.choice([0, 1, 3])
    stock = rng.choice([0, 3, 10, 40, 200])
    seq0 = rng.choice([0, 0, 17])
    writes = []  # (command, args) applied to both shards
    for u in range(0, 40, 7):
        user = f"u{u}"
        c = rng.randint(0, int(meta["limit"]))
        if c:
            writes.append(("hset", "users", (user, c)))
        if rng.random() < 0.5:
            d, dc = today - rng.choice([0, 0, 1, 30]), rng.randint(1, 2)
            writes.append(("hset", "daily", (user, f"{d}:{dc}")))
    for u in rng.sample(range(40), rng.choice([0, 3])):
        writes.append(("sadd", "deny", (f"u{u}",)))
    # request-id records of earlier calls: with a nonce, and of the format without one
    for j in range(rng.choice([0, 2])):
        u, rid = f"u{rng.randrange(12)}", f"r{rng.randrange(6)}"
        val = f"@.{seq0 + 1000 + j}|{now - DAY}|{now + DAY}|{now - HOUR}"  # @: batch.shard
        if rng.random() < 0.5:
            val += f"|old{j}"
        writes.append(("hset", "req", (f"{u}|{rid}", val)))
    for side in (ref, cand, old):
        if side is None:
            continue
        r.hset(side.k["meta"], mapping=meta)
        r.set(side.k["stock"], stock)
        if seq0:
            r.set(side.k["claimed"], seq0)
        for cmd, key, args in writes:
            args = [x.replace("@", f"{side.batch}.{side.shard}", 1) if isinstance(x, str)
                    and x.startswith("@.") else x for x in args]
            getattr(r, cmd)(side.k[key], *args)
    return ref, cand, old, meta, offset


def admin_event(r, rng, sides, meta):
    """A change applied identically to every shard between calls."""
    now = int(time.time() * 1000)
    kind = rng.choice(["refill", "refill", "refill", "empty", "pause", "resume", "resume",
                       "early", "late", "window", "window", "deny", "undeny", "nometa",
                       "limit", "daily", "validity"])
    if kind == "refill":
        add = rng.randint(1, 20)
        for s in sides:
            r.incrby(s.k["stock"], add)
    elif kind == "empty":
        for s in sides:
            r.set(s.k["stock"], 0)
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
        for s in sides:
            r.sadd(s.k["deny"], u)
    elif kind == "undeny":
        for s in sides:
            r.delete(s.k["deny"])
    elif kind == "limit":
        meta["limit"] = rng.choice([1, 2, 3, 5, 8])
    elif kind == "daily":
        meta["daily"] = rng.choice([0, 1, 2])
    elif kind == "validity":
        meta["vdays"] = rng.choice([0, 1, 7])
    for s in sides:
        if r.exists(s.k["meta"] + ":away"):
            r.rename(s.k["meta"] + ":away", s.k["meta"])
    if kind == "nometa":
        # the shard's meta vanishes (kept aside, so it comes back whole at the next event)
        for s in sides:
            r.rename(s.k["meta"], s.k["meta"] + ":away")
        return kind
    for s in sides:
        r.hset(s.k["meta"], mapping=meta)
    return kind


def make_group(rng, size, nusers, big_users):
    claims = []
    for _ in range(size):
        if claims and rng.random() < 0.15:
            # the same user and request id again within the call (a retry queued beside its
            # original), with its own nonce
            u, rid, _ = rng.choice(claims)
            claims.append((u, rid, rng.choice(["", f"{rng.getrandbits(64):016x}"])))
            continue
        u = f"u{rng.randrange(nusers)}" if rng.random() > 0.05 else rng.choice(big_users)
        rid = rng.choice(["", f"r{rng.randrange(6)}", f"r{rng.randrange(6)}",
                          f"~{rng.getrandbits(32):08x}"])
        nonce = rng.choice(["", f"{rng.getrandbits(64):016x}"])
        claims.append((u, rid, nonce))
    return claims


def run_seed(r, sha, old_sha, seed, steps, max_batch):
    rng = random.Random(seed)
    ref, cand, old, meta, offset = setup_pair(r, sha, old_sha, seed, rng)
    sides = [x for x in (ref, cand, old) if x]
    nusers = rng.choice([5, 12, 40, 200])
    big_users = ["ü-ß€-" + "x" * 40, "u 1", "u%d", "0", "-1"]
    stats = {"claims": 0, "calls": 0, "events": 0, "groups_multi": 0}
    codes = {}
    minted = {}  # (user, request id) -> the times each side minted it with
    i = 0
    while i < steps:
        if rng.random() < 0.12:
            admin_event(r, rng, sides, meta)
            stats["events"] += 1
            continue
        size = min(rng.randint(1, max_batch), steps - i)
        claims = make_group(rng, size, nusers, big_users)
        # the backlog bound (in log entries: one per call with successes, so one per claim
        # on the one-per-call shards): mostly off; else set so that each side's log is
        # either already at its bound (every claim that would mint is refused -9) or has
        # room for the whole group, the same on every side
        maxlog = {x.batch: 0 for x in sides}
        if rng.random() >= 0.8:
            lens = {x.batch: r.xlen(x.k["log"]) for x in sides}
            if rng.random() < 0.5 and all(lens.values()):  # at the bound already
                maxlog = {b: max(1, n - rng.randint(0, 1)) for b, n in lens.items()}
            else:  # room for the whole group
                maxlog = {b: n + size + rng.randint(0, 2) for b, n in lens.items()}
        ref_reps = [ref.call([c], maxlog[ref.batch], offset) for c in claims]
        for rr in ref_reps:
            check(len(rr) == 1, f"seed {seed}: reference reply of one claim {rr}")
        ref_reps = [rr[0] for rr in ref_reps]
        cand_rep = cand.call(claims, maxlog[cand.batch], offset)
        old_reps = ([old.call([c], maxlog[old.batch], offset)[0] for c in claims]
                    if old else None)
        stats["calls"] += 1
        stats["groups_multi"] += size > 1
        check(len(cand_rep) == size, f"seed {seed}: reply length {len(cand_rep)} for {size}")
        m = r.hgetall(cand.k["meta"]) or r.hgetall(cand.k["meta"] + ":away")
        for j, c in enumerate(claims):
            where = (f"seed {seed} step {i + j} (claim {j + 1} of a group of {size}, max log "
                     f"{maxlog[cand.batch]}, offset {offset}) claim {c}")
            try:
                a, ta = norm(ref_reps[j], ref)
                b, tb = norm(cand_rep[j], cand)
            except Failure as e:
                raise Failure(f"{where}: {e}")
            check(a == b, f"{where}: one per call {ref_reps[j]} vs grouped {cand_rep[j]} "
                          f"(group {claims}, grouped reply {cand_rep})")
            if old:
                try:
                    o, to = norm(old_reps[j], old)
                except Failure as e:
                    raise Failure(f"{where}: one-claim script: {e}")
                check(o == a, f"{where}: claim.lua one per call {ref_reps[j]} vs the one-claim "
                              f"claim.lua {old_reps[j]}")
                if to:
                    times_close(ta, to, f"{where}: vs the one-claim claim.lua")
            key = a[0] if a[0] != "refused" else a[1]
            codes[key] = codes.get(key, 0) + 1
            if a[0] == "new":
                times_close(ta, tb, f"{where}: claimed")
                validity_ok(m, *ta, f"{where} (one per call)")
                validity_ok(m, *tb, f"{where} (grouped)")
                if c[1]:
                    minted[(c[0], c[1])] = (ta, tb)
            elif a[0] == "replay":
                # a replay answers the times its coupon was minted with, exactly
                want = minted.get((c[0], c[1]), (ta, ta))  # seeded records: the same on both
                check((ta, tb) == want, f"{where}: replayed times {ta} {tb} vs minted {want}")
        i += size
        stats["claims"] += size

    # final state (a vanished meta comes back first)
    for side in sides:
        if r.exists(side.k["meta"] + ":away"):
            r.rename(side.k["meta"] + ":away", side.k["meta"])
    compare_state(r, ref, cand, f"seed {seed}")
    if old:
        compare_state(r, ref, old, f"seed {seed} (vs the one-claim claim.lua)")
    return stats, codes


def compare_state(r, ref, cand, what):
    for k in ("users", "daily", "deny"):
        a = r.hgetall(ref.k[k]) if k != "deny" else r.smembers(ref.k[k])
        b = r.hgetall(cand.k[k]) if k != "deny" else r.smembers(cand.k[k])
        check(a == b, f"{what}: {k} differ: only in {ref.batch} "
                      f"{sorted(set(a) - set(b))}, only in {cand.batch} {sorted(set(b) - set(a))}, "
                      f"values {[(x, a[x], b[x]) for x in set(a) & set(b) if a[x] != b[x]][:5]}"
              if isinstance(a, dict) else f"{what}: {k} differ")
    for k in ("stock", "claimed"):
        check(r.get(ref.k[k]) == r.get(cand.k[k]),
              f"{what}: {k} {r.get(ref.k[k])} vs {r.get(cand.k[k])}")
    ra, rb = r.hgetall(ref.k["req"]), r.hgetall(cand.k["req"])
    check(set(ra) == set(rb), f"{what}: request-id fields differ {set(ra) ^ set(rb)}")
    for f in ra:
        pa, pb = ra[f].split("|"), rb[f].split("|")
        check(len(pa) == len(pb) in (4, 5), f"{what}: req {f}: {ra[f]} vs {rb[f]}")
        check(coupon_seq(pa[0], ref) == coupon_seq(pb[0], cand),
              f"{what}: req {f} coupon {pa[0]} vs {pb[0]}")
        times_close([int(x) for x in pa[1:4]], [int(x) for x in pb[1:4]], f"{what}: req {f}")
        check(pa[4:] == pb[4:], f"{what}: req {f} nonce {ra[f]} vs {rb[f]}")
    la, lb = log_claims(r, ref), log_claims(r, cand)
    last = {ref.batch: 0, cand.batch: 0}
    check(len(la) == len(lb), f"{what}: claims in the logs {len(la)} vs {len(lb)}")
    for n, (da, db) in enumerate(zip(la, lb)):
        where = f"{what}: logged claim {n + 1}"
        check(coupon_seq(da["c"], ref) == coupon_seq(db["c"], cand), f"{where}: c {da} vs {db}")
        check((da["u"], da["r"]) == (db["u"], db["r"]), f"{where}: u, r {da} vs {db}")
        check((da["b"], da["s"]) == (ref.batch, ref.shard)
              and (db["b"], db["s"]) == (cand.batch, cand.shard), f"{where}: b, s {da} {db}")
        times_close([int(da[x]) for x in ("t", "vf", "vt")],
                    [int(db[x]) for x in ("t", "vf", "vt")], where)
        for side, d in ((ref, da), (cand, db)):
            seq = coupon_seq(d["c"], side)
            check(last[side.batch] < seq, f"{where}: sequence not increasing")
            last[side.batch] = seq
            # the stream id's ms and claimed-at are both from the script's TIME
            check(abs(int(d["id"].split("-")[0]) - int(d["t"])) <= 1000, f"{where}: entry id vs t")
            # the request-id record of a claim with a request id names this coupon
            if d["r"]:
                rec = r.hget(side.k["req"], f"{d['u']}|{d['r']}")
                check(rec is not None and rec.split("|")[:4] == [d["c"], d["vf"], d["vt"], d["t"]],
                      f"{where}: req record {rec} vs entry {d}")


def log_claims(r, side):
    """The claims of a shard's log, one dict each (c, u, r, b, s, t, vf, vt, id), in order:
    a 'claims' entry (lua/claim.lua: one per call, its fields in CLAIMS_FIELDS order) holds
    every coupon of its call; a 'claimed' entry (the one-claim script) one."""
    out = []
    for eid, fl in raw_xrange(r, side.k["log"]):
        d = dict(zip(fl[0::2], fl[1::2]))
        if d.get("k") == "claimed":
            check(fl[0::2] == LOG_FIELDS, f"{side.batch}: entry {eid} fields {fl[0::2]}")
            out.append(dict(d, id=eid))
            continue
        check(fl[0::2] == CLAIMS_FIELDS and d["k"] == "claims",
              f"{side.batch}: entry {eid} fields {fl[0::2]}")
        users, rids = d["u"].split("|"), d["r"].split("|")
        check(len(users) == len(rids) >= 1, f"{side.batch}: entry {eid}: {d}")
        q = int(d["q"])
        for j, (u, rid) in enumerate(zip(users, rids)):
            out.append({"c": f"{d['b']}.{d['s']}.{q + j}", "u": u, "r": rid, "b": d["b"],
                        "s": d["s"], "t": d["t"], "vf": d["vf"], "vt": d["vt"], "id": eid})
    return out


def raw_xrange(r, key):
    """XRANGE keeping each entry's fields as a flat list (order kept, names may repeat)."""
    raw = redis.Redis(connection_pool=r.connection_pool)
    raw.set_response_callback("XRANGE", lambda reply, **_: reply)
    return [(e[0], e[1]) for e in raw.xrange(key)]


def digest(r):
    return r.execute_command("DEBUG", "DIGEST")


def directed(r, sha):
    n_checks = 0
    now = int(time.time() * 1000)
    meta = {"state": "active", "start": now - HOUR, "end": now + HOUR, "limit": 2, "daily": 1,
            "vdays": 7, "vfrom": 0, "vto": 0, "ver": 1, "fp": "f"}

    def fresh(batch):
        s = Shard(r, sha, batch, 0)
        r.hset(s.k["meta"], mapping=meta)
        r.set(s.k["stock"], 100)
        return s

    # 1. bad arguments: an error reply, the whole call refused, nothing written
    s = fresh("v")
    rep = s.call([("a", "r1", "n"), ("b", "", "")])  # first successes: the shard has every key
    check([x[0] for x in rep] == [1, 1], f"validate: setup {rep}")
    good = [("u1", "r1", "n1"), ("u2", "r2", "n2"), ("u3", "r3", "n3")]

    def cols(claims):
        return [c[0] for c in claims] + [c[1] for c in claims] + [c[2] for c in claims]

    def head(n, maxlog=0, offset=0):
        return [n, maxlog, s.batch, s.shard, offset]

    flat = cols(good)
    bad = {
        "n not matching (one argument more)": head(3) + flat + ["x"],
        "n not matching (one argument less)": head(3) + flat[:-1],
        "n not matching (n 4, 3 claims)": head(4) + flat,
        "n not matching (n 2, 3 claims)": head(2) + flat,
        "n not matching (no claims)": head(1),
        "n = 0": head(0),
        "n = 0 with claims": head(0) + flat,
        "n = 1001": head(1001) + [f"u{i}" for i in range(1001)] + ["r"] * 1001 + ["n"] * 1001,
        "n = -1": head(-1) + flat,
        "n = 2.5": head("2.5") + flat,
        "n = 'three'": head("three") + flat,
        "n = ''": head("") + flat,
        "empty user (first)": head(3) + cols([("", "r", "n")] + good[1:]),
        "empty user (middle)": head(3) + cols([good[0], ("", "r", "n"), good[2]]),
        "empty user (last)": head(3) + cols(good[:2] + [("", "r", "n")]),
        "offset 86400000": head(3, offset=86400000) + flat,
        "offset -86400000": head(3, offset=-86400000) + flat,
        "offset 1.5": head(3, offset="1.5") + flat,
        "offset 'x'": head(3, offset="x") + flat,
        "offset ''": head(3, offset="") + flat,
        "max log -1": head(3, maxlog=-1) + flat,
        "max log 1.5": head(3, maxlog="1.5") + flat,
        "max log 'x'": head(3, maxlog="x") + flat,
        "max log ''": head(3, maxlog="") + flat,
    }
    for what, args in bad.items():
        before = digest(r)
        try:
            rep = s.raw(args)
            raise Failure(f"validate: {what}: accepted, answered {rep}")
        except redis.ResponseError as e:
            check("claim" in str(e), f"validate: {what}: unexpected error {e}")
        check(digest(r) == before, f"validate: {what}: something was written")
        n_checks += 1
    # corrupt state read before any write: stock, a user's count
    for what, key, fix in [("stock", s.k["stock"], lambda: r.set(s.k["stock"], "ten")),
                           ("user count", s.k["users"],
                            lambda: r.hset(s.k["users"], "u2", "x"))]:
        saved = r.dump(key)
        fix()
        before = digest(r)
        try:
            rep = s.call(good)
            raise Failure(f"validate: corrupt {what}: accepted, answered {rep}")
        except redis.ResponseError:
            pass
        check(digest(r) == before, f"validate: corrupt {what}: something was written")
        r.restore(key, 0, saved, replace=True)
        n_checks += 1

    # 2. a call of refusals and replays only writes nothing
    before = digest(r)
    rep = s.call([("a", "r1", "zz"), ("a", "r9", "n"), ("b", "", "n"), ("a", "r1", "")])
    check(rep[0][0] == 2 and rep[0][5] == "n" and rep[1] == [0, -7] and rep[2] == [0, -7]
          and rep[3] == rep[0], f"refusals and replays: {rep}")
    check(digest(r) == before, "refusals and replays: something was written")
    n_checks += 1

    # 3. no meta: every claim -1 (replays too), nothing written
    r.rename(s.k["meta"], s.k["meta"] + ":away")
    before = digest(r)
    rep = s.call([("a", "r1", "n"), ("z", "", "")])
    check(rep == [[0, -1], [0, -1]], f"no meta: {rep}")
    check(digest(r) == before, "no meta: something was written")
    r.rename(s.k["meta"] + ":away", s.k["meta"])
    n_checks += 1

    # 4. a call of 1000 claims (the most) against 1000 calls of one, stock for 600 of them
    rng = random.Random(1000)
    ref, cand = fresh("bigr"), fresh("bigc")
    for side in (ref, cand):
        r.hset(side.k["meta"], mapping={"limit": 3, "daily": 2})
        r.set(side.k["stock"], 600)
    claims = [(f"u{rng.randrange(300)}", rng.choice(["", f"r{rng.randrange(3)}"]),
               f"{rng.getrandbits(64):016x}") for _ in range(1000)]
    ra = [ref.call([c])[0] for c in claims]
    rb = cand.call(claims)
    check(len(rb) == 1000, f"1000 claims: {len(rb)} answers")
    for j, (x, y) in enumerate(zip(ra, rb)):
        check(norm(x, ref)[0] == norm(y, cand)[0], f"1000 claims: claim {j} {claims[j]}: "
                                                   f"{x} vs {y}")
    compare_state(r, ref, cand, "1000 claims")
    n_checks += 1
    return n_checks


def main():
    global SLACK_MS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300, help="claims per seed")
    ap.add_argument("--max-batch", type=int, default=16, help="largest group (claims per call)")
    ap.add_argument("--claim", default=CLAIM_SCRIPT, help="the claim script to test")
    ap.add_argument("--old-rev", default=OLD_REV,
                    help="git revision whose lua/claim.lua is the one-claim script, run on a "
                         "third shard as a check of the reference ('' = skip)")
    ap.add_argument("--slack-ms", type=int, default=SLACK_MS,
                    help="how far apart the two shards' times may be")
    a = ap.parse_args()
    SLACK_MS = a.slack_ms
    srv = Server()
    try:
        r = srv.r
        sha = r.script_load(open(a.claim).read())
        old = old_script(a.old_rev)
        old_sha = r.script_load(old) if old else None
        total, codes = {"claims": 0, "calls": 0, "events": 0, "groups_multi": 0}, {}
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            st, cd = run_seed(r, sha, old_sha, seed, a.steps, a.max_batch)
            for k in total:
                total[k] += st[k]
            for k, v in cd.items():
                codes[k] = codes.get(k, 0) + v
        print(f"random: seeds {a.first_seed}..{a.first_seed + a.seeds - 1}, {total['claims']} "
              f"claims in {total['calls']} grouped calls ({total['groups_multi']} of 2 or more "
              f"claims, at most {a.max_batch}) and {total['claims']} one-claim calls, "
              f"{total['events']} "
              f"admin events: every answer and the final state matched")
        if old_sha:
            print(f"the one-claim claim.lua of {a.old_rev[:7]} answered every claim as the "
                  f"reference and ended in the same state")
        print("answers seen: " + ", ".join(f"{k}={v}" for k, v in
                                          sorted(codes.items(), key=lambda x: str(x[0]))))
        n = directed(r, sha)
        print(f"directed: {n} checks passed")
    except Failure as e:
        print(f"FAIL: {e}")
        return 1
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
