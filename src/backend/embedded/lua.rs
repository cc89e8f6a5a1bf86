//! The Lua side of the embedded backend: sandboxed Lua 5.1 VMs with every script compiled
//! once, a pool of them, and Redis's value conversions in both directions.
//!
//! Invariant kept here: a script runs exactly as under Redis's `EVAL`: `KEYS`/`ARGV` set,
//! globals read-only, `redis.call`/`redis.pcall` converting replies the Redis way, and its
//! slot's lock held from before the first command until after its effects were appended to
//! the log (so the log order of a slot is the order its scripts ran in). A VM is only
//! returned to the pool after a clean run; one that panicked is dropped, releasing its lock.

use std::sync::Arc;

use bytes::Bytes;
use crossbeam::queue::ArrayQueue;
use mlua::{Function, Lua, LuaOptions, MultiValue, StdLib, Table, Value as LuaValue};

use super::aof::Aof;
use super::commands::{self, CallCtx, Reply, fmt_i64};
use super::keyspace::Keyspace;
use super::now_ms;
use crate::backend::{BackendError, Script, Value};

/// Builds `redis.*` around the raw command function (chunk argument) and returns the runner
/// that calls a compiled script the way Redis does, turning every failure into an error text.
const PRELUDE: &str = r#"
local raw = ...
local error, pcall, type, tostring = error, pcall, type, tostring
local last_err
local redis = redis
redis.call = function(...)
  local r, e = raw(...)
  if e then
    last_err = r
    error(r, 0)
  end
  return r
end
redis.pcall = function(...)
  local r, e = raw(...)
  if e then return { err = r } end
  return r
end
redis.error_reply = function(msg)
  if type(msg) ~= 'string' then error('wrong number or type of arguments', 2) end
  return { err = msg }
end
redis.status_reply = function(msg)
  if type(msg) ~= 'string' then error('wrong number or type of arguments', 2) end
  return { ok = msg }
end
redis.log = function() end
redis.LOG_DEBUG, redis.LOG_VERBOSE, redis.LOG_NOTICE, redis.LOG_WARNING = 0, 1, 2, 3
redis.replicate_commands = function() return true end
redis.set_repl = function() end
redis.REPL_NONE, redis.REPL_AOF, redis.REPL_SLAVE, redis.REPL_REPLICA, redis.REPL_ALL = 0, 1, 2, 2, 3
return function(f)
  last_err = nil
  local ok, res = pcall(f)
  if ok then return true, res end
  if res ~= nil and res == last_err then return false, res end
  if type(res) == 'table' and type(res.err) == 'string' then return false, res.err end
  return false, 'ERR ' .. tostring(res)
end
"#;

/// Makes the globals table read-only, as Redis 7 does.
const LOCK_GLOBALS: &str = r#"
local error, tostring = error, tostring
setmetatable(_G, {
  __newindex = function(_, k)
    error('Attempt to modify a readonly table', 2)
  end,
  __index = function(_, k)
    error("Script attempted to access nonexistent global variable '" .. tostring(k) .. "'", 2)
  end,
})
"#;

/// Globals a Redis script does not get.
const REMOVED_GLOBALS: [&str; 9] = [
    "dofile",
    "loadfile",
    "load",
    "loadstring",
    "require",
    "module",
    "print",
    "getfenv",
    "setfenv",
];

/// Deepest table nesting converted from a script's return value.
const MAX_REPLY_DEPTH: usize = 64;

/// What one script run produced.
pub struct Outcome {
    pub reply: Result<Value, BackendError>,
    /// Logical log offset the reply depends on (the script's own record, or everything
    /// appended before it finished); `None` without a log.
    pub aof_end: Option<u64>,
}

/// What to run: a registered script, or (tests) ad-hoc source compiled on the spot.
#[derive(Debug, Clone, Copy)]
pub enum Code<'a> {
    Known(Script),
    #[cfg_attr(not(test), allow(dead_code))]
    Source(&'a str),
}

/// One Lua state with every [`Script`] compiled.
pub struct Vm {
    lua: Lua,
    globals: Table,
    runner: Function,
    scripts: Vec<(Script, Function)>,
    keyspace: Arc<Keyspace>,
}

impl Vm {
    /// `record`: whether scripts' effects are encoded for the append-only file.
    pub fn new(keyspace: Arc<Keyspace>, record: bool) -> mlua::Result<Vm> {
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::MATH,
            LuaOptions::default(),
        )?;
        lua.set_app_data(CallCtx::new(keyspace.clone(), record));
        let globals = lua.globals();
        for name in REMOVED_GLOBALS {
            globals.raw_set(name, LuaValue::Nil)?;
        }
        globals.raw_set("redis", lua.create_table()?)?;
        let raw = lua.create_function(redis_call)?;
        let runner: Function = lua.load(PRELUDE).set_name("=redis").call(raw)?;
        let scripts = Script::ALL
            .iter()
            .map(|&s| {
                let f = lua
                    .load(s.source())
                    .set_name(format!("={}.lua", s.name()))
                    .into_function()?;
                Ok((s, f))
            })
            .collect::<mlua::Result<Vec<_>>>()?;
        lua.load(LOCK_GLOBALS).set_name("=sandbox").exec()?;
        Ok(Vm {
            lua,
            globals,
            runner,
            scripts,
            keyspace,
        })
    }

    /// Runs `script` holding `slot` (or, for a script without keys, the slot of the first
    /// key it touches), then appends its effects to `aof` before releasing the slot.
    pub fn run(
        &self,
        code: Code<'_>,
        slot: Option<u16>,
        keys: &[&str],
        args: &[&str],
        aof: Option<&Aof>,
    ) -> Outcome {
        let guard = slot.map(|s| self.keyspace.slot(s).lock_arc());
        match self.lua.app_data_mut::<CallCtx>() {
            Some(mut cx) => {
                cx.slot = slot;
                cx.guard = guard;
                // The script's clock starts once it holds its slot.
                cx.now = now_ms();
                cx.rec.buf.clear();
            }
            None => {
                return Outcome {
                    reply: Err(BackendError::Unavailable("lua vm lost its context".into())),
                    aof_end: None,
                };
            }
        }

        let result = self.call(code, keys, args);

        // Log the effects while the slot is still held, then release it.
        let aof_end = self.lua.app_data_mut::<CallCtx>().and_then(|mut cx| {
            let guard = cx.guard.take();
            cx.slot = None;
            let end = aof.map(|aof| match &guard {
                Some(g) if !cx.rec.buf.is_empty() => aof.append(&cx.rec.buf, g.snap_epoch),
                _ => aof.appended(),
            });
            cx.rec.buf.clear();
            if cx.rec.buf.capacity() > 1 << 20 {
                cx.rec.buf.shrink_to(64 << 10);
            }
            drop(guard);
            end
        });

        let reply = match result {
            Ok((true, v)) => lua_to_value(&v, 0),
            Ok((false, LuaValue::String(msg))) => Err(BackendError::Script(msg.to_string_lossy())),
            Ok((false, other)) => Err(BackendError::Script(format!("ERR {other:?}"))),
            Err(e) => Err(BackendError::Script(format!("ERR {e}"))),
        };
        Outcome { reply, aof_end }
    }

    fn call(&self, code: Code<'_>, keys: &[&str], args: &[&str]) -> mlua::Result<(bool, LuaValue)> {
        let compiled;
        let f = match code {
            Code::Known(script) => self
                .scripts
                .iter()
                .find(|(s, _)| *s == script)
                .map(|(_, f)| f)
                .ok_or_else(|| mlua::Error::runtime("script not compiled"))?,
            Code::Source(src) => {
                compiled = self
                    .lua
                    .load(src)
                    .set_name("=user_script")
                    .into_function()?;
                &compiled
            }
        };
        self.globals
            .raw_set("KEYS", self.lua.create_sequence_from(keys.iter().copied())?)?;
        self.globals
            .raw_set("ARGV", self.lua.create_sequence_from(args.iter().copied())?)?;
        self.runner.call::<(bool, LuaValue)>(f)
    }
}

/// An argument of `redis.call` as bytes: borrowed from a Lua string, or a formatted number.
enum Arg {
    Lua(mlua::BorrowedBytes),
    Owned(Vec<u8>),
}

impl AsRef<[u8]> for Arg {
    fn as_ref(&self) -> &[u8] {
        match self {
            Arg::Lua(b) => b,
            Arg::Owned(v) => v,
        }
    }
}

/// The raw `redis.call`: returns `(reply, false)` or `(error text, true)`; never raises,
/// so the Lua wrappers decide between raising (`call`) and returning `{err=...}` (`pcall`).
fn redis_call(lua: &Lua, args: MultiValue) -> mlua::Result<(LuaValue, bool)> {
    let fail = |msg: &str| Ok((LuaValue::String(lua.create_string(msg)?), true));
    let mut owned = Vec::with_capacity(args.len());
    for v in args.iter() {
        owned.push(match v {
            LuaValue::String(s) => Arg::Lua(s.as_bytes()),
            LuaValue::Integer(i) => {
                let mut buf = [0u8; 20];
                Arg::Owned(fmt_i64(*i, &mut buf).to_vec())
            }
            LuaValue::Number(n) => Arg::Owned(format_lua_number(*n).into_bytes()),
            _ => return fail("ERR Lua redis lib command arguments must be strings or integers"),
        });
    }
    if owned.is_empty() {
        return fail("ERR Please specify at least one argument for this redis lib call");
    }
    let argv: Vec<&[u8]> = owned.iter().map(Arg::as_ref).collect();
    let Some(mut cx) = lua.app_data_mut::<CallCtx>() else {
        return fail("ERR internal: no script context");
    };
    match commands::call(&mut cx, &argv) {
        Ok(reply) => Ok((reply_to_lua(lua, reply)?, false)),
        Err(msg) => fail(&msg),
    }
}

/// Redis -> Lua: integer -> number, bulk -> string, nil -> false, array -> table,
/// status -> `{ok=...}`.
fn reply_to_lua(lua: &Lua, r: Reply<'_>) -> mlua::Result<LuaValue> {
    Ok(match r {
        Reply::Nil | Reply::NilArray => LuaValue::Boolean(false),
        Reply::Int(i) => LuaValue::Integer(i),
        Reply::Bulk(b) => LuaValue::String(lua.create_string(b)?),
        Reply::BulkOwned(b) => LuaValue::String(lua.create_string(b)?),
        Reply::BulkInt(i) => {
            let mut buf = [0u8; 20];
            LuaValue::String(lua.create_string(fmt_i64(i, &mut buf))?)
        }
        Reply::Status(s) => {
            let t = lua.create_table_with_capacity(0, 1)?;
            t.raw_set("ok", s)?;
            LuaValue::Table(t)
        }
        Reply::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.into_iter().enumerate() {
                t.raw_set(i + 1, reply_to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

/// Lua -> reply, as Redis converts a script's return value: numbers truncated toward zero,
/// `true` -> 1, `false`/nil -> nil, `{err=}` -> error, `{ok=}` -> status, other tables ->
/// arrays up to the first nil. An error table nested in an array fails the whole reply
/// (`Value` has no nested error).
fn lua_to_value(v: &LuaValue, depth: usize) -> Result<Value, BackendError> {
    Ok(match v {
        LuaValue::Nil | LuaValue::Boolean(false) => Value::Nil,
        LuaValue::Boolean(true) => Value::Int(1),
        LuaValue::Integer(i) => Value::Int(*i),
        LuaValue::Number(n) => Value::Int(*n as i64),
        LuaValue::String(s) => Value::Bulk(Bytes::copy_from_slice(&s.as_bytes())),
        LuaValue::Table(t) => {
            let lua_err = |e: mlua::Error| BackendError::Script(format!("ERR {e}"));
            if let LuaValue::String(e) = t.raw_get::<LuaValue>("err").map_err(lua_err)? {
                return Err(BackendError::Script(e.to_string_lossy()));
            }
            if let LuaValue::String(s) = t.raw_get::<LuaValue>("ok").map_err(lua_err)? {
                return Ok(Value::Status(s.to_string_lossy()));
            }
            if depth >= MAX_REPLY_DEPTH {
                return Err(BackendError::Script(
                    "ERR reached lua stack limit converting the reply".into(),
                ));
            }
            let mut out = Vec::new();
            for i in 1.. {
                let item = t.raw_get::<LuaValue>(i).map_err(lua_err)?;
                if item.is_nil() {
                    break;
                }
                out.push(lua_to_value(&item, depth + 1)?);
            }
            Value::Array(out)
        }
        _ => Value::Nil,
    })
}

/// Formats a non-integral Lua number the way Redis does for command arguments
/// (`%.17g`): e.g. `0.1` -> "0.10000000000000001", `1e20` -> "1e+20", `-0` -> "-0".
pub fn format_lua_number(n: f64) -> String {
    if n.is_nan() {
        return if n.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if n.is_infinite() {
        return if n < 0.0 { "-inf" } else { "inf" }.into();
    }
    if n == 0.0 {
        return if n.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sci = format!("{n:.16e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..17).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{}{:02}", trim(mantissa), sign, exp.unsigned_abs())
    } else {
        let decimals = usize::try_from(16 - exp).unwrap_or(0);
        trim(&format!("{n:.decimals$}"))
    }
}

/// Idle VMs. Empty pool: a new VM is built (and kept on return if there is room).
pub struct VmPool {
    idle: ArrayQueue<Vm>,
    keyspace: Arc<Keyspace>,
    record: bool,
}

impl VmPool {
    pub fn new(size: usize, keyspace: Arc<Keyspace>, record: bool) -> mlua::Result<VmPool> {
        let idle = ArrayQueue::new(size.max(1));
        for _ in 0..size.max(1) {
            let _ = idle.push(Vm::new(keyspace.clone(), record)?);
        }
        Ok(VmPool {
            idle,
            keyspace,
            record,
        })
    }

    pub fn get(&self) -> mlua::Result<PooledVm<'_>> {
        let vm = match self.idle.pop() {
            Some(vm) => vm,
            None => Vm::new(self.keyspace.clone(), self.record)?,
        };
        Ok(PooledVm {
            vm: Some(vm),
            pool: self,
        })
    }
}

/// A VM on loan from the pool.
pub struct PooledVm<'a> {
    vm: Option<Vm>,
    pool: &'a VmPool,
}

impl std::ops::Deref for PooledVm<'_> {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        // Always Some until drop.
        self.vm
            .as_ref()
            .unwrap_or_else(|| unreachable!("pooled vm taken before drop"))
    }
}

impl Drop for PooledVm<'_> {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take()
            && !std::thread::panicking()
        {
            // A full pool drops the extra VM.
            let _ = self.pool.idle.push(vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_format_like_redis() {
        assert_eq!(format_lua_number(0.1), "0.10000000000000001");
        assert_eq!(format_lua_number(1e20), "1e+20");
        assert_eq!(format_lua_number(-0.0), "-0");
        assert_eq!(format_lua_number(1.5), "1.5");
        assert_eq!(format_lua_number(-2.25), "-2.25");
        assert_eq!(format_lua_number(1e17), "1e+17");
        assert_eq!(format_lua_number(1.0e-5), "1.0000000000000001e-05");
        assert_eq!(format_lua_number(0.0001), "0.0001");
        assert_eq!(format_lua_number(123456.789), "123456.789");
    }
}
