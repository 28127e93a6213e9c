use sqlx::Row;

use super::{Store, StoreError, command_from_row};
use crate::command::{Command, Millis};

/// A command message waiting in the outbox.
#[derive(Clone, Debug)]
pub struct OutboxItem {
    pub outbox_id: i64,
    /// [`OUTBOX_COMMAND`](super::OUTBOX_COMMAND) or [`OUTBOX_CANCEL`](super::OUTBOX_CANCEL).
    pub kind: String,
    pub attempts: i64,
    pub command: Command,
}

impl Store {
    /// Outbox rows due at `now`, in the order they were written. A row is
    /// left out while an earlier row of the same device waits for a retry,
    /// so a device's commands are never published out of order.
    pub async fn due_outbox(&self, now: Millis, limit: i64) -> Result<Vec<OutboxItem>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT o.id AS outbox_id, o.kind, o.attempts, ", command_columns!(), " \
             FROM outbox o JOIN commands c ON c.id = o.command_id \
             WHERE o.available_at <= $1 AND NOT EXISTS ( \
                 SELECT 1 FROM outbox earlier \
                 WHERE earlier.device_id = o.device_id AND earlier.id < o.id AND earlier.available_at > $1) \
             ORDER BY o.id LIMIT $2"
        ))
        .bind(now.0)
        .bind(limit)
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| {
                Ok(OutboxItem {
                    outbox_id: row.try_get("outbox_id")?,
                    kind: row.try_get("kind")?,
                    attempts: row.try_get("attempts")?,
                    command: command_from_row(row)?,
                })
            })
            .collect()
    }

    /// Removes outbox rows whose message the broker confirmed.
    pub async fn delete_outbox(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        if outbox_ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        for chunk in outbox_ids.chunks(super::MAX_ROWS_PER_STATEMENT) {
            let sql = format!(
                "DELETE FROM outbox WHERE id IN ({})",
                super::placeholders(1, chunk.len(), 1)
            );
            let mut query = super::dynamic_query(sql);
            for id in chunk {
                query = query.bind(id);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Schedules another try of an outbox row after a failed publish.
    pub async fn defer_outbox(
        &self,
        outbox_id: i64,
        until: Millis,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET available_at = $2, attempts = attempts + 1, last_error = $3 WHERE id = $1")
            .bind(outbox_id)
            .bind(until.0)
            .bind(error)
            .execute(&self.writer)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Number of rows waiting in the outbox.
    pub async fn outbox_len(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM outbox")
            .fetch_one(&self.reader)
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.try_get("n")?)
    }
}
