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
use super::{Campaign, Counters, ExecutionRecord, RunRecord, RunSnapshot, StoreError, StoreResult};
use crate::domain::{CampaignStatus, Channel, Recipients, RunStatus};

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

/// What a [`RunRecord`] is read from, in its order: first in every
/// statement that reads a run.
pub const RUN_COLUMNS: &str = "id, uuid, campaign_id, status, recipients, scheduled_at, \
    lease_owner, claimed_at, started_at, completed_at, snapshot, frozen_at, total, pending, \
    processing, sent, failed, skipped, delivered, failed_delivery, total_batches, \
    completed_batches, cost_units, reserved_credits, charged_credits, refunded_credits, \
    first_sent_at, last_sent_at, error, updated_at";

impl FromColumns for RunRecord {
    fn from_columns(row: &dyn Columns) -> StoreResult<Self> {
        let status = row.text(3)?;
        Ok(RunRecord {
            id: row.int(0)?,
            uuid: row.text(1)?.to_owned(),
            campaign_id: row.int(2)?,
            status: RunStatus::parse(status)
                .ok_or_else(|| StoreError::Corrupt(format!("run status '{status}'")))?,
            recipients: if row.text(4)? == "failed" {
                Recipients::Failed
            } else {
                Recipients::All
            },
            scheduled_at: row.int(5)?,
            lease_owner: row.opt_text(6)?.map(str::to_owned),
            claimed_at: row.opt_int(7)?,
            started_at: row.opt_int(8)?,
            completed_at: row.opt_int(9)?,
            snapshot: snapshot_from(row.opt_text(10)?)?,
            frozen_at: row.opt_int(11)?,
            counters: counters_from_columns(row, 12)?,
            total_batches: row.int(20)?,
            completed_batches: row.int(21)?,
            cost_units: row.int(22)?,
            reserved_credits: row.int(23)?,
            charged_credits: row.int(24)?,
            refunded_credits: row.int(25)?,
            first_sent_at: row.opt_int(26)?,
            last_sent_at: row.opt_int(27)?,
            error: row.opt_text(28)?.map(str::to_owned),
            updated_at: row.int(29)?,
        })
    }
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

    /// A row shaped as `runs` is, with each column's value given by name.
    fn run_row(overrides: &[(&str, &str)]) -> String {
        let value = |name: &str, i: usize| -> String {
            overrides
                .iter()
                .find(|(column, _)| *column == name)
                .map_or_else(|| (100 + i).to_string(), |(_, v)| (*v).to_owned())
        };
        let values: Vec<String> = RUN_COLUMNS
            .split(',')
            .map(str::trim)
            .enumerate()
            .map(|(i, name)| format!("{} AS {name}", value(name, i)))
            .collect();
        format!("SELECT {}", values.join(", "))
    }

    fn read_run(sql: &str) -> StoreResult<RunRecord> {
        let db = rusqlite::Connection::open_in_memory().expect("database");
        let mut statement = db.prepare(sql).expect("statement");
        let mut rows = statement.query([]).expect("rows");
        let row = rows.next().expect("step").expect("a row");
        RunRecord::from_columns(row)
    }

    #[test]
    fn a_run_is_read_from_the_run_columns_each_in_its_place() {
        let sql = run_row(&[
            ("uuid", "'run-uuid'"),
            ("status", "'running'"),
            ("recipients", "'failed'"),
            ("lease_owner", "NULL"),
            ("snapshot", "NULL"),
            ("error", "'provider down'"),
        ]);
        let run = read_run(&sql).expect("a run");
        assert_eq!(
            (run.id, run.uuid.as_str(), run.campaign_id),
            (100, "run-uuid", 102)
        );
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(run.recipients, Recipients::Failed);
        assert_eq!((run.lease_owner, run.snapshot.is_none()), (None, true));
        let c = run.counters;
        assert_eq!(
            [
                c.total,
                c.pending,
                c.processing,
                c.sent,
                c.failed,
                c.skipped
            ],
            [112, 113, 114, 115, 116, 117]
        );
        assert_eq!((c.delivered, c.failed_delivery), (118, 119));
        assert_eq!((run.total_batches, run.completed_batches), (120, 121));
        assert_eq!(
            [
                run.cost_units,
                run.reserved_credits,
                run.charged_credits,
                run.refunded_credits
            ],
            [122, 123, 124, 125]
        );
        assert_eq!(
            (run.first_sent_at, run.last_sent_at),
            (Some(126), Some(127))
        );
        assert_eq!(run.error.as_deref(), Some("provider down"));
        assert_eq!(run.updated_at, 129);
    }

    #[test]
    fn a_run_with_an_unknown_status_or_a_damaged_snapshot_is_corrupt() {
        let unknown = run_row(&[
            ("uuid", "'u'"),
            ("status", "'lost'"),
            ("recipients", "'all'"),
        ]);
        assert!(matches!(read_run(&unknown), Err(StoreError::Corrupt(m)) if m.contains("lost")));
        let damaged = run_row(&[
            ("uuid", "'u'"),
            ("status", "'running'"),
            ("recipients", "'all'"),
            ("lease_owner", "NULL"),
            ("snapshot", "'{not json'"),
        ]);
        assert!(
            matches!(read_run(&damaged), Err(StoreError::Corrupt(m)) if m.contains("snapshot"))
        );
    }
}
