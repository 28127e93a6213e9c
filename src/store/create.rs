//! Creating commands with the checks that must see the database inside the
//! create transaction: the `Idempotency-Key` record and the per-device limit
//! on unfinished commands.

use std::collections::HashMap;

use sqlx::{Any, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::commands::{insert_command_rows, insert_commands_rows, new_queued_command};
use super::{Backend, Store, StoreError};
use crate::command::{Command, Millis, NewCommand};
use crate::domain::DeviceId;

/// Limits and the idempotency record of one create request.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Maximum number of unfinished (`queued`, `sentToTarget`, `executing`)
    /// commands of a device. A create is rejected when the device has this
    /// many.
    pub max_unfinished_per_device: u32,
    pub idempotency: Option<IdempotencyRecord>,
}

/// The `Idempotency-Key` of a create request and what it must match.
#[derive(Clone, Debug)]
pub struct IdempotencyRecord {
    pub key: String,
    /// Hex SHA-256 of the route and the body; a repeat with another hash
    /// reuses the key for a different request.
    pub request_hash: String,
    pub expires_at: Millis,
}

/// The outcome of [`Store::create_command`].
#[derive(Debug)]
pub enum Created {
    /// A new command was stored.
    New(Box<Command>),
    /// The key was used before for the same request; nothing was stored and
    /// the first request's command is returned as it is now.
    Replayed(Box<Command>),
    /// The key was used before for a different request; nothing was stored.
    KeyReused { key: String },
    /// The device already has `limit` unfinished commands; nothing was stored.
    DeviceFull { device: DeviceId, limit: u32 },
}

impl Store {
    /// Stores a new `queued` command with its pending publish, unless the
    /// idempotency key was used before or the device is at its limit, all in
    /// one transaction.
    ///
    /// On SQLite the single writer connection runs create transactions one
    /// at a time. On PostgreSQL an advisory lock per device orders creates
    /// for one device, so the unfinished count cannot be overshot. Creates
    /// for different devices that share a key are ordered by the key's
    /// primary key, and the later one returns the earlier one's outcome.
    pub async fn create_command(
        &self,
        new: NewCommand,
        options: &CreateOptions,
    ) -> Result<Created, StoreError> {
        if let Some(queue) = &self.creates
            && options.idempotency.is_none()
        {
            return queue.create(new, options.max_unfinished_per_device).await;
        }
        match self.try_create(&new, options).await {
            Err(StoreError::Database(error)) if is_unique_violation(&error) => {
                // Another request stored the same key between this request's
                // lookup and its insert. It won, so this request is a repeat.
                let Some(record) = &options.idempotency else {
                    return Err(StoreError::Database(error));
                };
                let outcome = self.find_idempotent(&new.owner, record).await?;
                outcome.ok_or(StoreError::Database(error))
            }
            other => other,
        }
    }

    async fn try_create(
        &self,
        new: &NewCommand,
        options: &CreateOptions,
    ) -> Result<Created, StoreError> {
        let now = Millis::now();
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        if self.backend == Backend::Postgres {
            // Held until the transaction ends. Two devices whose ids share a
            // hash only wait for each other; they never see each other's rows.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(new.device_id.as_str())
                .execute(&mut *tx)
                .await?;
        }

        if let Some(record) = &options.idempotency
            && let Some(outcome) = lookup_key(&mut tx, &new.owner, record, now).await?
        {
            tx.commit().await?;
            return Ok(outcome);
        }

        let unfinished: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM commands WHERE device_id = $1 \
             AND status IN ('queued', 'sentToTarget', 'executing')",
        )
        .bind(new.device_id.as_str())
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if unfinished >= i64::from(options.max_unfinished_per_device) {
            return Ok(Created::DeviceFull {
                device: new.device_id.clone(),
                limit: options.max_unfinished_per_device,
            });
        }

        let command = new_queued_command(new.clone(), now);
        insert_command_rows(&mut tx, &command).await?;
        self.notify_outbox(&mut tx).await?;
        if let Some(record) = &options.idempotency {
            sqlx::query(
                "INSERT INTO idempotency_keys \
                 (owner, idempotency_key, request_hash, command_id, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&command.owner)
            .bind(&record.key)
            .bind(&record.request_hash)
            .bind(command.id.to_string())
            .bind(now.0)
            .bind(record.expires_at.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Created::New(Box::new(command)))
    }

    /// Looks up the caller's key and returns [`Created::Replayed`] or
    /// [`Created::KeyReused`], or `None` when the key has no live record.
    pub async fn find_idempotent(
        &self,
        owner: &str,
        record: &IdempotencyRecord,
    ) -> Result<Option<Created>, StoreError> {
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        let outcome = lookup_key(&mut tx, owner, record, Millis::now()).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Deletes idempotency records that expired at or before `now` and
    /// returns how many there were.
    pub async fn purge_idempotency_keys(&self, now: Millis) -> Result<u64, StoreError> {
        let result = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= $1")
            .bind(now.0)
            .execute(&self.writer)
            .await
            .map_err(|e| self.error(e))?;
        Ok(result.rows_affected())
    }
}

/// Looks up a live record of the caller's key: a repeat of the same request
/// returns its command, another request returns [`Created::KeyReused`]. An
/// expired record that the sweep has not deleted yet is deleted here, so the
/// key can be used again.
async fn lookup_key(
    tx: &mut Transaction<'_, Any>,
    owner: &str,
    record: &IdempotencyRecord,
    now: Millis,
) -> Result<Option<Created>, StoreError> {
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE owner = $1 AND idempotency_key = $2 AND expires_at <= $3",
    )
    .bind(owner)
    .bind(&record.key)
    .bind(now.0)
    .execute(&mut **tx)
    .await?;

    let row = sqlx::query(concat!(
        "SELECT k.request_hash, ",
        command_columns!(),
        " FROM idempotency_keys k JOIN commands c ON c.id = k.command_id \
         WHERE k.owner = $1 AND k.idempotency_key = $2"
    ))
    .bind(owner)
    .bind(&record.key)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };

    let stored_hash: String = row.try_get("request_hash")?;
    if stored_hash == record.request_hash {
        Ok(Some(Created::Replayed(Box::new(super::command_from_row(
            &row,
        )?))))
    } else {
        Ok(Some(Created::KeyReused {
            key: record.key.clone(),
        }))
    }
}

/// Most creates stored in one transaction.
const MAX_CREATE_BATCH: usize = 256;

/// A create waiting for the create task.
struct PendingCreate {
    new: NewCommand,
    limit: u32,
    reply: oneshot::Sender<Result<Created, StoreError>>,
}

/// The queue of creates without an idempotency key, on SQLite. Each create
/// costs the single writer connection a transaction of five statements. The
/// creates that wait together share one, so the writer stays free for the
/// relay, the report worker and the postback sender under load. A create that
/// finds the queue empty is stored at once, so it waits no longer than it
/// would without the queue.
#[derive(Clone, Debug)]
pub(super) struct CreateQueue {
    sender: mpsc::UnboundedSender<PendingCreate>,
}

impl CreateQueue {
    /// Starts the task that stores queued creates through `store`, a store
    /// without a create queue. The task ends when every clone of the queue
    /// is dropped.
    pub(super) fn start(store: Store) -> Self {
        let (sender, mut pending) = mpsc::unbounded_channel::<PendingCreate>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_CREATE_BATCH);
            while pending.recv_many(&mut batch, MAX_CREATE_BATCH).await > 0 {
                store.create_batch(std::mem::take(&mut batch)).await;
            }
        });
        Self { sender }
    }

    async fn create(&self, new: NewCommand, limit: u32) -> Result<Created, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.sender
            .send(PendingCreate { new, limit, reply })
            .map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }
}

impl Store {
    /// Stores a batch of creates in one transaction and replies to each. If
    /// the transaction fails, each create is tried alone, so that one create
    /// the store refuses does not fail the others.
    async fn create_batch(&self, batch: Vec<PendingCreate>) {
        let requests: Vec<(&NewCommand, u32)> = batch.iter().map(|p| (&p.new, p.limit)).collect();
        match self.try_create_batch(&requests).await {
            Ok(outcomes) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    // The caller may have gone (its request was dropped);
                    // the command stays stored, as a create would.
                    let _ = pending.reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                if batch.len() > 1 {
                    tracing::warn!(count = batch.len(), %error, "cannot store a batch of creates; storing them one at a time");
                }
                for pending in batch {
                    let options = CreateOptions {
                        max_unfinished_per_device: pending.limit,
                        idempotency: None,
                    };
                    let outcome = self.try_create(&pending.new, &options).await;
                    let _ = pending.reply.send(outcome);
                }
            }
        }
    }

    /// Stores `requests` in one transaction. The unfinished-command limit
    /// applies in the order of `requests`, counting the commands that earlier
    /// requests of the batch add.
    async fn try_create_batch(
        &self,
        requests: &[(&NewCommand, u32)],
    ) -> Result<Vec<Created>, StoreError> {
        let now = Millis::now();
        let mut devices: Vec<&str> = requests
            .iter()
            .map(|(new, _)| new.device_id.as_str())
            .collect();
        devices.sort_unstable();
        devices.dedup();
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        let mut unfinished: HashMap<String, i64> = HashMap::with_capacity(devices.len());
        for chunk in devices.chunks(super::MAX_ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT device_id, COUNT(*) AS n FROM commands WHERE device_id IN ({}) \
                 AND status IN ('queued', 'sentToTarget', 'executing') GROUP BY device_id",
                super::placeholders(1, chunk.len(), 1)
            );
            let mut query = super::dynamic_query(sql);
            for device in chunk {
                query = query.bind(device.to_string());
            }
            for row in query.fetch_all(&mut *tx).await? {
                unfinished.insert(row.try_get("device_id")?, row.try_get("n")?);
            }
        }

        let mut outcomes = Vec::with_capacity(requests.len());
        let mut commands = Vec::with_capacity(requests.len());
        for (new, limit) in requests {
            let count = unfinished
                .entry(new.device_id.as_str().to_owned())
                .or_default();
            if *count >= i64::from(*limit) {
                outcomes.push(Created::DeviceFull {
                    device: new.device_id.clone(),
                    limit: *limit,
                });
                continue;
            }
            *count += 1;
            let command = new_queued_command((*new).clone(), now);
            outcomes.push(Created::New(Box::new(command.clone())));
            commands.push(command);
        }
        if !commands.is_empty() {
            insert_commands_rows(&mut tx, &commands).await?;
            self.notify_outbox(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{echo_command, sqlite_store};

    #[tokio::test]
    async fn batched_creates_keep_device_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        let options = CreateOptions {
            max_unfinished_per_device: 5,
            idempotency: None,
        };
        // Sent together, so that most of them wait in the queue and share
        // transactions.
        let creates = (0..20).map(|n| {
            let (store, options) = (store.clone(), options.clone());
            let device = if n % 2 == 0 { "even" } else { "odd" };
            let new = echo_command(device, Some(&n.to_string()), None);
            tokio::spawn(async move { store.create_command(new, &options).await })
        });
        let mut stored = Vec::new();
        let mut full = 0;
        for create in creates {
            match create.await.unwrap().unwrap() {
                Created::New(command) => stored.push(*command),
                Created::DeviceFull { limit, .. } => {
                    assert_eq!(limit, 5);
                    full += 1;
                }
                other => panic!("unexpected outcome {other:?}"),
            }
        }
        assert_eq!((stored.len(), full), (10, 10));
        for device in ["even", "odd"] {
            let count = stored
                .iter()
                .filter(|c| c.device_id.as_str() == device)
                .count();
            assert_eq!(count, 5, "{device}");
        }
        // The outbox contains every stored command once, in the order the
        // store took them, which per device is the order of their ids.
        let outbox = store.due_outbox(Millis::now(), 100).await.unwrap();
        assert_eq!(outbox.len(), 10);
        for device in ["even", "odd"] {
            let ids: Vec<_> = outbox
                .iter()
                .filter(|item| item.command.device_id.as_str() == device)
                .map(|item| item.command.id)
                .collect();
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            assert_eq!(ids, sorted, "{device}");
        }
        for command in &stored {
            let statuses: Vec<String> = store
                .transitions(command.id)
                .await
                .unwrap()
                .iter()
                .map(|t| t.status.to_string())
                .collect();
            assert_eq!(statuses, ["queued"]);
        }
    }
}
