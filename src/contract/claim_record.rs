//! The claim record: the stream entry `lua/claim.lua` appends to its shard's `log` for every
//! coupon it mints, and its reading into a [`ClaimRecord`].
//!
//! | field | value                                                  |
//! |-------|--------------------------------------------------------|
//! | `k`   | record kind: `claimed`                                 |
//! | `c`   | coupon id `<batch>.<shard>.<seq>` ([`crate::domain::ids`]) |
//! | `u`   | user id                                                |
//! | `r`   | request id (`''` = none)                               |
//! | `b`   | batch id                                               |
//! | `s`   | shard index                                            |
//! | `t`   | claimed at, ms                                         |
//! | `vf`  | valid from, ms                                         |
//! | `vt`  | valid to, ms                                           |
//! | `cd`  | optional: the coupon's code (a batch that hands out codes) |
//! | `m`   | optional: `'1'` = the coupon's state lives in Redis (managed); absent = not |
//!
//! Invariant kept here: [`parse`] is the one reader of these fields; a record that is not
//! exactly a claim of the shard whose log holds it is an error naming what is wrong (the
//! persister then keeps it pending, never writes or drops it).

use super::log_read::LogEntry;
use crate::domain::claim::ClaimRecord;
use crate::domain::ids::parse_coupon_id;

/// Record kind of a claim (`k`).
pub const KIND_CLAIMED: &str = "claimed";
/// The fields of a claim record, in the order `claim.lua` writes them.
pub const FIELDS: [&str; 9] = ["k", "c", "u", "r", "b", "s", "t", "vf", "vt"];
/// The field after [`FIELDS`] in the record of a coupon with a code: the code.
pub const CODE: &str = "cd";
/// The last field of the claim record of a managed coupon (after [`CODE`] when present):
/// `'1'`.
pub const MANAGED: &str = "m";

/// Interprets a log entry of shard `shard` of `batch` as a claim record. Anything
/// unexpected is an error naming what is wrong.
pub fn parse(batch: &str, shard: u32, entry: &LogEntry) -> Result<ClaimRecord, String> {
    let field = |f: &str| entry.get(f).ok_or_else(|| format!("missing field {f:?}"));
    let int = |f: &str| -> Result<i64, String> {
        let v = field(f)?;
        v.parse::<i64>()
            .map_err(|_| format!("field {f:?} is not an integer: {v:?}"))
    };
    let kind = field("k")?;
    if kind != KIND_CLAIMED {
        return Err(format!("unknown record kind {kind:?}"));
    }
    let coupon = field("c")?;
    let (cb, cs, seq) =
        parse_coupon_id(coupon).ok_or_else(|| format!("bad coupon id {coupon:?}"))?;
    let b = field("b")?;
    let s = field("s")?;
    if cb != batch || b != batch || s != shard.to_string() || cs != shard {
        return Err(format!(
            "record of batch {b:?} shard {s:?} (coupon {coupon:?}) in the log of {batch}:{shard}"
        ));
    }
    let user = field("u")?;
    if user.is_empty() {
        return Err("empty user id".to_string());
    }
    let rid = field("r")?;
    Ok(ClaimRecord {
        coupon_id: coupon.to_string(),
        batch_id: batch.to_string(),
        shard,
        seq,
        user_id: user.to_string(),
        request_id: (!rid.is_empty()).then(|| rid.to_string()),
        claimed_at: int("t")?,
        valid_from: int("vf")?,
        valid_to: int("vt")?,
        code: match entry.get(CODE) {
            None => None,
            Some("") => return Err("empty code".to_string()),
            Some(c) => Some(c.to_string()),
        },
        managed: match entry.get(MANAGED) {
            None => false,
            Some("1") => true,
            Some(m) => return Err(format!("field \"m\" is not '1': {m:?}")),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: &[(&str, &str)]) -> LogEntry {
        LogEntry {
            id: "1700000000000-0".into(),
            fields: pairs
                .iter()
                .map(|(f, v)| (f.to_string(), v.to_string()))
                .collect(),
        }
    }

    const GOOD: &[(&str, &str)] = &[
        ("k", "claimed"),
        ("c", "b1.2.7"),
        ("u", "u1"),
        ("r", ""),
        ("b", "b1"),
        ("s", "2"),
        ("t", "100"),
        ("vf", "100"),
        ("vt", "200"),
    ];

    #[test]
    fn claim_records_parse() {
        let r = parse("b1", 2, &entry(GOOD)).unwrap();
        assert_eq!(r.coupon_id, "b1.2.7");
        assert_eq!((r.shard, r.seq, r.request_id.as_deref()), (2, 7, None));
        assert_eq!((r.claimed_at, r.valid_from, r.valid_to), (100, 100, 200));
        let names: Vec<&str> = GOOD.iter().map(|(f, _)| *f).collect();
        assert_eq!(names, FIELDS);
        assert_eq!(r.code, None);
        let mut with_code = GOOD.to_vec();
        with_code.push((CODE, "K7"));
        let r = parse("b1", 2, &entry(&with_code)).unwrap();
        assert_eq!(r.code.as_deref(), Some("K7"));
        with_code[9] = (CODE, "");
        assert!(parse("b1", 2, &entry(&with_code)).is_err());
    }

    #[test]
    fn malformed_records_are_rejected() {
        let mut wrong_shard = GOOD.to_vec();
        wrong_shard[5] = ("s", "3");
        let mut bad_time = GOOD.to_vec();
        bad_time[6] = ("t", "soon");
        let mut bad_kind = GOOD.to_vec();
        bad_kind[0] = ("k", "other");
        for e in [&GOOD[1..], &wrong_shard[..], &bad_time[..], &bad_kind[..]] {
            assert!(parse("b1", 2, &entry(e)).is_err(), "{e:?}");
        }
        assert!(parse("b2", 2, &entry(GOOD)).is_err());
    }

    /// The fields `lua/claim.lua` writes are the ones read here, in the same order: with
    /// the code (its first XADD), and without (its second).
    #[test]
    fn the_script_writes_these_fields() {
        let src = crate::backend::Script::Claim.source();
        let written = |nth: usize| -> Vec<&str> {
            let xadd = src
                .split("call('XADD'")
                .nth(nth)
                .and_then(|rest| rest.split(')').next())
                .expect("claim.lua appends its record with XADD");
            xadd.split(',')
                .map(str::trim)
                .filter_map(|t| t.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')))
                .filter(|t| *t != "*" && *t != KIND_CLAIMED)
                .collect()
        };
        let mut with_code = FIELDS.to_vec();
        with_code.push(CODE);
        assert_eq!(written(1), with_code);
        assert_eq!(written(2), FIELDS);
        assert_eq!(src.matches("call('XADD'").count(), 2);
    }
}
