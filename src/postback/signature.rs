//! Webhook signatures in the Standard Webhooks format.
//!
//! Each secret signs `{webhook-id}.{webhook-timestamp}.{body}` with
//! HMAC-SHA256, and the `webhook-signature` header lists one `v1,<base64>`
//! entry per secret, separated by spaces. During a rotation the service is
//! configured with the new and the old secret, so a receiver that knows either
//! one can verify.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix that marks a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Minimum and maximum secret length in bytes after base64 decoding, as the
/// Standard Webhooks specification 1.0.0 sets them (192 to 512 bits).
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;

/// Number of random bytes in a secret from [`generate_secret`].
const GENERATED_SECRET_BYTES: usize = 32;

/// The signing keys for outgoing webhooks, decoded from `whsec_` secrets.
///
/// `Debug` prints only the number of keys, and the type has no `Display`, so
/// formatting it never writes a key.
#[derive(Clone, Default)]
pub struct WebhookSecrets {
    keys: Vec<Vec<u8>>,
}

impl WebhookSecrets {
    /// Parses a comma-separated list of `whsec_<base64>` secrets. An empty or
    /// blank list gives no secrets. Errors name the position of the bad entry
    /// and never its content.
    pub fn parse(list: &str) -> Result<Self, String> {
        if list.trim().is_empty() {
            return Ok(Self::default());
        }

        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        let count = entries.len();
        let mut keys = Vec::with_capacity(count);
        for (index, entry) in entries.into_iter().enumerate() {
            let position = format!("webhook secret {} of {count}", index + 1);
            keys.push(decode_secret(entry).map_err(|reason| format!("{position} {reason}"))?);
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Computes the `webhook-signature` header value: one `v1,<base64>` entry
    /// per secret, in list order, joined by single spaces. Returns an empty
    /// string when there are no secrets.
    ///
    /// `webhook_id` must not contain `.`, because `.` separates the parts of
    /// the signed content.
    pub fn sign(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
        self.keys
            .iter()
            .map(|key| {
                let tag = signed_content_mac(key, webhook_id, timestamp, body)
                    .finalize()
                    .into_bytes();
                format!("v1,{}", STANDARD.encode(tag))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSecrets")
            .field("count", &self.keys.len())
            .finish()
    }
}

fn decode_secret(entry: &str) -> Result<Vec<u8>, String> {
    if entry.is_empty() {
        return Err("is empty; remove the extra comma".to_owned());
    }
    let Some(encoded) = entry.strip_prefix(SECRET_PREFIX) else {
        return Err(format!(
            "does not start with {SECRET_PREFIX}; use the form {SECRET_PREFIX}<base64 key>"
        ));
    };
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| format!("is not valid standard base64 after the {SECRET_PREFIX} prefix"))?;
    if key.is_empty() {
        return Err(format!("has an empty key after the {SECRET_PREFIX} prefix"));
    }
    if key.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "has a {}-byte key, the minimum is {MIN_SECRET_BYTES} bytes; generate a longer random key",
            key.len()
        ));
    }
    if key.len() > MAX_SECRET_BYTES {
        return Err(format!(
            "has a {}-byte key, the maximum is {MAX_SECRET_BYTES} bytes; generate a shorter random key",
            key.len()
        ));
    }
    Ok(key)
}

fn signed_content_mac(key: &[u8], webhook_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Generates a new secret of 32 random bytes from the thread-local
/// cryptographically secure generator, in the `whsec_<base64>` form.
pub fn generate_secret() -> String {
    let key: [u8; GENERATED_SECRET_BYTES] = rand::random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// The three signature headers of a received webhook, as text.
#[derive(Clone, Copy, Debug)]
pub struct SignedHeaders<'a> {
    /// `webhook-id`.
    pub id: &'a str,
    /// `webhook-timestamp`, in seconds since the Unix epoch.
    pub timestamp: &'a str,
    /// `webhook-signature`.
    pub signature: &'a str,
}

/// The reason a webhook failed verification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no webhook secrets are configured, so no signature can be verified")]
    NoSecrets,
    #[error("webhook-timestamp {0:?} is not an integer number of seconds")]
    InvalidTimestamp(String),
    #[error(
        "webhook-timestamp {timestamp} is {difference_seconds}s away from now, \
         more than the tolerance of {tolerance_seconds}s"
    )]
    TimestampOutOfTolerance {
        timestamp: i64,
        difference_seconds: u64,
        tolerance_seconds: u64,
    },
    #[error("no v1 signature in webhook-signature matches any webhook secret")]
    NoMatchingSignature,
}

/// Verifies a received webhook. It passes when the timestamp is within
/// `tolerance` of `now` (Unix seconds) and any `v1` entry of the signature
/// header matches any secret. Entries of other versions are skipped, and
/// signatures are compared in constant time.
pub fn verify(
    secrets: &WebhookSecrets,
    headers: &SignedHeaders<'_>,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    if secrets.is_empty() {
        return Err(VerifyError::NoSecrets);
    }

    let timestamp: i64 = headers
        .timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::InvalidTimestamp(headers.timestamp.to_owned()))?;
    let difference_seconds = now.abs_diff(timestamp);
    if difference_seconds > tolerance.as_secs() {
        return Err(VerifyError::TimestampOutOfTolerance {
            timestamp,
            difference_seconds,
            tolerance_seconds: tolerance.as_secs(),
        });
    }

    let candidates: Vec<Vec<u8>> = headers
        .signature
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .collect();
    for key in &secrets.keys {
        let mac = signed_content_mac(key, headers.id, timestamp, body);
        // verify_slice compares in constant time.
        if candidates
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
        {
            return Ok(());
        }
    }
    Err(VerifyError::NoMatchingSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected signatures computed independently with Python 3.11's hmac module:
    //   base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest())
    // where msg is ID + b"." + str(TIMESTAMP) + b"." + BODY.
    const FIRST_SECRET: &str = "whsec_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    const FIRST_SIGNATURE: &str = "v1,y76tQe5gcfTZDgzfbEJhFHd2gn1vZz6t9Fv3JlUDMK8=";
    const SECOND_SECRET: &str = "whsec_c2Vjb25kLXNlY3JldC1rZXktZm9yLXJvdGF0aW9uISE=";
    const SECOND_SIGNATURE: &str = "v1,WPrchrS2wD9DQcjVhk2HqIGb9PZknv27VKrp1ENeio4=";
    const ID: &str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W";
    const TIMESTAMP: i64 = 1674087231;
    const BODY: &[u8] = br#"{"id":"1","Status":"completed"}"#;
    const TOLERANCE: Duration = Duration::from_secs(300);

    fn headers<'a>(timestamp: &'a str, signature: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            id: ID,
            timestamp,
            signature,
        }
    }

    #[test]
    fn sign_matches_known_answer() {
        let secrets = WebhookSecrets::parse(FIRST_SECRET).unwrap();
        assert_eq!(secrets.sign(ID, TIMESTAMP, BODY), FIRST_SIGNATURE);
    }

    #[test]
    fn sign_lists_every_secret_in_order() {
        let secrets = WebhookSecrets::parse(&format!("{FIRST_SECRET}, {SECOND_SECRET}")).unwrap();
        assert_eq!(secrets.len(), 2);
        assert_eq!(
            secrets.sign(ID, TIMESTAMP, BODY),
            format!("{FIRST_SIGNATURE} {SECOND_SIGNATURE}")
        );
    }

    #[test]
    fn sign_without_secrets_is_empty() {
        let secrets = WebhookSecrets::parse("").unwrap();
        assert!(secrets.is_empty());
        assert_eq!(secrets.sign(ID, TIMESTAMP, BODY), "");
    }

    #[test]
    fn verify_accepts_own_signature() {
        let secrets = WebhookSecrets::parse(FIRST_SECRET).unwrap();
        let signature = secrets.sign(ID, TIMESTAMP, BODY);
        let result = verify(
            &secrets,
            &headers(&TIMESTAMP.to_string(), &signature),
            BODY,
            TIMESTAMP,
            TOLERANCE,
        );
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn rotation_verifies_with_either_secret() {
        let sender = WebhookSecrets::parse(&format!("{SECOND_SECRET},{FIRST_SECRET}")).unwrap();
        let signature = sender.sign(ID, TIMESTAMP, BODY);
        let timestamp = TIMESTAMP.to_string();

        for receiver_secret in [FIRST_SECRET, SECOND_SECRET] {
            let receiver = WebhookSecrets::parse(receiver_secret).unwrap();
            let result = verify(
                &receiver,
                &headers(&timestamp, &signature),
                BODY,
                TIMESTAMP,
                TOLERANCE,
            );
            assert_eq!(result, Ok(()), "receiver with {receiver_secret}");
        }
    }

    #[test]
    fn verify_skips_other_versions_and_bad_entries() {
        let secrets = WebhookSecrets::parse(FIRST_SECRET).unwrap();
        let signature = format!("v1a,abc v1,!!notbase64 v1,AAAA {FIRST_SIGNATURE}");
        let result = verify(
            &secrets,
            &headers(&TIMESTAMP.to_string(), &signature),
            BODY,
            TIMESTAMP,
            TOLERANCE,
        );
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn verify_detects_tampering() {
        let secrets = WebhookSecrets::parse(FIRST_SECRET).unwrap();
        let timestamp = TIMESTAMP.to_string();

        let tampered_body = br#"{"id":"1","Status":"canceled"}"#;
        let result = verify(
            &secrets,
            &headers(&timestamp, FIRST_SIGNATURE),
            tampered_body,
            TIMESTAMP,
            TOLERANCE,
        );
        assert_eq!(result, Err(VerifyError::NoMatchingSignature), "body");

        let other_id = SignedHeaders {
            id: "msg_other",
            timestamp: &timestamp,
            signature: FIRST_SIGNATURE,
        };
        let result = verify(&secrets, &other_id, BODY, TIMESTAMP, TOLERANCE);
        assert_eq!(result, Err(VerifyError::NoMatchingSignature), "id");

        // A later timestamp inside the tolerance still fails, because the
        // timestamp is part of the signed content.
        let later = (TIMESTAMP + 1).to_string();
        let result = verify(
            &secrets,
            &headers(&later, FIRST_SIGNATURE),
            BODY,
            TIMESTAMP,
            TOLERANCE,
        );
        assert_eq!(result, Err(VerifyError::NoMatchingSignature), "timestamp");

        let other_secret = WebhookSecrets::parse(SECOND_SECRET).unwrap();
        let result = verify(
            &other_secret,
            &headers(&timestamp, FIRST_SIGNATURE),
            BODY,
            TIMESTAMP,
            TOLERANCE,
        );
        assert_eq!(result, Err(VerifyError::NoMatchingSignature), "secret");
    }

    #[test]
    fn verify_enforces_timestamp_tolerance() {
        let secrets = WebhookSecrets::parse(FIRST_SECRET).unwrap();
        let timestamp = TIMESTAMP.to_string();
        let check_at = |now: i64| {
            verify(
                &secrets,
                &headers(&timestamp, FIRST_SIGNATURE),
                BODY,
                now,
                TOLERANCE,
            )
        };

        assert_eq!(check_at(TIMESTAMP + 300), Ok(()), "300s late");
        assert_eq!(check_at(TIMESTAMP - 300), Ok(()), "300s early");
        assert_eq!(
            check_at(TIMESTAMP + 301),
            Err(VerifyError::TimestampOutOfTolerance {
                timestamp: TIMESTAMP,
                difference_seconds: 301,
                tolerance_seconds: 300,
            })
        );
        assert!(check_at(TIMESTAMP - 301).is_err(), "301s early");
    }

    #[test]
    fn verify_rejects_invalid_timestamp() {
        let secrets = WebhookSecrets::parse(FIRST_SECRET).unwrap();
        for timestamp in ["", "soon", "1674087231.5", "99999999999999999999"] {
            let result = verify(
                &secrets,
                &headers(timestamp, FIRST_SIGNATURE),
                BODY,
                TIMESTAMP,
                TOLERANCE,
            );
            assert_eq!(
                result,
                Err(VerifyError::InvalidTimestamp(timestamp.to_owned())),
                "{timestamp:?}"
            );
        }
    }

    #[test]
    fn verify_handles_extreme_timestamps() {
        let secrets = WebhookSecrets::parse(FIRST_SECRET).unwrap();
        let result = verify(
            &secrets,
            &headers(&i64::MIN.to_string(), FIRST_SIGNATURE),
            BODY,
            i64::MAX,
            TOLERANCE,
        );
        assert!(matches!(
            result,
            Err(VerifyError::TimestampOutOfTolerance { .. })
        ));
    }

    #[test]
    fn verify_without_secrets_fails() {
        let result = verify(
            &WebhookSecrets::default(),
            &headers(&TIMESTAMP.to_string(), FIRST_SIGNATURE),
            BODY,
            TIMESTAMP,
            TOLERANCE,
        );
        assert_eq!(result, Err(VerifyError::NoSecrets));
    }

    #[test]
    fn parse_rejects_bad_secrets_without_echoing_them() {
        let short_key = format!("{SECRET_PREFIX}{}", STANDARD.encode([7u8; 23]));
        let long_key = format!("{SECRET_PREFIX}{}", STANDARD.encode([7u8; 65]));
        let cases = [
            ("whsec_not*base64", "not valid standard base64"),
            (
                "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
                "does not start with whsec_",
            ),
            ("whsec_", "empty key"),
            (short_key.as_str(), "23-byte key, the minimum is 24"),
            (long_key.as_str(), "65-byte key, the maximum is 64"),
        ];
        for (secret, reason) in cases {
            let list = format!("{FIRST_SECRET},{secret}");
            let error = WebhookSecrets::parse(&list).unwrap_err();
            assert!(error.starts_with("webhook secret 2 of 2 "), "{error}");
            assert!(error.contains(reason), "{error}");
            let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
            if !encoded.is_empty() {
                assert!(!error.contains(encoded), "error echoes the secret: {error}");
            }
        }
    }

    #[test]
    fn parse_rejects_empty_entries() {
        let error = WebhookSecrets::parse(&format!("{FIRST_SECRET},,{SECOND_SECRET}")).unwrap_err();
        assert_eq!(
            error,
            "webhook secret 2 of 3 is empty; remove the extra comma"
        );
    }

    #[test]
    fn debug_hides_keys() {
        let secrets = WebhookSecrets::parse(FIRST_SECRET).unwrap();
        let printed = format!("{secrets:?}");
        assert_eq!(printed, "WebhookSecrets { count: 1 }");
    }

    #[test]
    fn generated_secret_parses_and_differs() {
        let first = generate_secret();
        let second = generate_secret();
        assert!(first.starts_with(SECRET_PREFIX), "{first}");
        assert_ne!(first, second);

        let encoded = first.strip_prefix(SECRET_PREFIX).unwrap();
        let key = STANDARD.decode(encoded).unwrap();
        assert_eq!(key.len(), GENERATED_SECRET_BYTES);
        assert!(WebhookSecrets::parse(&first).is_ok());
    }
}
