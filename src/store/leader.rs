//! Which process runs the outbox relay. Several `serve` processes may share
//! one PostgreSQL database; if two relays published at once, a device could
//! receive its commands out of order, so exactly one relay is active.

use std::future::pending;

use sqlx::postgres::PgListener;
use sqlx::{AnyConnection, Connection, Row};

use super::{Backend, Store, StoreError};

/// PostgreSQL channel on which each outbox insert is announced, so that the
/// active relay in any process publishes at once.
pub const OUTBOX_CHANNEL: &str = "dispatcher_outbox";

/// Key of the session advisory lock held by the active relay. Advisory locks
/// are scoped to one database, so deployments in other databases do not
/// contend. The value spells "dispatch" in ASCII.
const RELAY_LOCK_KEY: i64 = 0x6469_7370_6174_6368;

/// The right to run the relay: on SQLite always held (one process owns the
/// file), on PostgreSQL an advisory lock held by a connection of its own,
/// released by the server as soon as that connection or its process dies.
pub struct RelayLeadership {
    lock: Option<AnyConnection>,
    listener: Option<PgListener>,
}

impl Store {
    /// Tries to become the active relay; `None` means another process is.
    pub async fn try_lead_relay(&self) -> Result<Option<RelayLeadership>, StoreError> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(RelayLeadership {
                lock: None,
                listener: None,
            }));
        }
        let mut connection = AnyConnection::connect(&self.url).await?;
        let held: i64 = sqlx::query(
            "SELECT CASE WHEN pg_try_advisory_lock($1) THEN 1 ELSE 0 END::bigint AS held",
        )
        .bind(RELAY_LOCK_KEY)
        .fetch_one(&mut connection)
        .await?
        .try_get("held")?;
        if held == 0 {
            let _ = connection.close().await;
            return Ok(None);
        }
        let mut listener = PgListener::connect(&self.url).await?;
        listener.listen(OUTBOX_CHANNEL).await?;
        Ok(Some(RelayLeadership {
            lock: Some(connection),
            listener: Some(listener),
        }))
    }

    /// Announces an outbox insert to the relays of every process; PostgreSQL
    /// delivers it when `tx` commits. Nothing to do on SQLite.
    pub(super) async fn notify_outbox(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(OUTBOX_CHANNEL)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

impl RelayLeadership {
    /// Checks that the lock is still held, which is as long as its connection responds.
    pub async fn still_held(&mut self) -> bool {
        match &mut self.lock {
            None => true,
            Some(connection) => connection.ping().await.is_ok(),
        }
    }

    /// Waits for an outbox insert announced by any process. Never returns on
    /// SQLite, where the local wake-up is the only one; after a listener
    /// error it waits no more, and the relay's poll takes over.
    pub async fn notified(&mut self) {
        let Some(listener) = &mut self.listener else {
            return pending().await;
        };
        if let Err(error) = listener.recv().await {
            tracing::warn!(%error, "outbox notifications stopped; falling back to polling");
            self.listener = None;
            pending::<()>().await;
        }
    }
}
