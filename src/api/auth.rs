//! Bearer tokens: HS256 JWTs whose `scp` claim grants `Device.Command`.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;

/// The delegated permission every route except health requires.
pub const REQUIRED_SCOPE: &str = "Device.Command";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Space-separated scopes, as Microsoft identity tokens carry them.
    pub scp: String,
    pub exp: u64,
    pub iat: u64,
}

/// The authenticated caller, put in the request's extensions by [`require_token`].
#[derive(Clone, Debug)]
pub struct Caller {
    pub subject: String,
}

#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// Signs a token for `subject` with the `Device.Command` scope.
    pub fn issue(&self, subject: &str, lifetime: Duration) -> anyhow::Result<String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: subject.to_owned(),
            scp: REQUIRED_SCOPE.to_owned(),
            iat: now,
            exp: now.saturating_add(lifetime.as_secs()),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // The library allows 60 s of clock skew by default and ignores
        // `nbf`; a token is checked here exactly as it says.
        validation.leeway = 0;
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|error| ApiError::unauthorized(format!("bearer token is invalid: {error}")))?
            .claims;
        if !claims.scp.split(' ').any(|scope| scope == REQUIRED_SCOPE) {
            return Err(ApiError::forbidden(format!(
                "token scopes {:?} do not include {REQUIRED_SCOPE}",
                claims.scp
            )));
        }
        if claims.sub.is_empty() {
            return Err(ApiError::unauthorized(
                "bearer token has an empty sub claim",
            ));
        }
        Ok(claims)
    }
}

/// Middleware that rejects requests without a valid bearer token.
pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized(
                "missing Authorization header; send Authorization: Bearer <token>",
            )
        })?;
    let token = value
        .to_str()
        .ok()
        .and_then(|text| {
            let (scheme, token) = text.split_once(' ')?;
            scheme.eq_ignore_ascii_case("Bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty())
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be Bearer <token>"))?;
    let claims = state.keys.verify(token)?;
    request.extensions_mut().insert(Caller {
        subject: claims.sub,
    });
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_token_verifies() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef");
        let token = keys.issue("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(keys.verify(&token).unwrap().sub, "alice");
    }

    #[test]
    fn token_from_other_secret_is_rejected() {
        let token = JwtKeys::new(b"secret-one-secret-one-secret-one")
            .issue("alice", Duration::from_secs(60))
            .unwrap();
        let error = JwtKeys::new(b"secret-two-secret-two-secret-two")
            .verify(&token)
            .unwrap_err();
        assert_eq!(error.status, axum::http::StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn token_without_scope_is_forbidden() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef");
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: "alice".into(),
            scp: "User.Read".into(),
            iat: now,
            exp: now + 60,
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding).unwrap();
        assert_eq!(
            keys.verify(&token).unwrap_err().status,
            axum::http::StatusCode::FORBIDDEN
        );
    }
}
