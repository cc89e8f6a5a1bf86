//! The claim path: parse + validate -> identify -> rate limits -> hot-key cache ->
//! admission -> ONE claim script on the user's home shard -> reply.
//!
//! Invariant kept here: a coupon is only ever granted by the claim script. Every request
//! carries a request id to the script (the client's, or an internal `~`-prefixed one that
//! no client can send), so repeating a call whose reply was lost can never mint a second
//! coupon: it replays the first.

use std::net::SocketAddr;
use std::time::Instant;

use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

use super::{Api, ApiError, parse_object};
use crate::backend::{Backend, BackendError};
use crate::catalog::cache::{CachedBatch, LocalRefusal};
use crate::contract::claim::{Coupon, Outcome};
use crate::domain::auth::Identity;
use crate::domain::ids::{INTERNAL_REQUEST_ID, home_shard, valid_ident};
use crate::domain::time::Timestamp;
use crate::obs::events::{CacheAnswered, ClaimAnswered, Shed, StageTimed};
use crate::stock::{ClaimArgs, ClaimResult, StockError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
}

/// A parsed, validated claim request.
#[derive(Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    pub user_id: Option<String>,
    pub request_id: Option<String>,
}

impl ClaimRequest {
    pub fn parse(body: &[u8]) -> Result<ClaimRequest, ApiError> {
        let b: ClaimBody = parse_object(body, "claim body")?;
        for (name, v) in [("user_id", &b.user_id), ("request_id", &b.request_id)] {
            if v.as_deref().is_some_and(|v| !valid_ident(v)) {
                return Err(ApiError::BadRequest(format!(
                    "{name} must be 1-128 characters of [A-Za-z0-9._@+-]"
                )));
            }
        }
        Ok(ClaimRequest {
            user_id: b.user_id,
            request_id: b.request_id,
        })
    }
}

/// The 201/200 body.
#[derive(Debug, Serialize)]
pub struct ClaimReply {
    pub coupon_id: String,
    pub batch_id: String,
    pub user_id: String,
    pub valid_from: String,
    pub valid_to: String,
    pub claimed_at: String,
    /// The coupon's code, in a batch that hands out codes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl ClaimReply {
    fn new(c: &Coupon, batch: &str, user: &str) -> ClaimReply {
        ClaimReply {
            coupon_id: c.coupon_id.clone(),
            batch_id: batch.to_string(),
            user_id: user.to_string(),
            valid_from: Timestamp(c.valid_from_ms).to_rfc3339(),
            valid_to: Timestamp(c.valid_to_ms).to_rfc3339(),
            claimed_at: Timestamp(c.claimed_at_ms).to_rfc3339(),
            code: c.code.clone(),
        }
    }
}

/// Whether `entry`'s keys could have left Redis by `now`: its window ended at least
/// `batches.retire_after_ms` ago (retirement on), whatever this gateway's cache knows.
fn could_be_retired<B: Backend>(api: &Api<B>, entry: &CachedBatch, now: Timestamp) -> bool {
    let after = api.config().batches.retire_after_ms;
    let retire_at = entry
        .batch()
        .claim_window
        .end
        .0
        .saturating_add(i64::try_from(after).unwrap_or(i64::MAX));
    after > 0 && now.0 >= retire_at
}

/// The coupon an earlier success of `request_id` got, for a request the cache refused: from
/// the user's home shard, or from the database for a retired batch (its request-id records
/// left Redis with it). A batch not known retired is asked about only when its keys could
/// be gone ([`could_be_retired`]), whatever the cache refused it as (ended, sold out, ...).
async fn replay<B: Backend>(
    api: &Api<B>,
    entry: &CachedBatch,
    home: u32,
    user: &str,
    request_id: &str,
    now: Timestamp,
) -> Result<Option<ClaimReply>, ApiError> {
    let batch_id = entry.id.as_str();
    if !entry.is_retired() {
        let batch = entry.batch();
        let found = api
            .stock()
            .replay(&entry.keys, home, user, request_id, batch.ack)
            .await?;
        if let Some(c) = found {
            return Ok(Some(ClaimReply::new(&c, batch_id, user)));
        }
        if !could_be_retired(api, entry, now) || !api.catalog().check_retired(entry).await? {
            return Ok(None);
        }
    }
    let stored = api
        .stock()
        .archived_claim(batch_id, user, request_id)
        .await?;
    Ok(stored.map(|c| ClaimReply::new(&c, batch_id, user)))
}

fn stage(name: &'static str, since: Instant) -> Instant {
    let now = Instant::now();
    StageTimed {
        stage: name,
        seconds: (now - since).as_secs_f64(),
    }
    .emit();
    now
}

/// Handles `POST /v1/batches/{id}/claims`. Returns the status (201 or 200) and body.
pub async fn claim<B: Backend>(
    api: &Api<B>,
    batch_id: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    body: &[u8],
) -> Result<(StatusCode, ClaimReply), ApiError> {
    let started = Instant::now();
    let result = claim_inner(api, batch_id, headers, peer, body, started).await;
    let outcome = match &result {
        Ok((StatusCode::CREATED, _)) => "claimed",
        Ok(_) => "replayed",
        Err(e) => e.code(),
    };
    ClaimAnswered {
        outcome,
        seconds: started.elapsed().as_secs_f64(),
    }
    .emit();
    result
}

/// Read-your-writes: the coupon goes into its user's recent set before the claim is
/// answered, so the wallet lists it at once (`coupons::wallet`). A failure is counted and
/// logged there; the claim stands.
async fn touch<B: Backend>(api: &Api<B>, user: &str, coupon_id: &str, t: Instant) {
    let _ = api
        .wallets()
        .touch(user, coupon_id, api.clock().now_ms())
        .await;
    stage("recent", t);
}

async fn claim_inner<B: Backend>(
    api: &Api<B>,
    batch_id: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    body: &[u8],
    started: Instant,
) -> Result<(StatusCode, ClaimReply), ApiError> {
    // 1. parse + validate
    let req = ClaimRequest::parse(body)?;
    let t = stage("parse", started);

    // 2. identify the user
    let identity: Identity = api.auth().identify(headers, req.user_id.as_deref())?;
    let t = stage("auth", t);

    // 3. local rate limits
    let ip = api.limits().client_ip(peer, headers);
    api.limits().check_claim(ip, &identity.user_id)?;
    let t = stage("ratelimit", t);

    // 4. local hot-key cache: only negative answers
    let catalog = api.catalog();
    let entry = catalog.load_live(batch_id).await?;
    // the Api's clock (the system's; a test's to cross a local midnight without sleeping):
    // the cache's window and day checks and the day offset the script gets agree on it
    let now = Timestamp(api.clock().now_ms());
    let home = home_shard(&identity.user_id, entry.keys.shards.len() as u32);
    if let Some(refusal) = catalog.cache().refuse(&entry, &identity, now) {
        CacheAnswered {
            kind: refusal.label(),
        }
        .emit();
        let refused = match refusal {
            LocalRefusal::SoldOut => ApiError::SoldOut,
            LocalRefusal::Paused => ApiError::Paused,
            LocalRefusal::NotStarted => ApiError::NotStarted,
            LocalRefusal::Ended => ApiError::Ended,
            LocalRefusal::NotEligible => ApiError::NotEligible,
            LocalRefusal::LimitReached => ApiError::LimitReached,
        };
        // The same user + request id always gets the same answer: a request id that won
        // earlier still replays its coupon (one read), whatever the user's eligibility is
        // now (tags and the new-user flag come with each request and may have changed since
        // the claim). Without a request id: no backend call.
        let replayable = match refusal {
            // retired, or could be: its winners are in the database alone (asked below)
            _ if entry.is_retired() || could_be_retired(api, &entry, now) => true,
            // sold out and the user won nothing: this cannot be a replay of a success
            LocalRefusal::SoldOut => {
                catalog.load_winners(&entry);
                entry.is_winner(&identity.user_id) != Some(false)
            }
            _ => true,
        };
        if let (Some(rid), true) = (&req.request_id, replayable) {
            let _permit = api.admission().admit().await?;
            let found = replay(api, &entry, home, &identity.user_id, rid, now).await?;
            stage("cache", t);
            if let Some(reply) = found {
                return Ok((StatusCode::OK, reply));
            }
            return Err(refused);
        }
        stage("cache", t);
        return Err(refused);
    }
    let t = stage("cache", t);

    // 5. admission: bounded backend calls in flight
    let _permit = api.admission().admit().await?;
    let t = stage("admission", t);

    // 6. ONE script on the home shard (more only when the shard must be refilled)
    // A nonce per HTTP request: recorded with the request id, so if our own call is
    // repeated after a lost reply, the replay says it was this request that minted it.
    let nonce = format!("{:016x}", rand::random::<u64>());
    let internal;
    let rid = match &req.request_id {
        Some(r) => r.as_str(),
        None => {
            internal = format!("{INTERNAL_REQUEST_ID}{nonce}");
            internal.as_str()
        }
    };
    let args = ClaimArgs {
        user: &identity.user_id,
        request_id: rid,
        max_log: &api.max_log,
        nonce: &nonce,
        total: entry.batch().stock,
        ack: entry.batch().ack,
        day_offset_ms: entry.day_offset_ms(now),
        // made just now from a random nonce: no earlier success can carry it
        fresh_request_id: req.request_id.is_none(),
    };
    let claim_once = || api.stock().claim(&entry.keys, home, &args);
    let mut result = claim_once().await;
    if let Err(StockError::Backend(BackendError::Unavailable(_))) = &result {
        // The reply may have been lost after the script ran: ask again with the same
        // request id; the script replays instead of minting a second coupon.
        result = claim_once().await;
    }
    stage("backend", t);
    let user = identity.user_id.as_str();
    let outcome = match result? {
        ClaimResult::Decided(outcome) => outcome,
        ClaimResult::SoldOut => {
            entry.set_sold_out();
            catalog.load_winners(&entry);
            return Err(ApiError::SoldOut);
        }
        ClaimResult::Contended => {
            return Err(ApiError::Overloaded(
                "stock is being rebalanced; nothing was claimed".into(),
            ));
        }
        ClaimResult::ShardFenced => {
            return Err(ApiError::unavailable(format!(
                "shard {home} of batch {batch_id} is being repaired after a Redis failure"
            )));
        }
    };
    let t = Instant::now();
    match outcome {
        Outcome::Claimed(c) => {
            touch(api, user, &c.coupon_id, t).await;
            Ok((StatusCode::CREATED, ClaimReply::new(&c, batch_id, user)))
        }
        // Our own repeated call minted it: the client never saw the first reply.
        Outcome::Replayed(c) if c.minted_by == nonce => {
            touch(api, user, &c.coupon_id, t).await;
            Ok((StatusCode::CREATED, ClaimReply::new(&c, batch_id, user)))
        }
        Outcome::Replayed(c) => {
            touch(api, user, &c.coupon_id, t).await;
            Ok((StatusCode::OK, ClaimReply::new(&c, batch_id, user)))
        }
        Outcome::NoBatch => {
            if catalog.check_retired(&entry).await? {
                return Err(ApiError::Ended); // retired meanwhile: its window is long over
            }
            catalog.mark_lost(&entry);
            Err(ApiError::unavailable(format!(
                "batch {batch_id} is missing from the backend"
            )))
        }
        Outcome::NotStarted => Err(ApiError::NotStarted),
        Outcome::Ended => Err(ApiError::Ended),
        Outcome::Paused => Err(ApiError::Paused),
        Outcome::Denied => Err(ApiError::NotEligible),
        Outcome::LimitReached => {
            catalog.cache().remember_at_limit(&entry, user, false, now);
            Err(ApiError::LimitReached)
        }
        Outcome::DailyLimitReached => {
            catalog.cache().remember_at_limit(&entry, user, true, now);
            Err(ApiError::DailyLimitReached)
        }
        Outcome::BacklogFull => {
            Shed { reason: "backlog" }.emit();
            Err(ApiError::Overloaded(
                "persistence backlog at its bound; nothing was claimed".into(),
            ))
        }
        // resolved by the claim (refilled; the shard fenced; looked up): never seen here
        Outcome::ShardEmpty | Outcome::RolledBack | Outcome::AskDatabase => {
            Err(ApiError::Internal(format!("claim resolved to {outcome:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        assert_eq!(
            ClaimRequest::parse(br#"{"user_id":"u1","request_id":"r-1"}"#).unwrap(),
            ClaimRequest {
                user_id: Some("u1".into()),
                request_id: Some("r-1".into())
            }
        );
        for bad in [
            &b"{"[..],
            b"[]",
            br#"{"user_id":1}"#,
            br#"{"user_id":"a:b"}"#,
            br#"{"user_id":"u","extra":1}"#,
            b"\xff\xfe",
            br#"{"user_id":"u","request_id":""}"#,
        ] {
            assert!(
                ClaimRequest::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
