//! A webhook receiver on 127.0.0.1 that records when each command's first
//! postback arrived and wakes the tasks that wait for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct Receiver {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<Arrivals>,
}

#[derive(Default)]
struct Arrivals {
    first: HashMap<String, Instant>,
    waiting: HashMap<String, oneshot::Sender<Instant>>,
    /// Postbacks for a command that had already posted back once.
    repeats: usize,
    /// Bodies without a readable `id`.
    unreadable: usize,
}

/// The part of a postback body the receiver reads: the command as the API
/// returns it.
#[derive(Deserialize)]
struct PostbackBody {
    id: String,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .fallback(record)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("webhook receiver stopped: {error}");
            }
        });
        Ok(Self {
            url: format!("http://127.0.0.1:{port}/hooks/commands"),
            shared,
            task,
        })
    }

    /// Waits for the first postback of command `id`, or `None` at the deadline.
    pub async fn wait_for(&self, id: &str, deadline: Duration) -> Option<Instant> {
        let receiver = {
            let mut state = self.shared.state.lock().expect("receiver lock");
            if let Some(at) = state.first.get(id) {
                return Some(*at);
            }
            let (sender, receiver) = oneshot::channel();
            state.waiting.insert(id.to_owned(), sender);
            receiver
        };
        match tokio::time::timeout(deadline, receiver).await {
            Ok(Ok(at)) => Some(at),
            _ => {
                self.shared
                    .state
                    .lock()
                    .expect("receiver lock")
                    .waiting
                    .remove(id);
                None
            }
        }
    }

    /// Returns the first arrival of command `id`, if any.
    pub fn arrival(&self, id: &str) -> Option<Instant> {
        let state = self.shared.state.lock().expect("receiver lock");
        state.first.get(id).copied()
    }

    /// Waits until `ids` have all posted back or `deadline` passes, and
    /// returns how many have.
    ///
    /// It looks every 100 ms, and then only at the ids still missing, so
    /// that a wait for 100,000 postbacks neither wakes on each arrival nor
    /// holds the lock that every arriving postback needs for long.
    pub async fn wait_all<'a>(
        &self,
        ids: impl Iterator<Item = &'a str> + Clone,
        deadline: Duration,
    ) -> usize {
        let end = tokio::time::Instant::now() + deadline;
        let total = ids.clone().count();
        let mut missing: Vec<&str> = ids.collect();
        loop {
            {
                let state = self.shared.state.lock().expect("receiver lock");
                missing.retain(|id| !state.first.contains_key(*id));
            }
            if missing.is_empty() || tokio::time::Instant::now() >= end {
                return total - missing.len();
            }
            tokio::time::sleep_until(
                end.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            )
            .await;
        }
    }

    /// Postbacks that repeated an earlier one, and bodies without an id.
    pub fn anomalies(&self) -> (usize, usize) {
        let state = self.shared.state.lock().expect("receiver lock");
        (state.repeats, state.unreadable)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let Ok(body) = serde_json::from_slice::<PostbackBody>(&body) else {
        shared.state.lock().expect("receiver lock").unreadable += 1;
        return StatusCode::NO_CONTENT;
    };
    let mut state = shared.state.lock().expect("receiver lock");
    if state.first.contains_key(&body.id) {
        state.repeats += 1;
        return StatusCode::NO_CONTENT;
    }
    state.first.insert(body.id.clone(), at);
    if let Some(waiter) = state.waiting.remove(&body.id) {
        let _ = waiter.send(at);
    }
    StatusCode::NO_CONTENT
}
