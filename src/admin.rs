//! Admin routes: create, read and change batches.
//!
//! Invariant kept here: a batch is recorded in the database before it becomes claimable in
//! Redis (so the persister always knows where its claims go), and creating the same batch
//! twice is harmless while a different batch under the same id is refused (409).

use http::StatusCode;
use serde::Serialize;

use crate::app::App;
use crate::backend::Backend;
use crate::batch::{Batch, BatchPatch, NewBatch};
use crate::error::ApiError;
use crate::stock::StockError;

#[derive(Debug, Serialize)]
pub struct StockView {
    pub total: i64,
    pub claimed: i64,
    pub remaining: i64,
}

#[derive(Debug, Serialize)]
pub struct BatchView {
    pub batch: Batch,
    pub stock: StockView,
}

/// `POST /v1/batches`.
pub async fn create<B: Backend>(
    app: &App<B>,
    body: &[u8],
) -> Result<(StatusCode, Batch), ApiError> {
    let new: NewBatch = crate::router::parse_object(body, "batch")?;
    let batch = new.validate(&app.cfg.batches.limits())?;
    let fp = batch.fingerprint();
    match app.db.get_batch(&batch.id).await {
        Ok(Some(existing)) if existing.fingerprint() != fp => return Err(ApiError::BatchExists),
        Ok(_) => {}
        Err(e) => return Err(app.unavailable(e)),
    }
    app.db
        .upsert_batch(&batch)
        .await
        .map_err(|e| app.unavailable(e))?;
    let keys = crate::keys::BatchKeys::new(&batch.id, batch.shards);
    match app.stock.create(&batch, &keys).await {
        Ok(_) => {}
        Err(StockError::Conflict) => return Err(ApiError::BatchExists),
        Err(e) => return Err(app.stock_error(e)),
    }
    if let Some(entry) = app.cache.get(&batch.id) {
        app.refresh_batch(&entry).await;
    }
    Ok((StatusCode::CREATED, batch))
}

/// `GET /v1/batches/{id}`.
pub async fn get<B: Backend>(app: &App<B>, id: &str) -> Result<BatchView, ApiError> {
    let entry = app.load_batch(id).await?;
    if entry.is_lost() {
        return Err(app.unavailable(format!("batch {id} is missing from Redis")));
    }
    let c = app
        .stock
        .conservation(&entry.keys)
        .await
        .map_err(|e| app.stock_error(e))?;
    // the definition as Redis has it now (the cache may lag by one refresh)
    let batch = match app.read_meta(id).await? {
        Some((b, _, _)) => b,
        None => (*entry.batch()).clone(),
    };
    Ok(BatchView {
        batch,
        stock: StockView {
            total: c.total,
            claimed: c.claimed,
            remaining: c.total - c.claimed,
        },
    })
}

/// `PATCH /v1/batches/{id}`: pause/resume, move the window end, add stock.
pub async fn patch<B: Backend>(app: &App<B>, id: &str, body: &[u8]) -> Result<BatchView, ApiError> {
    let change: BatchPatch = crate::router::parse_object(body, "batch change")?;
    let entry = app.load_batch(id).await?;
    if entry.is_lost() {
        return Err(app.unavailable(format!("batch {id} is missing from Redis")));
    }
    let Some((mut batch, _, _)) = app.read_meta(id).await? else {
        return Err(ApiError::BatchNotFound);
    };
    change.validate(&batch, &app.cfg.batches.limits())?;
    change.apply(&mut batch);
    let mut pairs = Vec::new();
    if let Some(state) = change.state {
        pairs.push(("state", state.as_str().to_string()));
    }
    if let Some(end) = change.new_end() {
        pairs.push(("end", end.0.to_string()));
    }
    let def = serde_json::to_string(&batch).map_err(|e| ApiError::Internal(e.to_string()))?;
    app.db
        .upsert_batch(&batch)
        .await
        .map_err(|e| app.unavailable(e))?;
    app.stock
        .patch(
            &entry.keys,
            &pairs,
            &[("def", def)],
            change.add_stock.unwrap_or(0),
        )
        .await
        .map_err(|e| app.stock_error(e))?;
    app.refresh_batch(&entry).await;
    get(app, id).await
}
