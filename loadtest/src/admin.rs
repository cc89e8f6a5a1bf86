//! Admin API calls around a run: create the test batch (`POST /v1/batches`) and read its
//! stock figures back (`GET /v1/batches/{id}`).

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::client::{Api, BuildError, Connection, TransportError};
use crate::verify::{self, BatchFacts};

/// The batch a run creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSpec {
    pub id: String,
    pub stock: u64,
    pub per_user_limit: u32,
}

/// A failed admin call.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot build the admin request")]
    Build(#[from] BuildError),
    #[error("no answer from the gateway")]
    Transport(#[from] TransportError),
    #[error(
        "batch {0:?} already exists (a previous run with this seed?): pass another --seed, \
         or --batch {0} to reuse it"
    )]
    AlreadyExists(String),
    #[error("batch {0:?} not found")]
    NotFound(String),
    #[error("the gateway refused the admin token (HTTP {0}): check --admin-token")]
    Unauthorized(u16),
    #[error("unexpected HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("{0}")]
    Parse(String),
}

/// The JSON body creating `spec`: always open, fixed discount, no eligibility rules.
pub fn batch_body(spec: &BatchSpec) -> serde_json::Value {
    json!({
        "id": spec.id,
        "name": "claimgate-loadtest",
        "stock": spec.stock,
        "per_user_limit": spec.per_user_limit,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7},
        "discount": {"kind": "fixed", "amount": 500},
        "scope": {"kind": "all"},
        "exclusive": false,
        "eligibility": {"deny_users": [], "require_tags": [], "new_users_only": false}
    })
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(300).collect();
    if text.chars().count() > 300 {
        s.push_str("...");
    }
    s
}

/// Creates the batch; `api` must be built for `spec.id`.
pub async fn create_batch(
    conn: &mut Connection,
    api: &Api,
    spec: &BatchSpec,
    timeout: Duration,
) -> Result<(), AdminError> {
    let body = Bytes::from(batch_body(spec).to_string());
    let reply = conn.send(api.create_batch(body)?, timeout).await?;
    match reply.status {
        201 | 200 => Ok(()),
        409 => Err(AdminError::AlreadyExists(spec.id.clone())),
        s @ (401 | 403) => Err(AdminError::Unauthorized(s)),
        status => Err(AdminError::Status {
            status,
            body: snippet(&reply.body),
        }),
    }
}

/// Reads the batch's stock figures and per-user limit.
pub async fn get_batch(
    conn: &mut Connection,
    api: &Api,
    batch_id: &str,
    timeout: Duration,
) -> Result<(BatchFacts, Option<u32>), AdminError> {
    let reply = conn.send(api.get_batch()?, timeout).await?;
    match reply.status {
        200 => verify::parse_batch(&reply.body).map_err(AdminError::Parse),
        404 => Err(AdminError::NotFound(batch_id.to_string())),
        s @ (401 | 403) => Err(AdminError::Unauthorized(s)),
        status => Err(AdminError::Status {
            status,
            body: snippet(&reply.body),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_matches_the_contract() {
        let b = batch_body(&BatchSpec {
            id: "lt-3".into(),
            stock: 100,
            per_user_limit: 2,
        });
        assert_eq!(b["id"], "lt-3");
        assert_eq!(b["stock"], 100);
        assert_eq!(b["per_user_limit"], 2);
        assert_eq!(b["discount"]["kind"], "fixed");
        assert_eq!(b["claim_window"]["end"], "2100-01-01T00:00:00Z");
        assert_eq!(b["eligibility"]["new_users_only"], false);
    }

    #[test]
    fn snippets_are_bounded() {
        assert_eq!(snippet(b"short"), "short");
        assert_eq!(snippet("é".repeat(400).as_bytes()).chars().count(), 303);
    }
}
