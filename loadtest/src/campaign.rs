//! Set-up of the campaign-tool scenarios: the catalog of batches the product-lookup
//! scenario looks up, the wallet (and cart) the quote scenario quotes, and the checkout
//! scenario's warm-up (the persister knows the run's batch before the clock starts).
//!
//! Invariant: every set-up call is bounded (each request by the run's timeout, the wait for
//! the wallet by [`WALLET_WAIT`]) and re-running with the same seed is harmless: an
//! identical batch is created again (201), a coupon already claimed is `409
//! limit_reached`, and the wallet is counted, not assumed.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::client::{Api, Connection};
use crate::scenario::CAMPAIGN_PRODUCTS;

/// Batches of the product-lookup catalog.
pub const CATALOG_BATCHES: u64 = 40;
/// Coupons in the quote scenario's wallet (one per batch).
pub const WALLET_COUPONS: usize = 50;
/// Lines of the quote scenario's cart.
pub const CART_ITEMS: u64 = 20;
/// How long the quote set-up waits for the persister to write the wallet.
pub const WALLET_WAIT: Duration = Duration::from_secs(60);

fn batch(id: &str, discount: Value, scope: Value, exclusive: bool) -> Value {
    json!({
        "id": id, "name": "claimgate-loadtest campaign", "stock": 1_000_000,
        "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 30},
        "discount": discount, "scope": scope, "exclusive": exclusive,
    })
}

async fn create(
    conn: &mut Connection,
    api: &Api,
    body: &Value,
    timeout: Duration,
) -> anyhow::Result<()> {
    let reply = conn
        .send(api.create_batch(Bytes::from(body.to_string()))?, timeout)
        .await
        .context("creating a campaign batch")?;
    match reply.status {
        200 | 201 => Ok(()),
        s => bail!(
            "creating batch {}: HTTP {s}: {}",
            body["id"],
            String::from_utf8_lossy(&reply.body)
        ),
    }
}

/// The product-lookup catalog: [`CATALOG_BATCHES`] batches scoped by products (50 each,
/// overlapping), categories, merchants, and a few to all, so a page finds several.
pub async fn setup_products(
    conn: &mut Connection,
    api: &Api,
    seed: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    for j in 0..CATALOG_BATCHES {
        let scope = match j % 4 {
            0 if j % 8 == 0 => json!({"kind": "all"}),
            0 | 1 => {
                let ids: Vec<String> = (0..50)
                    .map(|x| format!("p{}", (j * 25 + x) % CAMPAIGN_PRODUCTS))
                    .collect();
                json!({"kind": "products", "ids": ids})
            }
            2 => json!({"kind": "categories", "ids": [format!("c{}", j % 20)]}),
            _ => json!({"kind": "merchants", "ids": [format!("m{}", j % 10)]}),
        };
        let body = batch(
            &format!("lt-{seed}-pl-{j}"),
            json!({"kind": "fixed", "amount": 100 + j}),
            scope,
            false,
        );
        create(conn, api, &body, timeout).await?;
    }
    eprintln!("created {CATALOG_BATCHES} catalog batches for product pages");
    Ok(())
}

/// The checkout warm-up: creates batch `<batch_id>-warm` (after the run's batch), claims
/// one coupon of it for user `ckw<seed>` and waits (at most [`WALLET_WAIT`]) until that
/// user's wallet lists it. The persister picks up new batches at its periodic refresh of
/// the batch list, so once a coupon of a batch created after the run's batch is in the
/// database, the run's claims are persisted without that wait; the measured lock figures
/// then show the steady lag, not the first refresh. Returns how long the wait took.
pub async fn setup_checkout(
    conn: &mut Connection,
    api: &Api,
    batch_id: &str,
    seed: u64,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let id = format!("{batch_id}-warm");
    let user = format!("ckw{seed}");
    create(
        conn,
        api,
        &batch(
            &id,
            json!({"kind": "fixed", "amount": 100}),
            json!({"kind": "all"}),
            false,
        ),
        timeout,
    )
    .await?;
    let claim = json!({"user_id": user, "request_id": format!("{id}-setup")});
    let req = api.post_as(
        &format!("/v1/batches/{id}/claims"),
        Bytes::from(claim.to_string()),
        Some(&user),
    )?;
    let reply = conn
        .send(req, timeout)
        .await
        .context("claiming the warm-up coupon")?;
    let coupon = match reply.status {
        200 | 201 => serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| v["coupon_id"].as_str().map(str::to_owned))
            .context("the warm-up claim carried no coupon_id")?,
        s => bail!(
            "claiming from {id}: HTTP {s}: {}",
            String::from_utf8_lossy(&reply.body)
        ),
    };
    let started = Instant::now();
    let wallet = format!("/v1/users/{user}/coupons?limit=100");
    loop {
        let reply = conn
            .send(api.get_as(&wallet, Some(&user))?, timeout)
            .await
            .context("reading the warm-up wallet")?;
        let listed = serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| {
                v["coupons"]
                    .as_array()
                    .map(|cs| cs.iter().any(|c| c["coupon_id"] == coupon.as_str()))
            })
            .unwrap_or(false);
        if listed {
            break;
        }
        if started.elapsed() > WALLET_WAIT {
            bail!(
                "the wallet of {user} does not list coupon {coupon} after {} s (is the \
                 persister running?)",
                WALLET_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = started.elapsed();
    eprintln!(
        "checkout warm-up: the wallet listed a fresh claim after {:.3} s",
        waited.as_secs_f64()
    );
    Ok(waited)
}

/// The quote cart: [`CART_ITEMS`] lines, products `p0..`, categories `c<i % 5>`, merchants
/// `m<i % 4>`.
pub fn cart(user: &str) -> Value {
    let items: Vec<Value> = (0..CART_ITEMS)
        .map(|i| {
            json!({"product_id": format!("p{i}"), "category_id": format!("c{}", i % 5),
                   "merchant_id": format!("m{}", i % 4), "unit_price": 1_000 + 137 * i,
                   "quantity": 1 + i % 3})
        })
        .collect();
    json!({"user_id": user, "items": items})
}

/// The quote scenario's wallet: [`WALLET_COUPONS`] batches of every discount kind and scope
/// (some exclusive, some not applying to the cart), one coupon each claimed for the
/// quote user, then waits until the wallet shows them all. Returns the quote body and user.
pub async fn setup_quote(
    conn: &mut Connection,
    api: &Api,
    seed: u64,
    timeout: Duration,
) -> anyhow::Result<(Bytes, String)> {
    let user = format!("qu{seed}");
    for j in 0..WALLET_COUPONS as u64 {
        let discount = match j % 3 {
            0 => json!({"kind": "threshold", "threshold": 5_000 * (j % 4), "amount": 300 + 10 * j}),
            1 => json!({"kind": "fixed", "amount": 150 + 7 * j}),
            _ => json!({"kind": "percent", "percent_off": 5 + j % 20, "max_off": 2_000}),
        };
        let scope = match j % 5 {
            0 => json!({"kind": "all"}),
            1 => {
                json!({"kind": "products", "ids": [format!("p{}", j % 25), format!("p{}", (j + 7) % 25)]})
            }
            2 => json!({"kind": "categories", "ids": [format!("c{}", j % 6)]}),
            3 => json!({"kind": "merchants", "ids": [format!("m{}", j % 5)]}),
            _ => json!({"kind": "products", "ids": ["p-elsewhere"]}),
        };
        let id = format!("lt-{seed}-q-{j}");
        create(
            conn,
            api,
            &batch(&id, discount, scope, j % 10 == 9),
            timeout,
        )
        .await?;
        let claim = json!({"user_id": user, "request_id": format!("{id}-setup")});
        let req = api.post_as(
            &format!("/v1/batches/{id}/claims"),
            Bytes::from(claim.to_string()),
            Some(&user),
        )?;
        let reply = conn
            .send(req, timeout)
            .await
            .context("claiming a wallet coupon")?;
        match reply.status {
            200 | 201 | 409 => {}
            s => bail!(
                "claiming from {id}: HTTP {s}: {}",
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }
    let started = Instant::now();
    let wallet = format!("/v1/users/{user}/coupons?status=unused&limit=100");
    loop {
        let reply = conn
            .send(api.get_as(&wallet, Some(&user))?, timeout)
            .await
            .context("reading the wallet")?;
        let held = serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| v["coupons"].as_array().map(Vec::len))
            .unwrap_or(0);
        if held >= WALLET_COUPONS {
            break;
        }
        if started.elapsed() > WALLET_WAIT {
            bail!(
                "the wallet of {user} shows {held} of {WALLET_COUPONS} coupons after {} s \
                 (is the persister running?)",
                WALLET_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "wallet of {user}: {WALLET_COUPONS} coupons persisted; quoting a {CART_ITEMS}-item cart"
    );
    Ok((Bytes::from(cart(&user).to_string()), user))
}
