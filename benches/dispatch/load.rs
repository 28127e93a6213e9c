//! Load generators: closed loops of concurrent HTTP clients and an open loop
//! at a fixed rate, all creating `echo` commands.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::receiver::Receiver;

/// How long a client of the end-to-end closed loop waits for the postback
/// of its command before it counts the command as lost and goes on.
const POSTBACK_WAIT: Duration = Duration::from_secs(30);

/// A client of the create route with a fixed request body.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    authorization: HeaderValue,
    body: Bytes,
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

impl Api {
    pub fn new(
        http: reqwest::Client,
        base: &str,
        token: &str,
        payload_bytes: usize,
        postback_url: &str,
    ) -> anyhow::Result<Self> {
        let body = serde_json::json!({
            "Type": "AppService",
            "AppServiceName": "echo",
            "Payload": serde_json::from_str::<serde_json::Value>(&payload_json(payload_bytes)?)?,
            "PostBackUri": postback_url,
        });
        Ok(Self {
            http,
            base: base.to_owned(),
            authorization: HeaderValue::from_str(&format!("Bearer {token}"))?,
            body: Bytes::from(body.to_string()),
        })
    }

    /// Creates one command for `device` and returns its id.
    pub async fn create(&self, device: &str) -> Result<String, String> {
        let response = self
            .http
            .post(format!("{}/devices/{device}/commands", self.base))
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(self.body.clone())
            .send()
            .await
            .map_err(|error| format!("create request failed: {error}"))?;
        let status = response.status();
        let text = response
            .bytes()
            .await
            .map_err(|error| format!("create response unreadable: {error}"))?;
        if status != reqwest::StatusCode::CREATED {
            return Err(format!(
                "create answered {status}: {}",
                String::from_utf8_lossy(&text)
            ));
        }
        serde_json::from_slice::<Created>(&text)
            .map(|created| created.id)
            .map_err(|error| format!("create response has no id: {error}"))
    }
}

/// Builds a JSON object of exactly `bytes` bytes: `{"data":"xxx…"}`.
pub fn payload_json(bytes: usize) -> anyhow::Result<String> {
    const FRAME: usize = r#"{"data":""}"#.len();
    anyhow::ensure!(
        bytes >= FRAME,
        "payload size {bytes} is below the {FRAME} bytes of an empty payload object"
    );
    Ok(format!(r#"{{"data":"{}"}}"#, "x".repeat(bytes - FRAME)))
}

/// One created command.
#[derive(Clone, Debug)]
pub struct Sample {
    pub id: String,
    /// When the create was sent; in the open loop, when it was due.
    pub sent: Instant,
    /// When the create response arrived.
    pub created: Instant,
    /// When the first postback arrived, if it did.
    pub done: Option<Instant>,
}

/// Samples and failures of one loop.
#[derive(Debug, Default)]
pub struct LoopOutcome {
    pub samples: Vec<Sample>,
    pub errors: usize,
    pub first_error: Option<String>,
}

impl LoopOutcome {
    fn merge(&mut self, other: LoopOutcome) {
        self.samples.extend(other.samples);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn record_error(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }

    /// Fills in postback arrivals that came after the loop, waiting up to
    /// `deadline` for the missing ones.
    pub async fn collect_postbacks(&mut self, receiver: &Receiver, deadline: Duration) {
        receiver
            .wait_all(
                self.samples.iter().map(|sample| sample.id.as_str()),
                deadline,
            )
            .await;
        for sample in &mut self.samples {
            if sample.done.is_none() {
                sample.done = receiver.arrival(&sample.id);
            }
        }
    }
}

/// Runs a closed loop: `workers` clients, each creating commands back to back
/// (and with `receiver`, waiting for each command's postback before the
/// next), until `count` creates were sent or `time_limit` passed.
/// Devices are taken round-robin.
pub async fn closed_loop(
    api: &Api,
    devices: &Arc<Vec<String>>,
    workers: usize,
    count: usize,
    time_limit: Duration,
    receiver: Option<&Arc<Receiver>>,
) -> LoopOutcome {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + time_limit;
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (api, devices, next) = (api.clone(), devices.clone(), next.clone());
        let receiver = receiver.cloned();
        tasks.spawn(async move {
            let mut outcome = LoopOutcome::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count || Instant::now() >= deadline {
                    return outcome;
                }
                let device = &devices[index % devices.len()];
                let sent = Instant::now();
                match api.create(device).await {
                    Ok(id) => {
                        let created = Instant::now();
                        let done = match &receiver {
                            Some(receiver) => receiver.wait_for(&id, POSTBACK_WAIT).await,
                            None => None,
                        };
                        outcome.samples.push(Sample {
                            id,
                            sent,
                            created,
                            done,
                        });
                    }
                    Err(error) => outcome.record_error(error),
                }
            }
        });
    }
    join_outcomes(tasks).await
}

/// Runs an open loop: `rate` creates per second for `duration`, each sent at
/// its due time whether or not earlier ones got a response, so a slow server
/// cannot slow the load down. Latency counts from the due time.
pub async fn open_loop(
    api: &Api,
    devices: &Arc<Vec<String>>,
    rate: f64,
    duration: Duration,
) -> LoopOutcome {
    let count = (rate * duration.as_secs_f64()).round().max(1.0) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..count {
        let due = start + interval.mul_f64(index as f64);
        tokio::time::sleep_until(due).await;
        let (api, devices) = (api.clone(), devices.clone());
        tasks.spawn(async move {
            let mut outcome = LoopOutcome::default();
            let device = &devices[index % devices.len()];
            match api.create(device).await {
                Ok(id) => outcome.samples.push(Sample {
                    id,
                    sent: due.into_std(),
                    created: Instant::now(),
                    done: None,
                }),
                Err(error) => outcome.record_error(error),
            }
            outcome
        });
    }
    join_outcomes(tasks).await
}

async fn join_outcomes(mut tasks: JoinSet<LoopOutcome>) -> LoopOutcome {
    let mut total = LoopOutcome::default();
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(outcome) => total.merge(outcome),
            Err(error) => total.record_error(format!("load task failed: {error}")),
        }
    }
    total.samples.sort_by_key(|sample| sample.sent);
    total
}
