//! The shard log's records: the stream entry `lua/claim.lua` appends to its shard's `log`
//! for every call that mints coupons (a claims record: every coupon of the call), and those
//! a coupon-state script appends for every transition of a coupon whose state lives in
//! Redis (change records); their reading into [`LogRecord`]s, and the writing of a change
//! record's fields ([`change_fields`]).
//!
//! Claims record (`k` = `claims`), one per claim call with successes, in this order:
//!
//! | field | value                                                  |
//! |-------|--------------------------------------------------------|
//! | `k`   | record kind: `claims`                                  |
//! | `b`   | batch id                                               |
//! | `s`   | shard index                                            |
//! | `q`   | sequence of the first coupon; coupon `j` (from 0) has `q + j` ([`crate::domain::ids`]) |
//! | `t`   | claimed at, ms (every coupon of the call)              |
//! | `vf`  | valid from, ms                                         |
//! | `vt`  | valid to, ms                                           |
//! | `u`   | the users, in sequence order, joined by `\|` (at least one; user ids never hold `\|`) |
//! | `r`   | their request ids, as many, joined by `\|` (`''` = none) |
//! | `cd`  | optional: their codes, as many, joined by `\|` (a batch that hands out codes) |
//! | `m`   | optional: `'1'` = the coupons' states live in Redis (managed); absent = not |
//!
//! One entry per call, not per coupon: a call of 32 claims costs Redis one `XADD` and one
//! stream entry, and the persister one entry to read and ack.
//!
//! Claim record (`k` = `claimed`), one per coupon: the format before claims records, still
//! read (a log written by an earlier version drains after an upgrade), in this order:
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
//! Change record (`k` = `changed`), in this order:
//!
//! | field | value                                                  |
//! |-------|--------------------------------------------------------|
//! | `k`   | record kind: `changed`                                 |
//! | `c`   | coupon id `<batch>.<shard>.<seq>`                      |
//! | `b`   | batch id                                               |
//! | `s`   | shard index                                            |
//! | `v`   | the coupon row version the change creates (>= 1)       |
//! | `st`  | state after: `unused`, `locked`, `used` or `expired`   |
//! | `o`   | order id (`''` = none)                                 |
//! | `sp`  | order step (`''` = none; `locked`, `released`, `redeemed`, `refunded`) |
//! | `lu`  | lock deadline, ms (`''` = none)                        |
//! | `at`  | when the change was decided, ms                        |
//! | `e`   | the events, in order: `;`-joined `<kind>,<order>,<cause>` (kind: not `claimed`; order `''` = none; cause `''` or `lock_timeout`); at least one |
//!
//! (`st`, `o`, `sp`, `lu` are [`Stored::columns`], read back by [`Stored::from_columns`].)
//!
//! Invariant kept here: [`parse`] is the one reader of these fields and [`change_fields`]
//! the one writer of a change record's; a record that is not exactly a claim or a change of
//! a coupon of the shard whose log holds it is an error naming what is wrong (the persister
//! then keeps it pending, never writes or drops it); a change record parses back to the
//! [`ChangeRecord`] it was written from.

use super::log_read::LogEntry;
use crate::domain::claim::{ChangeRecord, ClaimRecord};
use crate::domain::coupon::{CAUSE_LOCK_TIMEOUT, Event, EventKind, Step, Stored};
use crate::domain::ids::{coupon_id, parse_coupon_id, seq_epoch, seq_position, valid_ident};

/// Record kind of a claim (`k`): one coupon (the earlier format, still read).
pub const KIND_CLAIMED: &str = "claimed";
/// Record kind of the claims of one claim call (`k`): every coupon the call minted.
pub const KIND_CLAIMS: &str = "claims";
/// The fields of a claims record, in the order `claim.lua` writes them.
pub const CLAIMS_FIELDS: [&str; 9] = ["k", "b", "s", "q", "t", "vf", "vt", "u", "r"];
/// Most coupons one claims record holds (`lua/claim.lua`'s most claims per call).
pub const MAX_CLAIMS_PER_RECORD: usize = super::claim::MAX_CLAIMS_PER_CALL;
/// Record kind of a change of a managed coupon (`k`).
pub const KIND_CHANGED: &str = "changed";
/// The fields of a claim record, in the order `claim.lua` writes them.
pub const FIELDS: [&str; 9] = ["k", "c", "u", "r", "b", "s", "t", "vf", "vt"];
/// The field after [`FIELDS`] in the record of a coupon with a code: the code.
pub const CODE: &str = "cd";
/// The last field of the claim record of a managed coupon (after [`CODE`] when present):
/// `'1'`.
pub const MANAGED: &str = "m";
/// The fields of a change record, in the order [`change_fields`] gives them.
pub const CHANGE_FIELDS: [&str; 11] = ["k", "c", "b", "s", "v", "st", "o", "sp", "lu", "at", "e"];

/// A record of a shard's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRecord {
    /// A coupon minted (`k` = `claimed`).
    Claimed(ClaimRecord),
    /// A transition of a managed coupon (`k` = `changed`).
    Changed(ChangeRecord),
}

impl LogRecord {
    /// The coupon the record is about.
    pub fn coupon_id(&self) -> &str {
        match self {
            LogRecord::Claimed(c) => &c.coupon_id,
            LogRecord::Changed(c) => &c.coupon_id,
        }
    }
}

/// Interprets a log entry of shard `shard` of `batch`: the claims of a claims record, in
/// sequence order, or the one claim or change of a claim or change record. Anything
/// unexpected is an error naming what is wrong (and nothing of the entry is taken).
pub fn parse(batch: &str, shard: u32, entry: &LogEntry) -> Result<Vec<LogRecord>, String> {
    match entry.get("k") {
        None => Err("missing field \"k\"".to_string()),
        Some(KIND_CLAIMS) => Ok(parse_claims(batch, shard, entry)?
            .into_iter()
            .map(LogRecord::Claimed)
            .collect()),
        Some(KIND_CLAIMED) => Ok(vec![LogRecord::Claimed(parse_claim(batch, shard, entry)?)]),
        Some(KIND_CHANGED) => Ok(vec![LogRecord::Changed(parse_change(batch, shard, entry)?)]),
        Some(kind) => Err(format!("unknown record kind {kind:?}")),
    }
}

fn field<'a>(entry: &'a LogEntry, f: &str) -> Result<&'a str, String> {
    entry.get(f).ok_or_else(|| format!("missing field {f:?}"))
}

fn int(entry: &LogEntry, f: &str) -> Result<i64, String> {
    let v = field(entry, f)?;
    v.parse::<i64>()
        .map_err(|_| format!("field {f:?} is not an integer: {v:?}"))
}

/// The batch and shard fields (`b`, `s`), checked against the log's batch and shard.
fn in_log(batch: &str, shard: u32, entry: &LogEntry) -> Result<(), String> {
    let (b, s) = (field(entry, "b")?, field(entry, "s")?);
    if b != batch || s != shard.to_string() {
        return Err(format!(
            "record of batch {b:?} shard {s:?} in the log of {batch}:{shard}"
        ));
    }
    Ok(())
}

/// The coupon id, batch and shard fields (`c`, `b`, `s`), checked against the log's batch
/// and shard. Returns the coupon id and its sequence.
fn coupon_of<'a>(batch: &str, shard: u32, entry: &'a LogEntry) -> Result<(&'a str, u64), String> {
    let coupon = field(entry, "c")?;
    let (cb, cs, seq) =
        parse_coupon_id(coupon).ok_or_else(|| format!("bad coupon id {coupon:?}"))?;
    in_log(batch, shard, entry)?;
    if cb != batch || cs != shard {
        return Err(format!("coupon {coupon:?} in the log of {batch}:{shard}"));
    }
    Ok((coupon, seq))
}

/// A claims record: `k` coupons, sequences `q .. q + k` of one epoch.
fn parse_claims(batch: &str, shard: u32, entry: &LogEntry) -> Result<Vec<ClaimRecord>, String> {
    in_log(batch, shard, entry)?;
    let q = field(entry, "q")?;
    let first: u64 = q
        .parse()
        .map_err(|_| format!("field \"q\" is not a sequence: {q:?}"))?;
    let users: Vec<&str> = field(entry, "u")?.split('|').collect();
    let k = users.len();
    if k > MAX_CLAIMS_PER_RECORD {
        return Err(format!("{k} claims (at most {MAX_CLAIMS_PER_RECORD})"));
    }
    if users.iter().any(|u| u.is_empty()) {
        return Err("empty user id".to_string());
    }
    let last = first + k as u64 - 1;
    if seq_position(first) == 0 || seq_epoch(first) != seq_epoch(last) {
        return Err(format!("sequences {first}..={last} are not of one epoch"));
    }
    let column = |f: &str| -> Result<Vec<&str>, String> {
        let v: Vec<&str> = field(entry, f)?.split('|').collect();
        if v.len() != k {
            return Err(format!(
                "field {f:?} holds {} values for {k} users",
                v.len()
            ));
        }
        Ok(v)
    };
    let rids = column("r")?;
    let codes = match entry.get(CODE) {
        None => None,
        Some(_) => {
            let c = column(CODE)?;
            if c.iter().any(|c| c.is_empty()) {
                return Err("empty code".to_string());
            }
            Some(c)
        }
    };
    let managed = managed_flag(entry)?;
    let (claimed_at, valid_from, valid_to) =
        (int(entry, "t")?, int(entry, "vf")?, int(entry, "vt")?);
    Ok((0..k)
        .map(|j| {
            let seq = first + j as u64;
            ClaimRecord {
                coupon_id: coupon_id(batch, shard, seq),
                batch_id: batch.to_string(),
                shard,
                seq,
                user_id: users[j].to_string(),
                request_id: (!rids[j].is_empty()).then(|| rids[j].to_string()),
                claimed_at,
                valid_from,
                valid_to,
                code: codes.as_ref().map(|c| c[j].to_string()),
                managed,
            }
        })
        .collect())
}

/// The managed flag `m`: `'1'` or absent.
fn managed_flag(entry: &LogEntry) -> Result<bool, String> {
    match entry.get(MANAGED) {
        None => Ok(false),
        Some("1") => Ok(true),
        Some(m) => Err(format!("field \"m\" is not '1': {m:?}")),
    }
}

fn parse_claim(batch: &str, shard: u32, entry: &LogEntry) -> Result<ClaimRecord, String> {
    let (coupon, seq) = coupon_of(batch, shard, entry)?;
    let user = field(entry, "u")?;
    if user.is_empty() {
        return Err("empty user id".to_string());
    }
    let rid = field(entry, "r")?;
    Ok(ClaimRecord {
        coupon_id: coupon.to_string(),
        batch_id: batch.to_string(),
        shard,
        seq,
        user_id: user.to_string(),
        request_id: (!rid.is_empty()).then(|| rid.to_string()),
        claimed_at: int(entry, "t")?,
        valid_from: int(entry, "vf")?,
        valid_to: int(entry, "vt")?,
        code: match entry.get(CODE) {
            None => None,
            Some("") => return Err("empty code".to_string()),
            Some(c) => Some(c.to_string()),
        },
        managed: managed_flag(entry)?,
    })
}

fn parse_change(batch: &str, shard: u32, entry: &LogEntry) -> Result<ChangeRecord, String> {
    let (coupon, seq) = coupon_of(batch, shard, entry)?;
    let version = int(entry, "v")?;
    if version < 1 {
        return Err(format!(
            "version {version} (a change creates version 1 or later)"
        ));
    }
    let state = field(entry, "st")?;
    let order = field(entry, "o")?;
    if !order.is_empty() && !valid_ident(order) {
        return Err(format!("bad order id {order:?}"));
    }
    let step = field(entry, "sp")?;
    let until = field(entry, "lu")?;
    let until = match until {
        "" => None,
        u => Some(
            u.parse::<i64>()
                .map_err(|_| format!("field \"lu\" is not an integer: {u:?}"))?,
        ),
    };
    let next = Stored::from_columns(
        state,
        (!order.is_empty()).then(|| order.to_string()),
        (!step.is_empty()).then_some(step),
        until,
    )
    .map_err(|e| format!("bad state after: {e}"))?;
    // Exactly the columns of a state: no step or deadline left implicit or extra.
    let (_, o, sp, lu) = next.columns();
    if (o.unwrap_or(""), sp.map(Step::as_str).unwrap_or(""), lu) != (order, step, until) {
        return Err(format!(
            "state after {state:?} with order {order:?}, step {step:?} and lock deadline \
             {until:?} is not a stored state's columns"
        ));
    }
    let at = int(entry, "at")?;
    let events = parse_events(field(entry, "e")?)?;
    Ok(ChangeRecord {
        coupon_id: coupon.to_string(),
        batch_id: batch.to_string(),
        shard,
        seq,
        version,
        next,
        events,
        at,
    })
}

/// `<kind>,<order>,<cause>` joined by `;`: at least one.
fn parse_events(list: &str) -> Result<Vec<Event>, String> {
    if list.is_empty() {
        return Err("no events".to_string());
    }
    list.split(';')
        .map(|one| {
            let parts: Vec<&str> = one.split(',').collect();
            let [kind, order, cause] = parts[..] else {
                return Err(format!("event {one:?} is not <kind>,<order>,<cause>"));
            };
            let kind = match EventKind::parse(kind) {
                Some(EventKind::Claimed) | None => {
                    return Err(format!("event {one:?}: kind {kind:?}"));
                }
                Some(k) => k,
            };
            if !order.is_empty() && !valid_ident(order) {
                return Err(format!("event {one:?}: bad order id {order:?}"));
            }
            let cause = match cause {
                "" => None,
                CAUSE_LOCK_TIMEOUT => Some(CAUSE_LOCK_TIMEOUT),
                other => return Err(format!("event {one:?}: cause {other:?}")),
            };
            Ok(Event {
                kind,
                order: (!order.is_empty()).then(|| order.to_string()),
                cause,
            })
        })
        .collect()
}

/// The fields of `c`'s change record, in the order of [`CHANGE_FIELDS`] (`k` first): the
/// field/value pairs the caller of the coupon-state script passes to its `XADD`.
pub fn change_fields(c: &ChangeRecord) -> Vec<(&'static str, String)> {
    let (state, order, step, until) = c.next.columns();
    let events: Vec<String> = c
        .events
        .iter()
        .map(|e| {
            format!(
                "{},{},{}",
                e.kind.as_str(),
                e.order.as_deref().unwrap_or(""),
                e.cause.unwrap_or("")
            )
        })
        .collect();
    let values = [
        KIND_CHANGED.to_string(),
        c.coupon_id.clone(),
        c.batch_id.clone(),
        c.shard.to_string(),
        c.version.to_string(),
        state.as_str().to_string(),
        order.unwrap_or("").to_string(),
        step.map(Step::as_str).unwrap_or("").to_string(),
        until.map(|u| u.to_string()).unwrap_or_default(),
        c.at.to_string(),
        events.join(";"),
    ];
    CHANGE_FIELDS.into_iter().zip(values).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::coupon::Ended;

    fn entry(pairs: &[(&str, &str)]) -> LogEntry {
        LogEntry {
            id: "1700000000000-0".into(),
            fields: pairs
                .iter()
                .map(|(f, v)| (f.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn claim(pairs: &[(&str, &str)]) -> Result<ClaimRecord, String> {
        match &parse("b1", 2, &entry(pairs))?[..] {
            [LogRecord::Claimed(c)] => Ok(c.clone()),
            other => panic!("not one claim: {other:?}"),
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
        let r = claim(GOOD).unwrap();
        assert_eq!(r.coupon_id, "b1.2.7");
        assert_eq!((r.shard, r.seq, r.request_id.as_deref()), (2, 7, None));
        assert_eq!((r.claimed_at, r.valid_from, r.valid_to), (100, 100, 200));
        let names: Vec<&str> = GOOD.iter().map(|(f, _)| *f).collect();
        assert_eq!(names, FIELDS);
        assert_eq!((r.code, r.managed), (None, false));
        let mut with_code = GOOD.to_vec();
        with_code.push((CODE, "K7"));
        let r = claim(&with_code).unwrap();
        assert_eq!((r.code.as_deref(), r.managed), (Some("K7"), false));
        with_code[9] = (CODE, "");
        assert!(parse("b1", 2, &entry(&with_code)).is_err());
    }

    #[test]
    fn the_managed_flag_is_the_last_claim_field() {
        let mut managed = GOOD.to_vec();
        managed.push((MANAGED, "1"));
        let r = claim(&managed).unwrap();
        assert_eq!((r.code, r.managed), (None, true));
        let mut with_code = GOOD.to_vec();
        with_code.extend([(CODE, "K7"), (MANAGED, "1")]);
        let r = claim(&with_code).unwrap();
        assert_eq!((r.code.as_deref(), r.managed), (Some("K7"), true));
        for bad in ["", "0", "true", "11"] {
            let mut e = GOOD.to_vec();
            e.push((MANAGED, bad));
            let err = parse("b1", 2, &entry(&e)).unwrap_err();
            assert!(err.contains("\"m\""), "{bad:?}: {err}");
        }
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

    fn change(version: i64, next: Stored, events: Vec<Event>) -> ChangeRecord {
        ChangeRecord {
            coupon_id: "b1.2.7".into(),
            batch_id: "b1".into(),
            shard: 2,
            seq: 7,
            version,
            next,
            events,
            at: 1_700,
        }
    }

    fn ev(kind: EventKind, order: Option<&str>, cause: Option<&'static str>) -> Event {
        Event {
            kind,
            order: order.map(Into::into),
            cause,
        }
    }

    /// Every stored state and every event kind a change can carry, causes included.
    fn changes() -> Vec<ChangeRecord> {
        let released = |o: &str| Ended {
            order: o.into(),
            refunded: false,
        };
        vec![
            change(
                1,
                Stored::Locked {
                    order: "o1".into(),
                    until: 2_000,
                },
                vec![ev(EventKind::Locked, Some("o1"), None)],
            ),
            change(
                2,
                Stored::Used { order: "o1".into() },
                vec![ev(EventKind::Redeemed, Some("o1"), None)],
            ),
            change(
                3,
                Stored::Unused {
                    last: Some(Ended {
                        order: "o1".into(),
                        refunded: true,
                    }),
                },
                vec![ev(EventKind::Refunded, Some("o1"), None)],
            ),
            change(
                4,
                Stored::Locked {
                    order: "o-2@x".into(),
                    until: 3_000,
                },
                vec![
                    ev(EventKind::Released, Some("o1"), Some(CAUSE_LOCK_TIMEOUT)),
                    ev(EventKind::Locked, Some("o-2@x"), None),
                ],
            ),
            change(
                5,
                Stored::Expired {
                    last: Some(released("o-2@x")),
                },
                vec![
                    ev(EventKind::Released, Some("o-2@x"), Some(CAUSE_LOCK_TIMEOUT)),
                    ev(EventKind::Expired, None, None),
                ],
            ),
            change(
                1,
                Stored::Expired { last: None },
                vec![ev(EventKind::Expired, None, None)],
            ),
            change(
                9,
                Stored::Unused {
                    last: Some(released("o3")),
                },
                vec![ev(EventKind::Released, Some("o3"), None)],
            ),
        ]
    }

    fn pairs(c: &ChangeRecord) -> Vec<(&'static str, String)> {
        change_fields(c)
    }

    fn as_entry(fields: &[(&'static str, String)]) -> LogEntry {
        let refs: Vec<(&str, &str)> = fields.iter().map(|(f, v)| (*f, v.as_str())).collect();
        entry(&refs)
    }

    #[test]
    fn change_records_round_trip() {
        for c in changes() {
            let fields = pairs(&c);
            let names: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
            assert_eq!(names, CHANGE_FIELDS);
            assert_eq!(
                parse("b1", 2, &as_entry(&fields)),
                Ok(vec![LogRecord::Changed(c.clone())]),
                "{fields:?}"
            );
        }
        // the text, exactly
        let fields = pairs(&changes()[3]);
        let values: Vec<&str> = fields.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(
            values,
            [
                "changed",
                "b1.2.7",
                "b1",
                "2",
                "4",
                "locked",
                "o-2@x",
                "locked",
                "3000",
                "1700",
                "released,o1,lock_timeout;locked,o-2@x,"
            ]
        );
        let fields = pairs(&changes()[5]);
        let values: Vec<&str> = fields.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(values[5..], ["expired", "", "", "", "1700", "expired,,"]);
    }

    /// Each malformed change record is refused with an error naming what is wrong.
    #[test]
    fn malformed_change_records_are_rejected() {
        let good = pairs(&changes()[3]);
        let with = |f: &str, v: &str| -> Vec<(&'static str, String)> {
            good.iter()
                .map(|(k, old)| (*k, if *k == f { v.to_string() } else { old.clone() }))
                .collect()
        };
        let without = |f: &str| -> Vec<(&'static str, String)> {
            good.iter().filter(|(k, _)| *k != f).cloned().collect()
        };
        let cases: Vec<(Vec<(&'static str, String)>, &str)> = vec![
            (with("k", "change"), "record kind"),
            (with("c", "b1.2"), "coupon id"),
            (with("c", "b1.3.7"), "in the log of b1:2"),
            (with("b", "b2"), "in the log of b1:2"),
            (with("s", "3"), "in the log of b1:2"),
            (without("v"), "\"v\""),
            (with("v", "0"), "version 0"),
            (with("v", "-1"), "version -1"),
            (with("v", "x"), "\"v\" is not an integer"),
            (with("st", "gone"), "state \"gone\""),
            (with("o", ""), "locked with order None"),
            (with("o", "o,1"), "bad order id"),
            (with("sp", "redeemed"), "step"),
            (with("sp", "bogus"), "order step \"bogus\""),
            (with("sp", ""), "not a stored state's columns"),
            (with("lu", ""), "not a stored state's columns"),
            (with("lu", "soon"), "\"lu\" is not an integer"),
            (with("at", ""), "\"at\" is not an integer"),
            (without("at"), "missing field \"at\""),
            (without("e"), "missing field \"e\""),
            (with("e", ""), "no events"),
            (with("e", "locked,o1"), "is not <kind>,<order>,<cause>"),
            (with("e", "locked,o1,,x"), "is not <kind>,<order>,<cause>"),
            (with("e", "claimed,,"), "kind \"claimed\""),
            (with("e", "bogus,o1,"), "kind \"bogus\""),
            (with("e", "released,o1,late"), "cause \"late\""),
            (with("e", "locked,o 1,"), "bad order id"),
            (with("e", "locked,o1,;"), "is not <kind>,<order>,<cause>"),
        ];
        for (fields, want) in cases {
            let err = parse("b1", 2, &as_entry(&fields)).unwrap_err();
            assert!(
                err.contains(want),
                "{fields:?}: {err:?} should name {want:?}"
            );
        }
        // a deadline for a coupon that is not locked, a step the state does not take
        let mut c = changes()[1].clone();
        let mut fields = pairs(&c);
        fields[8].1 = "5".into();
        let err = parse("b1", 2, &as_entry(&fields)).unwrap_err();
        assert!(err.contains("not a stored state's columns"), "{err}");
        c.next = Stored::Unused { last: None };
        let mut fields = pairs(&c);
        fields[7].1 = "released".into();
        assert!(parse("b1", 2, &as_entry(&fields)).is_err());
    }

    /// The fields `lua/claim.lua` writes are the ones read here, in the same order: its one
    /// `XADD` writes the entry it builds, [`CLAIMS_FIELDS`], then the codes when the batch
    /// hands out codes, then the managed flag when the coupons are managed.
    #[test]
    fn the_script_writes_these_fields() {
        let src = crate::backend::Script::Claim.source();
        assert_eq!(src.matches("call('XADD'").count(), 1, "one XADD per call");
        assert!(src.contains("call('XADD', KEYS[6], '*', unpack(entry))"));
        let (_, rest) = src
            .split_once("local entry = {")
            .expect("claim.lua builds its log entry");
        let literal = rest.split('}').next().unwrap();
        let names: Vec<&str> = literal
            .split(',')
            .map(str::trim)
            .step_by(2)
            .map(|t| t.trim_matches('\''))
            .collect();
        assert_eq!(names, CLAIMS_FIELDS, "{literal}");
        let code_at = src
            .find("entry[#entry + 1] = 'cd'")
            .expect("the codes field");
        let managed_at = src
            .find("entry[#entry + 1] = 'm'")
            .expect("the managed field");
        assert!(code_at < managed_at, "codes, then the managed flag");
    }

    fn claims(pairs: &[(&str, &str)]) -> Result<Vec<ClaimRecord>, String> {
        parse("b1", 2, &entry(pairs))?
            .into_iter()
            .map(|r| match r {
                LogRecord::Claimed(c) => Ok(c),
                other => Err(format!("not a claim: {other:?}")),
            })
            .collect()
    }

    const CALL: &[(&str, &str)] = &[
        ("k", "claims"),
        ("b", "b1"),
        ("s", "2"),
        ("q", "3000000000007"),
        ("t", "100"),
        ("vf", "100"),
        ("vt", "200"),
        ("u", "u1|u2|u1"),
        ("r", "r1||~abc"),
    ];

    #[test]
    fn a_claims_record_holds_every_coupon_of_its_call() {
        let names: Vec<&str> = CALL.iter().map(|(f, _)| *f).collect();
        assert_eq!(names, CLAIMS_FIELDS);
        let got = claims(CALL).unwrap();
        let ids: Vec<&str> = got.iter().map(|c| c.coupon_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "b1.2.3000000000007",
                "b1.2.3000000000008",
                "b1.2.3000000000009"
            ]
        );
        let users: Vec<&str> = got.iter().map(|c| c.user_id.as_str()).collect();
        assert_eq!(users, ["u1", "u2", "u1"]);
        let rids: Vec<Option<&str>> = got.iter().map(|c| c.request_id.as_deref()).collect();
        assert_eq!(rids, [Some("r1"), None, Some("~abc")]);
        for c in &got {
            assert_eq!((c.batch_id.as_str(), c.shard), ("b1", 2));
            assert_eq!((c.claimed_at, c.valid_from, c.valid_to), (100, 100, 200));
            assert_eq!((c.code.as_deref(), c.managed), (None, false));
            assert_eq!(parse_coupon_id(&c.coupon_id), Some(("b1", 2, c.seq)));
        }
        let mut more = CALL.to_vec();
        more.extend([(CODE, "K7|K8|K9"), (MANAGED, "1")]);
        let got = claims(&more).unwrap();
        let codes: Vec<Option<&str>> = got.iter().map(|c| c.code.as_deref()).collect();
        assert_eq!(codes, [Some("K7"), Some("K8"), Some("K9")]);
        assert!(got.iter().all(|c| c.managed));
        let one = [("u", "solo"), ("r", "")];
        let mut single = CALL.to_vec();
        single.retain(|(f, _)| *f != "u" && *f != "r");
        single.extend(one);
        assert_eq!(claims(&single).unwrap().len(), 1);
    }

    /// Each malformed claims record is refused whole, with an error naming what is wrong.
    #[test]
    fn malformed_claims_records_are_rejected() {
        // CALL with field `f` set to `v` (added at the end when CALL has no `f`)
        let with = |f: &'static str, v: &str| -> Vec<(&'static str, String)> {
            let mut e: Vec<(&'static str, String)> = CALL
                .iter()
                .filter(|(k, _)| *k != f)
                .map(|(k, v)| (*k, v.to_string()))
                .collect();
            e.push((f, v.to_string()));
            e
        };
        let too_many = vec!["u"; MAX_CLAIMS_PER_RECORD + 1].join("|");
        let cases: Vec<(Vec<(&'static str, String)>, &str)> = vec![
            (with("b", "b2"), "in the log of b1:2"),
            (with("s", "3"), "in the log of b1:2"),
            (with("q", "x"), "\"q\" is not a sequence"),
            (with("q", "-1"), "\"q\" is not a sequence"),
            (with("q", "3000000000000"), "not of one epoch"),
            (with("q", "3999999999999"), "not of one epoch"),
            (with("u", "u1||u2"), "empty user id"),
            (with("u", "u1|u2"), "\"r\" holds 3 values for 2 users"),
            (with("r", "r1"), "\"r\" holds 1 values for 3 users"),
            (with("t", "soon"), "\"t\" is not an integer"),
            (with("cd", "K1|K2"), "\"cd\" holds 2 values"),
            (with("cd", "K1||K3"), "empty code"),
            (with("m", "0"), "\"m\""),
            (with("u", &too_many), "claims (at most"),
        ];
        for (fields, want) in cases {
            let refs: Vec<(&str, &str)> = fields.iter().map(|(f, v)| (*f, v.as_str())).collect();
            let err = claims(&refs).unwrap_err();
            assert!(
                err.contains(want),
                "{fields:?}: {err:?} should name {want:?}"
            );
        }
        let mut no_users = CALL.to_vec();
        no_users.retain(|(f, _)| *f != "u");
        assert!(
            claims(&no_users)
                .unwrap_err()
                .contains("missing field \"u\"")
        );
    }
}
