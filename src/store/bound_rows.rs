//! Many rows handed to one statement: how the engine passes a slice's ids,
//! outcomes, provider ids and receipts to the database.
//!
//! A statement joins its rows as `{rows}`, a subquery with named columns,
//! and each backend spells that subquery the way it reads cheapest:
//!
//! - **SQLite**: a `VALUES` list of placeholders, one per cell. SQLite reads
//!   bound values as they are; the JSON array this replaced was parsed by
//!   `json_each`, each row turned back into text, and that text parsed
//!   again by every `->>`: recording a slice's outcomes took 3.6–5.3 µs a
//!   row that way against 2.0–2.2 bound (`UPDATE … FROM`, 300,000 rows).
//!   The text of a statement depends on how many rows it lists, so rows go
//!   in chunks of a few fixed sizes ([`SQLITE_SIZES`]), each prepared once
//!   and cached; a chunk's unused rows are NULL, and left out.
//! - **Postgres**: one JSON array bound as one parameter
//!   (`jsonb_array_elements`), a single round trip whatever the count.
//!
//! The first column is the row's key and is never NULL: that is how the
//! padding rows are told apart.
//!
//! Statements write `{ROWS} AS alias` where the rows go (a `format!`
//! capture of [`ROWS`]; Postgres 15 wants every subquery named);
//! `sql_rows!` puts the chunk's subquery there.

use sqlx::{Arguments, Database, Encode, Type};

/// Where a statement's rows go: `sql_rows!` replaces it with the subquery.
pub const ROWS: &str = "{rows}";

/// One value of a row.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Cell<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
}

impl From<i64> for Cell<'_> {
    fn from(value: i64) -> Self {
        Cell::Int(Some(value))
    }
}
impl From<Option<i64>> for Cell<'_> {
    fn from(value: Option<i64>) -> Self {
        Cell::Int(value)
    }
}
impl<'a> From<&'a str> for Cell<'a> {
    fn from(value: &'a str) -> Self {
        Cell::Text(Some(value))
    }
}
impl<'a> From<&'a String> for Cell<'a> {
    fn from(value: &'a String) -> Self {
        Cell::Text(Some(value))
    }
}
impl<'a> From<&'a Option<String>> for Cell<'a> {
    fn from(value: &'a Option<String>) -> Self {
        Cell::Text(value.as_deref())
    }
}
impl<'a> From<Option<&'a str>> for Cell<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Cell::Text(value)
    }
}

/// What a column holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Int,
    Text,
}

/// A row source's columns, in order: name and kind.
pub type Shape = [(&'static str, Kind)];

/// Rows of one integer column, `id` (see [`BoundRows::ids`]).
pub const IDS: &Shape = &[("id", Kind::Int)];

/// Rows of SQLite's `VALUES` chunks: each chunk takes the smallest size
/// that holds it, so a statement has one text per size. The largest holds
/// a whole slice (1,000 executions): one statement, where two chunks of 512
/// were two round trips to the writer's thread (alternating `bench engine
/// --recipients 400000`: 49,887 → 52,297 recipients/s, mean of five each).
pub const SQLITE_SIZES: [usize; 4] = [8, 64, 512, 1024];

/// How a backend spells `{rows}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// SQLite: `VALUES` placeholders, in chunks of [`SQLITE_SIZES`].
    Values,
    /// Postgres: one JSON array of arrays (of values, for one column).
    Json,
}

impl Style {
    /// Statement texts a call site may need, one per chunk size.
    pub const fn sizes(self) -> usize {
        match self {
            Style::Values => SQLITE_SIZES.len(),
            Style::Json => 1,
        }
    }

    /// The subquery that stands for `{rows}` in a statement whose chunk
    /// lists `size` rows (see [`Chunk::source`]).
    pub fn source(self, shape: &Shape, size: usize) -> String {
        match self {
            Style::Values => {
                let names: Vec<String> = shape
                    .iter()
                    .enumerate()
                    .map(|(i, (name, _))| format!("column{} AS {name}", i + 1))
                    .collect();
                let row = format!("({})", vec!["?"; shape.len()].join(", "));
                format!(
                    "(SELECT {} FROM (VALUES {}) WHERE column1 IS NOT NULL)",
                    names.join(", "),
                    vec![row; size].join(", ")
                )
            }
            Style::Json => {
                let single = shape.len() == 1;
                let columns: Vec<String> = shape
                    .iter()
                    .enumerate()
                    .map(|(i, (name, kind))| match (single, kind) {
                        (true, Kind::Int) => format!("CAST(j.value AS BIGINT) AS {name}"),
                        (true, Kind::Text) => format!("j.value #>> '{{}}' AS {name}"),
                        (false, Kind::Int) => format!("CAST(j.value ->> {i} AS BIGINT) AS {name}"),
                        (false, Kind::Text) => format!("j.value ->> {i} AS {name}"),
                    })
                    .collect();
                format!(
                    "(SELECT {} FROM jsonb_array_elements(CAST(? AS jsonb)) AS j(value))",
                    columns.join(", ")
                )
            }
        }
    }
}

/// Rows of one [`Shape`], kept row after row.
#[derive(Debug)]
pub struct BoundRows<'a> {
    shape: &'static Shape,
    cells: Vec<Cell<'a>>,
}

impl<'a> BoundRows<'a> {
    pub fn new(shape: &'static Shape) -> Self {
        Self {
            shape,
            cells: Vec::new(),
        }
    }

    /// Rows of [`IDS`]: executions or runs, by id.
    pub fn ids(ids: impl IntoIterator<Item = i64>) -> Self {
        Self {
            shape: IDS,
            cells: ids.into_iter().map(Cell::from).collect(),
        }
    }

    /// Adds a row: one cell per column, the first not NULL.
    pub fn push<const N: usize>(&mut self, row: [Cell<'a>; N]) {
        debug_assert_eq!(N, self.shape.len(), "a row has a cell per column");
        debug_assert!(
            !matches!(row[0], Cell::Int(None) | Cell::Text(None)),
            "the first column is the key"
        );
        self.cells.extend(row);
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The chunks a statement runs once each for, in order: at least one,
    /// so a statement that joins no rows still runs (`NOT IN` nothing).
    pub fn chunks(&self, style: Style) -> Vec<Chunk<'_, 'a>> {
        match style {
            Style::Json => vec![self.chunk(&self.cells, style)],
            Style::Values if self.cells.is_empty() => vec![self.chunk(&[], style)],
            Style::Values => self
                .cells
                .chunks(SQLITE_SIZES[SQLITE_SIZES.len() - 1] * self.shape.len())
                .map(|cells| self.chunk(cells, style))
                .collect(),
        }
    }

    fn chunk<'r>(&self, cells: &'r [Cell<'a>], style: Style) -> Chunk<'r, 'a> {
        let rows = cells.len() / self.shape.len();
        let size_index = match style {
            Style::Values => SQLITE_SIZES
                .iter()
                .position(|&size| size >= rows)
                .expect("chunks are at most the largest size"),
            Style::Json => 0,
        };
        Chunk {
            shape: self.shape,
            cells,
            style,
            size_index,
        }
    }
}

/// The rows one statement is run with.
#[derive(Debug)]
pub struct Chunk<'r, 'a> {
    shape: &'static Shape,
    cells: &'r [Cell<'a>],
    style: Style,
    /// Which of the style's statement texts this chunk needs.
    size_index: usize,
}

impl<'r, 'a> Chunk<'r, 'a> {
    /// Which of a call site's statement texts (see [`Style::sizes`]).
    pub fn size_index(&self) -> usize {
        self.size_index
    }

    /// The subquery that stands for `{rows}` in this chunk's statement.
    pub fn source(&self) -> String {
        let size = match self.style {
            Style::Values => SQLITE_SIZES[self.size_index],
            Style::Json => 0,
        };
        self.style.source(self.shape, size)
    }

    /// The rows as one JSON array: of arrays, or of values for one column.
    fn json(&self) -> String {
        let json = if self.shape.len() == 1 {
            serde_json::to_string(self.cells)
        } else {
            serde_json::to_string(&self.cells.chunks(self.shape.len()).collect::<Vec<_>>())
        };
        json.expect("cells serialise")
    }

    /// The statement's parameters: `before` the rows, the rows (padded,
    /// or as one JSON array), then `after`.
    pub fn arguments<DB>(&self, before: &[Cell<'a>], after: &[Cell<'a>]) -> DB::Arguments<'a>
    where
        DB: Database,
        Option<i64>: Encode<'a, DB> + Type<DB>,
        Option<&'a str>: Encode<'a, DB> + Type<DB>,
        String: Encode<'a, DB> + Type<DB>,
    {
        let mut arguments = DB::Arguments::default();
        let add = |arguments: &mut DB::Arguments<'a>, cell: &Cell<'a>| {
            match *cell {
                Cell::Int(value) => arguments.add(value),
                Cell::Text(value) => arguments.add(value),
            }
            .expect("integers and text always bind");
        };
        for cell in before {
            add(&mut arguments, cell);
        }
        match self.style {
            Style::Values => {
                for cell in self.cells {
                    add(&mut arguments, cell);
                }
                let padding = SQLITE_SIZES[self.size_index] * self.shape.len() - self.cells.len();
                for _ in 0..padding {
                    add(&mut arguments, &Cell::Int(None));
                }
            }
            Style::Json => arguments.add(self.json()).expect("text always binds"),
        }
        for cell in after {
            add(&mut arguments, cell);
        }
        arguments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIR: &Shape = &[("id", Kind::Int), ("status", Kind::Text)];

    #[test]
    fn values_chunks_take_the_smallest_size_that_holds_them() {
        let mut rows = BoundRows::new(PAIR);
        for id in 0..1100 {
            rows.push([Cell::from(id), Cell::from("sent")]);
        }
        let chunks = rows.chunks(Style::Values);
        let sizes: Vec<usize> = chunks
            .iter()
            .map(|c| SQLITE_SIZES[c.size_index()])
            .collect();
        assert_eq!(sizes, vec![1024, 512]);
        assert_eq!(chunks[1].cells.len(), 76 * 2);
        let few = BoundRows::ids([1, 2, 3]);
        assert_eq!(few.chunks(Style::Values)[0].size_index(), 0);
    }

    #[test]
    fn no_rows_is_still_one_statement() {
        let none = BoundRows::ids([]);
        assert_eq!(none.chunks(Style::Values).len(), 1);
        assert_eq!(none.chunks(Style::Json).len(), 1);
    }

    #[test]
    fn sources_name_the_columns_and_leave_padding_out() {
        assert_eq!(
            Style::Values.source(PAIR, 2),
            "(SELECT column1 AS id, column2 AS status FROM (VALUES (?, ?), (?, ?)) \
             WHERE column1 IS NOT NULL)"
        );
        assert_eq!(
            Style::Json.source(PAIR, 0),
            "(SELECT CAST(j.value ->> 0 AS BIGINT) AS id, j.value ->> 1 AS status \
             FROM jsonb_array_elements(CAST(? AS jsonb)) AS j(value))"
        );
        assert_eq!(
            Style::Json.source(IDS, 0),
            "(SELECT CAST(j.value AS BIGINT) AS id \
             FROM jsonb_array_elements(CAST(? AS jsonb)) AS j(value))"
        );
    }

    #[test]
    fn json_rows_are_arrays_and_single_columns_plain_values() {
        let mut rows = BoundRows::new(PAIR);
        rows.push([Cell::from(7), Cell::Text(None)]);
        rows.push([Cell::from(8), Cell::from("it's \"sent\"")]);
        assert_eq!(
            rows.chunks(Style::Json)[0].json(),
            r#"[[7,null],[8,"it's \"sent\""]]"#
        );
        let ids = BoundRows::ids([4, 5]);
        assert_eq!(ids.chunks(Style::Json)[0].json(), "[4,5]");
    }
}
