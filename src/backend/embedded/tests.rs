//! Tests of the embedded backend: command semantics and reply conversions, the real
//! scripts of `lua/`, concurrency, and the append-only file across restarts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::backend::{Backend, BackendError, Script, Value};

fn mem() -> EmbeddedBackend {
    EmbeddedBackend::open(&EmbeddedConfig {
        lua_vms: 2,
        ..EmbeddedConfig::in_memory()
    })
    .unwrap()
}

fn with_aof(path: &Path, fsync: Fsync) -> EmbeddedBackend {
    EmbeddedBackend::open(&EmbeddedConfig {
        aof_path: Some(path.to_path_buf()),
        fsync,
        lua_vms: 2,
        ..EmbeddedConfig::default()
    })
    .unwrap()
}

async fn lua(
    b: &EmbeddedBackend,
    src: &str,
    keys: &[&str],
    args: &[&str],
) -> Result<Value, BackendError> {
    b.eval_code(Code::Source(src), keys, args).await
}

/// Runs `src` with no keys besides `{t}k` and expects success.
async fn ok(b: &EmbeddedBackend, src: &str) -> Value {
    match lua(b, src, &["{t}k"], &[]).await {
        Ok(v) => v,
        Err(e) => panic!("{src}: {e}"),
    }
}

async fn err(b: &EmbeddedBackend, src: &str) -> String {
    match lua(b, src, &["{t}k"], &[]).await {
        Ok(v) => panic!("{src}: expected an error, got {v:?}"),
        Err(BackendError::Script(m)) => m,
        Err(e) => panic!("{src}: {e}"),
    }
}

fn bulk(s: &str) -> Value {
    Value::Bulk(Bytes::copy_from_slice(s.as_bytes()))
}

fn int(i: i64) -> Value {
    Value::Int(i)
}

fn arr(v: Vec<Value>) -> Value {
    Value::Array(v)
}

// ------------------------------------------------------------------ conversions

#[tokio::test]
async fn lua_to_reply_conversions() {
    let b = mem();
    assert_eq!(ok(&b, "return 3.7").await, int(3));
    assert_eq!(ok(&b, "return -3.7").await, int(-3));
    assert_eq!(ok(&b, "return true").await, int(1));
    assert_eq!(ok(&b, "return false").await, Value::Nil);
    assert_eq!(ok(&b, "return nil").await, Value::Nil);
    assert_eq!(ok(&b, "return 'x'").await, bulk("x"));
    assert_eq!(
        ok(&b, "return {1, 'a', {2}, nil, 3}").await,
        arr(vec![int(1), bulk("a"), arr(vec![int(2)])])
    );
    assert_eq!(
        ok(&b, "return {1, false, 2}").await,
        arr(vec![int(1), Value::Nil, int(2)])
    );
    assert_eq!(
        ok(&b, "return {ok='FINE'}").await,
        Value::Status("FINE".into())
    );
    assert_eq!(
        ok(&b, "return redis.status_reply('GOOD')").await,
        Value::Status("GOOD".into())
    );
    assert_eq!(err(&b, "return {err='X bad'}").await, "X bad");
    assert_eq!(
        err(&b, "return redis.error_reply('ERR nope')").await,
        "ERR nope"
    );
    assert_eq!(ok(&b, "return {}").await, arr(vec![]));
    assert!(
        err(&b, "local t = {} t[1] = t return t")
            .await
            .contains("stack limit")
    );
}

#[tokio::test]
async fn redis_to_lua_conversions() {
    let b = mem();
    // nil bulk -> false, status -> {ok=}, integer -> number, array -> table.
    assert_eq!(
        ok(&b, "return redis.call('GET', KEYS[1]) == false").await,
        int(1)
    );
    assert_eq!(
        ok(&b, "return redis.call('SET', KEYS[1], 'v').ok").await,
        bulk("OK")
    );
    assert_eq!(
        ok(&b, "return type(redis.call('EXISTS', KEYS[1]))").await,
        bulk("number")
    );
    assert_eq!(
        ok(&b, "redis.call('HSET', '{t}h', 'a', 1) local r = redis.call('HMGET', '{t}h', 'a', 'b') return {r[1], r[2] == false}").await,
        arr(vec![bulk("1"), int(1)])
    );
    let t = ok(&b, "return redis.call('TIME')")
        .await
        .into_array()
        .unwrap();
    assert_eq!(t.len(), 2);
    assert!(t[0].as_int().unwrap() > 1_600_000_000);
    assert!((0..1_000_000).contains(&t[1].as_int().unwrap()));
}

#[tokio::test]
async fn call_raises_and_pcall_returns_error_tables() {
    let b = mem();
    ok(&b, "redis.call('HSET', KEYS[1], 'f', 'v')").await;
    assert_eq!(
        err(&b, "return redis.call('INCR', KEYS[1])").await,
        commands::WRONGTYPE
    );
    assert_eq!(
        ok(
            &b,
            "local r = redis.pcall('INCR', KEYS[1]) return {type(r), r.err}"
        )
        .await,
        arr(vec![bulk("table"), bulk(commands::WRONGTYPE)])
    );
    // As in Redis 7.0, Lua's pcall around redis.call sees the error text.
    assert_eq!(
        ok(
            &b,
            "local ok, e = pcall(redis.call, 'INCR', KEYS[1]) return {ok, e}"
        )
        .await,
        arr(vec![Value::Nil, bulk(commands::WRONGTYPE)])
    );
    assert!(
        err(&b, "return redis.call('NOSUCH', KEYS[1])")
            .await
            .starts_with("ERR unknown command 'NOSUCH'")
    );
    assert_eq!(
        err(&b, "return redis.call('GET')").await,
        "ERR wrong number of arguments for 'get' command"
    );
    assert_eq!(
        err(&b, "return redis.call('SET', KEYS[1], true)").await,
        "ERR Lua redis lib command arguments must be strings or integers"
    );
    // A Lua runtime error.
    let e = err(&b, "local x = nil return x + 1").await;
    assert!(e.starts_with("ERR user_script:1:"), "{e}");
}

#[tokio::test]
async fn sandbox_and_readonly_globals() {
    let b = mem();
    for g in [
        "os",
        "io",
        "loadfile",
        "dofile",
        "require",
        "load",
        "loadstring",
    ] {
        let src = format!("return rawget(_G, '{g}') == nil");
        assert_eq!(ok(&b, &src).await, int(1), "{g} should be gone");
    }
    assert!(
        err(&b, "x = 1")
            .await
            .contains("Attempt to modify a readonly table")
    );
    assert!(
        err(&b, "return nosuch")
            .await
            .contains("nonexistent global variable 'nosuch'")
    );
    assert_eq!(
        ok(&b, "return {#KEYS, KEYS[1]}").await,
        arr(vec![int(1), bulk("{t}k")])
    );
    assert_eq!(
        lua(&b, "return {#ARGV, ARGV[2]}", &["{t}k"], &["a", "b"])
            .await
            .unwrap(),
        arr(vec![int(2), bulk("b")])
    );
    assert_eq!(ok(&b, "return {string.format('%d', 7), math.floor(2.5), table.concat({1,2}, ','), unpack({5})}").await,
        arr(vec![bulk("7"), int(2), bulk("1,2"), int(5)]));
}

#[tokio::test]
async fn number_arguments_format_like_redis() {
    let b = mem();
    assert_eq!(
        ok(
            &b,
            "redis.call('SET', KEYS[1], 5) return redis.call('GET', KEYS[1])"
        )
        .await,
        bulk("5")
    );
    assert_eq!(
        ok(
            &b,
            "redis.call('SET', KEYS[1], 5.0) return redis.call('GET', KEYS[1])"
        )
        .await,
        bulk("5")
    );
    assert_eq!(
        ok(
            &b,
            "redis.call('SET', KEYS[1], -0.5) return redis.call('GET', KEYS[1])"
        )
        .await,
        bulk("-0.5")
    );
    assert_eq!(
        ok(
            &b,
            "redis.call('SET', KEYS[1], 0.1) return redis.call('GET', KEYS[1])"
        )
        .await,
        bulk("0.10000000000000001")
    );
    assert_eq!(
        ok(&b, "return redis.call('INCRBY', KEYS[1] .. 'n', 2)").await,
        int(2)
    );
}

#[tokio::test]
async fn writes_before_an_error_are_kept() {
    let b = mem();
    let e = err(&b, "redis.call('SET', '{t}a', '1') redis.call('HSET', KEYS[1], 'f', 'v') redis.call('INCR', KEYS[1]) redis.call('SET', '{t}b', '1')").await;
    assert_eq!(e, commands::WRONGTYPE);
    assert_eq!(
        ok(
            &b,
            "return {redis.call('GET', '{t}a'), redis.call('EXISTS', '{t}b')}"
        )
        .await,
        arr(vec![bulk("1"), int(0)])
    );
}

#[tokio::test]
async fn crossslot_and_nonlocal_keys() {
    let b = mem();
    let r = lua(&b, "return 1", &["foo", "bar"], &[]).await;
    assert_eq!(
        r,
        Err(BackendError::Script(
            "CROSSSLOT Keys in request don't hash to the same slot".into()
        ))
    );
    assert_eq!(
        lua(&b, "return 1", &["{x}a", "{x}b"], &[]).await,
        Ok(int(1))
    );
    // A key of another slot inside a script is refused like on a cluster node.
    let e = err(&b, "return redis.call('GET', 'other')").await;
    assert!(e.contains("non local key"), "{e}");
    // A script declared with no keys locks the slot of the first key it touches.
    assert_eq!(
        lua(
            &b,
            "redis.call('SET', '{z}a', 1) return redis.call('GET', '{z}a')",
            &[],
            &[]
        )
        .await,
        Ok(bulk("1"))
    );
    assert!(
        lua(
            &b,
            "redis.call('SET', '{z}a', 1) return redis.call('GET', 'other')",
            &[],
            &[]
        )
        .await
        .is_err()
    );
    // Multi-key commands check every key.
    assert!(
        err(&b, "return redis.call('DEL', KEYS[1], 'other')")
            .await
            .contains("non local key")
    );
}

// ------------------------------------------------------------------ strings and keys

#[tokio::test]
async fn string_commands() {
    let b = mem();
    assert_eq!(
        ok(&b, "return redis.call('SET', KEYS[1], 'v', 'NX')").await,
        Value::Status("OK".into())
    );
    assert_eq!(
        ok(&b, "return redis.call('SET', KEYS[1], 'w', 'NX')").await,
        Value::Nil
    );
    assert_eq!(
        ok(&b, "return redis.call('SET', '{t}x', 'w', 'XX')").await,
        Value::Nil
    );
    assert_eq!(
        ok(&b, "return redis.call('SET', KEYS[1], 'w', 'XX', 'GET')").await,
        bulk("v")
    );
    assert_eq!(ok(&b, "return redis.call('GET', KEYS[1])").await, bulk("w"));
    assert_eq!(
        err(&b, "return redis.call('SET', KEYS[1], 'w', 'NX', 'XX')").await,
        "ERR syntax error"
    );
    assert_eq!(
        err(&b, "return redis.call('SET', KEYS[1], 'w', 'EX', 0)").await,
        "ERR invalid expire time in 'set' command"
    );
    assert_eq!(
        err(&b, "return redis.call('SET', KEYS[1], 'w', 'EX', 'x')").await,
        "ERR value is not an integer or out of range"
    );
    assert_eq!(ok(&b, "return redis.call('INCR', '{t}n')").await, int(1));
    assert_eq!(
        ok(&b, "return redis.call('INCRBY', '{t}n', 10)").await,
        int(11)
    );
    assert_eq!(ok(&b, "return redis.call('DECR', '{t}n')").await, int(10));
    assert_eq!(
        ok(&b, "return redis.call('DECRBY', '{t}n', 20)").await,
        int(-10)
    );
    assert_eq!(
        ok(&b, "return redis.call('GET', '{t}n')").await,
        bulk("-10")
    );
    assert_eq!(
        err(&b, "return redis.call('INCR', KEYS[1])").await,
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        err(&b, "return redis.call('INCRBY', '{t}n', 'x')").await,
        "ERR value is not an integer or out of range"
    );
    ok(&b, "redis.call('SET', '{t}m', '9223372036854775807')").await;
    assert_eq!(
        err(&b, "return redis.call('INCR', '{t}m')").await,
        "ERR increment or decrement would overflow"
    );
    ok(&b, "redis.call('SET', '{t}z', '007')").await;
    assert_eq!(
        err(&b, "return redis.call('INCR', '{t}z')").await,
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        ok(
            &b,
            "return redis.call('EXISTS', KEYS[1], KEYS[1], '{t}nope')"
        )
        .await,
        int(2)
    );
    assert_eq!(
        ok(&b, "return redis.call('DEL', KEYS[1], '{t}nope', '{t}n')").await,
        int(2)
    );
    assert_eq!(
        ok(&b, "return redis.call('TYPE', '{t}m').ok").await,
        bulk("string")
    );
    assert_eq!(
        ok(&b, "return redis.call('TYPE', '{t}nope').ok").await,
        bulk("none")
    );
}

#[tokio::test]
async fn expiry_commands_and_lazy_expiration() {
    let b = mem();
    assert_eq!(ok(&b, "return redis.call('TTL', KEYS[1])").await, int(-2));
    ok(&b, "redis.call('SET', KEYS[1], 'v')").await;
    assert_eq!(ok(&b, "return redis.call('TTL', KEYS[1])").await, int(-1));
    assert_eq!(
        ok(&b, "return redis.call('EXPIRE', KEYS[1], 100)").await,
        int(1)
    );
    assert_eq!(ok(&b, "return redis.call('TTL', KEYS[1])").await, int(100));
    let pttl = ok(&b, "return redis.call('PTTL', KEYS[1])")
        .await
        .as_int()
        .unwrap();
    assert!((99_000..=100_000).contains(&pttl));
    assert_eq!(
        ok(&b, "return redis.call('EXPIRE', KEYS[1], 50, 'NX')").await,
        int(0)
    );
    assert_eq!(
        ok(&b, "return redis.call('EXPIRE', KEYS[1], 50, 'GT')").await,
        int(0)
    );
    assert_eq!(
        ok(&b, "return redis.call('EXPIRE', KEYS[1], 50, 'LT')").await,
        int(1)
    );
    assert_eq!(
        ok(&b, "return redis.call('PERSIST', KEYS[1])").await,
        int(1)
    );
    assert_eq!(ok(&b, "return redis.call('TTL', KEYS[1])").await, int(-1));
    assert_eq!(
        ok(&b, "return redis.call('EXPIRE', '{t}nope', 10)").await,
        int(0)
    );
    assert_eq!(
        err(&b, "return redis.call('EXPIRE', KEYS[1], 'x')").await,
        "ERR value is not an integer or out of range"
    );
    // A non-positive expiry deletes the key.
    assert_eq!(
        ok(&b, "return redis.call('EXPIRE', KEYS[1], 0)").await,
        int(1)
    );
    assert_eq!(ok(&b, "return redis.call('EXISTS', KEYS[1])").await, int(0));
    // SET EX / PX, INCR keeps the TTL, expired keys vanish on access.
    ok(&b, "redis.call('SET', KEYS[1], '1', 'PX', 40)").await;
    assert_eq!(ok(&b, "return redis.call('INCR', KEYS[1])").await, int(2));
    assert!(
        ok(&b, "return redis.call('PTTL', KEYS[1])")
            .await
            .as_int()
            .unwrap()
            > 0
    );
    ok(&b, "redis.call('SET', '{t}e', 'v', 'EX', 100)").await;
    ok(&b, "redis.call('SET', '{t}e', 'w', 'KEEPTTL')").await;
    assert!(
        ok(&b, "return redis.call('TTL', '{t}e')")
            .await
            .as_int()
            .unwrap()
            > 90
    );
    ok(&b, "redis.call('SET', '{t}e', 'x')").await;
    assert_eq!(ok(&b, "return redis.call('TTL', '{t}e')").await, int(-1));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        ok(&b, "return redis.call('GET', KEYS[1])").await,
        Value::Nil
    );
    assert_eq!(ok(&b, "return redis.call('TTL', KEYS[1])").await, int(-2));
    // The periodic sweep removes expired keys nobody touches.
    ok(&b, "redis.call('SET', '{t}s', 'v', 'PX', 10)").await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let slot = key_slot(b"{t}s");
    assert!(!b.keyspace.slot(slot).lock().map.contains_key(&b"{t}s"[..]));
}

// ------------------------------------------------------------------ hashes and sets

#[tokio::test]
async fn hash_commands() {
    let b = mem();
    assert_eq!(
        ok(
            &b,
            "return redis.call('HSET', KEYS[1], 'b', 1, 'a', 2, 'c', 3)"
        )
        .await,
        int(3)
    );
    assert_eq!(
        ok(&b, "return redis.call('HSET', KEYS[1], 'b', 9, 'd', 4)").await,
        int(1)
    );
    assert_eq!(
        ok(&b, "return redis.call('HGETALL', KEYS[1])").await,
        arr(["b", "9", "a", "2", "c", "3", "d", "4"]
            .into_iter()
            .map(bulk)
            .collect())
    );
    assert_eq!(
        err(&b, "return redis.call('HSET', KEYS[1], 'b')").await,
        "ERR wrong number of arguments for 'hset' command"
    );
    assert_eq!(
        err(&b, "return redis.call('HSET', KEYS[1], 'b', 1, 'c')").await,
        "ERR wrong number of arguments for 'hset' command"
    );
    assert_eq!(
        ok(&b, "return redis.call('HSETNX', KEYS[1], 'b', 0)").await,
        int(0)
    );
    assert_eq!(
        ok(&b, "return redis.call('HSETNX', KEYS[1], 'e', 5)").await,
        int(1)
    );
    assert_eq!(
        ok(&b, "return redis.call('HGET', KEYS[1], 'e')").await,
        bulk("5")
    );
    assert_eq!(
        ok(&b, "return redis.call('HGET', KEYS[1], 'zz')").await,
        Value::Nil
    );
    assert_eq!(
        ok(&b, "return redis.call('HINCRBY', KEYS[1], 'e', 10)").await,
        int(15)
    );
    assert_eq!(
        ok(&b, "return redis.call('HINCRBY', KEYS[1], 'new', -3)").await,
        int(-3)
    );
    ok(&b, "redis.call('HSET', KEYS[1], 's', 'x')").await;
    assert_eq!(
        err(&b, "return redis.call('HINCRBY', KEYS[1], 's', 1)").await,
        "ERR hash value is not an integer"
    );
    assert_eq!(
        err(&b, "return redis.call('HINCRBY', KEYS[1], 'e', 'x')").await,
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        ok(&b, "return redis.call('HEXISTS', KEYS[1], 'e')").await,
        int(1)
    );
    assert_eq!(ok(&b, "return redis.call('HLEN', KEYS[1])").await, int(7));
    assert_eq!(
        ok(&b, "return redis.call('HDEL', KEYS[1], 'a', 'zz', 'b')").await,
        int(2)
    );
    assert_eq!(
        ok(&b, "return redis.call('HGETALL', '{t}none')").await,
        arr(vec![])
    );
    assert_eq!(ok(&b, "return redis.call('HLEN', '{t}none')").await, int(0));
    // Deleting the last field deletes the key.
    ok(
        &b,
        "redis.call('HSET', '{t}one', 'f', 'v') redis.call('HDEL', '{t}one', 'f')",
    )
    .await;
    assert_eq!(
        ok(&b, "return redis.call('EXISTS', '{t}one')").await,
        int(0)
    );
    ok(&b, "redis.call('SET', '{t}str', 'v')").await;
    for cmd in [
        "HGET', '{t}str', 'f",
        "HSET', '{t}str', 'f', 'v",
        "HGETALL', '{t}str",
        "HINCRBY', '{t}str', 'f', '1",
        "HMGET', '{t}str', 'f",
    ] {
        assert_eq!(
            err(&b, &format!("return redis.call('{cmd}')")).await,
            commands::WRONGTYPE,
            "{cmd}"
        );
    }
}

#[tokio::test]
async fn set_commands() {
    let b = mem();
    assert_eq!(
        ok(&b, "return redis.call('SADD', KEYS[1], 'a', 'b', 'a')").await,
        int(2)
    );
    assert_eq!(
        ok(&b, "return redis.call('SADD', KEYS[1], 'b', 'c')").await,
        int(1)
    );
    assert_eq!(
        ok(&b, "return redis.call('SISMEMBER', KEYS[1], 'c')").await,
        int(1)
    );
    assert_eq!(
        ok(&b, "return redis.call('SISMEMBER', KEYS[1], 'z')").await,
        int(0)
    );
    assert_eq!(
        ok(&b, "return redis.call('SISMEMBER', '{t}none', 'z')").await,
        int(0)
    );
    assert_eq!(ok(&b, "return redis.call('SCARD', KEYS[1])").await, int(3));
    let mut m: Vec<_> = ok(&b, "return redis.call('SMEMBERS', KEYS[1])")
        .await
        .into_array()
        .unwrap();
    m.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    assert_eq!(m, vec![bulk("a"), bulk("b"), bulk("c")]);
    assert_eq!(
        ok(&b, "return redis.call('SREM', KEYS[1], 'a', 'b', 'c', 'z')").await,
        int(3)
    );
    assert_eq!(ok(&b, "return redis.call('EXISTS', KEYS[1])").await, int(0));
    ok(&b, "redis.call('SET', '{t}str', 'v')").await;
    assert_eq!(
        err(&b, "return redis.call('SADD', '{t}str', 'v')").await,
        commands::WRONGTYPE
    );
    assert_eq!(
        err(&b, "return redis.call('SISMEMBER', '{t}str', 'v')").await,
        commands::WRONGTYPE
    );
}

// ------------------------------------------------------------------ streams

fn id_of(v: &Value) -> (u64, u64) {
    let s = v.as_str().unwrap();
    let (a, b) = s.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[tokio::test]
async fn stream_add_range_del() {
    let b = mem();
    let mut last = (0, 0);
    for _ in 0..50 {
        let id = ok(&b, "return redis.call('XADD', KEYS[1], '*', 'f', 'v')").await;
        let id = id_of(&id);
        assert!(id > last, "ids strictly increase");
        last = id;
    }
    assert_eq!(ok(&b, "return redis.call('XLEN', KEYS[1])").await, int(50));
    // Explicit ids must be above the top item.
    assert_eq!(
        err(&b, "return redis.call('XADD', KEYS[1], '1-1', 'f', 'v')").await,
        "ERR The ID specified in XADD is equal or smaller than the target stream top item"
    );
    assert_eq!(
        err(&b, "return redis.call('XADD', '{t}s2', '0-0', 'f', 'v')").await,
        "ERR The ID specified in XADD must be greater than 0-0"
    );
    assert_eq!(ok(&b, "return redis.call('EXISTS', '{t}s2')").await, int(0));
    assert_eq!(
        ok(&b, "return redis.call('XADD', '{t}s2', '5', 'a', '1')").await,
        bulk("5-0")
    );
    assert_eq!(
        ok(&b, "return redis.call('XADD', '{t}s2', '5-*', 'b', '2')").await,
        bulk("5-1")
    );
    assert_eq!(
        ok(&b, "return redis.call('XADD', '{t}s2', '7-3', 'c', '3')").await,
        bulk("7-3")
    );
    assert_eq!(
        err(&b, "return redis.call('XADD', '{t}s2', 'x-1', 'c', '3')").await,
        "ERR Invalid stream ID specified as stream command argument"
    );
    assert_eq!(
        err(&b, "return redis.call('XADD', '{t}s2', '*', 'c')").await,
        "ERR wrong number of arguments for 'xadd' command"
    );
    assert_eq!(
        ok(
            &b,
            "return redis.call('XADD', '{t}nope', 'NOMKSTREAM', '*', 'c', 'd')"
        )
        .await,
        Value::Nil
    );
    let entry = |id: &str, f: &str, v: &str| arr(vec![bulk(id), arr(vec![bulk(f), bulk(v)])]);
    assert_eq!(
        ok(&b, "return redis.call('XRANGE', '{t}s2', '-', '+')").await,
        arr(vec![
            entry("5-0", "a", "1"),
            entry("5-1", "b", "2"),
            entry("7-3", "c", "3")
        ])
    );
    assert_eq!(
        ok(
            &b,
            "return redis.call('XRANGE', '{t}s2', '-', '+', 'COUNT', 1)"
        )
        .await,
        arr(vec![entry("5-0", "a", "1")])
    );
    assert_eq!(
        ok(&b, "return redis.call('XRANGE', '{t}s2', '(5-0', '5')").await,
        arr(vec![entry("5-1", "b", "2")])
    );
    assert_eq!(
        ok(
            &b,
            "return redis.call('XRANGE', '{t}s2', '-', '+', 'COUNT', 0)"
        )
        .await,
        Value::Nil
    );
    assert_eq!(
        ok(&b, "return redis.call('XRANGE', '{t}none', '-', '+')").await,
        arr(vec![])
    );
    assert_eq!(
        ok(&b, "return redis.call('XDEL', '{t}s2', '5-1', '9-9')").await,
        int(1)
    );
    assert_eq!(
        ok(&b, "return redis.call('XDEL', '{t}s2', '5-0', '7-3')").await,
        int(2)
    );
    // An emptied stream still exists and keeps its last id.
    assert_eq!(
        ok(
            &b,
            "return {redis.call('EXISTS', '{t}s2'), redis.call('XLEN', '{t}s2')}"
        )
        .await,
        arr(vec![int(1), int(0)])
    );
    assert_eq!(
        ok(&b, "return redis.call('XADD', '{t}s2', '7-*', 'c', '3')").await,
        bulk("7-4")
    );
    // MAXLEN trimming.
    ok(
        &b,
        "for i = 1, 10 do redis.call('XADD', '{t}s3', 'MAXLEN', 3, '*', 'i', i) end",
    )
    .await;
    assert_eq!(ok(&b, "return redis.call('XLEN', '{t}s3')").await, int(3));
    ok(&b, "redis.call('SET', '{t}str', 'v')").await;
    assert_eq!(
        err(&b, "return redis.call('XADD', '{t}str', '*', 'a', 'b')").await,
        commands::WRONGTYPE
    );
    assert_eq!(
        err(&b, "return redis.call('XLEN', '{t}str')").await,
        commands::WRONGTYPE
    );
}

#[tokio::test]
async fn stream_groups_read_ack_pending() {
    let b = mem();
    let key = "{t}log";
    let run = |src: String| {
        let b = &b;
        async move { lua(b, &src, &[key], &[]).await }
    };
    // No group yet.
    let e =
        run("return redis.call('XREADGROUP', 'GROUP', 'g', 'c1', 'STREAMS', KEYS[1], '>')".into())
            .await
            .unwrap_err();
    assert_eq!(
        e,
        BackendError::Script(
            "NOGROUP No such key '{t}log' or consumer group 'g' in XREADGROUP with GROUP option"
                .into()
        )
    );
    let e = run("return redis.call('XGROUP', 'CREATE', KEYS[1], 'g', '0')".into())
        .await
        .unwrap_err();
    assert!(
        matches!(e, BackendError::Script(m) if m.starts_with("ERR The XGROUP subcommand requires the key to exist"))
    );
    assert_eq!(
        run("return redis.call('XGROUP', 'CREATE', KEYS[1], 'g', '$', 'MKSTREAM')".into()).await,
        Ok(Value::Status("OK".into()))
    );
    assert_eq!(
        run("return redis.call('XGROUP', 'CREATE', KEYS[1], 'g', '0')".into()).await,
        Err(BackendError::Script(
            "BUSYGROUP Consumer Group name already exists".into()
        ))
    );
    // Nothing to read: nil (false in Lua).
    assert_eq!(
        run("return redis.call('XREADGROUP', 'GROUP', 'g', 'c1', 'STREAMS', KEYS[1], '>')".into())
            .await,
        Ok(Value::Nil)
    );
    for i in 1..=5 {
        run(format!(
            "return redis.call('XADD', KEYS[1], '{i}-0', 'n', '{i}')"
        ))
        .await
        .unwrap();
    }
    let r = run(
        "return redis.call('XREADGROUP', 'GROUP', 'g', 'c1', 'COUNT', 2, 'STREAMS', KEYS[1], '>')"
            .into(),
    )
    .await
    .unwrap();
    let entry = |id: &str, v: &str| arr(vec![bulk(id), arr(vec![bulk("n"), bulk(v)])]);
    assert_eq!(
        r,
        arr(vec![arr(vec![
            bulk(key),
            arr(vec![entry("1-0", "1"), entry("2-0", "2")])
        ])])
    );
    let r =
        run("return redis.call('XREADGROUP', 'GROUP', 'g', 'c2', 'STREAMS', KEYS[1], '>')".into())
            .await
            .unwrap();
    assert_eq!(
        r,
        arr(vec![arr(vec![
            bulk(key),
            arr(vec![
                entry("3-0", "3"),
                entry("4-0", "4"),
                entry("5-0", "5")
            ])
        ])])
    );
    assert_eq!(
        run("return redis.call('XPENDING', KEYS[1], 'g')".into())
            .await
            .unwrap(),
        arr(vec![
            int(5),
            bulk("1-0"),
            bulk("5-0"),
            arr(vec![
                arr(vec![bulk("c1"), bulk("2")]),
                arr(vec![bulk("c2"), bulk("3")])
            ])
        ])
    );
    // History of c1 (id 0): its pending entries; a deleted one comes back with nil fields.
    run("return redis.call('XDEL', KEYS[1], '2-0')".into())
        .await
        .unwrap();
    let r =
        run("return redis.call('XREADGROUP', 'GROUP', 'g', 'c1', 'STREAMS', KEYS[1], '0')".into())
            .await
            .unwrap();
    assert_eq!(
        r,
        arr(vec![arr(vec![
            bulk(key),
            arr(vec![entry("1-0", "1"), arr(vec![bulk("2-0"), Value::Nil])])
        ])])
    );
    // History read bumps the delivery count.
    let r = run("return redis.call('XPENDING', KEYS[1], 'g', '-', '+', 10, 'c1')".into())
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].clone().into_array().unwrap()[3], int(2));
    // Ack.
    assert_eq!(
        run("return redis.call('XACK', KEYS[1], 'g', '1-0', '2-0', '9-0')".into()).await,
        Ok(int(2))
    );
    assert_eq!(
        run("return redis.call('XACK', KEYS[1], 'nog', '3-0')".into()).await,
        Ok(int(0))
    );
    assert_eq!(
        run("return redis.call('XACK', '{t}nokey', 'g', '3-0')".into()).await,
        Ok(int(0))
    );
    assert_eq!(
        run("return redis.call('XPENDING', KEYS[1], 'g')".into())
            .await
            .unwrap(),
        arr(vec![
            int(3),
            bulk("3-0"),
            bulk("5-0"),
            arr(vec![arr(vec![bulk("c2"), bulk("3")])])
        ])
    );
    assert_eq!(
        run("return redis.call('XPENDING', '{t}nokey', 'g')".into()).await,
        Err(BackendError::Script(
            "NOGROUP No such key '{t}nokey' or consumer group 'g'".into()
        ))
    );
    run("return redis.call('XACK', KEYS[1], 'g', '3-0', '4-0', '5-0')".into())
        .await
        .unwrap();
    assert_eq!(
        run("return redis.call('XPENDING', KEYS[1], 'g')".into())
            .await
            .unwrap(),
        arr(vec![int(0), Value::Nil, Value::Nil, Value::Nil])
    );
    assert_eq!(
        run("return redis.call('XGROUP', 'SETID', KEYS[1], 'g', '0')".into()).await,
        Ok(Value::Status("OK".into()))
    );
    let r =
        run("return redis.call('XREADGROUP', 'GROUP', 'g', 'c3', 'STREAMS', KEYS[1], '>')".into())
            .await
            .unwrap();
    assert_eq!(
        r.into_array().unwrap()[0].clone().into_array().unwrap()[1]
            .clone()
            .into_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        run("return redis.call('XGROUP', 'DESTROY', KEYS[1], 'g')".into()).await,
        Ok(int(1))
    );
}

#[tokio::test]
async fn stream_autoclaim_after_idle() {
    let b = mem();
    let key = "{t}log";
    let run = |src: &'static str| {
        let b = &b;
        async move { lua(b, src, &[key], &[]).await }
    };
    assert_eq!(
        run("return redis.call('XAUTOCLAIM', KEYS[1], 'g', 'c', 0, '0-0')").await,
        Err(BackendError::Script(
            "NOGROUP No such key '{t}log' or consumer group 'g'".into()
        ))
    );
    run("redis.call('XGROUP', 'CREATE', KEYS[1], 'g', '0', 'MKSTREAM') for i = 1, 4 do redis.call('XADD', KEYS[1], i .. '-0', 'n', i) end").await.unwrap();
    run("return redis.call('XREADGROUP', 'GROUP', 'g', 'dead', 'STREAMS', KEYS[1], '>')")
        .await
        .unwrap();
    // Not idle long enough: nothing claimed, cursor back to 0-0.
    let r = run("return redis.call('XAUTOCLAIM', KEYS[1], 'g', 'live', 60000, '0-0', 'COUNT', 10)")
        .await
        .unwrap();
    assert_eq!(r, arr(vec![bulk("0-0"), arr(vec![]), arr(vec![])]));
    tokio::time::sleep(Duration::from_millis(30)).await;
    run("return redis.call('XDEL', KEYS[1], '2-0')")
        .await
        .unwrap();
    let r = run("return redis.call('XAUTOCLAIM', KEYS[1], 'g', 'live', 20, '0-0', 'COUNT', 2)")
        .await
        .unwrap();
    let entry = |id: &str, v: &str| arr(vec![bulk(id), arr(vec![bulk("n"), bulk(v)])]);
    // 1-0 claimed, 2-0 deleted (counts toward COUNT), next cursor 3-0.
    assert_eq!(
        r,
        arr(vec![
            bulk("3-0"),
            arr(vec![entry("1-0", "1")]),
            arr(vec![bulk("2-0")])
        ])
    );
    let r = run("return redis.call('XAUTOCLAIM', KEYS[1], 'g', 'live', 20, '3-0', 'COUNT', 10)")
        .await
        .unwrap();
    assert_eq!(
        r,
        arr(vec![
            bulk("0-0"),
            arr(vec![entry("3-0", "3"), entry("4-0", "4")]),
            arr(vec![])
        ])
    );
    let r = run("return redis.call('XPENDING', KEYS[1], 'g', '-', '+', 10)")
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(r.len(), 3);
    for e in r {
        let e = e.into_array().unwrap();
        assert_eq!(e[1], bulk("live"));
        assert_eq!(e[3], int(2));
    }
    assert_eq!(
        run("return redis.call('XAUTOCLAIM', KEYS[1], 'g', 'live', 0, '0-0', 'COUNT', 0)").await,
        Err(BackendError::Script("ERR COUNT must be > 0".into()))
    );
}

// ------------------------------------------------------------------ the real scripts

/// Keys of one shard of a batch, as the gateway lays them out (one hash tag).
pub(super) struct Shard {
    tag: String,
}

impl Shard {
    pub(super) fn new(batch: &str, shard: u32) -> Shard {
        Shard {
            tag: format!("{{{batch}:{shard}}}"),
        }
    }
    pub(super) fn k(&self, name: &str) -> String {
        format!("{}:{name}", self.tag)
    }
    pub(super) fn claim_keys(&self) -> Vec<String> {
        [
            "meta", "stock", "users", "daily", "req", "log", "deny", "claimed",
        ]
        .iter()
        .map(|n| self.k(n))
        .collect()
    }
    pub(super) fn setup_keys(&self) -> Vec<String> {
        ["meta", "stock", "deny", "xseq"]
            .iter()
            .map(|n| self.k(n))
            .collect()
    }
    pub(super) fn probe_keys(&self) -> Vec<String> {
        ["stock", "outbox", "xseq", "claimed", "log", "meta"]
            .iter()
            .map(|n| self.k(n))
            .collect()
    }
}

pub(super) fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `setup.lua` for a shard: stock, limit per user, daily limit, window from `start` to
/// `end`, denied users.
async fn setup(
    b: &impl Backend,
    s: &Shard,
    stock: i64,
    limit: i64,
    daily: i64,
    window: (i64, i64),
    deny: &[&str],
) -> Value {
    let (start, end) = (window.0.to_string(), window.1.to_string());
    let (stock, limit, daily) = (stock.to_string(), limit.to_string(), daily.to_string());
    let meta = [
        ("fp", "fp1"),
        ("state", "active"),
        ("start", start.as_str()),
        ("end", end.as_str()),
        ("limit", limit.as_str()),
        ("daily", daily.as_str()),
        ("vdays", "0"),
        ("vfrom", "100"),
        ("vto", "200"),
        ("ver", "1"),
    ];
    let n = meta.len().to_string();
    let mut args = vec![stock.as_str(), n.as_str()];
    for (k, v) in &meta {
        args.push(k);
        args.push(v);
    }
    args.extend_from_slice(deny);
    b.eval(Script::Setup, &refs(&s.setup_keys()), &args)
        .await
        .unwrap()
}

pub(super) const OPEN: (i64, i64) = (0, 99_999_999_999_999);

async fn claim(b: &impl Backend, s: &Shard, user: &str, rid: &str) -> Vec<Value> {
    claim_log(b, s, user, rid, "0").await
}

async fn claim_log(b: &impl Backend, s: &Shard, user: &str, rid: &str, maxlog: &str) -> Vec<Value> {
    let shard = s
        .tag
        .trim_matches(|c| c == '{' || c == '}')
        .split(':')
        .nth(1)
        .unwrap()
        .to_string();
    // one claim per call: n = 1, then user, request id and nonce
    b.eval(
        Script::Claim,
        &refs(&s.claim_keys()),
        &[
            "1",
            maxlog,
            "b1",
            &shard,
            "0",
            user,
            rid,
            &format!("n-{rid}"),
        ],
    )
    .await
    .unwrap()
    .into_array()
    .unwrap()
    .remove(0)
    .into_array()
    .unwrap()
}

#[tokio::test]
async fn claim_script_end_to_end() {
    let b = mem();
    let s = Shard::new("b1", 0);
    assert_eq!(claim(&b, &s, "u1", "").await, vec![int(0), int(-1)]);
    assert_eq!(setup(&b, &s, 3, 2, 0, OPEN, &["bad"]).await, int(1));
    assert_eq!(
        setup(&b, &s, 3, 2, 0, OPEN, &["bad"]).await,
        int(0),
        "retry is idempotent"
    );
    let first = claim(&b, &s, "u1", "r1").await;
    assert_eq!(first[0], int(1));
    assert_eq!(first[1], bulk("b1.0.1"));
    assert_eq!((&first[2], &first[3]), (&int(100), &int(200)));
    // Same request id: the same coupon, replayed, nothing written.
    let replay = claim(&b, &s, "u1", "r1").await;
    assert_eq!(replay[0], int(2));
    assert_eq!(&replay[1..5], &first[1..]);
    assert_eq!(
        replay[5],
        bulk("n-r1"),
        "the nonce recorded with the request id"
    );
    // replay.lua answers the same without writing; winners.lua lists who claimed.
    let req = s.k("req");
    let r = b
        .eval(Script::Replay, &[&req], &["u1", "r1"])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(r, replay);
    assert_eq!(
        b.eval(Script::Replay, &[&req], &["u1", "nope"])
            .await
            .unwrap(),
        arr(vec![int(0), int(-10)])
    );
    assert_eq!(
        b.eval(Script::Winners, &[&s.k("users")], &[])
            .await
            .unwrap(),
        arr(vec![bulk("u1"), bulk("1")])
    );
    assert_eq!(claim(&b, &s, "u1", "r2").await[0], int(1));
    assert_eq!(
        claim(&b, &s, "u1", "r3").await,
        vec![int(0), int(-6)],
        "per-user limit"
    );
    assert_eq!(
        claim(&b, &s, "bad", "r1").await,
        vec![int(0), int(-5)],
        "denied"
    );
    assert_eq!(claim(&b, &s, "u2", "").await[1], bulk("b1.0.3"));
    assert_eq!(
        claim(&b, &s, "u3", "").await,
        vec![int(0), int(-8)],
        "no stock left"
    );
    let p = b
        .eval(Script::Probe, &refs(&s.probe_keys()), &[])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(&p[..4], &[int(0), int(1), int(3), int(3)]);
    assert_eq!(p[5], int(1));

    // Window and state.
    let s2 = Shard::new("b1", 1);
    setup(
        &b,
        &s2,
        10,
        5,
        0,
        (99_999_999_999_000, 99_999_999_999_999),
        &[],
    )
    .await;
    assert_eq!(claim(&b, &s2, "u1", "").await, vec![int(0), int(-2)]);
    let s3 = Shard::new("b1", 2);
    setup(&b, &s3, 10, 5, 0, (0, 1000), &[]).await;
    assert_eq!(claim(&b, &s3, "u1", "").await, vec![int(0), int(-3)]);
    let s4 = Shard::new("b1", 3);
    setup(&b, &s4, 10, 5, 1, OPEN, &[]).await;
    assert_eq!(claim(&b, &s4, "u1", "").await[0], int(1));
    assert_eq!(
        claim(&b, &s4, "u1", "").await,
        vec![int(0), int(-7)],
        "daily limit"
    );
    // Log backlog bound.
    assert_eq!(
        claim_log(&b, &s4, "u2", "", "1").await,
        vec![int(0), int(-9)]
    );
    // Pause through patch.lua.
    let pk = refs(&[s4.k("meta"), s4.k("stock"), s4.k("xseq")])
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    let r = b
        .eval(Script::Patch, &refs(&pk), &["2", "", "state", "paused"])
        .await
        .unwrap();
    assert_eq!(r, arr(vec![int(1), int(2)]));
    assert_eq!(claim(&b, &s4, "u3", "").await, vec![int(0), int(-4)]);
    assert_eq!(
        b.eval(Script::Patch, &refs(&pk), &["2", ""]).await.unwrap(),
        arr(vec![int(0), int(2)]),
        "a repeated version is a no-op"
    );
    let r = b
        .eval(Script::Patch, &refs(&pk), &["5", "", "state", "active"])
        .await
        .unwrap();
    assert_eq!(r, arr(vec![int(1), int(5)]));
    assert_eq!(
        b.eval(Script::Patch, &refs(&pk), &["4", "", "state", "paused"])
            .await
            .unwrap(),
        arr(vec![int(0), int(5)]),
        "an older version arriving late is a no-op"
    );
    assert_eq!(
        b.eval(Script::Patch, &refs(&pk), &["6", "-1"]).await,
        Err(BackendError::Script("ERR patch: bad total".into()))
    );
    assert_eq!(
        b.eval(Script::Patch, &refs(&pk), &["+", ""]).await,
        Err(BackendError::Script("ERR patch: bad version".into()))
    );
    assert_eq!(
        b.eval(Script::Patch, &refs(&pk), &["6", "", "ver", "9"])
            .await,
        Err(BackendError::Script(
            "ERR patch: field ver is not settable".into()
        ))
    );
    assert_eq!(
        b.eval(Script::Patch, &refs(&pk), &["6", "7"]).await,
        Err(BackendError::Script(
            "ERR patch: this slot holds no total".into()
        ))
    );
    let meta = b
        .eval(Script::MetaGet, &[&s4.k("meta")], &[])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    let field = |name: &str| {
        meta.chunks(2)
            .find(|p| p[0] == bulk(name))
            .map(|p| p[1].clone())
    };
    assert_eq!(
        (field("state"), field("ver")),
        (Some(bulk("active")), Some(bulk("5")))
    );
    assert_eq!(
        b.eval(Script::MetaGet, &[&Shard::new("zz", 0).k("meta")], &[])
            .await
            .unwrap(),
        arr(vec![])
    );
}

#[tokio::test]
async fn transfer_and_soldout_scripts() {
    let b = mem();
    let src = Shard::new("b2", 0);
    let dst = Shard::new("b2", 1);
    setup(&b, &src, 10, 5, 0, OPEN, &[]).await;
    setup(&b, &dst, 0, 5, 0, OPEN, &[]).await;
    let out_keys = [
        src.k("stock"),
        src.k("outbox"),
        src.k("xseq"),
        src.k("meta"),
        src.k("codes"),
        src.k("xcodes"),
    ];
    let moved = b
        .eval(
            Script::TransferOut,
            &refs(&out_keys),
            &["t1", "8", "1", "1"],
        )
        .await
        .unwrap();
    assert_eq!(
        moved,
        arr(vec![int(5), bulk("")]),
        "at most half, rounded up"
    );
    assert_eq!(
        b.eval(
            Script::TransferOut,
            &refs(&out_keys),
            &["t1", "8", "1", "1"]
        )
        .await
        .unwrap(),
        arr(vec![int(5), bulk("")]),
        "idempotent"
    );
    let inbox = dst.k("inbox:t1");
    let in_keys = [dst.k("stock"), inbox.clone(), dst.k("xseq"), dst.k("codes")];
    assert_eq!(
        b.eval(Script::InboxCheck, &[&inbox], &[]).await.unwrap(),
        int(0)
    );
    assert_eq!(
        b.eval(Script::TransferIn, &refs(&in_keys), &["5", "3600"])
            .await
            .unwrap(),
        int(1)
    );
    assert_eq!(
        b.eval(Script::TransferIn, &refs(&in_keys), &["5", "3600"])
            .await
            .unwrap(),
        int(0)
    );
    assert_eq!(
        b.eval(Script::InboxCheck, &[&inbox], &[]).await.unwrap(),
        int(1)
    );
    let p = b
        .eval(Script::Probe, &refs(&src.probe_keys()), &[])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(p[0], int(5));
    let outbox = p[6].clone().into_array().unwrap();
    assert_eq!(outbox[0], bulk("t1"));
    assert!(outbox[1].as_str().unwrap().starts_with("1|5|"));
    assert_eq!(
        b.eval(
            Script::TransferDone,
            &[&src.k("outbox"), &src.k("xcodes")],
            &["t1"]
        )
        .await
        .unwrap(),
        int(1)
    );
    assert_eq!(
        b.eval(
            Script::TransferDone,
            &[&src.k("outbox"), &src.k("xcodes")],
            &["t1"]
        )
        .await
        .unwrap(),
        int(0)
    );
    let p = b
        .eval(Script::Probe, &refs(&dst.probe_keys()), &[])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!((&p[0], &p[1]), (&int(5), &int(2)));
    // Sold out: only with the scan's xseq.
    let mk = [dst.k("meta"), dst.k("xseq")];
    assert_eq!(
        b.eval(Script::MarkSoldout, &refs(&mk), &["1"])
            .await
            .unwrap(),
        int(0)
    );
    assert_eq!(
        b.eval(Script::MarkSoldout, &refs(&mk), &["2"])
            .await
            .unwrap(),
        int(1)
    );
    let nk = [
        Shard::new("none", 0).k("meta"),
        Shard::new("none", 0).k("xseq"),
    ];
    assert_eq!(
        b.eval(Script::MarkSoldout, &refs(&nk), &["0"])
            .await
            .unwrap(),
        int(-1)
    );
}

#[tokio::test]
async fn log_read_and_ack_scripts() {
    let b = mem();
    let s = Shard::new("b3", 0);
    setup(&b, &s, 100, 100, 0, OPEN, &[]).await;
    let log = s.k("log");
    // No group yet and an empty log: the group is created, nothing read.
    assert_eq!(
        b.eval(Script::LogRead, &[&log], &["p", "c1", "10", "60000"])
            .await
            .unwrap(),
        arr(vec![])
    );
    for i in 0..5 {
        claim(&b, &s, &format!("u{i}"), "").await;
    }
    let r = b
        .eval(Script::LogRead, &[&log], &["p", "c1", "3", "60000"])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(r.len(), 3);
    let e0 = r[0].clone().into_array().unwrap();
    let fields = e0[1].clone().into_array().unwrap();
    // a claims record (one per call) whose first coupon is sequence 1
    assert_eq!(
        [&fields[..2], &fields[6..8]].concat(),
        [bulk("k"), bulk("claims"), bulk("q"), bulk("1")]
    );
    // log_count: the claims in the log's first entries, page by page
    let count = |after: &str, page: &str| {
        let (log, after, page) = (log.clone(), after.to_string(), page.to_string());
        let b = &b;
        async move {
            b.eval(Script::LogCount, &[&log], &[&after, &page])
                .await
                .unwrap()
        }
    };
    let first = count("", "2").await.into_array().unwrap();
    assert_eq!(first[..2], [int(2), int(2)]);
    let after = first[2].as_str().unwrap().to_string();
    assert_eq!(
        count(&after, "10").await.into_array().unwrap()[..2],
        [int(3), int(3)]
    );
    assert_eq!(
        count("", "10").await.into_array().unwrap()[..2],
        [int(5), int(5)]
    );
    assert!(b.eval(Script::LogCount, &[&log], &["", "0"]).await.is_err());
    let r2 = b
        .eval(Script::LogRead, &[&log], &["p", "c2", "10", "60000"])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(r2.len(), 2, "c2 gets the rest");
    // c1 crashed: with min idle 0 c2 takes its 3 pending entries over first.
    let r3 = b
        .eval(Script::LogRead, &[&log], &["p", "c2", "10", "0"])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(r3.len(), 5);
    let ids: Vec<String> = r3
        .iter()
        .map(|e| {
            e.clone().into_array().unwrap()[0]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut args = vec!["p"];
    args.extend(ids.iter().map(String::as_str));
    assert_eq!(
        b.eval(Script::LogAck, &[&log], &args).await.unwrap(),
        int(5)
    );
    assert_eq!(
        b.eval(Script::LogAck, &[&log], &["p"]).await.unwrap(),
        int(0)
    );
    let p = b
        .eval(Script::Probe, &refs(&s.probe_keys()), &[])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    assert_eq!(p[3], int(0), "log emptied");
    assert_eq!(
        b.eval(Script::LogRead, &[&log], &["p", "c1", "0", "0"])
            .await,
        Err(BackendError::Script("ERR log_read: bad count".into()))
    );
}

#[tokio::test]
async fn restore_script_rebuilds_a_slot() {
    let b = mem();
    let s = Shard::new("b1", 7);
    setup(&b, &s, 10, 5, 0, OPEN, &[]).await;
    claim(&b, &s, "u1", "r1").await;
    claim(&b, &s, "u2", "").await;
    let keys: Vec<String> = [
        "meta", "stock", "users", "daily", "req", "deny", "claimed", "xseq", "outbox", "log",
        "repair", "codes", "xcodes",
    ]
    .iter()
    .map(|n| s.k(n))
    .collect();
    let restore = |args: Vec<&'static str>| {
        let (b, keys) = (&b, &keys);
        async move { b.eval(Script::Restore, &refs(keys), &args).await }
    };
    // Unpersisted records in the log: refused.
    assert_eq!(
        restore(vec!["begin", "1"]).await,
        Ok(arr(vec![int(-2), int(2)]))
    );
    let log = s.k("log");
    let read = b
        .eval(Script::LogRead, &[&log], &["p", "c", "10", "0"])
        .await
        .unwrap();
    let ids: Vec<String> = read
        .into_array()
        .unwrap()
        .into_iter()
        .map(|e| e.into_array().unwrap()[0].as_str().unwrap().to_string())
        .collect();
    let mut ack = vec!["p"];
    ack.extend(ids.iter().map(String::as_str));
    assert_eq!(b.eval(Script::LogAck, &[&log], &ack).await, Ok(int(2)));
    assert_eq!(
        restore(vec!["begin", "0"]).await,
        Ok(arr(vec![int(-1), int(0)]))
    );
    // the claim counter (2) and the stock it deleted (10 - 2 claimed)
    assert_eq!(
        restore(vec!["begin", "1"]).await,
        Ok(arr(vec![int(1), int(2), int(8)]))
    );
    assert_eq!(
        claim(&b, &s, "u3", "").await,
        vec![int(0), int(-1)],
        "not live yet"
    );
    assert_eq!(
        restore(vec!["hset", "users", "u1", "5"]).await,
        Ok(arr(vec![int(1), int(1)]))
    );
    assert_eq!(
        restore(vec!["hset", "users", "u1", "x"]).await,
        Err(BackendError::Script("ERR restore: bad user count".into()))
    );
    assert_eq!(
        restore(vec!["deny", "bad"]).await,
        Ok(arr(vec![int(1), int(1)]))
    );
    let finish = vec![
        "finish",
        "10",
        "5",
        "10",
        "fp",
        "fp1",
        "state",
        "active",
        "start",
        "0",
        "end",
        "99999999999999",
        "limit",
        "5",
        "daily",
        "0",
        "vdays",
        "0",
        "vfrom",
        "100",
        "vto",
        "200",
        "ver",
        "1",
    ];
    assert_eq!(restore(finish.clone()).await, Ok(arr(vec![int(1), int(5)])));
    assert_eq!(
        restore(finish).await,
        Ok(arr(vec![int(-1), int(0)])),
        "live now"
    );
    assert_eq!(
        claim(&b, &s, "u1", "").await,
        vec![int(0), int(-6)],
        "restored count"
    );
    assert_eq!(
        claim(&b, &s, "bad", "").await,
        vec![int(0), int(-5)],
        "restored deny"
    );
    assert_eq!(
        claim(&b, &s, "u3", "").await[1],
        bulk("b1.7.6"),
        "counter raised to the floor"
    );
    assert_eq!(
        restore(vec!["nope"]).await,
        Err(BackendError::Script("ERR restore: unknown op".into()))
    );
}

// ------------------------------------------------------------------ concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_oversell() {
    let b = Arc::new(mem());
    const SHARDS: u32 = 4;
    const STOCK: i64 = 150;
    for i in 0..SHARDS {
        setup(&*b, &Shard::new("hot", i), STOCK, 3, 0, OPEN, &[]).await;
    }
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for n in 0..40u32 {
                let user = format!("u{}", (t * 40 + n) % 300);
                let shard = Shard::new("hot", (t + n) % SHARDS);
                let r = claim(&*b, &shard, &user, &format!("r{t}-{n}")).await;
                if r[0] == int(1) {
                    won.push((user, r[1].as_str().unwrap().to_string()));
                }
            }
            won
        }));
    }
    let mut coupons = std::collections::HashSet::new();
    let mut per_user = std::collections::HashMap::<String, i64>::new();
    for t in tasks {
        for (user, coupon) in t.await.unwrap() {
            assert!(coupons.insert(coupon), "coupon issued twice");
            *per_user.entry(user).or_default() += 1;
        }
    }
    assert_eq!(
        coupons.len() as i64,
        STOCK * SHARDS as i64,
        "every coupon issued, none more"
    );
    // The per-user limit is per shard (3 per shard in this set-up).
    assert!(per_user.values().all(|&n| n <= 3 * SHARDS as i64));
    for i in 0..SHARDS {
        let s = Shard::new("hot", i);
        let p = b
            .eval(Script::Probe, &refs(&s.probe_keys()), &[])
            .await
            .unwrap()
            .into_array()
            .unwrap();
        assert_eq!((&p[0], &p[2], &p[3]), (&int(0), &int(STOCK), &int(STOCK)));
    }
}

// ------------------------------------------------------------------ append-only file

fn dump(b: &EmbeddedBackend) -> std::collections::BTreeMap<Vec<u8>, String> {
    b.keyspace.dump(now_ms())
}

/// A mixed workload touching every value type and the stream group machinery.
async fn workload(b: &EmbeddedBackend, tag: &str, n: usize) {
    let s = Shard::new(tag, 0);
    setup(b, &s, 1000, 1000, 0, OPEN, &["x"]).await;
    for i in 0..n {
        claim(b, &s, &format!("u{}", i % 17), &format!("r{i}")).await;
    }
    let log = s.k("log");
    let r = b
        .eval(Script::LogRead, &[&log], &["p", "c1", "4", "0"])
        .await
        .unwrap()
        .into_array()
        .unwrap();
    let id = r[0].clone().into_array().unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    b.eval(Script::LogAck, &[&log], &["p", &id]).await.unwrap();
    b.eval(Script::LogRead, &[&log], &["p", "c2", "2", "0"])
        .await
        .unwrap();
    let out_keys = [
        s.k("stock"),
        s.k("outbox"),
        s.k("xseq"),
        s.k("meta"),
        s.k("codes"),
        s.k("xcodes"),
    ];
    b.eval(
        Script::TransferOut,
        &refs(&out_keys),
        &["t9", "5", "1", "0"],
    )
    .await
    .unwrap();
    let in_keys = [s.k("stock"), s.k("inbox:t9"), s.k("xseq"), s.k("codes")];
    b.eval(Script::TransferIn, &refs(&in_keys), &["5", "3600"])
        .await
        .unwrap();
    lua(b, "redis.call('SET', KEYS[1], 'gone', 'PX', 1) redis.call('HSET', KEYS[1] .. 'h', 'f', 'v') redis.call('EXPIRE', KEYS[1] .. 'h', 1000)", &[&s.k("tmp")], &[]).await.unwrap();
    // Let the 1 ms key expire, so dumps taken from now on agree on it.
    tokio::time::sleep(Duration::from_millis(5)).await;
}

#[tokio::test]
async fn aof_reopen_restores_identical_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cg.aof");
    let before;
    {
        let b = with_aof(&path, Fsync::Everysec);
        workload(&b, "a1", 40).await;
        before = dump(&b);
        assert!(!before.is_empty());
    }
    let b = with_aof(&path, Fsync::Everysec);
    assert_eq!(dump(&b), before);
    // And again after the startup rewrite.
    drop(b);
    let b = with_aof(&path, Fsync::No);
    assert_eq!(dump(&b), before);
    // The state keeps working: ids continue above the replayed ones.
    workload(&b, "a2", 5).await;
    let after = dump(&b);
    drop(b);
    assert_eq!(dump(&with_aof(&path, Fsync::Always)), after);
}

#[tokio::test]
async fn aof_survives_without_graceful_shutdown() {
    // Records reach write(2) before eval returns: a copy of the file taken right after
    // (what a kill -9 leaves behind) holds every acknowledged claim.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cg.aof");
    let copy = dir.path().join("copy.aof");
    let b = with_aof(&path, Fsync::No);
    workload(&b, "k1", 20).await;
    let before = dump(&b);
    std::fs::copy(&path, &copy).unwrap();
    let c = with_aof(&copy, Fsync::No);
    assert_eq!(dump(&c), before);
    drop(b);
}

#[tokio::test]
async fn aof_torn_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cg.aof");
    let before;
    {
        let b = with_aof(&path, Fsync::No);
        workload(&b, "t1", 10).await;
        before = dump(&b);
    }
    // A record cut short by a crash.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&100u32.to_le_bytes());
    bytes.extend_from_slice(&7u32.to_le_bytes());
    bytes.extend_from_slice(b"partial");
    std::fs::write(&path, &bytes).unwrap();
    {
        let b = with_aof(&path, Fsync::No);
        assert_eq!(dump(&b), before);
        lua(
            &b,
            "redis.call('SET', KEYS[1], 'after')",
            &["{t}after"],
            &[],
        )
        .await
        .unwrap();
    }
    // The tail was cut at startup, so what came after it is not lost.
    let b = with_aof(&path, Fsync::No);
    assert_eq!(
        lua(&b, "return redis.call('GET', KEYS[1])", &["{t}after"], &[]).await,
        Ok(bulk("after"))
    );
    drop(b);
    // A complete record with a bad checksum at the end is torn too.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    drop(with_aof(&path, Fsync::No));
    // Damage before the last record is not a crash artefact: refuse to load.
    let mid_path = dir.path().join("mid.aof");
    {
        let b = with_aof(&mid_path, Fsync::No);
        workload(&b, "m1", 5).await;
    }
    let mut bytes = std::fs::read(&mid_path).unwrap();
    bytes[aof::MAGIC.len() + 8 + 2] ^= 0xff;
    std::fs::write(&mid_path, &bytes).unwrap();
    let r = EmbeddedBackend::open(&EmbeddedConfig {
        aof_path: Some(mid_path),
        ..EmbeddedConfig::default()
    });
    assert!(
        matches!(r, Err(EmbeddedError::Corrupt { .. })),
        "{:?}",
        r.err()
    );
    // Not our file at all.
    std::fs::write(&path, b"hello world, not a log").unwrap();
    assert!(matches!(
        EmbeddedBackend::open(&EmbeddedConfig {
            aof_path: Some(path),
            ..EmbeddedConfig::default()
        }),
        Err(EmbeddedError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn aof_rewrite_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cg.aof");
    let before;
    {
        let b = with_aof(&path, Fsync::Everysec);
        workload(&b, "w1", 60).await;
        let grown = std::fs::metadata(&path).unwrap().len();
        b.rewrite_aof().unwrap();
        let compact = std::fs::metadata(&path).unwrap().len();
        assert!(compact < grown, "{compact} < {grown}");
        workload(&b, "w2", 10).await;
        before = dump(&b);
    }
    assert_eq!(dump(&with_aof(&path, Fsync::Everysec)), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aof_rewrite_concurrent_with_claims_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cg.aof");
    let before;
    {
        let b = Arc::new(
            EmbeddedBackend::open(&EmbeddedConfig {
                aof_path: Some(path.clone()),
                fsync: Fsync::Always,
                lua_vms: 4,
                aof_rewrite_min_bytes: 1,
            })
            .unwrap(),
        );
        for i in 0..8 {
            setup(&*b, &Shard::new("rw", i), 10_000, 10_000, 0, OPEN, &[]).await;
        }
        let mut tasks = Vec::new();
        for t in 0..8u32 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..150u32 {
                    let r = claim(
                        &*b,
                        &Shard::new("rw", (t + n) % 8),
                        &format!("u{t}"),
                        &format!("{t}-{n}"),
                    )
                    .await;
                    assert_eq!(r[0], int(1));
                }
            }));
        }
        let rewriter = {
            let b = b.clone();
            tokio::task::spawn_blocking(move || {
                for _ in 0..5 {
                    b.rewrite_aof().unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        for t in tasks {
            t.await.unwrap();
        }
        rewriter.await.unwrap();
        before = dump(&b);
        b.flush().unwrap();
    }
    let b = with_aof(&path, Fsync::No);
    assert_eq!(dump(&b), before);
    let claimed: i64 = (0..8)
        .map(|i| {
            let k = Shard::new("rw", i).k("claimed");
            b.keyspace
                .dump(0)
                .get(k.as_bytes())
                .map_or(0, |v| v.split(' ').nth(1).unwrap().parse::<i64>().unwrap())
        })
        .sum();
    assert_eq!(claimed, 8 * 150);
}

#[tokio::test]
async fn aof_is_locked_against_a_second_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cg.aof");
    let _b = with_aof(&path, Fsync::No);
    let r = EmbeddedBackend::open(&EmbeddedConfig {
        aof_path: Some(path),
        ..EmbeddedConfig::default()
    });
    assert!(matches!(r, Err(EmbeddedError::Locked { .. })));
}

#[tokio::test]
async fn read_only_scripts_log_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cg.aof");
    let b = with_aof(&path, Fsync::No);
    let s = Shard::new("ro", 0);
    setup(&b, &s, 1, 1, 0, OPEN, &[]).await;
    b.flush().unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    for _ in 0..10 {
        b.eval(Script::Probe, &refs(&s.probe_keys()), &[])
            .await
            .unwrap();
        b.eval(Script::MetaGet, &[&s.k("meta")], &[]).await.unwrap();
        claim(&b, &s, "nobody", "").await; // refused after the first: -8 / writes nothing
    }
    b.flush().unwrap();
    let grown = std::fs::metadata(&path).unwrap().len() - size;
    assert!(
        grown > 0 && grown < 400,
        "one claim record only, grew {grown}"
    );
}

#[tokio::test]
async fn publish_reaches_subscribers() {
    let b = mem();
    let mut rx = b.subscribe();
    b.publish("soldout b1").await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), "soldout b1");
    assert_eq!(b.kind(), "embedded");
    b.ready().await.unwrap();
}

#[test]
fn config_parses() {
    #[derive(serde::Deserialize)]
    struct Wrap {
        embedded: EmbeddedConfig,
    }
    let w: Wrap =
        toml_like(r#"{"embedded": {"aof_path": "/tmp/x.aof", "fsync": "always", "lua_vms": 3}}"#);
    assert_eq!(w.embedded.fsync, Fsync::Always);
    assert_eq!(w.embedded.lua_vms, 3);
    assert_eq!(
        w.embedded.aof_rewrite_min_bytes,
        EmbeddedConfig::default().aof_rewrite_min_bytes
    );
}

/// Parses JSON through serde (serde_json is a dependency of the crate).
fn toml_like<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_json::from_str(s).unwrap()
}

/// Throughput of claim.lua (run: `cargo test --release --lib backend::embedded::tests::bench
/// -- --ignored --nocapture`). Many shards, many users, every claim succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_claims() {
    for aof in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(
            EmbeddedBackend::open(&EmbeddedConfig {
                aof_path: aof.then(|| dir.path().join("bench.aof")),
                ..EmbeddedConfig::default()
            })
            .unwrap(),
        );
        const SHARDS: u32 = 64;
        for i in 0..SHARDS {
            setup(
                &*b,
                &Shard::new("bench", i),
                1_000_000,
                1_000_000,
                0,
                OPEN,
                &[],
            )
            .await;
        }
        let n_tasks = 64u32;
        let per_task = 4000u32;
        let start = std::time::Instant::now();
        let mut tasks = Vec::new();
        for t in 0..n_tasks {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..per_task {
                    let shard = Shard::new("bench", (t * 7 + n) % SHARDS);
                    let r = claim(&*b, &shard, &format!("u{t}"), &format!("{t}-{n}")).await;
                    assert_eq!(r[0], int(1));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let total = f64::from(n_tasks * per_task);
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "aof={aof}: {total} claims in {secs:.2}s = {:.0} claims/s",
            total / secs
        );
    }
}

/// Single-task latency of claim.lua (no contention), same invocation as `bench_claims`.
#[tokio::test]
#[ignore]
async fn bench_claim_latency() {
    let b = mem();
    for i in 0..8 {
        setup(
            &b,
            &Shard::new("lat", i),
            1_000_000,
            1_000_000,
            0,
            OPEN,
            &[],
        )
        .await;
    }
    // CPU time of this thread (ns), so other load on the machine does not skew the figure.
    let cpu_ns = || -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let n = 100_000u32;
    let start = std::time::Instant::now();
    let cpu0 = cpu_ns();
    for k in 0..n {
        let r = claim(
            &b,
            &Shard::new("lat", k % 8),
            &format!("u{}", k % 64),
            &format!("r{k}"),
        )
        .await;
        assert_eq!(r[0], int(1));
    }
    let cpu = (cpu_ns() - cpu0) as f64 / 1e3 / f64::from(n);
    let wall = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    eprintln!("{cpu:.1} us CPU, {wall:.1} us wall per claim (one task)");
}

/// The child half of `kill9_loses_no_acknowledged_claim`: claims forever, printing every
/// acknowledged claim. Does nothing unless started by that test.
#[tokio::test]
#[ignore]
async fn kill9_child() {
    use std::io::Write;
    let Ok(path) = std::env::var("CG_KILL9_AOF") else {
        return;
    };
    // No fsync at all: surviving a process kill must not depend on it.
    let b = with_aof(Path::new(&path), Fsync::No);
    let s = Shard::new("k9", 0);
    setup(&b, &s, 1_000_000, 1_000_000, 0, OPEN, &[]).await;
    let mut out = std::io::stdout();
    for i in 0u64.. {
        let r = claim(&b, &s, &format!("u{i}"), &format!("r{i}")).await;
        let line = format!("ACK u{i} r{i} {}\n", r[1].as_str().unwrap());
        out.write_all(line.as_bytes()).unwrap();
        out.flush().unwrap();
    }
}

/// `kill -9` of a process using the embedded backend loses no claim it acknowledged.
#[test]
fn kill9_loses_no_acknowledged_claim() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k9.aof");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "backend::embedded::tests::kill9_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CG_KILL9_AOF", &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acked = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("ACK ") {
            let parts: Vec<String> = rest.split(' ').map(str::to_string).collect();
            acked.push(parts);
            if acked.len() >= 300 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(acked.len(), 300, "the child stopped early");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = with_aof(&path, Fsync::No);
        let s = Shard::new("k9", 0);
        for a in &acked {
            let r = claim(&b, &s, &a[0], &a[1]).await;
            assert_eq!(r[0], int(2), "acknowledged claim {a:?} lost");
            assert_eq!(r[1], bulk(&a[2]));
        }
    });
}

/// A fresh checkout has no `data/` directory: opening the log creates it.
#[tokio::test]
async fn aof_parent_directory_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/nested/claimgate.aof");
    let b = EmbeddedBackend::open(&EmbeddedConfig {
        aof_path: Some(path.clone()),
        ..EmbeddedConfig::default()
    })
    .unwrap();
    drop(b);
    assert!(path.exists());
}
