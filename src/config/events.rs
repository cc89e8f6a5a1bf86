//! `[events]`: events out (the webhook, its signing secret, delivery timeouts, retries and
//! backoff) and the coupon sweeps (expiry, "expiring soon" reminders). Ranges are checked
//! by [`EventsConfig::check`], called from [`super::Config::check`], naming the key.
//!
//! Invariant kept here: with a webhook configured, it is an `http://` URL with a host and
//! a signing secret of at least [`MIN_SECRET_BYTES`] bytes goes with it; a delivery
//! attempt's lease outlives the attempt's own deadline (so two instances never attempt one
//! event at once while the first is still within its deadline).

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::secret::{Secret, redact_url};

/// Largest `events.ledger_max_page`: the database answers at most this many events per page.
pub const LEDGER_MAX_PAGE: u32 = 500;

/// Shortest `events.webhook_secret`.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Where events are POSTed as JSON (`http://` only: put a TLS-terminating egress proxy
    /// in front of an `https` consumer). Unset: nothing is delivered, but every event is
    /// still written to the outbox and waits there (the backlog gauge shows it), so that
    /// delivery turned on later loses nothing.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_opt_url"
    )]
    pub webhook_url: Option<String>,
    /// Key of the `Claimgate-Signature` HMAC-SHA256; required with `webhook_url`.
    pub webhook_secret: Option<Secret>,
    /// Longest wait for a connection to the webhook.
    pub connect_timeout_ms: u64,
    /// Longest one delivery attempt may take (connection, request, answer).
    pub request_timeout_ms: u64,
    /// Attempts of one event before it goes to the dead-letter state.
    pub max_attempts: u32,
    /// Wait before the next attempt: doubles from `backoff_min_ms` per failed attempt up to
    /// `backoff_max_ms`, with jitter (a random part of up to half of it).
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Events one instance attempts at once.
    pub concurrency: u32,
    /// Pause between looks for due events when there were none.
    pub poll_interval_ms: u64,
    /// How long an event claimed for an attempt is reserved for the instance attempting it
    /// (an instance that dies mid-attempt: another retries it after this). Must exceed
    /// `request_timeout_ms`.
    pub lease_ms: u64,
    /// The "expiring soon" reminder is written this long before a usable coupon's validity
    /// end, once per coupon (a coupon claimed inside that window is reminded at the next
    /// sweep). 0 = no reminders.
    pub expiring_soon_ms: u64,
    /// How often the expiry and reminder sweeps run (and the outbox gauges are measured).
    pub sweep_interval_ms: u64,
    /// Coupons per sweep pass (and per transaction of the expiry sweep).
    pub sweep_batch: u32,
    /// Events per page of the admin ledger (`GET /v1/events`) when `limit` is not given,
    /// and the largest `limit`.
    pub ledger_default_page: u32,
    pub ledger_max_page: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            webhook_url: None,
            webhook_secret: None,
            connect_timeout_ms: 2_000,
            request_timeout_ms: 5_000,
            max_attempts: 12,
            backoff_min_ms: 1_000,
            backoff_max_ms: 3_600_000,
            concurrency: 16,
            poll_interval_ms: 500,
            lease_ms: 30_000,
            expiring_soon_ms: 3 * 86_400_000,
            sweep_interval_ms: 1_000,
            sweep_batch: 500,
            ledger_default_page: 50,
            ledger_max_page: 200,
        }
    }
}

fn serialize_opt_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_str(&redact_url(u)),
        None => s.serialize_none(),
    }
}

impl fmt::Debug for EventsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let EventsConfig {
            webhook_url,
            webhook_secret,
            connect_timeout_ms,
            request_timeout_ms,
            max_attempts,
            backoff_min_ms,
            backoff_max_ms,
            concurrency,
            poll_interval_ms,
            lease_ms,
            expiring_soon_ms,
            sweep_interval_ms,
            sweep_batch,
            ledger_default_page,
            ledger_max_page,
        } = self;
        f.debug_struct("EventsConfig")
            .field("webhook_url", &webhook_url.as_deref().map(redact_url))
            .field("webhook_secret", webhook_secret)
            .field("connect_timeout_ms", connect_timeout_ms)
            .field("request_timeout_ms", request_timeout_ms)
            .field("max_attempts", max_attempts)
            .field("backoff_min_ms", backoff_min_ms)
            .field("backoff_max_ms", backoff_max_ms)
            .field("concurrency", concurrency)
            .field("poll_interval_ms", poll_interval_ms)
            .field("lease_ms", lease_ms)
            .field("expiring_soon_ms", expiring_soon_ms)
            .field("sweep_interval_ms", sweep_interval_ms)
            .field("sweep_batch", sweep_batch)
            .field("ledger_default_page", ledger_default_page)
            .field("ledger_max_page", ledger_max_page)
            .finish()
    }
}

impl EventsConfig {
    /// Range checks: `Err((key, message))`.
    pub(super) fn check(&self, marker: &str) -> Result<(), (&'static str, String)> {
        const HOUR_MS: u64 = 3_600_000;
        const DAY_MS: u64 = 24 * HOUR_MS;
        let bad = |key: &'static str, message: &str| Err((key, message.to_string()));
        if let Some(url) = &self.webhook_url {
            if url.contains(super::secret::REDACTED) {
                return bad("events.webhook_url", marker);
            }
            let uri: Option<http::Uri> = url.parse().ok();
            let ok = uri.as_ref().is_some_and(|u| {
                u.scheme_str() == Some("http") && u.host().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                return bad(
                    "events.webhook_url",
                    "must be an http://host[:port]/path URL (no TLS is built in: put a \
                     TLS-terminating egress proxy in front of an https consumer)",
                );
            }
            if uri
                .as_ref()
                .and_then(|u| u.authority())
                .is_some_and(|a| a.as_str().contains('@'))
            {
                return bad(
                    "events.webhook_url",
                    "must not carry credentials (user:password@): they would not be sent; \
                     consumers authenticate events by their Claimgate-Signature",
                );
            }
            match &self.webhook_secret {
                None => return bad("events.webhook_secret", "must be set with webhook_url"),
                Some(s) if s.is_redaction_marker() => {
                    return bad("events.webhook_secret", marker);
                }
                Some(s) if s.len() < MIN_SECRET_BYTES => {
                    return bad("events.webhook_secret", "must be at least 32 bytes");
                }
                Some(_) => {}
            }
        } else if self
            .webhook_secret
            .as_ref()
            .is_some_and(Secret::is_redaction_marker)
        {
            return bad("events.webhook_secret", marker);
        }
        let ranges: [(&'static str, u64, u64, u64); 13] = [
            (
                "events.connect_timeout_ms",
                self.connect_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "events.request_timeout_ms",
                self.request_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "events.max_attempts",
                u64::from(self.max_attempts),
                1,
                1_000,
            ),
            ("events.backoff_min_ms", self.backoff_min_ms, 1, DAY_MS),
            (
                "events.backoff_max_ms",
                self.backoff_max_ms,
                self.backoff_min_ms,
                7 * DAY_MS,
            ),
            ("events.concurrency", u64::from(self.concurrency), 1, 1_024),
            (
                "events.poll_interval_ms",
                self.poll_interval_ms,
                10,
                HOUR_MS,
            ),
            (
                "events.lease_ms",
                self.lease_ms,
                self.request_timeout_ms.saturating_add(1),
                DAY_MS,
            ),
            (
                "events.expiring_soon_ms",
                self.expiring_soon_ms,
                0,
                3_650 * DAY_MS,
            ),
            (
                "events.sweep_interval_ms",
                self.sweep_interval_ms,
                10,
                HOUR_MS,
            ),
            ("events.sweep_batch", u64::from(self.sweep_batch), 1, 10_000),
            (
                "events.ledger_max_page",
                u64::from(self.ledger_max_page),
                1,
                u64::from(LEDGER_MAX_PAGE),
            ),
            (
                "events.ledger_default_page",
                u64::from(self.ledger_default_page),
                1,
                u64::from(self.ledger_max_page),
            ),
        ];
        for (key, value, lo, hi) in ranges {
            if !(lo..=hi).contains(&value) {
                let message = if key == "events.lease_ms" {
                    format!("must exceed events.request_timeout_ms and be at most {hi}")
                } else {
                    format!("must be {lo}..={hi}")
                };
                return Err((key, message));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::load;

    const SECRET: &str = "webhook-secret-0123456789-0123456789-SECRET";

    fn with(sets: &[&str]) -> Result<super::super::Config, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load(None, Vec::new(), &sets).map_err(|e| e.to_string())
    }

    /// Every out-of-range value is refused naming its key; the edges load.
    #[test]
    fn events_values_are_checked_naming_the_key() {
        let url = "events.webhook_url=\"http://127.0.0.1:9/hook\"";
        let secret = format!("events.webhook_secret=\"{SECRET}\"");
        for (sets, key) in [
            (vec![url], "events.webhook_secret"),
            (
                vec![url, "events.webhook_secret=\"short\""],
                "events.webhook_secret",
            ),
            (
                vec!["events.webhook_url=\"https://example.test/hook\"", &secret],
                "events.webhook_url",
            ),
            (
                vec!["events.webhook_url=\"not a url\"", &secret],
                "events.webhook_url",
            ),
            (
                vec!["events.webhook_url=\"http:///nohost\"", &secret],
                "events.webhook_url",
            ),
            (vec!["events.max_attempts=0"], "events.max_attempts"),
            (vec!["events.concurrency=0"], "events.concurrency"),
            (
                vec!["events.connect_timeout_ms=0"],
                "events.connect_timeout_ms",
            ),
            (
                vec!["events.request_timeout_ms=0"],
                "events.request_timeout_ms",
            ),
            (vec!["events.backoff_min_ms=0"], "events.backoff_min_ms"),
            (
                vec!["events.backoff_min_ms=5000", "events.backoff_max_ms=4000"],
                "events.backoff_max_ms",
            ),
            (vec!["events.lease_ms=5000"], "events.lease_ms"),
            (vec!["events.poll_interval_ms=1"], "events.poll_interval_ms"),
            (
                vec!["events.sweep_interval_ms=1"],
                "events.sweep_interval_ms",
            ),
            (vec!["events.sweep_batch=0"], "events.sweep_batch"),
            (vec!["events.ledger_max_page=501"], "events.ledger_max_page"),
            (
                vec!["events.ledger_default_page=300"],
                "events.ledger_default_page",
            ),
            (
                vec!["events.webhook_secret=\"<redacted>\""],
                "events.webhook_secret",
            ),
        ] {
            let err = with(&sets).expect_err(&format!("{sets:?}"));
            assert!(err.contains(&format!("`{key}`")), "{sets:?}: {err}");
        }
        let c = with(&[
            url,
            &secret,
            "events.lease_ms=5001",
            "events.expiring_soon_ms=0",
        ])
        .expect("edges load");
        assert_eq!(
            c.events.webhook_url.as_deref(),
            Some("http://127.0.0.1:9/hook")
        );
    }

    /// The secret never reaches the dump or `Debug`; the dump loads again once the secret
    /// is given. A URL with credentials is refused without echoing them.
    #[test]
    fn the_webhook_secret_is_redacted() {
        let err = with(&[
            "events.webhook_url=\"http://hook:PASS-SECRET@127.0.0.1:9/hook\"",
            &format!("events.webhook_secret=\"{SECRET}\""),
        ])
        .unwrap_err();
        assert!(
            err.contains("`events.webhook_url`") && !err.contains("SECRET"),
            "{err}"
        );
        let c = with(&[
            "events.webhook_url=\"http://127.0.0.1:9/hook\"",
            &format!("events.webhook_secret=\"{SECRET}\""),
        ])
        .unwrap();
        let dump = c.to_toml().unwrap();
        let debug = format!("{c:?}");
        for out in [&dump, &debug] {
            assert!(!out.contains("SECRET"), "{out}");
        }
        assert!(c.scrub(&format!("x {SECRET} y")).contains("<redacted>"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dump.toml");
        std::fs::write(&f, &dump).unwrap();
        let err = load(Some(&f), Vec::new(), &[]).unwrap_err().to_string();
        assert!(err.contains("events.webhook_secret"), "{err}");
        let again = load(
            Some(&f),
            vec![(
                "CLAIMGATE_EVENTS__WEBHOOK_SECRET".to_string(),
                SECRET.to_string(),
            )],
            &[],
        )
        .unwrap();
        assert_eq!(again.to_toml().unwrap(), dump);
    }
}
