//! Postback delivery against the real binary: retries and signatures,
//! status classes, isolation from bad receivers, network rules, restarts,
//! per-transition notifications and resends.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use command_dispatcher::postback::signature::{SignedHeaders, VerifyError, WebhookSecrets, verify};
use common::receiver::{Received, Receiver, Reply};
use common::{BrokerKind, Server, TestEnv, WEBHOOK_SECRET, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const DEVICE: &str = "device";
const DEADLINE: Duration = Duration::from_secs(20);

/// How long a test waits to show that no further attempt follows. The
/// harness's first retry delay is 200 ms (up to 240 ms with jitter), and the
/// sender looks for due deliveries every 200 ms, so a retry would come well
/// within this.
const NO_RETRY_WAIT: Duration = Duration::from_millis(1000);

fn secrets() -> WebhookSecrets {
    WebhookSecrets::parse(WEBHOOK_SECRET).expect("the test secret parses")
}

fn unix_seconds(time: SystemTime) -> i64 {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since_epoch.as_secs()).expect("seconds fit in i64")
}

/// Verifies a received postback as a receiver would at `now`, with the
/// id, timestamp and signature headers it carried.
fn verify_received(received: &Received, now: i64, tolerance: Duration) -> Result<(), VerifyError> {
    let (id, timestamp, signature) = (
        received.header("webhook-id"),
        received.header("webhook-timestamp"),
        received.header("webhook-signature"),
    );
    let headers = SignedHeaders {
        id: &id,
        timestamp: &timestamp,
        signature: &signature,
    };
    verify(&secrets(), &headers, &received.body, now, tolerance)
}

/// Polls the command until its `Postback.State` is `state`, or panics at
/// the deadline with the last summary seen.
async fn wait_postback_state(server: &Server, id: &str, state: &str, deadline: Duration) -> Value {
    let path = format!("/commands/{id}");
    let end = Instant::now() + deadline;
    loop {
        let command = server.get(&path).await.json();
        if command["Postback"]["State"] == state {
            return command;
        }
        assert!(
            Instant::now() < end,
            "postback of command {id} did not reach state {state} within {deadline:?}; last summary: {}",
            command["Postback"]
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Returns the deliveries of a command from `GET …/postbacks`, oldest first.
async fn deliveries(server: &Server, id: &str) -> Vec<Value> {
    let response = server.get(&format!("/commands/{id}/postbacks")).await;
    assert_eq!(response.status, 200, "{}", response.text);
    response.json()["value"]
        .as_array()
        .expect("value is an array")
        .clone()
}

fn attempt_field(delivery: &Value, field: &str) -> Vec<Value> {
    delivery["AttemptLog"]
        .as_array()
        .expect("AttemptLog is an array")
        .iter()
        .map(|attempt| attempt[field].clone())
        .collect()
}

/// Requests the receiver got for command `id`, in arrival order.
fn received_for(receiver: &Receiver, id: &str) -> Vec<Received> {
    receiver
        .received()
        .into_iter()
        .filter(|received| received.json()["id"] == id)
        .collect()
}

/// Starts `serve` with an agent for [`DEVICE`], creates one echo command
/// that posts back to `receiver`, and waits until the receiver has got
/// `count` requests.
async fn send_one_postback(env: &TestEnv, receiver: &Receiver, count: usize) -> (Server, String) {
    let server = env.serve(&[DEVICE]).await;
    let id = server
        .create_echo(DEVICE, &json!({ "n": 1 }), Some(&receiver.url))
        .await;
    let arrived = wait_until(DEADLINE, || async { receiver.count() >= count }).await;
    assert!(
        arrived,
        "receiver got {} requests within {DEADLINE:?}, expected {count}",
        receiver.count()
    );
    (server, id)
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_keep_id_body_and_valid_signature() {
    // The last attempt comes at least 2 × 1.2 s after the first, so by then
    // the first attempt's timestamp is outside a 1 s tolerance.
    const TOLERANCE: Duration = Duration::from_secs(1);
    let receiver = Receiver::start().await;
    receiver.script([Reply::Status(500), Reply::Status(500)]);
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.set_serve_flag("--postback-retry-delays", "1500ms,1500ms,1500ms");

    let (server, id) = send_one_postback(&env, &receiver, 3).await;
    wait_postback_state(&server, &id, "delivered", DEADLINE).await;

    let attempts = receiver.received();
    assert_eq!(attempts.len(), 3, "attempts received");
    let (first, last) = (&attempts[0], &attempts[2]);
    for (index, attempt) in attempts.iter().enumerate() {
        let number = index + 1;
        assert_eq!(
            attempt.header("webhook-id"),
            first.header("webhook-id"),
            "webhook-id of attempt {number}"
        );
        assert_eq!(attempt.body, first.body, "body bytes of attempt {number}");
        let result = verify_received(attempt, unix_seconds(attempt.time), TOLERANCE);
        assert_eq!(result, Ok(()), "signature of attempt {number}");
    }
    assert_eq!(first.json()["id"], id.as_str());

    let first_timestamp: i64 = first.header("webhook-timestamp").parse().unwrap();
    let last_timestamp: i64 = last.header("webhook-timestamp").parse().unwrap();
    assert!(
        last_timestamp > first_timestamp,
        "attempt 3 must carry a new timestamp: first {first_timestamp}, last {last_timestamp}"
    );
    // The first attempt's headers, checked when the last attempt arrived,
    // are stale, so the last attempt verifies only because it was signed
    // again with a fresh timestamp.
    let stale = verify_received(first, unix_seconds(last.time), TOLERANCE);
    assert!(
        matches!(stale, Err(VerifyError::TimestampOutOfTolerance { .. })),
        "the first attempt's timestamp checked at the last arrival: {stale:?}"
    );

    let deliveries = deliveries(&server, &id).await;
    assert_eq!(deliveries.len(), 1, "deliveries: {deliveries:?}");
    let delivery = &deliveries[0];
    assert_eq!(delivery["id"], first.header("webhook-id").as_str());
    assert_eq!(delivery["State"], "delivered");
    assert_eq!(delivery["Attempts"], 3);
    assert_eq!(
        attempt_field(delivery, "Outcome"),
        [json!("retry"), json!("retry"), json!("delivered")]
    );
    assert_eq!(
        attempt_field(delivery, "StatusCode"),
        [json!(500), json!(500), json!(200)]
    );
    assert_eq!(
        attempt_field(delivery, "Attempt"),
        [json!(1), json!(2), json!(3)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn last_retry_is_logged_as_failed() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::Status(503), Reply::Status(503)]);
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.set_serve_flag("--postback-retry-delays", "200ms");

    let (server, id) = send_one_postback(&env, &receiver, 2).await;
    wait_postback_state(&server, &id, "failed", DEADLINE).await;
    // Sleeping only shows that no retry follows.
    tokio::time::sleep(NO_RETRY_WAIT).await;

    assert_eq!(receiver.count(), 2, "requests received");
    let deliveries = deliveries(&server, &id).await;
    assert_eq!(deliveries.len(), 1, "deliveries: {deliveries:?}");
    let delivery = &deliveries[0];
    assert_eq!(delivery["State"], "failed");
    assert_eq!(
        attempt_field(delivery, "Outcome"),
        [json!("retry"), json!("failed")]
    );
    assert_eq!(
        attempt_field(delivery, "StatusCode"),
        [json!(503), json!(503)]
    );
}

/// Sends one postback to a receiver that responds with `reply` first, and
/// checks that the delivery fails after that one attempt.
async fn assert_final_after_one_attempt(reply: Reply, expected_error: &str) {
    let receiver = Receiver::start().await;
    receiver.script([reply]);
    let env = TestEnv::new(BrokerKind::Memory).await;

    let (server, id) = send_one_postback(&env, &receiver, 1).await;
    let command = wait_postback_state(&server, &id, "failed", DEADLINE).await;
    // Sleeping only shows that no retry follows.
    tokio::time::sleep(NO_RETRY_WAIT).await;

    assert_eq!(
        receiver.count(),
        1,
        "requests received; a final status must not be retried"
    );
    let summary = &command["Postback"];
    assert_eq!(summary["Attempts"], 1, "{summary}");
    let last_error = summary["LastError"].as_str().unwrap_or_default();
    assert!(last_error.contains(expected_error), "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gone_stops_after_one_attempt() {
    assert_final_after_one_attempt(Reply::Status(410), "410 Gone").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_request_is_not_retried() {
    assert_final_after_one_attempt(Reply::Status(400), "400 Bad Request").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_is_not_followed() {
    let target = Receiver::start().await;
    let redirect = Reply::WithHeaders(302, vec![("location", target.url.clone())]);

    assert_final_after_one_attempt(redirect, "redirects are not followed").await;

    assert_eq!(
        target.connections(),
        0,
        "connections to the redirect target"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_delays_next_attempt() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::WithHeaders(
        429,
        vec![("retry-after", "1".to_owned())],
    )]);
    let env = TestEnv::new(BrokerKind::Memory).await;

    let (server, id) = send_one_postback(&env, &receiver, 2).await;
    wait_postback_state(&server, &id, "delivered", DEADLINE).await;

    let attempts = receiver.received();
    assert_eq!(attempts.len(), 2, "attempts received");
    let gap = attempts[1].at - attempts[0].at;
    println!("gap between the 429 and the next attempt: {gap:?}");
    // The sender counts the 1 s from the start of the first attempt, which
    // is a little before the receiver saw it, so allow 100 ms for that. The
    // schedule alone would wait at most 240 ms.
    assert!(
        gap >= Duration::from_millis(900),
        "the attempt after Retry-After: 1 came {gap:?} after the 429"
    );
}

/// A raw HTTP server that responds 200 with a content-length of 1 GiB and
/// then sends one body byte every 100 ms, so reading the body to its end
/// would take about three years.
struct TricklingReceiver {
    url: String,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TricklingReceiver {
    async fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the trickling receiver");
        let port = listener.local_addr().expect("address").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(trickle(stream, counter.clone()));
                }
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}/hooks/commands"),
            requests,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for TricklingReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head, then trickles the response until the client
/// closes the connection.
async fn trickle(mut stream: TcpStream, requests: Arc<AtomicUsize>) {
    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1073741824\r\n\r\n";
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    if stream.write_all(HEAD).await.is_err() {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.write_all(b"x").await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_receivers_do_not_delay_others() {
    // The two backlogs add up to 300 due deliveries. The sender reads at
    // most 256 rows per query (4 × its 64 attempts in flight), so a sender
    // that skipped busy receivers only after reading their rows would never
    // see the good ones.
    const BAD_COMMANDS: usize = 150;
    const GOOD_COMMANDS: usize = 50;
    // Each attempt to a bad receiver keeps its slot for the whole attempt
    // timeout, so waiting for one of them would take longer than this.
    const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
    const GOOD_WITHIN: Duration = Duration::from_secs(5);
    let hanging = Receiver::start().await;
    hanging.script(std::iter::repeat_n(Reply::Hang, 1000));
    let trickling = TricklingReceiver::start().await;
    let good = Receiver::start().await;
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.set_serve_flag("--postback-timeout", "10s");
    let server = env
        .serve(&["hanging-device", "trickling-device", "good-device"])
        .await;

    for index in 0..BAD_COMMANDS {
        let payload = json!({ "index": index });
        server
            .create_echo("hanging-device", &payload, Some(&hanging.url))
            .await;
        server
            .create_echo("trickling-device", &payload, Some(&trickling.url))
            .await;
    }
    // Both bad receivers have the sender's per-host maximum of 4 attempts
    // in flight before the good postbacks start.
    let bad_busy = wait_until(DEADLINE, || async {
        hanging.count() >= 4 && trickling.requests() >= 4
    })
    .await;
    assert!(
        bad_busy,
        "bad receivers busy within {DEADLINE:?}: hanging got {}, trickling got {}",
        hanging.count(),
        trickling.requests()
    );

    let started = Instant::now();
    let mut good_ids = BTreeSet::new();
    for index in 0..GOOD_COMMANDS {
        let id = server
            .create_echo("good-device", &json!({ "index": index }), Some(&good.url))
            .await;
        good_ids.insert(id);
    }
    let created = started.elapsed();
    let all_arrived = wait_until(DEADLINE, || async { good.count() >= GOOD_COMMANDS }).await;
    let elapsed = started.elapsed();
    println!(
        "{GOOD_COMMANDS} good postbacks: created in {created:?}, all arrived {elapsed:?} after the first create; \
         meanwhile the hanging receiver got {} requests and the trickling one {}",
        hanging.count(),
        trickling.requests()
    );

    assert!(
        all_arrived,
        "good receiver got {} of {GOOD_COMMANDS} postbacks within {DEADLINE:?}",
        good.count()
    );
    assert!(
        elapsed < GOOD_WITHIN,
        "{GOOD_COMMANDS} good postbacks took {elapsed:?}, more than {GOOD_WITHIN:?}; \
         one attempt to a bad receiver takes {ATTEMPT_TIMEOUT:?}"
    );
    let posted: BTreeSet<String> = good
        .received()
        .iter()
        .map(|received| {
            received.json()["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(posted, good_ids, "command ids posted to the good receiver");
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_receiver_gets_its_backlog_within_its_slots() {
    // More postbacks than the receiver has slots arrive together: those
    // without a slot wait in the sender and start as slots free, well
    // before their lease would end (the attempt timeout plus 5 s).
    const COMMANDS: usize = 40;
    const PAUSE: Duration = Duration::from_millis(50);
    const SLOTS: usize = 2;
    let receiver = Receiver::start().await;
    receiver.script(std::iter::repeat_n(Reply::After(PAUSE, 200), COMMANDS));
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.set_serve_flag("--postback-max-per-receiver", &SLOTS.to_string());
    let devices: Vec<String> = (0..COMMANDS).map(|n| format!("busy-{n}")).collect();
    let device_names: Vec<&str> = devices.iter().map(String::as_str).collect();
    let server = env.serve(&device_names).await;

    let started = Instant::now();
    for device in &devices {
        server
            .create_echo(device, &json!({ "device": device }), Some(&receiver.url))
            .await;
    }
    let all_arrived = wait_until(DEADLINE, || async { receiver.count() >= COMMANDS }).await;
    let elapsed = started.elapsed();
    assert!(
        all_arrived,
        "receiver got {} of {COMMANDS} postbacks within {DEADLINE:?}",
        receiver.count()
    );
    assert_eq!(
        receiver.max_in_flight(),
        SLOTS,
        "most postbacks in flight at once"
    );
    // 40 responses of 50 ms over 2 slots take 1 s; a delivery left to its
    // lease's end would arrive after 15 s.
    assert!(
        elapsed < Duration::from_secs(8),
        "all postbacks took {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn backlog_drains_at_receiver_pace() {
    // One slot and 100 ms responses make the last of 80 postbacks wait about
    // 8 s, longer than a lease (the 1 s attempt timeout plus 5 s), so most
    // deliveries go back to the store and come out of it again. The backlog
    // must still drain at the receiver's pace, one attempt at a time.
    const COMMANDS: usize = 80;
    const PAUSE: Duration = Duration::from_millis(100);
    let receiver = Receiver::start().await;
    receiver.script(std::iter::repeat_n(Reply::After(PAUSE, 200), COMMANDS));
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.set_serve_flag("--postback-max-per-receiver", "1");
    env.set_serve_flag("--postback-timeout", "1s");
    let devices: Vec<String> = (0..COMMANDS).map(|n| format!("backlog-{n}")).collect();
    let device_names: Vec<&str> = devices.iter().map(String::as_str).collect();
    let server = env.serve(&device_names).await;

    let started = Instant::now();
    for device in &devices {
        server
            .create_echo(device, &json!({ "device": device }), Some(&receiver.url))
            .await;
    }
    let all_arrived = wait_until(DEADLINE, || async { receiver.count() >= COMMANDS }).await;
    let elapsed = started.elapsed();
    assert!(
        all_arrived,
        "receiver got {} of {COMMANDS} postbacks within {DEADLINE:?}",
        receiver.count()
    );
    assert_eq!(
        receiver.max_in_flight(),
        1,
        "most postbacks in flight at once"
    );
    // 80 responses of 100 ms take 8 s; idle gaps of a poll interval or a lease
    // would add seconds.
    assert!(
        elapsed < Duration::from_secs(12),
        "all postbacks took {elapsed:?}"
    );
    let ids: BTreeSet<String> = receiver
        .received()
        .iter()
        .map(|received| {
            received.json()["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), COMMANDS, "each command posted once");
}

/// Names that /etc/hosts maps only to loopback addresses, other than the
/// `localhost` names, which the create request already rejects. Looking
/// them up reads the hosts file and sends no DNS query where the hosts file
/// comes first, as it does by default.
fn loopback_names_in_hosts_file() -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/etc/hosts") else {
        return Vec::new();
    };
    let mut loopback = BTreeSet::new();
    let mut other = BTreeSet::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(Ok(address)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let names = if address.is_loopback() {
            &mut loopback
        } else {
            &mut other
        };
        names.extend(fields.map(str::to_ascii_lowercase));
    }
    loopback
        .difference(&other)
        .filter(|name| *name != "localhost" && !name.ends_with(".localhost"))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn loopback_spellings_are_rejected() {
    let receiver_v4 = Receiver::start().await;
    let receiver_v6 = match Receiver::start_on(IpAddr::V6(Ipv6Addr::LOCALHOST)).await {
        Ok(receiver) => Some(receiver),
        Err(error) => {
            println!("skipping the [::1] cases: cannot bind [::1]: {error}");
            None
        }
    };
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.set_serve_flag("--postback-allowed-networks", "");
    let server = env.serve(&[DEVICE]).await;

    let port = receiver_v4.port;
    let mut rejected_urls: Vec<String> = [
        "127.0.0.1",
        "127.1",
        "0177.0.0.1",
        "2130706433",
        "0x7f000001",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "localhost",
        "LOCALHOST",
        "localhost.",
        "hooks.localhost",
    ]
    .iter()
    .map(|host| format!("http://{host}:{port}/hooks/commands"))
    .collect();
    if let Some(receiver) = &receiver_v6 {
        let port = receiver.port;
        rejected_urls.push(format!("http://[::1]:{port}/hooks/commands"));
        rejected_urls.push(format!("http://[0:0:0:0:0:0:0:1]:{port}/hooks/commands"));
    }

    for url in &rejected_urls {
        let body = json!({ "Type": "AppService", "AppServiceName": "echo", "PostBackUri": url });
        let response = server
            .post(&format!("/devices/{DEVICE}/commands"), &body.to_string())
            .await;
        assert_eq!(response.status, 400, "create with {url}: {}", response.text);
        let error = response.json()["error"].clone();
        assert_eq!(error["code"], "badRequest", "create with {url}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("PostBackUri") && message.contains("loopback"),
            "create with {url}: {message}"
        );
    }

    // A name that the create request cannot judge is accepted, and then
    // refused when the sender resolves it.
    let names = loopback_names_in_hosts_file();
    if names.is_empty() {
        println!(
            "no loopback name other than localhost in /etc/hosts; skipping the resolved-name case"
        );
    }
    for name in &names {
        let url = format!("http://{name}:{port}/hooks/commands");
        let id = server
            .create_echo(DEVICE, &json!({ "name": name }), Some(&url))
            .await;
        let command = wait_postback_state(&server, &id, "failed", DEADLINE).await;
        let summary = &command["Postback"];
        assert_eq!(summary["Attempts"], 1, "{url}: {summary}");
        let last_error = summary["LastError"].as_str().unwrap_or_default();
        assert!(last_error.contains("loopback"), "{url}: {summary}");
        let delivery = &deliveries(&server, &id).await[0];
        assert_eq!(
            attempt_field(delivery, "Outcome"),
            [json!("refused")],
            "{url}"
        );
    }
    println!(
        "rejected at create: {} URLs; refused at send: {names:?}",
        rejected_urls.len()
    );

    assert_eq!(receiver_v4.connections(), 0, "connections to 127.0.0.1");
    if let Some(receiver) = &receiver_v6 {
        assert_eq!(receiver.connections(), 0, "connections to [::1]");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_postbacks_survive_a_crash() {
    const COMMANDS: usize = 5;
    // An attempt that was in flight when the process died stays leased for
    // the 2 s attempt timeout plus 5 s, then is sent again.
    const AFTER_RESTART: Duration = Duration::from_secs(30);
    let receiver = Receiver::start().await;
    receiver.script(std::iter::repeat_n(Reply::Status(503), 1000));
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.set_serve_flag("--postback-retry-delays", "1s,1s,1s,1s,1s,1s,1s,1s,1s,1s");
    let mut server = env.serve(&[DEVICE]).await;

    let mut ids = Vec::new();
    for index in 0..COMMANDS {
        let id = server
            .create_echo(DEVICE, &json!({ "index": index }), Some(&receiver.url))
            .await;
        ids.push(id);
    }
    for id in &ids {
        let attempted = wait_until(DEADLINE, || async {
            let command = server.get(&format!("/commands/{id}")).await.json();
            command["Postback"]["Attempts"].as_i64().unwrap_or(0) >= 1
        })
        .await;
        assert!(
            attempted,
            "command {id} had no postback attempt within {DEADLINE:?}"
        );
    }

    server.process.kill().await;
    let before_restart = receiver.count();
    receiver.clear_script();
    let server = env.serve(&[DEVICE]).await;
    for id in &ids {
        wait_postback_state(&server, id, "delivered", AFTER_RESTART).await;
    }

    let received = receiver.received();
    println!(
        "{} requests before the restart, {} after",
        before_restart,
        received.len() - before_restart
    );
    for id in &ids {
        let requests = received_for(&receiver, id);
        let webhook_ids: BTreeSet<String> = requests
            .iter()
            .map(|received| received.header("webhook-id"))
            .collect();
        assert_eq!(
            webhook_ids.len(),
            1,
            "command {id}: webhook-ids across the restart: {webhook_ids:?}"
        );
        let answered_ok = requests
            .iter()
            .filter(|received| received.status == Some(200))
            .count();
        assert_eq!(
            answered_ok,
            1,
            "command {id}: requests answered 200, of {} requests",
            requests.len()
        );
    }
    let delivered = received
        .iter()
        .filter(|received| received.status == Some(200))
        .count();
    assert_eq!(delivered, COMMANDS, "requests answered 200");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_transition_posts_in_sequence() {
    const COMMANDS: usize = 3;
    let receiver = Receiver::start().await;
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.extra_serve_args
        .push("--postback-every-transition".to_owned());
    let server = env.serve(&[DEVICE]).await;

    let mut ids = Vec::new();
    for index in 0..COMMANDS {
        let id = server
            .create_echo(DEVICE, &json!({ "index": index }), Some(&receiver.url))
            .await;
        ids.push(id);
    }

    for id in &ids {
        let done = server.wait_final(id, DEADLINE).await;
        assert_eq!(done["Status"], "completed", "{done}");
        let history = server.get(&format!("/commands/{id}/history")).await.json();
        // The create stores `queued` directly; only later status changes
        // are posted back.
        let changes: Vec<Value> = history["value"]
            .as_array()
            .expect("history is an array")
            .iter()
            .skip(1)
            .map(|transition| transition["Status"].clone())
            .collect();
        let arrived = wait_until(DEADLINE, || async {
            received_for(&receiver, id).len() >= changes.len()
        })
        .await;
        assert!(
            arrived,
            "command {id}: {} postbacks within {DEADLINE:?} for {} status changes",
            received_for(&receiver, id).len(),
            changes.len()
        );
        // Sleeping only shows that no extra postback follows.
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut postbacks = received_for(&receiver, id);
        assert_eq!(
            postbacks.len(),
            changes.len(),
            "command {id}: postbacks for the status changes {changes:?}"
        );
        let arrival_order: Vec<i64> = postbacks.iter().map(sequence_of).collect();
        println!("command {id}: webhook-sequence in arrival order {arrival_order:?}");
        // Deliveries run concurrently, so arrival order is not promised; the
        // sequence is what orders them.
        postbacks.sort_by_key(sequence_of);
        let sequences: Vec<i64> = postbacks.iter().map(sequence_of).collect();
        assert!(
            sequences.windows(2).all(|pair| pair[0] < pair[1]),
            "command {id}: webhook-sequence values {sequences:?} are not distinct"
        );
        let statuses: Vec<Value> = postbacks
            .iter()
            .map(|postback| postback.json()["Status"].clone())
            .collect();
        assert_eq!(
            statuses, changes,
            "command {id}: statuses in webhook-sequence order"
        );
        let webhook_ids: BTreeSet<String> = postbacks
            .iter()
            .map(|postback| postback.header("webhook-id"))
            .collect();
        assert_eq!(
            webhook_ids.len(),
            postbacks.len(),
            "command {id}: distinct webhook-ids"
        );
    }
}

fn sequence_of(received: &Received) -> i64 {
    let header = received.header("webhook-sequence");
    header
        .parse()
        .unwrap_or_else(|_| panic!("webhook-sequence {header:?} is not an integer"))
}

#[tokio::test(flavor = "multi_thread")]
async fn resend_creates_new_delivery() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new(BrokerKind::Memory).await;
    let (server, id) = send_one_postback(&env, &receiver, 1).await;
    wait_postback_state(&server, &id, "delivered", DEADLINE).await;

    let response = server
        .post(&format!("/commands/{id}/postbacks/resend"), "")
        .await;
    assert_eq!(response.status, 202, "{}", response.text);
    let resent_id = response.json()["id"]
        .as_str()
        .expect("resend returns the delivery id")
        .to_owned();
    let arrived = wait_until(DEADLINE, || async { receiver.count() >= 2 }).await;
    assert!(
        arrived,
        "receiver got {} requests within {DEADLINE:?}, expected 2",
        receiver.count()
    );
    wait_postback_state(&server, &id, "delivered", DEADLINE).await;

    let received = receiver.received();
    let (original, resent) = (&received[0], &received[1]);
    assert_ne!(
        resent.header("webhook-id"),
        original.header("webhook-id"),
        "a resend is a new notification"
    );
    assert_eq!(resent.header("webhook-id"), resent_id);
    assert_eq!(resent.json()["id"], id.as_str());
    assert_eq!(resent.json()["Status"], "completed");
    let result = verify_received(resent, unix_seconds(resent.time), Duration::from_secs(300));
    assert_eq!(result, Ok(()), "signature of the resend");
    let deliveries = deliveries(&server, &id).await;
    let states: Vec<&Value> = deliveries
        .iter()
        .map(|delivery| &delivery["State"])
        .collect();
    assert_eq!(states, [&json!("delivered"), &json!("delivered")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn resend_conflicts_when_not_possible() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[DEVICE]).await;
    // No agent runs commands of this device, so they stay queued.
    let queued = server
        .create_echo("idle-device", &json!({}), Some(&receiver.url))
        .await;
    let without_postback = server.create_echo(DEVICE, &json!({}), None).await;
    server.wait_final(&without_postback, DEADLINE).await;

    let cases: BTreeMap<&str, (&str, &str)> = BTreeMap::from([
        ("queued command", (queued.as_str(), "is queued")),
        (
            "command without PostBackUri",
            (without_postback.as_str(), "has no PostBackUri"),
        ),
    ]);
    for (case, (id, expected)) in cases {
        let response = server
            .post(&format!("/commands/{id}/postbacks/resend"), "")
            .await;
        assert_eq!(response.status, 409, "{case}: {}", response.text);
        let error = response.json()["error"].clone();
        assert_eq!(error["code"], "conflict", "{case}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{case}: {message}");
    }
    assert_eq!(receiver.connections(), 0, "connections to the receiver");
}
