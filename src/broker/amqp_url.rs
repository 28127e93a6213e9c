//! Parsing of `--amqp-url`: one AMQP URL, or several separated by commas
//! for the nodes of a cluster. It runs at startup, so that a URL that can
//! never work stops the process instead of failing every reconnect. Errors
//! name a node by its position and never repeat a URL, which may carry a
//! password.

use lapin::uri::AMQPUri;
use url::{Host, Url};

/// Heartbeat used when the AMQP URL sets none, in seconds. RabbitMQ's own
/// default of 60 s would leave a dead link unnoticed for up to two minutes.
const DEFAULT_HEARTBEAT_SECONDS: u16 = 10;

/// Parses a comma-separated list of AMQP URLs into one URI per node, in
/// order. Every node must be a valid `amqp://` or `amqps://` URL with a
/// host, and an empty entry, such as after a trailing comma, is an error.
pub fn parse_node_urls(urls: &str) -> Result<Vec<AMQPUri>, String> {
    let nodes: Vec<&str> = urls.split(',').map(str::trim).collect();
    if nodes.iter().all(|node| node.is_empty()) {
        return Err(
            "the URL is empty; set it to a URL such as amqp://user:pass@127.0.0.1:5672/%2f, or unset it for the in-process broker"
                .to_owned(),
        );
    }
    nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            parse_node_url(node).map_err(|reason| {
                if nodes.len() == 1 {
                    format!("the URL {reason}")
                } else {
                    format!("node {} of {} {reason}", index + 1, nodes.len())
                }
            })
        })
        .collect()
}

/// Parses one node's URL and adds the default heartbeat when it sets none.
/// An error is a phrase that follows the node's name, such as "is empty".
fn parse_node_url(text: &str) -> Result<AMQPUri, String> {
    if text.is_empty() {
        return Err("is empty; remove the extra comma or add the node's URL".to_owned());
    }

    let url = Url::parse(text).map_err(|error| format!("is not a valid URL: {error}"))?;
    if !matches!(url.scheme(), "amqp" | "amqps") {
        return Err(format!(
            "has the scheme {:?}; use amqp:// or amqps://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host; use the form amqp://user:pass@host:5672/vhost".to_owned());
    }
    if url.port() == Some(0) {
        return Err(
            "has port 0; use the broker's AMQP port, 5672 unless it is configured otherwise"
                .to_owned(),
        );
    }

    let mut uri = text
        .parse::<AMQPUri>()
        .map_err(|error| format!("is not a valid AMQP URL: {error}"))?;
    // amq-protocol-uri 10.6 takes the host from `Url::domain`, which is
    // empty for an IPv6 address, and then falls back to "localhost".
    // NOTE: the tests check the parsed host, but none connects over IPv6.
    if let Some(Host::Ipv6(address)) = url.host() {
        uri.authority.host = address.to_string();
    }

    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECONDS);
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_urls_parse_in_order() {
        let uris =
            parse_node_urls("amqp://guest:guest@127.0.0.1:5672/%2f, amqps://rabbit.example/prod")
                .unwrap();
        assert_eq!(uris.len(), 2);
        assert_eq!(uris[0].authority.host, "127.0.0.1");
        assert_eq!(uris[0].authority.port, 5672);
        assert_eq!(uris[0].vhost, "/");
        assert_eq!(uris[1].authority.host, "rabbit.example");
        assert_eq!(uris[1].authority.port, 5671);
        assert_eq!(uris[1].vhost, "prod");
    }

    #[test]
    fn ip_hosts_are_kept() {
        let uris =
            parse_node_urls("amqp://[::1]:5672/, amqp://[2001:db8::5]/, amqp://10.0.0.5/").unwrap();
        let hosts: Vec<&str> = uris.iter().map(|uri| uri.authority.host.as_str()).collect();
        assert_eq!(hosts, ["::1", "2001:db8::5", "10.0.0.5"]);
    }

    #[test]
    fn heartbeat_defaults_unless_set() {
        let default = parse_node_urls("amqp://127.0.0.1/").unwrap();
        assert_eq!(default[0].query.heartbeat, Some(DEFAULT_HEARTBEAT_SECONDS));
        let set = parse_node_urls("amqp://127.0.0.1/?heartbeat=30").unwrap();
        assert_eq!(set[0].query.heartbeat, Some(30));
    }

    #[test]
    fn invalid_urls_name_the_problem() {
        let cases = [
            ("", "the URL is empty"),
            (" , ", "the URL is empty"),
            (
                "amqp://127.0.0.1:99999/",
                "the URL is not a valid URL: invalid port number",
            ),
            (
                "amqp://127.0.0.1:abc/",
                "the URL is not a valid URL: invalid port number",
            ),
            ("amqp://127.0.0.1:0/", "the URL has port 0"),
            (
                "http://127.0.0.1:5672/",
                "the URL has the scheme \"http\"; use amqp://",
            ),
            ("localhost:5672", "the URL has the scheme \"localhost\""),
            (
                "rabbit",
                "the URL is not a valid URL: relative URL without a base",
            ),
            ("amqp:rabbit", "the URL has no host"),
            ("amqp:///vhost", "the URL has no host"),
            (
                "amqp://rabbit/?heartbeat=soon",
                "the URL is not a valid AMQP URL",
            ),
            (
                "amqp://a/,,amqp://b/",
                "node 2 of 3 is empty; remove the extra comma",
            ),
            ("amqp://a/,", "node 2 of 2 is empty"),
            ("amqp://a/,http://b/", "node 2 of 2 has the scheme \"http\""),
        ];
        for (urls, expected) in cases {
            let error = parse_node_urls(urls).unwrap_err();
            assert!(error.starts_with(expected), "{urls:?}: {error}");
        }
    }

    #[test]
    fn errors_never_repeat_the_password() {
        let cases = [
            "amqp://user:s3cret@rabbit:99999/",
            "http://user:s3cret@rabbit/",
            "amqp://user:s3cret@rabbit/?heartbeat=x",
            "amqp://user:s3cret@/",
            "amqp:user:s3cret",
        ];
        for urls in cases {
            let error = parse_node_urls(urls).unwrap_err();
            assert!(!error.contains("s3cret"), "{urls:?}: {error}");
        }
    }
}
