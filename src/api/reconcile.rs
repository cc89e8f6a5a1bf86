//! `GET /v1/admin/reconcile[?batch=ID]`: the backend this gateway serves compared with the
//! database ([`crate::recovery::reconcile`]), for an operator whose backend lives in this
//! process (the embedded keyspace cannot be opened by a second process while a gateway
//! holds its append-only file). `claimgate reconcile --url` is its client.
//!
//! Invariant kept here: the route reads and changes nothing else than the read-only
//! reconcile does; it is an admin route (the admin token when configured), its only query
//! parameter is a checked batch id, and it answers every difference, one line each, in the
//! very words of the local `claimgate reconcile`.

use serde::Serialize;

use super::{Api, ApiError};
use crate::backend::Backend;
use crate::domain::ids::valid_batch_id;

/// The answer: which backend, which batch (`None`: every batch), and the differences.
#[derive(Debug, Serialize)]
pub struct ReconcileReport {
    pub backend: &'static str,
    pub batch: Option<String>,
    pub agree: bool,
    pub differences: Vec<String>,
}

/// The `batch` of `?batch=ID` (the only parameter; values are taken literally).
fn parse_query(query: &str) -> Result<Option<String>, ApiError> {
    let mut batch = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("batch", id)) if batch.is_none() && valid_batch_id(id) => {
                batch = Some(id.to_string());
            }
            Some(("batch", _)) => {
                return Err(ApiError::BadRequest(
                    "batch must be one batch id (1-64 of [A-Za-z0-9_-])".into(),
                ));
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "unknown query parameter: only batch is known".into(),
                ));
            }
        }
    }
    Ok(batch)
}

/// Reconciles `?batch=` (or every batch in the database).
pub async fn reconcile<B: Backend>(api: &Api<B>, query: &str) -> Result<ReconcileReport, ApiError> {
    let batch = parse_query(query)?;
    let backend = api.stock().backend();
    let diffs = crate::recovery::reconcile(backend.as_ref(), api.store(), batch.as_deref()).await?;
    Ok(ReconcileReport {
        backend: backend.kind(),
        batch,
        agree: diffs.is_empty(),
        differences: diffs.iter().map(ToString::to_string).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_one_checked_batch_id() {
        assert_eq!(parse_query("").unwrap(), None);
        assert_eq!(parse_query("batch=b-1").unwrap().as_deref(), Some("b-1"));
        for bad in [
            "batch=",
            "batch=a%20b",
            "batch=a&batch=b",
            "x=1",
            "batch",
            "batch=a/b",
        ] {
            assert!(parse_query(bad).is_err(), "{bad}");
        }
    }
}
