//! The Postgres backend: the shared SQL of [`sql`] compiled against
//! Postgres, plus what only Postgres does: one pool for reads and writes,
//! `$n` placeholders, `SKIP LOCKED` claims and `LISTEN/NOTIFY`, which tells
//! every node's stream hub that some node appended events.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::StoreOptions;

// The same source file is compiled once per backend; `dialect` below is
// what differs. See ARCHITECTURE.md, "One SQL, two backends".
#[allow(clippy::duplicate_mod)]
#[path = "sql/mod.rs"]
mod sql;

pub use sql::SqlStore as PgStore;

/// The channel events are announced on; the payload is `campaign:workspace`.
const EVENTS_CHANNEL: &str = "herald_events";

pub(crate) mod dialect {
    use std::borrow::Cow;
    use std::time::Duration;

    use sqlx::postgres::PgListener;
    use tokio::sync::mpsc;

    use crate::store::{Change, ChangeFeed, StoreError, StoreResult};

    pub type Db = sqlx::Postgres;
    pub type Conn = sqlx::PgConnection;
    pub type DbRow = sqlx::postgres::PgRow;
    pub type Pool = sqlx::PgPool;

    /// Rewrites SQLite-style `?` and `?N` placeholders as `$N`, leaving
    /// quoted literals alone. Runs once per statement (see `sql!`).
    pub fn placeholders(sql: &str) -> String {
        let mut out = String::with_capacity(sql.len() + 16);
        let mut next = 0;
        let mut in_literal = false;
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            if in_literal {
                in_literal = c != '\'';
                out.push(c);
                continue;
            }
            match c {
                '\'' => {
                    in_literal = true;
                    out.push(c);
                }
                '?' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => out.push('$'),
                '?' => {
                    next += 1;
                    out.push('$');
                    out.push_str(&next.to_string());
                }
                _ => out.push(c),
            }
        }
        out
    }

    /// Many rows for one statement: one JSON array, one parameter.
    pub const ROWS: crate::store::bound_rows::Style = crate::store::bound_rows::Style::Json;
    /// Row locks make a write transaction wait where it needs to.
    pub const BEGIN: &str = "BEGIN";
    pub const JSON_OBJECT: &str = "json_build_object";
    pub fn json_merge(a: &str, b: &str) -> String {
        format!("CAST(CAST({a} AS jsonb) || CAST({b} AS jsonb) AS TEXT)")
    }
    pub const JSON_KEY_OF_VARIABLES: &str = "(CAST(variables AS jsonb) -> ?)";
    pub fn json_key(key: &str) -> Cow<'_, str> {
        Cow::Borrowed(key)
    }
    /// Whether recording outcomes learns which executions it updated from
    /// `RETURNING` (see `record_outcomes_in`): here the rows come back with
    /// the update, while asking for the ones not updated first is a
    /// thousand more index probes in the server (1.5 ms a slice).
    pub const RETURN_UPDATED_IDS: bool = true;
    /// Tasks of a node that work one run by default: two, each on its own
    /// batches and connection, so one task's executions are written while
    /// the other's transaction holds the run's row (see
    /// `record_outcomes_in`). A 1M-recipient run on two cores, in
    /// alternating runs: 22,997 / 23,661 recipients/s with one task,
    /// 33,579 / 29,016 with two.
    pub const TASKS_PER_RUN: usize = 2;
    /// Several nodes claim at once: each takes a run no one else is taking.
    pub const CLAIM_LOCK: &str = "FOR UPDATE OF r SKIP LOCKED";
    /// Reads and writes share one pool.
    pub const READER_POOL: Option<&str> = None;
    /// Locks a row until commit (engine transactions take the run's first).
    pub const ROW_LOCK: &str = "FOR UPDATE";
    /// Ends a subquery the planner must not merge into the query around
    /// it. Receipts match each message by a scalar subquery; merged, that
    /// subquery became the join key, which no index path takes, and with
    /// statistics from before the run's sends the planner hash-joined each
    /// batch of receipts against a scan of every execution (50 ms a batch
    /// at 300k executions). Kept apart, its `id` is a plain column, and each
    /// receipt is one primary-key lookup.
    pub const PLANNING_FENCE: &str = "OFFSET 0";
    /// Workers leasing batches of one run at once each take a different one.
    pub const BATCH_CLAIM_LOCK: &str = "FOR UPDATE SKIP LOCKED";

    /// Added to the `RETURNING` of the statement that takes an event's
    /// sequence: tells every node's listener that the campaign has new
    /// events, without a round trip of its own. Sent at commit; Postgres
    /// folds identical payloads of one transaction. The channel is
    /// [`EVENTS_CHANNEL`](super::EVENTS_CHANNEL).
    pub const ANNOUNCE: &str = ", pg_notify('herald_events', \
        CAST(campaigns.id AS TEXT) || ':' || CAST(campaigns.workspace_id AS TEXT)) IS NULL AS announced";

    /// Listens for announcements from every node. When the listening
    /// connection drops, it reconnects and sends [`Change::Resync`], so the
    /// hub re-reads the log for whatever was announced while it was away.
    pub async fn watch_changes(pool: &Pool) -> StoreResult<Option<ChangeFeed>> {
        let mut listener = listen(pool).await?;
        let (sender, feed) = mpsc::channel(4096);
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => {
                        let Some(change) = parse(notification.payload()) else {
                            continue;
                        };
                        if sender.send(change).await.is_err() {
                            return;
                        }
                    }
                    outage => {
                        tracing::warn!(error = ?outage.err(), "event listener lost its connection; reconnecting");
                        listener = loop {
                            if sender.is_closed() {
                                return;
                            }
                            match listen(&pool).await {
                                Ok(listener) => break listener,
                                Err(error) => {
                                    tracing::warn!(%error, "event listener cannot reconnect yet");
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                }
                            }
                        };
                        tracing::info!("event listener reconnected; catching up from the log");
                        if sender.send(Change::Resync).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Some(feed))
    }

    async fn listen(pool: &Pool) -> StoreResult<PgListener> {
        let mut listener = PgListener::connect_with(pool).await?;
        // Reconnection is ours to do, so the outage is seen and caught up.
        listener.ignore_pool_close_event(true);
        listener.listen(super::EVENTS_CHANNEL).await?;
        Ok(listener)
    }

    fn parse(payload: &str) -> Option<Change> {
        let (campaign, workspace) = payload.split_once(':')?;
        Some(Change::Appended {
            campaign_id: campaign.parse().ok()?,
            workspace_id: workspace.parse().ok()?,
        })
    }

    /// Reads share the pool with writes.
    pub type ReadPool = Pool;

    /// A pooled connection for a read.
    pub async fn read(pool: &ReadPool) -> StoreResult<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        Ok(pool.acquire().await?)
    }

    /// [`read_job`]: Postgres' reader waits on its statements, so its jobs
    /// run on a blocking thread however short (SQLite runs short ones on
    /// the caller's thread).
    pub async fn read_job_here<T, Job>(pool: &ReadPool, job: Job) -> StoreResult<T>
    where
        T: Send + 'static,
        Job: FnOnce(&mut Reader<'_>) -> StoreResult<T> + Send + 'static,
    {
        read_job(pool, job).await
    }

    /// A read of one or more statements on one pooled connection, run as a
    /// job on a blocking thread: the same code as SQLite's jobs (see its
    /// dialect), each statement awaited in turn.
    pub async fn read_job<T, Job>(pool: &ReadPool, job: Job) -> StoreResult<T>
    where
        T: Send + 'static,
        Job: FnOnce(&mut Reader<'_>) -> StoreResult<T> + Send + 'static,
    {
        let mut connection = read(pool).await?;
        let runtime = tokio::runtime::Handle::current();
        let ran = tokio::task::spawn_blocking(move || {
            use sqlx::Connection as _;
            // One snapshot for the job's statements, as on SQLite: a page's
            // rows and its total agree.
            let mut snapshot = runtime.block_on(
                connection.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
            )?;
            let result = job(&mut Reader {
                connection: &mut snapshot,
                runtime: &runtime,
            });
            // A failed job's transaction rolls back as it is dropped.
            if result.is_ok() {
                runtime.block_on(snapshot.commit())?;
            }
            result
        })
        .await;
        crate::store::joined(ran)
    }

    /// The first row of one statement (placeholders already `$n`), read on
    /// a pooled connection: the same code as SQLite's [`read_row`], which
    /// reads where it is called.
    pub async fn read_row<T>(
        pool: &ReadPool,
        sql: &str,
        params: Vec<crate::store::columns::Param>,
        map: impl FnOnce(&dyn crate::store::columns::Columns) -> StoreResult<T>,
    ) -> StoreResult<Option<T>> {
        let row = bound(sql, &params)
            .fetch_optional(&mut *read(pool).await?)
            .await?;
        match row {
            Some(row) => map(&row).map(Some),
            None => Ok(None),
        }
    }

    /// `sql` with `params` bound in order.
    fn bound<'q>(
        sql: &'q str,
        params: &'q [crate::store::columns::Param],
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        use crate::store::columns::Param;
        params
            .iter()
            .fold(sqlx::query(sql), |query, param| match param {
                Param::Int(value) => query.bind(*value),
                Param::Text(value) => query.bind(value.as_str()),
            })
    }

    /// Hands each row of a statement (placeholders already `$n`) run inside
    /// a writer's transaction to `row`: the same code as SQLite's
    /// `each_row_in`, which reads its rows without sqlx.
    pub async fn each_row_in(
        conn: &mut Conn,
        sql: &str,
        params: Vec<crate::store::columns::Param>,
        row: &mut (dyn FnMut(&dyn crate::store::columns::Columns) -> StoreResult<()> + Send),
    ) -> StoreResult<()> {
        for next in bound(sql, &params).fetch_all(&mut *conn).await? {
            row(&next)?;
        }
        Ok(())
    }

    /// What a [`read_job`] reads with.
    pub struct Reader<'c> {
        connection: &'c mut sqlx::PgConnection,
        runtime: &'c tokio::runtime::Handle,
    }

    impl crate::store::columns::ReadRows for Reader<'_> {
        fn each_row(
            &mut self,
            sql: &str,
            params: Vec<crate::store::columns::Param>,
            row: &mut dyn FnMut(&dyn crate::store::columns::Columns) -> StoreResult<()>,
        ) -> StoreResult<()> {
            let sql = placeholders(sql);
            let query = bound(&sql, &params);
            for next in self
                .runtime
                .block_on(query.fetch_all(&mut *self.connection))?
            {
                row(&next)?;
            }
            Ok(())
        }
    }

    /// Not called: Postgres has no reader pool of its own.
    pub fn read_usage(name: &'static str, pool: &ReadPool) -> crate::store::PoolUsage {
        crate::store::PoolUsage::of_sqlx(name, pool)
    }

    pub async fn backup(_reader: &ReadPool, _path: &str) -> StoreResult<()> {
        Err(StoreError::Unsupported(
            "herald backup copies SQLite databases; back up Postgres with pg_dump \
             (see README, \"Running several nodes\")"
                .into(),
        ))
    }

    #[cfg(test)]
    mod tests {
        use super::placeholders;

        #[test]
        fn placeholders_are_numbered_outside_literals() {
            assert_eq!(
                placeholders("SELECT ? , '?' , ?, x ->> 0"),
                "SELECT $1 , '?' , $2, x ->> 0"
            );
            assert_eq!(placeholders("a = ?2 AND b = ?1"), "a = $2 AND b = $1");
            assert_eq!(placeholders("'it''s ?' = ?"), "'it''s ?' = $1");
        }

        #[test]
        fn events_are_announced_on_the_channel_listeners_hear() {
            let quoted = format!("'{}'", super::super::EVENTS_CHANNEL);
            assert!(super::ANNOUNCE.contains(&quoted));
        }
    }
}

/// How each of Herald's sessions is opened.
///
/// JIT compilation is off: Postgres compiles a statement whose estimated
/// cost passes `jit_above_cost`, and a statement over bound rows is
/// estimated blind (a JSON array's elements count as 100, each looked up
/// as if it matched hundreds). The receipts' `UPDATE` was compiled every
/// time: 190-280 ms of code generation for 30-50 ms of work, on the cores
/// the engine needs (`auto_explain`, `bench engine --postgres`).
fn connect_options(url: &str, options: &StoreOptions) -> anyhow::Result<PgConnectOptions> {
    let timeout_ms = options.statement_timeout.as_millis().to_string();
    Ok(PgConnectOptions::from_str(url)?
        .application_name("herald")
        .options([("statement_timeout", timeout_ms.as_str()), ("jit", "off")]))
}

impl PgStore {
    pub async fn connect(url: &str, options: &StoreOptions) -> anyhow::Result<Self> {
        let connect = connect_options(url, options)?;
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(connect)
            .await?;
        // sqlx takes an advisory lock: nodes starting together migrate once.
        super::migrate_or_check(
            &sqlx::migrate!("./migrations/postgres"),
            &mut *pool.acquire().await?,
            options,
        )
        .await?;
        Ok(Self {
            writer: pool.clone(),
            reader: pool,
            _background: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection as _;

    /// What a session opened as Herald's says `SHOW name` is, on the test
    /// server (`HERALD_TEST_POSTGRES_URL`, which `./test.sh` starts).
    async fn session_setting(options: &StoreOptions, name: &str) -> String {
        let url = std::env::var("HERALD_TEST_POSTGRES_URL")
            .expect("Postgres tests need HERALD_TEST_POSTGRES_URL; run ./test.sh");
        let mut session =
            sqlx::PgConnection::connect_with(&connect_options(&url, options).unwrap())
                .await
                .unwrap();
        sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut session)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn sessions_run_without_jit_and_with_the_statement_timeout() {
        let options = StoreOptions {
            statement_timeout: Duration::from_millis(1234),
            ..StoreOptions::default()
        };
        assert_eq!(session_setting(&options, "jit").await, "off");
        assert_eq!(
            session_setting(&options, "statement_timeout").await,
            "1234ms"
        );
    }
}
