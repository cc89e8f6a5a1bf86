//! The webhook signature: `Claimgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>" keyed with events.webhook_secret>`, the convention webhook consumers
//! already verify; and its verification, as a consumer does it (used by the tests, and the
//! reference for consumers).
//!
//! Invariant kept here: the signature covers the exact bytes sent and the time it names,
//! so a consumer can reject a changed body and a replay older than its tolerance; the
//! comparison of a received signature is constant-time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Claimgate-Signature";
/// The header carrying the event id (also the body's `id`): the consumer's dedup key.
pub const EVENT_ID_HEADER: &str = "Claimgate-Event-Id";

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], t: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The header value signing `body` at unix second `t`.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let tag = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex(&tag))
}

/// Checks a `Claimgate-Signature` value against `body`, as a consumer does: well-formed,
/// `t` within `tolerance_s` of `now_s`, and some `v1` equal to the expected HMAC
/// (constant-time). Returns the signed time.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_s: i64,
    tolerance_s: i64,
) -> Result<i64, &'static str> {
    let mut t = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|_| "t is not a number")?),
            Some(("v1", v)) => tags.push(unhex(v).ok_or("v1 is not hex")?),
            _ => {}
        }
    }
    let t = t.ok_or("no t")?;
    if (now_s - t).abs() > tolerance_s {
        return Err("t outside the tolerance");
    }
    if tags
        .iter()
        .any(|tag| mac(secret, t, body).verify_slice(tag).is_ok())
    {
        Ok(t)
    } else {
        Err("no matching v1")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec-test-0123456789-0123456789-0123";
    const BODY: &[u8] = br#"{"id":"b.0.1:claimed"}"#;

    /// A vector computed independently (Python: `hmac.new(secret, b"1700000000." + body,
    /// hashlib.sha256).hexdigest()`).
    #[test]
    fn the_signature_is_the_hmac_of_t_dot_body() {
        assert_eq!(
            sign(SECRET, 1_700_000_000, BODY),
            "t=1700000000,v1=8231c109fafd0041bb41cf76db65a35a5c8a053e214d4a8cbe8b42e8fb19d4f3"
        );
    }

    #[test]
    fn verification_rejects_changes_replays_and_garbage() {
        let h = sign(SECRET, 1_700_000_000, BODY);
        assert_eq!(
            verify(SECRET, &h, BODY, 1_700_000_100, 300),
            Ok(1_700_000_000)
        );
        assert!(verify(SECRET, &h, b"{}", 1_700_000_100, 300).is_err());
        assert!(verify(b"another secret", &h, BODY, 1_700_000_100, 300).is_err());
        assert!(verify(SECRET, &h, BODY, 1_700_001_000, 300).is_err());
        let moved = h.replace("t=1700000000", "t=1700000001");
        assert!(verify(SECRET, &moved, BODY, 1_700_000_100, 300).is_err());
        for junk in [
            "",
            "t=x,v1=00",
            "v1=00",
            "t=1700000000",
            "t=1700000000,v1=zz",
        ] {
            assert!(
                verify(SECRET, junk, BODY, 1_700_000_000, 300).is_err(),
                "{junk}"
            );
        }
        // a consumer accepts any matching v1 (secret rotation sends two)
        let two = format!("{},v1=00ff", h);
        assert!(verify(SECRET, &two, BODY, 1_700_000_000, 300).is_ok());
    }
}
