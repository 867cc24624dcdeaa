//! The storage boundary.
//!
//! Handlers and the engine talk to a [`Store`]; only its implementations
//! know SQL. [`sqlite::SqliteStore`] is the embedded default and
//! [`postgres::PgStore`] serves several nodes on one database; both are the
//! same source (`store/sql/`) compiled against each backend's dialect, so no
//! handler or engine code knows which one it runs on.
//!
//! Every method that changes data runs in one transaction: a method either
//! happens whole or not at all.

pub mod bound_rows;
pub mod columns;
pub mod engine;
pub mod execution_rows;
pub mod postgres;
pub mod sqlite;

pub use engine::*;
pub use execution_rows::{ExecutionRow, ExecutionRows, Variables};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::domain::{
    CampaignName, CampaignStatus, Channel, MaxAttempts, NewContact, ProviderSettings, Sender,
    Template,
};

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A compare-and-set on a status lost: the row is now in `current`.
    #[error("campaign is {current}")]
    StatusConflict { current: CampaignStatus },
    /// A unique value is taken.
    #[error("{0} already exists")]
    Duplicate(String),
    /// The producer of a streamed write gave up; nothing was written.
    #[error("import aborted")]
    Aborted,
    #[error("database is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A read SQLite ran without sqlx (see `columns`).
    #[error(transparent)]
    Read(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The backend cannot do this; the message says what to do instead.
    #[error("{0}")]
    Unsupported(String),
}

impl StoreError {
    /// A failure that says nothing about the request and may pass on a
    /// retry: a lost deadlock or serialisation race, a lock or statement
    /// timeout, a busy database, an exhausted pool, a dropped connection.
    pub fn is_transient(&self) -> bool {
        if self.is_out_of_space() {
            return true;
        }
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Read(read) => matches!(
                read.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => true,
            StoreError::Database(sqlx::Error::Database(db)) => match db.code().as_deref() {
                // Postgres: deadlock, serialisation, lock timeout, statement
                // timeout, server shutting down or crashed or starting up,
                // too many connections, any connection exception (class
                // 08). SQLite: BUSY, LOCKED.
                Some(
                    "40P01" | "40001" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "53300"
                    | "5" | "6" | "261" | "517",
                ) => true,
                Some(code) if code.starts_with("08") && code.len() == 5 => true,
                // A database that refuses new connections for now
                // (`ALLOW_CONNECTIONS false`, as during maintenance); the
                // same code also names mistakes, hence the message check.
                Some("55000") => db.message().contains("not currently accepting connections"),
                _ => false,
            },
            _ => false,
        }
    }
}

impl StoreError {
    /// The database's disk is full (SQLite `SQLITE_FULL`, Postgres
    /// `disk_full`): the transaction rolled back, and the same write passes
    /// once space is freed.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db))
            if matches!(db.code().as_deref(), Some("13" | "53100")))
    }
}

/// The result of a store job run on a blocking thread: its panic goes on
/// unwinding in the caller; a job the runtime dropped (shutting down) is
/// an unavailable store.
pub(crate) fn joined<T>(ran: Result<StoreResult<T>, tokio::task::JoinError>) -> StoreResult<T> {
    match ran {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(StoreError::Unavailable(format!("read cancelled: {error}"))),
    }
}

/// How to open a store; the Postgres settings are ignored by SQLite.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Apply pending migrations when connecting (else `herald migrate` must have).
    pub migrate: bool,
    /// Postgres connections per node.
    pub pool_size: u32,
    /// Postgres `statement_timeout`: a statement running longer is cancelled.
    pub statement_timeout: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            migrate: true,
            pool_size: 16,
            statement_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// One connection pool's connections right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    /// `writer` and `reader` (SQLite), or `main` (Postgres: one pool).
    pub pool: &'static str,
    pub in_use: u32,
    pub idle: u32,
    pub max: u32,
}

impl PoolUsage {
    /// The usage of one of sqlx's pools.
    pub fn of_sqlx<DB: sqlx::Database>(pool: &'static str, of: &sqlx::Pool<DB>) -> Self {
        let idle = of.num_idle() as u32;
        Self {
            pool,
            in_use: of.size().saturating_sub(idle),
            idle,
            max: of.options().get_max_connections(),
        }
    }
}

/// A task a store runs beside its pools, stopped when the store is dropped.
pub(crate) struct BackgroundTask(tokio::task::JoinHandle<()>);

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What another node's writes mean for this node's stream hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Events were appended to this campaign's log.
    Appended { campaign_id: i64, workspace_id: i64 },
    /// Announcements may have been lost: re-read every watched campaign.
    Resync,
}

pub type ChangeFeed = mpsc::Receiver<Change>;

/// Opens the store a URL names: `sqlite://PATH` or `postgres://…`.
pub async fn connect(url: &str, options: &StoreOptions) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url, options).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PgStore::connect(url, options).await?))
    } else {
        anyhow::bail!(
            "unsupported database URL '{}': expected sqlite://PATH or postgres://USER@HOST/DB",
            url.split('@').next_back().unwrap_or(url)
        )
    }
}

/// Migrates, or (with `options.migrate` off) refuses a database that
/// lacks a migration this binary has. A database migrated by a newer
/// binary is refused either way (sqlx reports the unknown version).
async fn migrate_or_check<C: sqlx::migrate::Migrate>(
    migrator: &sqlx::migrate::Migrator,
    conn: &mut C,
    options: &StoreOptions,
) -> anyhow::Result<()> {
    if options.migrate {
        migrator.run_direct(conn).await?;
        return Ok(());
    }
    conn.ensure_migrations_table().await?;
    let applied = conn.list_applied_migrations().await?;
    let missing = migrator
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .count();
    anyhow::ensure!(
        missing == 0,
        "the database lacks {missing} migration(s) and migrations at start are off \
         (--no-migrate); apply them with `herald migrate`"
    );
    Ok(())
}

/// Milliseconds since the Unix epoch: the one time unit of the store.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[derive(Debug, Clone)]
pub struct Workspace {
    pub id: i64,
    pub name: String,
    pub default_region: String,
    pub credit_balance: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: i64,
    pub workspace_id: i64,
    pub prefix: String,
    pub key_hash: Vec<u8>,
    pub label: Option<String>,
    pub scopes: Vec<crate::domain::Scope>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// How a path names a campaign: seed surfaces use integers or uuids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CampaignRef {
    Id(i64),
    Uuid(String),
}

impl CampaignRef {
    /// Reads a path segment: digits are an id, anything else a uuid.
    pub fn parse(segment: &str) -> Option<Self> {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            return segment.parse().ok().map(CampaignRef::Id);
        }
        uuid::Uuid::parse_str(segment)
            .ok()
            .map(|u| CampaignRef::Uuid(u.to_string()))
    }
}

#[derive(Debug, Clone)]
pub struct Campaign {
    pub id: i64,
    pub uuid: String,
    pub workspace_id: i64,
    pub name: String,
    pub channel: Channel,
    pub template: Option<String>,
    pub sender: Option<String>,
    pub provider: ProviderSettings,
    pub max_attempts: u8,
    pub status: CampaignStatus,
    pub start_at: Option<i64>,
    pub contact_count: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
}

/// Everything a user sets on a campaign, already checked.
#[derive(Debug, Clone)]
pub struct CampaignSpec {
    pub name: CampaignName,
    pub channel: Channel,
    pub template: Option<Template>,
    pub sender: Option<Sender>,
    pub provider: ProviderSettings,
    pub max_attempts: MaxAttempts,
}

/// A status change to make if, and only if, the campaign is still `from`.
#[derive(Debug, Clone)]
pub struct Transition {
    pub from: CampaignStatus,
    pub to: CampaignStatus,
    /// Set with `scheduled`: when the campaign is due.
    pub start_at: Option<i64>,
    /// What happens to the campaign's runs in the same transaction.
    pub run: RunEffect,
}

/// The run side of a campaign transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEffect {
    None,
    /// Make sure one run is scheduled at this time: move the campaign's
    /// scheduled run, or create one.
    Schedule {
        at: i64,
    },
    /// Create a new run now (resend to failures, or run again).
    NewRun {
        recipients: crate::domain::Recipients,
    },
    /// Cancel runs no worker has frozen yet; a worker finalises the others.
    CancelUnclaimed,
}

#[derive(Debug, Clone)]
pub struct ContactRecord {
    pub id: i64,
    pub phone: String,
    pub name: Option<String>,
    pub variables: BTreeMap<String, String>,
    pub created_at: i64,
}

/// One message of a streamed contact import.
#[derive(Debug)]
pub enum ImportMsg {
    /// Contacts to upsert (distinct numbers), and how many more rows the
    /// producer already merged into them.
    Chunk {
        contacts: Vec<NewContact>,
        merged: u64,
    },
    /// The producer read its input to the end: commit.
    Done,
    /// The producer failed: roll everything back.
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportCounts {
    /// Numbers new to the campaign.
    pub imported: u64,
    /// Rows whose number the campaign (or an earlier row) already had.
    pub duplicates: u64,
}

/// A contact that cannot fill a template variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingVariable {
    pub contact_id: i64,
    pub phone: String,
    pub variable: String,
}

/// Everything Herald stores: management here, the engine's work in
/// [`EngineStore`], the seed surfaces' reads in [`ReportStore`].
#[async_trait]
pub trait Store: EngineStore + ReportStore + Send + Sync + 'static {
    /// Succeeds when the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Announcements of events other processes append, when there can be
    /// any (Postgres); `None` when this process is the only writer.
    async fn watch_changes(&self) -> StoreResult<Option<ChangeFeed>>;

    /// Connections of each database pool, for `/metrics`.
    fn pool_usage(&self) -> Vec<PoolUsage>;

    /// Writes a consistent copy of the whole database to `path` while it
    /// keeps serving (SQLite: `VACUUM INTO`; Postgres answers `Unsupported`: use pg_dump).
    async fn backup(&self, path: &str) -> StoreResult<()>;

    // --- workspaces and keys -------------------------------------------------

    /// Returns the named workspace, creating it when it does not exist.
    async fn ensure_workspace(&self, name: &str) -> StoreResult<Workspace>;
    async fn workspace(&self, id: i64) -> StoreResult<Workspace>;
    async fn workspace_by_name(&self, name: &str) -> StoreResult<Option<Workspace>>;
    async fn workspace_count(&self) -> StoreResult<i64>;
    async fn set_workspace_region(&self, id: i64, region: &str) -> StoreResult<Workspace>;

    async fn insert_api_key(
        &self,
        workspace_id: i64,
        label: Option<&str>,
        scopes: &[crate::domain::Scope],
        prefix: &str,
        key_hash: &[u8],
    ) -> StoreResult<ApiKeyRecord>;
    async fn api_key_by_prefix(&self, prefix: &str) -> StoreResult<Option<ApiKeyRecord>>;
    async fn list_api_keys(&self, workspace_id: i64) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Revokes a key of the workspace, named by id or prefix.
    async fn revoke_api_key(
        &self,
        workspace_id: i64,
        id_or_prefix: &str,
    ) -> StoreResult<ApiKeyRecord>;

    // --- campaigns -------------------------------------------------------------

    async fn insert_campaign(
        &self,
        workspace_id: i64,
        spec: &CampaignSpec,
    ) -> StoreResult<Campaign>;
    async fn campaign(&self, by: &CampaignRef) -> StoreResult<Option<Campaign>>;
    /// A page of the workspace's campaigns, newest first, and the total.
    async fn list_campaigns(
        &self,
        workspace_id: i64,
        status: Option<CampaignStatus>,
        offset: i64,
        limit: i64,
    ) -> StoreResult<(Vec<Campaign>, i64)>;
    /// Replaces a draft's settings; `StatusConflict` when it is no draft.
    async fn update_campaign(&self, id: i64, spec: &CampaignSpec) -> StoreResult<Campaign>;
    /// Deletes a draft and its contacts; `StatusConflict` when it is no draft.
    async fn delete_campaign(&self, id: i64) -> StoreResult<()>;
    /// Applies `transition` atomically; `StatusConflict` when the campaign
    /// moved on in the meantime.
    async fn transition_campaign(&self, id: i64, transition: &Transition) -> StoreResult<Campaign>;

    // --- contacts --------------------------------------------------------------

    /// Upserts streamed chunks in one transaction: all of it lands, or none
    /// (on `ImportMsg::Abort`, or a channel closed before `ImportMsg::Done`).
    async fn import_contacts(
        &self,
        campaign_id: i64,
        chunks: mpsc::Receiver<ImportMsg>,
    ) -> StoreResult<ImportCounts>;
    /// A page of contacts in insertion order, and the total.
    async fn list_contacts(
        &self,
        campaign_id: i64,
        offset: i64,
        limit: i64,
    ) -> StoreResult<(Vec<ContactRecord>, i64)>;
    /// The first contact lacking one of `variables`, if any.
    async fn first_missing_variable(
        &self,
        campaign_id: i64,
        variables: &BTreeSet<String>,
    ) -> StoreResult<Option<MissingVariable>>;
}
