//! Test harness: starts the real `dispatcher` binary on port 0 with a fresh
//! data directory and a unique AMQP prefix, a real webhook receiver, and a
//! client that speaks to the HTTP API.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod receiver;
pub mod recording;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use command_dispatcher::api::auth::JwtKeys;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Which broker a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// The in-process broker; agents run inside `serve`.
    Memory,
    /// The RabbitMQ server started by scripts/with-test-servers.
    Rabbit,
}

/// The RabbitMQ URL of the test server. Tests that need RabbitMQ fail
/// rather than skip without it, so a green run always means it was tested.
pub fn amqp_url() -> String {
    std::env::var("DISPATCHER_TEST_AMQP_URL").expect(
        "DISPATCHER_TEST_AMQP_URL is not set; run the tests through scripts/with-test-servers (see README.md)",
    )
}

/// Node name for `rabbitmqctl -n`, for fault tests.
pub fn rabbit_node() -> String {
    std::env::var("DISPATCHER_TEST_RABBITMQ_NODE").expect(
        "DISPATCHER_TEST_RABBITMQ_NODE is not set; run the tests through scripts/with-test-servers (see README.md)",
    )
}

/// Runs `rabbitmqctl` against the test node and returns its stdout.
pub fn rabbitmqctl(args: &[&str]) -> String {
    rabbitmqctl_on(&rabbit_node(), args)
}

/// Runs `rabbitmqctl -n node` and returns its stdout, or panics with its
/// stderr when it fails.
pub fn rabbitmqctl_on(node: &str, args: &[&str]) -> String {
    let epmd_port = std::env::var("DISPATCHER_TEST_EPMD_PORT").expect(
        "DISPATCHER_TEST_EPMD_PORT is not set; run the tests through scripts/with-test-servers (see README.md)",
    );
    let output = std::process::Command::new("rabbitmqctl")
        .env("ERL_EPMD_PORT", epmd_port)
        .arg("-n")
        .arg(node)
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl -n {node} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The AMQP URLs of the three-node test cluster, comma-separated, in the
/// form `--amqp-url` takes.
pub fn cluster_amqp_urls() -> String {
    std::env::var("DISPATCHER_TEST_CLUSTER_AMQP_URLS").expect(
        "DISPATCHER_TEST_CLUSTER_AMQP_URLS is not set; run the tests through scripts/with-test-servers (see README.md)",
    )
}

/// Node names of the test cluster for `rabbitmqctl -n`, in the order of
/// [`cluster_amqp_urls`].
pub fn cluster_nodes() -> Vec<String> {
    std::env::var("DISPATCHER_TEST_CLUSTER_NODES")
        .expect(
            "DISPATCHER_TEST_CLUSTER_NODES is not set; run the tests through scripts/with-test-servers (see README.md)",
        )
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// One test's world: a data directory, a prefix, a broker, a database.
pub struct TestEnv {
    pub dir: TempDir,
    pub prefix: String,
    pub broker: BrokerKind,
    pub database_url: String,
    /// Flags that `serve` gets after the harness's own. Only for flags that
    /// `serve_flags` does not contain, because clap rejects a single-value
    /// flag given twice.
    pub extra_serve_args: Vec<String>,
    /// `--queue-type` for serve and agents; unset means the default.
    pub queue_type: Option<&'static str>,
    /// `--amqp-url` for serve and agents on RabbitMQ; unset means the
    /// single test node.
    pub amqp_url: Option<String>,
    /// Single-value flags and their values, passed to every `serve`. Change
    /// one with [`TestEnv::set_serve_flag`].
    serve_flags: Vec<(String, String)>,
}

impl TestEnv {
    /// A fresh world on `broker`, with the store DISPATCHER_TEST_STORE names
    /// (SQLite unless it says postgres).
    pub async fn new(broker: BrokerKind) -> Self {
        let postgres = std::env::var("DISPATCHER_TEST_STORE").as_deref() == Ok("postgres");
        Self::with_store(broker, postgres).await
    }

    /// A fresh world on `broker` and, when `postgres`, a new PostgreSQL
    /// database; otherwise a SQLite file.
    pub async fn with_store(broker: BrokerKind, postgres: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dispatcher-test")
            .tempdir()
            .expect("temp dir");
        let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
        let database_url = database_url(dir.path(), &prefix, postgres).await;
        Self {
            dir,
            prefix,
            broker,
            database_url,
            extra_serve_args: Vec::new(),
            queue_type: None,
            amqp_url: None,
            serve_flags: default_serve_flags(),
        }
    }

    /// Sets the value of a single-value `serve` flag, replacing the harness
    /// default if there is one, for every later [`TestEnv::serve`].
    pub fn set_serve_flag(&mut self, flag: &str, value: &str) {
        match self.serve_flags.iter_mut().find(|(name, _)| name == flag) {
            Some(entry) => entry.1 = value.to_owned(),
            None => self.serve_flags.push((flag.to_owned(), value.to_owned())),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `dispatcher serve`, with in-process agents for `agents`
    /// (on RabbitMQ too, where they connect over AMQP like external ones).
    pub async fn serve(&self, agents: &[&str]) -> Server {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--database-url".into(),
            self.database_url.clone(),
        ];
        for (flag, value) in &self.serve_flags {
            args.push(flag.clone());
            args.push(value.clone());
        }
        for agent in agents {
            args.push("--agent".into());
            args.push((*agent).into());
        }
        args.extend(self.extra_serve_args.iter().cloned());
        Server::start(self, args).await
    }

    /// Starts `dispatcher agent` for `device` over RabbitMQ.
    pub async fn agent(&self, device: &str, handlers: Option<&Path>) -> Process {
        assert_eq!(
            self.broker,
            BrokerKind::Rabbit,
            "external agents need RabbitMQ"
        );
        let mut args: Vec<String> = vec!["agent".into(), "--device".into(), device.into()];
        if let Some(handlers) = handlers {
            args.push("--handlers".into());
            args.push(handlers.display().to_string());
        }
        Process::spawn(self, &args, &format!("agent-{device}")).await
    }

    pub fn amqp_args(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            (
                "DISPATCHER_DATA_DIR".to_owned(),
                self.data_dir().display().to_string(),
            ),
            ("DISPATCHER_JWT_SECRET".to_owned(), JWT_SECRET.to_owned()),
            ("DISPATCHER_AMQP_PREFIX".to_owned(), self.prefix.clone()),
            (
                "DISPATCHER_LOG".to_owned(),
                "info,command_dispatcher=debug".to_owned(),
            ),
        ];
        if self.broker == BrokerKind::Rabbit {
            let url = self.amqp_url.clone().unwrap_or_else(amqp_url);
            vars.push(("DISPATCHER_AMQP_URL".to_owned(), url));
        }
        if let Some(queue_type) = self.queue_type {
            vars.push(("DISPATCHER_QUEUE_TYPE".to_owned(), queue_type.to_owned()));
        }
        vars
    }
}

/// Returns the postback flags every test starts with: loopback receivers
/// allowed, the shared test secret, and retries and timeouts short enough
/// for tests.
fn default_serve_flags() -> Vec<(String, String)> {
    [
        ("--postback-allowed-networks", "127.0.0.0/8,::1/128"),
        ("--webhook-secrets", WEBHOOK_SECRET),
        ("--postback-retry-delays", "200ms,400ms,800ms"),
        ("--postback-timeout", "2s"),
    ]
    .into_iter()
    .map(|(flag, value)| (flag.to_owned(), value.to_owned()))
    .collect()
}

/// A fresh database for one test: a SQLite file, or a new PostgreSQL
/// database named after the test's prefix.
async fn database_url(dir: &Path, prefix: &str, postgres: bool) -> String {
    if !postgres {
        return format!(
            "sqlite://{}?mode=rwc",
            dir.join("dispatcher.sqlite").display()
        );
    }
    let admin_url = std::env::var("DISPATCHER_TEST_POSTGRES_URL").expect(
        "DISPATCHER_TEST_POSTGRES_URL is not set; run the tests through scripts/with-test-servers",
    );
    sqlx::any::install_default_drivers();
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .expect("connect to the test PostgreSQL server");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {prefix}")))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let base = admin_url.rsplit_once('/').expect("URL has a database").0;
    format!("{base}/{prefix}")
}

/// A running child process whose stderr goes to a log file in the test's
/// data directory.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    async fn spawn(env: &TestEnv, args: &[String], name: &str) -> Self {
        let log = env
            .data_dir()
            .join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_dispatcher"));
        command
            .args(args)
            .envs(env.amqp_args())
            .env_remove("DISPATCHER_AMQP_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        for (key, value) in env.amqp_args() {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn dispatcher");
        Self { child, log }
    }

    /// Kills the process at once, as a crash would.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL");
    }

    /// Sends SIGTERM and waits for the exit; a process that already exited
    /// is only waited for.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let Some(pid) = self.child.id() else {
            return self.child.wait().await.expect("wait");
        };
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("kill -TERM");
        tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .expect("process exits within 40 s of SIGTERM")
            .expect("wait")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A running `dispatcher serve` and a client for its API.
pub struct Server {
    pub process: Process,
    pub client: Client,
}

impl std::ops::Deref for Server {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// A client for one server's API, with alice's token; cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
}

impl Server {
    async fn start(env: &TestEnv, args: Vec<String>) -> Self {
        let mut process = Process::spawn(env, &args, "serve").await;
        let stdout = process.child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "serve printed no address within 30 s; log: {}",
                    process.log_text()
                )
            })
            .expect("read stdout")
            .unwrap_or_else(|| {
                panic!("serve exited before listening; log: {}", process.log_text())
            });
        let base = first
            .strip_prefix("dispatcher listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        Self {
            process,
            client: Client {
                base,
                http: reqwest::Client::builder()
                    .no_proxy()
                    .build()
                    .expect("client"),
                token: token_for("alice"),
            },
        }
    }
}

impl Client {
    /// POSTs JSON text to `path` with the default token.
    pub async fn post(&self, path: &str, body: &str) -> Response {
        self.post_as(path, body, &self.token).await
    }

    pub async fn post_as(&self, path: &str, body: &str, token: &str) -> Response {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("POST reaches the server");
        Response::read(response).await
    }

    pub async fn get(&self, path: &str) -> Response {
        self.get_as(path, &self.token).await
    }

    pub async fn get_as(&self, path: &str, token: &str) -> Response {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET reaches the server");
        Response::read(response).await
    }

    /// The absolute URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request built by the test, which sets its own headers.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Response {
        Response::read(request.send().await.expect("request reaches the server")).await
    }

    /// Creates an `echo` command for `device` and returns its id.
    pub async fn create_echo(
        &self,
        device: &str,
        payload: &Value,
        postback: Option<&str>,
    ) -> String {
        let mut body = serde_json::json!({ "Type": "AppService", "AppServiceName": "echo", "Payload": payload });
        if let Some(url) = postback {
            body["PostBackUri"] = Value::String(url.to_owned());
        }
        let response = self
            .post(&format!("/devices/{device}/commands"), &body.to_string())
            .await;
        assert_eq!(response.status, 201, "create failed: {}", response.text);
        response.json()["id"].as_str().expect("id").to_owned()
    }

    /// Polls the command until its status is final, or panics at the deadline.
    pub async fn wait_final(&self, id: &str, deadline: Duration) -> Value {
        let path = format!("/commands/{id}");
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let last = self.get(&path).await.json();
            if is_final(last["Status"].as_str().unwrap_or_default()) {
                return last;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "command {id} not final within {deadline:?}; last seen: {last}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

pub fn is_final(status: &str) -> bool {
    matches!(
        status,
        "completed" | "executionFailed" | "failedToSend" | "expired" | "canceled"
    )
}

pub fn token_for(subject: &str) -> String {
    JwtKeys::new(JWT_SECRET.as_bytes())
        .issue(subject, Duration::from_secs(3600))
        .expect("token")
}

pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Response {
    async fn read(response: reqwest::Response) -> Self {
        Self {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.expect("body"),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    }
}

/// Calls `check` every 25 ms until it returns true or `deadline` passes.
pub async fn wait_until<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
