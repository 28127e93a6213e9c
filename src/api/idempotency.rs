//! The `Idempotency-Key` request header of the create routes.

use axum::http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use super::error::ApiError;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set to `true` on a response that repeats an earlier request's result.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest accepted key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// The key of a request, if it sent one: 1 to 255 printable ASCII
/// characters (space to tilde).
pub fn key_from(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "Idempotency-Key header appears more than once; send one key per request",
        ));
    }
    let bytes = value.as_bytes();
    let invalid = |reason: &str| {
        ApiError::bad_request(format!(
            "Idempotency-Key header is invalid: {reason}; use 1 to {MAX_KEY_BYTES} printable ASCII characters, such as a UUID"
        ))
    };
    if bytes.is_empty() {
        return Err(invalid("it is empty"));
    }
    if bytes.len() > MAX_KEY_BYTES {
        return Err(invalid(&format!("it is {} bytes long", bytes.len())));
    }
    if let Some(byte) = bytes.iter().find(|byte| !(b' '..=b'~').contains(*byte)) {
        return Err(invalid(&format!("it contains the byte 0x{byte:02x}")));
    }
    // Checked above: every byte is printable ASCII, so this is valid UTF-8.
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// Hex SHA-256 of the route and the exact body bytes. A repeat of a request
/// matches only when both are the same.
pub fn request_hash(route: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"POST ");
    hasher.update(route.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_bytes(value).unwrap());
        }
        headers
    }

    #[test]
    fn absent_key_is_none() {
        assert_eq!(key_from(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn printable_key_is_accepted() {
        let key = "a1 B2-~!";
        assert_eq!(
            key_from(&headers(&[key.as_bytes()])).unwrap().as_deref(),
            Some(key)
        );
    }

    #[test]
    fn invalid_keys_are_rejected() {
        let long = vec![b'k'; MAX_KEY_BYTES + 1];
        for value in [&b""[..], &long, "é".as_bytes(), b"a\tb"] {
            assert!(key_from(&headers(&[value])).is_err(), "{value:?}");
        }
    }

    #[test]
    fn repeated_key_header_is_rejected() {
        assert!(key_from(&headers(&[b"a", b"b"])).is_err());
    }

    #[test]
    fn hash_covers_route_and_body() {
        let base = request_hash("/commands", b"{}");
        assert_eq!(base.len(), 64);
        assert_ne!(base, request_hash("/devices/d/commands", b"{}"));
        assert_ne!(base, request_hash("/commands", b"{ }"));
        assert_eq!(base, request_hash("/commands", b"{}"));
    }
}
