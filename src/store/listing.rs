//! Listing commands newest first with keyset paging.

use uuid::Uuid;

use super::{Store, StoreError, command_from_row};
use crate::command::{Command, Millis};
use crate::domain::{CommandStatus, DeviceId};

/// Conditions every listing applies. The statuses take eight parameters so
/// that the SQL stays a literal; unused ones repeat a chosen status.
macro_rules! list_conditions {
    () => {
        "c.status IN ($1, $2, $3, $4, $5, $6, $7, $8) \
         AND c.created_at > $9 AND c.created_at < $10 \
         AND (c.created_at < $11 OR (c.created_at = $11 AND c.id < $12))"
    };
}

macro_rules! list_order {
    () => {
        " ORDER BY c.created_at DESC, c.id DESC LIMIT $13"
    };
}

/// Set of commands a listing may return.
#[derive(Clone, Debug)]
pub enum ListScope {
    All,
    Device(DeviceId),
    /// Commands of the device created by `owner`.
    OwnDevice {
        device: DeviceId,
        owner: String,
    },
}

/// The last row of a page; the next page starts after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: Millis,
    pub id: Uuid,
}

/// One page request of a listing.
#[derive(Clone, Debug)]
pub struct ListQuery {
    pub scope: ListScope,
    /// Statuses to return; at least one, at most every status.
    pub statuses: Vec<CommandStatus>,
    /// Only commands created strictly after this time.
    pub created_after: Option<Millis>,
    /// Only commands created strictly before this time.
    pub created_before: Option<Millis>,
    /// Only commands after this row in newest-first order.
    pub after: Option<Cursor>,
    pub limit: u32,
}

impl Store {
    /// Commands matching `query`, newest first (`created_at` descending,
    /// then id descending), at most `query.limit` of them.
    pub async fn list_commands(&self, query: &ListQuery) -> Result<Vec<Command>, StoreError> {
        let Some(first_status) = query.statuses.first() else {
            return Ok(Vec::new());
        };
        let sql = match query.scope {
            ListScope::All => concat!(
                "SELECT ",
                command_columns!(),
                " FROM commands c WHERE ",
                list_conditions!(),
                list_order!()
            ),
            ListScope::Device(_) => concat!(
                "SELECT ",
                command_columns!(),
                " FROM commands c WHERE c.device_id = $14 AND ",
                list_conditions!(),
                list_order!()
            ),
            ListScope::OwnDevice { .. } => concat!(
                "SELECT ",
                command_columns!(),
                " FROM commands c WHERE c.device_id = $14 AND c.owner = $15 AND ",
                list_conditions!(),
                list_order!()
            ),
        };

        let mut statement = sqlx::query(sql);
        for slot in 0..CommandStatus::ALL.len() {
            let status = query.statuses.get(slot).unwrap_or(first_status);
            statement = statement.bind(status.as_str());
        }
        let (before_time, before_id) = match &query.after {
            Some(cursor) => (cursor.created_at.0, cursor.id.to_string()),
            // Every stored time is below i64::MAX, so no row is cut off.
            None => (i64::MAX, String::new()),
        };
        statement = statement
            .bind(query.created_after.map_or(i64::MIN, |at| at.0))
            .bind(query.created_before.map_or(i64::MAX, |at| at.0))
            .bind(before_time)
            .bind(before_id)
            .bind(i64::from(query.limit));
        statement = match &query.scope {
            ListScope::All => statement,
            ListScope::Device(device) => statement.bind(device.as_str().to_owned()),
            ListScope::OwnDevice { device, owner } => statement
                .bind(device.as_str().to_owned())
                .bind(owner.clone()),
        };

        let rows = statement
            .fetch_all(&self.reader)
            .await
            .map_err(|e| self.error(e))?;
        rows.iter().map(command_from_row).collect()
    }
}
