//! The API's handlers, orchestration only: [`claim`] (the claim path), [`admin`] (create,
//! read and change batches), [`wallet`] (a user's coupons, their checkout transitions and
//! refunds), [`events`] (the admin's view of the event delivery ledger), [`catalog`] (the
//! product-page lookup and the admin listing of batches), [`quote`] (the checkout quote),
//! [`reconcile`] (the backend and the database compared, for a live gateway), [`grants`]
//! (bulk grant jobs: the upload and the job's report), [`codes`] (partner codes imported
//! into a batch).
//! Each takes the request's parts and the [`Api`] (the services it orchestrates), and
//! answers a typed reply or an [`ApiError`] (the one mapping of domain errors, [`error`]).
//!
//! Invariant kept here: a handler decides nothing a lower layer owns: validation is the
//! domain's, a coupon is granted only by the claim script (through `stock`), a batch
//! definition's arbiter is the database (through `store`), and every error reaches the
//! client through its one `From` impl.

pub mod admin;
pub mod catalog;
pub mod claim;
pub mod codes;
pub mod error;
pub mod events;
pub mod grants;
pub mod quote;
pub mod reconcile;
pub mod wallet;

use std::sync::Arc;

pub use self::error::ApiError;
use crate::backend::Backend;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::coupons::Coupons;
use crate::coupons::wallet::Wallets;
use crate::domain::auth::Auth;
use crate::domain::limits::{Admission, RateLimits};
use crate::domain::time::{Clock, SystemClock};
use crate::jobs::Grants;
use crate::stock::Stock;
use crate::store::Db;

/// The services the handlers orchestrate, wired once by the composition root.
pub struct Api<B: Backend> {
    cfg: Arc<Config>,
    catalog: Arc<Catalog<B>>,
    stock: Arc<Stock<B>>,
    store: Db,
    auth: Auth,
    limits: RateLimits,
    admission: Admission,
    /// Bulk grant jobs: uploads, runs, resumes.
    grants: Arc<Grants<B>>,
    /// Coupon state on its shard: the transitions of coupons whose state lives there.
    coupons: Arc<Coupons<B>>,
    /// Wallet reads (the database's page, cached, corrected by the recent changes).
    wallets: Arc<Wallets<B>>,
    /// `persister.max_backlog_per_shard`, formatted once for the claim script.
    max_log: String,
    /// The time of coupon transitions, wallet reads and a claim's local checks (window, the
    /// cache's day, the batch's UTC offset passed to the script): the system clock; tests
    /// set theirs.
    clock: Arc<dyn Clock>,
}

impl<B: Backend> Api<B> {
    pub fn new(
        cfg: Arc<Config>,
        catalog: Arc<Catalog<B>>,
        stock: Arc<Stock<B>>,
        store: Db,
    ) -> Api<B> {
        let grants = Arc::new(Grants::new(
            &cfg,
            stock.clone(),
            catalog.clone(),
            store.clone(),
        ));
        let coupons = Arc::new(Coupons::new(
            stock.backend().clone(),
            cfg.persister.max_backlog_per_shard,
        ));
        let wallets = Arc::new(Wallets::new(
            stock.backend().clone(),
            coupons.clone(),
            store.clone(),
            &cfg.wallet,
        ));
        Api {
            grants,
            coupons,
            wallets,
            auth: Auth::new(&cfg.auth),
            limits: RateLimits::new(&cfg.limits),
            admission: Admission::new(&cfg.limits),
            max_log: cfg.persister.max_backlog_per_shard.to_string(),
            cfg,
            catalog,
            stock,
            store,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same API on another clock (tests of expiry and reminders).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Api<B> {
        self.clock = clock;
        self
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    pub fn catalog(&self) -> &Arc<Catalog<B>> {
        &self.catalog
    }

    pub fn stock(&self) -> &Arc<Stock<B>> {
        &self.stock
    }

    pub fn store(&self) -> &Db {
        &self.store
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    pub fn grants(&self) -> &Arc<Grants<B>> {
        &self.grants
    }

    pub fn coupons(&self) -> &Arc<Coupons<B>> {
        &self.coupons
    }

    pub fn wallets(&self) -> &Arc<Wallets<B>> {
        &self.wallets
    }
}

/// Parses a JSON object body into `T` (serde alone would also accept an array for a struct).
pub fn parse_object<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest(format!(
            "{what} must be a JSON object"
        )));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid {what}: {e}")))
}

/// [`parse_object`] for bodies with integer fields (the admin routes): a number written
/// with a zero fraction (`100.0`, `1e3`) is the integer it equals, as JSON Schema's
/// `integer` has it (schemathesis sent `"amount": 87562.0`: valid by the document, refused
/// by serde). Only values up to 2^53 (exact in a double; serde_json's `float_roundtrip`
/// parses them exactly: best-effort parsing read `1895778888269701.0` as `...700.8`); any
/// other fraction stays refused.
pub fn parse_object_integral<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    let mut v: serde_json::Value = parse_object(body, what)?;
    integral(&mut v);
    serde_json::from_value(v).map_err(|e| ApiError::BadRequest(format!("invalid {what}: {e}")))
}

fn integral(v: &mut serde_json::Value) {
    use serde_json::Value;
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() <= EXACT
            {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral),
        Value::Object(fields) => fields.values_mut().for_each(integral),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// schemathesis (item 5): `"amount": 87562.0` is an integer by the document (JSON
    /// Schema) and was refused; a real fraction still is.
    #[test]
    fn integral_numbers_are_integers() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct T {
            a: i64,
            b: Vec<u32>,
            c: Option<i64>,
        }
        let t: T =
            parse_object_integral(br#"{"a": 87562.0, "b": [1e3, 2], "c": -4.0}"#, "t").unwrap();
        assert_eq!((t.a, t.b, t.c), (87562, vec![1000, 2], Some(-4)));
        for bad in [
            &br#"{"a": 1.5, "b": []}"#[..],
            br#"{"a": 1e300, "b": []}"#,
            br#"{"a": 9007199254740994.0, "b": []}"#,
            br#"[1]"#,
            br#"{"a": 1, "b": [], "x": 1}"#,
        ] {
            assert!(parse_object_integral::<T>(bad, "t").is_err(), "{bad:?}");
        }
        // the plain parser stays strict (the claim and wallet bodies have no numbers)
        assert!(parse_object::<T>(br#"{"a": 87562.0, "b": []}"#, "t").is_err());
    }
}
