//! Creating commands with the checks that must see the database inside the
//! create transaction: the `Idempotency-Key` record and the per-device limit
//! on unfinished commands.

use sqlx::{Any, Row, Transaction};

use super::commands::{insert_command_rows, new_queued_command};
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

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}
