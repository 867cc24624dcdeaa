//! The engine's writes.
//!
//! Hot paths move whole slices at once: ids, outcomes and receipts are
//! bound as rows (`store::bound_rows`) and joined by `UPDATE … FROM`, so a
//! slice of 1000 sends costs a handful of statements, not thousands.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::json;
use sqlx::Row;

use super::events::{append_event, EventBatch};
use super::{dialect, Conn, Db, DbRow, SqlStore};
use crate::domain::{ExecutionStatus, Recipients, RunStatus};
use crate::store::bound_rows::{BoundRows, Kind, Shape, ROWS};
use crate::store::columns::{Columns, FromColumns, Param, RUN_COLUMNS};
use crate::store::*;

/// Recipients per batch.
pub const BATCH_SIZE: i64 = 1000;

/// A run read from a row that starts with [`RUN_COLUMNS`].
pub(super) fn run_from_row(row: &DbRow) -> StoreResult<RunRecord> {
    RunRecord::from_columns(row)
}

pub(super) async fn fetch_run(conn: &mut Conn, run_id: i64) -> StoreResult<RunRecord> {
    let row = sqlx::query(sql!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
        .bind(run_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound)?;
    run_from_row(&row)
}

fn run_event_data(run: &RunRecord) -> serde_json::Value {
    json!({
        "run_id": run.uuid,
        "status": run.status.public(),
        "counters": run.counters,
        "total_batches": run.total_batches,
        "completed_batches": run.completed_batches,
    })
}

/// Per-batch amounts to add to counters, for one statement per batch.
#[derive(Default)]
struct Delta {
    pending: i64,
    processing: i64,
    sent: i64,
    failed: i64,
    skipped: i64,
}

/// One change to a run's row: counters and the bookkeeping that moves with
/// them, written by [`update_run`] in a single statement.
#[derive(Default)]
struct RunChange {
    counters: Delta,
    completed_batches: i64,
    charged: i64,
    /// Set when sends succeeded: stamps `first_sent_at`/`last_sent_at`.
    sent_at: Option<i64>,
    updated_at: Option<i64>,
}

/// Adds per-batch deltas to the batches' counters and returns their sum,
/// which the caller adds to the run's counters with [`update_run`].
async fn apply_batch_deltas(
    conn: &mut Conn,
    run_id: i64,
    deltas: &BTreeMap<i64, Delta>,
) -> StoreResult<Delta> {
    let mut total = Delta::default();
    for (sequence, d) in deltas {
        sqlx::query(
            sql!("UPDATE batches SET pending = pending + ?, processing = processing + ?, sent = sent + ?,
                    failed = failed + ?, skipped = skipped + ?
             WHERE run_id = ? AND batch_sequence = ?"),
        )
        .bind(d.pending)
        .bind(d.processing)
        .bind(d.sent)
        .bind(d.failed)
        .bind(d.skipped)
        .bind(run_id)
        .bind(sequence)
        .execute(&mut *conn)
        .await?;
        total.pending += d.pending;
        total.processing += d.processing;
        total.sent += d.sent;
        total.failed += d.failed;
        total.skipped += d.skipped;
    }
    Ok(total)
}

/// Applies `change` to the run's row and returns the run as it now is, so
/// callers need no read after their write.
async fn update_run(conn: &mut Conn, run_id: i64, change: &RunChange) -> StoreResult<RunRecord> {
    let row = sqlx::query(sql!(
        "UPDATE runs SET pending = pending + ?, processing = processing + ?, sent = sent + ?,
                failed = failed + ?, skipped = skipped + ?,
                completed_batches = completed_batches + ?,
                charged_credits = charged_credits + ?,
                first_sent_at = COALESCE(first_sent_at, ?),
                last_sent_at = COALESCE(?, last_sent_at),
                updated_at = COALESCE(?, updated_at)
         WHERE id = ?
         RETURNING {RUN_COLUMNS}"
    ))
    .bind(change.counters.pending)
    .bind(change.counters.processing)
    .bind(change.counters.sent)
    .bind(change.counters.failed)
    .bind(change.counters.skipped)
    .bind(change.completed_batches)
    .bind(change.charged)
    .bind(change.sent_at)
    .bind(change.sent_at)
    .bind(change.updated_at)
    .bind(run_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StoreError::NotFound)?;
    run_from_row(&row)
}

/// Batch and run counters for `deltas`, for callers with nothing else to
/// write to the run.
async fn apply_deltas(
    conn: &mut Conn,
    run_id: i64,
    deltas: &BTreeMap<i64, Delta>,
) -> StoreResult<RunRecord> {
    let counters = apply_batch_deltas(conn, run_id, deltas).await?;
    let change = RunChange {
        counters,
        ..RunChange::default()
    };
    update_run(conn, run_id, &change).await
}

/// Moves every execution of `run_id` in `from` to `to`, keeping counters
/// exact; `error` is recorded on each. Returns how many moved.
/// `batch` limits the move to one batch of the run.
async fn bulk_move(
    conn: &mut Conn,
    run_id: i64,
    batch: Option<i64>,
    from: ExecutionStatus,
    to: ExecutionStatus,
    error: Option<&str>,
    now: i64,
) -> StoreResult<i64> {
    let rows = sqlx::query(sql!(
        "UPDATE executions SET status = ?, error_details = COALESCE(?, error_details),
                next_attempt_at = NULL, updated_at = ?
         WHERE run_id = ? AND status = ? AND (? IS NULL OR batch_sequence = ?)
         RETURNING batch_sequence"
    ))
    .bind(to.as_str())
    .bind(error)
    .bind(now)
    .bind(run_id)
    .bind(from.as_str())
    .bind(batch)
    .bind(batch)
    .fetch_all(&mut *conn)
    .await?;
    let mut deltas: BTreeMap<i64, Delta> = BTreeMap::new();
    for row in &rows {
        let d = deltas.entry(row.try_get("batch_sequence")?).or_default();
        match from {
            ExecutionStatus::Pending => d.pending -= 1,
            _ => d.processing -= 1,
        }
        match to {
            ExecutionStatus::Skipped => d.skipped += 1,
            _ => d.failed += 1,
        }
    }
    if !rows.is_empty() {
        apply_deltas(conn, run_id, &deltas).await?;
    }
    Ok(rows.len() as i64)
}

/// A batch [`close_finished_batches`] just closed, for its event.
struct ClosedBatch {
    sequence: i64,
    status: String,
    recipients: i64,
    sent: i64,
    failed: i64,
    skipped: i64,
}

/// Closes batches with nothing left to do. The caller adds their number to
/// the run's `completed_batches` and then announces them with
/// [`announce_closed_batches`].
async fn close_finished_batches(
    conn: &mut Conn,
    run_id: i64,
    now: i64,
) -> StoreResult<Vec<ClosedBatch>> {
    let closed_rows: Vec<(i64, String, i64, i64, i64, i64)> = sqlx::query_as(
        sql!("UPDATE batches SET
            status = CASE WHEN sent = 0 AND (failed > 0 OR skipped > 0) THEN 'failed' ELSE 'completed' END,
            error_detail = CASE WHEN sent = 0 AND (failed > 0 OR skipped > 0)
                THEN CAST({}('failed', failed, 'skipped', skipped,
                    'message', CASE WHEN failed > 0 THEN 'every send in the batch failed'
                                    ELSE 'the run ended before the batch was sent' END) AS TEXT)
                ELSE NULL END,
            started_at = COALESCE(started_at, ?),
            completed_at = ?
         WHERE run_id = ? AND status IN ('pending', 'running') AND pending = 0 AND processing = 0
         RETURNING batch_sequence, status, recipient_count, sent, failed, skipped",
        dialect::JSON_OBJECT),
    )
    .bind(now)
    .bind(now)
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(closed_rows
        .into_iter()
        .map(
            |(sequence, status, recipients, sent, failed, skipped)| ClosedBatch {
                sequence,
                status,
                recipients,
                sent,
                failed,
                skipped,
            },
        )
        .collect())
}

/// Adds a `batch_completed` event for each closed batch to `events`;
/// `run` is the run after its `completed_batches` counted them.
fn announce_closed_batches(run: &RunRecord, closed: &[ClosedBatch], events: &mut EventBatch) {
    for batch in closed {
        events.push(
            run.campaign_id,
            "batch_completed",
            json!({"run_id": run.uuid, "batch_sequence": batch.sequence, "status": batch.status,
                   "recipient_count": batch.recipients, "sent": batch.sent,
                   "failed": batch.failed, "skipped": batch.skipped}),
            Some(run),
        );
    }
}

/// Closes finished batches, counts them on the run and announces them:
/// for the paths where nothing else is written to the run alongside.
async fn close_and_announce_batches(
    conn: &mut Conn,
    run_id: i64,
    now: i64,
    events: &mut EventBatch,
) -> StoreResult<()> {
    let closed = close_finished_batches(conn, run_id, now).await?;
    if closed.is_empty() {
        return Ok(());
    }
    let change = RunChange {
        completed_batches: closed.len() as i64,
        ..RunChange::default()
    };
    let run = update_run(conn, run_id, &change).await?;
    announce_closed_batches(&run, &closed, events);
    Ok(())
}

/// Records one change of a workspace's balance; `after` is the new balance.
#[allow(clippy::too_many_arguments)]
async fn ledger_entry(
    conn: &mut Conn,
    workspace_id: i64,
    run_id: Option<i64>,
    kind: &str,
    amount: i64,
    after: i64,
    note: &str,
    now: i64,
) -> StoreResult<()> {
    sqlx::query(
        sql!("INSERT INTO credit_ledger (workspace_id, run_id, kind, amount, balance_after, note, created_at)
         VALUES (?, ?, ?, ?, ?, NULLIF(?, ''), ?)"),
    )
    .bind(workspace_id)
    .bind(run_id)
    .bind(kind)
    .bind(amount)
    .bind(after)
    .bind(note)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A row of `id, batch_sequence, phone, name, variables, attempts`, read by
/// position: a slice reads a thousand of them inside the writer's
/// transaction, and a lookup by name hashes the name each time.
fn pending_from_columns(row: &dyn Columns) -> StoreResult<PendingExecution> {
    // Variables that are not an object fail the slice's read, so the run
    // is held until they are mended instead of failing its recipients.
    let variables = row.text(4)?;
    Variables::parse(variables)?;
    Ok(PendingExecution {
        id: row.int(0)?,
        batch_sequence: row.int(1)?,
        phone: row.text(2)?.to_owned(),
        name: row.opt_text(3)?.map(str::to_owned),
        variables: variables.to_owned(),
        attempt: row.int(5)?,
    })
}

/// Locks the run's row for the rest of the transaction (Postgres; SQLite
/// has one writer anyway). Engine transactions take it before any batch's
/// row, so workers sharing a run, receipts and finalisation queue in one
/// order instead of deadlocking; recording outcomes writes executions
/// first ([`record_outcomes_in`]), as receipts do.
async fn lock_run(conn: &mut Conn, run_id: i64) -> StoreResult<()> {
    if !dialect::ROW_LOCK.is_empty() {
        sqlx::query(sql!(
            "SELECT id FROM runs WHERE id = ? {}",
            dialect::ROW_LOCK
        ))
        .bind(run_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Leases free batches of the run to `worker` until it holds at least
/// `wanted` pending recipients or none is free, and returns the sequences
/// of the open batches it holds that have recipients pending, in order. A
/// batch whose lease expired had a worker die on it: its in-flight sends
/// are written off (and the events of batches that closed so are added to
/// `events`).
async fn lease_batches(
    conn: &mut Conn,
    run_id: i64,
    worker: &str,
    now: i64,
    lease_until: i64,
    wanted: i64,
    events: &mut EventBatch,
) -> StoreResult<Vec<i64>> {
    // Renewing the leases held also says which they are.
    let mut held: Vec<(i64, i64)> = sqlx::query_as(sql!(
        "UPDATE batches SET lease_expires_at = ?
         WHERE run_id = ? AND lease_owner = ? AND status IN ('pending', 'running')
         RETURNING batch_sequence, pending"
    ))
    .bind(lease_until)
    .bind(run_id)
    .bind(worker)
    .fetch_all(&mut *conn)
    .await?;
    held.sort_unstable();
    while held.iter().map(|(_, pending)| pending).sum::<i64>() < wanted {
        let free: Option<(i64, Option<String>, i64)> = sqlx::query_as(sql!(
            "SELECT batch_sequence, lease_owner, pending FROM batches
             WHERE run_id = ? AND status IN ('pending', 'running')
               AND (pending > 0 OR processing > 0)
               AND (lease_owner IS NULL OR lease_expires_at < ?)
             ORDER BY batch_sequence LIMIT 1 {}",
            dialect::BATCH_CLAIM_LOCK
        ))
        .bind(run_id)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((sequence, previous_owner, pending)) = free else {
            break;
        };
        sqlx::query(sql!(
            "UPDATE batches SET lease_owner = ?, lease_expires_at = ?
             WHERE run_id = ? AND batch_sequence = ?"
        ))
        .bind(worker)
        .bind(lease_until)
        .bind(run_id)
        .bind(sequence)
        .execute(&mut *conn)
        .await?;
        if previous_owner.is_some() {
            // The previous holder died mid-send: whatever it had in flight
            // may or may not have reached the provider. Never send it again.
            let lost = bulk_move(
                conn,
                run_id,
                Some(sequence),
                ExecutionStatus::InProgress,
                ExecutionStatus::Failed,
                Some("outcome unknown: the worker stopped while sending; not resent so no recipient is contacted twice"),
                now,
            )
            .await?;
            if lost > 0 {
                tracing::warn!(
                    run = run_id,
                    batch = sequence,
                    lost,
                    "took over a batch; in-flight sends marked failed"
                );
                close_and_announce_batches(conn, run_id, now, events).await?;
            }
        }
        held.push((sequence, pending));
    }
    // A held batch with nothing pending is one whose last slice is in
    // flight: it has nothing to read (and no retry to wait for).
    Ok(held
        .into_iter()
        .filter(|&(_, pending)| pending > 0)
        .map(|(sequence, _)| sequence)
        .collect())
}

/// Renews and takes batch leases and marks up to `limit` due executions of
/// the worker's batches in progress, inside the caller's transaction,
/// which holds the run's lock ([`lock_run`]); returns the run as it left it.
/// The events of batches it opens or writes off go to `events`, for the
/// caller to append and hand to the slice.
async fn take_slice_in(
    conn: &mut Conn,
    run_id: i64,
    worker: &str,
    now: i64,
    lease_until: i64,
    limit: i64,
    events: &mut EventBatch,
) -> StoreResult<(Slice, RunRecord)> {
    let campaign_status: String = sqlx::query_scalar(sql!(
        "SELECT c.status FROM runs r JOIN campaigns c ON c.id = r.campaign_id WHERE r.id = ?"
    ))
    .bind(run_id)
    .fetch_one(&mut *conn)
    .await?;
    let control = match campaign_status.as_str() {
        "paused" => Control::Paused,
        "cancelled" => Control::Cancelled,
        _ => Control::Continue,
    };
    let mut executions = Vec::new();
    let mut next_retry_at: Option<i64> = None;
    let mut claimed_run = None;
    if control == Control::Continue {
        let held = lease_batches(conn, run_id, worker, now, lease_until, limit, events).await?;
        // One index range per held batch (usually one or two), so the cost
        // does not grow with the run.
        for &sequence in &held {
            let room = limit - executions.len() as i64;
            if room <= 0 {
                break;
            }
            dialect::each_row_in(
                &mut *conn,
                sql!(
                    "SELECT id, batch_sequence, phone, name, variables, attempts + 1 AS attempts
                     FROM executions
                     WHERE run_id = ? AND status = 'pending' AND batch_sequence = ?
                       AND (next_attempt_at IS NULL OR next_attempt_at <= ?)
                     ORDER BY id LIMIT ?"
                ),
                vec![
                    Param::Int(run_id),
                    Param::Int(sequence),
                    Param::Int(now),
                    Param::Int(room),
                ],
                &mut |row| {
                    executions.push(pending_from_columns(row)?);
                    Ok(())
                },
            )
            .await?;
        }
        if executions.is_empty() {
            for &sequence in &held {
                let at: Option<i64> = sqlx::query_scalar(sql!(
                    "SELECT MIN(next_attempt_at) FROM executions
                     WHERE run_id = ? AND status = 'pending' AND batch_sequence = ?"
                ))
                .bind(run_id)
                .bind(sequence)
                .fetch_one(&mut *conn)
                .await?;
                next_retry_at = match (next_retry_at, at) {
                    (Some(earliest), Some(at)) => Some(earliest.min(at)),
                    (earliest, at) => earliest.or(at),
                };
            }
        } else {
            let ids = BoundRows::ids(executions.iter().map(|e| e.id));
            for chunk in ids.chunks(dialect::ROWS) {
                sqlx::query_with(
                    sql_rows!(
                        &chunk,
                        "UPDATE executions SET status = 'in_progress', attempts = attempts + 1,
                                next_attempt_at = NULL, updated_at = ?
                         WHERE id IN (SELECT i.id FROM {ROWS} AS i)"
                    ),
                    chunk.arguments::<Db>(&[now.into()], &[]),
                )
                .execute(&mut *conn)
                .await?;
            }
            let mut deltas: BTreeMap<i64, Delta> = BTreeMap::new();
            for e in &executions {
                let d = deltas.entry(e.batch_sequence).or_default();
                d.pending -= 1;
                d.processing += 1;
            }
            // A batch's first slice opens it; its size comes back for the
            // `batch_started` event.
            let mut started = Vec::new();
            for sequence in deltas.keys() {
                let opened: Option<i64> = sqlx::query_scalar(sql!(
                    "UPDATE batches SET status = 'running', started_at = COALESCE(started_at, ?)
                     WHERE run_id = ? AND batch_sequence = ? AND status = 'pending'
                     RETURNING recipient_count"
                ))
                .bind(now)
                .bind(run_id)
                .bind(sequence)
                .fetch_optional(&mut *conn)
                .await?;
                if let Some(size) = opened {
                    started.push((*sequence, size));
                }
            }
            let run = apply_deltas(&mut *conn, run_id, &deltas).await?;
            for (sequence, size) in started {
                events.push(
                    run.campaign_id,
                    "batch_started",
                    json!({"run_id": run.uuid, "batch_sequence": sequence,
                           "total_batches": run.total_batches, "recipient_count": size}),
                    Some(&run),
                );
            }
            claimed_run = Some(run);
        }
    }
    let run = match claimed_run {
        Some(run) => run,
        None => fetch_run(&mut *conn, run_id).await?,
    };
    let slice = Slice {
        control,
        executions,
        next_retry_at,
        counters: run.counters,
        events: Vec::new(),
    };
    Ok((slice, run))
}

/// A slice's outcomes, a row each.
const OUTCOMES: &Shape = &[
    ("id", Kind::Int),
    ("status", Kind::Text),
    ("message_status", Kind::Text),
    ("provider_id", Kind::Text),
    ("duration", Kind::Int),
    ("error", Kind::Text),
    ("retry", Kind::Text),
    ("next_at", Kind::Int),
];

/// Writes a slice's outcomes ([`OUTCOMES`]) to the executions still in
/// progress.
const RECORD_OUTCOMES: &str =
    "UPDATE executions SET status = o.status, message_status = o.message_status,
                provider_message_id = COALESCE(o.provider_id, executions.provider_message_id),
                duration_seconds = o.duration, error_details = o.error,
                retry_reason = o.retry, next_attempt_at = o.next_at,
                executed_at = ?, updated_at = ?
         FROM {rows} AS o
         WHERE executions.id = o.id AND executions.status = 'in_progress'";

/// Delivery receipts: the message, `delivered` or `failed`, and the error.
const RECEIPTS: &Shape = &[
    ("provider_id", Kind::Text),
    ("status", Kind::Text),
    ("error", Kind::Text),
];

/// Provider message ids and the executions they name.
const PROVIDER_IDS: &Shape = &[("provider_id", Kind::Text), ("execution_id", Kind::Int)];

/// Records send outcomes, counters, batch completion and metrics inside
/// the caller's transaction, which adds the progress event last
/// ([`push_progress`]); the events of batches that closed go to `events`.
/// Returns the run as it left it, whose row it wrote once, by
/// [`update_run`].
///
/// The executions' rows are written before the run's lock ([`lock_run`])
/// is taken, and the lock is held from then until the caller commits: on
/// Postgres those writes are most of a slice's transaction, and another
/// task's transaction on the same run writes its own executions meanwhile
/// instead of queueing behind the run's row. Each row's own lock keeps the
/// outcome and a write-off (a takeover, a run ended) from both counting it:
/// whichever comes second finds it no longer in progress.
async fn record_outcomes_in(
    conn: &mut Conn,
    run_id: i64,
    outcomes: &[ExecutionOutcome],
    now: i64,
    events: &mut EventBatch,
) -> StoreResult<RunRecord> {
    let mut rows = BoundRows::new(OUTCOMES);
    for o in outcomes {
        rows.push([
            o.id.into(),
            o.status.as_str().into(),
            o.message_status.into(),
            (&o.provider_id).into(),
            o.duration_seconds.into(),
            (&o.error_details).into(),
            (&o.retry_reason).into(),
            o.next_attempt_at.into(),
        ]);
    }
    // A retry that reached the provider replaces the id an earlier attempt
    // left (a voice call that went unanswered): that id no longer finds
    // the execution. Only executions this update will write are touched.
    let replacing = BoundRows::ids(
        outcomes
            .iter()
            .filter(|o| o.attempt > 1 && o.provider_id.is_some())
            .map(|o| o.id),
    );
    if !replacing.is_empty() {
        for chunk in replacing.chunks(dialect::ROWS) {
            sqlx::query_with(
                sql_rows!(
                    &chunk,
                    "DELETE FROM provider_messages WHERE (provider_message_id, execution_id) IN (
                         SELECT e.provider_message_id, e.id FROM executions e
                         WHERE e.id IN (SELECT i.id FROM {ROWS} AS i)
                           AND e.status = 'in_progress' AND e.provider_message_id IS NOT NULL)"
                ),
                chunk.arguments::<Db>(&[], &[]),
            )
            .execute(&mut *conn)
            .await?;
        }
    }
    // Only executions still in progress are updated: one a new worker
    // already wrote off must not be counted twice. Such ones are rare; a
    // dialect either asks for them first (usually no row) or learns the
    // updated ids from `RETURNING`, whichever costs its backend less
    // (`RETURN_UPDATED_IDS`). Asking first is for SQLite, whose one
    // writer keeps both statements seeing the same executions.
    let written_off: Vec<i64> = if dialect::RETURN_UPDATED_IDS {
        let mut updated = std::collections::HashSet::new();
        for chunk in rows.chunks(dialect::ROWS) {
            let returned: Vec<i64> = sqlx::query_scalar_with(
                sql_rows!(&chunk, "{RECORD_OUTCOMES} RETURNING executions.id"),
                chunk.arguments::<Db>(&[now.into(), now.into()], &[]),
            )
            .fetch_all(&mut *conn)
            .await?;
            updated.extend(returned);
        }
        outcomes
            .iter()
            .map(|o| o.id)
            .filter(|id| !updated.contains(id))
            .collect()
    } else {
        let ids = BoundRows::ids(outcomes.iter().map(|o| o.id));
        let mut written_off = Vec::new();
        for chunk in ids.chunks(dialect::ROWS) {
            let found: Vec<i64> = sqlx::query_scalar_with(
                sql_rows!(
                    &chunk,
                    "SELECT id FROM executions
                     WHERE id IN (SELECT i.id FROM {ROWS} AS i) AND status <> 'in_progress'"
                ),
                chunk.arguments::<Db>(&[], &[]),
            )
            .fetch_all(&mut *conn)
            .await?;
            written_off.extend(found);
        }
        for chunk in rows.chunks(dialect::ROWS) {
            sqlx::query_with(
                sql_rows!(&chunk, "{RECORD_OUTCOMES}"),
                chunk.arguments::<Db>(&[now.into(), now.into()], &[]),
            )
            .execute(&mut *conn)
            .await?;
        }
        written_off
    };
    let updated = |o: &&ExecutionOutcome| !written_off.contains(&o.id);
    // The ids receipts and callbacks will be matched by.
    let mut provider_ids = BoundRows::new(PROVIDER_IDS);
    for o in outcomes.iter().filter(updated) {
        if let Some(provider_id) = &o.provider_id {
            provider_ids.push([provider_id.into(), o.id.into()]);
        }
    }
    if !provider_ids.is_empty() {
        for chunk in provider_ids.chunks(dialect::ROWS) {
            // (`WHERE true` tells SQLite the ON CONFLICT is not a join's ON.)
            sqlx::query_with(
                sql_rows!(
                    &chunk,
                    "INSERT INTO provider_messages (provider_message_id, execution_id)
                     SELECT m.provider_id, m.execution_id FROM {ROWS} AS m WHERE true
                     ON CONFLICT DO NOTHING"
                ),
                chunk.arguments::<Db>(&[], &[]),
            )
            .execute(&mut *conn)
            .await?;
        }
    }

    lock_run(&mut *conn, run_id).await?;
    let mut deltas: BTreeMap<i64, Delta> = BTreeMap::new();
    let (mut successes, mut failures, mut charged) = (0i64, 0i64, 0i64);
    for o in outcomes.iter().filter(updated) {
        let d = deltas.entry(o.batch_sequence).or_default();
        d.processing -= 1;
        if o.status == ExecutionStatus::Pending {
            d.pending += 1;
        } else if o.status.is_success() {
            d.sent += 1;
            successes += 1;
            charged += o.charged_units;
        } else {
            d.failed += 1;
            failures += 1;
        }
    }
    let counters = apply_batch_deltas(&mut *conn, run_id, &deltas).await?;
    let closed = close_finished_batches(&mut *conn, run_id, now).await?;
    let change = RunChange {
        counters,
        completed_batches: closed.len() as i64,
        charged,
        sent_at: (successes > 0).then_some(now),
        updated_at: Some(now),
    };
    let run = update_run(&mut *conn, run_id, &change).await?;
    announce_closed_batches(&run, &closed, events);
    if successes + failures > 0 {
        sqlx::query(
            sql!("INSERT INTO metrics_minutes (campaign_id, minute, completed, failed) VALUES (?, ?, ?, ?)
             ON CONFLICT (campaign_id, minute) DO UPDATE SET
                completed = metrics_minutes.completed + excluded.completed,
                failed = metrics_minutes.failed + excluded.failed"),
        )
        .bind(run.campaign_id)
        .bind(now / 60_000)
        .bind(successes)
        .bind(failures)
        .execute(&mut *conn)
        .await?;
    }
    Ok(run)
}

/// Adds a run's progress event. Callers add it last, with the counters
/// their transaction commits, so that its `ts` (see [`EventBatch::append`])
/// is when those were committed.
fn push_progress(run: &RunRecord, events: &mut EventBatch) {
    events.push(run.campaign_id, "progress", run_event_data(run), Some(run));
}

/// Copies a run's recipients from the campaign's contacts, numbered in id
/// order into batches (`?2` each) and campaign ordinals (after `?6`).
/// `{contacts}` picks the campaign's contacts, `?7..=?8` being their ids'
/// range, and `{number}` is a recipient's number from 1 in id order (see
/// `freeze_run`); `?5` keeps only recipients whose execution in their
/// latest earlier run ended failed, no_answer or busy.
const FREEZE: &str =
    "INSERT INTO executions (run_id, campaign_id, batch_sequence, contact_id, phone, name,
                                     variables, status, updated_at, campaign_ordinal)
             SELECT ?1, c.campaign_id, ({number} - 1) / ?2 + 1,
                    c.id, c.phone, c.name, c.variables, 'pending', ?3, ?6 + {number}
             FROM contacts c
             WHERE {contacts} AND (NOT ?5 OR c.id IN (
                 SELECT e.contact_id FROM executions e
                 JOIN (SELECT contact_id, MAX(run_id) AS run_id FROM executions
                       WHERE campaign_id = ?4 AND run_id <> ?1 GROUP BY contact_id) latest
                   ON latest.contact_id = e.contact_id AND latest.run_id = e.run_id
                 WHERE e.status IN ('failed', 'no_answer', 'busy')))
             ORDER BY c.id";

/// [`FREEZE`]'s `{contacts}`: along the campaign's id range, or through
/// its `(campaign_id, phone)` index.
const ALONG_IDS: &str = "c.id BETWEEN ?7 AND ?8 AND +c.campaign_id = ?4";
const THROUGH_INDEX: &str = "c.campaign_id = ?4 AND +c.id BETWEEN ?7 AND ?8";
/// [`FREEZE`]'s `{number}`: by id, when every id of the range is the
/// campaign's, or by a window.
const BY_ID: &str = "(c.id - ?7 + 1)";
const BY_WINDOW: &str = "ROW_NUMBER() OVER (ORDER BY c.id)";

fn freeze(contacts: &str, number: &str) -> String {
    FREEZE
        .replace("{contacts}", contacts)
        .replace("{number}", number)
}

#[async_trait]
impl EngineStore for SqlStore {
    async fn claim_run(
        &self,
        worker: &str,
        now: i64,
        lease_ms: i64,
        busy: &[i64],
    ) -> StoreResult<Option<RunRecord>> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        // A due run to freeze and start: one worker alone, under a run lease.
        let due: Option<(i64, String, i64)> = sqlx::query_as(sql!(
            "SELECT r.id, r.status, r.campaign_id FROM runs r JOIN campaigns c ON c.id = r.campaign_id
             WHERE (r.status = 'scheduled' AND r.scheduled_at <= ? AND c.status IN ('scheduled', 'running'))
                OR (r.status = 'claimed' AND (r.lease_owner IS NULL OR r.lease_expires_at < ?)
                    AND c.status IN ('running', 'cancelled'))
             ORDER BY r.scheduled_at LIMIT 1 {}",
            dialect::CLAIM_LOCK
        ))
        .bind(now)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((run_id, status, campaign_id)) = due {
            sqlx::query(sql!(
                "UPDATE runs SET status = 'claimed', lease_owner = ?, lease_expires_at = ?,
                        claimed_at = COALESCE(claimed_at, ?), updated_at = ?
                 WHERE id = ?"
            ))
            .bind(worker)
            .bind(now + lease_ms)
            .bind(now)
            .bind(now)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
            if status == "scheduled" {
                sqlx::query(sql!(
                    "UPDATE campaigns SET status = 'running', started_at = COALESCE(started_at, ?),
                            updated_at = ?
                     WHERE id = ? AND status = 'scheduled'"
                ))
                .bind(now)
                .bind(now)
                .bind(campaign_id)
                .execute(&mut *tx)
                .await?;
            }
            let run = fetch_run(&mut tx, run_id).await?;
            tx.commit().await?;
            return Ok(Some(run));
        }
        // A running run to join: a batch is free (never leased, released,
        // or its worker's lease expired), or it only needs finalising.
        // Among the first `busy.len() + 1` candidates at most `busy.len()`
        // are this node's own, so the first one that is not is the answer.
        let candidates: Vec<i64> = sqlx::query_scalar(sql!(
            "SELECT r.id FROM runs r JOIN campaigns c ON c.id = r.campaign_id
             WHERE r.status = 'running' AND c.status IN ('running', 'cancelled')
               AND (c.status = 'cancelled'
                    OR EXISTS (SELECT 1 FROM batches b WHERE b.run_id = r.id
                        AND b.status IN ('pending', 'running') AND (b.pending > 0 OR b.processing > 0)
                        AND (b.lease_owner IS NULL OR b.lease_expires_at < ?))
                    OR NOT EXISTS (SELECT 1 FROM batches b WHERE b.run_id = r.id
                        AND b.status IN ('pending', 'running')))
             ORDER BY r.id LIMIT ?"
        ))
        .bind(now)
        .bind(busy.len() as i64 + 1)
        .fetch_all(&mut *tx)
        .await?;
        let join = candidates.into_iter().find(|id| !busy.contains(id));
        let run = match join {
            Some(run_id) => Some(fetch_run(&mut tx, run_id).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(run)
    }

    fn tasks_per_run(&self) -> usize {
        dialect::TASKS_PER_RUN
    }

    async fn next_due_at(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(sql!(
            "SELECT MIN(scheduled_at) FROM runs WHERE status = 'scheduled'"
        ))
        .fetch_one(&mut *self.read().await?)
        .await?)
    }

    async fn freeze_run(&self, run_id: i64, snapshot: &RunSnapshot) -> StoreResult<RunRecord> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        let run = fetch_run(&mut tx, run_id).await?;
        if run.frozen_at.is_some() {
            return Ok(run);
        }
        let now = now_ms();
        let only_failed = run.recipients == Recipients::Failed;
        // Ordinals continue the campaign's earlier runs; the campaign row
        // lock keeps two runs of one campaign from freezing at once.
        if !dialect::ROW_LOCK.is_empty() {
            sqlx::query(sql!(
                "SELECT id FROM campaigns WHERE id = ? {}",
                dialect::ROW_LOCK
            ))
            .bind(run.campaign_id)
            .execute(&mut *tx)
            .await?;
        }
        let ordinals_before: i64 = sqlx::query_scalar(sql!(
            "SELECT COALESCE(MAX(campaign_ordinal), 0) FROM executions WHERE campaign_id = ?"
        ))
        .bind(run.campaign_id)
        .fetch_one(&mut *tx)
        .await?;
        // A campaign's contacts are mostly imported together, so their ids
        // tend to form one dense range. Read in id order along that range,
        // the freeze numbers them as they stream by; read through the
        // campaign's (campaign_id, phone) index, a million contacts came in
        // phone order, each a jump into the table, and were sorted again
        // for the window: 3.7 s instead of 2.0 s for a million contacts
        // imported in shuffled phone order. Contacts scattered among other
        // campaigns' (the range twice their number or more) keep the index.
        let (count, first, last): (i64, Option<i64>, Option<i64>) = sqlx::query_as(sql!(
            "SELECT COUNT(*), MIN(id), MAX(id) FROM contacts WHERE campaign_id = ?"
        ))
        .bind(run.campaign_id)
        .fetch_one(&mut *tx)
        .await?;
        let (first, last) = (first.unwrap_or(0), last.unwrap_or(-1));
        let dense = last - first < 2 * count;
        // A range of ids that are all the campaign's (contacts imported
        // together, none deleted since) numbers each recipient by its id.
        // Otherwise a window numbers them, which SQLite runs through a
        // temporary table: 2.7-3.5 s instead of 2.0-2.7 for a million
        // (the statement alone, sqlite3, alternating runs).
        let every_id = count == last - first + 1 && !only_failed;
        let insert = match (dense, every_id) {
            (true, true) => sql!("{}", freeze(ALONG_IDS, BY_ID)),
            (true, false) => sql!("{}", freeze(ALONG_IDS, BY_WINDOW)),
            (false, _) => sql!("{}", freeze(THROUGH_INDEX, BY_WINDOW)),
        };
        sqlx::query(insert)
            .bind(run_id)
            .bind(BATCH_SIZE)
            .bind(now)
            .bind(run.campaign_id)
            .bind(only_failed)
            .bind(ordinals_before)
            .bind(first)
            .bind(last)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql!(
            "INSERT INTO batches (run_id, batch_sequence, status, recipient_count, pending)
             SELECT ?, batch_sequence, 'pending', COUNT(*), COUNT(*) FROM executions
             WHERE run_id = ? GROUP BY batch_sequence"
        ))
        .bind(run_id)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            sql!("UPDATE runs SET snapshot = ?2, frozen_at = ?3, updated_at = ?3,
                total = (SELECT CAST(COALESCE(SUM(recipient_count), 0) AS BIGINT) FROM batches WHERE run_id = ?1),
                pending = (SELECT CAST(COALESCE(SUM(recipient_count), 0) AS BIGINT) FROM batches WHERE run_id = ?1),
                total_batches = (SELECT COUNT(*) FROM batches WHERE run_id = ?1)
             WHERE id = ?1"),
        )
        .bind(run_id)
        .bind(serde_json::to_string(snapshot).expect("snapshot serialises"))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let run = fetch_run(&mut tx, run_id).await?;
        tx.commit().await?;
        Ok(run)
    }

    async fn price_executions(&self, run_id: i64, price: PriceRecipient) -> StoreResult<i64> {
        // Parts by primary-key range: a run's executions are inserted by
        // one statement, so their ids are (nearly) contiguous and each part
        // is a short range read. Keyset pages `ORDER BY id` on the run's
        // index sorted the whole run per page: ten seconds at a million.
        // (`+run_id` keeps SQLite from scanning the run's index instead.)
        const PART: i64 = 20_000;
        let (first, last): (Option<i64>, Option<i64>) = sqlx::query_as(sql!(
            "SELECT MIN(id), MAX(id) FROM executions WHERE run_id = ?"
        ))
        .bind(run_id)
        .fetch_one(&mut *self.read().await?)
        .await?;
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(0);
        };
        // Each part is priced in a read job of its own, where its rows are
        // read: no record, map or message is kept per recipient. Pricing
        // is the whole of a run's start, while the writer waits, so the
        // parts use every core: one at a time took 1.4 s at a million.
        let part = |from: i64| {
            let price = std::sync::Arc::clone(&price);
            dialect::read_job(&self.reader, move |reader| {
                use crate::store::columns::ReadRows as _;
                let mut cost = 0i64;
                reader.each_row(
                    sql!(
                        "SELECT phone, name, variables FROM executions
                         WHERE id >= ? AND id < ? AND +run_id = ?"
                    ),
                    vec![
                        Param::Int(from),
                        Param::Int(from + PART),
                        Param::Int(run_id),
                    ],
                    &mut |row| {
                        cost += price(&RecipientRow {
                            phone: row.text(0)?,
                            name: row.opt_text(1)?,
                            variables: Variables::parse(row.text(2)?)?,
                        });
                        Ok(())
                    },
                )?;
                Ok(cost)
            })
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut parts = futures::stream::iter((first..=last).step_by(PART as usize))
            .map(part)
            .buffer_unordered(cores.max(2));
        let mut cost = 0;
        while let Some(part_cost) = parts.next().await {
            cost += part_cost?;
        }
        Ok(cost)
    }

    async fn start_run(&self, run_id: i64, cost_units: i64, now: i64) -> StoreResult<RunUpdate> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        lock_run(&mut tx, run_id).await?;
        let run = fetch_run(&mut tx, run_id).await?;
        if run.status != RunStatus::Claimed {
            return Ok(RunUpdate {
                run,
                events: vec![],
            });
        }
        let (workspace_id, balance): (i64, Option<i64>) = sqlx::query_as(sql!(
            "SELECT w.id, w.credit_balance FROM workspaces w
             JOIN campaigns c ON c.workspace_id = w.id WHERE c.id = ?"
        ))
        .bind(run.campaign_id)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(balance) = balance {
            if balance < cost_units {
                drop(tx);
                let reason = format!(
                    "insufficient credits: the run costs {cost_units} and the workspace has {balance}"
                );
                sqlx::query(sql!("UPDATE runs SET cost_units = ? WHERE id = ?"))
                    .bind(cost_units)
                    .bind(run_id)
                    .execute(&self.writer)
                    .await?;
                return self.finish_run(run_id, &RunEnd::Failed(reason), now).await;
            }
            if cost_units > 0 {
                let after: i64 = sqlx::query_scalar(sql!(
                    "UPDATE workspaces SET credit_balance = credit_balance - ? WHERE id = ?
                     RETURNING credit_balance"
                ))
                .bind(cost_units)
                .bind(workspace_id)
                .fetch_one(&mut *tx)
                .await?;
                ledger_entry(
                    &mut tx,
                    workspace_id,
                    Some(run_id),
                    "reserve",
                    -cost_units,
                    after,
                    "reserved when the run was claimed",
                    now,
                )
                .await?;
            }
        }
        let reserved = if balance.is_some() { cost_units } else { 0 };
        sqlx::query(
            sql!("UPDATE runs SET status = 'running', started_at = COALESCE(started_at, ?), cost_units = ?,
                    reserved_credits = ?, updated_at = ?
             WHERE id = ?"),
        )
        .bind(now)
        .bind(cost_units)
        .bind(reserved)
        .bind(now)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        let run = fetch_run(&mut tx, run_id).await?;
        let event = append_event(
            &mut tx,
            run.campaign_id,
            "run_started",
            run_event_data(&run),
            Some(&run),
        )
        .await?;
        tx.commit().await?;
        Ok(RunUpdate {
            run,
            events: vec![event],
        })
    }

    async fn release_run(&self, run_id: i64, worker: &str) -> StoreResult<()> {
        sqlx::query(sql!(
            "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL
             WHERE id = ? AND lease_owner = ?"
        ))
        .bind(run_id)
        .bind(worker)
        .execute(&self.writer)
        .await?;
        sqlx::query(sql!(
            "UPDATE batches SET lease_owner = NULL, lease_expires_at = NULL
             WHERE run_id = ? AND lease_owner = ?"
        ))
        .bind(run_id)
        .bind(worker)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn take_slice(
        &self,
        run_id: i64,
        worker: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> StoreResult<Slice> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        lock_run(&mut tx, run_id).await?;
        let mut events = EventBatch::default();
        let (mut slice, _) = take_slice_in(
            &mut tx,
            run_id,
            worker,
            now,
            lease_until,
            limit,
            &mut events,
        )
        .await?;
        slice.events = events.append(&mut tx).await?;
        tx.commit().await?;
        Ok(slice)
    }

    async fn record_outcomes(
        &self,
        run_id: i64,
        outcomes: &[ExecutionOutcome],
        now: i64,
    ) -> StoreResult<RunUpdate> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        let mut events = EventBatch::default();
        let run = record_outcomes_in(&mut tx, run_id, outcomes, now, &mut events).await?;
        push_progress(&run, &mut events);
        let events = events.append(&mut tx).await?;
        tx.commit().await?;
        Ok(RunUpdate { run, events })
    }

    async fn unclaim(&self, run_id: i64, execution_ids: &[i64], now: i64) -> StoreResult<()> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        lock_run(&mut tx, run_id).await?;
        let ids = BoundRows::ids(execution_ids.iter().copied());
        let mut returned: Vec<i64> = Vec::new();
        for chunk in ids.chunks(dialect::ROWS) {
            let sequences: Vec<i64> = sqlx::query_scalar_with(
                sql_rows!(
                    &chunk,
                    "UPDATE executions SET status = 'pending', attempts = attempts - 1, updated_at = ?
                     WHERE id IN (SELECT i.id FROM {ROWS} AS i)
                       AND run_id = ? AND status = 'in_progress'
                     RETURNING batch_sequence"
                ),
                chunk.arguments::<Db>(&[now.into()], &[run_id.into()]),
            )
            .fetch_all(&mut *tx)
            .await?;
            returned.extend(sequences);
        }
        let mut deltas: BTreeMap<i64, Delta> = BTreeMap::new();
        for sequence in returned {
            let d = deltas.entry(sequence).or_default();
            d.processing -= 1;
            d.pending += 1;
        }
        apply_deltas(&mut tx, run_id, &deltas).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_and_take(
        &self,
        run_id: i64,
        outcomes: &[ExecutionOutcome],
        worker: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> StoreResult<(RunUpdate, Slice)> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        // `record_outcomes_in` takes the run's lock, which `take_slice_in`
        // needs.
        let mut events = EventBatch::default();
        record_outcomes_in(&mut tx, run_id, outcomes, now, &mut events).await?;
        let (slice, run) = take_slice_in(
            &mut tx,
            run_id,
            worker,
            now,
            lease_until,
            limit,
            &mut events,
        )
        .await?;
        // Progress last, with the counters the transaction commits.
        push_progress(&run, &mut events);
        let events = events.append(&mut tx).await?;
        tx.commit().await?;
        Ok((RunUpdate { run, events }, slice))
    }

    async fn finish_run(&self, run_id: i64, end: &RunEnd, now: i64) -> StoreResult<RunUpdate> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        // Workers sharing the run may all see it end: the first finalises,
        // the others find it terminal (and refund nothing twice).
        lock_run(&mut tx, run_id).await?;
        let before = fetch_run(&mut tx, run_id).await?;
        if before.status.is_terminal() {
            return Ok(RunUpdate {
                run: before,
                events: vec![],
            });
        }
        let (status, campaign_status, reason) = match end {
            RunEnd::Completed => ("completed", "completed", None),
            RunEnd::Failed(reason) => ("failed", "failed", Some(reason.as_str())),
            RunEnd::Cancelled => ("cancelled", "cancelled", Some("the campaign was cancelled")),
        };
        // The counters are exact, so a run that completed (nothing pending,
        // nothing in flight) skips two scans of all its executions.
        if before.counters.pending > 0 {
            bulk_move(
                &mut tx,
                run_id,
                None,
                ExecutionStatus::Pending,
                ExecutionStatus::Skipped,
                None,
                now,
            )
            .await?;
        }
        if before.counters.processing > 0 {
            bulk_move(
                &mut tx,
                run_id,
                None,
                ExecutionStatus::InProgress,
                ExecutionStatus::Failed,
                Some("outcome unknown: the run ended while this was being sent"),
                now,
            )
            .await?;
        }
        // The batches' events go before the campaign's status changes, so
        // that their snapshots show it as it was when they closed.
        let mut closed = EventBatch::default();
        close_and_announce_batches(&mut tx, run_id, now, &mut closed).await?;
        let mut events = closed.append(&mut tx).await?;

        // Refund what was reserved and not spent.
        let refund = (before.reserved_credits - before.charged_credits).max(0);
        if refund > 0 {
            let (workspace_id, after): (i64, i64) = sqlx::query_as(sql!(
                "UPDATE workspaces SET credit_balance = credit_balance + ?
                 WHERE id = (SELECT workspace_id FROM campaigns WHERE id = ?)
                 RETURNING id, credit_balance"
            ))
            .bind(refund)
            .bind(before.campaign_id)
            .fetch_one(&mut *tx)
            .await?;
            let note = format!("unsent part of a {status} run");
            ledger_entry(
                &mut tx,
                workspace_id,
                Some(run_id),
                "refund",
                refund,
                after,
                &note,
                now,
            )
            .await?;
        }
        sqlx::query(sql!(
            "UPDATE runs SET status = ?, error = ?, completed_at = ?, refunded_credits = ?,
                    lease_owner = NULL, lease_expires_at = NULL, updated_at = ?
             WHERE id = ?"
        ))
        .bind(status)
        .bind(reason)
        .bind(now)
        .bind(refund)
        .bind(now)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(sql!(
            "UPDATE campaigns SET status = ?, completed_at = ?, updated_at = ?
             WHERE id = ? AND status IN ('scheduled', 'running', 'paused', 'cancelled')"
        ))
        .bind(campaign_status)
        .bind(now)
        .bind(now)
        .bind(before.campaign_id)
        .execute(&mut *tx)
        .await?;
        let run = fetch_run(&mut tx, run_id).await?;
        let mut data = run_event_data(&run);
        data["error"] = json!(reason);
        let event = append_event(
            &mut tx,
            run.campaign_id,
            &format!("run_{status}"),
            data,
            Some(&run),
        )
        .await?;
        events.push(event);
        tx.commit().await?;
        Ok(RunUpdate { run, events })
    }

    async fn record_receipts(&self, receipts: &[Receipt], now: i64) -> StoreResult<ReceiptReport> {
        if receipts.is_empty() {
            return Ok(ReceiptReport::default());
        }
        let mut rows = BoundRows::new(RECEIPTS);
        for r in receipts {
            let status = if r.delivered { "delivered" } else { "failed" };
            rows.push([(&r.provider_id).into(), status.into(), (&r.error).into()]);
        }
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        // A receipt settles a `sent` message once: repeats and late
        // contradictions match no row and are acknowledged, not counted.
        // Each message is found by its own index lookup (a scalar subquery
        // cannot be turned into a join): on Postgres, statistics taken
        // before a run's sends made the planner hash-join every receipt
        // batch against all of the run's messages, 70 ms a batch at 1M.
        let mut settled: Vec<(i64, i64, String)> = Vec::with_capacity(receipts.len());
        for chunk in rows.chunks(dialect::ROWS) {
            let settled_here: Vec<(i64, i64, String)> = sqlx::query_as_with(
                sql_rows!(
                    &chunk,
                    "UPDATE executions SET message_status = r.status,
                            delivered_at = CASE WHEN r.status = 'delivered' THEN ? ELSE NULL END,
                            error_details = COALESCE(r.error, executions.error_details), updated_at = ?
                     FROM (SELECT (SELECT e.id FROM provider_messages p
                                   JOIN executions e ON e.id = p.execution_id
                                   WHERE p.provider_message_id = b.provider_id
                                     AND e.provider_message_id = p.provider_message_id
                                     AND e.message_status = 'sent' LIMIT 1) AS id,
                                  b.status, b.error
                           FROM {ROWS} AS b {}) AS r
                     WHERE executions.id = r.id AND executions.message_status = 'sent'
                     RETURNING executions.run_id, executions.batch_sequence, executions.message_status",
                    dialect::PLANNING_FENCE
                ),
                chunk.arguments::<Db>(&[now.into(), now.into()], &[]),
            )
            .fetch_all(&mut *tx)
            .await?;
            settled.extend(settled_here);
        }
        let mut per_batch: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
        for (run_id, sequence, status) in &settled {
            let entry = per_batch.entry((*run_id, *sequence)).or_default();
            if status == "delivered" {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
        let mut per_run: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for ((run_id, _), (delivered, failed)) in &per_batch {
            let entry = per_run.entry(*run_id).or_default();
            entry.0 += delivered;
            entry.1 += failed;
        }
        // Runs first, then batches, then the campaigns' logs: the order
        // every engine transaction locks them in.
        let mut campaigns = Vec::new();
        for (run_id, (delivered, failed)) in &per_run {
            let row = sqlx::query(sql!(
                "UPDATE runs SET delivered = delivered + ?, failed_delivery = failed_delivery + ?,
                        updated_at = ?
                 WHERE id = ?
                 RETURNING {RUN_COLUMNS},
                    (SELECT workspace_id FROM campaigns c WHERE c.id = runs.campaign_id) AS workspace_id"
            ))
            .bind(delivered)
            .bind(failed)
            .bind(now)
            .bind(run_id)
            .fetch_one(&mut *tx)
            .await?;
            let workspace_id: i64 = row.try_get("workspace_id")?;
            campaigns.push((run_from_row(&row)?, workspace_id, delivered + failed));
        }
        for ((run_id, sequence), (delivered, failed)) in per_batch {
            sqlx::query(sql!(
                "UPDATE batches SET delivered = delivered + ?, failed_delivery = failed_delivery + ?
                 WHERE run_id = ? AND batch_sequence = ?"
            ))
            .bind(delivered)
            .bind(failed)
            .bind(run_id)
            .bind(sequence)
            .execute(&mut *tx)
            .await?;
        }
        let applied = settled.len() as u64;
        let mut unknown_ids: Vec<String> = Vec::new();
        if applied < receipts.len() as u64 {
            for chunk in rows.chunks(dialect::ROWS) {
                // Not settled, not even now: no such message yet, or (on
                // Postgres) its send was committed after the UPDATE above
                // took its snapshot. Either way the caller may try again.
                let unknown: Vec<String> = sqlx::query_scalar_with(
                    sql_rows!(
                        &chunk,
                        "SELECT b.provider_id FROM {ROWS} AS b WHERE
                           (SELECT e.id FROM provider_messages p
                            JOIN executions e ON e.id = p.execution_id
                            WHERE p.provider_message_id = b.provider_id
                              AND e.provider_message_id = p.provider_message_id
                              AND e.message_status IN ('delivered', 'failed') LIMIT 1) IS NULL"
                    ),
                    chunk.arguments::<Db>(&[], &[]),
                )
                .fetch_all(&mut *tx)
                .await?;
                unknown_ids.extend(unknown);
            }
        }
        let unknown = unknown_ids.len() as i64;
        // Progress last, as in `record_and_take`.
        let mut progress = Vec::with_capacity(campaigns.len());
        for (run, workspace_id, receipts) in &campaigns {
            let data = json!({"receipts": receipts});
            let event = append_event(&mut tx, run.campaign_id, "progress", data, Some(run)).await?;
            progress.push((run.campaign_id, *workspace_id, event));
        }
        let campaigns = progress;
        tx.commit().await?;
        Ok(ReceiptReport {
            applied,
            unknown: unknown as u64,
            duplicate: (receipts.len() as u64).saturating_sub(applied + unknown as u64),
            unknown_ids,
            campaigns,
        })
    }

    async fn add_credits(
        &self,
        workspace_id: i64,
        amount: i64,
        note: Option<&str>,
    ) -> StoreResult<Workspace> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        let after: i64 = sqlx::query_scalar(sql!(
            "UPDATE workspaces SET credit_balance = COALESCE(credit_balance, 0) + ? WHERE id = ?
             RETURNING credit_balance"
        ))
        .bind(amount)
        .bind(workspace_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        ledger_entry(
            &mut tx,
            workspace_id,
            None,
            "topup",
            amount,
            after,
            note.unwrap_or(""),
            now_ms(),
        )
        .await?;
        tx.commit().await?;
        self.workspace(workspace_id).await
    }

    async fn append_external_events(
        &self,
        campaign_id: i64,
        events: &[(String, serde_json::Value)],
        finish: Option<crate::domain::CampaignStatus>,
    ) -> StoreResult<Vec<StoredEvent>> {
        let now = now_ms();
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        sqlx::query(
            sql!("UPDATE campaigns SET status = 'running', started_at = COALESCE(started_at, ?), updated_at = ?
             WHERE id = ? AND status IN ('draft', 'scheduled')"),
        )
        .bind(now)
        .bind(now)
        .bind(campaign_id)
        .execute(&mut *tx)
        .await?;
        let mut batch = EventBatch::default();
        for (kind, data) in events {
            batch.push(campaign_id, kind, data.clone(), None);
        }
        let mut stored = batch.append(&mut tx).await?;
        if let Some(end) = finish {
            let changed = sqlx::query(sql!(
                "UPDATE campaigns SET status = ?, completed_at = ?, updated_at = ?
                 WHERE id = ? AND status IN ('running', 'paused')"
            ))
            .bind(end.as_str())
            .bind(now)
            .bind(now)
            .bind(campaign_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if changed > 0 {
                stored.push(
                    append_event(
                        &mut tx,
                        campaign_id,
                        "campaign_status",
                        json!({"status": end.as_str()}),
                        None,
                    )
                    .await?,
                );
            }
        }
        tx.commit().await?;
        Ok(stored)
    }

    async fn credit_ledger(&self, workspace_id: i64, limit: i64) -> StoreResult<Vec<LedgerEntry>> {
        sqlx::query(sql!(
            "SELECT id, run_id, kind, amount, balance_after, note, created_at FROM credit_ledger
             WHERE workspace_id = ? ORDER BY id DESC LIMIT ?"
        ))
        .bind(workspace_id)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(LedgerEntry {
                id: row.try_get("id")?,
                run_id: row.try_get("run_id")?,
                kind: row.try_get("kind")?,
                amount: row.try_get("amount")?,
                balance_after: row.try_get("balance_after")?,
                note: row.try_get("note")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
    }
}
