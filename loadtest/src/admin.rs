//! Admin API calls around a run: create the test batch (`POST /v1/batches`) and read its
//! stock figures back (`GET /v1/batches/{id}`).
//!
//! Invariant: a run that creates its own batch starts on a batch nobody has claimed from.
//! The gateway answers an identical re-create with 201 and keeps the old stock figures, so
//! a re-run with the same seed would otherwise land silently on the batch an earlier run
//! drained; such a batch (or one with another definition under the same id) is skipped for
//! a fresh id `lt-<seed>-<n>`, and the caller is told which ones were skipped.

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
    #[error(
        "the gateway refused the admin token (HTTP {0}): check --admin-token or \
         CLAIMGATE_ADMIN_TOKEN"
    )]
    Unauthorized(u16),
    #[error(
        "batches {first} to {last} all exist already (earlier runs with this seed?): pass \
         another --seed, or --batch ID to reuse one of them"
    )]
    NoFreshBatch { first: String, last: String },
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

/// How many ids (`lt-<seed>`, `lt-<seed>-2`, ...) a run tries before giving up.
pub const MAX_FRESH_BATCH_IDS: u32 = 100;

/// Candidate number `k` (from 1) for a run's own batch: `base`, then `base-2`, `base-3`...
pub fn candidate_id(base: &str, k: u32) -> String {
    if k <= 1 {
        base.to_string()
    } else {
        format!("{base}-{k}")
    }
}

/// A batch id that was already taken when the run looked for its own batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// The same definition, but coupons were already claimed from it.
    Used {
        id: String,
        claimed: u64,
        total: u64,
    },
    /// Another definition (stock or limit) under this id (the gateway answered 409).
    Different { id: String },
}

impl Skipped {
    pub fn id(&self) -> &str {
        match self {
            Self::Used { id, .. } | Self::Different { id } => id,
        }
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Used { id, claimed, total } => {
                write!(f, "{id} (claimed {claimed} of {total})")
            }
            Self::Different { id } => write!(f, "{id} (another stock or per-user limit)"),
        }
    }
}

/// The batch a run created for itself.
#[derive(Debug, Clone)]
pub struct OwnBatch {
    pub id: String,
    /// `api` re-targeted at `id`.
    pub api: Api,
    /// Ids passed over because they were taken, in the order tried.
    pub skipped: Vec<Skipped>,
}

/// Creates the run's own batch: `base` if it is new (or exists unclaimed with the same
/// definition), else the first fresh `base-<n>`.
pub async fn create_own_batch(
    conn: &mut Connection,
    api: &Api,
    base: &str,
    stock: u64,
    per_user_limit: u32,
    timeout: Duration,
) -> Result<OwnBatch, AdminError> {
    let mut skipped = Vec::new();
    for k in 1..=MAX_FRESH_BATCH_IDS {
        let id = candidate_id(base, k);
        let api_k = api.for_batch(&id);
        let spec = BatchSpec {
            id: id.clone(),
            stock,
            per_user_limit,
        };
        match create_batch(conn, &api_k, &spec, timeout).await {
            Ok(()) => {}
            Err(AdminError::AlreadyExists(_)) => {
                skipped.push(Skipped::Different { id });
                continue;
            }
            Err(e) => return Err(e),
        }
        // 201 also answers the re-create of an existing batch: only its figures tell
        // whether an earlier run already claimed from it.
        let (facts, _) = get_batch(conn, &api_k, &id, timeout).await?;
        if facts.claimed == 0 {
            return Ok(OwnBatch {
                id,
                api: api_k,
                skipped,
            });
        }
        skipped.push(Skipped::Used {
            id,
            claimed: facts.claimed,
            total: facts.total,
        });
    }
    Err(AdminError::NoFreshBatch {
        first: base.to_string(),
        last: candidate_id(base, MAX_FRESH_BATCH_IDS),
    })
}

/// The warning for a run that had to pass over taken batch ids (`None` when none was).
pub fn fresh_batch_warning(own: &OwnBatch, seed: u64) -> Option<String> {
    if own.skipped.is_empty() {
        return None;
    }
    let list: Vec<String> = own.skipped.iter().map(ToString::to_string).collect();
    let first = own.skipped.first().map_or("", Skipped::id);
    Some(format!(
        "batch {} already taken (an earlier run with --seed {seed}?): this run created the \
         fresh batch {} instead; pass --batch {first} to run against the old one",
        list.join(", "),
        own.id
    ))
}

/// The warning for `--batch` naming a batch that has no stock left, outside the sold-out
/// scenario (which drains its batch on purpose).
pub fn drained_batch_warning(id: &str, facts: &BatchFacts) -> Option<String> {
    let remaining = facts
        .remaining
        .unwrap_or(facts.total.saturating_sub(facts.claimed));
    (remaining == 0).then(|| {
        format!(
            "batch {id} has no stock left (claimed {} of {}): every claim will be answered \
             410 sold_out; drop --batch to run on a fresh batch",
            facts.claimed, facts.total
        )
    })
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
    fn fresh_ids_and_warnings() {
        assert_eq!(candidate_id("lt-5", 1), "lt-5");
        assert_eq!(candidate_id("lt-5", 2), "lt-5-2");
        assert!(crate::cli::valid_batch_id(&candidate_id(
            &crate::scenario::default_batch_id(u64::MAX),
            MAX_FRESH_BATCH_IDS
        )));
        let target =
            std::sync::Arc::new(crate::cli::parse_target("http://127.0.0.1:9").expect("t"));
        let api = Api::new(target, "lt-5", None, None).expect("api");
        let mut own = OwnBatch {
            id: "lt-5".into(),
            api: api.clone(),
            skipped: vec![],
        };
        assert_eq!(fresh_batch_warning(&own, 5), None);
        own.id = "lt-5-3".into();
        own.skipped = vec![
            Skipped::Used {
                id: "lt-5".into(),
                claimed: 10,
                total: 10,
            },
            Skipped::Different {
                id: "lt-5-2".into(),
            },
        ];
        let w = fresh_batch_warning(&own, 5).expect("warning");
        assert!(w.contains("lt-5 (claimed 10 of 10)"), "{w}");
        assert!(w.contains("lt-5-2 (another stock"), "{w}");
        assert!(w.contains("fresh batch lt-5-3"), "{w}");
        assert!(w.contains("--batch lt-5 "), "{w}");

        let drained = BatchFacts {
            total: 10,
            claimed: 10,
            remaining: Some(0),
        };
        let w = drained_batch_warning("b", &drained).expect("warning");
        assert!(w.contains("no stock left (claimed 10 of 10)"), "{w}");
        let fresh = BatchFacts {
            total: 10,
            claimed: 3,
            remaining: None,
        };
        assert_eq!(drained_batch_warning("b", &fresh), None);
    }

    #[test]
    fn snippets_are_bounded() {
        assert_eq!(snippet(b"short"), "short");
        assert_eq!(snippet("é".repeat(400).as_bytes()).chars().count(), 303);
    }
}
