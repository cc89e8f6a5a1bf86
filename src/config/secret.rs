//! Secrets and their redaction: the [`Secret`] type for tokens and keys from the
//! configuration, and redactors for URLs that carry a password (database and Redis URLs).
//!
//! Invariant kept here: a secret is never printed. [`Secret`]'s `Debug`, `Display` and
//! `Serialize` all produce [`REDACTED`]; only an explicit [`Secret::expose`] (or
//! [`Secret::as_bytes`]) gives the value, for the code that checks tokens. Text that may
//! hold a URL (a config dump, an error, a log line) goes through [`redact_url`] or
//! [`redact_text`], which replace the password of `scheme://user:password@host` and the
//! value of password-like query parameters with [`REDACTED`].
//!
//! The marker is not a usable secret: the configuration loader rejects a secret or a URL
//! that contains it, so a redacted `check-config` dump reused as a config file fails with
//! the key named instead of running with a publicly known secret.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What is printed in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// A configuration secret (token, signing key). Cannot leak through formatting or
/// serialization; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself. Only for code that uses it (token checks, signing).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The secret's bytes; like [`Secret::expose`].
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Length in bytes (for range checks; says nothing else about the value).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value is (or contains) the redaction marker: it came from a redacted dump.
    pub fn is_redaction_marker(&self) -> bool {
        self.0.contains(REDACTED)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        d.deserialize_any(SecretVisitor)
    }
}

/// Accepts a string. Anything else is an error that does not echo the value (serde's
/// default "invalid type: integer `123...`" would print a numeric secret).
struct SecretVisitor;

impl SecretVisitor {
    fn wrong<E: de::Error>(&self) -> E {
        E::custom("expected a string (quote the value, e.g. auth.admin_token=\"...\")")
    }
}

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret::from(v))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
        Err(self.wrong())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
        Err(self.wrong())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
        Err(self.wrong())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
        Err(self.wrong())
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Secret, E> {
        Err(self.wrong())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(self.wrong())
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(self.wrong())
    }
}

/// `serialize_with` for a URL field: the URL with its password redacted.
pub fn serialize_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// Characters that can start a URL scheme's `://` (RFC 3986: ALPHA *( ALPHA / DIGIT / "+" /
/// "-" / "." )).
fn is_scheme_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')
}

/// Ends a URL inside free text.
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>')
}

/// Query parameters whose value is redacted (name lowercased contains one of these).
const SECRET_PARAMS: &[&str] = &["pass", "pwd", "secret", "token"];

/// `url` with the password of its userinfo (`scheme://user:password@host`) and the values
/// of password-like query parameters (`?password=`, `sentinelPassword=`, `token=`...)
/// replaced with [`REDACTED`]. A URL without either comes back unchanged (borrowed).
///
/// When the password holds characters a URL should have percent-encoded (`/`, `?`, `#`),
/// everything up to the last `@` counts as userinfo: the redaction may then cover more
/// than the password, never less.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let Some(sep) = url.find("://") else {
        return Cow::Borrowed(url);
    };
    let body_start = sep + 3;
    let body = &url[body_start..];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..body_start]);
    let mut changed = false;
    let auth_end = body.find(['/', '?', '#']).unwrap_or(body.len());
    // An '@' past the first '/', '?' or '#' (with a ':' before it) is taken for the end of
    // a password with unencoded characters.
    let at = body[..auth_end]
        .rfind('@')
        .or_else(|| body.rfind('@').filter(|&a| body[..a].contains(':')));
    let rest = match at {
        Some(at) => {
            let userinfo = &body[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push(':');
                    out.push_str(REDACTED);
                    changed = true;
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            &body[at + 1..]
        }
        None => body,
    };
    match rest.find('?') {
        Some(q) => {
            out.push_str(&rest[..=q]);
            let (query, fragment) = match rest[q + 1..].find('#') {
                Some(h) => (&rest[q + 1..q + 1 + h], &rest[q + 1 + h..]),
                None => (&rest[q + 1..], ""),
            };
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((name, value)) if is_secret_param(name) && !value.is_empty() => {
                        out.push_str(name);
                        out.push('=');
                        out.push_str(REDACTED);
                        changed = true;
                    }
                    _ => out.push_str(pair),
                }
            }
            out.push_str(fragment);
        }
        None => out.push_str(rest),
    }
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(url)
    }
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|p| name.contains(p))
}

/// Every URL in `text` (a `scheme://` up to whitespace or a quote) through [`redact_url`].
pub fn redact_text(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    let mut changed = false;
    while let Some(found) = text[search..].find("://") {
        let sep = search + found;
        let mut start = sep;
        while start > 0 && is_scheme_char(bytes[start - 1]) {
            start -= 1;
        }
        let end = text[sep + 3..]
            .find(ends_url)
            .map_or(text.len(), |e| sep + 3 + e);
        if start < sep && start >= copied {
            let url = &text[start..end];
            if let Cow::Owned(r) = redact_url(url) {
                out.push_str(&text[copied..start]);
                out.push_str(&r);
                copied = end;
                changed = true;
            }
        }
        search = end.max(sep + 3);
    }
    if !changed {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Replaces every occurrence of each of `secrets` (values shorter than 4 bytes are left:
/// too likely to match innocent text) in `text` with [`REDACTED`], then redacts URLs.
/// For messages built from errors of libraries that might echo a credential.
pub fn scrub<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.len() >= 4 && out.contains(s) {
            out = out.replace(s, REDACTED);
        }
    }
    redact_text(&out).into_owned()
}

/// The password in `url`'s userinfo, raw and percent-decoded, for [`scrub`].
pub fn url_passwords(url: &str) -> Vec<String> {
    let Some(sep) = url.find("://") else {
        return Vec::new();
    };
    let body = &url[sep + 3..];
    let Some(at) = body.rfind('@') else {
        return Vec::new();
    };
    let Some((_, pw)) = body[..at].split_once(':') else {
        return Vec::new();
    };
    let mut v = vec![pw.to_string()];
    let decoded = percent_decode(pw);
    if decoded != pw {
        v.push(decoded);
    }
    v
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_format_or_serialize() {
        let s = Secret::from("hunter2-hunter2-hunter2");
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(
            format!("{:?}", Some(s.clone())),
            format!("Some({REDACTED})")
        );
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{REDACTED}\"")
        );
        assert_eq!(s.expose(), "hunter2-hunter2-hunter2");
        assert_eq!(s.as_bytes(), b"hunter2-hunter2-hunter2");
    }

    #[test]
    fn secrets_deserialize_from_strings_only_without_echoing() {
        let s: Secret = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(s.expose(), "abc");
        for bad in ["123456789", "true", "1.5", "[1]", "{}"] {
            let e = serde_json::from_str::<Secret>(bad).unwrap_err().to_string();
            assert!(e.contains("expected a string"), "{e}");
            assert!(!e.contains("123456789"), "{e}");
        }
    }

    #[test]
    fn urls_lose_their_passwords() {
        let cases = [
            (
                "postgres://u:pw@h:5432/db",
                "postgres://u:<redacted>@h:5432/db",
            ),
            (
                "redis://:pw@127.0.0.1:6379/0",
                "redis://:<redacted>@127.0.0.1:6379/0",
            ),
            ("rediss://user:p%40ss@h", "rediss://user:<redacted>@h"),
            ("redis://u:pa/ss?x@h:1", "redis://u:<redacted>@h:1"),
            (
                "postgres://u@h/db?sslmode=require&password=pw#f",
                "postgres://u@h/db?sslmode=require&password=<redacted>#f",
            ),
            (
                "redis-sentinel://h:26379?sentinelPassword=pw&x=1",
                "redis-sentinel://h:26379?sentinelPassword=<redacted>&x=1",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
        for same in [
            "sqlite://data/claimgate.db?mode=rwc",
            "sqlite::memory:",
            "redis://127.0.0.1:6379",
            "postgres://u@h/db",
            "",
        ] {
            assert!(matches!(redact_url(same), Cow::Borrowed(_)), "{same}");
        }
    }

    #[test]
    fn urls_in_text_are_redacted() {
        let t = "redis at redis://u:hunter2@h:1: refused; db \"postgres://a:b@c/d\" and sqlite://x";
        let r = redact_text(t);
        assert_eq!(
            r,
            "redis at redis://u:<redacted>@h:1: refused; db \"postgres://a:<redacted>@c/d\" and sqlite://x"
        );
        assert!(matches!(redact_text("no urls here"), Cow::Borrowed(_)));
        assert_eq!(redact_text("://x"), "://x");
    }

    #[test]
    fn scrub_removes_known_values_and_decoded_passwords() {
        let url = "postgres://u:p%40ss-word@h/db";
        let pws = url_passwords(url);
        assert_eq!(
            pws,
            vec!["p%40ss-word".to_string(), "p@ss-word".to_string()]
        );
        let msg = format!("login as u with p@ss-word failed; token admin-token-0123 used; {url}");
        let s = scrub(
            &msg,
            pws.iter()
                .map(String::as_str)
                .chain(["admin-token-0123", "ab"]),
        );
        assert!(!s.contains("p@ss"), "{s}");
        assert!(!s.contains("p%40ss"), "{s}");
        assert!(!s.contains("admin-token-0123"), "{s}");
        assert!(s.contains("login as u with"), "{s}");
    }
}
