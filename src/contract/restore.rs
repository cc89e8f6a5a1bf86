//! `lua/restore.lua`: rebuilds one slot from the database in steps (`begin`, `hset` /
//! `deny` chunks, `finish`), the slot's meta written last so it goes live only complete.
//!
//! Invariant kept here: each step is a typed call; the one decoder ([`decode`]) reads every
//! reply into a [`Step`], and an answer the step cannot give is a protocol error.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Restore;

/// Field/value pairs (or set members) per call: bounds each call's size.
pub const CHUNK: usize = 500;

/// What a restore step answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `begin`: the slot was cleared; its claim counter is `counter`.
    Begun { counter: u64 },
    /// `hset` / `deny` / `finish`: done; `n` pairs written, members added, or (finish) the
    /// claim counter after.
    Done { n: u64 },
    /// The slot's meta exists: it is live, nothing written.
    Live,
    /// `begin`: the slot's log holds `entries` records the database does not have yet.
    Unpersisted { entries: u64 },
}

/// Which hash `hset` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Users,
    Daily,
    Req,
}

impl Target {
    fn arg(self) -> &'static str {
        match self {
            Target::Users => "users",
            Target::Daily => "daily",
            Target::Req => "req",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Begin,
    Hset,
    Deny,
    Finish,
}

/// KEYS, in the script's order.
pub fn keys(s: &SlotKeys) -> [&str; 10] {
    [
        &s.meta, &s.stock, &s.users, &s.daily, &s.req, &s.deny, &s.claimed, &s.xseq, &s.outbox,
        &s.log,
    ]
}

async fn run<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    op: Op,
    args: &[&str],
) -> Result<Step, BackendError> {
    decode(op, backend.eval(SCRIPT, &keys(slot), args).await?)
}

/// `begin`: clears the slot (keeping its claim counter, transfer sequence and log), unless
/// it is live (and not `force`) or its log holds records.
pub async fn begin<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    force: bool,
) -> Result<Step, BackendError> {
    let force = if force { "1" } else { "0" };
    run(backend, slot, Op::Begin, &["begin", force]).await
}

/// `hset`: writes `pairs` (at most [`CHUNK`]) into the slot's `target` hash.
pub async fn hset<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    target: Target,
    pairs: &[(String, String)],
) -> Result<Step, BackendError> {
    let mut args = Vec::with_capacity(2 + 2 * pairs.len());
    args.extend(["hset", target.arg()]);
    for (f, v) in pairs {
        args.push(f.as_str());
        args.push(v.as_str());
    }
    run(backend, slot, Op::Hset, &args).await
}

/// `deny`: adds `users` (at most [`CHUNK`]) to the slot's deny set.
pub async fn deny<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    users: &[&str],
) -> Result<Step, BackendError> {
    let mut args = Vec::with_capacity(1 + users.len());
    args.push("deny");
    args.extend_from_slice(users);
    run(backend, slot, Op::Deny, &args).await
}

/// `finish`: sets the stock, raises the claim counter to `counter_floor` (never lowers it),
/// and writes `meta` (which must hold `fp`, `state` and `ver`) last.
pub async fn finish<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    stock: u64,
    counter_floor: u64,
    meta: &[(String, String)],
) -> Result<Step, BackendError> {
    let (stock, floor, n) = (
        stock.to_string(),
        counter_floor.to_string(),
        meta.len().to_string(),
    );
    let mut args: Vec<&str> = vec!["finish", &stock, &floor, &n];
    for (k, v) in meta {
        args.push(k);
        args.push(v);
    }
    run(backend, slot, Op::Finish, &args).await
}

/// The one decoder of `restore.lua`'s replies, by the step that was run.
fn decode(op: Op, reply: Value) -> Result<Step, BackendError> {
    let (code, n) = reply::code_and(SCRIPT, reply)?;
    let count = |n: i64| u64::try_from(n).map_err(|_| protocol(SCRIPT, format!("count {n}")));
    match (op, code) {
        (Op::Begin, 1) => Ok(Step::Begun { counter: count(n)? }),
        (Op::Begin, -2) => Ok(Step::Unpersisted { entries: count(n)? }),
        (_, -1) => Ok(Step::Live),
        (Op::Hset | Op::Deny | Op::Finish, 1) => Ok(Step::Done { n: count(n)? }),
        (op, code) => Err(protocol(SCRIPT, format!("{op:?} answered {{{code}, {n}}}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: i64, n: i64) -> Value {
        Value::Array(vec![Value::Int(code), Value::Int(n)])
    }

    #[test]
    fn each_step_has_its_answers() {
        assert_eq!(
            decode(Op::Begin, r(1, 7)).unwrap(),
            Step::Begun { counter: 7 }
        );
        assert_eq!(
            decode(Op::Begin, r(-2, 3)).unwrap(),
            Step::Unpersisted { entries: 3 }
        );
        assert_eq!(decode(Op::Begin, r(-1, 0)).unwrap(), Step::Live);
        assert_eq!(decode(Op::Hset, r(1, 2)).unwrap(), Step::Done { n: 2 });
        assert_eq!(decode(Op::Finish, r(-1, 0)).unwrap(), Step::Live);
        assert!(
            decode(Op::Hset, r(-2, 1)).is_err(),
            "only begin checks the log"
        );
        assert!(decode(Op::Begin, r(1, -1)).is_err());
        assert!(decode(Op::Deny, Value::Int(1)).is_err());
    }
}
