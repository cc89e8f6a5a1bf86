//! `POST /v1/batches/{id}/codes`: partner codes imported into a batch whose codes are
//! `imported`: a `{"codes": [...]}` body, or a streamed NDJSON/CSV upload that `http` feeds
//! in as it arrives. Orchestration only: the codes are stored and loaded by
//! `catalog::codes`.
//!
//! Invariants kept here: memory holds at most one chunk (`batches.codes_chunk` codes) and
//! one line of a streamed upload, however large; in the JSON form, one invalid code refuses
//! the whole request (400) before anything is stored, while a streamed line that is invalid
//! is counted `invalid` with its line number (the stream cannot be refused after the fact);
//! every code received is counted exactly once: `added`, `duplicates`, `invalid` or
//! `over_capacity`; codes added are claimable when the reply is sent.

use serde::{Deserialize, Serialize};

use super::{Api, ApiError, parse_object};
use crate::backend::Backend;
use crate::catalog::cache::CachedBatch;
use crate::catalog::codes::{CodesAdded, chunk_tag};
use crate::domain::batch::CodeSource;
use crate::domain::codes::{MAX_CODE_LEN, valid_code};
use crate::jobs::upload::{Line, LineItem, LineReader};
use crate::jobs::{JobFailure, LineFormat};
use crate::obs::events::CodesReceived;

/// Longest line of a streamed upload: a code in a JSON object, with room to spare.
const MAX_LINE_BYTES: usize = 4 * MAX_CODE_LEN;

const BAD_CODE: &str = "code must be 1-64 characters of [A-Za-z0-9._-]";

/// The lines of a code upload.
const CODE_LINES: LineItem = LineItem {
    field: "code",
    valid: valid_code,
    bad: BAD_CODE,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Codes {
    codes: Vec<String>,
}

/// The 200 body.
#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    pub batch_id: String,
    /// Codes received: valid lines or items, repeats included.
    pub received: u64,
    pub added: u64,
    /// Codes the batch already had (an earlier import, or earlier in this one).
    pub duplicates: u64,
    /// Lines that held no valid code (streamed uploads only).
    pub invalid: u64,
    /// Codes refused because the batch would pass its `stock`.
    pub over_capacity: u64,
    /// Codes the batch holds after the import.
    pub total: i64,
    /// The first invalid lines (`grants.max_errors` of them), each with its number.
    pub errors: Vec<JobFailure>,
}

/// An import under way: the batch, the chunk being filled, and the line being read.
pub struct Import {
    entry: std::sync::Arc<CachedBatch>,
    tag: String,
    chunks: u64,
    chunk: Vec<String>,
    chunk_max: usize,
    /// Codes the batch may still take (counted once, at the start).
    room: usize,
    max_errors: usize,
    report: ImportReport,
    lines: LineReader,
}

impl Import {
    /// An import into batch `id` starts: 404 when there is no such batch, 409
    /// `invalid_state` when its codes are not imported.
    pub async fn begin<B: Backend>(
        api: &Api<B>,
        id: &str,
        format: LineFormat,
    ) -> Result<Self, ApiError> {
        let entry = api.catalog().load_live(id).await?;
        if entry.batch().codes != Some(CodeSource::Imported {}) {
            return Err(ApiError::InvalidState(format!(
                "batch {id} does not take imported codes (its codes.source is not \"imported\")"
            )));
        }
        let room = api.catalog().code_room(&entry.batch()).await?;
        Ok(Import {
            room,
            entry,
            tag: chunk_tag(),
            chunks: 0,
            chunk: Vec::new(),
            chunk_max: api.config().batches.codes_chunk,
            max_errors: api.config().grants.max_errors,
            report: ImportReport {
                batch_id: id.to_string(),
                ..ImportReport::default()
            },
            lines: LineReader::new(CODE_LINES, format, MAX_LINE_BYTES),
        })
    }

    /// The next bytes of a streamed body.
    pub async fn accept<B: Backend>(
        &mut self,
        api: &Api<B>,
        mut data: &[u8],
    ) -> Result<(), ApiError> {
        while let Some((no, line)) = self.lines.next(&mut data) {
            self.take_line(api, no, line).await?;
        }
        Ok(())
    }

    async fn take_line<B: Backend>(
        &mut self,
        api: &Api<B>,
        no: u64,
        line: Line,
    ) -> Result<(), ApiError> {
        match line {
            Line::Skip | Line::Header => Ok(()),
            Line::Value(code) => self.push(api, code).await,
            Line::Invalid(reason) => {
                self.report.invalid += 1;
                if self.report.errors.len() < self.max_errors {
                    self.report.errors.push(JobFailure {
                        line: Some(no),
                        user_id: None,
                        reason,
                    });
                }
                Ok(())
            }
        }
    }

    /// One valid code.
    async fn push<B: Backend>(&mut self, api: &Api<B>, code: String) -> Result<(), ApiError> {
        self.report.received += 1;
        self.chunk.push(code);
        if self.chunk.len() >= self.chunk_max {
            self.flush(api).await?;
        }
        Ok(())
    }

    async fn flush<B: Backend>(&mut self, api: &Api<B>) -> Result<(), ApiError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.chunks += 1;
        let chunk = format!("{}-{}", self.tag, self.chunks);
        let batch = self.entry.batch();
        let got = api
            .catalog()
            .add_codes(
                &batch,
                &self.entry.keys,
                &chunk,
                &self.chunk,
                &mut self.room,
            )
            .await?;
        self.chunk.clear();
        self.count(got);
        Ok(())
    }

    fn count(&mut self, got: CodesAdded) {
        self.report.added += got.added;
        self.report.duplicates += got.duplicates;
        self.report.over_capacity += got.over_capacity;
    }

    /// The body ended (a last line without `\n` counts): the last chunk is added, and the
    /// batch's other instances learn its new stock.
    pub async fn finish<B: Backend>(mut self, api: &Api<B>) -> Result<ImportReport, ApiError> {
        if let Some((no, line)) = self.lines.last() {
            self.take_line(api, no, line).await?;
        }
        self.flush(api).await?;
        let id = self.entry.batch().id.clone();
        self.report.total = api.store().code_count(&id).await?;
        CodesReceived {
            batch: &id,
            source: "import",
            added: self.report.added,
            duplicates: self.report.duplicates,
            invalid: self.report.invalid,
            over_capacity: self.report.over_capacity,
        }
        .emit();
        if self.report.added > 0 {
            api.catalog().refresh(&self.entry).await;
            api.stock().announce_change(&id).await;
        }
        Ok(self.report)
    }
}

/// `POST /v1/batches/{id}/codes` with `{"codes": [...]}`: every code checked first.
pub async fn import_json<B: Backend>(
    api: &Api<B>,
    id: &str,
    body: &[u8],
) -> Result<ImportReport, ApiError> {
    let codes: Codes = parse_object(body, "codes body")?;
    if codes.codes.is_empty() {
        return Err(ApiError::BadRequest("codes must not be empty".into()));
    }
    if let Some(i) = codes.codes.iter().position(|c| !valid_code(c)) {
        return Err(ApiError::BadRequest(format!("codes[{i}]: {BAD_CODE}")));
    }
    let mut import = Import::begin(api, id, LineFormat::Ndjson).await?;
    for code in codes.codes {
        import.push(api, code).await?;
    }
    import.finish(api).await
}
