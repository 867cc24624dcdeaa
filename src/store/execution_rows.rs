//! A page of executions read without a record per row.
//!
//! A seed-001 page is a hundred executions, each a dozen text columns. Read
//! into [`ExecutionRecord`]s, every row cost about a dozen allocations (its
//! strings and a map of its variables) that the page's JSON copied once
//! more and then freed. [`ExecutionRows`] copies each row's text into one
//! buffer instead, and hands rows out as [`ExecutionRow`]s borrowed from
//! it; the variables stay as stored until a row is rendered.

use std::collections::BTreeMap;
use std::ops::Range;

use super::columns::{variables_from, Columns};
use super::{ExecutionRecord, StoreError, StoreResult};
use crate::domain::ExecutionStatus;

/// One execution, borrowed from the row it was read from or from
/// [`ExecutionRows`]. Columns as in [`super::columns::EXECUTION_COLUMNS`].
#[derive(Debug, Clone, Copy)]
pub struct ExecutionRow<'a> {
    pub id: i64,
    pub run_id: i64,
    pub batch_sequence: i64,
    pub contact_id: i64,
    pub phone: &'a str,
    pub name: Option<&'a str>,
    /// The template variables as stored: a JSON object of strings.
    pub variables: &'a str,
    pub status: ExecutionStatus,
    pub message_status: Option<&'a str>,
    pub attempts: i64,
    pub provider_message_id: Option<&'a str>,
    pub duration_seconds: Option<i64>,
    pub error_details: Option<&'a str>,
    pub retry_reason: Option<&'a str>,
    pub executed_at: Option<i64>,
    pub delivered_at: Option<i64>,
}

impl<'a> ExecutionRow<'a> {
    /// Reads a row selected with [`super::columns::EXECUTION_COLUMNS`].
    pub fn from_columns(row: &'a dyn Columns) -> StoreResult<Self> {
        let status = row.text(7)?;
        Ok(ExecutionRow {
            id: row.int(0)?,
            run_id: row.int(1)?,
            batch_sequence: row.int(2)?,
            contact_id: row.int(3)?,
            phone: row.text(4)?,
            name: row.opt_text(5)?,
            variables: row.text(6)?,
            status: ExecutionStatus::parse(status)
                .ok_or_else(|| StoreError::Corrupt(status.into()))?,
            message_status: row.opt_text(8)?,
            attempts: row.int(9)?,
            provider_message_id: row.opt_text(10)?,
            duration_seconds: row.opt_int(11)?,
            error_details: row.opt_text(12)?,
            retry_reason: row.opt_text(13)?,
            executed_at: row.opt_int(14)?,
            delivered_at: row.opt_int(15)?,
        })
    }

    /// The row's variables, looked up where they are stored unless a value
    /// holds an escape.
    pub fn parse_variables(&self) -> StoreResult<Variables<'a>> {
        Variables::parse(self.variables)
    }

    pub fn to_record(&self) -> StoreResult<ExecutionRecord> {
        let owned = |s: Option<&str>| s.map(str::to_owned);
        Ok(ExecutionRecord {
            id: self.id,
            run_id: self.run_id,
            batch_sequence: self.batch_sequence,
            contact_id: self.contact_id,
            phone: self.phone.to_owned(),
            name: owned(self.name),
            variables: variables_from(self.variables)?,
            status: self.status,
            message_status: owned(self.message_status),
            attempts: self.attempts,
            provider_message_id: owned(self.provider_message_id),
            duration_seconds: self.duration_seconds,
            error_details: owned(self.error_details),
            retry_reason: owned(self.retry_reason),
            executed_at: self.executed_at,
            delivered_at: self.delivered_at,
        })
    }
}

/// An execution's variables: the stored JSON object, searched for a name
/// each time one is asked for (a row asks for two or three, in a few dozen
/// bytes), unless a value holds an escape. Parsed into a map, they cost
/// an allocation a row and 3.4% of a page's CPU.
#[derive(Debug)]
pub enum Variables<'a> {
    /// A JSON object of strings with no backslash in it.
    Stored(&'a str),
    Owned(BTreeMap<String, String>),
}

impl<'a> Variables<'a> {
    /// Variables as stored (a JSON object of strings), looked up in place
    /// unless a value holds an escape.
    pub fn parse(stored: &'a str) -> StoreResult<Self> {
        let object = stored.trim_start().starts_with('{');
        if object && !stored.contains('\\') {
            Ok(Variables::Stored(stored))
        } else {
            variables_from(stored).map(Variables::Owned)
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        match self {
            Variables::Stored(json) => value_in_plain_object(json, name),
            Variables::Owned(map) => map.get(name).map(String::as_str),
        }
    }
}

/// The string value of `name` in a JSON object of strings written without
/// escapes (so each string ends at the next quote); `None` when it has no
/// such key, or is not such an object.
fn value_in_plain_object<'a>(json: &'a str, name: &str) -> Option<&'a str> {
    fn string(s: &str) -> Option<(&str, &str)> {
        let inside = s.trim_start().strip_prefix('"')?;
        let end = inside.find('"')?;
        Some((&inside[..end], &inside[end + 1..]))
    }
    let mut rest = json.trim_start().strip_prefix('{')?;
    if rest.trim_start().starts_with('}') {
        return None;
    }
    loop {
        let (key, after_key) = string(rest)?;
        let (value, after_value) = string(after_key.trim_start().strip_prefix(':')?)?;
        if key == name {
            return Some(value);
        }
        rest = after_value.trim_start().strip_prefix(',')?;
    }
}

/// Executions read into one buffer (see the module docs).
#[derive(Debug, Default, Clone)]
pub struct ExecutionRows {
    text: String,
    rows: Vec<StoredRow>,
}

/// An [`ExecutionRow`] with its text as ranges of [`ExecutionRows::text`].
#[derive(Debug, Clone)]
struct StoredRow {
    id: i64,
    run_id: i64,
    batch_sequence: i64,
    contact_id: i64,
    phone: Range<usize>,
    name: Option<Range<usize>>,
    variables: Range<usize>,
    status: ExecutionStatus,
    message_status: Option<Range<usize>>,
    attempts: i64,
    provider_message_id: Option<Range<usize>>,
    duration_seconds: Option<i64>,
    error_details: Option<Range<usize>>,
    retry_reason: Option<Range<usize>>,
    executed_at: Option<i64>,
    delivered_at: Option<i64>,
}

impl ExecutionRows {
    /// Room for `rows` rows of about `bytes_each` bytes of text.
    pub fn with_capacity(rows: usize, bytes_each: usize) -> Self {
        Self {
            text: String::with_capacity(rows * bytes_each),
            rows: Vec::with_capacity(rows),
        }
    }

    pub fn push(&mut self, row: &ExecutionRow<'_>) {
        let text = &mut self.text;
        let mut keep = |s: &str| {
            let start = text.len();
            text.push_str(s);
            start..text.len()
        };
        let stored = StoredRow {
            id: row.id,
            run_id: row.run_id,
            batch_sequence: row.batch_sequence,
            contact_id: row.contact_id,
            phone: keep(row.phone),
            name: row.name.map(&mut keep),
            variables: keep(row.variables),
            status: row.status,
            message_status: row.message_status.map(&mut keep),
            attempts: row.attempts,
            provider_message_id: row.provider_message_id.map(&mut keep),
            duration_seconds: row.duration_seconds,
            error_details: row.error_details.map(&mut keep),
            retry_reason: row.retry_reason.map(&mut keep),
            executed_at: row.executed_at,
            delivered_at: row.delivered_at,
        };
        self.rows.push(stored);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = ExecutionRow<'_>> + '_ {
        self.rows.iter().map(|stored| self.row(stored))
    }

    pub fn last(&self) -> Option<ExecutionRow<'_>> {
        self.rows.last().map(|stored| self.row(stored))
    }

    fn row(&self, stored: &StoredRow) -> ExecutionRow<'_> {
        let text = |range: &Range<usize>| &self.text[range.clone()];
        ExecutionRow {
            id: stored.id,
            run_id: stored.run_id,
            batch_sequence: stored.batch_sequence,
            contact_id: stored.contact_id,
            phone: text(&stored.phone),
            name: stored.name.as_ref().map(text),
            variables: text(&stored.variables),
            status: stored.status,
            message_status: stored.message_status.as_ref().map(text),
            attempts: stored.attempts,
            provider_message_id: stored.provider_message_id.as_ref().map(text),
            duration_seconds: stored.duration_seconds,
            error_details: stored.error_details.as_ref().map(text),
            retry_reason: stored.retry_reason.as_ref().map(text),
            executed_at: stored.executed_at,
            delivered_at: stored.delivered_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(id: i64, name: Option<&'a str>, variables: &'a str) -> ExecutionRow<'a> {
        ExecutionRow {
            id,
            run_id: 7,
            batch_sequence: 1,
            contact_id: id * 3,
            phone: "+15550000001",
            name,
            variables,
            status: ExecutionStatus::Completed,
            message_status: Some("delivered"),
            attempts: 2,
            provider_message_id: None,
            duration_seconds: Some(4),
            error_details: Some("é, \"quoted\""),
            retry_reason: None,
            executed_at: Some(1_764_599_891_110),
            delivered_at: None,
        }
    }

    #[test]
    fn rows_come_back_as_they_were_pushed() {
        let pushed = [
            row(1, Some("Zoë"), r#"{"day":"Mon"}"#),
            row(2, None, "{}"),
            row(3, Some(""), r#"{"a":"1","b":"2"}"#),
        ];
        let mut rows = ExecutionRows::with_capacity(1, 8);
        for r in &pushed {
            rows.push(r);
        }
        assert_eq!(rows.len(), 3);
        let read: Vec<String> = rows.iter().map(|r| format!("{r:?}")).collect();
        let expected: Vec<String> = pushed.iter().map(|r| format!("{r:?}")).collect();
        assert_eq!(read, expected);
        assert_eq!(rows.last().map(|r| r.id), Some(3));
    }

    #[test]
    fn variables_are_looked_up_where_stored_unless_escaped_and_equal_the_record_s() {
        for (raw, borrowed) in [
            (r#"{"day":"Mon","name":"Zoë"}"#, true),
            (r#"{"day":"Mon\nday","q":"\"x\""}"#, false),
            ("{}", true),
        ] {
            let r = row(1, None, raw);
            let variables = r.parse_variables().unwrap();
            assert_eq!(matches!(variables, Variables::Stored(_)), borrowed, "{raw}");
            let record = r.to_record().unwrap();
            for (name, value) in &record.variables {
                assert_eq!(variables.get(name), Some(value.as_str()), "{raw}");
            }
            assert_eq!(variables.get("missing"), None);
        }
        assert!(row(1, None, "[1]").parse_variables().is_err());
    }

    #[test]
    fn a_stored_object_gives_what_its_parsed_map_gives_for_every_name() {
        let maps: Vec<BTreeMap<String, String>> = vec![
            BTreeMap::new(),
            [("day", "Mon")].map(|(k, v)| (k.into(), v.into())).into(),
            [
                ("a", ""),
                ("ab", "a"),
                ("name", "Zoë Ünïcödé"),
                ("b", "x y, z: {w}"),
                ("", "empty key"),
            ]
            .map(|(k, v)| (k.into(), v.into()))
            .into(),
        ];
        for map in maps {
            let compact = serde_json::to_string(&map).unwrap();
            // Postgres renders a JSONB object with a space after each `:`
            // and `,`.
            let spaced = compact
                .replace("\":\"", "\": \"")
                .replace("\",\"", "\", \"");
            for json in [&compact, &spaced, &format!(" {spaced} ")] {
                let r = row(1, None, json);
                let variables = r.parse_variables().unwrap();
                assert!(matches!(variables, Variables::Stored(_)), "{json}");
                for name in map
                    .keys()
                    .map(String::as_str)
                    .chain(["missing", "Mon", "a "])
                {
                    assert_eq!(
                        variables.get(name),
                        map.get(name).map(String::as_str),
                        "{name} in {json}"
                    );
                }
            }
        }
        // Not an object of strings: nothing found, rather than a wrong value.
        for odd in [r#"{"a":1}"#, r#"{"a""#, "{", r#"{"a":"1" "b":"2"}"#] {
            assert_eq!(value_in_plain_object(odd, "b"), None, "{odd}");
        }
    }
}
