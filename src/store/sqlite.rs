//! The embedded SQLite backend: the shared SQL of [`sql`] compiled against
//! SQLite, plus what only SQLite does (pools, WAL, `VACUUM INTO`).
//!
//! SQLite allows one writer at a time, so writes go through a pool of one
//! connection (they queue in Herald instead of spinning on `SQLITE_BUSY`),
//! while reads use a separate pool and, thanks to WAL, never wait for writes.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::StoreOptions;

// The same source file is compiled once per backend; `dialect` below is
// what differs. See ARCHITECTURE.md, "One SQL, two backends".
#[allow(clippy::duplicate_mod)]
#[path = "sql/mod.rs"]
mod sql;

pub use sql::SqlStore as SqliteStore;

pub(crate) mod dialect {
    use std::borrow::Cow;

    pub type Db = sqlx::Sqlite;
    pub type Conn = sqlx::SqliteConnection;
    pub type DbRow = sqlx::sqlite::SqliteRow;
    pub type Pool = sqlx::SqlitePool;
    pub use super::ReadPool;

    /// A read connection, lent by [`ReadPool`].
    pub async fn read(pool: &ReadPool) -> crate::store::StoreResult<super::ReadGuard> {
        pool.lend().await
    }

    /// A read of one or more statements, run as one job on a
    /// [`super::RowReaders`] connection: one hand-off for all of them.
    pub async fn read_job<T, Job>(pool: &ReadPool, job: Job) -> crate::store::StoreResult<T>
    where
        T: Send + 'static,
        Job: FnOnce(&mut Reader<'_>) -> crate::store::StoreResult<T> + Send + 'static,
    {
        pool.rows
            .read(move |connection| run_job(connection, job))
            .await
    }

    /// Runs `job` in one read transaction: the job's statements see one
    /// snapshot (a page's rows and its total agree), and take the WAL's
    /// read lock once rather than once each.
    fn run_job<T>(
        connection: &rusqlite::Connection,
        job: impl FnOnce(&mut Reader<'_>) -> crate::store::StoreResult<T>,
    ) -> crate::store::StoreResult<T> {
        let snapshot = connection.unchecked_transaction()?;
        job(&mut Reader {
            connection: &snapshot,
        })
    }

    /// [`read_job`] on the caller's thread, for a job of a few short
    /// statements: a page of executions that is one index range of at most
    /// a hundred rows, rendered, takes about a tenth of a millisecond, and
    /// the hand-off to a blocking thread and back cost more than a fifth of
    /// that (alternating `bench rest` runs, 200,000 executions: 158–202
    /// against 133–137 µs of server CPU a page, 8,000–10,300 against
    /// 11,400–11,900 pages a second). It holds up the async worker it runs
    /// on until it is done, so it is not for reads that may scan.
    pub async fn read_job_here<T, Job>(pool: &ReadPool, job: Job) -> crate::store::StoreResult<T>
    where
        Job: FnOnce(&mut Reader<'_>) -> crate::store::StoreResult<T>,
    {
        run_job(&*pool.rows.0.lend().await?, job)
    }

    /// The first row of one short statement, read on the caller's thread.
    ///
    /// For what clients poll (a campaign's status, its totals) and the
    /// campaign lookup that nearly every request on a campaign begins with:
    /// one indexed statement of a few microseconds, which through sqlx was
    /// a hand-off to its connection's thread and back (two thread wake-ups,
    /// each dearer than the statement) and through [`read_job`] one to a
    /// blocking thread. Not for long statements: this one holds up the
    /// async worker it runs on until it is done.
    pub async fn read_row<T>(
        pool: &ReadPool,
        sql: &str,
        params: Vec<crate::store::columns::Param>,
        map: impl FnOnce(&dyn crate::store::columns::Columns) -> crate::store::StoreResult<T>,
    ) -> crate::store::StoreResult<Option<T>> {
        let connection = pool.rows.0.lend().await?;
        let mut statement = connection.prepare_cached(sql)?;
        let mut rows = statement.query(rusqlite::params_from_iter(params))?;
        match rows.next()? {
            Some(row) => map(row).map(Some),
            None => Ok(None),
        }
    }

    /// Hands each row of a statement run inside the writer's transaction
    /// to `row`, borrowed.
    ///
    /// For the engine's statements that return a slice's thousand rows:
    /// through sqlx, every value of every row was copied on the
    /// connection's thread and each row sent across on its own. Here the
    /// connection is locked out of sqlx's thread (`lock_handle`, one
    /// hand-off, as a statement would be) and the statement is stepped on
    /// this thread by rusqlite, each value read where SQLite holds it, by
    /// the readers' own [`Reader`]. The read holds up the async worker it runs on
    /// (a slice's, under a millisecond), so it is not for long reads; and
    /// its statement is prepared each time, since nothing of rusqlite may
    /// outlive the lock.
    pub async fn each_row_in(
        conn: &mut Conn,
        sql: &str,
        params: Vec<crate::store::columns::Param>,
        row: &mut (dyn FnMut(&dyn crate::store::columns::Columns) -> crate::store::StoreResult<()>
                  + Send),
    ) -> crate::store::StoreResult<()> {
        use crate::store::columns::ReadRows as _;
        let mut locked = conn.lock_handle().await?;
        // SAFETY: while `locked` lives, sqlx's thread makes no call on the
        // handle or its statements. The rusqlite connection over it is
        // dropped first, and does not close a handle it was lent.
        let connection =
            unsafe { rusqlite::Connection::from_handle(locked.as_raw_handle().as_ptr()) }?;
        Reader {
            connection: &connection,
        }
        .each_row(sql, params, row)
    }

    /// What a [`read_job`] reads with.
    pub struct Reader<'c> {
        connection: &'c rusqlite::Connection,
    }

    impl crate::store::columns::ReadRows for Reader<'_> {
        fn each_row(
            &mut self,
            sql: &str,
            params: Vec<crate::store::columns::Param>,
            row: &mut dyn FnMut(
                &dyn crate::store::columns::Columns,
            ) -> crate::store::StoreResult<()>,
        ) -> crate::store::StoreResult<()> {
            let mut statement = self.connection.prepare_cached(sql)?;
            let mut rows = statement.query(rusqlite::params_from_iter(params))?;
            while let Some(next) = rows.next()? {
                row(next)?;
            }
            Ok(())
        }
    }

    /// The readers' connections lent now, idle, and in all.
    pub fn read_usage(name: &'static str, pool: &ReadPool) -> crate::store::PoolUsage {
        pool.usage(name)
    }

    /// SQLite takes `?` and `?N` as they are.
    pub fn placeholders(sql: &str) -> String {
        sql.to_owned()
    }

    /// Many rows for one statement: `VALUES` placeholders, in chunks.
    pub const ROWS: crate::store::bound_rows::Style = crate::store::bound_rows::Style::Values;
    /// Write transactions take the write lock when they begin. A deferred
    /// one that reads first cannot wait for a lock another process holds
    /// (SQLite answers BUSY at once, to avoid a deadlock); an immediate one
    /// waits out the busy timeout like any single statement.
    pub const BEGIN: &str = "BEGIN IMMEDIATE";
    /// Builds a JSON object (as text) from key/value arguments.
    pub const JSON_OBJECT: &str = "json_object";
    /// `a` with the keys of `b` set on it; both JSON objects stored as text.
    pub fn json_merge(a: &str, b: &str) -> String {
        format!("json_patch({a}, {b})")
    }
    /// The value of the key bound as the next parameter, NULL when absent.
    pub const JSON_KEY_OF_VARIABLES: &str = "json_extract(variables, ?)";
    /// The parameter [`JSON_KEY_OF_VARIABLES`] takes for `key`: a path
    /// quoted so dots stay part of the name.
    pub fn json_key(key: &str) -> Cow<'_, str> {
        Cow::Owned(format!("$.\"{}\"", key.replace('"', "\\\"")))
    }
    /// Whether recording outcomes learns which executions it updated from
    /// `RETURNING` (see `record_outcomes_in`). Not here: sqlx hands each
    /// returned row across threads, a thousand a slice inside the writer's
    /// transaction, while asking for the few it did not update costs an
    /// index lookup in this process.
    pub const RETURN_UPDATED_IDS: bool = false;
    /// Tasks of a node that work one run by default: one, as the single
    /// writer would only queue a second's transactions behind the first's.
    pub const TASKS_PER_RUN: usize = 1;
    /// One writer at a time already: nothing to skip.
    pub const CLAIM_LOCK: &str = "";
    /// Reads have their own pool beside the single writer.
    pub const READER_POOL: Option<&str> = Some("reader");
    /// Row locks: none needed with one writer.
    pub const ROW_LOCK: &str = "";
    /// Ends a subquery the planner must not merge into the query around
    /// it (see the Postgres dialect): SQLite's plans need none.
    pub const PLANNING_FENCE: &str = "";
    pub const BATCH_CLAIM_LOCK: &str = "";

    /// A single process sees its own writes; nothing to announce.
    pub const ANNOUNCE: &str = "";

    /// No other process writes: the hub hears of every change locally.
    pub async fn watch_changes(
        _pool: &Pool,
    ) -> crate::store::StoreResult<Option<crate::store::ChangeFeed>> {
        Ok(None)
    }

    /// A read transaction sees one snapshot, so the copy is consistent
    /// even while runs write; the writer is never blocked.
    pub async fn backup(reader: &ReadPool, path: &str) -> crate::store::StoreResult<()> {
        sqlx::query("VACUUM INTO ?")
            .bind(path)
            .execute(&mut *read(reader).await?)
            .await?;
        Ok(())
    }
}

/// SQLite keeps memory statistics by default, behind one process-wide
/// mutex taken on every allocation: every column of every row read takes it,
/// so the reader pool's threads queue on it (a quarter of the CPU of a page
/// of executions under load). Herald never reads the statistics. The switch
/// only takes effect before SQLite initialises, so it is made once, before
/// the first connection; later calls are refused by SQLite and harmless.
fn disable_memory_statistics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config is called before any connection is opened
        // by this process (the Once runs ahead of the first connect), with
        // the one int argument SQLITE_CONFIG_MEMSTATUS takes.
        let rc = unsafe {
            libsqlite3_sys::sqlite3_config(
                libsqlite3_sys::SQLITE_CONFIG_MEMSTATUS,
                0 as std::os::raw::c_int,
            )
        };
        if rc != libsqlite3_sys::SQLITE_OK {
            tracing::debug!(rc, "SQLite memory statistics stay on (already initialised)");
        }
    });
}

/// The read-only connections, lent without sqlx's pool.
///
/// sqlx's pool pings every connection it takes back, and for SQLite a ping
/// is a round trip to the connection's thread: two thread wake-ups, as
/// many as the statement it follows, and on the short reads that clients
/// poll (seed 002 status) the wake-ups are most of the work. A connection
/// here goes back to the idle list as it is. Nothing is lost by that: a
/// SQLite connection cannot go stale, and its thread runs what it is sent
/// in order, so a statement whose caller went away (a dropped request)
/// finishes, or stops at its next row, before the next borrower's starts.
pub struct ReadPool {
    connections: Lender<sqlx::SqliteConnection>,
    /// The same database for reads of many rows, without sqlx.
    rows: RowReaders,
}

/// A connection of a [`ReadPool`], back in the idle list when dropped.
pub type ReadGuard = Lent<sqlx::SqliteConnection>;

/// How long a read waits for a connection before it fails (as sqlx's
/// pool's default acquire timeout).
const READ_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

impl ReadPool {
    async fn connect(options: &SqliteConnectOptions, size: u32) -> sqlx::Result<Self> {
        use sqlx::ConnectOptions;
        let mut idle = Vec::with_capacity(size as usize);
        for _ in 0..size {
            idle.push(options.connect().await?);
        }
        Ok(Self {
            connections: Lender::new(idle),
            rows: RowReaders::open(options, row_readers(size as usize)).map_err(|e| {
                sqlx::Error::Configuration(format!("opening the row readers: {e}").into())
            })?,
        })
    }

    async fn lend(&self) -> crate::store::StoreResult<ReadGuard> {
        self.connections.lend().await
    }

    /// Connections lent now, idle, and in all, under the name `pool`.
    pub fn usage(&self, pool: &'static str) -> crate::store::PoolUsage {
        let (max, idle) = (self.connections.size, self.connections.available());
        crate::store::PoolUsage {
            pool,
            in_use: max.saturating_sub(idle),
            idle,
            max,
        }
    }
}

/// Connections of one kind lent one borrower at a time: an idle list and
/// a semaphore with a permit per connection.
struct Lender<C> {
    idle: std::sync::Arc<std::sync::Mutex<Vec<C>>>,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    size: u32,
}

/// A connection of a [`Lender`], back in its idle list when dropped (even
/// by a panic); owned, so a blocking thread can hold it.
pub struct Lent<C> {
    connection: Option<C>,
    idle: std::sync::Arc<std::sync::Mutex<Vec<C>>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<C> Lender<C> {
    fn new(idle: Vec<C>) -> Self {
        let size = idle.len();
        Self {
            idle: std::sync::Arc::new(std::sync::Mutex::new(idle)),
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(size)),
            size: size as u32,
        }
    }

    async fn lend(&self) -> crate::store::StoreResult<Lent<C>> {
        let permit =
            tokio::time::timeout(READ_ACQUIRE_TIMEOUT, self.permits.clone().acquire_owned())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
                .map_err(|_| sqlx::Error::PoolClosed)?;
        let connection = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Ok(Lent {
            // A permit is only ever held beside a connection out of the list.
            connection: Some(connection.ok_or(sqlx::Error::PoolClosed)?),
            idle: self.idle.clone(),
            _permit: permit,
        })
    }

    /// Connections idle now.
    fn available(&self) -> u32 {
        self.permits.available_permits() as u32
    }
}

impl<C> std::ops::Deref for Lent<C> {
    type Target = C;
    fn deref(&self) -> &C {
        self.connection.as_ref().expect("lent until dropped")
    }
}

impl<C> std::ops::DerefMut for Lent<C> {
    fn deref_mut(&mut self) -> &mut C {
        self.connection.as_mut().expect("lent until dropped")
    }
}

impl<C> Drop for Lent<C> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            // Back before the permit is released (fields drop after this).
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(connection);
        }
    }
}

/// Read-only connections that reads of many rows (pages of executions) run
/// on directly, through rusqlite, on tokio's blocking threads.
///
/// sqlx runs each SQLite connection on a thread of its own and sends each
/// row to the async side on its own, with every value of the row copied
/// first: on a page of a hundred executions, the copies, the allocator's
/// cross-thread frees and the thread hand-offs cost more than the query.
/// Here a whole read is one job: the rows are read where SQLite steps
/// them, straight into their records, and one hand-off returns them all.
pub struct RowReaders(Lender<rusqlite::Connection>);

/// How many [`RowReaders`] a pool of `size` readers opens: twice the cores.
/// A job reads and then has its caller render what it read (a page of
/// executions becomes its JSON body there), so each job is mostly CPU; with
/// far more jobs at once than cores the kernel shares the cores out between
/// them and each takes longer, with too few the cores idle while the async
/// workers hand requests over. bench rest, pages on 2 cores, p99: 11.1-13.0
/// ms with 2 readers, 9.7-10.7 with 3, 8.9-9.6 with 4, 9.1-9.6 with 5 or 6,
/// 9.9-10.3 with 8.
fn row_readers(size: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (2 * cores).min(size)
}

impl RowReaders {
    /// `size` connections to the database `options` name, read-only.
    fn open(options: &SqliteConnectOptions, size: usize) -> rusqlite::Result<Self> {
        use rusqlite::OpenFlags;
        let filename = options.get_filename().to_string_lossy();
        // sqlx names an in-memory database `file:sqlx-in-memory-N` and
        // shares its cache between connections; join that cache.
        let (path, flags) = if filename.starts_with("file:sqlx-in-memory-") {
            (
                format!("{filename}?mode=memory&cache=shared"),
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI,
            )
        } else {
            (filename.into_owned(), OpenFlags::SQLITE_OPEN_READ_ONLY)
        };
        let mut idle = Vec::with_capacity(size);
        for _ in 0..size {
            let connection = rusqlite::Connection::open_with_flags(
                &path,
                flags | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            connection.busy_timeout(Duration::from_secs(10))?;
            idle.push(connection);
        }
        Ok(Self(Lender::new(idle)))
    }

    /// Runs `job` on a lent connection, on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        job: impl FnOnce(&rusqlite::Connection) -> crate::store::StoreResult<T> + Send + 'static,
    ) -> crate::store::StoreResult<T> {
        let lent = self.0.lend().await?;
        crate::store::joined(tokio::task::spawn_blocking(move || job(&lent)).await)
    }
}

/// How often the WAL is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// WAL pages (of 4 KiB) at which the writer checkpoints by itself, should
/// the background checkpoints fall behind: a backstop, not the usual path.
const WRITER_CHECKPOINT_PAGES: u32 = 16_384;

/// Bytes the WAL file is truncated to when it starts over.
const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// Copies committed WAL frames into the database file, beside the writer.
///
/// By default SQLite checkpoints in the connection whose commit takes the
/// WAL past 1000 pages: the single writer, which then copies pages and
/// waits for `fsync` while every write of every run queues behind it (15%
/// of a fast provider's run on a development machine). A passive checkpoint
/// on a connection of its own takes no lock writers or readers wait for; a
/// write after a complete one starts the WAL over, so it stays small.
async fn checkpoint_continuously(pool: sqlx::SqlitePool) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(%error, "WAL checkpoint failed; the writer checkpoints by itself");
        }
    }
}

impl SqliteStore {
    pub async fn connect(url: &str, options: &StoreOptions) -> anyhow::Result<Self> {
        disable_memory_statistics();
        let connect = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // sqlx hands rows from its SQLite thread to the async side over a
            // bounded channel (50 by default). A slice moves 1000 rows at once,
            // and every time the channel fills the two threads wait on each
            // other; room for a whole slice keeps the SQLite thread running.
            .row_buffer_size(2048);
        // Every pool below skips sqlx's ping before handing out a connection
        // (`test_before_acquire`): the ping exists for network connections
        // that a server may have dropped, while a SQLite connection is a
        // handle in this process that cannot go stale. For SQLite the ping is
        // a round trip to the connection's thread, two thread wake-ups, which
        // doubled the cost of each single-statement read. Ordering does not
        // need it: sqlx pings on release, so a connection is idle again only
        // once its thread has finished everything sent to it.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(120))
            // Writes queue here by design (one writer, no SQLITE_BUSY), and
            // behind a million-row freeze or import they wait seconds: sqlx
            // would warn of a "slow acquire" at 2 s. Warn only when a wait
            // nears the timeout.
            .acquire_slow_threshold(Duration::from_secs(60))
            // SQLite rolls a transaction back by itself on some errors (a
            // full disk); sqlx's own ROLLBACK then fails and the connection
            // still counts a transaction. Such a connection is replaced
            // rather than reused, or every later write would fail.
            .before_acquire(|conn, _| {
                Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
            })
            .connect_with(
                connect
                    .clone()
                    .pragma("wal_autocheckpoint", WRITER_CHECKPOINT_PAGES.to_string())
                    // A large transaction (a freeze, an import) grows the
                    // WAL; once it starts over, the file shrinks back to this.
                    .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string())
                    // Room for every statement the writer runs (sqlx keeps
                    // 100 by default): a statement of bound rows has one
                    // text per chunk size, and re-preparing one of 1,024 rows
                    // costs far more than keeping it.
                    .statement_cache_capacity(256),
            )
            .await?;
        super::migrate_or_check(
            &sqlx::migrate!("./migrations/sqlite"),
            &mut *writer.acquire().await?,
            options,
        )
        .await?;
        let reader = ReadPool::connect(&connect.clone().read_only(true), 8).await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(connect)
            .await?;
        let checkpoints = tokio::spawn(checkpoint_continuously(checkpointer));
        Ok(Self {
            writer,
            reader,
            _background: Some(super::BackgroundTask(checkpoints)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::columns::ReadRows;

    async fn pool_of(size: u32) -> (tempfile::TempDir, ReadPool) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}/read.db", dir.path().display());
        let options = SqliteConnectOptions::from_str(&url)
            .expect("url")
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = ReadPool::connect(&options, size).await.expect("pool");
        (dir, pool)
    }

    /// Lent, idle, in all.
    fn counts(pool: &ReadPool) -> (u32, u32, u32) {
        let usage = pool.usage("reader");
        (usage.in_use, usage.idle, usage.max)
    }

    #[tokio::test]
    async fn a_lent_connection_comes_back_when_dropped_and_the_count_says_so() {
        let (_dir, pool) = pool_of(2).await;
        assert_eq!(counts(&pool), (0, 2, 2));
        let first = pool.lend().await.expect("first");
        let second = pool.lend().await.expect("second");
        assert_eq!(counts(&pool), (2, 0, 2));
        // A third borrower waits until one is back.
        let waiting = tokio::time::timeout(Duration::from_millis(50), pool.lend()).await;
        assert!(
            waiting.is_err(),
            "a third connection was lent from a pool of two"
        );
        drop(first);
        assert_eq!(counts(&pool), (1, 1, 2));
        let mut again = pool.lend().await.expect("lent again");
        let one: i64 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut *again)
            .await
            .expect("read");
        assert_eq!(one, 1);
        drop((again, second));
        assert_eq!(counts(&pool), (0, 2, 2));
    }

    #[tokio::test]
    async fn a_row_reader_comes_back_after_its_job_panics_and_reads_again() {
        let (_dir, pool) = pool_of(1).await;
        let pool = std::sync::Arc::new(pool);
        let panicking = pool.clone();
        let panicked = tokio::spawn(async move {
            panicking
                .rows
                .read(|_| -> crate::store::StoreResult<()> { panic!("a bug in a row mapper") })
                .await
        })
        .await;
        assert!(panicked.is_err_and(|e| e.is_panic()), "the panic was lost");
        let rows: Vec<i64> = dialect::read_job(&pool, |reader| {
            reader.rows(
                "SELECT value FROM json_each(?) ORDER BY value DESC",
                vec![crate::store::columns::Param::Text("[1, 3, 2]".into())],
            )
        })
        .await
        .expect("read after the panic");
        assert_eq!(rows, [3, 2, 1]);
    }

    #[tokio::test]
    async fn a_read_job_sees_one_snapshot_though_a_write_commits_between_its_statements() {
        let (dir, pool) = pool_of(1).await;
        let path = dir.path().join("read.db");
        let writer = rusqlite::Connection::open(&path).expect("writer");
        writer
            .execute_batch(
                "CREATE TABLE items (id INTEGER PRIMARY KEY); INSERT INTO items DEFAULT VALUES;",
            )
            .expect("table");
        let (before, after, outside) = dialect::read_job(&pool, move |reader| {
            let count = "SELECT COUNT(*) FROM items";
            let before: Vec<i64> = reader.rows(count, vec![])?;
            writer
                .execute("INSERT INTO items DEFAULT VALUES", [])
                .expect("a write between the job's statements");
            let after: Vec<i64> = reader.rows(count, vec![])?;
            Ok((before, after, writer))
        })
        .await
        .map(|(before, after, writer)| {
            let outside: i64 = writer
                .query_row("SELECT COUNT(*) FROM items", [], |row| row.get(0))
                .expect("count");
            (before, after, outside)
        })
        .expect("job");
        assert_eq!((before, after), (vec![1], vec![1]));
        assert_eq!(outside, 2, "the write did commit");
        let next: Vec<i64> =
            dialect::read_job(&pool, |r| r.rows("SELECT COUNT(*) FROM items", vec![]))
                .await
                .expect("the next job");
        assert_eq!(next, [2], "the next job reads a fresh snapshot");
    }

    #[tokio::test]
    async fn a_job_read_here_sees_one_snapshot_and_gives_its_connection_back() {
        let (dir, pool) = pool_of(1).await;
        let writer = rusqlite::Connection::open(dir.path().join("read.db")).expect("writer");
        writer
            .execute_batch(
                "CREATE TABLE items (id INTEGER PRIMARY KEY); INSERT INTO items DEFAULT VALUES;",
            )
            .expect("table");
        let count = "SELECT COUNT(*) FROM items";
        let (before, after) = dialect::read_job_here(&pool, |reader| {
            let before: Vec<i64> = reader.rows(count, vec![])?;
            writer
                .execute("INSERT INTO items DEFAULT VALUES", [])
                .expect("a write between the job's statements");
            let after: Vec<i64> = reader.rows(count, vec![])?;
            Ok((before, after))
        })
        .await
        .expect("job");
        assert_eq!((before, after), (vec![1], vec![1]));
        assert_eq!(counts(&pool), (0, 1, 1), "the connection is back");
        let bad = dialect::read_job_here(&pool, |r| r.rows::<i64>("SELECT FROM nowhere", vec![]));
        assert!(matches!(bad.await, Err(crate::store::StoreError::Read(_))));
        let next = dialect::read_job_here(&pool, |r| r.rows::<i64>(count, vec![])).await;
        assert_eq!(next.expect("the next job"), [2], "a fresh snapshot");
    }

    #[tokio::test]
    async fn a_row_reader_reports_a_bad_statement_and_a_column_of_the_wrong_type() {
        let (_dir, pool) = pool_of(1).await;
        let bad = dialect::read_job(&pool, |r| r.rows::<i64>("SELECT FROM nowhere", vec![])).await;
        assert!(
            matches!(bad, Err(crate::store::StoreError::Read(_))),
            "{bad:?}"
        );
        let text = dialect::read_job(&pool, |r| r.rows::<i64>("SELECT 'seven'", vec![])).await;
        assert!(
            matches!(text, Err(crate::store::StoreError::Corrupt(_))),
            "{text:?}"
        );
    }

    #[tokio::test]
    async fn a_read_abandoned_midway_leaves_its_connection_right_for_the_next() {
        let (_dir, pool) = pool_of(1).await;
        // Two million rows: far more than can be read before the timeout.
        let abandoned = tokio::time::timeout(Duration::from_millis(5), async {
            let mut lent = pool.lend().await.expect("lent");
            sqlx::query_scalar::<_, i64>(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000)
                 SELECT i FROM n",
            )
            .fetch_all(&mut *lent)
            .await
        })
        .await;
        assert!(abandoned.is_err(), "the long read finished within 5 ms");
        let mut next = pool.lend().await.expect("lent after the abandoned read");
        let answer: i64 = sqlx::query_scalar("SELECT 41 + 1")
            .fetch_one(&mut *next)
            .await
            .expect("the next read");
        assert_eq!(answer, 42);
    }
}
