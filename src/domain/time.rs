//! Time as the gateway and its scripts count it: milliseconds since the Unix epoch (the
//! unit Redis stamps claims with), written as RFC 3339 UTC at the API.
//!
//! Invariant kept here: a [`Timestamp`] between [`Timestamp::MIN`] and [`Timestamp::MAX`]
//! formats to RFC 3339 and back without loss, and the scripts can read it (`(%d+)`: no
//! minus sign).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch, serialized as RFC 3339 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The Unix epoch, the earliest time a batch may name: the scripts record times as
    /// unsigned decimal milliseconds (`(%d+)` matches no minus sign).
    pub const MIN: Timestamp = Timestamp(0);
    /// 9999-12-31T23:59:59.999Z, the latest time RFC 3339 can write (a four-digit year).
    pub const MAX: Timestamp = Timestamp(253_402_300_799_999);

    pub fn now() -> Timestamp {
        Timestamp((OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64)
    }

    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
    }

    pub fn parse(s: &str) -> Option<Timestamp> {
        let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        Some(Timestamp((t.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid RFC 3339 time: {s:?}")))
    }
}

/// Current time, milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    Timestamp::now().0
}

/// Where the time of the coupon lifecycle comes from (transitions, expiry, reminders,
/// delivery retries): the system clock in a running gateway, a [`ManualClock`] in tests,
/// so that expiry and reminders are tested without sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    pub fn new(now_ms: i64) -> ManualClock {
        ManualClock(std::sync::atomic::AtomicI64::new(now_ms))
    }

    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Milliseconds per day, as `lua/claim.lua` counts days.
pub const DAY_MS: i64 = 86_400_000;

/// Why a time zone name is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("unknown time zone {0:?}: give an IANA name such as \"Asia/Shanghai\" or \"UTC\"")]
pub struct UnknownZone(pub String);

/// The IANA time zone a batch counts its days in (per-user daily limits reset at its local
/// midnight). The zone database is compiled into the binary (`jiff`'s bundled tzdb), so a
/// machine without `/usr/share/zoneinfo` resolves the same names to the same offsets.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone(jiff::tz::TimeZone);

impl Zone {
    /// Coordinated Universal Time: the zone of a batch that names none.
    pub fn utc() -> Zone {
        Zone(jiff::tz::TimeZone::UTC)
    }

    /// The zone of an IANA name (matched without regard to case), or why not.
    pub fn named(name: &str) -> Result<Zone, UnknownZone> {
        jiff::tz::db()
            .get(name)
            .map(Zone)
            .map_err(|_| UnknownZone(name.to_string()))
    }

    /// The IANA name as the database spells it ("asia/shanghai" -> "Asia/Shanghai").
    pub fn name(&self) -> &str {
        self.0.iana_name().unwrap_or("UTC")
    }

    /// The zone's offset from UTC at the instant `at_ms`, in milliseconds (east positive).
    pub fn offset_ms_at(&self, at_ms: i64) -> i64 {
        let at = jiff::Timestamp::from_millisecond(at_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        i64::from(self.0.to_offset(at).seconds()) * 1000
    }

    /// The local day number of the instant `at_ms`: `floor((at + offset(at)) / DAY_MS)`, as
    /// `lua/claim.lua` counts it with the offset the gateway passes.
    pub fn local_day(&self, at_ms: i64) -> i64 {
        local_day(at_ms, self.offset_ms_at(at_ms))
    }
}

/// The day number of `at_ms` shifted by `offset_ms` (the script's arithmetic, shared).
pub fn local_day(at_ms: i64, offset_ms: i64) -> i64 {
    (at_ms + offset_ms).div_euclid(DAY_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        Timestamp::parse(s).unwrap().0
    }

    #[test]
    fn shanghai_days_turn_at_local_midnight_not_at_utc_midnight() {
        let sh = Zone::named("Asia/Shanghai").unwrap();
        assert_eq!(sh.offset_ms_at(at("2026-11-11T12:00:00Z")), 8 * 3_600_000);
        // 23:59:59.999 and 00:00 in Beijing are 15:59:59.999Z and 16:00Z
        let before = sh.local_day(at("2026-11-11T15:59:59.999Z"));
        let after = sh.local_day(at("2026-11-11T16:00:00Z"));
        assert_eq!(after, before + 1);
        // the UTC day does not turn there; it turns at 00:00Z, Beijing's does not
        let utc = Zone::utc();
        assert_eq!(
            utc.local_day(at("2026-11-11T15:59:59.999Z")),
            utc.local_day(at("2026-11-11T16:00:00Z"))
        );
        assert_eq!(
            sh.local_day(at("2026-11-11T23:59:59Z")),
            sh.local_day(at("2026-11-12T00:00:00Z"))
        );
        // a UTC batch counts days as the script always did: floor(now / DAY_MS)
        let t = at("2026-11-11T16:00:00Z");
        assert_eq!(utc.local_day(t), t.div_euclid(DAY_MS));
    }

    #[test]
    fn zones_west_of_utc_and_with_daylight_saving() {
        let ny = Zone::named("America/New_York").unwrap();
        assert_eq!(ny.offset_ms_at(at("2026-01-15T12:00:00Z")), -5 * 3_600_000);
        assert_eq!(ny.offset_ms_at(at("2026-07-15T12:00:00Z")), -4 * 3_600_000);
        let d = ny.local_day(at("2026-07-15T03:59:59Z"));
        assert_eq!(ny.local_day(at("2026-07-15T04:00:00Z")), d + 1);
        // before the epoch's day 0 the division floors
        assert_eq!(local_day(1000, -3_600_000), -1);
    }

    #[test]
    fn names_are_checked_and_spelled_as_the_database_spells_them() {
        assert_eq!(
            Zone::named("asia/shanghai").unwrap().name(),
            "Asia/Shanghai"
        );
        assert_eq!(Zone::named("UTC").unwrap().name(), "UTC");
        assert_eq!(Zone::utc().name(), "UTC");
        for bad in ["", "Mars/Olympus", "Asia/", "../etc/passwd", "Beijing"] {
            assert!(Zone::named(bad).is_err(), "{bad:?}");
        }
    }
}
