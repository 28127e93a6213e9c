use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

use crate::net::address::{AllowedNetworks, check};

/// Maximum length of a `PostBackUri` in bytes. It is checked on the text as
/// sent and again after normalization, which can percent-encode characters.
pub const MAX_POSTBACK_URI_BYTES: usize = 2048;

const EXAMPLE: &str = "https://example.com/hooks/commands";

/// A command's `PostBackUri`: an absolute http or https URL with a host and
/// without user info, normalized by the WHATWG URL parser.
///
/// A host that is an IP address is checked against the network rules here.
/// A host name is checked at send time, when it is resolved, because its
/// addresses can change between creation and delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostBackUri(Url);

impl PostBackUri {
    /// Parses and validates a `PostBackUri` from a create request. The error
    /// is a full sentence that names the problem and the fix.
    pub fn parse(value: &str, allowed: &AllowedNetworks) -> Result<Self, String> {
        check_text(value)?;

        // The parser also accepts numeric host forms such as 2130706433,
        // 0x7f000001 and 127.1 and turns them into IPv4 literals, so the
        // address check below checks the address that would be dialled.
        let url = Url::parse(value).map_err(|_| {
            format!("PostBackUri must be an absolute http or https URL, such as {EXAMPLE}")
        })?;

        check_url(&url, allowed)?;
        Ok(Self(url))
    }

    /// Returns the normalized URL, for example with a trailing `/` added to a
    /// bare host and the host lowercased.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Display for PostBackUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for PostBackUri {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Checks the raw text before parsing, because the WHATWG parser silently
/// strips surrounding spaces and any tab or newline, so the stored URL would
/// differ from what the caller sent.
fn check_text(value: &str) -> Result<(), String> {
    if value.trim().is_empty() || value.trim().eq_ignore_ascii_case("null") {
        return Err(format!(
            "PostBackUri is empty; set it to an absolute http or https URL, such as {EXAMPLE}"
        ));
    }
    if value.len() > MAX_POSTBACK_URI_BYTES {
        return Err(too_long(value.len()));
    }
    if value.trim() != value {
        return Err(
            "PostBackUri has leading or trailing whitespace; remove it before sending".to_owned(),
        );
    }
    if let Some(position) = value.find(|c: char| c.is_control()) {
        return Err(format!(
            "PostBackUri contains a control character at byte {position}; percent-encode or remove it"
        ));
    }
    Ok(())
}

fn check_url(url: &Url, allowed: &AllowedNetworks) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "PostBackUri scheme {:?} is not supported; use an http or https URL, such as {EXAMPLE}",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "PostBackUri must not contain user info (user:password@); remove it, \
             because receivers authenticate postbacks by their webhook-signature header"
                .to_owned(),
        );
    }
    if url.port() == Some(0) {
        return Err(
            "PostBackUri port 0 is invalid; use the receiver's port or leave the port out"
                .to_owned(),
        );
    }
    if url.as_str().len() > MAX_POSTBACK_URI_BYTES {
        return Err(too_long(url.as_str().len()));
    }

    match url.host() {
        None => Err(format!(
            "PostBackUri has no host; use an absolute http or https URL, such as {EXAMPLE}"
        )),
        Some(Host::Ipv4(ip)) => check_ip(IpAddr::V4(ip), allowed),
        Some(Host::Ipv6(ip)) => check_ip(IpAddr::V6(ip), allowed),
        Some(Host::Domain(name)) => check_name(name, allowed),
    }
}

fn check_ip(ip: IpAddr, allowed: &AllowedNetworks) -> Result<(), String> {
    check(ip, allowed).map_err(|refused| {
        format!(
            "PostBackUri host {} is {}; postbacks go only to public addresses \
             unless --postback-allowed-networks includes the address",
            refused.ip, refused.class
        )
    })
}

/// Rejects `localhost` and `*.localhost` unless a loopback address is
/// allowed, because these names are reserved for loopback and resolvers
/// commonly return 127.0.0.1 or ::1 for them. Other names are checked when
/// they are resolved at send time.
fn check_name(name: &str, allowed: &AllowedNetworks) -> Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let is_localhost = name == "localhost" || name.ends_with(".localhost");
    let loopback_allowed = allowed.contains(IpAddr::V4(Ipv4Addr::LOCALHOST))
        || allowed.contains(IpAddr::V6(Ipv6Addr::LOCALHOST));
    if is_localhost && !loopback_allowed {
        return Err(format!(
            "PostBackUri host {name} is loopback; postbacks go only to public addresses \
             unless --postback-allowed-networks includes 127.0.0.1 or ::1"
        ));
    }
    Ok(())
}

fn too_long(length: usize) -> String {
    format!(
        "PostBackUri is {length} bytes long, the maximum is {MAX_POSTBACK_URI_BYTES}; use a shorter URL"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> AllowedNetworks {
        AllowedNetworks::default()
    }

    fn loopback() -> AllowedNetworks {
        AllowedNetworks::parse("127.0.0.0/8,::1").unwrap()
    }

    #[test]
    fn accepts_public_http_and_https() {
        for value in [
            "https://example.com/hooks/commands",
            "http://example.com:8080/a?b=c",
            "https://8.8.8.8/hook",
            "https://[2606:4700:4700::1111]/hook",
            "https://bücher.example/hook",
        ] {
            assert!(PostBackUri::parse(value, &none()).is_ok(), "{value}");
        }
    }

    #[test]
    fn normalizes_the_stored_url() {
        let uri = PostBackUri::parse("HTTPS://Example.COM", &none()).unwrap();
        assert_eq!(uri.as_str(), "https://example.com/");
        assert_eq!(uri.url().host_str(), Some("example.com"));
        assert_eq!(uri.to_string(), "https://example.com/");
    }

    #[test]
    fn serializes_as_string() {
        let uri = PostBackUri::parse("https://example.com/a", &none()).unwrap();
        assert_eq!(
            serde_json::to_string(&uri).unwrap(),
            "\"https://example.com/a\""
        );
    }

    #[test]
    fn rejects_empty_blank_and_null() {
        for value in ["", "   ", "\t", "null", "NULL"] {
            let error = PostBackUri::parse(value, &none()).unwrap_err();
            assert!(
                error.starts_with("PostBackUri is empty"),
                "{value:?}: {error}"
            );
        }
    }

    #[test]
    fn rejects_relative_and_malformed_urls() {
        for value in [
            "/hooks",
            "example.com/hooks",
            "https://",
            "http://exa mple.com/",
        ] {
            let error = PostBackUri::parse(value, &none()).unwrap_err();
            assert_eq!(
                error,
                format!("PostBackUri must be an absolute http or https URL, such as {EXAMPLE}"),
                "{value:?}"
            );
        }
    }

    #[test]
    fn rejects_other_schemes() {
        for value in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "ws://example.com/",
        ] {
            let error = PostBackUri::parse(value, &none()).unwrap_err();
            assert!(
                error.starts_with("PostBackUri scheme"),
                "{value:?}: {error}"
            );
        }
    }

    #[test]
    fn rejects_user_info() {
        for value in [
            "https://user:pass@example.com/",
            "https://user@example.com/",
            "https://:pass@example.com/",
        ] {
            let error = PostBackUri::parse(value, &none()).unwrap_err();
            assert!(error.contains("user info"), "{value:?}: {error}");
        }
    }

    #[test]
    fn rejects_port_zero() {
        let error = PostBackUri::parse("https://example.com:0/", &none()).unwrap_err();
        assert!(error.contains("port 0"), "{error}");
    }

    #[test]
    fn rejects_whitespace_and_control_characters() {
        let error = PostBackUri::parse(" https://example.com/", &none()).unwrap_err();
        assert!(error.contains("whitespace"), "{error}");

        let error = PostBackUri::parse("https://exa\nmple.com/", &none()).unwrap_err();
        assert!(error.contains("control character at byte 11"), "{error}");

        let error = PostBackUri::parse("https://example.com/\ta", &none()).unwrap_err();
        assert!(error.contains("control character"), "{error}");
    }

    #[test]
    fn enforces_length_limit() {
        let prefix = "https://example.com/";
        let at_limit = format!(
            "{prefix}{}",
            "a".repeat(MAX_POSTBACK_URI_BYTES - prefix.len())
        );
        assert!(PostBackUri::parse(&at_limit, &none()).is_ok());

        let over = format!("{at_limit}a");
        let error = PostBackUri::parse(&over, &none()).unwrap_err();
        assert!(error.contains("2049 bytes"), "{error}");
    }

    #[test]
    fn enforces_length_after_normalization() {
        // Each two-byte "é" becomes the six bytes %C3%A9 in the path.
        let value = format!("https://example.com/{}", "é".repeat(500));
        assert!(value.len() <= MAX_POSTBACK_URI_BYTES);
        let error = PostBackUri::parse(&value, &none()).unwrap_err();
        assert!(error.contains("bytes long"), "{error}");
    }

    #[test]
    fn rejects_numeric_loopback_spellings() {
        for value in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://017700000001/",
            "http://127.1/",
            "http://0x7f.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
        ] {
            let error = PostBackUri::parse(value, &none()).unwrap_err();
            assert!(error.contains("is loopback"), "{value}: {error}");
            assert!(
                error.contains("--postback-allowed-networks"),
                "{value}: {error}"
            );
        }
    }

    #[test]
    fn rejects_internal_address_literals() {
        for (value, class) in [
            ("http://10.0.0.1/", "private"),
            ("http://169.254.169.254/latest/meta-data/", "link-local"),
            ("http://[fe80::1]/", "link-local"),
            ("http://100.64.0.1/", "carrier-grade NAT"),
            ("http://0/", "unspecified"),
            ("http://0.0.0.0/", "unspecified"),
            ("http://[fd00::1]/", "private"),
            ("http://192.0.2.1/", "documentation"),
            ("http://255.255.255.255/", "broadcast"),
        ] {
            let error = PostBackUri::parse(value, &none()).unwrap_err();
            assert!(error.contains(class), "{value}: {error}");
        }
    }

    #[test]
    fn error_names_normalized_address() {
        let error = PostBackUri::parse("http://2130706433/", &none()).unwrap_err();
        assert!(
            error.starts_with("PostBackUri host 127.0.0.1 is loopback"),
            "{error}"
        );
    }

    #[test]
    fn allow_list_admits_loopback_literal() {
        assert!(PostBackUri::parse("http://127.0.0.1:8080/hook", &loopback()).is_ok());
        assert!(PostBackUri::parse("http://[::1]:8080/hook", &loopback()).is_ok());
        assert!(PostBackUri::parse("http://[::ffff:127.0.0.1]/", &loopback()).is_ok());
        assert!(PostBackUri::parse("http://10.0.0.1/", &loopback()).is_err());
    }

    #[test]
    fn rejects_localhost_names_unless_loopback_allowed() {
        for value in [
            "http://localhost/",
            "http://LOCALHOST:8080/",
            "http://localhost./",
            "http://api.localhost/",
        ] {
            let error = PostBackUri::parse(value, &none()).unwrap_err();
            assert!(error.contains("is loopback"), "{value}: {error}");
            assert!(PostBackUri::parse(value, &loopback()).is_ok(), "{value}");
        }
    }

    #[test]
    fn leaves_other_names_for_send_time() {
        assert!(PostBackUri::parse("http://internal.example/", &none()).is_ok());
        assert!(PostBackUri::parse("http://localhost.example.com/", &none()).is_ok());
    }
}
