use std::collections::HashMap;

use sqlx::{Any, Row, Transaction};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::command::{Command, Millis, PostbackSummary};

pub const PENDING: &str = "pending";
pub const DELIVERED: &str = "delivered";
pub const FAILED: &str = "failed";

/// A delivery that is due and not leased by another sender. Its body is
/// read when it is leased, so that passing over a due delivery costs no
/// copy of its body.
#[derive(Clone, Debug)]
pub struct DuePostback {
    pub id: Uuid,
    pub command_id: Uuid,
    pub url: String,
    pub sequence: i64,
    pub attempts: i64,
}

/// A delivery with its attempts, for `GET …/postbacks`.
#[derive(Clone, Debug)]
pub struct PostbackRecord {
    pub id: Uuid,
    pub url: String,
    pub sequence: i64,
    pub state: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: Millis,
    pub finished_at: Option<Millis>,
    pub next_attempt_at: Option<Millis>,
    pub attempt_log: Vec<AttemptRecord>,
}

/// An attempt that ended, with the delivery's new state: `next_attempt_at`
/// set means try again then; otherwise the delivery ends in `state`.
#[derive(Clone, Debug)]
pub struct FinishedAttempt {
    pub postback_id: Uuid,
    pub attempt: AttemptRecord,
    pub next_attempt_at: Option<Millis>,
    pub state: String,
}

#[derive(Clone, Debug)]
pub struct AttemptRecord {
    pub attempt: i64,
    pub at: Millis,
    pub status_code: Option<i64>,
    pub outcome: String,
    pub error: Option<String>,
    pub duration_ms: i64,
}

impl Store {
    pub(super) async fn insert_postback(
        tx: &mut Transaction<'_, Any>,
        command: &Command,
        url: &str,
        sequence: i64,
        now: Millis,
    ) -> Result<Uuid, StoreError> {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO postbacks (id, command_id, url, body, sequence, state, attempts, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7)",
        )
        .bind(id.to_string())
        .bind(command.id.to_string())
        .bind(url)
        .bind(command.to_json(None))
        .bind(sequence)
        .bind(PENDING)
        .bind(now.0)
        .execute(&mut **tx)
        .await?;
        Ok(id)
    }

    /// Creates a new delivery of the command as it is now, with a new id,
    /// for an operator who wants a finished delivery sent again.
    pub async fn resend_postback(&self, command: &Command) -> Result<Option<Uuid>, StoreError> {
        let Some(url) = &command.postback_uri else {
            return Ok(None);
        };
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        let sequence = super::commands::transition_count(&mut tx, command.id).await?;
        let id = Self::insert_postback(&mut tx, command, url, sequence, Millis::now()).await?;
        tx.commit().await?;
        Ok(Some(id))
    }

    /// Reads the deliveries due at `now`, earliest first, except those to the
    /// origins in `skipped_origins` (each `scheme://host[:port]` as
    /// `url::Origin::ascii_serialization` writes it). The sender skips
    /// receivers that have no free slot here, because their backlog would
    /// otherwise fill the page and hide every other receiver's deliveries.
    pub async fn due_postbacks(
        &self,
        now: Millis,
        skipped_origins: &[String],
        limit: i64,
    ) -> Result<Vec<DuePostback>, StoreError> {
        let sql = due_sql(skipped_origins.len());
        let mut query = super::dynamic_query(sql).bind(now.0).bind(limit);
        for origin in skipped_origins {
            query = query.bind(format!("{}/%", escape_like(origin)));
        }
        let rows = query
            .fetch_all(&self.reader)
            .await
            .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| {
                Ok(DuePostback {
                    id: parse_uuid(row.try_get("id")?)?,
                    command_id: parse_uuid(row.try_get("command_id")?)?,
                    url: row.try_get("url")?,
                    sequence: row.try_get("sequence")?,
                    attempts: row.try_get("attempts")?,
                })
            })
            .collect()
    }

    /// Leases the due deliveries among `ids` until `until`, so no other
    /// sender (in this or another process) sends them meanwhile, and returns
    /// the body of each one leased. Deliveries another sender took since
    /// they were read are left out.
    pub async fn lease_postbacks(
        &self,
        ids: &[Uuid],
        now: Millis,
        until: Millis,
    ) -> Result<HashMap<Uuid, String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        // $1 to $3 hold the lease, the placeholders after them the ids.
        let sql = format!(
            "UPDATE postbacks SET lease_until = $3 \
             WHERE state = $1 AND (lease_until IS NULL OR lease_until <= $2) AND id IN ({}) \
             RETURNING id, body",
            super::placeholders(4, ids.len(), 1)
        );
        let mut query = super::dynamic_query(sql)
            .bind(PENDING)
            .bind(now.0)
            .bind(until.0);
        for id in ids {
            query = query.bind(id.to_string());
        }
        let rows = query
            .fetch_all(&self.writer)
            .await
            .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| Ok((parse_uuid(row.try_get("id")?)?, row.try_get("body")?)))
            .collect()
    }

    /// Ends this process's leases of deliveries it will not send now, so
    /// that any sender may take them at once instead of when the leases end.
    pub async fn release_postback_leases(&self, ids: &[Uuid]) -> Result<(), StoreError> {
        for chunk in ids.chunks(super::MAX_ROWS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE postbacks SET lease_until = NULL WHERE state = 'pending' AND id IN ({})",
                super::placeholders(1, chunk.len(), 1)
            );
            let mut query = super::dynamic_query(sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            query
                .execute(&self.writer)
                .await
                .map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    /// Records the attempts and their deliveries' new states, in one
    /// transaction of two statements, and ends their leases.
    pub async fn record_postback_attempts(
        &self,
        attempts: &[FinishedAttempt],
    ) -> Result<(), StoreError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        for chunk in attempts.chunks(super::MAX_ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO postback_attempts \
                 (postback_id, attempt, at, status_code, outcome, error, duration_ms) VALUES {}",
                super::placeholders(1, chunk.len(), 7)
            );
            let mut insert = super::dynamic_query(sql);
            for finished in chunk {
                let attempt = &finished.attempt;
                insert = insert
                    .bind(finished.postback_id.to_string())
                    .bind(attempt.attempt)
                    .bind(attempt.at.0)
                    .bind(attempt.status_code)
                    .bind(attempt.outcome.clone())
                    .bind(attempt.error.clone())
                    .bind(attempt.duration_ms);
            }
            insert.execute(&mut *tx).await?;

            // Both SQLite and PostgreSQL name the columns of a VALUES list
            // column1, column2, and so on.
            let sql = format!(
                "UPDATE postbacks SET attempts = v.column2, state = v.column3, \
                 next_attempt_at = COALESCE(v.column4, postbacks.next_attempt_at), lease_until = NULL, \
                 last_status = v.column5, last_error = v.column6, finished_at = v.column7 \
                 FROM (VALUES {}) AS v WHERE postbacks.id = v.column1",
                super::placeholders(1, chunk.len(), 7)
            );
            let mut update = super::dynamic_query(sql);
            for finished in chunk {
                let attempt = &finished.attempt;
                let finished_at = finished.next_attempt_at.is_none().then_some(attempt.at.0);
                update = update
                    .bind(finished.postback_id.to_string())
                    .bind(attempt.attempt)
                    .bind(finished.state.clone())
                    .bind(finished.next_attempt_at.map(|m| m.0))
                    .bind(attempt.status_code)
                    .bind(attempt.error.clone())
                    .bind(finished_at);
            }
            update.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Returns the state of the command's newest delivery, if it has any.
    pub async fn postback_summary(
        &self,
        command_id: Uuid,
    ) -> Result<Option<PostbackSummary>, StoreError> {
        let row = sqlx::query(
            "SELECT state, attempts, last_error FROM postbacks WHERE command_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(command_id.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(|e| self.error(e))?;
        row.map(|row| {
            Ok(PostbackSummary {
                state: row.try_get("state")?,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
            })
        })
        .transpose()
    }

    /// Returns every delivery of a command with its attempts, oldest first.
    pub async fn postbacks_of(&self, command_id: Uuid) -> Result<Vec<PostbackRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, url, sequence, state, attempts, last_status, last_error, created_at, finished_at, \
             next_attempt_at FROM postbacks WHERE command_id = $1 ORDER BY created_at, id",
        )
        .bind(command_id.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.error(e))?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let id = parse_uuid(row.try_get("id")?)?;
            let state: String = row.try_get("state")?;
            let pending = state == PENDING;
            records.push(PostbackRecord {
                id,
                url: row.try_get("url")?,
                sequence: row.try_get("sequence")?,
                attempts: row.try_get("attempts")?,
                last_status: row.try_get("last_status")?,
                last_error: row.try_get("last_error")?,
                created_at: Millis(row.try_get("created_at")?),
                finished_at: row.try_get::<Option<i64>, _>("finished_at")?.map(Millis),
                next_attempt_at: pending
                    .then(|| row.try_get("next_attempt_at").map(Millis))
                    .transpose()?,
                state,
                attempt_log: self.attempts_of(id).await?,
            });
        }
        Ok(records)
    }

    async fn attempts_of(&self, postback_id: Uuid) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT attempt, at, status_code, outcome, error, duration_ms FROM postback_attempts \
             WHERE postback_id = $1 ORDER BY id",
        )
        .bind(postback_id.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| {
                Ok(AttemptRecord {
                    attempt: row.try_get("attempt")?,
                    at: Millis(row.try_get("at")?),
                    status_code: row.try_get("status_code")?,
                    outcome: row.try_get("outcome")?,
                    error: row.try_get("error")?,
                    duration_ms: row.try_get("duration_ms")?,
                })
            })
            .collect()
    }
}

/// Builds the query of [`Store::due_postbacks`]: `$1` is the time, `$2` the limit,
/// and each placeholder after them the pattern of a skipped origin.
fn due_sql(skipped_origins: usize) -> String {
    // The state is written out, not bound: SQLite uses the partial index
    // `postbacks_due` only when the query itself names its condition, and
    // without it every pass scans every delivery ever made.
    let mut sql = String::from(
        "SELECT id, command_id, url, sequence, attempts FROM postbacks \
         WHERE state = 'pending' AND next_attempt_at <= $1 \
         AND (lease_until IS NULL OR lease_until <= $1)",
    );
    // A stored URL is normalized, so it starts with its origin and a slash.
    for index in 0..skipped_origins {
        sql.push_str(&format!(" AND url NOT LIKE ${} ESCAPE '\\'", index + 3));
    }
    sql.push_str(" ORDER BY next_attempt_at, id LIMIT $2");
    sql
}

/// Escapes the LIKE wildcards `%` and `_`, and the escape character `\`
/// itself, so that `text` matches only itself.
fn escape_like(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, '\\' | '%' | '_') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

fn parse_uuid(text: String) -> Result<Uuid, StoreError> {
    Uuid::parse_str(&text).map_err(|error| StoreError::Corrupt(format!("id {text:?}: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::CommandStatus;
    use crate::store::StatusChange;
    use crate::store::test_support::{echo_command, sqlite_store};

    /// Opens a store with one canceled command, and so one pending
    /// delivery, and returns the delivery's id with it.
    async fn store_with_delivery(dir: &tempfile::TempDir) -> (Store, Uuid) {
        let store = sqlite_store(dir).await;
        let command = store
            .insert_command(echo_command(
                "d1",
                Some("{\"n\":1}"),
                Some("http://127.0.0.1:9/hooks"),
            ))
            .await
            .unwrap();
        let change = StatusChange {
            command_id: command.id,
            status: CommandStatus::Canceled,
            error: None,
            response_payload: None,
            source: "api".into(),
            expected_device: None,
            at: Millis::now(),
        };
        store.apply_status(&change, |_| true).await.unwrap();
        let due = store.due_postbacks(Millis::now(), &[], 10).await.unwrap();
        assert_eq!(due.len(), 1);
        (store, due[0].id)
    }

    #[tokio::test]
    async fn recorded_attempts_end_or_reschedule_their_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let (store, id) = store_with_delivery(&dir).await;
        let now = Millis::now();
        let retry_at = now.saturating_add(std::time::Duration::from_secs(60));
        let attempt = |number: i64, outcome: &str, status: i64| AttemptRecord {
            attempt: number,
            at: now,
            status_code: Some(status),
            outcome: outcome.into(),
            error: Some(format!("HTTP {status}")),
            duration_ms: 3,
        };
        store.lease_postbacks(&[id], now, retry_at).await.unwrap();
        let retry = FinishedAttempt {
            postback_id: id,
            attempt: attempt(1, "retry", 503),
            next_attempt_at: Some(retry_at),
            state: PENDING.into(),
        };
        store.record_postback_attempts(&[retry]).await.unwrap();
        let records = store
            .postbacks_of(store_command(&store, id).await)
            .await
            .unwrap();
        assert_eq!(records[0].state, PENDING);
        assert_eq!(records[0].next_attempt_at, Some(retry_at));
        assert_eq!(records[0].finished_at, None);
        // The lease ended with the record: the delivery is due at its retry time.
        assert_eq!(
            store.due_postbacks(retry_at, &[], 10).await.unwrap().len(),
            1
        );

        let delivered = FinishedAttempt {
            postback_id: id,
            attempt: attempt(2, "delivered", 204),
            next_attempt_at: None,
            state: DELIVERED.into(),
        };
        store.record_postback_attempts(&[delivered]).await.unwrap();
        let records = store
            .postbacks_of(store_command(&store, id).await)
            .await
            .unwrap();
        assert_eq!(records[0].state, DELIVERED);
        assert_eq!(records[0].attempts, 2);
        assert_eq!(records[0].last_status, Some(204));
        assert_eq!(records[0].finished_at, Some(now));
        let outcomes: Vec<&str> = records[0]
            .attempt_log
            .iter()
            .map(|a| a.outcome.as_str())
            .collect();
        assert_eq!(outcomes, ["retry", "delivered"]);
        assert!(
            store
                .due_postbacks(retry_at, &[], 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    async fn store_command(store: &Store, postback_id: Uuid) -> Uuid {
        let row = sqlx::query("SELECT command_id FROM postbacks WHERE id = $1")
            .bind(postback_id.to_string())
            .fetch_one(&store.reader)
            .await
            .unwrap();
        parse_uuid(row.try_get("command_id").unwrap()).unwrap()
    }

    #[tokio::test]
    async fn due_query_uses_the_partial_index() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_with_delivery(&dir).await;
        for skipped in [0, 2] {
            let sql = format!("EXPLAIN QUERY PLAN {}", due_sql(skipped));
            let mut query = crate::store::dynamic_query(sql).bind(0_i64).bind(10_i64);
            for _ in 0..skipped {
                query = query.bind("http://a.example/%");
            }
            let plan: Vec<String> = query
                .fetch_all(&store.reader)
                .await
                .unwrap()
                .iter()
                .map(|row| row.try_get("detail").unwrap())
                .collect();
            assert!(
                plan.iter().any(|step| step.contains("INDEX postbacks_due")),
                "plan with {skipped} skipped origins: {plan:?}"
            );
        }
    }

    #[tokio::test]
    async fn lease_returns_bodies_of_free_deliveries_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, id) = store_with_delivery(&dir).await;
        let unknown = Uuid::now_v7();
        let now = Millis::now();
        let until = now.saturating_add(std::time::Duration::from_secs(30));

        let leased = store
            .lease_postbacks(&[id, unknown], now, until)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        assert!(
            leased[&id].contains("\"Payload\":{\"n\":1}"),
            "{}",
            leased[&id]
        );
        // Leased now: neither due nor leased again before `until`.
        assert!(store.due_postbacks(now, &[], 10).await.unwrap().is_empty());
        assert!(
            store
                .lease_postbacks(&[id], now, until)
                .await
                .unwrap()
                .is_empty()
        );
        // Once the lease ran out, another sender may take it.
        let later = until.saturating_add(std::time::Duration::from_millis(1));
        assert_eq!(
            store
                .lease_postbacks(&[id], later, later)
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn escape_like_escapes_wildcards() {
        assert_eq!(escape_like("http://a_b.example"), "http://a\\_b.example");
        assert_eq!(escape_like("100%\\"), "100\\%\\\\");
        assert_eq!(escape_like("http://[::1]:80"), "http://[::1]:80");
    }
}
