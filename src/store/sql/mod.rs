//! The SQL both backends run, written once.
//!
//! This directory is compiled twice, as `store::sqlite::sql` and
//! `store::postgres::sql`: `Db`, `Conn` and `DbRow` come from the parent's
//! `dialect` module, and so do the few fragments the two spell differently
//! (JSON functions, row locks). Statements use SQLite's `?` placeholders;
//! [`sql!`] rewrites them once per statement for Postgres and caches the text.

use std::collections::BTreeSet;

use async_trait::async_trait;
use sqlx::{QueryBuilder, Row};
use tokio::sync::mpsc;

use super::dialect::{self, Conn, Db, DbRow, Pool};
use crate::store::columns::{campaign_from_columns, variables_from, Param, CAMPAIGN_COLUMNS};
use crate::store::*;

/// A statement for this backend: `format!` syntax, evaluated and rewritten
/// once per call site, then served from a static.
macro_rules! sql {
    ($($fmt:tt)*) => {{
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        SQL.get_or_init(|| dialect::placeholders(&format!($($fmt)*))).as_str()
    }};
}

/// [`sql!`] for a statement that joins a chunk of bound rows where it says
/// `{ROWS}` (see `store::bound_rows`): one text per chunk size, each built
/// once.
macro_rules! sql_rows {
    ($chunk:expr, $($fmt:tt)*) => {{
        static SQL: [std::sync::OnceLock<String>; dialect::ROWS.sizes()] =
            [const { std::sync::OnceLock::new() }; dialect::ROWS.sizes()];
        let chunk: &crate::store::bound_rows::Chunk<'_, '_> = $chunk;
        SQL[chunk.size_index()].get_or_init(|| {
            dialect::placeholders(
                &format!($($fmt)*).replace(crate::store::bound_rows::ROWS, &chunk.source()),
            )
        })
    }};
}

mod engine;
mod events;
mod reports;

/// Rows per multi-row INSERT: 1000 rows × 3 bound values stays far below
/// both backends' limits on bound parameters, and amortises statement overhead.
const INSERT_CHUNK: usize = 1000;

pub struct SqlStore {
    /// Writes. SQLite: the single writer connection; Postgres: the pool.
    pub(super) writer: Pool,
    /// Reads. SQLite: read-only connections beside the writer (WAL);
    /// Postgres: the same pool as `writer`.
    pub(super) reader: dialect::ReadPool,
    /// SQLite: the WAL checkpointer beside the writer. Postgres: none.
    pub(super) _background: Option<super::super::BackgroundTask>,
}

fn workspace_from_row(row: &DbRow) -> StoreResult<Workspace> {
    Ok(Workspace {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        default_region: row.try_get("default_region")?,
        credit_balance: row.try_get("credit_balance")?,
        created_at: row.try_get("created_at")?,
    })
}

fn api_key_from_row(row: &DbRow) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        workspace_id: row.try_get("workspace_id")?,
        prefix: row.try_get("prefix")?,
        key_hash: row.try_get("key_hash")?,
        label: row.try_get("label")?,
        scopes: crate::domain::Scope::split(&row.try_get::<String, _>("scopes")?),
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

pub(super) fn campaign_from_row(row: &DbRow) -> StoreResult<Campaign> {
    campaign_from_columns(row)
}

fn contact_from_row(row: &DbRow) -> StoreResult<ContactRecord> {
    Ok(ContactRecord {
        id: row.try_get("id")?,
        phone: row.try_get("phone")?,
        name: row.try_get("name")?,
        variables: variables_from(row.try_get("variables")?)?,
        created_at: row.try_get("created_at")?,
    })
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl SqlStore {
    async fn campaign_status(&self, conn: &mut Conn, id: i64) -> StoreResult<CampaignStatus> {
        let status: Option<String> =
            sqlx::query_scalar(sql!("SELECT status FROM campaigns WHERE id = ?"))
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        let status = status.ok_or(StoreError::NotFound)?;
        CampaignStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(status))
    }

    async fn fetch_campaign(&self, conn: &mut Conn, id: i64) -> StoreResult<Campaign> {
        let row = sqlx::query(sql!(
            "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound)?;
        campaign_from_row(&row)
    }
}

impl SqlStore {
    /// A connection for one read (SQLite: a read-only one beside the
    /// writer, lent without sqlx's pool; Postgres: from the pool).
    async fn read(&self) -> StoreResult<impl std::ops::DerefMut<Target = Conn> + '_> {
        dialect::read(&self.reader).await
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn backup(&self, path: &str) -> StoreResult<()> {
        dialect::backup(&self.reader, path).await
    }

    async fn watch_changes(&self) -> StoreResult<Option<ChangeFeed>> {
        dialect::watch_changes(&self.writer).await
    }

    fn pool_usage(&self) -> Vec<PoolUsage> {
        match dialect::READER_POOL {
            Some(reader) => vec![
                PoolUsage::of_sqlx("writer", &self.writer),
                dialect::read_usage(reader, &self.reader),
            ],
            None => vec![PoolUsage::of_sqlx("main", &self.writer)],
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query(sql!("SELECT 1"))
            .execute(&mut *self.read().await?)
            .await?;
        Ok(())
    }

    async fn ensure_workspace(&self, name: &str) -> StoreResult<Workspace> {
        sqlx::query(sql!(
            "INSERT INTO workspaces (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
        ))
        .bind(name)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        let row = sqlx::query(sql!("SELECT * FROM workspaces WHERE name = ?"))
            .bind(name)
            .fetch_one(&self.writer)
            .await?;
        workspace_from_row(&row)
    }

    async fn workspace(&self, id: i64) -> StoreResult<Workspace> {
        let row = sqlx::query(sql!("SELECT * FROM workspaces WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *self.read().await?)
            .await?
            .ok_or(StoreError::NotFound)?;
        workspace_from_row(&row)
    }

    async fn workspace_by_name(&self, name: &str) -> StoreResult<Option<Workspace>> {
        sqlx::query(sql!("SELECT * FROM workspaces WHERE name = ?"))
            .bind(name)
            .fetch_optional(&mut *self.read().await?)
            .await?
            .as_ref()
            .map(workspace_from_row)
            .transpose()
    }

    async fn workspace_count(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(sql!("SELECT COUNT(*) FROM workspaces"))
            .fetch_one(&mut *self.read().await?)
            .await?)
    }

    async fn set_workspace_region(&self, id: i64, region: &str) -> StoreResult<Workspace> {
        let row = sqlx::query(sql!(
            "UPDATE workspaces SET default_region = ? WHERE id = ? RETURNING *"
        ))
        .bind(region)
        .bind(id)
        .fetch_optional(&self.writer)
        .await?
        .ok_or(StoreError::NotFound)?;
        workspace_from_row(&row)
    }

    async fn insert_api_key(
        &self,
        workspace_id: i64,
        label: Option<&str>,
        scopes: &[crate::domain::Scope],
        prefix: &str,
        key_hash: &[u8],
    ) -> StoreResult<ApiKeyRecord> {
        let row = sqlx::query(sql!(
            "INSERT INTO api_keys (workspace_id, prefix, key_hash, label, scopes, created_at)
             VALUES (?, ?, ?, ?, ?, ?) RETURNING *"
        ))
        .bind(workspace_id)
        .bind(prefix)
        .bind(key_hash)
        .bind(label)
        .bind(crate::domain::Scope::join(scopes))
        .bind(now_ms())
        .fetch_one(&self.writer)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Duplicate("key prefix".into())
            } else {
                e.into()
            }
        })?;
        api_key_from_row(&row)
    }

    async fn api_key_by_prefix(&self, prefix: &str) -> StoreResult<Option<ApiKeyRecord>> {
        // Each read starts a fresh WAL snapshot, so a key revoked by a
        // committed write is refused from the very next request.
        sqlx::query(sql!("SELECT * FROM api_keys WHERE prefix = ?"))
            .bind(prefix)
            .fetch_optional(&mut *self.read().await?)
            .await?
            .as_ref()
            .map(api_key_from_row)
            .transpose()
    }

    async fn list_api_keys(&self, workspace_id: i64) -> StoreResult<Vec<ApiKeyRecord>> {
        sqlx::query(sql!(
            "SELECT * FROM api_keys WHERE workspace_id = ? ORDER BY id"
        ))
        .bind(workspace_id)
        .fetch_all(&mut *self.read().await?)
        .await?
        .iter()
        .map(api_key_from_row)
        .collect()
    }

    async fn revoke_api_key(
        &self,
        workspace_id: i64,
        id_or_prefix: &str,
    ) -> StoreResult<ApiKeyRecord> {
        let id: i64 = id_or_prefix.parse().unwrap_or(-1);
        let row = sqlx::query(sql!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?)
             WHERE workspace_id = ? AND (id = ? OR prefix = ?) RETURNING *"
        ))
        .bind(now_ms())
        .bind(workspace_id)
        .bind(id)
        .bind(id_or_prefix)
        .fetch_optional(&self.writer)
        .await?
        .ok_or(StoreError::NotFound)?;
        api_key_from_row(&row)
    }

    async fn insert_campaign(
        &self,
        workspace_id: i64,
        spec: &CampaignSpec,
    ) -> StoreResult<Campaign> {
        let now = now_ms();
        let provider = serde_json::to_string(&spec.provider).expect("provider serialises");
        let row = sqlx::query(sql!(
            "INSERT INTO campaigns (uuid, workspace_id, name, channel, template, sender, provider,
                                    max_attempts, status, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'draft', ?, ?) RETURNING {CAMPAIGN_COLUMNS}"
        ))
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(workspace_id)
        .bind(spec.name.as_str())
        .bind(spec.channel.as_str())
        .bind(spec.template.as_ref().map(|t| t.as_str()))
        .bind(spec.sender.as_ref().map(|s| s.as_str()))
        .bind(provider)
        .bind(i64::from(spec.max_attempts.get()))
        .bind(now)
        .bind(now)
        .fetch_one(&self.writer)
        .await?;
        campaign_from_row(&row)
    }

    async fn campaign(&self, by: &CampaignRef) -> StoreResult<Option<Campaign>> {
        // Nearly every campaign's request starts here (its owner is checked
        // on it): one short read, done where the request runs on SQLite.
        let (sql, by) = match by {
            CampaignRef::Id(id) => (
                sql!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = ?"),
                Param::Int(*id),
            ),
            CampaignRef::Uuid(uuid) => (
                sql!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE uuid = ?"),
                Param::Text(uuid.clone()),
            ),
        };
        dialect::read_row(&self.reader, sql, vec![by], campaign_from_columns).await
    }

    async fn list_campaigns(
        &self,
        workspace_id: i64,
        status: Option<CampaignStatus>,
        offset: i64,
        limit: i64,
    ) -> StoreResult<(Vec<Campaign>, i64)> {
        let status = status.map(CampaignStatus::as_str);
        let rows = sqlx::query(sql!(
            "SELECT {CAMPAIGN_COLUMNS} FROM campaigns
             WHERE workspace_id = ? AND (? IS NULL OR status = ?)
             ORDER BY id DESC LIMIT ? OFFSET ?"
        ))
        .bind(workspace_id)
        .bind(status)
        .bind(status)
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *self.read().await?)
        .await?;
        let total: i64 = sqlx::query_scalar(sql!(
            "SELECT COUNT(*) FROM campaigns WHERE workspace_id = ? AND (? IS NULL OR status = ?)"
        ))
        .bind(workspace_id)
        .bind(status)
        .bind(status)
        .fetch_one(&mut *self.read().await?)
        .await?;
        let campaigns = rows
            .iter()
            .map(campaign_from_row)
            .collect::<StoreResult<_>>()?;
        Ok((campaigns, total))
    }

    async fn update_campaign(&self, id: i64, spec: &CampaignSpec) -> StoreResult<Campaign> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        let current = self.campaign_status(&mut tx, id).await?;
        if !current.is_editable() {
            return Err(StoreError::StatusConflict { current });
        }
        sqlx::query(sql!(
            "UPDATE campaigns SET name = ?, channel = ?, template = ?, sender = ?, provider = ?,
                                  max_attempts = ?, updated_at = ?
             WHERE id = ?"
        ))
        .bind(spec.name.as_str())
        .bind(spec.channel.as_str())
        .bind(spec.template.as_ref().map(|t| t.as_str()))
        .bind(spec.sender.as_ref().map(|s| s.as_str()))
        .bind(serde_json::to_string(&spec.provider).expect("provider serialises"))
        .bind(i64::from(spec.max_attempts.get()))
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let campaign = self.fetch_campaign(&mut tx, id).await?;
        tx.commit().await?;
        Ok(campaign)
    }

    async fn delete_campaign(&self, id: i64) -> StoreResult<()> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        let current = self.campaign_status(&mut tx, id).await?;
        if !current.is_editable() {
            return Err(StoreError::StatusConflict { current });
        }
        // Executions do not cascade from runs on Postgres (no foreign key,
        // see migration 0005), so they go first, by hand.
        sqlx::query(sql!(
            "DELETE FROM provider_messages WHERE (provider_message_id, execution_id) IN (
                 SELECT provider_message_id, id FROM executions
                 WHERE campaign_id = ? AND provider_message_id IS NOT NULL)"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(sql!("DELETE FROM executions WHERE campaign_id = ?"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql!("DELETE FROM campaigns WHERE id = ?"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn transition_campaign(&self, id: i64, transition: &Transition) -> StoreResult<Campaign> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        let now = now_ms();
        let started = transition.to == CampaignStatus::Running;
        let finished = transition.to.is_terminal();
        let changed = sqlx::query(sql!(
            "UPDATE campaigns SET status = ?, updated_at = ?,
                    start_at = CASE WHEN ? IS NOT NULL THEN ? ELSE start_at END,
                    started_at = CASE WHEN ? AND started_at IS NULL THEN ? ELSE started_at END,
                    completed_at = CASE WHEN ? THEN ? ELSE completed_at END
             WHERE id = ? AND status = ?"
        ))
        .bind(transition.to.as_str())
        .bind(now)
        .bind(transition.start_at)
        .bind(transition.start_at)
        .bind(started)
        .bind(now)
        .bind(finished)
        .bind(now)
        .bind(id)
        .bind(transition.from.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            let current = self.campaign_status(&mut tx, id).await?;
            return Err(StoreError::StatusConflict { current });
        }
        match &transition.run {
            RunEffect::None => {}
            RunEffect::Schedule { at } => {
                let moved = sqlx::query(
                    sql!("UPDATE runs SET scheduled_at = ?, updated_at = ? WHERE campaign_id = ? AND status = 'scheduled'"),
                )
                .bind(at)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if moved == 0 {
                    insert_run(&mut tx, id, crate::domain::Recipients::All, *at, now).await?;
                }
            }
            RunEffect::NewRun { recipients } => {
                insert_run(&mut tx, id, *recipients, now, now).await?;
            }
            RunEffect::CancelUnclaimed => {
                sqlx::query(sql!(
                    "UPDATE runs SET status = 'cancelled', completed_at = ?, updated_at = ?,
                            error = 'the campaign was cancelled before the run started'
                     WHERE campaign_id = ? AND status = 'scheduled'"
                ))
                .bind(now)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
        events::append_event(
            &mut tx,
            id,
            "campaign_status",
            serde_json::json!({"from": transition.from.as_str(), "status": transition.to.as_str()}),
            None,
        )
        .await?;
        let campaign = self.fetch_campaign(&mut tx, id).await?;
        tx.commit().await?;
        Ok(campaign)
    }

    async fn import_contacts(
        &self,
        campaign_id: i64,
        mut chunks: mpsc::Receiver<ImportMsg>,
    ) -> StoreResult<ImportCounts> {
        let mut tx = self.writer.begin_with(dialect::BEGIN).await?;
        let before: i64 =
            sqlx::query_scalar(sql!("SELECT contact_count FROM campaigns WHERE id = ?"))
                .bind(campaign_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
        let mut rows_seen: u64 = 0;
        let now = now_ms();
        loop {
            // A closed channel without `Done` means the producer died: the
            // transaction is dropped, which rolls it back.
            match chunks.recv().await.ok_or(StoreError::Aborted)? {
                ImportMsg::Abort => return Err(StoreError::Aborted),
                ImportMsg::Done => break,
                ImportMsg::Chunk { contacts, merged } => {
                    rows_seen += contacts.len() as u64 + merged;
                    for part in contacts.chunks(INSERT_CHUNK) {
                        upsert_contacts(&mut tx, campaign_id, now, part).await?;
                    }
                }
            }
        }
        let after: i64 =
            sqlx::query_scalar(sql!("SELECT COUNT(*) FROM contacts WHERE campaign_id = ?"))
                .bind(campaign_id)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query(sql!(
            "UPDATE campaigns SET contact_count = ?, updated_at = ? WHERE id = ?"
        ))
        .bind(after)
        .bind(now)
        .bind(campaign_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let imported = (after - before).max(0) as u64;
        Ok(ImportCounts {
            imported,
            duplicates: rows_seen.saturating_sub(imported),
        })
    }

    async fn list_contacts(
        &self,
        campaign_id: i64,
        offset: i64,
        limit: i64,
    ) -> StoreResult<(Vec<ContactRecord>, i64)> {
        let rows = sqlx::query(sql!(
            "SELECT id, phone, name, variables, created_at FROM contacts
             WHERE campaign_id = ? ORDER BY id LIMIT ? OFFSET ?"
        ))
        .bind(campaign_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *self.read().await?)
        .await?;
        let total: i64 =
            sqlx::query_scalar(sql!("SELECT contact_count FROM campaigns WHERE id = ?"))
                .bind(campaign_id)
                .fetch_one(&mut *self.read().await?)
                .await?;
        let contacts = rows
            .iter()
            .map(contact_from_row)
            .collect::<StoreResult<_>>()?;
        Ok((contacts, total))
    }

    async fn first_missing_variable(
        &self,
        campaign_id: i64,
        variables: &BTreeSet<String>,
    ) -> StoreResult<Option<MissingVariable>> {
        for variable in variables {
            let row = match variable.as_str() {
                "phone" => continue,
                "name" => {
                    sqlx::query(sql!(
                        "SELECT id, phone FROM contacts WHERE campaign_id = ?
                         AND name IS NULL AND {} IS NULL ORDER BY id LIMIT 1",
                        dialect::JSON_KEY_OF_VARIABLES
                    ))
                    .bind(campaign_id)
                    .bind(dialect::json_key("name"))
                    .fetch_optional(&mut *self.read().await?)
                    .await?
                }
                other => {
                    sqlx::query(sql!(
                        "SELECT id, phone FROM contacts WHERE campaign_id = ?
                         AND {} IS NULL ORDER BY id LIMIT 1",
                        dialect::JSON_KEY_OF_VARIABLES
                    ))
                    .bind(campaign_id)
                    .bind(dialect::json_key(other))
                    .fetch_optional(&mut *self.read().await?)
                    .await?
                }
            };
            if let Some(row) = row {
                return Ok(Some(MissingVariable {
                    contact_id: row.try_get("id")?,
                    phone: row.try_get("phone")?,
                    variable: variable.clone(),
                }));
            }
        }
        Ok(None)
    }
}

async fn insert_run(
    conn: &mut Conn,
    campaign_id: i64,
    recipients: crate::domain::Recipients,
    scheduled_at: i64,
    now: i64,
) -> StoreResult<()> {
    sqlx::query(sql!(
        "INSERT INTO runs (uuid, campaign_id, status, recipients, scheduled_at, updated_at)
         VALUES (?, ?, 'scheduled', ?, ?, ?)"
    ))
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(campaign_id)
    .bind(recipients.as_str())
    .bind(scheduled_at)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn upsert_contacts(
    conn: &mut Conn,
    campaign_id: i64,
    now: i64,
    contacts: &[NewContact],
) -> StoreResult<()> {
    let variables: Vec<String> = contacts
        .iter()
        .map(|c| serde_json::to_string(&c.variables).expect("string map serialises"))
        .collect();
    let mut insert: QueryBuilder<Db> = QueryBuilder::new(format!(
        "INSERT INTO contacts (campaign_id, created_at, phone, name, variables) \
         SELECT {campaign_id}, {now}, column1, column2, column3 FROM (VALUES "
    ));
    let mut rows = insert.separated(", ");
    for (contact, vars) in contacts.iter().zip(&variables) {
        rows.push("(");
        rows.push_bind_unseparated(contact.phone.as_str());
        rows.push_unseparated(", ");
        rows.push_bind_unseparated(contact.name.as_deref());
        rows.push_unseparated(", ");
        rows.push_bind_unseparated(vars.as_str());
        rows.push_unseparated(")");
    }
    // `WHERE true` disambiguates the upsert clause from a join constraint in
    // SQLite's INSERT … SELECT grammar.
    insert.push(format!(
        ") AS v WHERE true ON CONFLICT (campaign_id, phone) DO UPDATE SET
             name = COALESCE(excluded.name, contacts.name),
             variables = {}",
        dialect::json_merge("contacts.variables", "excluded.variables")
    ));
    insert.build().execute(&mut *conn).await?;
    Ok(())
}
