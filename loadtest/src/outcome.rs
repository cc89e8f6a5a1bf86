//! Outcome classes: every answer (HTTP status and `error` code) and every request without
//! an answer is either *expected* (a correct answer of the gateway under this workload,
//! such as `410 sold_out` once the stock is gone) or *unexpected* (something to look
//! into: a 5xx, a transport error, a timeout, an unknown code).
//!
//! Invariant: the class is a pure function of the scenario, the phase, the flags and the
//! outcome, so the live progress line, the table, the JSON, the history and the report
//! all classify one outcome the same way.

use serde::{Deserialize, Serialize};

use crate::cli::ScenarioKind;
use crate::history::Phase;
use crate::report::Endpoint;

/// The lock answer of a coupon not yet in the database.
pub const NOT_PERSISTED: &str = "coupon_not_found";
/// The code recorded for the last such answer of a checkout that stopped retrying.
pub const GAVE_UP: &str = "coupon_not_found:gave_up";

/// Whether an outcome is a correct answer under the run's workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Expected,
    Unexpected,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Self::Expected => "expected",
            Self::Unexpected => "unexpected",
        }
    }
}

/// What counts as expected in one phase of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectations {
    pub scenario: ScenarioKind,
    pub phase: Phase,
    /// `--expect-shedding`: `429 rate_limited` and `503 overloaded` are the gateway doing
    /// its job (an overload run).
    pub shedding: bool,
    /// The batch was given with `--batch`: the tester did not make its rules, so
    /// `403 not_eligible` is a correct answer.
    pub foreign_batch: bool,
}

impl Expectations {
    /// Whether `429 rate_limited` is expected: with `--expect-shedding`, and in hot-users,
    /// whose bots exist to run into the per-user limiters.
    fn rate_limits(&self) -> bool {
        self.shedding || self.scenario == ScenarioKind::HotUsers
    }

    /// A shedding answer (`429 rate_limited`, `503 overloaded`) that this run expects.
    fn shed(&self, status: u16, code: Option<&str>) -> bool {
        match (status, code) {
            (429, Some("rate_limited")) => self.rate_limits(),
            (503, Some("overloaded")) => self.shedding,
            _ => false,
        }
    }

    /// Classifies one outcome: `status` is `None` when no HTTP answer came back.
    pub fn classify(&self, endpoint: Endpoint, status: Option<u16>, code: Option<&str>) -> Class {
        let Some(status) = status else {
            // connect failure, timeout, protocol or body error
            return Class::Unexpected;
        };
        if self.shed(status, code) {
            return Class::Expected;
        }
        let expected = match endpoint {
            Endpoint::Health
            | Endpoint::GetBatch
            | Endpoint::Product
            | Endpoint::Quote
            | Endpoint::Wallet
            | Endpoint::Redeem => status == 200,
            // A lock of a coupon claimed a moment ago may find it not yet in the database
            // (the wallet lags the claim): retried by the checkout, not a gateway error.
            // The last try of a checkout that gave up is recorded with the code
            // `coupon_not_found:gave_up`, which is unexpected. Every order is fresh, so a
            // 409 is never expected.
            Endpoint::Lock => matches!((status, code), (200, _) | (404, Some(NOT_PERSISTED))),
            Endpoint::Claim => match (status, code) {
                // A batch drained before measuring never issues again: a coupon there
                // means stock came back.
                (200 | 201, _) => {
                    !(self.scenario == ScenarioKind::SoldOut && self.phase == Phase::Measure)
                }
                (410, Some("sold_out")) => true,
                (409, Some("limit_reached" | "not_started" | "ended" | "paused")) => true,
                (403, Some("not_eligible")) => self.foreign_batch,
                _ => false,
            },
        };
        if expected {
            Class::Expected
        } else {
            Class::Unexpected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(scenario: ScenarioKind) -> Expectations {
        Expectations {
            scenario,
            phase: Phase::Measure,
            shedding: false,
            foreign_batch: false,
        }
    }

    fn claim(e: &Expectations, status: u16, code: Option<&str>) -> Class {
        e.classify(Endpoint::Claim, Some(status), code)
    }

    #[test]
    fn flash_sale_answers() {
        let e = exp(ScenarioKind::FlashSale);
        for (status, code) in [
            (201, None),
            (200, None),
            (410, Some("sold_out")),
            (409, Some("limit_reached")),
            (409, Some("not_started")),
            (409, Some("ended")),
            (409, Some("paused")),
        ] {
            assert_eq!(
                claim(&e, status, code),
                Class::Expected,
                "{status} {code:?}"
            );
        }
        for (status, code) in [
            (500, Some("internal")),
            (500, None),
            (502, None),
            (503, Some("backend_unavailable")),
            (503, Some("indeterminate")),
            (503, Some("overloaded")),
            (429, Some("rate_limited")),
            (400, Some("bad_request")),
            (401, Some("unauthorized")),
            (403, Some("not_eligible")),
            (404, Some("batch_not_found")),
            (409, Some("batch_exists")),
            (409, None),
            (410, None),
            (410, Some("gone_fishing")),
            (202, None),
            (302, None),
        ] {
            assert_eq!(
                claim(&e, status, code),
                Class::Unexpected,
                "{status} {code:?}"
            );
        }
        assert_eq!(
            e.classify(Endpoint::Claim, None, Some("transport:timeout")),
            Class::Unexpected
        );
    }

    #[test]
    fn shedding_is_expected_only_when_asked() {
        let mut e = exp(ScenarioKind::FlashSale);
        e.shedding = true;
        assert_eq!(claim(&e, 503, Some("overloaded")), Class::Expected);
        assert_eq!(claim(&e, 429, Some("rate_limited")), Class::Expected);
        // Shedding never excuses the other 5xx or a missing answer.
        assert_eq!(
            claim(&e, 503, Some("backend_unavailable")),
            Class::Unexpected
        );
        assert_eq!(claim(&e, 500, None), Class::Unexpected);
        assert_eq!(e.classify(Endpoint::Claim, None, None), Class::Unexpected);
        // Reads and health checks can be shed too.
        assert_eq!(
            e.classify(Endpoint::GetBatch, Some(503), Some("overloaded")),
            Class::Expected
        );
        assert_eq!(
            e.classify(Endpoint::Health, Some(429), Some("rate_limited")),
            Class::Expected
        );
    }

    #[test]
    fn hot_users_expect_rate_limits_not_overload() {
        let e = exp(ScenarioKind::HotUsers);
        assert_eq!(claim(&e, 429, Some("rate_limited")), Class::Expected);
        assert_eq!(claim(&e, 409, Some("limit_reached")), Class::Expected);
        assert_eq!(claim(&e, 503, Some("overloaded")), Class::Unexpected);
    }

    #[test]
    fn sold_out_phase_must_not_issue() {
        let e = exp(ScenarioKind::SoldOut);
        assert_eq!(claim(&e, 410, Some("sold_out")), Class::Expected);
        assert_eq!(claim(&e, 201, None), Class::Unexpected);
        assert_eq!(claim(&e, 200, None), Class::Unexpected);
        let drain = Expectations {
            phase: Phase::Drain,
            ..e
        };
        assert_eq!(claim(&drain, 201, None), Class::Expected);
        assert_eq!(claim(&drain, 410, Some("sold_out")), Class::Expected);
    }

    #[test]
    fn reads_and_health() {
        let e = exp(ScenarioKind::Mixed);
        assert_eq!(
            e.classify(Endpoint::GetBatch, Some(200), None),
            Class::Expected
        );
        assert_eq!(
            e.classify(Endpoint::GetBatch, Some(404), Some("batch_not_found")),
            Class::Unexpected
        );
        let t = exp(ScenarioKind::Trivial);
        assert_eq!(
            t.classify(Endpoint::Health, Some(200), None),
            Class::Expected
        );
        assert_eq!(
            t.classify(Endpoint::Health, Some(503), None),
            Class::Unexpected
        );
        assert_eq!(
            t.classify(Endpoint::Health, None, Some("transport:connect")),
            Class::Unexpected
        );
    }

    #[test]
    fn eligibility_depends_on_whose_batch() {
        let mut e = exp(ScenarioKind::FlashSale);
        assert_eq!(claim(&e, 403, Some("not_eligible")), Class::Unexpected);
        e.foreign_batch = true;
        assert_eq!(claim(&e, 403, Some("not_eligible")), Class::Expected);
        assert_eq!(claim(&e, 401, Some("unauthorized")), Class::Unexpected);
    }

    #[test]
    fn checkout_steps() {
        let e = exp(ScenarioKind::Checkout);
        let c = |ep, status, code| e.classify(ep, Some(status), code);
        assert_eq!(c(Endpoint::Claim, 201, None), Class::Expected);
        assert_eq!(c(Endpoint::Wallet, 200, None), Class::Expected);
        assert_eq!(c(Endpoint::Lock, 200, None), Class::Expected);
        assert_eq!(c(Endpoint::Redeem, 200, None), Class::Expected);
        // not yet persisted: retried, expected; given up on: unexpected
        assert_eq!(c(Endpoint::Lock, 404, Some(NOT_PERSISTED)), Class::Expected);
        assert_eq!(c(Endpoint::Lock, 404, Some(GAVE_UP)), Class::Unexpected);
        // fresh orders: a conflict is a real failure
        for ep in [Endpoint::Lock, Endpoint::Redeem] {
            assert_eq!(c(ep, 409, Some("invalid_state")), Class::Unexpected);
        }
        assert_eq!(
            c(Endpoint::Redeem, 404, Some(NOT_PERSISTED)),
            Class::Unexpected
        );
        assert_eq!(c(Endpoint::Wallet, 500, None), Class::Unexpected);
    }

    #[test]
    fn class_names_serialize_lowercase() {
        assert_eq!(
            serde_json::to_value(Class::Unexpected).expect("json"),
            "unexpected"
        );
        assert_eq!(Class::Expected.name(), "expected");
    }
}
