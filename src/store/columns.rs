//! Rows read by column position, whichever driver read them.
//!
//! Most reads go through sqlx. On SQLite, pages of executions and the
//! polled one-row reads do not (see `sqlite::RowReaders`): sqlx runs each
//! statement on its connection's thread and copies every value of every
//! row before handing the row across, and those copies and hand-offs cost
//! more than the statements. A record that both backends build is mapped
//! once, here, from [`Columns`], which rows of either driver provide.

use std::collections::BTreeMap;

use super::execution_rows::ExecutionRow;
use super::{Campaign, Counters, ExecutionRecord, RunSnapshot, StoreError, StoreResult};
use crate::domain::{CampaignStatus, Channel};

/// A row's values by position, borrowed where the driver allows it.
pub trait Columns {
    fn int(&self, at: usize) -> StoreResult<i64>;
    fn opt_int(&self, at: usize) -> StoreResult<Option<i64>>;
    fn text(&self, at: usize) -> StoreResult<&str>;
    fn opt_text(&self, at: usize) -> StoreResult<Option<&str>>;
}

/// What reads rows with either driver (each dialect's `Reader`).
pub trait ReadRows {
    /// Hands each row of a statement with `?` placeholders to `row`, borrowed.
    fn each_row(
        &mut self,
        sql: &str,
        params: Vec<Param>,
        row: &mut dyn FnMut(&dyn Columns) -> StoreResult<()>,
    ) -> StoreResult<()>;

    /// Records of a statement with `?` placeholders.
    fn rows<T: FromColumns>(&mut self, sql: &str, params: Vec<Param>) -> StoreResult<Vec<T>> {
        let mut records = Vec::new();
        self.each_row(sql, params, &mut |row| {
            records.push(T::from_columns(row)?);
            Ok(())
        })?;
        Ok(records)
    }
}

/// A record read from a row, by position.
pub trait FromColumns: Sized + Send + 'static {
    fn from_columns(row: &dyn Columns) -> StoreResult<Self>;
}

/// A single integer column.
impl FromColumns for i64 {
    fn from_columns(row: &dyn Columns) -> StoreResult<Self> {
        row.int(0)
    }
}

/// A campaign's id and its workspace's.
impl FromColumns for (i64, i64) {
    fn from_columns(row: &dyn Columns) -> StoreResult<Self> {
        Ok((row.int(0)?, row.int(1)?))
    }
}

/// A run's id and its frozen settings (none before it is frozen).
impl FromColumns for (i64, Option<RunSnapshot>) {
    fn from_columns(row: &dyn Columns) -> StoreResult<Self> {
        Ok((row.int(0)?, snapshot_from(row.opt_text(1)?)?))
    }
}

/// A run's frozen settings, stored as JSON.
pub fn snapshot_from(raw: Option<&str>) -> StoreResult<Option<RunSnapshot>> {
    raw.map(serde_json::from_str)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("snapshot: {e}")))
}

/// What [`campaign_from_columns`] reads, in its order: first in every
/// statement that reads a campaign, so the columns after it are numbered
/// from [`CAMPAIGN_COLUMN_COUNT`].
pub const CAMPAIGN_COLUMNS: &str = "id, uuid, workspace_id, name, channel, template, sender, \
    provider, max_attempts, status, start_at, contact_count, created_at, updated_at, \
    started_at, completed_at";

/// How many columns [`CAMPAIGN_COLUMNS`] names, counted from it so the two
/// cannot disagree.
pub const CAMPAIGN_COLUMN_COUNT: usize = column_count(CAMPAIGN_COLUMNS);

/// The names in a comma-separated column list.
const fn column_count(columns: &str) -> usize {
    let bytes = columns.as_bytes();
    let (mut count, mut at) = (1, 0);
    while at < bytes.len() {
        if bytes[at] == b',' {
            count += 1;
        }
        at += 1;
    }
    count
}

/// A campaign from a row that starts with [`CAMPAIGN_COLUMNS`].
pub fn campaign_from_columns(row: &dyn Columns) -> StoreResult<Campaign> {
    let channel = row.text(4)?;
    let provider = row.text(7)?;
    let status = row.text(9)?;
    Ok(Campaign {
        id: row.int(0)?,
        uuid: row.text(1)?.to_owned(),
        workspace_id: row.int(2)?,
        name: row.text(3)?.to_owned(),
        channel: Channel::parse(channel)
            .ok_or_else(|| StoreError::Corrupt(format!("channel '{channel}'")))?,
        template: row.opt_text(5)?.map(str::to_owned),
        sender: row.opt_text(6)?.map(str::to_owned),
        provider: serde_json::from_str(provider)
            .map_err(|e| StoreError::Corrupt(format!("provider: {e}")))?,
        max_attempts: row.int(8)? as u8,
        status: CampaignStatus::parse(status)
            .ok_or_else(|| StoreError::Corrupt(format!("status '{status}'")))?,
        start_at: row.opt_int(10)?,
        contact_count: row.int(11)?,
        created_at: row.int(12)?,
        updated_at: row.int(13)?,
        started_at: row.opt_int(14)?,
        completed_at: row.opt_int(15)?,
    })
}

/// A run's counters from eight columns from `at`: total, pending,
/// processing, sent, failed, skipped, delivered, failed_delivery.
pub fn counters_from_columns(row: &dyn Columns, at: usize) -> StoreResult<Counters> {
    Ok(Counters {
        total: row.int(at)?,
        pending: row.int(at + 1)?,
        processing: row.int(at + 2)?,
        sent: row.int(at + 3)?,
        failed: row.int(at + 4)?,
        skipped: row.int(at + 5)?,
        delivered: row.int(at + 6)?,
        failed_delivery: row.int(at + 7)?,
    })
}

/// What [`ExecutionRow::from_columns`] reads, in its order. A page
/// copies every column of every row it selects, so it selects no more
/// than the record holds.
pub const EXECUTION_COLUMNS: &str = "id, run_id, batch_sequence, contact_id, phone, name, \
    variables, status, message_status, attempts, provider_message_id, duration_seconds, \
    error_details, retry_reason, executed_at, delivered_at";

/// A value bound to a statement that a driver other than sqlx may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Int(i64),
    Text(String),
}

/// A contact's or execution's template variables, stored as a JSON object.
pub fn variables_from(raw: &str) -> StoreResult<BTreeMap<String, String>> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("variables: {e}")))
}

impl FromColumns for ExecutionRecord {
    fn from_columns(row: &dyn Columns) -> StoreResult<Self> {
        ExecutionRow::from_columns(row)?.to_record()
    }
}

/// Rows read by sqlx, Postgres' and SQLite's (positions as `try_get` takes them).
macro_rules! sqlx_columns {
    ($($row:ty),*) => {$(
        impl Columns for $row {
            fn int(&self, at: usize) -> StoreResult<i64> {
                Ok(sqlx::Row::try_get(self, at)?)
            }
            fn opt_int(&self, at: usize) -> StoreResult<Option<i64>> {
                Ok(sqlx::Row::try_get(self, at)?)
            }
            fn text(&self, at: usize) -> StoreResult<&str> {
                Ok(sqlx::Row::try_get(self, at)?)
            }
            fn opt_text(&self, at: usize) -> StoreResult<Option<&str>> {
                Ok(sqlx::Row::try_get(self, at)?)
            }
        }
    )*};
}
sqlx_columns!(sqlx::postgres::PgRow, sqlx::sqlite::SqliteRow);

/// SQLite rows, read by rusqlite.
impl Columns for rusqlite::Row<'_> {
    fn int(&self, at: usize) -> StoreResult<i64> {
        Ok(self.get_ref(at)?.as_i64()?)
    }
    fn opt_int(&self, at: usize) -> StoreResult<Option<i64>> {
        Ok(self.get_ref(at)?.as_i64_or_null()?)
    }
    fn text(&self, at: usize) -> StoreResult<&str> {
        Ok(self.get_ref(at)?.as_str()?)
    }
    fn opt_text(&self, at: usize) -> StoreResult<Option<&str>> {
        Ok(self.get_ref(at)?.as_str_or_null()?)
    }
}

impl From<rusqlite::types::FromSqlError> for StoreError {
    fn from(error: rusqlite::types::FromSqlError) -> Self {
        StoreError::Corrupt(error.to_string())
    }
}

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(match self {
            Param::Int(value) => (*value).into(),
            Param::Text(value) => value.as_str().into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_campaign_columns_are_the_sixteen_campaign_from_columns_reads() {
        // `campaign_from_columns` reads positions 0 to 15; the columns that
        // follow a campaign in a row are numbered from this count.
        assert_eq!(CAMPAIGN_COLUMN_COUNT, 16);
        assert_eq!(column_count("a"), 1);
        assert_eq!(column_count("a, b,c"), 3);
    }
}
