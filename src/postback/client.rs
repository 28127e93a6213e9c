//! The HTTP client that sends postbacks to caller-chosen URLs.
//!
//! Because the caller picks the URL, every connection is checked against the
//! network rules in [`crate::net::address`]. An IP-literal host is checked
//! before the request. A host name is checked inside the DNS resolver that
//! reqwest uses to connect, so the addresses checked are the ones dialled.
//! Proxies and redirects are turned off, one deadline covers the whole
//! exchange, and at most a few KiB of the response body are read.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, redirect};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};
use url::{Host, Url};

use crate::net::address::{AllowedNetworks, RefusedAddress, check};
use crate::postback::schedule::parse_retry_after;

/// Settings of a [`PostbackClient`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Networks that postbacks may reach although they are not public.
    pub allowed: AllowedNetworks,
    /// Deadline for one attempt: DNS lookup, connect, TLS, request and
    /// response, body included. Waiting for a per-host slot is not counted.
    pub attempt_timeout: Duration,
    /// Maximum number of response body bytes read. The connection is closed
    /// when the body is longer.
    pub max_response_bytes: usize,
    /// Maximum number of concurrent attempts to one `host:port`. Zero counts
    /// as one, because no attempt could start otherwise.
    pub per_host_concurrency: usize,
    pub user_agent: String,
}

impl ClientConfig {
    pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4096;
    pub const DEFAULT_PER_HOST_CONCURRENCY: usize = 4;

    /// Creates the default configuration with the given allow list.
    pub fn new(allowed: AllowedNetworks) -> Self {
        Self {
            allowed,
            attempt_timeout: Self::DEFAULT_ATTEMPT_TIMEOUT,
            max_response_bytes: Self::DEFAULT_MAX_RESPONSE_BYTES,
            per_host_concurrency: Self::DEFAULT_PER_HOST_CONCURRENCY,
            user_agent: concat!("command-dispatcher/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self::new(AllowedNetworks::default())
    }
}

/// The class of an attempt's result, which decides the caller's next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The receiver responded with a 2xx status.
    Delivered,
    /// A temporary failure: 5xx, 408, 429, a timeout, or a connection or DNS
    /// error. Try again later.
    Retry,
    /// The receiver responded with 410 Gone. Stop delivering to this URL.
    Gone,
    /// The receiver responded with a 3xx or with a 4xx other than 408, 410
    /// and 429, or the request could not be built. Retrying would fail the
    /// same way.
    Rejected,
    /// The URL's address is not allowed by the network rules. No connection
    /// was made.
    Refused,
}

impl Outcome {
    /// Returns true when no further attempt should be made.
    pub fn is_final(self) -> bool {
        self != Self::Retry
    }
}

/// The result of one postback attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub outcome: Outcome,
    /// The response status, if a response arrived.
    pub status: Option<u16>,
    /// A short description of the failure. It never contains response body
    /// content.
    pub error: Option<String>,
    /// The wait requested by the receiver's `Retry-After` header, not yet
    /// capped. `RetrySchedule::delay_before_attempt` applies the cap.
    pub retry_after: Option<Duration>,
    /// Time from the start of the attempt to its end, without the wait for a
    /// per-host slot. Zero when the request was rejected or refused before
    /// the wait.
    pub duration: Duration,
}

impl Attempt {
    fn failed(outcome: Outcome, error: String) -> Self {
        Self {
            outcome,
            status: None,
            error: Some(error),
            retry_after: None,
            duration: Duration::ZERO,
        }
    }
}

/// Sends postbacks. Cloning is cheap, and clones share connections and
/// per-host limits.
#[derive(Clone)]
pub struct PostbackClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    allowed: AllowedNetworks,
    attempt_timeout: Duration,
    max_response_bytes: usize,
    per_host_concurrency: usize,
    hosts: Mutex<HashMap<String, HostEntry>>,
}

/// The concurrency limit of one `host:port`, and how many attempts hold or
/// wait for one of its slots. The entry is removed when that count drops to
/// zero, so the map only contains hosts in use.
struct HostEntry {
    slots: Arc<Semaphore>,
    users: usize,
}

impl PostbackClient {
    /// Builds the client.
    ///
    /// # Panics
    ///
    /// Panics if reqwest cannot initialize its TLS backend, which
    /// [`Self::try_new`] returns as an error instead.
    pub fn new(config: ClientConfig) -> Self {
        Self::try_new(config).expect("failed to build the postback HTTP client")
    }

    pub fn try_new(config: ClientConfig) -> Result<Self, reqwest::Error> {
        let resolver = CheckedResolver {
            allowed: config.allowed.clone(),
        };
        let http = reqwest::Client::builder()
            // HTTP_PROXY, HTTPS_PROXY and ALL_PROXY must never reroute
            // postbacks, because the proxy would then pick the address to
            // connect to, and no check would see it.
            .no_proxy()
            .redirect(redirect::Policy::none())
            .dns_resolver(Arc::new(resolver))
            .user_agent(config.user_agent.clone())
            .build()?;

        Ok(Self {
            inner: Arc::new(Inner {
                http,
                allowed: config.allowed,
                attempt_timeout: config.attempt_timeout,
                max_response_bytes: config.max_response_bytes,
                per_host_concurrency: config.per_host_concurrency.max(1),
                hosts: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Posts `body` as JSON to `url` with the given extra headers, once.
    ///
    /// `Content-Type: application/json` is always set and replaces a caller's
    /// value. Redirects are not followed and count as [`Outcome::Rejected`].
    ///
    /// Before the attempt starts, the call waits for one of the
    /// `per_host_concurrency` slots of the URL's `host:port`, without a time
    /// limit, so a slow receiver delays only its own postbacks. A caller that
    /// must not wait long should wrap the call in `tokio::time::timeout`.
    /// Cancelling the call while it waits is safe.
    pub async fn send(&self, url: &Url, headers: &[(&str, String)], body: Bytes) -> Attempt {
        let host_key = match self.check_url(url) {
            Ok(host_key) => host_key,
            Err(attempt) => return attempt,
        };
        let headers = match build_headers(headers) {
            Ok(headers) => headers,
            Err(error) => return Attempt::failed(Outcome::Rejected, error),
        };

        let _slot = self.acquire_slot(host_key).await;
        let started = Instant::now();
        let mut attempt = self.exchange(url, headers, body, started).await;
        attempt.duration = started.elapsed();
        attempt
    }

    /// Checks the scheme and an IP-literal host, and returns the `host:port`
    /// key for the per-host limit. reqwest connects to a literal address
    /// without calling the resolver, so literals are checked here.
    fn check_url(&self, url: &Url) -> Result<String, Attempt> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Attempt::failed(
                Outcome::Rejected,
                format!("URL scheme {:?} is not http or https", url.scheme()),
            ));
        }
        let literal = match url.host() {
            None => {
                return Err(Attempt::failed(
                    Outcome::Rejected,
                    "URL has no host".to_owned(),
                ));
            }
            Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            Some(Host::Domain(_)) => None,
        };
        if let Some(ip) = literal {
            check(ip, &self.inner.allowed)
                .map_err(|refused| Attempt::failed(Outcome::Refused, refused.to_string()))?;
        }

        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or_default();
        Ok(format!("{host}:{port}"))
    }

    async fn acquire_slot(&self, host_key: String) -> HostSlot<'_> {
        let slots = {
            let mut hosts = self.lock_hosts();
            let entry = hosts.entry(host_key.clone()).or_insert_with(|| HostEntry {
                slots: Arc::new(Semaphore::new(self.inner.per_host_concurrency)),
                users: 0,
            });
            entry.users += 1;
            entry.slots.clone()
        };
        // The guard exists before the wait, so a cancelled wait still
        // releases the entry.
        let mut slot = HostSlot {
            client: self,
            host_key,
            permit: None,
        };
        slot.permit = Some(
            slots
                .acquire_owned()
                .await
                .expect("per-host semaphores are never closed"),
        );
        slot
    }

    fn lock_hosts(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostEntry>> {
        // The map stays consistent even if a holder panicked, because every
        // update is a single insert, increment, decrement or remove.
        self.inner
            .hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn exchange(
        &self,
        url: &Url,
        headers: HeaderMap,
        body: Bytes,
        started: Instant,
    ) -> Attempt {
        let deadline = started + self.inner.attempt_timeout;
        let request = self
            .inner
            .http
            .post(url.clone())
            .headers(headers)
            .body(body)
            .send();

        let response = match timeout_at(deadline, request).await {
            Err(_) => return Attempt::failed(Outcome::Retry, self.timed_out()),
            Ok(Err(error)) => {
                let (outcome, description) = describe_error(&error);
                return Attempt::failed(outcome, description);
            }
            Ok(Ok(response)) => response,
        };

        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        let body_end = read_bounded_body(response, self.inner.max_response_bytes, deadline).await;
        if body_end != BodyEnd::Complete {
            tracing::debug!(
                host = url.host_str(),
                %status,
                ?body_end,
                "postback response body was not read to the end"
            );
        }

        let (outcome, error) = classify_status(status);
        Attempt {
            outcome,
            status: Some(status.as_u16()),
            error,
            retry_after,
            duration: Duration::ZERO,
        }
    }

    fn timed_out(&self) -> String {
        format!(
            "timed out after {}",
            humantime::format_duration(self.inner.attempt_timeout)
        )
    }

    #[cfg(test)]
    fn tracked_hosts(&self) -> usize {
        self.lock_hosts().len()
    }
}

/// A held or awaited slot of one `host:port`. Dropping it frees the slot and
/// removes the host's entry once no attempt uses it.
struct HostSlot<'a> {
    client: &'a PostbackClient,
    host_key: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for HostSlot<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut hosts = self.client.lock_hosts();
        if let Some(entry) = hosts.get_mut(&self.host_key) {
            entry.users -= 1;
            if entry.users == 0 {
                hosts.remove(&self.host_key);
            }
        }
    }
}

/// Headers that the HTTP client sets itself, because a wrong value would
/// break the request framing or its target.
const CLIENT_HEADERS: [&str; 5] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
];

fn build_headers(headers: &[(&str, String)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len() + 1);
    for (name, value) in headers {
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is invalid"))?;
        if CLIENT_HEADERS.contains(&header_name.as_str()) {
            return Err(format!(
                "header {header_name} is set by the HTTP client and cannot be overridden"
            ));
        }
        // The value is left out of the message, because it may be a signature.
        let header_value = HeaderValue::from_str(value)
            .map_err(|_| format!("header {header_name} has an invalid value"))?;
        map.append(header_name, header_value);
    }
    map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(map)
}

#[derive(Debug, PartialEq, Eq)]
enum BodyEnd {
    Complete,
    TooLarge,
    TimedOut,
    Failed,
}

/// Reads and discards the response body until its end, `limit` bytes or the
/// deadline, whichever comes first. The outcome comes from the status alone,
/// so the body is read only to let a short response free its connection for
/// reuse. Dropping the response early closes the connection.
async fn read_bounded_body(
    mut response: reqwest::Response,
    limit: usize,
    deadline: Instant,
) -> BodyEnd {
    let mut read = 0usize;
    loop {
        match timeout_at(deadline, response.chunk()).await {
            Err(_) => return BodyEnd::TimedOut,
            Ok(Err(_)) => return BodyEnd::Failed,
            Ok(Ok(None)) => return BodyEnd::Complete,
            Ok(Ok(Some(chunk))) => {
                read = read.saturating_add(chunk.len());
                if read > limit {
                    return BodyEnd::TooLarge;
                }
            }
        }
    }
}

fn classify_status(status: StatusCode) -> (Outcome, Option<String>) {
    let code = status.as_u16();
    let responded = match status.canonical_reason() {
        Some(reason) => format!("receiver responded with {code} {reason}"),
        None => format!("receiver responded with {code}"),
    };
    match code {
        200..=299 => (Outcome::Delivered, None),
        410 => (Outcome::Gone, Some(responded)),
        408 | 429 | 500..=599 => (Outcome::Retry, Some(responded)),
        300..=399 => (
            Outcome::Rejected,
            Some(format!("{responded}, and redirects are not followed")),
        ),
        _ => (Outcome::Rejected, Some(responded)),
    }
}

/// Maps a request error to an outcome and a short description, from the
/// innermost causes, because reqwest's own message includes the URL.
fn describe_error(error: &reqwest::Error) -> (Outcome, String) {
    let causes = || error_causes(error);

    if let Some(resolve_error) = causes().find_map(|cause| cause.downcast_ref::<ResolveError>()) {
        let outcome = match resolve_error {
            ResolveError::Refused(_) => Outcome::Refused,
            ResolveError::Lookup { .. } | ResolveError::NoAddresses { .. } => Outcome::Retry,
        };
        return (outcome, resolve_error.to_string());
    }

    if let Some(io_error) = causes().find_map(|cause| cause.downcast_ref::<io::Error>()) {
        match io_error.kind() {
            io::ErrorKind::ConnectionRefused => {
                return (Outcome::Retry, "connection refused".to_owned());
            }
            io::ErrorKind::ConnectionReset => {
                return (
                    Outcome::Retry,
                    "connection reset by the receiver".to_owned(),
                );
            }
            io::ErrorKind::TimedOut => {
                return (Outcome::Retry, "connection timed out".to_owned());
            }
            _ => {}
        }
    }

    let innermost = causes()
        .last()
        .map(|cause| cause.to_string())
        .unwrap_or_else(|| "unknown error".to_owned());
    let description = if error.is_connect() {
        format!("connection failed: {innermost}")
    } else {
        format!("request failed: {innermost}")
    };
    (Outcome::Retry, description)
}

/// Iterates over the sources of `error`, outermost first, without `error`.
fn error_causes<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(error.source(), |&cause: &&'a (dyn StdError + 'static)| {
        cause.source()
    })
}

/// The DNS resolver given to reqwest. It resolves a host name once, checks
/// every address, and returns them only if all pass. Refusing the whole
/// name, rather than dropping the bad addresses, keeps a name that mixes
/// public and internal addresses from reaching the internal one through
/// connection fallback.
struct CheckedResolver {
    allowed: AllowedNetworks,
}

#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("{0}")]
    Refused(RefusedAddress),
    #[error("DNS lookup of {host} failed: {source}")]
    Lookup { host: String, source: io::Error },
    #[error("DNS lookup of {host} returned no addresses")]
    NoAddresses { host: String },
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allowed = self.allowed.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0 is a placeholder, and reqwest puts the URL's port in.
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|source| ResolveError::Lookup {
                    host: host.clone(),
                    source,
                })?
                .collect();
            if addresses.is_empty() {
                return Err(ResolveError::NoAddresses { host }.into());
            }
            for address in &addresses {
                check(address.ip(), &allowed).map_err(ResolveError::Refused)?;
            }
            let addresses: Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use axum::Router;
    use axum::extract::{Path, State};
    use axum::http::HeaderMap as AxumHeaderMap;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const WAIT_LIMIT: Duration = Duration::from_secs(10);

    fn loopback_config() -> ClientConfig {
        ClientConfig::new(AllowedNetworks::parse("127.0.0.0/8,::1").unwrap())
    }

    fn loopback_client() -> PostbackClient {
        PostbackClient::new(loopback_config())
    }

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    /// Polls `condition` until it holds, failing the test after WAIT_LIMIT.
    async fn wait_until(description: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT_LIMIT;
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {description}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[derive(Clone, Debug)]
    struct Received {
        path: String,
        headers: AxumHeaderMap,
        body: Bytes,
    }

    #[derive(Clone)]
    struct Receiver {
        received: Arc<Mutex<Vec<Received>>>,
        in_flight: Arc<AtomicUsize>,
        max_in_flight: Arc<AtomicUsize>,
        gate: Arc<Semaphore>,
    }

    impl Receiver {
        fn received(&self) -> Vec<Received> {
            self.received.lock().unwrap().clone()
        }

        fn record(&self, path: String, headers: AxumHeaderMap, body: Bytes) {
            self.received.lock().unwrap().push(Received {
                path,
                headers,
                body,
            });
        }
    }

    /// Starts an axum receiver on 127.0.0.1. `POST /status/{code}` responds
    /// with that status, `/redirect/{port}` with a 302 to that port, `/limited`
    /// with 429 and `Retry-After: 7`, and `/hold` waits for a gate permit.
    async fn start_receiver() -> (Receiver, SocketAddr) {
        async fn status(
            State(receiver): State<Receiver>,
            Path(code): Path<u16>,
            headers: AxumHeaderMap,
            body: Bytes,
        ) -> StatusCode {
            receiver.record(format!("/status/{code}"), headers, body);
            StatusCode::from_u16(code).unwrap()
        }

        async fn redirect(
            State(receiver): State<Receiver>,
            Path(port): Path<u16>,
            headers: AxumHeaderMap,
            body: Bytes,
        ) -> Response {
            receiver.record("/redirect".to_owned(), headers, body);
            let location = format!("http://127.0.0.1:{port}/target");
            (StatusCode::FOUND, [("location", location)]).into_response()
        }

        async fn limited(State(receiver): State<Receiver>) -> Response {
            receiver.record("/limited".to_owned(), AxumHeaderMap::new(), Bytes::new());
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "7")]).into_response()
        }

        async fn hold(State(receiver): State<Receiver>) -> StatusCode {
            let now = receiver.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            receiver.max_in_flight.fetch_max(now, Ordering::SeqCst);
            receiver.gate.acquire().await.unwrap().forget();
            receiver.in_flight.fetch_sub(1, Ordering::SeqCst);
            StatusCode::NO_CONTENT
        }

        let receiver = Receiver {
            received: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        };
        let app = Router::new()
            .route("/status/{code}", post(status))
            .route("/redirect/{port}", post(redirect))
            .route("/limited", post(limited))
            .route("/hold", post(hold))
            .with_state(receiver.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, address)
    }

    /// Asserts that `listener` has accepted no connection so far. A control
    /// connection is made and accepted: the kernel queues connections in
    /// arrival order, so any earlier one would be accepted first.
    async fn assert_no_connection(listener: &TcpListener, source: &str) {
        let control = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let control_address = control.local_addr().unwrap();
        let (_, peer) = timeout_at(Instant::now() + WAIT_LIMIT, listener.accept())
            .await
            .expect("control connection was not accepted")
            .unwrap();
        assert_eq!(peer, control_address, "{source} reached the listener");
    }

    /// Reads from `stream` until the end of the request headers.
    async fn read_request_head(stream: &mut TcpStream) {
        let mut head = Vec::new();
        let mut buffer = [0u8; 1024];
        while !head.windows(4).any(|window| window == b"\r\n\r\n") {
            let read = stream.read(&mut buffer).await.unwrap();
            assert!(read > 0, "client closed before sending the request");
            head.extend_from_slice(&buffer[..read]);
        }
    }

    #[tokio::test]
    async fn success_status_is_delivered() {
        let (receiver, address) = start_receiver().await;
        let client = loopback_client();

        for code in [200, 201, 204] {
            let target = url(&format!("http://{address}/status/{code}"));
            let attempt = client.send(&target, &[], Bytes::from_static(b"{}")).await;
            assert_eq!(attempt.outcome, Outcome::Delivered, "{code}");
            assert_eq!(attempt.status, Some(code), "{code}");
            assert_eq!(attempt.error, None, "{code}");
        }
        assert_eq!(receiver.received().len(), 3);
    }

    #[tokio::test]
    async fn request_carries_headers_and_body() {
        let (receiver, address) = start_receiver().await;
        let client = loopback_client();
        let target = url(&format!("http://{address}/status/200"));
        let headers = [
            ("webhook-id", "msg_1".to_owned()),
            ("content-type", "text/plain".to_owned()),
        ];
        let body = Bytes::from_static(br#"{"id":"1"}"#);

        let attempt = client.send(&target, &headers, body.clone()).await;

        assert_eq!(attempt.outcome, Outcome::Delivered);
        let received = receiver.received();
        assert_eq!(received.len(), 1);
        let request = &received[0];
        assert_eq!(request.path, "/status/200");
        assert_eq!(request.body, body);
        assert_eq!(request.headers["webhook-id"], "msg_1");
        assert_eq!(
            request.headers.get_all("content-type").iter().count(),
            1,
            "the caller's content-type must be replaced"
        );
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(
            request.headers["user-agent"],
            concat!("command-dispatcher/", env!("CARGO_PKG_VERSION"))
        );
    }

    #[tokio::test]
    async fn server_error_is_retried() {
        let (_, address) = start_receiver().await;
        let client = loopback_client();

        for code in [500, 502, 503, 408, 429] {
            let target = url(&format!("http://{address}/status/{code}"));
            let attempt = client.send(&target, &[], Bytes::new()).await;
            assert_eq!(attempt.outcome, Outcome::Retry, "{code}");
            assert_eq!(attempt.status, Some(code), "{code}");
        }

        let target = url(&format!("http://{address}/status/500"));
        let attempt = client.send(&target, &[], Bytes::new()).await;
        assert_eq!(
            attempt.error.as_deref(),
            Some("receiver responded with 500 Internal Server Error")
        );
    }

    #[tokio::test]
    async fn gone_receiver_stops_delivery() {
        let (_, address) = start_receiver().await;
        let client = loopback_client();
        let target = url(&format!("http://{address}/status/410"));

        let attempt = client.send(&target, &[], Bytes::new()).await;

        assert_eq!(attempt.outcome, Outcome::Gone);
        assert!(attempt.outcome.is_final());
        assert_eq!(attempt.status, Some(410));
    }

    #[tokio::test]
    async fn client_error_is_rejected() {
        let (_, address) = start_receiver().await;
        let client = loopback_client();

        for code in [400, 401, 404, 422] {
            let target = url(&format!("http://{address}/status/{code}"));
            let attempt = client.send(&target, &[], Bytes::new()).await;
            assert_eq!(attempt.outcome, Outcome::Rejected, "{code}");
            assert_eq!(attempt.status, Some(code), "{code}");
        }
    }

    #[tokio::test]
    async fn redirect_is_rejected_and_not_followed() {
        let (receiver, address) = start_receiver().await;
        let redirect_target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_port = redirect_target.local_addr().unwrap().port();
        let client = loopback_client();
        let target = url(&format!("http://{address}/redirect/{target_port}"));

        let attempt = client.send(&target, &[], Bytes::new()).await;

        assert_eq!(attempt.outcome, Outcome::Rejected);
        assert_eq!(attempt.status, Some(302));
        assert_eq!(
            attempt.error.as_deref(),
            Some("receiver responded with 302 Found, and redirects are not followed")
        );
        assert_eq!(receiver.received().len(), 1);
        assert_no_connection(&redirect_target, "the redirect").await;
    }

    #[tokio::test]
    async fn too_many_requests_reports_retry_after() {
        let (_, address) = start_receiver().await;
        let client = loopback_client();
        let target = url(&format!("http://{address}/limited"));

        let attempt = client.send(&target, &[], Bytes::new()).await;

        assert_eq!(attempt.outcome, Outcome::Retry);
        assert_eq!(attempt.status, Some(429));
        assert_eq!(attempt.retry_after, Some(Duration::from_secs(7)));
    }

    #[tokio::test]
    async fn silent_receiver_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Accepts and reads, but never responds, and keeps the socket open.
        tokio::spawn(async move {
            let mut open_streams = Vec::new();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                read_request_head(&mut stream).await;
                open_streams.push(stream);
            }
        });
        let config = ClientConfig {
            attempt_timeout: Duration::from_millis(300),
            ..loopback_config()
        };
        let client = PostbackClient::new(config);
        let target = url(&format!("http://{address}/hook"));

        let attempt = client.send(&target, &[], Bytes::new()).await;

        assert_eq!(attempt.outcome, Outcome::Retry);
        assert_eq!(attempt.status, None);
        assert_eq!(attempt.error.as_deref(), Some("timed out after 300ms"));
        assert!(
            attempt.duration >= Duration::from_millis(300),
            "{attempt:?}"
        );
        assert!(attempt.duration < Duration::from_secs(2), "{attempt:?}");
    }

    /// Starts a raw receiver that responds 200 with an endless chunked body,
    /// writing `chunk` every `pause`. It returns the count of body bytes
    /// written, and a flag that is set once a write fails because the client
    /// closed the connection.
    async fn start_endless_body(
        chunk: &'static [u8],
        pause: Duration,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let written = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let (written_by_server, closed_by_client) = (written.clone(), closed.clone());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request_head(&mut stream).await;
            let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
            stream.write_all(head).await.unwrap();
            let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
            loop {
                if stream.write_all(&frame).await.is_err() {
                    closed_by_client.store(true, Ordering::SeqCst);
                    return;
                }
                written_by_server.fetch_add(chunk.len(), Ordering::SeqCst);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        });
        (address, written, closed)
    }

    #[tokio::test]
    async fn endless_body_stops_at_byte_cap() {
        static CHUNK: [u8; 16 * 1024] = [b'x'; 16 * 1024];
        let (address, _written, closed) = start_endless_body(&CHUNK, Duration::ZERO).await;
        let config = ClientConfig {
            attempt_timeout: Duration::from_secs(5),
            ..loopback_config()
        };
        let client = PostbackClient::new(config);
        let target = url(&format!("http://{address}/hook"));

        let attempt = client.send(&target, &[], Bytes::new()).await;

        assert_eq!(attempt.outcome, Outcome::Delivered);
        assert_eq!(attempt.status, Some(200));
        assert!(
            attempt.duration < Duration::from_secs(2),
            "the byte cap, not the deadline, must end the attempt: {attempt:?}"
        );
        wait_until("the receiver sees the connection closed", || {
            closed.load(Ordering::SeqCst)
        })
        .await;
    }

    #[tokio::test]
    async fn trickling_body_stops_at_deadline() {
        let (address, written, closed) = start_endless_body(b"x", Duration::from_millis(20)).await;
        let config = ClientConfig {
            attempt_timeout: Duration::from_millis(300),
            ..loopback_config()
        };
        let client = PostbackClient::new(config);
        let target = url(&format!("http://{address}/hook"));

        let attempt = client.send(&target, &[], Bytes::new()).await;

        assert_eq!(attempt.outcome, Outcome::Delivered);
        assert!(
            attempt.duration >= Duration::from_millis(300),
            "{attempt:?}"
        );
        assert!(attempt.duration < Duration::from_secs(2), "{attempt:?}");
        assert!(
            written.load(Ordering::SeqCst) < ClientConfig::DEFAULT_MAX_RESPONSE_BYTES,
            "the deadline, not the byte cap, must end the attempt"
        );
        wait_until("the receiver sees the connection closed", || {
            closed.load(Ordering::SeqCst)
        })
        .await;
    }

    #[tokio::test]
    async fn closed_port_is_retried() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let client = loopback_client();
        let target = url(&format!("http://{address}/hook"));

        let attempt = client.send(&target, &[], Bytes::new()).await;

        assert_eq!(attempt.outcome, Outcome::Retry);
        assert_eq!(attempt.error.as_deref(), Some("connection refused"));
    }

    #[tokio::test]
    async fn loopback_spellings_are_refused_without_connecting() {
        let listener_v4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener_v6 = TcpListener::bind("[::1]:0").await.unwrap();
        let port_v4 = listener_v4.local_addr().unwrap().port();
        let port_v6 = listener_v6.local_addr().unwrap().port();
        let client = PostbackClient::new(ClientConfig::default());

        let cases = [
            (
                format!("http://127.0.0.1:{port_v4}/"),
                "address 127.0.0.1 is loopback and not in the allowed postback networks",
            ),
            (
                format!("http://[::ffff:127.0.0.1]:{port_v4}/"),
                "address ::ffff:127.0.0.1 is loopback and not in the allowed postback networks",
            ),
            (
                format!("http://localhost:{port_v4}/"),
                "address 127.0.0.1 is loopback and not in the allowed postback networks",
            ),
            (
                format!("http://[::1]:{port_v6}/"),
                "address ::1 is loopback and not in the allowed postback networks",
            ),
        ];
        for (target, expected) in &cases {
            let attempt = client.send(&url(target), &[], Bytes::new()).await;
            assert_eq!(attempt.outcome, Outcome::Refused, "{target}");
            assert_eq!(attempt.error.as_deref(), Some(*expected), "{target}");
            assert_eq!(attempt.status, None, "{target}");
        }

        assert_no_connection(&listener_v4, "a refused IPv4 postback").await;
        assert_no_connection(&listener_v6, "a refused IPv6 postback").await;
    }

    #[tokio::test]
    #[should_panic(expected = "an earlier connection reached the listener")]
    async fn connection_check_detects_earlier_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _earlier = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        assert_no_connection(&listener, "an earlier connection").await;
    }

    #[tokio::test]
    async fn allowed_loopback_name_is_delivered() {
        let (receiver, address) = start_receiver().await;
        let client = loopback_client();
        let target = url(&format!("http://localhost:{}/status/200", address.port()));

        let attempt = client.send(&target, &[], Bytes::new()).await;

        assert_eq!(attempt.outcome, Outcome::Delivered, "{attempt:?}");
        assert_eq!(receiver.received().len(), 1);
    }

    #[tokio::test]
    async fn invalid_request_is_rejected_before_sending() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = loopback_client();
        let target = url(&format!("http://{address}/hook"));

        let attempt = client
            .send(&target, &[("bad header", "x".to_owned())], Bytes::new())
            .await;
        assert_eq!(attempt.outcome, Outcome::Rejected);
        assert_eq!(
            attempt.error.as_deref(),
            Some("header name \"bad header\" is invalid")
        );

        let attempt = client
            .send(&target, &[("webhook-id", "a\nb".to_owned())], Bytes::new())
            .await;
        assert_eq!(
            attempt.error.as_deref(),
            Some("header webhook-id has an invalid value")
        );

        let attempt = client
            .send(&target, &[("Host", "example.com".to_owned())], Bytes::new())
            .await;
        assert_eq!(attempt.outcome, Outcome::Rejected);

        let attempt = client
            .send(&url(&format!("ftp://{address}/")), &[], Bytes::new())
            .await;
        assert_eq!(attempt.outcome, Outcome::Rejected);

        assert_no_connection(&listener, "a rejected request").await;
    }

    #[tokio::test]
    async fn slow_host_holds_only_its_own_slots() {
        let (slow, slow_address) = start_receiver().await;
        let (_, fast_address) = start_receiver().await;
        let config = ClientConfig {
            per_host_concurrency: 2,
            ..loopback_config()
        };
        let client = PostbackClient::new(config);
        let slow_target = url(&format!("http://{slow_address}/hold"));

        let mut slow_sends = Vec::new();
        for _ in 0..4 {
            let client = client.clone();
            let target = slow_target.clone();
            slow_sends.push(tokio::spawn(async move {
                client.send(&target, &[], Bytes::new()).await
            }));
        }
        wait_until("two requests reach the slow receiver", || {
            slow.in_flight.load(Ordering::SeqCst) == 2
        })
        .await;

        let fast_target = url(&format!("http://{fast_address}/status/200"));
        let attempt = client.send(&fast_target, &[], Bytes::new()).await;
        assert_eq!(
            attempt.outcome,
            Outcome::Delivered,
            "other hosts must not wait"
        );
        assert_eq!(slow.in_flight.load(Ordering::SeqCst), 2);

        slow.gate.add_permits(4);
        for task in slow_sends {
            let attempt = task.await.unwrap();
            assert_eq!(attempt.outcome, Outcome::Delivered);
        }
        assert_eq!(slow.max_in_flight.load(Ordering::SeqCst), 2);
        assert_eq!(client.tracked_hosts(), 0, "idle hosts must be dropped");
    }

    #[tokio::test]
    async fn cancelled_wait_releases_host_entry() {
        let (slow, slow_address) = start_receiver().await;
        let config = ClientConfig {
            per_host_concurrency: 1,
            ..loopback_config()
        };
        let client = PostbackClient::new(config);
        let target = url(&format!("http://{slow_address}/hold"));

        let holder = {
            let (client, target) = (client.clone(), target.clone());
            tokio::spawn(async move { client.send(&target, &[], Bytes::new()).await })
        };
        wait_until("the first request reaches the receiver", || {
            slow.in_flight.load(Ordering::SeqCst) == 1
        })
        .await;

        let waiter = tokio::time::timeout(
            Duration::from_millis(50),
            client.send(&target, &[], Bytes::new()),
        )
        .await;
        assert!(waiter.is_err(), "the second send must wait for the slot");
        assert_eq!(client.tracked_hosts(), 1);

        slow.gate.add_permits(1);
        assert_eq!(holder.await.unwrap().outcome, Outcome::Delivered);
        assert_eq!(client.tracked_hosts(), 0);
    }

    #[test]
    fn status_classes_map_to_outcomes() {
        let cases = [
            (200, Outcome::Delivered),
            (299, Outcome::Delivered),
            (301, Outcome::Rejected),
            (304, Outcome::Rejected),
            (307, Outcome::Rejected),
            (400, Outcome::Rejected),
            (404, Outcome::Rejected),
            (408, Outcome::Retry),
            (410, Outcome::Gone),
            (429, Outcome::Retry),
            (500, Outcome::Retry),
            (599, Outcome::Retry),
            (600, Outcome::Rejected),
        ];
        for (code, expected) in cases {
            let (outcome, _) = classify_status(StatusCode::from_u16(code).unwrap());
            assert_eq!(outcome, expected, "{code}");
        }
    }
}
