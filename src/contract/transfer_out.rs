//! `lua/transfer_out.lua`: the first half of a stock transfer; takes stock out of the source
//! slot into its outbox. Idempotent per transfer id.
//!
//! Invariant kept here: the outbox entry names its destination by slot label
//! ([`super::keys::slot_label`]), which [`super::probe`] reads back; the reply is the amount
//! moved (0 = nothing to move), never negative, and in a batch with codes exactly that many
//! codes ([`Moved`]), which the destination must receive with the stock.

use super::keys::SlotKeys;
use super::reply;
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::TransferOut;

/// KEYS, in the script's order (the source slot's).
pub fn keys(src: &SlotKeys) -> [&str; 6] {
    [
        &src.stock,
        &src.outbox,
        &src.xseq,
        &src.meta,
        &src.codes,
        &src.xcodes,
    ]
}

/// What left the source: `amount` of stock and, in a batch with codes, exactly that many
/// codes joined by ',' (`codes` is `''` otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moved {
    pub amount: i64,
    pub codes: String,
}

/// Takes up to `max` (at most half of the source's stock, rounded up, with `at_most_half`)
/// out of `src` for `dst` under transfer id `tid`. Returns what moved out (0 also when
/// `src` has no meta: a lost or fenced slot gives nothing). Called again with the same
/// `tid`, it writes nothing and returns what the first call moved (the sweeper learns an
/// interrupted transfer's codes so).
pub async fn call<B: Backend>(
    backend: &B,
    src: &SlotKeys,
    dst: &SlotKeys,
    tid: &str,
    max: i64,
    at_most_half: bool,
) -> Result<Moved, BackendError> {
    let max = max.to_string();
    let half = if at_most_half { "1" } else { "0" };
    let args = [tid, max.as_str(), dst.label.as_str(), half];
    decode(backend.eval(SCRIPT, &keys(src), &args).await?)
}

/// What transfer `tid` out of `src` moved, if its outbox entry is still open (read only:
/// takes nothing). `amount` 0: the transfer is closed (or never was).
pub async fn lookup<B: Backend>(
    backend: &B,
    src: &SlotKeys,
    tid: &str,
) -> Result<Moved, BackendError> {
    decode(
        backend
            .eval(SCRIPT, &keys(src), &[tid, "0", "", "0"])
            .await?,
    )
}

/// The one decoder of `transfer_out.lua`'s reply: `{ amount, codes }`.
pub fn decode(reply: Value) -> Result<Moved, BackendError> {
    let items = reply::array(SCRIPT, reply)?;
    let [amount, codes] = items.as_slice() else {
        return Err(reply::protocol(SCRIPT, "expected { amount, codes }"));
    };
    let amount = reply::count(SCRIPT, amount)? as i64;
    let codes = reply::string(SCRIPT, codes)?;
    if !codes.is_empty() && codes.split(',').count() as i64 != amount {
        return Err(reply::protocol(
            SCRIPT,
            format!("{amount} stock moved with another number of codes"),
        ));
    }
    Ok(Moved { amount, codes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::reply::bulk;

    #[test]
    fn decodes_amount_and_codes() {
        let r = |n: i64, c: &str| Value::Array(vec![Value::Int(n), bulk(c)]);
        assert_eq!(decode(r(0, "")).unwrap(), Moved::default());
        assert_eq!(decode(r(3, "")).unwrap().amount, 3);
        assert_eq!(decode(r(2, "A,B")).unwrap().codes, "A,B");
        assert!(decode(r(3, "A,B")).is_err());
        assert!(decode(r(-1, "")).is_err());
        assert!(decode(Value::Int(3)).is_err());
    }
}
