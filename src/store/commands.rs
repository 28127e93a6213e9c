use std::collections::HashMap;

use sqlx::{Any, Row, Transaction};
use uuid::Uuid;

use super::{Backend, DuePostback, Store, StoreError, command_from_row, parse_status};
use crate::command::{Command, Millis, NewCommand};
use crate::domain::{CommandStatus, DeviceId};

/// A requested move of a command to a new status, with its source.
#[derive(Clone, Debug)]
pub struct StatusChange {
    pub command_id: Uuid,
    pub status: CommandStatus,
    pub error: Option<String>,
    /// JSON text.
    pub response_payload: Option<String>,
    /// Who moved the command: `agent:<deviceId>`, `relay`, `expiry` or `api`.
    pub source: String,
    /// When set, the change applies only to a command of this device.
    pub expected_device: Option<DeviceId>,
    pub at: Millis,
}

/// The result of [`Store::apply_status`].
#[derive(Debug)]
pub enum Applied {
    /// The command moved; it is returned as stored now.
    Moved(Box<Command>),
    /// The change was not allowed (a repeat, a step backwards, or a final
    /// status already reached), so nothing was written.
    Ignored {
        current: CommandStatus,
    },
    /// The command belongs to another device than the one reporting.
    WrongDevice {
        actual: DeviceId,
    },
    NotFound,
}

/// One stored status transition.
#[derive(Clone, Debug)]
pub struct Transition {
    pub status: CommandStatus,
    pub at: Millis,
    pub source: String,
    pub error: Option<String>,
}

impl Store {
    /// Stores a new `queued` command together with its pending publish, in
    /// one transaction, so a command is never stored without its message.
    pub async fn insert_command(&self, new: NewCommand) -> Result<Command, StoreError> {
        let command = new_queued_command(new, Millis::now());
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        insert_command_rows(&mut tx, &command).await?;
        self.notify_outbox(&mut tx).await?;
        tx.commit().await?;
        Ok(command)
    }

    pub async fn get_command(&self, id: Uuid) -> Result<Option<Command>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            command_columns!(),
            " FROM commands c WHERE c.id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(|e| self.error(e))?;
        row.as_ref().map(command_from_row).transpose()
    }

    /// Moves a command to a new status if [`CommandStatus::can_move_to`]
    /// allows it, records the transition, and, when the command has a
    /// `PostBackUri` and `notify` returns true for this status, creates the
    /// postback delivery in the same transaction.
    ///
    /// Applying the same change twice writes nothing the second time, which
    /// makes redelivered status reports harmless.
    pub async fn apply_status(
        &self,
        change: &StatusChange,
        notify: impl Fn(CommandStatus) -> bool,
    ) -> Result<Applied, StoreError> {
        let mut outcomes = self
            .apply_statuses(std::slice::from_ref(change), notify)
            .await?;
        Ok(outcomes.pop().unwrap_or(Applied::NotFound))
    }

    /// Applies several changes like [`Store::apply_status`], in one
    /// transaction, and returns their outcomes in the order of `changes`.
    /// Changes to one command apply in their order in `changes`. If any
    /// write fails, none is stored.
    ///
    /// The transaction takes a fixed number of statements whatever the
    /// number of changes. It reads every command involved once, locking the
    /// rows in id order on PostgreSQL so that concurrent batches cannot
    /// deadlock. It updates the moved commands in one statement and inserts
    /// their transitions in one; due postbacks add one count and one insert.
    pub async fn apply_statuses(
        &self,
        changes: &[StatusChange],
        notify: impl Fn(CommandStatus) -> bool,
    ) -> Result<Vec<Applied>, StoreError> {
        let (outcomes, _) = self.apply_statuses_leased(changes, notify, None).await?;
        Ok(outcomes)
    }

    /// Applies changes like [`Store::apply_statuses`] and, when
    /// `lease_until` is set, creates their postback deliveries already
    /// leased until then and returns them with their bodies, so that this
    /// process can send them without reading them back. A delivery this
    /// process does not send in time is sent by any sender once the lease
    /// ends.
    pub async fn apply_statuses_leased(
        &self,
        changes: &[StatusChange],
        notify: impl Fn(CommandStatus) -> bool,
        lease_until: Option<Millis>,
    ) -> Result<(Vec<Applied>, Vec<(DuePostback, String)>), StoreError> {
        if changes.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut ids: Vec<Uuid> = changes.iter().map(|change| change.command_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        let mut commands = self.lock_commands(&mut tx, &ids).await?;

        let mut outcomes = Vec::with_capacity(changes.len());
        let mut transitions = Vec::new();
        let mut postbacks = Vec::new();
        // Transitions each command gains in this batch, which numbers its
        // postbacks after the ones it had.
        let mut gained: HashMap<Uuid, i64> = HashMap::new();
        for change in changes {
            let Some(command) = commands.get_mut(&change.command_id) else {
                outcomes.push(Applied::NotFound);
                continue;
            };
            if let Some(expected) = &change.expected_device
                && *expected != command.device_id
            {
                outcomes.push(Applied::WrongDevice {
                    actual: command.device_id.clone(),
                });
                continue;
            }
            if !command.status.can_move_to(change.status) {
                outcomes.push(Applied::Ignored {
                    current: command.status,
                });
                continue;
            }
            move_in_memory(command, change);
            transitions.push(change);
            let count = gained.entry(command.id).or_default();
            *count += 1;
            if let Some(url) = &command.postback_uri
                && notify(change.status)
            {
                postbacks.push(NewPostback {
                    id: Uuid::now_v7(),
                    command_id: command.id,
                    url: url.clone(),
                    body: command.to_json(None),
                    sequence: *count,
                    at: change.at,
                    lease_until,
                });
            }
            outcomes.push(Applied::Moved(Box::new(command.clone())));
        }

        if !transitions.is_empty() {
            if !postbacks.is_empty() {
                let mut posted: Vec<Uuid> = postbacks.iter().map(|p| p.command_id).collect();
                posted.sort_unstable();
                posted.dedup();
                let before = transition_counts(&mut tx, &posted).await?;
                for postback in &mut postbacks {
                    postback.sequence += before.get(&postback.command_id).copied().unwrap_or(0);
                }
            }
            let moved: Vec<&Command> = ids
                .iter()
                .filter(|id| gained.contains_key(id))
                .filter_map(|id| commands.get(id))
                .collect();
            update_commands(&mut tx, &moved).await?;
            insert_transitions(&mut tx, &transitions).await?;
            insert_postbacks(&mut tx, &postbacks).await?;
        }
        tx.commit().await?;
        let leased = match lease_until {
            Some(_) => postbacks
                .into_iter()
                .map(|postback| {
                    let due = DuePostback {
                        id: postback.id,
                        command_id: postback.command_id,
                        url: postback.url,
                        sequence: postback.sequence,
                        attempts: 0,
                    };
                    (due, postback.body)
                })
                .collect(),
            None => Vec::new(),
        };
        Ok((outcomes, leased))
    }

    /// Reads the commands with `ids` inside `tx`, locking their rows in id
    /// order on PostgreSQL; on SQLite the single writer connection already
    /// orders writers.
    async fn lock_commands(
        &self,
        tx: &mut Transaction<'_, Any>,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Command>, StoreError> {
        let mut commands = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(super::MAX_ROWS_PER_STATEMENT) {
            let lock = match self.backend {
                Backend::Postgres => " FOR UPDATE",
                Backend::Sqlite => "",
            };
            let sql = format!(
                "SELECT {} FROM commands c WHERE c.id IN ({}) ORDER BY c.id{lock}",
                command_columns!(),
                super::placeholders(1, chunk.len(), 1)
            );
            let mut query = super::dynamic_query(sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            for row in query.fetch_all(&mut **tx).await? {
                let command = command_from_row(&row)?;
                commands.insert(command.id, command);
            }
        }
        Ok(commands)
    }

    /// Reads a command inside `tx`, locking its row on PostgreSQL so that
    /// concurrent writers of one command take turns; on SQLite the single
    /// writer connection already makes them.
    pub(super) async fn lock_command(
        &self,
        tx: &mut Transaction<'_, Any>,
        id: Uuid,
    ) -> Result<Option<Command>, StoreError> {
        let select = match self.backend {
            Backend::Postgres => concat!(
                "SELECT ",
                command_columns!(),
                " FROM commands c WHERE c.id = $1 FOR UPDATE"
            ),
            Backend::Sqlite => concat!(
                "SELECT ",
                command_columns!(),
                " FROM commands c WHERE c.id = $1"
            ),
        };
        let row = sqlx::query(select)
            .bind(id.to_string())
            .fetch_optional(&mut **tx)
            .await?;
        row.as_ref().map(command_from_row).transpose()
    }

    /// Writes an allowed move of `command` and its transition, and the
    /// postback delivery when `notify` returns true for this status.
    pub(super) async fn move_command(
        tx: &mut Transaction<'_, Any>,
        command: &mut Command,
        change: &StatusChange,
        notify: &impl Fn(CommandStatus) -> bool,
    ) -> Result<(), StoreError> {
        debug_assert!(command.status.can_move_to(change.status));
        move_in_memory(command, change);
        update_commands(tx, &[&*command]).await?;
        insert_transitions(tx, &[change]).await?;
        if let Some(url) = command.postback_uri.clone()
            && notify(change.status)
        {
            let sequence = transition_count(tx, command.id).await?;
            Self::insert_postback(tx, command, &url, sequence, change.at).await?;
        }
        Ok(())
    }

    /// Returns every transition of a command, oldest first.
    pub async fn transitions(&self, id: Uuid) -> Result<Vec<Transition>, StoreError> {
        let rows = sqlx::query(
            "SELECT status, at, source, error FROM command_transitions WHERE command_id = $1 ORDER BY id",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| {
                Ok(Transition {
                    status: parse_status(&row.try_get::<String, _>("status")?)?,
                    at: Millis(row.try_get("at")?),
                    source: row.try_get("source")?,
                    error: row.try_get("error")?,
                })
            })
            .collect()
    }

    /// Unfinished commands whose message already left the outbox, oldest
    /// first. The in-process broker loses its queues when the process stops,
    /// so the relay publishes these again at start.
    pub async fn unfinished_published_commands(&self) -> Result<Vec<Command>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            command_columns!(),
            " FROM commands c \
             WHERE c.status IN ('queued', 'sentToTarget', 'executing') \
             AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.command_id = c.id) \
             ORDER BY c.created_at, c.id"
        ))
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.error(e))?;
        rows.iter().map(command_from_row).collect()
    }

    /// Ids of commands that have not started running and whose expiry is at
    /// or before `now`.
    pub async fn expired_command_ids(
        &self,
        now: Millis,
        limit: i64,
    ) -> Result<Vec<Uuid>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM commands WHERE status IN ('queued', 'sentToTarget') \
             AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
        )
        .bind(now.0)
        .bind(limit)
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                Uuid::parse_str(&id)
                    .map_err(|e| StoreError::Corrupt(format!("command id {id:?}: {e}")))
            })
            .collect()
    }
}

/// Returns how many transitions a command has, which numbers its postbacks.
pub(super) async fn transition_count(
    tx: &mut Transaction<'_, Any>,
    id: Uuid,
) -> Result<i64, StoreError> {
    let count = sqlx::query("SELECT COUNT(*) AS n FROM command_transitions WHERE command_id = $1")
        .bind(id.to_string())
        .fetch_one(&mut **tx)
        .await?
        .try_get("n")?;
    Ok(count)
}

/// Moves `command` to the status of `change` in memory: status, time, and
/// the `Error` and `ResponsePayload` the change carries.
fn move_in_memory(command: &mut Command, change: &StatusChange) {
    command.status = change.status;
    command.last_action_at = change.at;
    if change.error.is_some() {
        command.error.clone_from(&change.error);
    }
    if change.response_payload.is_some() {
        command
            .response_payload
            .clone_from(&change.response_payload);
    }
}

/// A postback delivery to create for a transition.
struct NewPostback {
    id: Uuid,
    command_id: Uuid,
    url: String,
    body: String,
    sequence: i64,
    at: Millis,
    lease_until: Option<Millis>,
}

/// Writes the status, `Error`, `ResponsePayload` and time of each command.
async fn update_commands(
    tx: &mut Transaction<'_, Any>,
    commands: &[&Command],
) -> Result<(), StoreError> {
    for chunk in commands.chunks(super::MAX_ROWS_PER_STATEMENT) {
        // Both SQLite and PostgreSQL name the columns of a VALUES list
        // column1, column2, and so on.
        let sql = format!(
            "UPDATE commands SET status = v.column2, error = v.column3, \
             response_payload = v.column4, last_action_at = v.column5 \
             FROM (VALUES {}) AS v WHERE commands.id = v.column1",
            super::placeholders(1, chunk.len(), 5)
        );
        let mut query = super::dynamic_query(sql);
        for command in chunk {
            query = query
                .bind(command.id.to_string())
                .bind(command.status.as_str())
                .bind(command.error.clone())
                .bind(command.response_payload.clone())
                .bind(command.last_action_at.0);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Records each change as a transition of its command, in the order given.
async fn insert_transitions(
    tx: &mut Transaction<'_, Any>,
    changes: &[&StatusChange],
) -> Result<(), StoreError> {
    for chunk in changes.chunks(super::MAX_ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO command_transitions (command_id, status, at, source, error) VALUES {}",
            super::placeholders(1, chunk.len(), 5)
        );
        let mut query = super::dynamic_query(sql);
        for change in chunk {
            query = query
                .bind(change.command_id.to_string())
                .bind(change.status.as_str())
                .bind(change.at.0)
                .bind(change.source.clone())
                .bind(change.error.clone());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Returns how many transitions each of the commands has.
async fn transition_counts(
    tx: &mut Transaction<'_, Any>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, i64>, StoreError> {
    let mut counts = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(super::MAX_ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT command_id, COUNT(*) AS n FROM command_transitions \
             WHERE command_id IN ({}) GROUP BY command_id",
            super::placeholders(1, chunk.len(), 1)
        );
        let mut query = super::dynamic_query(sql);
        for id in chunk {
            query = query.bind(id.to_string());
        }
        for row in query.fetch_all(&mut **tx).await? {
            let id: String = row.try_get("command_id")?;
            let id = Uuid::parse_str(&id)
                .map_err(|e| StoreError::Corrupt(format!("command id {id:?}: {e}")))?;
            counts.insert(id, row.try_get("n")?);
        }
    }
    Ok(counts)
}

async fn insert_postbacks(
    tx: &mut Transaction<'_, Any>,
    postbacks: &[NewPostback],
) -> Result<(), StoreError> {
    for chunk in postbacks.chunks(super::MAX_ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO postbacks (id, command_id, url, body, sequence, state, attempts, \
             next_attempt_at, created_at, lease_until) VALUES {}",
            super::placeholders(1, chunk.len(), 10)
        );
        let mut query = super::dynamic_query(sql);
        for postback in chunk {
            query = query
                .bind(postback.id.to_string())
                .bind(postback.command_id.to_string())
                .bind(postback.url.clone())
                .bind(postback.body.clone())
                .bind(postback.sequence)
                .bind(super::PENDING)
                .bind(0_i64)
                .bind(postback.at.0)
                .bind(postback.at.0)
                .bind(postback.lease_until.map(|m| m.0));
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// A new `queued` command made from a validated request at `now`.
pub(super) fn new_queued_command(new: NewCommand, now: Millis) -> Command {
    Command {
        // Version 7 ids sort by creation time, which keeps indexes
        // append-mostly and gives listings a stable tie-break.
        id: Uuid::now_v7(),
        device_id: new.device_id,
        owner: new.owner,
        status: CommandStatus::Queued,
        command_type: new.command_type,
        app_service_name: new.app_service_name,
        package_family_name: new.package_family_name,
        error: None,
        payload: new.payload,
        response_payload: None,
        permission_ticket: new.permission_ticket,
        postback_uri: new.postback_uri,
        created_at: now,
        last_action_at: now,
        expires_at: new.expires_at,
    }
}

/// Inserts `command`, its first transition and its outbox row.
pub(super) async fn insert_command_rows(
    tx: &mut Transaction<'_, Any>,
    command: &Command,
) -> Result<(), StoreError> {
    insert_commands_rows(tx, std::slice::from_ref(command)).await
}

/// Inserts new `queued` commands, their first transitions and their outbox
/// rows, three statements for every [`super::MAX_ROWS_PER_STATEMENT`]
/// commands. The outbox rows follow the order of `commands`.
pub(super) async fn insert_commands_rows(
    tx: &mut Transaction<'_, Any>,
    commands: &[Command],
) -> Result<(), StoreError> {
    for chunk in commands.chunks(super::MAX_ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO commands (id, device_id, owner, status, command_type, app_service_name, \
             package_family_name, payload, permission_ticket, postback_uri, created_at, \
             last_action_at, expires_at) VALUES {}",
            super::placeholders(1, chunk.len(), 13)
        );
        let mut query = super::dynamic_query(sql);
        for command in chunk {
            query = query
                .bind(command.id.to_string())
                .bind(command.device_id.as_str().to_owned())
                .bind(command.owner.clone())
                .bind(command.status.as_str())
                .bind(command.command_type.as_str())
                .bind(command.app_service_name.clone())
                .bind(command.package_family_name.clone())
                .bind(command.payload.clone())
                .bind(command.permission_ticket.clone())
                .bind(command.postback_uri.clone())
                .bind(command.created_at.0)
                .bind(command.last_action_at.0)
                .bind(command.expires_at.map(|m| m.0));
        }
        query.execute(&mut **tx).await?;

        let sql = format!(
            "INSERT INTO command_transitions (command_id, status, at, source, error) VALUES {}",
            super::placeholders(1, chunk.len(), 5)
        );
        let mut query = super::dynamic_query(sql);
        for command in chunk {
            query = query
                .bind(command.id.to_string())
                .bind(CommandStatus::Queued.as_str())
                .bind(command.created_at.0)
                .bind("api")
                .bind(None::<String>);
        }
        query.execute(&mut **tx).await?;

        let sql = format!(
            "INSERT INTO outbox (command_id, device_id, available_at) VALUES {}",
            super::placeholders(1, chunk.len(), 3)
        );
        let mut query = super::dynamic_query(sql);
        for command in chunk {
            query = query
                .bind(command.id.to_string())
                .bind(command.device_id.as_str().to_owned())
                .bind(command.created_at.0);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{echo_command, sqlite_store};

    async fn queued(store: &Store, device: &str) -> Command {
        let new = echo_command(device, None, Some("http://127.0.0.1:9/hooks"));
        store.insert_command(new).await.unwrap()
    }

    fn change(command: &Command, status: CommandStatus, device: &str) -> StatusChange {
        StatusChange {
            command_id: command.id,
            status,
            error: None,
            response_payload: Some(format!("\"{status}\"")),
            source: format!("agent:{device}"),
            expected_device: Some(DeviceId::parse(device).unwrap()),
            at: Millis::now(),
        }
    }

    #[tokio::test]
    async fn batch_applies_changes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        let first = queued(&store, "d1").await;
        let second = queued(&store, "d2").await;
        let missing = Command {
            id: Uuid::now_v7(),
            ..first.clone()
        };
        // The second command's changes come first and the first command's are
        // interleaved, as reports of two devices arrive in one batch.
        let changes = [
            change(&second, CommandStatus::SentToTarget, "d2"),
            change(&first, CommandStatus::SentToTarget, "d1"),
            change(&second, CommandStatus::Executing, "d2"),
            change(&first, CommandStatus::Executing, "d1"),
            change(&first, CommandStatus::Completed, "d1"),
            change(&first, CommandStatus::Executing, "d1"),
            change(&second, CommandStatus::Completed, "d1"),
            change(&missing, CommandStatus::Completed, "d1"),
        ];
        let outcomes = store
            .apply_statuses(&changes, |s| s.is_final())
            .await
            .unwrap();
        let summary: Vec<String> = outcomes
            .iter()
            .map(|outcome| match outcome {
                Applied::Moved(command) => format!("moved to {}", command.status),
                Applied::Ignored { current } => format!("ignored at {current}"),
                Applied::WrongDevice { actual } => format!("wrong device, is {actual}"),
                Applied::NotFound => "not found".into(),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "moved to sentToTarget",
                "moved to sentToTarget",
                "moved to executing",
                "moved to executing",
                "moved to completed",
                "ignored at completed",
                "wrong device, is d2",
                "not found",
            ]
        );

        let statuses = |transitions: Vec<Transition>| -> Vec<String> {
            transitions.iter().map(|t| t.status.to_string()).collect()
        };
        assert_eq!(
            statuses(store.transitions(first.id).await.unwrap()),
            ["queued", "sentToTarget", "executing", "completed"]
        );
        assert_eq!(
            statuses(store.transitions(second.id).await.unwrap()),
            ["queued", "sentToTarget", "executing"]
        );
        let stored = store.get_command(first.id).await.unwrap().unwrap();
        assert_eq!(stored.response_payload.as_deref(), Some("\"completed\""));
        // Only the final status posts back, numbered by its transition.
        let postbacks = store.postbacks_of(first.id).await.unwrap();
        assert_eq!(postbacks.len(), 1);
        assert_eq!(postbacks[0].sequence, 4);
        assert!(store.postbacks_of(second.id).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn empty_batch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        let outcomes = store.apply_statuses(&[], |_| true).await.unwrap();
        assert!(outcomes.is_empty());
    }
}
