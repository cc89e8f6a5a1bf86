//! Identify the caller: the admin bearer token on admin routes, and the user on claims
//! (a verified HS256 JWT when a secret is configured, the body's `user_id` in development).
//!
//! Invariant kept here: with user auth on, the user a claim is made for is exactly the
//! verified token's `sub`, of a token inside its lifetime (`nbf` ..= `exp`, give or take
//! `auth.user_token_leeway_s`); a disagreeing `user_id` in the body is rejected, never used.

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thiserror::Error;

use crate::config::AuthConfig;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    MissingToken,
    #[error("invalid token")]
    InvalidToken,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("user_id does not match the token's subject")]
    UserMismatch,
    #[error("user_id is required")]
    MissingUser,
    #[error("token subject is not a valid user id")]
    BadSubject,
}

/// Who is claiming, with what the eligibility rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub tags: Vec<String>,
    pub new_user: bool,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    new_user: bool,
}

pub struct Auth {
    admin_token: Option<Vec<u8>>,
    user: Option<(DecodingKey, Validation)>,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compares in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Auth {
        let user = cfg.user_token_secret.as_ref().map(|secret| {
            let mut v = Validation::new(Algorithm::HS256);
            // One clock-skew allowance for both ends of the token's lifetime.
            v.leeway = cfg.user_token_leeway_s;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            (DecodingKey::from_secret(secret.as_bytes()), v)
        });
        Auth {
            admin_token: cfg.admin_token.as_ref().map(|t| t.as_bytes().to_vec()),
            user,
        }
    }

    pub fn user_auth_enabled(&self) -> bool {
        self.user.is_some()
    }

    /// Admin routes: the configured bearer token, when one is configured.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let Some(expected) = &self.admin_token else {
            return Ok(());
        };
        let token = bearer(headers).ok_or(AuthError::MissingToken)?;
        if constant_time_eq(token.as_bytes(), expected) {
            Ok(())
        } else {
            Err(AuthError::InvalidToken)
        }
    }

    /// The claiming user. `body_user` is the body's `user_id`, already validated.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        body_user: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let Some((key, validation)) = &self.user else {
            let user_id = body_user.ok_or(AuthError::MissingUser)?.to_string();
            // Development mode: eligibility attributes come from trusted headers.
            let tags = headers
                .get("x-user-tags")
                .and_then(|v| v.to_str().ok())
                .map(|s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let new_user = headers
                .get("x-new-user")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
            return Ok(Identity {
                user_id,
                tags,
                new_user,
            });
        };
        let token = bearer(headers).ok_or(AuthError::MissingToken)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::InvalidToken,
            })?;
        let claims = data.claims;
        if !crate::domain::ids::valid_ident(&claims.sub) {
            return Err(AuthError::BadSubject);
        }
        if body_user.is_some_and(|u| u != claims.sub) {
            return Err(AuthError::UserMismatch);
        }
        Ok(Identity {
            user_id: claims.sub,
            tags: claims.tags,
            new_user: claims.new_user,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn token(sub: &str, exp_offset: i64) -> String {
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + exp_offset;
        let claims = serde_json::json!({ "sub": sub, "exp": exp, "tags": ["vip"] });
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    fn user_auth() -> Auth {
        Auth::new(&AuthConfig {
            user_token_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        })
    }

    #[test]
    fn verified_token_identifies_the_user() {
        let a = user_auth();
        let id = a
            .identify(&headers(&format!("Bearer {}", token("u1", 60))), None)
            .unwrap();
        assert_eq!(id.user_id, "u1");
        assert_eq!(id.tags, vec!["vip".to_string()]);
        let ok = a.identify(&headers(&format!("Bearer {}", token("u1", 60))), Some("u1"));
        assert!(ok.is_ok());
    }

    #[test]
    fn bad_tokens_are_rejected() {
        let a = user_auth();
        let t = token("u1", 60);
        assert_eq!(
            a.identify(&HeaderMap::new(), Some("u1")),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            a.identify(&headers(&format!("Bearer {t}")), Some("u2")),
            Err(AuthError::UserMismatch)
        );
        assert_eq!(
            a.identify(&headers(&format!("Bearer {}", token("u1", -3600))), None),
            Err(AuthError::Expired)
        );
        let tampered = format!("{}x", &t[..t.len() - 1]);
        assert_eq!(
            a.identify(&headers(&format!("Bearer {tampered}")), None),
            Err(AuthError::InvalidToken)
        );
        assert_eq!(
            a.identify(&headers(&format!("Bearer {}", token("a b", 60))), None),
            Err(AuthError::BadSubject)
        );
    }

    fn token_with_nbf(nbf: serde_json::Value) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({ "sub": "u1", "exp": now + 3600, "nbf": nbf });
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    /// Regression (hardening item 9): `nbf` was ignored, so a token not yet valid was
    /// accepted. It is honoured with the configured leeway.
    #[test]
    fn item9_nbf_is_honoured_with_the_leeway() {
        let a = Auth::new(&AuthConfig {
            user_token_secret: Some(SECRET.into()),
            user_token_leeway_s: 30,
            ..AuthConfig::default()
        });
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let id = |nbf: serde_json::Value| {
            a.identify(&headers(&format!("Bearer {}", token_with_nbf(nbf))), None)
        };
        assert_eq!(
            id(serde_json::json!(now + 3600)),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(id(serde_json::json!(now + 60)), Err(AuthError::NotYetValid));
        assert!(id(serde_json::json!(now + 20)).is_ok(), "inside the leeway");
        assert!(id(serde_json::json!(now)).is_ok());
        assert!(id(serde_json::json!(now - 3600)).is_ok());
        assert_eq!(
            id(serde_json::json!("tomorrow")),
            Err(AuthError::InvalidToken),
            "a malformed nbf is refused"
        );
        let strict = Auth::new(&AuthConfig {
            user_token_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        });
        let t = token_with_nbf(serde_json::json!(now + 20));
        assert_eq!(
            strict.identify(&headers(&format!("Bearer {t}")), None),
            Err(AuthError::NotYetValid),
            "no leeway configured"
        );
    }

    #[test]
    fn admin_token_is_required_when_configured() {
        let a = Auth::new(&AuthConfig {
            admin_token: Some("admin-token-0123456789".into()),
            ..AuthConfig::default()
        });
        assert!(
            a.check_admin(&headers("Bearer admin-token-0123456789"))
                .is_ok()
        );
        assert_eq!(
            a.check_admin(&headers("Bearer nope")),
            Err(AuthError::InvalidToken)
        );
        assert_eq!(
            a.check_admin(&HeaderMap::new()),
            Err(AuthError::MissingToken)
        );
        let open = Auth::new(&AuthConfig::default());
        assert!(open.check_admin(&HeaderMap::new()).is_ok());
        assert_eq!(
            open.identify(&HeaderMap::new(), None),
            Err(AuthError::MissingUser)
        );
    }
}
