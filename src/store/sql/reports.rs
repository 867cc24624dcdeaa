//! Reads behind the seed surfaces and the dashboard. Counters come from
//! the `runs` and `batches` rows, never from counting executions.

use async_trait::async_trait;
use sqlx::Row;

use super::engine::run_from_row;
use super::{campaign_from_row, dialect, DbRow, SqlStore};
use crate::domain::{ExecutionStatus, RunStatus};
use crate::store::columns::{
    campaign_from_columns, counters_from_columns, Param, ReadRows, CAMPAIGN_COLUMNS,
    CAMPAIGN_COLUMN_COUNT, EXECUTION_COLUMNS, RUN_COLUMNS,
};
use crate::store::*;

fn batch_from_row(row: &DbRow) -> StoreResult<BatchRecord> {
    let error: Option<String> = row.try_get("error_detail")?;
    Ok(BatchRecord {
        run_id: row.try_get("run_id")?,
        batch_sequence: row.try_get("batch_sequence")?,
        status: row.try_get("status")?,
        recipient_count: row.try_get("recipient_count")?,
        counters: Counters {
            total: row.try_get("recipient_count")?,
            pending: row.try_get("pending")?,
            processing: row.try_get("processing")?,
            sent: row.try_get("sent")?,
            failed: row.try_get("failed")?,
            skipped: row.try_get("skipped")?,
            delivered: row.try_get("delivered")?,
            failed_delivery: row.try_get("failed_delivery")?,
        },
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        error_detail: error.and_then(|e| serde_json::from_str(&e).ok()),
    })
}

/// The statement that selects a page of a campaign's executions, newest
/// first; `None` when the page is past the last one.
fn execution_select(
    reader: &mut dialect::Reader<'_>,
    campaign_id: i64,
    query: &ExecutionQuery,
) -> StoreResult<Option<(String, Vec<Param>)>> {
    if query.is_unfiltered() && query.before_id.is_none() && query.offset > 0 {
        // Ordinals number the campaign's executions 1..n in id order: the
        // page at any offset is one index range, below the newest ordinal
        // (one more index lookup in the same statement).
        return Ok(Some((
            format!(
                "SELECT {EXECUTION_COLUMNS} FROM executions WHERE campaign_id = ? AND campaign_ordinal <=
                     (SELECT COALESCE(MAX(campaign_ordinal), 0) FROM executions WHERE campaign_id = ?) - ?
                 ORDER BY campaign_ordinal DESC LIMIT ?"
            ),
            vec![
                Param::Int(campaign_id),
                Param::Int(campaign_id),
                Param::Int(query.offset),
                Param::Int(query.limit),
            ],
        )));
    }
    // Only the predicates in use, so the (campaign_id, id) index drives the
    // scan.
    let mut filter = String::from(" WHERE campaign_id = ?");
    let mut params = vec![Param::Int(campaign_id)];
    if let Some(status) = query.status {
        filter.push_str(" AND status = ?");
        params.push(Param::Text(status.as_str().to_owned()));
    }
    if let Some(run_id) = query.run_id {
        filter.push_str(" AND run_id = ?");
        params.push(Param::Int(run_id));
    }
    // A deep offset of a filtered list is first turned into a keyset bound
    // by an index-only query, so rows above it are never read.
    let mut below = query.before_id;
    if below.is_none() && query.offset > 0 {
        let mut boundary_params = params.clone();
        boundary_params.push(Param::Int(query.offset - 1));
        let ids: Vec<i64> = reader.rows(
            &format!("SELECT id FROM executions{filter} ORDER BY id DESC LIMIT 1 OFFSET ?"),
            boundary_params,
        )?;
        let Some(id) = ids.first() else {
            return Ok(None);
        };
        below = Some(*id);
    }
    if let Some(below) = below {
        filter.push_str(" AND id < ?");
        params.push(Param::Int(below));
    }
    params.push(Param::Int(query.limit));
    Ok(Some((
        format!("SELECT {EXECUTION_COLUMNS} FROM executions{filter} ORDER BY id DESC LIMIT ?"),
        params,
    )))
}

/// A campaign's executions (in one status, if given), on every page.
fn execution_total(
    reader: &mut dialect::Reader<'_>,
    campaign_id: i64,
    status: Option<ExecutionStatus>,
) -> StoreResult<i64> {
    let total: Vec<i64> = match status {
        // The runs' totals are exact and need no scan.
        None => reader.rows(
            "SELECT CAST(COALESCE(SUM(total), 0) AS BIGINT) FROM runs
             WHERE campaign_id = ? AND executions_state = 'kept'",
            vec![Param::Int(campaign_id)],
        )?,
        Some(status) => reader.rows(
            "SELECT COUNT(*) FROM executions WHERE campaign_id = ? AND status = ?",
            vec![Param::Int(campaign_id), Param::Text(status.as_str().into())],
        )?,
    };
    Ok(total.first().copied().unwrap_or_default())
}

#[async_trait]
impl ReportStore for SqlStore {
    async fn run(&self, run_id: i64) -> StoreResult<Option<RunRecord>> {
        sqlx::query(sql!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
            .bind(run_id)
            .fetch_optional(&mut *self.read().await?)
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()
    }

    async fn run_by_uuid(&self, uuid: &str) -> StoreResult<Option<RunRecord>> {
        sqlx::query(sql!("SELECT {RUN_COLUMNS} FROM runs WHERE uuid = ?"))
            .bind(uuid)
            .fetch_optional(&mut *self.read().await?)
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()
    }

    async fn latest_run(&self, campaign_id: i64) -> StoreResult<Option<RunRecord>> {
        sqlx::query(sql!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = ? ORDER BY id DESC LIMIT 1"
        ))
        .bind(campaign_id)
        .fetch_optional(&mut *self.read().await?)
        .await?
        .as_ref()
        .map(run_from_row)
        .transpose()
    }

    async fn runs_of(&self, campaign_id: i64) -> StoreResult<Vec<RunRecord>> {
        sqlx::query(sql!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = ? ORDER BY id DESC"
        ))
        .bind(campaign_id)
        .fetch_all(&mut *self.read().await?)
        .await?
        .iter()
        .map(run_from_row)
        .collect()
    }

    async fn batches(&self, run_id: i64) -> StoreResult<Vec<BatchRecord>> {
        sqlx::query(sql!(
            "SELECT * FROM batches WHERE run_id = ? ORDER BY batch_sequence"
        ))
        .bind(run_id)
        .fetch_all(&mut *self.read().await?)
        .await?
        .iter()
        .map(batch_from_row)
        .collect()
    }

    async fn executions(
        &self,
        campaign_id: i64,
        query: &ExecutionQuery,
    ) -> StoreResult<Vec<ExecutionRecord>> {
        let query = query.clone();
        dialect::read_job(&self.reader, move |reader| {
            match execution_select(reader, campaign_id, &query)? {
                Some((sql, params)) => reader.rows(&sql, params),
                None => Ok(Vec::new()),
            }
        })
        .await
    }

    async fn execution_page(
        &self,
        by: &CampaignRef,
        query: &ExecutionQuery,
        render: RenderPage,
    ) -> StoreResult<Option<RenderedPage>> {
        let (find, by) = match by {
            CampaignRef::Id(id) => (
                "SELECT id, workspace_id FROM campaigns WHERE id = ?",
                Param::Int(*id),
            ),
            CampaignRef::Uuid(uuid) => (
                "SELECT id, workspace_id FROM campaigns WHERE uuid = ?",
                Param::Text(uuid.clone()),
            ),
        };
        let query = query.clone();
        let short = query.reads_one_short_range();
        // One job, so the four reads cost one hand-off to the database
        // thread and back rather than one each; and none for a short page.
        let job = move |reader: &mut dialect::Reader<'_>| {
            let found: Vec<(i64, i64)> = reader.rows(find, vec![by])?;
            let Some(&(campaign_id, workspace_id)) = found.first() else {
                return Ok(None);
            };
            // About 150 bytes of text a row.
            let mut executions = ExecutionRows::with_capacity(query.limit as usize, 160);
            if let Some((sql, params)) = execution_select(reader, campaign_id, &query)? {
                reader.each_row(&sql, params, &mut |row| {
                    executions.push(&ExecutionRow::from_columns(row)?);
                    Ok(())
                })?;
            }
            let total = execution_total(reader, campaign_id, query.status)?;
            let mut run_ids: Vec<i64> = executions.iter().map(|e| e.run_id).collect();
            run_ids.sort_unstable();
            run_ids.dedup();
            let snapshots = if run_ids.is_empty() {
                Vec::new()
            } else {
                let marks = vec!["?"; run_ids.len()].join(", ");
                reader.rows(
                    &format!("SELECT id, snapshot FROM runs WHERE id IN ({marks})"),
                    run_ids.into_iter().map(Param::Int).collect(),
                )?
            };
            render(ExecutionPageRead {
                workspace_id,
                executions,
                total,
                snapshots: snapshots.into_iter().collect(),
            })
            .map(Some)
        };
        if short {
            dialect::read_job_here(&self.reader, job).await
        } else {
            dialect::read_job(&self.reader, job).await
        }
    }

    async fn count_executions(
        &self,
        campaign_id: i64,
        status: Option<ExecutionStatus>,
    ) -> StoreResult<i64> {
        dialect::read_job(&self.reader, move |reader| {
            execution_total(reader, campaign_id, status)
        })
        .await
    }

    async fn run_of_message(&self, provider_id: &str) -> StoreResult<Option<RunRecord>> {
        let run_id: Option<i64> = sqlx::query_scalar(sql!(
            "SELECT e.run_id FROM provider_messages p JOIN executions e ON e.id = p.execution_id
             WHERE p.provider_message_id = ? AND e.provider_message_id = p.provider_message_id
             LIMIT 1"
        ))
        .bind(provider_id)
        .fetch_optional(&mut *self.read().await?)
        .await?;
        match run_id {
            Some(id) => self.run(id).await,
            None => Ok(None),
        }
    }

    async fn run_phones(&self, run_id: i64) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(sql!(
            "SELECT phone FROM executions WHERE run_id = ? ORDER BY id"
        ))
        .bind(run_id)
        .fetch_all(&mut *self.read().await?)
        .await?)
    }

    async fn campaign_totals(
        &self,
        by: &CampaignRef,
    ) -> StoreResult<Option<(Campaign, CampaignTotals)>> {
        let (sql, by) = match by {
            CampaignRef::Id(id) => (
                sql!("{} WHERE c.id = ? GROUP BY c.id", totals_select()),
                Param::Int(*id),
            ),
            CampaignRef::Uuid(uuid) => (
                sql!("{} WHERE c.uuid = ? GROUP BY c.id", totals_select()),
                Param::Text(uuid.clone()),
            ),
        };
        dialect::read_row(&self.reader, sql, vec![by], |row| {
            // Numbered as `totals_select` selects them.
            let at = CAMPAIGN_COLUMN_COUNT;
            let totals = CampaignTotals {
                runs: row.int(at)?,
                counters: counters_from_columns(row, at + 1)?,
                first_sent_at: row.opt_int(at + 9)?,
                last_sent_at: row.opt_int(at + 10)?,
                cancelled: row.int(at + 11)?,
                last_ended_run: row.opt_text(at + 12)?.map(str::to_owned),
                last_ended_at: row.opt_int(at + 13)?,
            };
            Ok((campaign_from_columns(row)?, totals))
        })
        .await
    }

    async fn campaign_status(
        &self,
        by: &CampaignRef,
    ) -> StoreResult<Option<(Campaign, Option<RunSummary>)>> {
        let (sql, by) = match by {
            CampaignRef::Id(id) => (sql!("{} WHERE c.id = ?", status_select()), Param::Int(*id)),
            CampaignRef::Uuid(uuid) => (
                sql!("{} WHERE c.uuid = ?", status_select()),
                Param::Text(uuid.clone()),
            ),
        };
        dialect::read_row(&self.reader, sql, vec![by], |row| {
            // Numbered as `status_select` selects them.
            let at = CAMPAIGN_COLUMN_COUNT;
            let run = match row.opt_text(at)? {
                None => None,
                Some(uuid) => {
                    let status = row.text(at + 1)?;
                    Some(RunSummary {
                        uuid: uuid.to_owned(),
                        status: RunStatus::parse(status)
                            .ok_or_else(|| StoreError::Corrupt(status.to_owned()))?,
                        updated_at: row.int(at + 2)?,
                        counters: counters_from_columns(row, at + 3)?,
                        total_batches: row.int(at + 11)?,
                        completed_batches: row.int(at + 12)?,
                    })
                }
            };
            Ok((campaign_from_columns(row)?, run))
        })
        .await
    }

    async fn metrics_history(
        &self,
        campaign_id: i64,
        since_minute: i64,
    ) -> StoreResult<Vec<MinuteBucket>> {
        sqlx::query_as::<_, (i64, i64, i64)>(sql!(
            "SELECT minute, completed, failed FROM metrics_minutes
             WHERE campaign_id = ? AND minute >= ? ORDER BY minute"
        ))
        .bind(campaign_id)
        .bind(since_minute)
        .fetch_all(&mut *self.read().await?)
        .await
        .map(|rows| {
            rows.into_iter()
                .map(|(minute, completed, failed)| MinuteBucket {
                    minute,
                    completed,
                    failed,
                })
                .collect()
        })
        .map_err(Into::into)
    }

    async fn events_since(
        &self,
        campaign_id: i64,
        after_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<StoredEvent>> {
        sqlx::query(sql!(
            "SELECT campaign_id, seq, kind, data, created_at FROM events
             WHERE campaign_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        ))
        .bind(campaign_id)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?
        .iter()
        .map(|row| {
            let data: String = row.try_get("data")?;
            Ok(StoredEvent {
                campaign_id: row.try_get("campaign_id")?,
                seq: row.try_get("seq")?,
                kind: row.try_get("kind")?,
                data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
    }

    async fn purge_events(&self, older_than: i64, keep_last: i64, limit: i64) -> StoreResult<u64> {
        // One short transaction per chunk, so the writer is never held long.
        let deleted = sqlx::query(sql!(
            "DELETE FROM events WHERE (campaign_id, seq) IN (
                 SELECT e.campaign_id, e.seq FROM events e JOIN campaigns c ON c.id = e.campaign_id
                 WHERE e.created_at < ? AND e.seq <= c.last_seq - ? LIMIT ?)"
        ))
        .bind(older_than)
        .bind(keep_last)
        .bind(limit)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(deleted)
    }

    async fn purge_executions(&self, ended_before: i64, limit: i64) -> StoreResult<u64> {
        // A run taken earlier and not finished yet comes first; otherwise
        // the next one due is taken.
        let purging: Option<i64> = sqlx::query_scalar(sql!(
            "SELECT id FROM runs WHERE executions_state = 'purging' ORDER BY id LIMIT 1"
        ))
        .fetch_optional(&self.writer)
        .await?;
        let run_id = match purging {
            Some(id) => id,
            None => {
                let taken: Option<i64> = sqlx::query_scalar(sql!(
                    "UPDATE runs SET executions_state = 'purging' WHERE id = (
                         SELECT r.id FROM runs r
                         WHERE r.executions_state = 'kept'
                           AND r.status IN ('completed', 'failed', 'cancelled')
                           AND r.completed_at < ?
                           AND NOT EXISTS (SELECT 1 FROM runs o WHERE o.campaign_id = r.campaign_id
                                             AND o.id < r.id AND o.executions_state = 'kept')
                         ORDER BY r.id LIMIT 1)
                     RETURNING id"
                ))
                .bind(ended_before)
                .fetch_optional(&self.writer)
                .await?;
                match taken {
                    Some(id) => id,
                    None => return Ok(0),
                }
            }
        };
        // The chunk's provider ids go with it. Both statements pick the
        // same executions: the first `limit` in the index's order, in one
        // transaction.
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        sqlx::query(sql!(
            "DELETE FROM provider_messages WHERE (provider_message_id, execution_id) IN (
                 SELECT provider_message_id, id FROM executions WHERE id IN (
                     SELECT id FROM executions WHERE run_id = ?
                     ORDER BY batch_sequence, id LIMIT ?)
                   AND provider_message_id IS NOT NULL)"
        ))
        .bind(run_id)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query(sql!(
            "DELETE FROM executions WHERE id IN (
                 SELECT id FROM executions WHERE run_id = ?
                 ORDER BY batch_sequence, id LIMIT ?)"
        ))
        .bind(run_id)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if (deleted as i64) < limit {
            sqlx::query(sql!(
                "UPDATE runs SET executions_state = 'purged' WHERE id = ?"
            ))
            .bind(run_id)
            .execute(&self.writer)
            .await?;
        }
        Ok(deleted.max(1))
    }

    async fn purge_metrics(&self, before_minute: i64, limit: i64) -> StoreResult<u64> {
        let deleted = sqlx::query(sql!(
            "DELETE FROM metrics_minutes WHERE (campaign_id, minute) IN (
                 SELECT campaign_id, minute FROM metrics_minutes WHERE minute < ? LIMIT ?)"
        ))
        .bind(before_minute)
        .bind(limit)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(deleted)
    }

    async fn last_seq(&self, campaign_id: i64) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar(sql!("SELECT last_seq FROM campaigns WHERE id = ?"))
                .bind(campaign_id)
                .fetch_optional(&mut *self.read().await?)
                .await?
                .unwrap_or(0),
        )
    }

    async fn last_seqs_of_workspace(&self, workspace_id: i64) -> StoreResult<Vec<(i64, i64)>> {
        Ok(sqlx::query_as(sql!(
            "SELECT id, last_seq FROM campaigns WHERE workspace_id = ?"
        ))
        .bind(workspace_id)
        .fetch_all(&mut *self.read().await?)
        .await?)
    }

    async fn oldest_seq(&self, campaign_id: i64) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar(sql!("SELECT MIN(seq) FROM events WHERE campaign_id = ?"))
                .bind(campaign_id)
                .fetch_one(&mut *self.read().await?)
                .await?,
        )
    }

    async fn campaign_of_run(&self, run_id: i64) -> StoreResult<Option<Campaign>> {
        sqlx::query(sql!(
            "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = (SELECT campaign_id FROM runs WHERE id = ?)"
        ))
        .bind(run_id)
        .fetch_optional(&mut *self.read().await?)
        .await?
        .as_ref()
        .map(campaign_from_row)
        .transpose()
    }
}

/// The campaign's columns, qualified by `c` (a join with `runs` would make
/// `id`, `uuid`, `status` … ambiguous), in [`CAMPAIGN_COLUMNS`]' order.
fn campaign_columns_of_c() -> String {
    CAMPAIGN_COLUMNS
        .split(',')
        .map(|column| {
            let column = column.trim();
            format!("c.{column} AS {column}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A campaign and the sums over its runs, less the `WHERE`: the campaign's
/// columns, then the runs', numbered from [`CAMPAIGN_COLUMN_COUNT`] as
/// `campaign_totals` reads them.
fn totals_select() -> String {
    let ended = "status IN ('completed', 'failed', 'cancelled')";
    format!(
        "SELECT {}, COUNT(r.id) AS runs, CAST(COALESCE(SUM(r.total), 0) AS BIGINT) AS total,
                CAST(COALESCE(SUM(r.pending), 0) AS BIGINT) AS pending,
                CAST(COALESCE(SUM(r.processing), 0) AS BIGINT) AS processing,
                CAST(COALESCE(SUM(r.sent), 0) AS BIGINT) AS sent,
                CAST(COALESCE(SUM(r.failed), 0) AS BIGINT) AS failed,
                CAST(COALESCE(SUM(r.skipped), 0) AS BIGINT) AS skipped,
                CAST(COALESCE(SUM(r.delivered), 0) AS BIGINT) AS delivered,
                CAST(COALESCE(SUM(r.failed_delivery), 0) AS BIGINT) AS failed_delivery,
                MIN(r.first_sent_at) AS first_sent_at, MAX(r.last_sent_at) AS last_sent_at,
                CAST(COALESCE(SUM(CASE WHEN r.status = 'cancelled' THEN r.total ELSE 0 END), 0)
                     AS BIGINT) AS cancelled,
                (SELECT uuid FROM runs WHERE campaign_id = c.id AND {ended}
                 ORDER BY id DESC LIMIT 1) AS last_ended_run,
                (SELECT completed_at FROM runs WHERE campaign_id = c.id AND {ended}
                 ORDER BY id DESC LIMIT 1) AS last_ended_at
         FROM campaigns c LEFT JOIN runs r ON r.campaign_id = c.id",
        campaign_columns_of_c()
    )
}

/// A campaign and its latest run's summary, less the `WHERE`: the
/// campaign's columns, then the run's, numbered from
/// [`CAMPAIGN_COLUMN_COUNT`] as `campaign_status` reads them.
fn status_select() -> String {
    format!(
        "SELECT {}, r.uuid AS run_uuid, r.status AS run_status, r.updated_at AS run_updated_at,
                r.total, r.pending, r.processing, r.sent, r.failed, r.skipped, r.delivered,
                r.failed_delivery, r.total_batches, r.completed_batches
         FROM campaigns c
         LEFT JOIN runs r ON r.id = (SELECT MAX(id) FROM runs WHERE campaign_id = c.id)",
        campaign_columns_of_c()
    )
}
