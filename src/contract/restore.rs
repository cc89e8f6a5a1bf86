//! `lua/restore.lua`: rebuilds one slot from the database in steps (`fence` when the slot is
//! repaired while its batch lives, `begin`, `hset` / `deny` chunks, `finish`), the slot's
//! meta written last so it goes live only complete.
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
    /// `begin`: the slot was cleared; its claim counter is `counter`, and it held `stock`
    /// (deleted).
    Begun { counter: u64, stock: u64 },
    /// `fence`: the repair lock is ours and the slot's meta is gone (claims refused).
    Fenced,
    /// `fence`: another repairer holds the lock; nothing written.
    Held,
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
    Fence,
    Seal,
    Begin,
    Hset,
    Deny,
    Codes,
    Finish,
}

/// KEYS, in the script's order.
pub fn keys(s: &SlotKeys) -> [&str; 15] {
    [
        &s.meta, &s.stock, &s.users, &s.daily, &s.req, &s.deny, &s.claimed, &s.xseq, &s.outbox,
        &s.log, &s.repair, &s.codes, &s.xcodes, &s.coupons, &s.req2,
    ]
}

/// `fence`: takes the slot's repair lock for `repairer` (unless another holds it) for
/// `lock_ms`, and deletes the slot's meta: every gateway refuses its claims from now on.
pub async fn fence<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    repairer: &str,
    lock_ms: u64,
) -> Result<Step, BackendError> {
    let lock_ms = lock_ms.to_string();
    run(backend, slot, Op::Fence, &["fence", repairer, &lock_ms]).await
}

/// `seal`: deletes the slot's meta (every claim and replay on it refused), nothing else.
pub async fn seal<B: Backend>(backend: &B, slot: &SlotKeys) -> Result<Step, BackendError> {
    run(backend, slot, Op::Seal, &["seal"]).await
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

/// `codes`: appends `codes` (non-empty, at most [`CHUNK`]) to the slot's code queue.
pub async fn codes<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    codes: &[String],
) -> Result<Step, BackendError> {
    let joined = codes.join(",");
    run(backend, slot, Op::Codes, &["codes", &joined]).await
}

/// `finish`: adds `stock` to the slot's stock, raises the claim counter to `counter_floor` (never lowers it),
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
    if op == Op::Begin {
        // { 1, counter, stock } or a two-item refusal
        if let Value::Array(items) = &reply
            && items.len() == 3
        {
            let code = reply::int(SCRIPT, &items[0])?;
            if code != 1 {
                return Err(protocol(
                    SCRIPT,
                    format!("begin answered code {code} with 3 items"),
                ));
            }
            return Ok(Step::Begun {
                counter: reply::count(SCRIPT, &items[1])?,
                stock: reply::count(SCRIPT, &items[2])?,
            });
        }
    }
    let (code, n) = reply::code_and(SCRIPT, reply)?;
    let count = |n: i64| u64::try_from(n).map_err(|_| protocol(SCRIPT, format!("count {n}")));
    match (op, code) {
        (Op::Fence | Op::Seal, 1) => Ok(Step::Fenced),
        (Op::Fence, 0) => Ok(Step::Held),
        (Op::Begin, 1) => Err(protocol(SCRIPT, "begin names the stock it deleted")),
        (Op::Begin, -2) => Ok(Step::Unpersisted { entries: count(n)? }),
        (_, -1) => Ok(Step::Live),
        (Op::Hset | Op::Deny | Op::Codes | Op::Finish, 1) => Ok(Step::Done { n: count(n)? }),
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
        let begun = Value::Array(vec![Value::Int(1), Value::Int(7), Value::Int(3)]);
        assert_eq!(
            decode(Op::Begin, begun).unwrap(),
            Step::Begun {
                counter: 7,
                stock: 3
            }
        );
        assert!(decode(Op::Begin, r(1, 7)).is_err(), "begin names the stock");
        assert_eq!(decode(Op::Fence, r(1, 0)).unwrap(), Step::Fenced);
        assert_eq!(decode(Op::Fence, r(0, 0)).unwrap(), Step::Held);
        assert_eq!(
            decode(Op::Begin, r(-2, 3)).unwrap(),
            Step::Unpersisted { entries: 3 }
        );
        assert_eq!(decode(Op::Begin, r(-1, 0)).unwrap(), Step::Live);
        assert_eq!(decode(Op::Hset, r(1, 2)).unwrap(), Step::Done { n: 2 });
        assert_eq!(decode(Op::Codes, r(1, 9)).unwrap(), Step::Done { n: 9 });
        assert_eq!(decode(Op::Codes, r(-1, 0)).unwrap(), Step::Live);
        assert_eq!(decode(Op::Finish, r(-1, 0)).unwrap(), Step::Live);
        assert!(
            decode(Op::Hset, r(-2, 1)).is_err(),
            "only begin checks the log"
        );
        assert!(decode(Op::Begin, r(1, -1)).is_err());
        assert!(decode(Op::Deny, Value::Int(1)).is_err());
    }
}
