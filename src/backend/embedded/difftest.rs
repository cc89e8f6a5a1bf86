//! Differential test: the same random sequences of script calls against the embedded backend
//! and a real `redis-server` (started on a free loopback port when one is on PATH), replies
//! compared after masking what derives from the clock (timestamps, stream ids).
//!
//! Invariant checked: for the scripts of `lua/` (and a set of ad-hoc command probes) the two
//! backends give the same answers; any difference is a bug of the embedded one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::tests::{Shard, refs};
use super::*;
use crate::backend::{Backend, BackendError, Script, Value};

/// A `redis-server` of our own, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal RESP2 client.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Client {
        let w = TcpStream::connect(("127.0.0.1", port)).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Client {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    fn cmd(&mut self, args: &[&[u8]]) -> Result<Value, String> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&out).unwrap();
        self.read()
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l.trim_end_matches("\r\n").to_string()
    }

    fn read(&mut self) -> Result<Value, String> {
        let l = self.line();
        let (t, rest) = l.split_at(1);
        match t {
            "+" => Ok(Value::Status(rest.to_string())),
            "-" => Err(rest.to_string()),
            ":" => Ok(Value::Int(rest.parse().unwrap())),
            "$" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Ok(Value::Nil);
                }
                let mut buf = vec![0u8; n as usize + 2];
                self.r.read_exact(&mut buf).unwrap();
                buf.truncate(n as usize);
                Ok(Value::Bulk(Bytes::from(buf)))
            }
            "*" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Ok(Value::Nil);
                }
                let mut v = Vec::new();
                for _ in 0..n {
                    // Nested errors do not occur in these replies.
                    v.push(self.read()?);
                }
                Ok(Value::Array(v))
            }
            _ => panic!("bad RESP line {l:?}"),
        }
    }

    fn eval(&mut self, src: &str, keys: &[&str], args: &[&str]) -> Result<Value, String> {
        let n = keys.len().to_string();
        let mut a: Vec<&[u8]> = vec![b"EVAL", src.as_bytes(), n.as_bytes()];
        a.extend(keys.iter().map(|k| k.as_bytes()));
        a.extend(args.iter().map(|k| k.as_bytes()));
        self.cmd(&a)
    }
}

/// Masks clock-derived parts: 13-digit numbers near now become `T`, and `T-<seq>` (a
/// stream id) becomes `T-S`; errors compare by their code (first word).
fn normalize(r: Result<Value, String>) -> String {
    fn is_ts(n: i64) -> bool {
        let now = now_ms() as i64;
        (now - 86_400_000..now + 86_400_000).contains(&n)
    }
    fn mask(s: &str) -> String {
        let mut out = String::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_digit() {
                let j = (i..b.len())
                    .find(|&j| !b[j].is_ascii_digit())
                    .unwrap_or(b.len());
                let run = &s[i..j];
                if run.len() == 13 && run.parse::<i64>().is_ok_and(is_ts) {
                    out.push('T');
                } else {
                    out.push_str(run);
                }
                i = j;
            } else {
                out.push(b[i] as char);
                i += 1;
            }
        }
        // Stream ids: the sequence part depends on how many entries share a millisecond.
        let mut res = String::new();
        let mut rest = out.as_str();
        while let Some(p) = rest.find("T-") {
            res.push_str(&rest[..p + 2]);
            rest = &rest[p + 2..];
            let d = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if d > 0 {
                res.push('S');
            }
            rest = &rest[d..];
        }
        res.push_str(rest);
        res
    }
    fn v(x: &Value) -> String {
        match x {
            Value::Nil => "nil".into(),
            Value::Int(i) if is_ts(*i) => "T".into(),
            Value::Int(i) => i.to_string(),
            Value::Bulk(b) => format!("{:?}", mask(&String::from_utf8_lossy(b))),
            Value::Status(s) => format!("+{s}"),
            Value::Array(a) => format!("[{}]", a.iter().map(v).collect::<Vec<_>>().join(",")),
        }
    }
    match r {
        Ok(x) => v(&x),
        Err(e) => format!("ERROR {}", e.split(' ').next().unwrap_or("")),
    }
}

/// Both sides of the comparison.
struct Pair<'a> {
    emb: &'a EmbeddedBackend,
    redis: Client,
    log: Vec<String>,
}

impl Pair<'_> {
    async fn script(&mut self, s: Script, keys: &[&str], args: &[&str]) -> (Value, Value) {
        let e = self.emb.eval(s, keys, args).await.map_err(|e| match e {
            BackendError::Script(m) => m,
            other => other.to_string(),
        });
        let r = self.redis.eval(s.source(), keys, args);
        self.check(
            &format!("{} {keys:?} {args:?}", s.name()),
            e.clone(),
            r.clone(),
        );
        (e.unwrap_or(Value::Nil), r.unwrap_or(Value::Nil))
    }

    async fn source(&mut self, src: &str, keys: &[&str], args: &[&str]) {
        let e = self
            .emb
            .eval_code(Code::Source(src), keys, args)
            .await
            .map_err(|e| match e {
                BackendError::Script(m) => m,
                other => other.to_string(),
            });
        let r = self.redis.eval(src, keys, args);
        self.check(src, e, r);
    }

    fn check(&mut self, what: &str, e: Result<Value, String>, r: Result<Value, String>) {
        let (ne, nr) = (normalize(e.clone()), normalize(r.clone()));
        self.log.push(format!("{what} -> {nr}"));
        if ne != nr {
            let tail = self
                .log
                .iter()
                .rev()
                .take(15)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "embedded and redis differ on {what}\n embedded: {e:?}\n redis:    {r:?}\nrecent calls:\n{tail}"
            );
        }
    }
}

/// Ids of the entries of a `log_read` reply.
fn entry_ids(v: &Value) -> Vec<String> {
    v.clone()
        .into_array()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| e.into_array()?.first()?.as_str().map(str::to_string))
        .collect()
}

async fn random_run(pair: &mut Pair<'_>, seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let batch = format!("d{seed}");
    let shards: Vec<Shard> = (0..3).map(|i| Shard::new(&batch, i)).collect();
    let mut versions = [1u64; 3];
    for s in &shards {
        let meta = [
            "fp",
            "f",
            "state",
            "active",
            "start",
            "0",
            "end",
            "99999999999999",
            "limit",
            "3",
            "daily",
            "2",
            "vdays",
            "0",
            "vfrom",
            "100",
            "vto",
            "200",
            "ver",
            "1",
        ];
        let mut args = vec![if s.k("x").contains(":0}") { "12" } else { "4" }, "10"];
        args.extend(meta);
        args.push("banned");
        pair.script(Script::Setup, &refs(&s.setup_keys()), &args)
            .await;
    }
    let mut transfers = 0u32;
    let mut last_read: Option<(usize, Vec<String>, Vec<String>)> = None;
    for _ in 0..steps {
        let i = rng.random_range(0..3usize);
        let s = &shards[i];
        match rng.random_range(0..100u32) {
            0..=44 => {
                // 1 to 4 claims in one call (group commit), drawn alike
                let n = if rng.random_ratio(1, 2) {
                    1
                } else {
                    rng.random_range(2..=4)
                };
                let (mut users, mut rids, mut nonces) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..n {
                    users.push(if rng.random_ratio(1, 20) {
                        "banned".to_string()
                    } else {
                        format!("u{}", rng.random_range(0..6))
                    });
                    rids.push(if rng.random_bool(0.5) {
                        String::new()
                    } else {
                        format!("r{}", rng.random_range(0..5))
                    });
                    nonces.push(format!("n{}", rng.random_range(0..1000)));
                }
                let maxlog = if rng.random_ratio(1, 10) { "2" } else { "0" };
                let shard = i.to_string();
                let n_s = n.to_string();
                let mut argv: Vec<&str> = vec![&n_s, maxlog, &batch, &shard, "0"];
                argv.extend(users.iter().map(String::as_str));
                argv.extend(rids.iter().map(String::as_str));
                argv.extend(nonces.iter().map(String::as_str));
                pair.script(Script::Claim, &refs(&s.claim_keys()), &argv)
                    .await;
            }
            45..=52 => {
                let keys = [s.k("meta"), s.k("stock"), s.k("xseq")];
                let state = if rng.random_bool(0.5) {
                    "paused"
                } else {
                    "active"
                };
                // shards hold no total: a total is refused on both backends alike
                let total = if rng.random_ratio(1, 4) {
                    rng.random_range(0..30u32).to_string()
                } else {
                    String::new()
                };
                versions[i] += rng.random_range(0..2);
                let ver = versions[i].to_string();
                let (e, _) = pair
                    .script(Script::Patch, &refs(&keys), &[&ver, &total, "state", state])
                    .await;
                if let Some(v) = e
                    .into_array()
                    .and_then(|a| a.get(1).and_then(Value::as_int))
                {
                    versions[i] = versions[i].max(v as u64);
                }
            }
            53..=60 => {
                transfers += 1;
                let tid = format!("t{}", rng.random_range(0..transfers));
                let dest = ((i + 1) % 3).to_string();
                let half = if rng.random_bool(0.5) { "1" } else { "0" };
                let want = rng.random_range(0..4u32).to_string();
                let out = [
                    s.k("stock"),
                    s.k("outbox"),
                    s.k("xseq"),
                    s.k("meta"),
                    s.k("codes"),
                    s.k("xcodes"),
                ];
                let (moved, _) = pair
                    .script(
                        Script::TransferOut,
                        &refs(&out),
                        &[&tid, &want, &dest, half],
                    )
                    .await;
                let moved = match moved {
                    Value::Array(a) => a.first().and_then(Value::as_int).unwrap_or(0),
                    _ => 0,
                };
                if moved > 0 {
                    let d = &shards[(i + 1) % 3];
                    let inbox = d.k(&format!("inbox:{tid}"));
                    let amount = moved.to_string();
                    pair.script(
                        Script::TransferIn,
                        &refs(&[d.k("stock"), inbox.clone(), d.k("xseq"), d.k("codes")]),
                        &[&amount, "60", ""],
                    )
                    .await;
                    pair.script(Script::InboxCheck, &[&inbox], &[]).await;
                    if rng.random_bool(0.7) {
                        pair.script(
                            Script::TransferDone,
                            &[&s.k("outbox"), &s.k("xcodes")],
                            &[&tid],
                        )
                        .await;
                    }
                }
            }
            61..=72 => {
                pair.script(Script::Probe, &refs(&s.probe_keys()), &[])
                    .await;
            }
            73..=74 => {
                pair.script(Script::MetaGet, &[&s.k("meta")], &[]).await;
            }
            75 => {
                // the claims of a log's first entries: from its start, or after the first
                // entry of the last read (each side's own id)
                let page = rng.random_range(1..5u32).to_string();
                let (ea, ra, log) = match &last_read {
                    Some((at, e_ids, r_ids)) if !e_ids.is_empty() && !r_ids.is_empty() => {
                        (e_ids[0].clone(), r_ids[0].clone(), shards[*at].k("log"))
                    }
                    _ => (String::new(), String::new(), s.k("log")),
                };
                let e = pair
                    .emb
                    .eval(Script::LogCount, &[&log], &[ea.as_str(), page.as_str()])
                    .await
                    .map_err(|e| e.to_string());
                let r = pair.redis.eval(
                    Script::LogCount.source(),
                    &[&log],
                    &[ra.as_str(), page.as_str()],
                );
                pair.check("log_count", e, r);
            }
            76..=87 => {
                let consumer = if rng.random_bool(0.5) { "c1" } else { "c2" };
                let count = rng.random_range(1..5u32).to_string();
                let idle = if rng.random_bool(0.5) { "0" } else { "600000" };
                let (e, r) = pair
                    .script(
                        Script::LogRead,
                        &[&s.k("log")],
                        &["p", consumer, &count, idle],
                    )
                    .await;
                last_read = Some((i, entry_ids(&e), entry_ids(&r)));
            }
            88..=94 => {
                if let Some((at, e_ids, r_ids)) = last_read.take() {
                    let take = rng.random_range(0..=e_ids.len());
                    let mut ea = vec!["p"];
                    ea.extend(e_ids[..take].iter().map(String::as_str));
                    let mut ra = vec!["p"];
                    ra.extend(r_ids[..take.min(r_ids.len())].iter().map(String::as_str));
                    let log = shards[at].k("log");
                    let e = pair
                        .emb
                        .eval(Script::LogAck, &[&log], &ea)
                        .await
                        .map_err(|e| e.to_string());
                    let r = pair.redis.eval(Script::LogAck.source(), &[&log], &ra);
                    pair.check("log_ack", e, r);
                }
            }
            95..=96 => {
                let xseq = rng.random_range(0..6u32).to_string();
                pair.script(
                    Script::MarkSoldout,
                    &refs(&[s.k("meta"), s.k("xseq")]),
                    &[&xseq],
                )
                .await;
            }
            97 => {
                let user = format!("u{}", rng.random_range(0..6));
                let rid = format!("r{}", rng.random_range(0..5));
                pair.script(Script::Replay, &[&s.k("req")], &[&user, &rid])
                    .await;
                pair.script(Script::Winners, &[&s.k("users")], &[]).await;
            }
            _ => {
                let fp = if rng.random_bool(0.5) { "f" } else { "other" };
                pair.script(
                    Script::Setup,
                    &refs(&s.setup_keys()),
                    &["1", "2", "fp", fp, "state", "active"],
                )
                .await;
            }
        }
    }
}

/// Ad-hoc scripts exercising command semantics and error paths directly.
const PROBES: &[&str] = &[
    "return redis.call('SET', KEYS[1], 'v', 'NX')",
    "return redis.call('SET', KEYS[1], 'w', 'XX', 'GET')",
    "return redis.call('SET', KEYS[1], 'w', 'NX', 'XX')",
    "return redis.call('SET', KEYS[1], 'w', 'EX', '0')",
    "return redis.call('SET', KEYS[1], 10)",
    "return redis.call('INCRBY', KEYS[1], 5)",
    "return redis.call('INCRBY', KEYS[1], 'x')",
    "return redis.call('DECRBY', KEYS[1], 3)",
    "return redis.call('SET', KEYS[1], '007')",
    "return redis.call('INCR', KEYS[1])",
    "return redis.call('SET', KEYS[1], '9223372036854775807')",
    "return redis.call('INCR', KEYS[1])",
    "return redis.call('SET', KEYS[1], 0.5)",
    "return redis.call('GET', KEYS[1])",
    "return redis.call('EXPIRE', KEYS[1], 100)",
    "return redis.call('TTL', KEYS[1])",
    "return redis.call('EXPIRE', KEYS[1], 50, 'GT')",
    "return redis.call('EXPIRE', KEYS[1], 50, 'LT')",
    "return redis.call('PERSIST', KEYS[1])",
    "return redis.call('PTTL', KEYS[1])",
    "return redis.call('EXPIRE', KEYS[1], 'x')",
    "return redis.call('EXISTS', KEYS[1], KEYS[1], KEYS[2])",
    "return redis.call('TYPE', KEYS[1])",
    "return redis.call('HSET', KEYS[2], 'b', 1, 'a', 2, 'c', 3)",
    "return redis.call('HSET', KEYS[2], 'a', 9, 'd', 4)",
    "return redis.call('HGETALL', KEYS[2])",
    "return redis.call('HDEL', KEYS[2], 'b', 'zz')",
    "return redis.call('HGETALL', KEYS[2])",
    "return redis.call('HMGET', KEYS[2], 'a', 'zz', 'd')",
    "return redis.call('HINCRBY', KEYS[2], 'a', -20)",
    "return redis.call('HSET', KEYS[2], 's', 'x')",
    "return redis.call('HINCRBY', KEYS[2], 's', 1)",
    "return redis.call('HSETNX', KEYS[2], 's', 'y')",
    "return {redis.call('HLEN', KEYS[2]), redis.call('HEXISTS', KEYS[2], 's')}",
    "return redis.call('HGET', KEYS[1], 'f')",
    "return redis.call('INCR', KEYS[2])",
    "return redis.call('SADD', KEYS[3], 'a', 'b', 'a')",
    "return {redis.call('SISMEMBER', KEYS[3], 'a'), redis.call('SCARD', KEYS[3]), redis.call('SREM', KEYS[3], 'a', 'q')}",
    "return redis.call('SMEMBERS', KEYS[3])",
    "return redis.call('XADD', KEYS[4], '5', 'a', '1')",
    "return redis.call('XADD', KEYS[4], '5-*', 'b', '2')",
    "return redis.call('XADD', KEYS[4], '4-1', 'b', '2')",
    "return redis.call('XADD', KEYS[4], '0-0', 'b', '2')",
    "return redis.call('XADD', KEYS[4], 'bad', 'b', '2')",
    "return redis.call('XADD', KEYS[4], '9-1', 'c', '3', 'd', '4')",
    "return redis.call('XRANGE', KEYS[4], '-', '+')",
    "return redis.call('XRANGE', KEYS[4], '(5-0', '+', 'COUNT', 1)",
    "return redis.call('XRANGE', KEYS[4], '-', '+', 'COUNT', 0)",
    "return redis.call('XRANGE', KEYS[4], '9', '5')",
    "return redis.call('XREVRANGE', KEYS[4], '+', '-')",
    "return redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)",
    "return redis.call('XREVRANGE', KEYS[4], '(9-1', '-', 'COUNT', 1)",
    "return redis.call('XREVRANGE', KEYS[4], '5', '9')",
    "return redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)",
    "return redis.call('XGROUP', 'CREATE', KEYS[4], 'g', '0')",
    "return redis.call('XGROUP', 'CREATE', KEYS[4], 'g', '$')",
    "return redis.call('XGROUP', 'CREATE', KEYS[5], 'g', '$')",
    "return redis.call('XREADGROUP', 'GROUP', 'g', 'c1', 'COUNT', 1, 'STREAMS', KEYS[4], '>')",
    "return redis.call('XREADGROUP', 'GROUP', 'g', 'c2', 'STREAMS', KEYS[4], '>')",
    "return redis.call('XREADGROUP', 'GROUP', 'g', 'c2', 'STREAMS', KEYS[4], '>')",
    "return redis.call('XREADGROUP', 'GROUP', 'g', 'c1', 'STREAMS', KEYS[4], '$')",
    "return redis.call('XREADGROUP', 'GROUP', 'nog', 'c1', 'STREAMS', KEYS[4], '>')",
    "return redis.call('XDEL', KEYS[4], '5-1')",
    "return redis.call('XREADGROUP', 'GROUP', 'g', 'c2', 'STREAMS', KEYS[4], '0')",
    "return redis.call('XPENDING', KEYS[4], 'g')",
    "return redis.call('XAUTOCLAIM', KEYS[4], 'g', 'c3', 0, '0-0', 'COUNT', 1)",
    "return redis.call('XAUTOCLAIM', KEYS[4], 'g', 'c3', 0, '0-0')",
    "return redis.call('XAUTOCLAIM', KEYS[4], 'g', 'c3', 0, '0-0', 'COUNT', 0)",
    "return redis.call('XAUTOCLAIM', KEYS[4], 'nog', 'c3', 0, '0-0')",
    "local p = redis.call('XPENDING', KEYS[4], 'g', '-', '+', 10) for _, e in ipairs(p) do e[3] = 0 end return p",
    "return redis.call('XACK', KEYS[4], 'g', '5-0', '9-1', '7-7')",
    "return redis.call('XPENDING', KEYS[4], 'g')",
    "return redis.call('XACK', KEYS[4], 'nog', '5-0')",
    "return redis.call('XLEN', KEYS[4])",
    "return redis.call('XLEN', KEYS[1])",
    "return redis.call('XGROUP', 'SETID', KEYS[4], 'g', '0')",
    "return redis.call('XGROUP', 'DESTROY', KEYS[4], 'g')",
    "return redis.call('XGROUP', 'SETID', KEYS[4], 'g', '0')",
    "return redis.pcall('INCR', KEYS[2]).err",
    "return redis.call('GET')",
    "return redis.call('NOSUCHCMD', KEYS[1])",
    "return {1, 2.9, -2.9, 'x', true, false, nil, 9}",
    "return {ok = 'FINE'}",
    "return redis.error_reply('ERR custom')",
    "return {redis.call('UNLINK', KEYS[5]), redis.call('UNLINK', KEYS[5])}",
    "return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])",
];

#[tokio::test]
async fn differential_against_redis_server() {
    let which = Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output();
    if !which.is_ok_and(|o| o.status.success()) {
        eprintln!("redis-server not on PATH: differential test skipped");
        return;
    }
    let Some(server) = RedisServer::start() else {
        eprintln!("could not start redis-server: differential test skipped");
        return;
    };
    let emb = EmbeddedBackend::open(&EmbeddedConfig {
        lua_vms: 1,
        ..EmbeddedConfig::in_memory()
    })
    .unwrap();
    let mut pair = Pair {
        emb: &emb,
        redis: Client::connect(server.port),
        log: Vec::new(),
    };
    assert_eq!(
        pair.redis.cmd(&[b"FLUSHALL"]),
        Ok(Value::Status("OK".into()))
    );

    let keys = ["{p}s", "{p}h", "{p}set", "{p}x", "{p}y"];
    for src in PROBES {
        pair.source(src, &keys, &[]).await;
    }
    for seed in 1..=6 {
        random_run(&mut pair, seed, 800).await;
    }
    // restore.lua on a fresh slot, step by step, including refusals.
    let r = Shard::new("rst", 0);
    let rkeys: Vec<String> = [
        "meta", "stock", "users", "daily", "req", "deny", "claimed", "xseq", "outbox", "log",
        "repair", "codes", "xcodes",
    ]
    .iter()
    .map(|n| r.k(n))
    .collect();
    let steps: &[&[&str]] = &[
        &["begin", "x"],
        &["begin", "0"],
        &["hset", "users", "u1", "2", "u2", "1"],
        &["hset", "users", "u1"],
        &["hset", "req", "u1|r1", "rst.0.1|100|200|1700000000000|n1"],
        &["hset", "bogus", "a", "b"],
        &["deny", "bad", "worse"],
        &["deny"],
        &["finish", "5", "3", "1", "fp", "f"],
        &["finish", "x", "3", "1", "fp", "f"],
        &[
            "finish", "5", "3", "3", "fp", "f", "state", "active", "ver", "1",
        ],
        &[
            "finish", "5", "3", "3", "fp", "f", "state", "active", "ver", "1",
        ],
        &["begin", "0"],
        &["nope"],
    ];
    for step in steps {
        pair.script(Script::Restore, &refs(&rkeys), step).await;
    }
    pair.script(Script::Replay, &[&r.k("req")], &["u1", "r1"])
        .await;
    pair.script(Script::Winners, &[&r.k("users")], &[]).await;
    pair.script(Script::Probe, &refs(&r.probe_keys()), &[])
        .await;

    // The runs covered the interesting paths, not just refusals.
    let count = |f: &dyn Fn(&String) -> bool| pair.log.iter().filter(|l| f(l)).count();
    assert!(count(&|l| l.starts_with("claim") && l.contains("[1,")) > 50);
    assert!(count(&|l| l.starts_with("claim") && l.contains("[2,")) > 10);
    assert!(count(&|l| l.starts_with("claim") && l.contains("[0,-7]")) > 5);
    assert!(count(&|l| l.starts_with("claim") && l.contains("[0,-8]")) > 5);
    assert!(count(&|l| l.starts_with("log_read") && l.contains("T-S")) > 20);
    assert!(count(&|l| l.starts_with("log_ack") && !l.ends_with("-> 0")) > 10);
    // log_count found claims (its reply starts with a count above 0)
    assert!(count(&|l| l.starts_with("log_count -> [") && !l.contains("-> [0,")) > 5);
    assert!(count(&|l| l.starts_with("transfer_in") && l.ends_with("-> 1")) > 10);
    drop(server);
}
