//! User tokens: deterministic HS256 JWTs (`sub` = user id) for gateways with user auth on.

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

/// `exp` of every generated token: 2100-01-01T00:00:00Z. A fixed expiry keeps the token
/// of a user a pure function of the secret and the user id.
pub const TOKEN_EXP: u64 = 4_102_444_800;

/// Signs user tokens with a shared HS256 secret.
#[derive(Clone)]
pub struct TokenSigner {
    key: EncodingKey,
    header: Header,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(HS256, <secret>)")
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

impl TokenSigner {
    pub fn new(secret: &str) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::default(),
        }
    }

    /// The bearer token for `user_id`.
    pub fn token(&self, user_id: &str) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(
            &self.header,
            &Claims {
                sub: user_id,
                exp: TOKEN_EXP,
            },
            &self.key,
        )
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    use super::*;

    #[derive(serde::Deserialize)]
    struct Decoded {
        sub: String,
        exp: u64,
    }

    #[test]
    fn tokens_verify_and_are_deterministic() {
        let signer = TokenSigner::new("s3cret");
        let t1 = signer.token("u1-5").expect("sign");
        assert_eq!(t1, signer.token("u1-5").expect("sign"));
        assert_ne!(t1, signer.token("u1-6").expect("sign"));
        let data = jsonwebtoken::decode::<Decoded>(
            &t1,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(Algorithm::HS256),
        )
        .expect("valid token");
        assert_eq!(data.claims.sub, "u1-5");
        assert_eq!(data.claims.exp, TOKEN_EXP);
        assert!(
            jsonwebtoken::decode::<Decoded>(
                &t1,
                &DecodingKey::from_secret(b"other"),
                &Validation::new(Algorithm::HS256),
            )
            .is_err()
        );
    }
}
