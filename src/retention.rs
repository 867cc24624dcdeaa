//! Data lifecycle: a background purge that keeps the event log, executions
//! and per-minute metrics within their retention settings.
//!
//! Every purge step is one short statement on at most [`CHUNK`] rows, so the
//! writer (the engine's, on SQLite) is never held for long: between chunks
//! the engine's own transactions get their turn. What a purge removes is
//! detail, never totals: a run's counters, credits and events' sequence
//! numbers stay exact after its executions are gone.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Rows deleted per statement.
const CHUNK: i64 = 5000;

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Events are purged once older than this *and* beyond the newest
    /// `event_count` of their campaign (a reconnecting client can replay
    /// at least that far back).
    pub event_age: Duration,
    pub event_count: i64,
    /// Executions of runs that ended longer ago than this are purged,
    /// oldest run first; `None` keeps them for ever.
    pub execution_age: Option<Duration>,
    /// Per-minute send counts older than this are purged; `None` keeps them.
    pub metrics_age: Option<Duration>,
    /// How often the purge runs.
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            event_age: Duration::from_secs(24 * 3600),
            event_count: 100_000,
            execution_age: None,
            metrics_age: Some(Duration::from_secs(90 * 24 * 3600)),
            interval: Duration::from_secs(60),
        }
    }
}

/// Purges on an interval until `shutdown`.
pub async fn purge_loop(
    store: Arc<dyn Store>,
    config: RetentionConfig,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(config.interval) => {}
        }
        if purge_once(store.as_ref(), &config, &shutdown)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Signals that shutdown interrupted a purge.
struct Stopped;

/// One pass over every kind of data, each until nothing is left to purge.
async fn purge_once(
    store: &dyn Store,
    config: &RetentionConfig,
    shutdown: &CancellationToken,
) -> Result<(), Stopped> {
    let now = crate::store::now_ms();
    let before = |age: Duration| now - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    let events_before = before(config.event_age);
    drain("events", shutdown, || {
        store.purge_events(events_before, config.event_count, CHUNK)
    })
    .await?;
    if let Some(age) = config.execution_age {
        let ended_before = before(age);
        drain("executions", shutdown, || {
            store.purge_executions(ended_before, CHUNK)
        })
        .await?;
    }
    if let Some(age) = config.metrics_age {
        let before_minute = before(age).div_euclid(60_000);
        drain("metrics minutes", shutdown, || {
            store.purge_metrics(before_minute, CHUNK)
        })
        .await?;
    }
    Ok(())
}

/// Runs one purge step after another until a step finds nothing to do (or
/// fails: the next pass tries again).
async fn drain<F, Fut>(what: &str, shutdown: &CancellationToken, mut step: F) -> Result<(), Stopped>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::store::StoreResult<u64>>,
{
    loop {
        match step().await {
            Ok(0) => return Ok(()),
            Ok(n) => tracing::debug!(deleted = n, what, "purged"),
            Err(err) => {
                tracing::warn!(error = %err, what, "purge failed");
                return Ok(());
            }
        }
        if shutdown.is_cancelled() {
            return Err(Stopped);
        }
    }
}
