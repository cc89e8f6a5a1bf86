//! Bulk grants: `POST /v1/batches/{id}/grants` (a `{"user_ids": [...]}` body, or a streamed
//! NDJSON/CSV upload that `http` feeds in as it arrives) and `GET /v1/jobs/{id}`.
//! Orchestration only: the upload is spooled and the job run by `crate::jobs`.
//!
//! Invariants kept here: a job is announced (202 with its id) only once its whole upload
//! is spooled; an upload refused half-way (too large, too many users, a broken body) leaves
//! no job behind and grants nothing; in the JSON form, one invalid id refuses the whole
//! request (400), while a streamed line that is invalid is counted `failed` on the job with
//! its line number (the stream cannot be refused after the fact).

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::{Api, ApiError, parse_object};
use crate::backend::Backend;
use crate::domain::ids::valid_ident;
use crate::domain::time::Timestamp;
use crate::jobs::{JobFailure, JobStarted, LineFormat, Spool};
use crate::store::{GrantJobRow, JobState};

/// How an upload's body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    /// `application/json` (or no `Content-Type`): `{"user_ids": [...]}`, read whole.
    Json,
    /// Streamed, line by line.
    Lines(LineFormat),
}

/// The upload's kind, by its `Content-Type` (parameters such as `charset` ignored).
pub fn upload_kind(headers: &HeaderMap) -> Result<UploadKind, ApiError> {
    let Some(v) = headers.get(http::header::CONTENT_TYPE) else {
        return Ok(UploadKind::Json);
    };
    let v = v.to_str().unwrap_or("").to_ascii_lowercase();
    let media = v.split(';').next().unwrap_or("").trim();
    match media {
        "application/json" => Ok(UploadKind::Json),
        "application/x-ndjson" => Ok(UploadKind::Lines(LineFormat::Ndjson)),
        "text/csv" => Ok(UploadKind::Lines(LineFormat::Csv)),
        _ => Err(ApiError::BadRequest(
            "Content-Type must be application/json, application/x-ndjson or text/csv".into(),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserIds {
    user_ids: Vec<String>,
}

/// The 202 body.
#[derive(Debug, Serialize)]
pub struct JobAccepted {
    pub job_id: String,
    pub batch_id: String,
    pub state: &'static str,
    /// Lines the job took (users, and invalid lines counted `failed`).
    pub total: u64,
}

impl From<JobStarted> for JobAccepted {
    fn from(s: JobStarted) -> Self {
        JobAccepted {
            job_id: s.job_id,
            batch_id: s.batch_id,
            state: "running",
            total: s.total,
        }
    }
}

/// `POST /v1/batches/{id}/grants` with `{"user_ids": [...]}`.
pub async fn submit_json<B: Backend>(
    api: &Api<B>,
    batch: &str,
    body: &[u8],
) -> Result<JobAccepted, ApiError> {
    let ids: UserIds = parse_object(body, "grant body")?;
    let max = api.grants().config().max_users;
    if ids.user_ids.is_empty() {
        return Err(ApiError::BadRequest("user_ids must not be empty".into()));
    }
    if ids.user_ids.len() as u64 > max {
        return Err(ApiError::BadRequest(format!(
            "user_ids holds at most {max} ids"
        )));
    }
    if let Some((i, _)) = ids
        .user_ids
        .iter()
        .enumerate()
        .find(|(_, u)| !valid_ident(u))
    {
        return Err(ApiError::BadRequest(format!(
            "user_ids[{i}] must be 1-128 characters of [A-Za-z0-9._@+-]"
        )));
    }
    let mut upload = Upload::begin(api, batch, LineFormat::Ndjson).await?;
    for id in &ids.user_ids {
        if let Err(e) = upload.spool.push_user(id).await {
            upload.abandon(api).await;
            return Err(e.into());
        }
    }
    upload.submit(api).await
}

/// A streamed upload under way: `http` feeds it the body's bytes as they arrive.
pub struct Upload {
    spool: Spool,
}

impl Upload {
    /// A job on `batch` starts receiving (404 when the batch does not exist).
    pub async fn begin<B: Backend>(
        api: &Api<B>,
        batch: &str,
        format: LineFormat,
    ) -> Result<Upload, ApiError> {
        let spool = api.grants().begin(batch, format).await?;
        Ok(Upload { spool })
    }

    /// The next bytes of the body.
    pub async fn accept(&mut self, data: &[u8]) -> Result<(), ApiError> {
        Ok(self.spool.push_bytes(data).await?)
    }

    /// The body ended: the job starts. Refused (and removed) when it holds no line.
    pub async fn submit<B: Backend>(mut self, api: &Api<B>) -> Result<JobAccepted, ApiError> {
        match api.grants().submit(&mut self.spool).await {
            Ok(started) => Ok(started.into()),
            Err(e) => {
                self.abandon(api).await;
                Err(e.into())
            }
        }
    }

    /// The upload was refused or broke off: no job remains.
    pub async fn abandon<B: Backend>(self, api: &Api<B>) {
        api.grants().abandon(&self.spool).await;
    }
}

/// Outcome counts of a job.
#[derive(Debug, Serialize)]
pub struct CountsView {
    pub granted: u64,
    pub skipped_limit: u64,
    pub skipped_sold_out: u64,
    pub failed: u64,
}

/// `GET /v1/jobs/{id}`.
#[derive(Debug, Serialize)]
pub struct JobView {
    pub job_id: String,
    pub batch_id: String,
    pub state: &'static str,
    /// Lines the job took.
    pub total: u64,
    /// Lines decided and counted so far (`total` once done).
    pub processed: u64,
    pub counts: CountsView,
    /// The first failures (`grants.max_errors`), each with its line or user and reason.
    pub errors: Vec<JobFailure>,
    /// Why a failed job stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl JobView {
    fn new(row: GrantJobRow) -> JobView {
        let c = row.counts;
        JobView {
            processed: c.sum(),
            errors: serde_json::from_str(&row.errors).unwrap_or_default(),
            job_id: row.id,
            batch_id: row.batch_id,
            state: row.state.as_str(),
            total: row.total,
            counts: CountsView {
                granted: c.granted,
                skipped_limit: c.skipped_limit,
                skipped_sold_out: c.skipped_sold_out,
                failed: c.failed,
            },
            reason: row.reason,
            created_at: Timestamp(row.created_at).to_rfc3339(),
            updated_at: Timestamp(row.updated_at).to_rfc3339(),
        }
    }
}

/// Job ids are 32 lowercase hex digits.
fn valid_job_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `GET /v1/jobs/{id}`: a job whose upload is still arriving is not one yet (404).
pub async fn job<B: Backend>(api: &Api<B>, id: &str) -> Result<JobView, ApiError> {
    if !valid_job_id(id) {
        return Err(ApiError::JobNotFound);
    }
    match api.grants().job(id).await? {
        Some(row) if row.state != JobState::Receiving => Ok(JobView::new(row)),
        _ => Err(ApiError::JobNotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let kind = |ct: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            }
            upload_kind(&h)
        };
        assert_eq!(kind(None), Ok(UploadKind::Json));
        assert_eq!(
            kind(Some("application/json; charset=utf-8")),
            Ok(UploadKind::Json)
        );
        assert_eq!(
            kind(Some("application/x-ndjson")),
            Ok(UploadKind::Lines(LineFormat::Ndjson))
        );
        assert_eq!(
            kind(Some("Text/CSV; header=present")),
            Ok(UploadKind::Lines(LineFormat::Csv))
        );
        assert!(kind(Some("text/plain")).is_err());
        assert!(valid_job_id(&"ab".repeat(16)));
        assert!(!valid_job_id("AB"));
    }
}
