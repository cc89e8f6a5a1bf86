//! Claim history: one record per claim attempt (who, which request id, what came back,
//! when), kept for `--verify` and written as JSON lines by `--history`.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::outcome::Class;

/// Which part of the run a claim belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Set-up claims that empty the batch before the sold-out scenario measures.
    Drain,
    /// The measured run.
    Measure,
}

/// One claim attempt and its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub phase: Phase,
    pub user: String,
    pub request_id: String,
    /// HTTP status; `None` when no answer came back (see `error`).
    pub status: Option<u16>,
    /// The body's `error` code, or `transport:<kind>` when there was no HTTP answer.
    pub error: Option<String>,
    /// `coupon_id` of a 200/201 answer.
    pub coupon_id: Option<String>,
    /// Whether the outcome is a correct answer under the run's workload.
    pub class: Class,
    /// Open loop only: the intended send time, µs since the start of the run.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub intended_us: Option<u64>,
    /// When the request was handed to the connection, µs since the start of the run.
    pub send_us: u64,
    /// When the answer (or the failure) arrived, µs since the start of the run.
    pub recv_us: u64,
}

impl ClaimRecord {
    /// A 201 (new coupon) or 200 (replay) answer.
    pub fn succeeded(&self) -> bool {
        matches!(self.status, Some(200 | 201))
    }

    /// The answer leaves it open whether a coupon was issued: no HTTP answer at all, or a
    /// server error other than the documented "nothing was claimed" 503s.
    pub fn outcome_unknown(&self) -> bool {
        match self.status {
            None => true,
            Some(s) if s >= 500 => !matches!(
                (s, self.error.as_deref()),
                (503, Some("overloaded" | "backend_unavailable"))
            ),
            Some(_) => false,
        }
    }
}

/// Writes the records as JSON lines.
pub fn write_jsonl(path: &Path, records: &[ClaimRecord]) -> io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut w = BufWriter::new(file);
    for r in records {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: Option<u16>, error: Option<&str>) -> ClaimRecord {
        ClaimRecord {
            phase: Phase::Measure,
            user: "u".into(),
            request_id: "r".into(),
            status,
            error: error.map(str::to_owned),
            coupon_id: None,
            class: Class::Expected,
            intended_us: None,
            send_us: 1,
            recv_us: 2,
        }
    }

    #[test]
    fn classifies_outcomes() {
        assert!(rec(Some(201), None).succeeded());
        assert!(rec(Some(200), None).succeeded());
        assert!(!rec(Some(410), Some("sold_out")).succeeded());
        assert!(rec(None, Some("transport:timeout")).outcome_unknown());
        assert!(rec(Some(500), None).outcome_unknown());
        assert!(!rec(Some(503), Some("overloaded")).outcome_unknown());
        assert!(!rec(Some(503), Some("backend_unavailable")).outcome_unknown());
        assert!(rec(Some(503), None).outcome_unknown());
        assert!(!rec(Some(429), Some("rate_limited")).outcome_unknown());
    }

    #[test]
    fn writes_json_lines() {
        let path = std::env::temp_dir().join(format!(
            "claimgate-loadtest-history-{}.jsonl",
            std::process::id()
        ));
        let mut a = rec(Some(201), None);
        a.coupon_id = Some("c-1".into());
        let mut b = rec(None, Some("transport:timeout"));
        b.class = Class::Unexpected;
        write_jsonl(&path, &[a.clone(), b.clone()]).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let back: ClaimRecord = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(back, a);
        let v: serde_json::Value = serde_json::from_str(lines[1]).expect("json");
        assert_eq!(v["status"], serde_json::Value::Null);
        assert_eq!(v["error"], "transport:timeout");
        assert_eq!(v["class"], "unexpected");
        let first: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(first["class"], "expected");
        assert!(v.get("intended_us").is_none());
        assert_eq!(v["send_us"], 1);
        assert_eq!(v["phase"], "measure");
    }
}
