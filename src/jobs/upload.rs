//! A grant job's upload, spooled as it arrives: the lines of a streamed NDJSON or CSV body
//! (split incrementally, each checked), or the ids of a `{"user_ids": [...]}` body, written
//! to the database in chunks of `grants.chunk_users`.
//!
//! Invariants kept here: memory holds at most one chunk and one line (a line longer than
//! `grants.max_line_bytes` is counted `failed` and skipped without being held), however
//! large the upload; a job never takes more than `grants.max_users` lines; every line that
//! is not blank (nor a CSV header) is either a spooled user id of the client alphabet
//! (`domain::ids::valid_ident`) or counted `failed` with its reason.

use serde::{Deserialize, Serialize};

use super::GrantError;
use crate::config::GrantsConfig;
use crate::domain::ids::valid_ident;
use crate::store::{Db, Spooled, now_ms};

/// The format of a streamed upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `application/x-ndjson`: per line `{"user_id": "..."}` or a bare JSON string.
    Ndjson,
    /// `text/csv`: one user id per line (optionally in double quotes), an optional first
    /// line `user_id` (the header).
    Csv,
}

/// One failure a job keeps (the first `grants.max_errors` of them): the upload's line
/// number (invalid lines) or the user (refused grants), and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFailure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub reason: String,
}

/// What one line of an upload is.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A valid value of the line's item (a user id, a code).
    Value(String),
    /// Blank: not counted.
    Skip,
    /// The CSV header (`user_id` on the first line that is not blank): not counted.
    Header,
    Invalid(String),
}

const BAD_ID: &str = "user_id must be 1-128 characters of [A-Za-z0-9._@+-]";

/// What the lines of an upload hold: the field name (the NDJSON object's one key, the CSV
/// header), the check of a value, and the reason a value fails it.
#[derive(Debug, Clone, Copy)]
pub struct LineItem {
    pub field: &'static str,
    pub valid: fn(&str) -> bool,
    pub bad: &'static str,
}

/// A grant upload's lines: user ids.
pub const USER_LINES: LineItem = LineItem {
    field: "user_id",
    valid: valid_ident,
    bad: BAD_ID,
};

/// Reads one line (without its `\n`) of a grant upload. `first` is whether no line was
/// counted or skipped before (where a CSV header may stand).
pub fn parse_line(format: LineFormat, raw: &[u8], first: bool) -> Line {
    parse_item(USER_LINES, format, raw, first)
}

/// Reads one line (without its `\n`) holding one `item`: NDJSON `{"<field>": "..."}` or a
/// bare JSON string; CSV the value, optionally in double quotes, after an optional header
/// line `<field>`. A valid value is [`Line::Value`].
pub fn parse_item(item: LineItem, format: LineFormat, raw: &[u8], first: bool) -> Line {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let Ok(text) = std::str::from_utf8(raw) else {
        return Line::Invalid("not UTF-8".into());
    };
    // spaces and tabs only (what the document's pattern allows around an id)
    let text = text.trim_matches([' ', '\t']);
    if text.is_empty() {
        return Line::Skip;
    }
    let id = match format {
        LineFormat::Ndjson => {
            let parsed = if text.starts_with('{') {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                    .ok()
                    .filter(|m| m.len() == 1)
                    .and_then(|mut m| m.remove(item.field))
                    .and_then(|v| match v {
                        serde_json::Value::String(s) => Some(s),
                        _ => None,
                    })
            } else {
                serde_json::from_str::<String>(text).ok()
            };
            match parsed {
                Some(id) => id,
                None => {
                    return Line::Invalid(format!(
                        "not a JSON object {{\"{}\": ...}} or a JSON string",
                        item.field
                    ));
                }
            }
        }
        LineFormat::Csv => {
            let id = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                Some(inner) => inner,
                None => text,
            };
            if first && id == item.field {
                return Line::Header;
            }
            id.to_string()
        }
    };
    if (item.valid)(&id) {
        Line::Value(id)
    } else {
        Line::Invalid(item.bad.into())
    }
}

/// A streamed upload read line by line as its bytes arrive: it holds at most one line of
/// `max` bytes (a longer one is read as `Invalid` without being held), numbers the lines,
/// and knows whether a CSV header may still stand (no line was counted or skipped before).
#[derive(Debug)]
pub struct LineReader {
    item: LineItem,
    format: LineFormat,
    max: usize,
    line: Vec<u8>,
    overlong: bool,
    line_no: u64,
    seen_line: bool,
}

impl LineReader {
    pub fn new(item: LineItem, format: LineFormat, max: usize) -> LineReader {
        LineReader {
            item,
            format,
            max,
            line: Vec::new(),
            overlong: false,
            line_no: 0,
            seen_line: false,
        }
    }

    /// The next complete line of `data`, consumed up to and including its `\n`: its
    /// number and what it holds. `None` once `data` is used up (a line it ends in the
    /// middle of is kept for the next call, or for [`LineReader::last`]).
    pub fn next(&mut self, data: &mut &[u8]) -> Option<(u64, Line)> {
        while !data.is_empty() {
            let (part, rest, ends) = match data.iter().position(|b| *b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (*data, &data[data.len()..], false),
            };
            if !self.overlong {
                if self.line.len() + part.len() > self.max {
                    self.overlong = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            *data = rest;
            if ends {
                return Some(self.end());
            }
        }
        None
    }

    /// The line the body ended in without a final `\n`, if any.
    pub fn last(&mut self) -> Option<(u64, Line)> {
        (!self.line.is_empty() || self.overlong).then(|| self.end())
    }

    fn end(&mut self) -> (u64, Line) {
        self.line_no += 1;
        let parsed = if self.overlong {
            Line::Invalid(format!("line longer than {} bytes", self.max))
        } else {
            parse_item(self.item, self.format, &self.line, !self.seen_line)
        };
        self.line.clear();
        self.overlong = false;
        if parsed != Line::Skip {
            self.seen_line = true;
        }
        (self.line_no, parsed)
    }
}

/// An upload being spooled to its job (see the module documentation).
pub struct Spool {
    db: Db,
    pub(super) job: String,
    pub(super) batch: String,
    chunk_users: usize,
    max_users: u64,
    max_errors: usize,
    /// The chunk being filled: user ids, one per line.
    chunk: String,
    in_chunk: usize,
    chunks: u64,
    /// Lines counted (users and invalid lines).
    total: u64,
    /// Valid user ids among them.
    users: u64,
    failed: u64,
    errors: Vec<JobFailure>,
    lines: LineReader,
}

impl Spool {
    pub(super) fn new(
        db: Db,
        job: String,
        batch: String,
        format: LineFormat,
        cfg: &GrantsConfig,
    ) -> Spool {
        Spool {
            db,
            job,
            batch,
            chunk_users: cfg.chunk_users,
            max_users: cfg.max_users,
            max_errors: cfg.max_errors,
            chunk: String::new(),
            in_chunk: 0,
            chunks: 0,
            total: 0,
            users: 0,
            failed: 0,
            errors: Vec::new(),
            lines: LineReader::new(USER_LINES, format, cfg.max_line_bytes),
        }
    }

    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.job
    }

    /// Lines counted so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The next bytes of a streamed body.
    pub async fn push_bytes(&mut self, mut data: &[u8]) -> Result<(), GrantError> {
        while let Some((no, line)) = self.lines.next(&mut data) {
            self.take_line(no, line).await?;
        }
        Ok(())
    }

    async fn take_line(&mut self, no: u64, line: Line) -> Result<(), GrantError> {
        match line {
            Line::Skip | Line::Header => Ok(()),
            Line::Value(id) => self.push_user(&id).await,
            Line::Invalid(reason) => {
                self.count_line()?;
                self.failed += 1;
                if self.errors.len() < self.max_errors {
                    self.errors.push(JobFailure {
                        line: Some(no),
                        user_id: None,
                        reason,
                    });
                }
                Ok(())
            }
        }
    }

    fn count_line(&mut self) -> Result<(), GrantError> {
        if self.total >= self.max_users {
            return Err(GrantError::TooManyUsers(self.max_users));
        }
        self.total += 1;
        Ok(())
    }

    /// One valid user id (checked by the caller or [`parse_line`]).
    pub async fn push_user(&mut self, id: &str) -> Result<(), GrantError> {
        self.count_line()?;
        self.users += 1;
        if self.in_chunk > 0 {
            self.chunk.push('\n');
        }
        self.chunk.push_str(id);
        self.in_chunk += 1;
        if self.in_chunk >= self.chunk_users {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), GrantError> {
        if self.in_chunk == 0 {
            return Ok(());
        }
        self.db
            .spool_grant_chunk(&self.job, self.chunks, &self.chunk, now_ms())
            .await?;
        self.chunks += 1;
        self.chunk.clear();
        self.in_chunk = 0;
        Ok(())
    }

    /// The body ended: the last line (without a final newline) and the last chunk are
    /// spooled. Refused when the upload held no valid user id (saying why its first
    /// invalid line was refused, if it had one).
    pub(super) async fn finish(&mut self) -> Result<Spooled, GrantError> {
        if let Some((no, line)) = self.lines.last() {
            self.take_line(no, line).await?;
        }
        if self.users == 0 {
            return Err(GrantError::Empty(match self.errors.first() {
                Some(JobFailure {
                    line: Some(n),
                    reason,
                    ..
                }) => format!(" (line {n}: {reason})"),
                _ => String::new(),
            }));
        }
        self.flush().await?;
        let errors = serde_json::to_string(&self.errors)
            .map_err(|e| GrantError::Internal(format!("failures do not serialize: {e}")))?;
        Ok(Spooled {
            chunks: self.chunks,
            total: self.total,
            failed: self.failed,
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        use Line::*;
        let nd = |s: &str| parse_line(LineFormat::Ndjson, s.as_bytes(), false);
        let csv = |s: &str, first| parse_line(LineFormat::Csv, s.as_bytes(), first);
        assert_eq!(nd(r#"{"user_id": "u1"}"#), Value("u1".into()));
        assert_eq!(nd("\"u2\"\r"), Value("u2".into()));
        assert_eq!(nd("\t \"u2\" "), Value("u2".into()));
        assert!(
            matches!(nd("\u{a0}\"u2\""), Invalid(_)),
            "only spaces and tabs trimmed"
        );
        assert_eq!(nd("  "), Skip);
        for bad in [
            r#"{"user_id": 1}"#,
            r#"{"user_id": "u", "x": 1}"#,
            r#"{"user_id": "a:b"}"#,
            "u3",
            "[\"u\"]",
            r#""""#,
        ] {
            assert!(matches!(nd(bad), Invalid(_)), "{bad}");
        }
        assert_eq!(csv("user_id", true), Header);
        assert_eq!(csv("\"user_id\"", true), Header);
        assert_eq!(csv("user_id", false), Value("user_id".into()));
        assert_eq!(csv("u1\r", false), Value("u1".into()));
        assert_eq!(csv("\"u1\"", false), Value("u1".into()));
        assert!(matches!(csv("u1,u2", false), Invalid(_)));
        assert!(matches!(
            parse_line(LineFormat::Csv, b"\xff", false),
            Invalid(_)
        ));
    }
}
