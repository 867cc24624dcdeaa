//! A campaign's event log: how a transaction appends its events.
//!
//! Every event carries `campaign`, the campaign's status and latest run
//! counters as of that event, so a stream never needs another read. An
//! engine transaction appends up to three events a slice (a batch closed,
//! one opened, progress); they are kept in an [`EventBatch`] and written as
//! its last statements, two whatever their number: one takes their
//! sequences, one inserts them. Appended one by one, each was two round
//! trips to the database's thread in the middle of the run's transaction.

use serde_json::{json, Value};
use sqlx::Row;

use super::{dialect, Conn, Db, DbRow};
use crate::store::bound_rows::{BoundRows, Kind, Shape, ROWS};
use crate::store::{now_ms, RunRecord, StoreResult, StoredEvent};

/// Events to append to one campaign's log, in order, at the end of the
/// transaction that produced them ([`EventBatch::append`]).
#[derive(Default)]
pub(super) struct EventBatch {
    campaign_id: Option<i64>,
    pending: Vec<PendingEvent>,
}

struct PendingEvent {
    kind: String,
    data: Value,
    /// The run as the transaction had written it when the event happened:
    /// its id and its part of the snapshot. An event of a run other than
    /// the campaign's latest shows the latest instead.
    run: Option<(i64, Value)>,
}

/// The rows one append inserts.
const EVENTS: &Shape = &[
    ("seq", Kind::Int),
    ("kind", Kind::Text),
    ("data", Kind::Text),
];

impl EventBatch {
    /// Adds an event of `campaign_id`; `current_run` is a run as the caller
    /// last wrote it in this transaction, so that the snapshot need not
    /// read it again (see [`PendingEvent::run`]).
    pub(super) fn push(
        &mut self,
        campaign_id: i64,
        kind: &str,
        data: Value,
        current_run: Option<&RunRecord>,
    ) {
        debug_assert!(
            self.campaign_id.is_none_or(|id| id == campaign_id),
            "a batch is one campaign's events"
        );
        self.campaign_id = Some(campaign_id);
        self.pending.push(PendingEvent {
            kind: kind.to_owned(),
            data,
            run: current_run.map(|run| (run.id, run_snapshot(run))),
        });
    }

    /// Appends the events with the campaign's next gap-free sequences and
    /// returns them as stored, in order.
    ///
    /// They are stamped as they are written, not with the transaction's
    /// `now`: their `ts` is then when what they report was committed, give
    /// or take the statements after them, which is what a client measuring
    /// the stream takes it for. Stamped with `now`, it said when the
    /// transaction began: with ten thousand sockets watching a run, a
    /// batch's events and a batch of delivery receipts' progress were
    /// stamped 4–15 ms before their commit.
    pub(super) async fn append(self, conn: &mut Conn) -> StoreResult<Vec<StoredEvent>> {
        let Some(campaign_id) = self.campaign_id else {
            return Ok(Vec::new());
        };
        let now = now_ms();
        let count = self.pending.len() as i64;
        // Taking the sequences first locks the campaign row, so on Postgres
        // concurrent appends queue here and each snapshot sees the one
        // before. The same statement returns what the snapshot needs.
        let row = sqlx::query(sql!(
            "UPDATE campaigns SET last_seq = last_seq + ? WHERE id = ?
             RETURNING last_seq, status, started_at, completed_at, contact_count,
                       (SELECT MAX(r.id) FROM runs r WHERE r.campaign_id = campaigns.id) AS latest_run_id
                       {}",
            dialect::ANNOUNCE
        ))
        .bind(count)
        .bind(campaign_id)
        .fetch_one(&mut *conn)
        .await?;
        let first_seq = row.try_get::<i64, _>("last_seq")? - count + 1;
        let latest_run_id: Option<i64> = row.try_get("latest_run_id")?;
        // Read the latest run only when some event was not given it.
        let latest_run = match latest_run_id {
            Some(id)
                if self
                    .pending
                    .iter()
                    .any(|event| event.run.as_ref().is_none_or(|(run, _)| *run != id)) =>
            {
                Some(run_snapshot(&super::engine::fetch_run(conn, id).await?))
            }
            _ => None,
        };
        let mut stored = Vec::with_capacity(self.pending.len());
        for (seq, event) in (first_seq..).zip(self.pending) {
            let PendingEvent {
                kind,
                mut data,
                run,
            } = event;
            if let Value::Object(fields) = &mut data {
                let run = match (latest_run_id, run) {
                    (Some(id), Some((run_id, run))) if run_id == id => run,
                    (Some(_), _) => latest_run.clone().unwrap_or(Value::Null),
                    (None, _) => Value::Null,
                };
                fields.insert("campaign".into(), campaign_snapshot(&row, run)?);
            }
            stored.push(StoredEvent {
                campaign_id,
                seq,
                kind,
                data,
                created_at: now,
            });
        }
        let texts: Vec<String> = stored.iter().map(|event| event.data.to_string()).collect();
        let mut rows = BoundRows::new(EVENTS);
        for (event, text) in stored.iter().zip(&texts) {
            rows.push([event.seq.into(), (&event.kind).into(), text.into()]);
        }
        for chunk in rows.chunks(dialect::ROWS) {
            sqlx::query_with(
                sql_rows!(
                    &chunk,
                    "INSERT INTO events (campaign_id, seq, kind, data, created_at)
                     SELECT ?, e.seq, e.kind, e.data, ? FROM {ROWS} AS e"
                ),
                chunk.arguments::<Db>(&[campaign_id.into(), now.into()], &[]),
            )
            .execute(&mut *conn)
            .await?;
        }
        Ok(stored)
    }
}

/// Appends one event (see [`EventBatch`]), for transactions that write
/// more after it.
pub(super) async fn append_event(
    conn: &mut Conn,
    campaign_id: i64,
    kind: &str,
    data: Value,
    current_run: Option<&RunRecord>,
) -> StoreResult<StoredEvent> {
    let mut batch = EventBatch::default();
    batch.push(campaign_id, kind, data, current_run);
    let mut stored = batch.append(conn).await?;
    Ok(stored.pop().expect("one event appended"))
}

/// A run as a subscriber sees it in an event's snapshot.
fn run_snapshot(run: &RunRecord) -> Value {
    json!({
        "id": run.uuid,
        "status": run.status.public(),
        "counters": run.counters,
        "total_batches": run.total_batches,
        "completed_batches": run.completed_batches,
        "error": run.error,
    })
}

/// The campaign as a subscriber needs it: its status and its latest run.
fn campaign_snapshot(row: &DbRow, latest_run: Value) -> StoreResult<Value> {
    Ok(json!({
        "status": row.try_get::<String, _>("status")?,
        "started_at": row.try_get::<Option<i64>, _>("started_at")?,
        "completed_at": row.try_get::<Option<i64>, _>("completed_at")?,
        "contact_count": row.try_get::<i64, _>("contact_count")?,
        "run": latest_run,
    }))
}
