//! Invariant checker: after a run, compares what the gateway answered (the claim history)
//! with what it reports through the admin API (and, in `db.rs`, what it persisted):
//! never oversold, sold out when demand exceeded stock, nobody above the per-user limit,
//! coupon ids unique, replays consistent.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::history::ClaimRecord;

/// Result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// Not applicable to this run; counted neither as passed nor as failed.
    Skip,
}

/// One checked invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, verdict: Verdict, detail: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            verdict,
            detail: detail.into(),
        }
    }

    fn judge(name: &str, ok: bool, detail: impl Into<String>) -> Self {
        Self::new(name, if ok { Verdict::Pass } else { Verdict::Fail }, detail)
    }
}

/// All checks of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifySummary {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    pub checks: Vec<Check>,
}

impl VerifySummary {
    pub fn new(checks: Vec<Check>) -> Self {
        let count = |v| checks.iter().filter(|c| c.verdict == v).count() as u64;
        Self {
            passed: count(Verdict::Pass),
            failed: count(Verdict::Fail),
            skipped: count(Verdict::Skip),
            checks,
        }
    }

    /// One line per check, then `N passed, N failed` alone on the last line.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            let tag = match c.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "SKIP",
            };
            // Writing into a String cannot fail.
            let _ = writeln!(s, "{tag} {}: {}", c.name, c.detail);
        }
        let _ = writeln!(s, "{} passed, {} failed", self.passed, self.failed);
        s
    }
}

/// What the admin API says about the batch after the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchFacts {
    /// `stock.total`.
    pub total: u64,
    /// `stock.claimed`: coupons issued.
    pub claimed: u64,
    /// `stock.remaining`, when reported.
    pub remaining: Option<u64>,
}

/// What else the checker needs to know.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// The batch's per-user limit.
    pub per_user_limit: u32,
    /// This tester was the batch's only client (it created the batch), so the gateway's
    /// issued count must match the coupons seen in answers.
    pub sole_client: bool,
}

type Key<'a> = (&'a str, &'a str);

/// Everything the checks derive from the history.
#[derive(Default)]
struct Analysis<'a> {
    coupons_by_key: HashMap<Key<'a>, BTreeSet<&'a str>>,
    keys_by_coupon: HashMap<&'a str, BTreeSet<Key<'a>>>,
    coupons_by_user: HashMap<&'a str, BTreeSet<&'a str>>,
    created_by_key: HashMap<Key<'a>, Vec<&'a str>>,
    replays: Vec<(Key<'a>, &'a str)>,
    /// 200/201 answers without a coupon id.
    malformed: u64,
    /// Request ids per user whose answer settled the attempt (issued, replayed, sold out
    /// or at limit): the demand the gateway had to serve.
    decided_by_user: HashMap<&'a str, HashSet<&'a str>>,
    /// Request keys that may have issued a coupon we never saw.
    unknown_keys: HashSet<Key<'a>>,
}

fn analyse(records: &[ClaimRecord]) -> Analysis<'_> {
    let mut a = Analysis::default();
    for r in records {
        let key = (r.user.as_str(), r.request_id.as_str());
        let decided = matches!(
            (r.status, r.error.as_deref()),
            (Some(200 | 201), _)
                | (Some(410), Some("sold_out"))
                | (Some(409), Some("limit_reached"))
        );
        if decided {
            a.decided_by_user.entry(key.0).or_default().insert(key.1);
        }
        if r.outcome_unknown() {
            a.unknown_keys.insert(key);
        }
        if !r.succeeded() {
            continue;
        }
        let Some(coupon) = r.coupon_id.as_deref() else {
            a.malformed += 1;
            continue;
        };
        a.coupons_by_key.entry(key).or_default().insert(coupon);
        a.keys_by_coupon.entry(coupon).or_default().insert(key);
        a.coupons_by_user.entry(key.0).or_default().insert(coupon);
        if r.status == Some(201) {
            a.created_by_key.entry(key).or_default().push(coupon);
        } else {
            a.replays.push((key, coupon));
        }
    }
    // A key with a seen success is no longer unknown: its coupon is counted.
    a.unknown_keys.retain(|k| !a.coupons_by_key.contains_key(k));
    a
}

fn sample<T: std::fmt::Debug>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items
        .into_iter()
        .take(5)
        .map(|i| format!("{i:?}"))
        .collect();
    v.join(", ")
}

/// Checks the invariants on a claim history. `facts` is `None` when the admin API could
/// not be read; the checks that need it are then skipped (the caller reports the failed
/// read itself).
pub fn check_history(
    records: &[ClaimRecord],
    facts: Option<BatchFacts>,
    ctx: Context,
) -> Vec<Check> {
    let a = analyse(records);
    let seen = a.keys_by_coupon.len() as u64;
    let limit = u64::from(ctx.per_user_limit.max(1));
    let mut checks = Vec::new();

    // (1) Never oversold.
    match facts {
        Some(f) => checks.push(Check::judge(
            "issued <= stock",
            f.claimed <= f.total && seen <= f.total,
            format!(
                "issued {} (admin API), {seen} distinct coupons in answers, stock {}",
                f.claimed, f.total
            ),
        )),
        None => checks.push(Check::new(
            "issued <= stock",
            Verdict::Skip,
            format!("batch unreadable; {seen} distinct coupons in answers"),
        )),
    }

    // (1b) Sold out when the demand exceeded the stock.
    let demand: u64 = a
        .decided_by_user
        .values()
        .map(|rids| (rids.len() as u64).min(limit))
        .sum();
    match facts {
        Some(f) if demand > f.total => checks.push(Check::judge(
            "sold out when demand > stock",
            f.claimed == f.total && f.remaining.is_none_or(|r| r == 0),
            format!(
                "demand {demand} (users x per-user limit, settled attempts), stock {}, \
                 issued {}, remaining {}",
                f.total,
                f.claimed,
                f.remaining
                    .map_or_else(|| "n/a".to_string(), |r| r.to_string())
            ),
        )),
        Some(f) => checks.push(Check::new(
            "sold out when demand > stock",
            Verdict::Skip,
            format!("demand {demand} <= stock {}", f.total),
        )),
        None => checks.push(Check::new(
            "sold out when demand > stock",
            Verdict::Skip,
            "batch unreadable",
        )),
    }

    // (1c) The gateway's count matches what it told its clients.
    let unknown = a.unknown_keys.len() as u64;
    match facts {
        Some(f) if ctx.sole_client => checks.push(Check::judge(
            "issued == coupons seen",
            seen <= f.claimed && f.claimed <= seen + unknown,
            if unknown == 0 {
                format!("issued {}, distinct coupons in answers {seen}", f.claimed)
            } else {
                format!(
                    "issued {}, distinct coupons in answers {seen}, {unknown} request ids \
                     without a definite answer (allowed range {seen}..={})",
                    f.claimed,
                    seen + unknown
                )
            },
        )),
        Some(f) => checks.push(Check::judge(
            "issued >= coupons seen",
            seen <= f.claimed,
            format!(
                "issued {}, distinct coupons in answers {seen} (batch shared with other \
                 clients: exact match not required)",
                f.claimed
            ),
        )),
        None => checks.push(Check::new(
            "issued == coupons seen",
            Verdict::Skip,
            "batch unreadable",
        )),
    }

    // (2) Nobody above the per-user limit.
    let mut over: Vec<(&str, usize)> = a
        .coupons_by_user
        .iter()
        .filter(|(_, c)| c.len() as u64 > limit)
        .map(|(u, c)| (*u, c.len()))
        .collect();
    over.sort();
    let max_held = a
        .coupons_by_user
        .values()
        .map(BTreeSet::len)
        .max()
        .unwrap_or(0);
    checks.push(Check::judge(
        "per-user limit",
        over.is_empty(),
        if over.is_empty() {
            format!(
                "{} users hold coupons, at most {max_held} each (limit {limit})",
                a.coupons_by_user.len()
            )
        } else {
            format!(
                "{} users above the limit of {limit}: {}",
                over.len(),
                sample(over)
            )
        },
    ));

    // (3) Coupon ids unique: one coupon, one (user, request id).
    let mut shared: Vec<(&str, Vec<Key<'_>>)> = a
        .keys_by_coupon
        .iter()
        .filter(|(_, k)| k.len() > 1)
        .map(|(c, k)| (*c, k.iter().copied().collect()))
        .collect();
    shared.sort();
    checks.push(Check::judge(
        "coupon ids unique",
        shared.is_empty() && a.malformed == 0,
        match (shared.is_empty(), a.malformed) {
            (true, 0) => format!("{seen} coupon ids, each issued to one (user, request id)"),
            (true, m) => format!("{m} successful answers carried no coupon_id"),
            (false, m) => format!(
                "{} coupon ids handed to several (user, request id) pairs: {}{}",
                shared.len(),
                sample(shared),
                if m > 0 {
                    format!("; {m} successful answers carried no coupon_id")
                } else {
                    String::new()
                }
            ),
        },
    ));

    // (4) Replays return the original coupon; one request id never yields two coupons.
    let mut split: Vec<(Key<'_>, Vec<&str>)> = a
        .coupons_by_key
        .iter()
        .filter(|(_, c)| c.len() > 1)
        .map(|(k, c)| (*k, c.iter().copied().collect()))
        .collect();
    split.sort();
    let with_original = a
        .replays
        .iter()
        .filter(|(k, _)| a.created_by_key.contains_key(k))
        .count();
    let orphans = a.replays.len() - with_original;
    let repeated_201 = a.created_by_key.values().filter(|v| v.len() > 1).count();
    checks.push(Check::judge(
        "replays consistent",
        split.is_empty(),
        if split.is_empty() {
            let mut d = format!(
                "{} replays (200), {with_original} matched their original 201",
                a.replays.len()
            );
            if orphans > 0 {
                let _ = write!(d, ", {orphans} without a 201 seen");
            }
            if repeated_201 > 0 {
                let _ = write!(
                    d,
                    ", {repeated_201} request ids answered 201 more than once"
                );
            }
            d
        } else {
            format!(
                "{} request ids got different coupons: {}",
                split.len(),
                sample(split)
            )
        },
    ));
    checks
}

/// Parses `GET /v1/batches/{id}`: the stock figures and the batch's per-user limit.
pub fn parse_batch(body: &[u8]) -> Result<(BatchFacts, Option<u32>), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("batch reply is not JSON: {e}"))?;
    let stock = v
        .get("stock")
        .ok_or_else(|| "batch reply has no \"stock\" object".to_string())?;
    let num = |k: &str| stock.get(k).and_then(serde_json::Value::as_u64);
    let total = num("total").ok_or("batch reply has no stock.total")?;
    let claimed = num("claimed").ok_or("batch reply has no stock.claimed")?;
    let limit = v
        .get("batch")
        .and_then(|b| b.get("per_user_limit"))
        .and_then(serde_json::Value::as_u64)
        .and_then(|l| u32::try_from(l).ok());
    Ok((
        BatchFacts {
            total,
            claimed,
            remaining: num("remaining"),
        },
        limit,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Phase;

    fn rec(
        user: &str,
        rid: &str,
        status: Option<u16>,
        err: Option<&str>,
        coupon: Option<&str>,
    ) -> ClaimRecord {
        ClaimRecord {
            phase: Phase::Measure,
            user: user.into(),
            request_id: rid.into(),
            status,
            error: err.map(str::to_owned),
            coupon_id: coupon.map(str::to_owned),
            class: crate::outcome::Class::Expected,
            intended_us: None,
            send_us: 0,
            recv_us: 1,
        }
    }

    fn ok(user: &str, rid: &str, coupon: &str) -> ClaimRecord {
        rec(user, rid, Some(201), None, Some(coupon))
    }

    fn replay(user: &str, rid: &str, coupon: &str) -> ClaimRecord {
        rec(user, rid, Some(200), None, Some(coupon))
    }

    fn sold_out(user: &str, rid: &str) -> ClaimRecord {
        rec(user, rid, Some(410), Some("sold_out"), None)
    }

    const CTX: Context = Context {
        per_user_limit: 1,
        sole_client: true,
    };

    fn facts(total: u64, claimed: u64) -> Option<BatchFacts> {
        Some(BatchFacts {
            total,
            claimed,
            remaining: Some(total - claimed.min(total)),
        })
    }

    fn verdict(checks: &[Check], name: &str) -> Verdict {
        checks
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.verdict)
            .unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// Stock 2, three users: two win, a replay of one winner, the third is sold out.
    fn good_history() -> Vec<ClaimRecord> {
        vec![
            ok("u1", "r1", "c1"),
            ok("u2", "r2", "c2"),
            replay("u1", "r1", "c1"),
            sold_out("u3", "r3"),
            rec("u3", "r4", Some(429), Some("rate_limited"), None),
        ]
    }

    #[test]
    fn a_correct_history_passes() {
        let checks = check_history(&good_history(), facts(2, 2), CTX);
        assert!(failed(&checks).is_empty(), "{checks:?}");
        assert_eq!(
            verdict(&checks, "sold out when demand > stock"),
            Verdict::Pass
        );
        let s = VerifySummary::new(checks);
        assert_eq!((s.passed, s.failed, s.skipped), (6, 0, 0));
        let text = s.render();
        assert!(text.ends_with("6 passed, 0 failed\n"), "{text}");
        assert!(
            text.lines()
                .all(|l| l.starts_with("PASS ") || l == "6 passed, 0 failed")
        );
    }

    #[test]
    fn oversold_fails() {
        let mut h = good_history();
        h.push(ok("u4", "r5", "c3"));
        let checks = check_history(&h, facts(2, 3), CTX);
        assert_eq!(verdict(&checks, "issued <= stock"), Verdict::Fail);
        // Also caught from the answers alone when the server under-reports.
        let checks = check_history(&h, facts(2, 2), CTX);
        assert_eq!(verdict(&checks, "issued <= stock"), Verdict::Fail);
    }

    #[test]
    fn undersold_fails_when_demand_exceeds_stock() {
        // Stock 3, four users settled, but the gateway said sold out after 2.
        let mut h = good_history();
        h.push(sold_out("u4", "r6"));
        let checks = check_history(&h, facts(3, 2), CTX);
        assert_eq!(failed(&checks), vec!["sold out when demand > stock"]);
        // With demand below stock the rule does not apply.
        let checks = check_history(&good_history()[..3], facts(3, 2), CTX);
        assert_eq!(
            verdict(&checks, "sold out when demand > stock"),
            Verdict::Skip
        );
        assert!(failed(&checks).is_empty(), "{checks:?}");
    }

    #[test]
    fn rate_limited_attempts_are_not_demand() {
        let h = vec![
            ok("u1", "r1", "c1"),
            rec("u2", "r2", Some(429), Some("rate_limited"), None),
            rec("u3", "r3", Some(503), Some("overloaded"), None),
        ];
        let checks = check_history(&h, facts(2, 1), CTX);
        assert_eq!(
            verdict(&checks, "sold out when demand > stock"),
            Verdict::Skip
        );
        assert!(failed(&checks).is_empty(), "{checks:?}");
    }

    #[test]
    fn issued_count_must_match_answers() {
        // The gateway counts 3 issued but only 2 coupons were handed out.
        let checks = check_history(&good_history(), facts(5, 3), CTX);
        assert_eq!(failed(&checks), vec!["issued == coupons seen"]);
        // ...unless an attempt has no definite outcome (timed out): then it may be 3.
        let mut h = good_history();
        h.push(rec("u5", "r9", None, Some("transport:timeout"), None));
        let checks = check_history(&h, facts(5, 3), CTX);
        assert!(failed(&checks).is_empty(), "{checks:?}");
        // A timed-out attempt later replayed is no longer unknown.
        h.push(replay("u5", "r9", "c9"));
        let checks = check_history(&h, facts(5, 4), CTX);
        assert_eq!(failed(&checks), vec!["issued == coupons seen"]);
        // A shared batch only needs issued >= seen.
        let shared = Context {
            sole_client: false,
            ..CTX
        };
        let checks = check_history(&good_history(), facts(5, 4), shared);
        assert_eq!(verdict(&checks, "issued >= coupons seen"), Verdict::Pass);
        let checks = check_history(&good_history(), facts(5, 1), shared);
        assert_eq!(verdict(&checks, "issued >= coupons seen"), Verdict::Fail);
    }

    #[test]
    fn per_user_limit_violation_fails() {
        let mut h = good_history();
        h.push(ok("u1", "r7", "c7"));
        let checks = check_history(&h, facts(3, 3), CTX);
        assert_eq!(failed(&checks), vec!["per-user limit"]);
        let limit2 = Context {
            per_user_limit: 2,
            ..CTX
        };
        let checks = check_history(&h, facts(3, 3), limit2);
        assert!(failed(&checks).is_empty(), "{checks:?}");
    }

    #[test]
    fn coupon_shared_across_users_fails() {
        let h = vec![ok("u1", "r1", "c1"), ok("u2", "r2", "c1")];
        let checks = check_history(&h, facts(10, 1), CTX);
        assert_eq!(verdict(&checks, "coupon ids unique"), Verdict::Fail);
        // The same user with two request ids getting one coupon is also a violation.
        let h = vec![ok("u1", "r1", "c1"), ok("u1", "r2", "c1")];
        let checks = check_history(&h, facts(10, 1), CTX);
        assert_eq!(verdict(&checks, "coupon ids unique"), Verdict::Fail);
        // A success without coupon id is malformed.
        let h = vec![rec("u1", "r1", Some(201), None, None)];
        let checks = check_history(&h, facts(10, 0), CTX);
        assert_eq!(verdict(&checks, "coupon ids unique"), Verdict::Fail);
    }

    #[test]
    fn inconsistent_replay_fails() {
        let h = vec![ok("u1", "r1", "c1"), replay("u1", "r1", "c2")];
        let checks = check_history(&h, facts(10, 2), CTX);
        assert!(
            failed(&checks).contains(&"replays consistent"),
            "{checks:?}"
        );
        // Two concurrent copies both answered 201 with different coupons.
        let h = vec![ok("u1", "r1", "c1"), ok("u1", "r1", "c2")];
        let checks = check_history(&h, facts(10, 2), CTX);
        assert!(
            failed(&checks).contains(&"replays consistent"),
            "{checks:?}"
        );
    }

    #[test]
    fn consistent_retries_pass() {
        let h = vec![
            ok("u1", "r1", "c1"),
            replay("u1", "r1", "c1"),
            replay("u1", "r1", "c1"),
            replay("u2", "r2", "c2"),
        ];
        let checks = check_history(&h, facts(10, 2), CTX);
        assert!(failed(&checks).is_empty(), "{checks:?}");
        let detail = &checks
            .iter()
            .find(|c| c.name == "replays consistent")
            .expect("check")
            .detail;
        assert!(detail.contains("3 replays (200), 2 matched"), "{detail}");
        assert!(detail.contains("1 without a 201 seen"), "{detail}");
    }

    #[test]
    fn unreadable_batch_skips_server_checks() {
        let checks = check_history(&good_history(), None, CTX);
        assert_eq!(verdict(&checks, "issued <= stock"), Verdict::Skip);
        assert!(failed(&checks).is_empty());
    }

    #[test]
    fn parses_batch_replies() {
        let (f, limit) = parse_batch(
            br#"{"batch":{"id":"b","per_user_limit":2},"stock":{"total":10,"claimed":4,"remaining":6}}"#,
        )
        .expect("parse");
        assert_eq!(
            f,
            BatchFacts {
                total: 10,
                claimed: 4,
                remaining: Some(6)
            }
        );
        assert_eq!(limit, Some(2));
        assert!(parse_batch(b"{}").is_err());
        assert!(parse_batch(b"<html>").is_err());
        assert!(parse_batch(br#"{"stock":{"total":-1,"claimed":0}}"#).is_err());
    }
}
