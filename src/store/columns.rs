//! Rows read by column position, whichever driver read them.
//!
//! Most reads go through sqlx. SQLite's pages of executions do not (see
//! `sqlite::RowReaders`): sqlx copies every value of every row before
//! handing the row across threads, and on a page of a hundred executions
//! those copies and hand-offs were most of the request. A record that both
//! backends build is mapped once, here, from [`Columns`], which Postgres'
//! rows (sqlx) and SQLite's (rusqlite) both provide.

use std::collections::BTreeMap;

use super::execution_rows::ExecutionRow;
use super::{ExecutionRecord, RunSnapshot, StoreError, StoreResult};

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

/// Postgres rows, read by sqlx (positions as its `try_get` takes them).
impl Columns for sqlx::postgres::PgRow {
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
