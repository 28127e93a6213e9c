//! Samples the queues between the service's stages while a loop runs, so
//! that the stage where work piles up shows which one bounds throughput:
//! the outbox (relay), the reports queue (report worker) and the pending
//! postbacks (postback sender).

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use sqlx::{AnyPool, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::database::outbox_len;

const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Mean and maximum of one sampled queue length.
#[derive(Clone, Copy, Debug, Default)]
pub struct Depth {
    pub mean: f64,
    pub max: i64,
}

impl Depth {
    fn of(samples: &[i64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        Self {
            mean: samples.iter().sum::<i64>() as f64 / samples.len() as f64,
            max: samples.iter().copied().max().unwrap_or_default(),
        }
    }
}

impl fmt::Display for Depth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mean {:.1} / max {}", self.mean, self.max)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Backlog {
    /// Outbox rows: committed commands the relay has not published yet.
    pub outbox: Depth,
    /// Ready messages in the reports queue: status reports the report
    /// worker has not taken yet (it holds up to its prefetch besides).
    pub reports: Depth,
    /// Postback deliveries waiting to be sent.
    pub postbacks: Depth,
}

impl fmt::Display for Backlog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbox {}, reports queue {}, pending postbacks {}",
            self.outbox, self.reports, self.postbacks
        )
    }
}

pub struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<Backlog>>,
}

impl Sampler {
    /// Starts sampling the server's database through `pool` and its
    /// reports queue `reports_queue` every 250 ms.
    pub async fn start(
        amqp_url: &str,
        reports_queue: String,
        pool: AnyPool,
    ) -> anyhow::Result<Self> {
        let connection = Connection::connect(
            amqp_url,
            ConnectionProperties::default().with_connection_name("bench backlog sampler".into()),
        )
        .await
        .context("cannot connect the backlog sampler")?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let channel = connection.create_channel().await?;
            let (mut outbox, mut reports, mut postbacks) = (Vec::new(), Vec::new(), Vec::new());
            while !stopped.is_cancelled() {
                outbox.push(outbox_len(&pool).await?);
                postbacks.push(pending_postbacks(&pool).await?);
                let queue = channel
                    .queue_declare(
                        ShortString::from(reports_queue.as_str()),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                reports.push(i64::from(queue.message_count()));
                tokio::select! {
                    () = stopped.cancelled() => {}
                    () = tokio::time::sleep(SAMPLE_EVERY) => {}
                }
            }
            let _ = connection.close(200, ShortString::from("done")).await;
            Ok(Backlog {
                outbox: Depth::of(&outbox),
                reports: Depth::of(&reports),
                postbacks: Depth::of(&postbacks),
            })
        });
        Ok(Self { stop, task })
    }

    pub async fn stop(self) -> anyhow::Result<Backlog> {
        self.stop.cancel();
        self.task.await?
    }
}

async fn pending_postbacks(pool: &AnyPool) -> anyhow::Result<i64> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM postbacks WHERE state = 'pending'")
        .fetch_one(pool)
        .await?;
    Ok(row.try_get("n")?)
}
