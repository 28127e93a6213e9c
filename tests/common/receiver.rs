//! A real webhook receiver on loopback that records what it gets and
//! responds from a script, so tests can make it fail, stall or succeed.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// Wall-clock time of arrival, for checks of `webhook-timestamp`.
    pub time: SystemTime,
    /// Status the receiver responded with, or `None` for [`Reply::Hang`].
    pub status: Option<u16>,
}

impl Received {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("postback body is JSON")
    }
}

/// What the receiver answers to one request.
#[derive(Clone, Debug)]
pub enum Reply {
    Status(u16),
    /// A status with extra headers, such as Retry-After or Location.
    WithHeaders(u16, Vec<(&'static str, String)>),
    /// Never answers.
    Hang,
    /// Responds with a status after a pause.
    After(Duration, u16),
}

#[derive(Clone, Default)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
    connections: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

/// Counts a request in flight while it lives.
struct InFlight(Shared);

impl InFlight {
    fn start(shared: &Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Receiver {
    pub url: String,
    pub port: u16,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1 that answers 200 unless scripted.
    pub async fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind receiver");
        Self::serve(listener)
    }

    /// Starts a receiver on `ip`, such as `::1`, or returns the bind error,
    /// because a host may have no IPv6 loopback.
    pub async fn start_on(ip: IpAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((ip, 0)).await?;
        Ok(Self::serve(listener))
    }

    fn serve(listener: TcpListener) -> Self {
        let address = listener.local_addr().expect("address");
        let port = address.port();
        let shared = Shared::default();
        let app = axum::Router::new()
            .fallback(record)
            .with_state(shared.clone());
        let counting = CountingListener {
            inner: listener,
            connections: shared.connections.clone(),
        };
        let task = tokio::spawn(async move {
            axum::serve(counting, app).await.expect("receiver serves");
        });
        // SocketAddr writes an IPv6 address in brackets, as URLs need.
        let authority = SocketAddr::new(address.ip(), port);
        Self {
            url: format!("http://{authority}/hooks/commands"),
            port,
            shared,
            task,
        }
    }

    /// Answers the next requests with `replies`, in order, then 200 again.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// Drops the replies not yet used, so the next requests get 200.
    pub fn clear_script(&self) {
        self.shared.script.lock().unwrap().clear();
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    /// TCP connections accepted, whether or not a request followed.
    /// Returns the maximum number of requests in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    State(shared): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::start(&shared);
    let reply = shared
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Status(200));
    let status = match &reply {
        Reply::Status(code) | Reply::WithHeaders(code, _) | Reply::After(_, code) => Some(*code),
        Reply::Hang => None,
    };
    shared.received.lock().unwrap().push(Received {
        path: uri.path().to_owned(),
        headers,
        body,
        at: Instant::now(),
        time: SystemTime::now(),
        status,
    });
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code)
            .expect("valid status")
            .into_response(),
        Reply::WithHeaders(code, headers) => {
            let mut response = StatusCode::from_u16(code)
                .expect("valid status")
                .into_response();
            for (name, value) in headers {
                response
                    .headers_mut()
                    .insert(name, value.parse().expect("header value"));
            }
            response
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Reply::After(pause, code) => {
            tokio::time::sleep(pause).await;
            StatusCode::from_u16(code)
                .expect("valid status")
                .into_response()
        }
    }
}

struct CountingListener {
    inner: TcpListener,
    connections: Arc<AtomicUsize>,
}

impl Listener for CountingListener {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok((stream, address)) = self.inner.accept().await {
                self.connections.fetch_add(1, Ordering::SeqCst);
                return (stream, address);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
