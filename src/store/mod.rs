//! Persistence through sqlx, on SQLite (the embedded default) or PostgreSQL.
//!
//! Queries go through `sqlx::Any` with `$N` placeholders, which both drivers
//! accept, so one set of statements serves both databases. Migrations differ
//! only in dialect and live in `migrations/sqlite` and `migrations/postgres`.

/// The `commands` columns that [`command_from_row`] reads, for a table
/// aliased `c`. A macro rather than a constant so that queries stay string
/// literals, which is what sqlx accepts without an injection audit.
macro_rules! command_columns {
    () => {
        "c.id, c.device_id, c.owner, c.status, c.command_type, c.app_service_name, \
         c.package_family_name, c.error, c.payload, c.response_payload, c.permission_ticket, \
         c.postback_uri, c.created_at, c.last_action_at, c.expires_at"
    };
}

mod cancel;
mod commands;
mod create;
mod leader;
mod listing;
mod outbox;
mod postbacks;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Connection, Row};
use uuid::Uuid;

pub use cancel::{CancelOutcome, OUTBOX_CANCEL, OUTBOX_COMMAND};
pub use commands::{Applied, StatusChange, Transition};
pub use create::{CreateOptions, Created, IdempotencyRecord};
pub use leader::{OUTBOX_CHANNEL, RelayLeadership};
pub use listing::{Cursor, ListQuery, ListScope};
pub use outbox::OutboxItem;
pub use postbacks::{
    AttemptRecord, DELIVERED, DuePostback, FAILED, FinishedAttempt, PENDING, PostbackRecord,
};

use crate::command::{Command, Millis};
use crate::domain::{CommandStatus, CommandType, DeviceId};

/// The database kind that the URL selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Every pooled connection stayed busy for the whole acquire timeout.
    #[error("database is busy: no connection became free within {0:?}")]
    Exhausted(Duration),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored row is invalid: {0}")]
    Corrupt(String),
    /// The store was closed while the request waited.
    #[error("the store is closed")]
    Closed,
}

/// Pool sizes and timeouts.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Connections for reads; on PostgreSQL also for writes.
    pub max_connections: u32,
    /// How long a request waits for a free connection before it fails.
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    /// Takes every write. On SQLite it has a single connection, because
    /// SQLite allows one writer at a time and a queue in the pool is fairer
    /// and faster than `database is locked` retries; on PostgreSQL it is
    /// the same pool as `reader`.
    writer: AnyPool,
    reader: AnyPool,
    acquire_timeout: Duration,
    /// Kept for connections outside the pools: the relay's leadership lock
    /// and its `LISTEN` connection on PostgreSQL.
    url: Arc<str>,
    /// On SQLite, where one connection takes every write, creates without
    /// an idempotency key go to a task that stores the creates waiting
    /// together in one transaction.
    creates: Option<create::CreateQueue>,
}

impl Store {
    /// Opens the database at `url` and runs the embedded migrations.
    pub async fn connect(url: &str, settings: &PoolSettings) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            anyhow::bail!(
                "database URL must start with sqlite: or postgres:, got {:?}",
                url.split(':').next().unwrap_or_default()
            );
        };

        // Migrations run on a connection of their own before the pools open,
        // so that a short acquire timeout meant for requests cannot fail the
        // start, and a wrong URL fails here with a clear error.
        migrate(url, backend).await?;

        let store = match backend {
            Backend::Sqlite => {
                let writer = sqlite_pool(url, 1, settings.acquire_timeout)?;
                let reader = sqlite_pool(url, settings.max_connections, settings.acquire_timeout)?;
                let store = Self {
                    backend,
                    writer,
                    reader,
                    acquire_timeout: settings.acquire_timeout,
                    url: url.into(),
                    creates: None,
                };
                Self {
                    creates: Some(create::CreateQueue::start(store.clone())),
                    ..store
                }
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(settings.max_connections)
                    .acquire_timeout(settings.acquire_timeout)
                    .connect_lazy(url)?;
                Self {
                    backend,
                    writer: pool.clone(),
                    reader: pool,
                    acquire_timeout: settings.acquire_timeout,
                    url: url.into(),
                    creates: None,
                }
            }
        };
        Ok(store)
    }

    /// Builds the URL of the default SQLite file inside `data_dir`.
    pub fn default_sqlite_url(data_dir: &Path) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("dispatcher.sqlite").display()
        )
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database runs a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(|error| self.error(error))?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        match error {
            sqlx::Error::PoolTimedOut => StoreError::Exhausted(self.acquire_timeout),
            other => StoreError::Database(other),
        }
    }
}

async fn migrate(url: &str, backend: Backend) -> anyhow::Result<()> {
    let migrator = match backend {
        Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
        Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
    };
    let mut connection = AnyConnection::connect(url).await?;
    migrator.run(&mut connection).await?;
    connection.close().await?;
    Ok(())
}

fn sqlite_pool(url: &str, size: u32, acquire_timeout: Duration) -> anyhow::Result<AnyPool> {
    let pool = AnyPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(acquire_timeout)
        .after_connect(|connection, _| {
            Box::pin(async move {
                // WAL lets readers run beside the writer. NORMAL sync in WAL
                // mode loses no committed transaction when a process crashes;
                // only a power loss or OS crash can drop the last commits.
                // Each connection keeps a page cache of its own, 2 MiB by
                // default. The operating system caches the file anyway, so
                // 256 KiB each keeps the server's memory flat when a burst
                // brings every pooled connection into use.
                for pragma in [
                    "PRAGMA journal_mode = WAL",
                    "PRAGMA synchronous = NORMAL",
                    "PRAGMA busy_timeout = 10000",
                    "PRAGMA foreign_keys = ON",
                    "PRAGMA cache_size = -256",
                ] {
                    sqlx::query(pragma).execute(&mut *connection).await?;
                }
                Ok(())
            })
        })
        .connect_lazy(url)?;
    Ok(pool)
}

fn command_from_row(row: &AnyRow) -> Result<Command, StoreError> {
    let text = |name: &str| row.try_get::<String, _>(name).map_err(StoreError::from);
    let optional = |name: &str| {
        row.try_get::<Option<String>, _>(name)
            .map_err(StoreError::from)
    };
    let id = text("id")?;
    Ok(Command {
        id: Uuid::parse_str(&id)
            .map_err(|error| StoreError::Corrupt(format!("command id {id:?}: {error}")))?,
        device_id: DeviceId::parse(&text("device_id")?)
            .map_err(|error| StoreError::Corrupt(format!("command {id}: {error}")))?,
        owner: text("owner")?,
        status: parse_status(&text("status")?)?,
        command_type: CommandType::from_str(&text("command_type")?).map_err(StoreError::Corrupt)?,
        app_service_name: optional("app_service_name")?,
        package_family_name: optional("package_family_name")?,
        error: optional("error")?,
        payload: optional("payload")?,
        response_payload: optional("response_payload")?,
        permission_ticket: optional("permission_ticket")?,
        postback_uri: optional("postback_uri")?,
        created_at: Millis(row.try_get("created_at")?),
        last_action_at: Millis(row.try_get("last_action_at")?),
        expires_at: row.try_get::<Option<i64>, _>("expires_at")?.map(Millis),
    })
}

/// Most rows one multi-row statement names. With at most 13 values a row it
/// stays well below the bound parameters SQLite (32,766) and PostgreSQL
/// (65,535) allow.
const MAX_ROWS_PER_STATEMENT: usize = 500;

/// Builds a query whose text is made at run time from numbered placeholders only
/// (see [`placeholders`]). It is not kept in the connection's statement
/// cache: its text changes with the number of rows, and caching every
/// variant would grow each connection's memory for statements rarely used
/// again.
fn dynamic_query(sql: String) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false)
}

/// Numbered placeholders for `rows` rows of `columns` values each, starting
/// at `$first`: `($1, $2), ($3, $4)` for 2 rows of 2. With one column the
/// rows are a plain list, `$1, $2`, for `IN (…)`.
fn placeholders(first: usize, rows: usize, columns: usize) -> String {
    let mut text = String::with_capacity(rows * columns * 5);
    let mut next = first;
    for row in 0..rows {
        if row > 0 {
            text.push_str(", ");
        }
        if columns > 1 {
            text.push('(');
        }
        for column in 0..columns {
            if column > 0 {
                text.push_str(", ");
            }
            text.push('$');
            text.push_str(&next.to_string());
            next += 1;
        }
        if columns > 1 {
            text.push(')');
        }
    }
    text
}

fn parse_status(value: &str) -> Result<CommandStatus, StoreError> {
    CommandStatus::from_str(value).map_err(StoreError::Corrupt)
}

/// Helpers for the store's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{PoolSettings, Store};
    use crate::command::NewCommand;
    use crate::domain::{CommandType, DeviceId};

    /// Opens a new SQLite store in `dir`.
    pub async fn sqlite_store(dir: &tempfile::TempDir) -> Store {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("store.db").display()
        );
        Store::connect(&url, &PoolSettings::default())
            .await
            .unwrap()
    }

    /// Builds an `echo` command for `device` with the given `Payload` and
    /// `PostBackUri`.
    pub fn echo_command(
        device: &str,
        payload: Option<&str>,
        postback_uri: Option<&str>,
    ) -> NewCommand {
        NewCommand {
            device_id: DeviceId::parse(device).unwrap(),
            owner: "owner".into(),
            command_type: CommandType::AppService,
            app_service_name: Some("echo".into()),
            package_family_name: None,
            payload: payload.map(str::to_owned),
            permission_ticket: None,
            postback_uri: postback_uri.map(str::to_owned),
            expires_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::placeholders;

    #[test]
    fn placeholders_number_rows_and_lists() {
        assert_eq!(placeholders(1, 2, 2), "($1, $2), ($3, $4)");
        assert_eq!(placeholders(4, 3, 1), "$4, $5, $6");
        assert_eq!(placeholders(1, 1, 3), "($1, $2, $3)");
    }
}
