//! The checkout scenario's after-run check (`--verify`): reads the wallets of the users
//! whose coupons the run claimed (all of them up to [`MAX_WALLETS_CHECKED`], else an even
//! sample) through `GET /v1/users/{user}/coupons`, and checks that every claimed coupon
//! is listed as its user's, and every redeemed one as `used`.
//!
//! Invariant: every read is bounded (the run's timeout per request, `--drain-timeout` for
//! the whole wait for claims still on their way to the database, [`MAX_PAGES`] pages per
//! wallet), and the checks themselves ([`check_wallets`]) are a pure function of what the
//! run saw and what the wallets list.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use tokio::time::Instant;

use crate::client::{Api, Connection};
use crate::driver::Redeemed;
use crate::history::ClaimRecord;
use crate::verify::{Check, Verdict};

/// Wallets read at most (an even sample of the run's users beyond that).
pub const MAX_WALLETS_CHECKED: usize = 1_000;
/// Pages read at most per wallet.
pub const MAX_PAGES: usize = 20;
/// Pause between two rounds while some claimed coupon is not listed yet.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// One coupon as a wallet lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Listed {
    pub coupon_id: String,
    pub user_id: String,
    pub state: String,
}

#[derive(Deserialize)]
struct Page {
    coupons: Vec<Listed>,
    next_cursor: Option<String>,
}

/// What the run expects of one user's wallet.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    /// Coupons the user was answered 200/201 for.
    pub claimed: BTreeSet<String>,
    /// Those of them a checkout redeemed.
    pub redeemed: BTreeSet<String>,
}

/// The expectations of every user of the run, from its claim history and redeems.
pub fn expectations(history: &[ClaimRecord], redeemed: &[Redeemed]) -> BTreeMap<String, Expected> {
    let mut by_user: BTreeMap<String, Expected> = BTreeMap::new();
    for r in history.iter().filter(|r| r.succeeded()) {
        if let Some(c) = &r.coupon_id {
            by_user
                .entry(r.user.clone())
                .or_default()
                .claimed
                .insert(c.clone());
        }
    }
    for r in redeemed {
        by_user
            .entry(r.user.clone())
            .or_default()
            .redeemed
            .insert(r.coupon_id.clone());
    }
    by_user
}

/// At most `max` of `users`, evenly spread (all of them when there are few).
pub fn sample<T: Clone>(users: &[T], max: usize) -> Vec<T> {
    if users.len() <= max {
        return users.to_vec();
    }
    (0..max)
        .map(|k| users[k * users.len() / max].clone())
        .collect()
}

/// The two checks on the wallets read: claimed coupons listed as their users', redeemed
/// ones `used`. `total_users` is how many users the run had (the sample's population).
pub fn check_wallets(
    expected: &BTreeMap<String, Expected>,
    wallets: &HashMap<String, Vec<Listed>>,
    total_users: usize,
) -> Vec<Check> {
    let mut missing = Vec::new();
    let mut foreign = Vec::new();
    let mut not_used = Vec::new();
    let (mut claimed, mut redeemed) = (0usize, 0usize);
    for (user, exp) in expected {
        let listed = wallets.get(user).map(Vec::as_slice).unwrap_or_default();
        let find = |c: &str| listed.iter().find(|l| l.coupon_id == c);
        for c in &exp.claimed {
            claimed += 1;
            match find(c) {
                None => missing.push((user.clone(), c.clone())),
                Some(l) if l.user_id != *user => foreign.push((user.clone(), c.clone())),
                Some(_) => {}
            }
        }
        for c in &exp.redeemed {
            redeemed += 1;
            match find(c) {
                Some(l) if l.state == "used" => {}
                Some(l) => not_used.push((c.clone(), l.state.clone())),
                None => not_used.push((c.clone(), "absent".into())),
            }
        }
    }
    let scope = format!("{} of {total_users} users' wallets read", expected.len());
    let sample5 = |v: &[(String, String)]| {
        v.iter()
            .take(5)
            .map(|(a, b)| format!("{a}:{b}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        Check::new(
            "claimed coupons in their owners' wallets",
            if missing.is_empty() && foreign.is_empty() {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            if missing.is_empty() && foreign.is_empty() {
                format!("{claimed} coupons listed for their users ({scope})")
            } else {
                format!(
                    "{} of {claimed} claimed coupons not listed ({}), {} listed under \
                     another user ({}); {scope}",
                    missing.len(),
                    sample5(&missing),
                    foreign.len(),
                    sample5(&foreign)
                )
            },
        ),
        Check::new(
            "redeemed coupons used",
            if not_used.is_empty() {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            if not_used.is_empty() {
                format!("{redeemed} redeemed coupons are used ({scope})")
            } else {
                format!(
                    "{} of {redeemed} redeemed coupons are not used: {} ({scope})",
                    not_used.len(),
                    sample5(&not_used)
                )
            },
        ),
    ]
}

/// Reads one user's whole wallet (every state), as that user.
async fn read_wallet(
    conn: &mut Connection,
    api: &Api,
    user: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let path = match &cursor {
            // The gateway's default page size (any `wallet.max_page` accepts it).
            Some(c) => format!("/v1/users/{user}/coupons?cursor={c}"),
            None => format!("/v1/users/{user}/coupons"),
        };
        let reply = conn
            .send(api.get_as(&path, Some(user))?, timeout)
            .await
            .with_context(|| format!("reading the wallet of {user}"))?;
        if reply.status != 200 {
            anyhow::bail!(
                "GET {path}: HTTP {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        let page: Page = serde_json::from_slice(&reply.body)
            .with_context(|| format!("the wallet of {user} is not a page of coupons"))?;
        out.extend(page.coupons);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(out)
}

/// Reads the sampled wallets until each lists every coupon its user claimed, or until
/// `drain_timeout` is over (claims not locked by a checkout may still be on their way to
/// the database), then checks them.
pub async fn verify(
    conn: &mut Connection,
    api: &Api,
    history: &[ClaimRecord],
    redeemed: &[Redeemed],
    timeout: Duration,
    drain_timeout: Duration,
) -> Vec<Check> {
    let all = expectations(history, redeemed);
    let users: Vec<String> = all.keys().cloned().collect();
    let picked: BTreeMap<String, Expected> = sample(&users, MAX_WALLETS_CHECKED)
        .into_iter()
        .filter_map(|u| all.get(&u).map(|e| (u, e.clone())))
        .collect();
    let deadline = Instant::now() + drain_timeout;
    let mut wallets: HashMap<String, Vec<Listed>> = HashMap::new();
    loop {
        for (user, exp) in &picked {
            let complete = wallets.get(user).is_some_and(|w| {
                exp.claimed
                    .iter()
                    .all(|c| w.iter().any(|l| l.coupon_id == *c))
            });
            if complete {
                continue;
            }
            match read_wallet(conn, api, user, timeout).await {
                Ok(w) => {
                    wallets.insert(user.clone(), w);
                }
                Err(e) => {
                    return vec![Check::new(
                        "claimed coupons in their owners' wallets",
                        Verdict::Fail,
                        format!("{e:#}"),
                    )];
                }
            }
        }
        let checks = check_wallets(&picked, &wallets, all.len());
        if checks.iter().all(|c| c.verdict == Verdict::Pass) || Instant::now() >= deadline {
            return checks;
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(c: &str, u: &str, state: &str) -> Listed {
        Listed {
            coupon_id: c.into(),
            user_id: u.into(),
            state: state.into(),
        }
    }

    fn exp(claimed: &[&str], redeemed: &[&str]) -> Expected {
        Expected {
            claimed: claimed.iter().map(|s| (*s).to_string()).collect(),
            redeemed: redeemed.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    fn verdicts(checks: &[Check]) -> Vec<Verdict> {
        checks.iter().map(|c| c.verdict).collect()
    }

    #[test]
    fn wallets_that_match_pass() {
        let expected = BTreeMap::from([
            ("u1".to_string(), exp(&["c1"], &["c1"])),
            ("u2".to_string(), exp(&["c2"], &[])),
        ]);
        let wallets = HashMap::from([
            ("u1".to_string(), vec![listed("c1", "u1", "used")]),
            (
                "u2".to_string(),
                vec![listed("c2", "u2", "unused"), listed("c9", "u2", "used")],
            ),
        ]);
        let checks = check_wallets(&expected, &wallets, 2);
        assert_eq!(verdicts(&checks), vec![Verdict::Pass, Verdict::Pass]);
        assert!(checks[0].detail.contains("2 coupons listed"), "{checks:?}");
        assert!(
            checks[1].detail.contains("1 redeemed coupons"),
            "{checks:?}"
        );
    }

    #[test]
    fn missing_foreign_and_unused_coupons_fail() {
        let expected = BTreeMap::from([
            ("u1".to_string(), exp(&["c1"], &["c1"])),
            ("u2".to_string(), exp(&["c2"], &[])),
            ("u3".to_string(), exp(&["c3"], &["c3"])),
        ]);
        let wallets = HashMap::from([
            // redeemed, but the wallet still says locked
            ("u1".to_string(), vec![listed("c1", "u1", "locked")]),
            // c2 listed under someone else
            ("u2".to_string(), vec![listed("c2", "u9", "unused")]),
            // nothing at all
            ("u3".to_string(), vec![]),
        ]);
        let checks = check_wallets(&expected, &wallets, 10);
        assert_eq!(verdicts(&checks), vec![Verdict::Fail, Verdict::Fail]);
        assert!(
            checks[0].detail.contains(
                "1 of 3 claimed coupons not listed (u3:c3), 1 listed under another user (u2:c2)"
            ),
            "{checks:?}"
        );
        assert!(checks[1].detail.contains("c1:locked"), "{checks:?}");
        assert!(checks[1].detail.contains("c3:absent"), "{checks:?}");
        assert!(checks[1].detail.contains("3 of 10 users"), "{checks:?}");
    }

    #[test]
    fn expectations_come_from_successes_and_redeems() {
        let rec = |user: &str, status: Option<u16>, coupon: Option<&str>| ClaimRecord {
            phase: crate::history::Phase::Measure,
            user: user.into(),
            request_id: "r".into(),
            status,
            error: None,
            coupon_id: coupon.map(str::to_owned),
            class: crate::outcome::Class::Expected,
            intended_us: None,
            send_us: 0,
            recv_us: 1,
        };
        let history = vec![
            rec("u1", Some(201), Some("c1")),
            rec("u2", Some(410), None),
            rec("u3", None, None),
        ];
        let redeemed = vec![Redeemed {
            user: "u1".into(),
            coupon_id: "c1".into(),
        }];
        let e = expectations(&history, &redeemed);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e["u1"].claimed.contains("c1") && e["u1"].redeemed.contains("c1"));
    }

    #[test]
    fn samples_are_spread_and_bounded() {
        let users: Vec<u32> = (0..10).collect();
        assert_eq!(sample(&users, 20), users);
        assert_eq!(sample(&users, 5), vec![0, 2, 4, 6, 8]);
        let many: Vec<u32> = (0..100_000).collect();
        assert_eq!(
            sample(&many, MAX_WALLETS_CHECKED).len(),
            MAX_WALLETS_CHECKED
        );
    }
}
