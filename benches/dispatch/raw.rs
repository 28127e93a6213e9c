//! The raw limits the service is built on, measured with the same message
//! and row sizes: RabbitMQ round trips through lapin, and the store's
//! commit rate through sqlx.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

use crate::stats::{Latency, rate};

/// Unconfirmed publishes in flight in the pipelined round trips.
const PUBLISH_WINDOW: usize = 256;
/// Unacked deliveries the pipelined consumer may hold.
const PIPELINED_PREFETCH: u16 = 100;
/// AMQP delivery mode 2: persistent, as the service publishes.
const PERSISTENT: u8 = 2;
/// Upper bound of one raw measurement, so that a stuck broker cannot hold
/// the run forever.
const RAW_TIME_LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, Default)]
pub struct RawAmqp {
    /// Publish, confirm, consume and ack of one message before the next.
    pub serial: Latency,
    pub serial_rate: f64,
    /// The same with a window of unconfirmed publishes.
    pub pipelined_rate: f64,
}

/// Measures round trips of persistent `body` messages through one durable
/// classic queue named `queue`, which is deleted afterwards. The publisher
/// and the consumer have a connection each, as the server and an agent do.
pub async fn amqp_round_trips(
    amqp_url: &str,
    queue: &str,
    body: &[u8],
    serial_count: usize,
    pipelined_count: usize,
) -> anyhow::Result<RawAmqp> {
    let publisher = connect(amqp_url, "bench raw publisher").await?;
    let consumer_connection = connect(amqp_url, "bench raw consumer").await?;
    let channel = publisher.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot declare {queue}"))?;

    let result = tokio::time::timeout(RAW_TIME_LIMIT, async {
        let (serial, serial_rate) =
            serial_round_trips(&channel, &consumer_connection, queue, body, serial_count).await?;
        let pipelined_rate =
            pipelined_round_trips(&channel, &consumer_connection, queue, body, pipelined_count)
                .await?;
        anyhow::Ok(RawAmqp {
            serial,
            serial_rate,
            pipelined_rate,
        })
    })
    .await
    .with_context(|| format!("raw round trips took longer than {RAW_TIME_LIMIT:?}"));

    channel
        .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
        .await?;
    let _ = publisher.close(200, ShortString::from("done")).await;
    let _ = consumer_connection
        .close(200, ShortString::from("done"))
        .await;
    result?
}

async fn connect(amqp_url: &str, name: &str) -> anyhow::Result<Connection> {
    Connection::connect(
        amqp_url,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .context("cannot connect to RabbitMQ")
}

async fn consumer(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<(Channel, Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

async fn publish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
) -> anyhow::Result<lapin::PublisherConfirm> {
    Ok(channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(PERSISTENT),
        )
        .await?)
}

fn check_confirm(confirmation: Confirmation) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => anyhow::bail!("raw publish was not confirmed: {other:?}"),
    }
}

async fn serial_round_trips(
    channel: &Channel,
    consumer_connection: &Connection,
    queue: &str,
    body: &[u8],
    count: usize,
) -> anyhow::Result<(Latency, f64)> {
    let (consumer_channel, mut deliveries) = consumer(consumer_connection, queue, 1).await?;
    let mut samples = Vec::with_capacity(count);
    let start = Instant::now();
    for _ in 0..count {
        let sent = Instant::now();
        check_confirm(publish(channel, queue, body).await?.await?)?;
        let delivery = deliveries.next().await.context("raw consumer closed")??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        samples.push(sent.elapsed());
    }
    let elapsed = start.elapsed();
    consumer_channel
        .close(200, ShortString::from("done"))
        .await?;
    Ok((Latency::of(samples), rate(count, elapsed)))
}

async fn pipelined_round_trips(
    channel: &Channel,
    consumer_connection: &Connection,
    queue: &str,
    body: &[u8],
    count: usize,
) -> anyhow::Result<f64> {
    let (consumer_channel, mut deliveries) =
        consumer(consumer_connection, queue, PIPELINED_PREFETCH).await?;
    let start = Instant::now();
    // Each delivery is acked and the ack awaited, as the service's
    // consumers do.
    let consuming = tokio::spawn(async move {
        for _ in 0..count {
            let delivery = deliveries.next().await.context("raw consumer closed")??;
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        anyhow::Ok(Instant::now())
    });
    let mut confirms = FuturesUnordered::new();
    for _ in 0..count {
        if confirms.len() >= PUBLISH_WINDOW
            && let Some(confirmation) = confirms.next().await
        {
            check_confirm(confirmation?)?;
        }
        confirms.push(publish(channel, queue, body).await?);
    }
    while let Some(confirmation) = confirms.next().await {
        check_confirm(confirmation?)?;
    }
    let end = consuming.await??;
    consumer_channel
        .close(200, ShortString::from("done"))
        .await?;
    Ok(rate(count, end - start))
}

/// Inserts `rows` rows shaped like the service's `commands` table, one row
/// per transaction, over `connections` connections, and returns the commit
/// rate in rows per second. `payload` is stored in the payload column.
pub async fn store_commit_rate(
    database_url: &str,
    sqlite: bool,
    payload: &str,
    rows: usize,
    connections: u32,
) -> anyhow::Result<f64> {
    let pool = raw_pool(database_url, sqlite, connections).await?;
    for statement in CREATE_TABLE {
        sqlx::query(*statement).execute(&pool).await?;
    }
    let per_connection = rows.div_ceil(connections as usize);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (pool, payload) = (pool.clone(), payload.to_owned());
        tasks.spawn(async move {
            for _ in 0..per_connection {
                insert_row(&pool, &payload).await?;
            }
            anyhow::Ok(())
        });
    }
    let inserted = tokio::time::timeout(RAW_TIME_LIMIT, async {
        while let Some(result) = tasks.join_next().await {
            result??;
        }
        anyhow::Ok(())
    })
    .await;
    let elapsed = start.elapsed();
    inserted.context("raw store inserts took too long")??;
    pool.close().await;
    Ok(rate(per_connection * connections as usize, elapsed))
}

/// The service's columns and secondary indexes of `commands`, without the
/// partial index that only queued rows enter.
const CREATE_TABLE: &[&str] = &[
    "CREATE TABLE raw_commands (
        id TEXT PRIMARY KEY, device_id TEXT NOT NULL, owner TEXT NOT NULL,
        status TEXT NOT NULL, command_type TEXT NOT NULL, app_service_name TEXT,
        package_family_name TEXT, error TEXT, payload TEXT, response_payload TEXT,
        permission_ticket TEXT, postback_uri TEXT, created_at BIGINT NOT NULL,
        last_action_at BIGINT NOT NULL, expires_at BIGINT)",
    "CREATE INDEX raw_commands_by_device ON raw_commands (device_id, created_at)",
    "CREATE INDEX raw_commands_by_created ON raw_commands (created_at)",
];

async fn insert_row(pool: &AnyPool, payload: &str) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp_millis();
    sqlx::query(
        "INSERT INTO raw_commands (id, device_id, owner, status, command_type, app_service_name, \
         package_family_name, error, payload, response_payload, permission_ticket, postback_uri, \
         created_at, last_action_at, expires_at) \
         VALUES ($1, $2, 'bench', 'queued', 'AppService', 'echo', NULL, NULL, $3, NULL, NULL, $4, $5, $5, $6)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind("bench-00001")
    .bind(payload)
    .bind("http://127.0.0.1:9/hooks/commands")
    .bind(now)
    .bind(now + 86_400_000)
    .execute(pool)
    .await?;
    Ok(())
}

/// Opens a pool set up as the service sets up its writer: on SQLite, WAL
/// mode with synchronous=NORMAL.
async fn raw_pool(database_url: &str, sqlite: bool, connections: u32) -> anyhow::Result<AnyPool> {
    let options = AnyPoolOptions::new().max_connections(connections);
    let options = if sqlite {
        options.after_connect(|connection, _| {
            Box::pin(async move {
                for pragma in [
                    "PRAGMA journal_mode = WAL",
                    "PRAGMA synchronous = NORMAL",
                    "PRAGMA busy_timeout = 10000",
                    "PRAGMA foreign_keys = ON",
                ] {
                    sqlx::query(pragma).execute(&mut *connection).await?;
                }
                Ok(())
            })
        })
    } else {
        options
    };
    options
        .connect(database_url)
        .await
        .context("cannot open the raw store database")
}
