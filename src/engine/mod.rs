//! The engine: workers that claim due runs, freeze them, and send every
//! recipient through the run's provider.
//!
//! # How a run moves
//!
//! 1. [`Engine::run`] polls for due runs (at least every `poll`, and at once
//!    when the API pokes `wakeup`) and claims one with a lease.
//! 2. A run task freezes the snapshot (executions and batches of ≤1000),
//!    prices it and reserves credits ([`EngineStore::start_run`]).
//! 3. It then loops over slices: [`EngineStore::take_slice`] marks up to
//!    `slice` due executions in progress in one transaction, the task sends
//!    them with at most `in_flight` at once, and
//!    [`EngineStore::record_outcomes`] writes every outcome and counter in
//!    one more. Recording one slice and claiming the slice after next is one
//!    transaction, made while the slice between them is on the wire (a
//!    two-stage pipeline). Pause, cancel and a lost
//!    lease are noticed between slices.
//! 4. When nothing is pending or in flight, the run is finished.
//!
//! A node may work one run with several tasks (`tasks_per_run`: two on
//! Postgres, where one task's writes overlap another's), each leasing
//! batches of its own under its own name, exactly as tasks on other nodes
//! do.
//!
//! Marking a send in progress *before* sending is what makes a crash safe:
//! a worker that takes over an expired lease writes in-flight sends off as
//! "outcome unknown" instead of sending them again.
//!
//! [`EngineStore::start_run`]: crate::store::EngineStore::start_run
//! [`EngineStore::take_slice`]: crate::store::EngineStore::take_slice
//! [`EngineStore::record_outcomes`]: crate::store::EngineStore::record_outcomes

pub mod receipts;
mod run;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::providers::ProviderContext;
use crate::store::{now_ms, Store};
use crate::streams::Hub;

/// How a node's workers behave.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Names this worker in leases (host, pid and a random suffix).
    pub worker_id: String,
    /// Runs one node works on at once.
    pub max_runs: usize,
    /// Tasks of this node that work one run at once, each on batches of
    /// its own; `None` takes the store's [`EngineStore::tasks_per_run`].
    ///
    /// [`EngineStore::tasks_per_run`]: crate::store::EngineStore::tasks_per_run
    pub tasks_per_run: Option<usize>,
    /// Sends in flight at once, per run.
    pub in_flight: usize,
    /// Executions taken per slice (one pair of transactions each).
    pub slice: i64,
    /// How long a claimed run stays ours without renewal.
    pub lease: Duration,
    /// Longest wait between looks for due runs.
    pub poll: Duration,
    /// First retry delay; doubles per attempt, with jitter.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Sends per second per sender id; `None` for no limit.
    pub sender_rate: Option<NonZeroU32>,
    /// At shutdown, how long in-flight sends may take to finish and be
    /// recorded; past it the node exits and their batches' leases expire
    /// (another worker writes them off as "outcome unknown").
    pub drain_grace: Duration,
    /// Longest a provider request may take. A send that times out is
    /// written off as "outcome unknown", never resent.
    pub provider_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            max_runs: 8,
            tasks_per_run: None,
            in_flight: 256,
            slice: 1000,
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(250),
            retry_base: Duration::from_secs(5),
            retry_cap: Duration::from_secs(600),
            sender_rate: None,
            drain_grace: Duration::from_secs(30),
            provider_timeout: Duration::from_secs(10),
        }
    }
}

pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Everything a run task needs, shared by all of a node's runs.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub config: EngineConfig,
    pub providers: ProviderContext,
    pub shutdown: CancellationToken,
    /// Told after every write that appends events.
    pub hub: Hub,
    /// One limiter per sender id, shared by every run on this node.
    limiters: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
}

impl Shared {
    pub fn limiter(&self, sender: &str) -> Option<Arc<DefaultDirectRateLimiter>> {
        let rate = self.config.sender_rate?;
        let mut limiters = self.limiters.lock().expect("limiter map lock");
        Some(
            limiters
                .entry(sender.to_owned())
                .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_second(rate))))
                .clone(),
        )
    }
}

pub struct Engine {
    shared: Arc<Shared>,
    wakeup: Arc<Notify>,
    receipts: receipts::ReceiptQueue,
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        config: EngineConfig,
        public_url: String,
        wakeup: Arc<Notify>,
        hub: Hub,
        shutdown: CancellationToken,
    ) -> Self {
        let (receipts, sender) = receipts::ReceiptQueue::new(store.clone(), hub.clone());
        let providers = ProviderContext::new(sender, public_url, config.provider_timeout);
        Self {
            shared: Arc::new(Shared {
                store,
                config,
                providers,
                shutdown,
                hub,
                limiters: Mutex::new(HashMap::new()),
            }),
            wakeup,
            receipts,
        }
    }

    /// Claims and works runs until `shutdown` is cancelled; then lets every
    /// run task release its lease and returns.
    pub async fn run(self) {
        let Engine {
            shared,
            wakeup,
            receipts,
        } = self;
        let receipts = tokio::spawn(receipts.run(shared.shutdown.clone()));
        let mut runs: JoinSet<run::TaskEnd> = JoinSet::new();
        // The run each task works: this worker joins each run once.
        let mut tasks: std::collections::HashMap<tokio::task::Id, i64> = Default::default();
        let mut failed = FailedRuns::default();
        let mut task_number: u64 = 0;
        let tasks_per_run = shared
            .config
            .tasks_per_run
            .unwrap_or_else(|| shared.store.tasks_per_run())
            .max(1);
        tracing::info!(worker = %shared.config.worker_id, tasks_per_run, "engine started");
        loop {
            while let Some(done) = runs.try_join_next_with_id() {
                task_ended(done, &mut tasks, &mut failed);
            }
            if shared.shutdown.is_cancelled() {
                break;
            }
            // Tasks a run has here: a run with fewer than `tasks_per_run`
            // may be joined again (it is claimed only once it runs and has a
            // batch free), as long as the node works fewer than `max_runs`.
            let mut per_run: HashMap<i64, usize> = HashMap::new();
            for &run in tasks.values() {
                *per_run.entry(run).or_default() += 1;
            }
            if per_run.len() < shared.config.max_runs {
                let lease = shared.config.lease.as_millis() as i64;
                // Each run task leases under its own name, so when a task
                // fails (its database went away, say) the next task of this
                // node takes its expired batches over like any other
                // worker's, writing off what it had in flight, instead of
                // renewing them as its own and waiting for ever on sends
                // no one will record.
                task_number += 1;
                let owner = format!("{}/{task_number}", shared.config.worker_id);
                // Runs this node works with all their tasks, and runs it
                // holds back after their task failed, are not its to claim
                // now.
                let busy: Vec<i64> = per_run
                    .iter()
                    .filter(|&(_, &n)| n >= tasks_per_run)
                    .map(|(&run, _)| run)
                    .chain(failed.held_back(Instant::now()))
                    .collect();
                match shared.store.claim_run(&owner, now_ms(), lease, &busy).await {
                    // A task of ours already sends this run's first slice:
                    // another joins once one has been sent, so a provider
                    // that refuses everything fails one slice, not one a
                    // task. (Joining writes nothing: there is nothing to
                    // undo.)
                    Ok(Some(claimed))
                        if per_run.contains_key(&claimed.id) && claimed.counters.sent == 0 => {}
                    Ok(Some(claimed)) => {
                        metrics::counter!("herald_runs_claimed_total").increment(1);
                        let lag = (now_ms() - claimed.scheduled_at).max(0) as f64 / 1000.0;
                        if claimed
                            .claimed_at
                            .is_some_and(|at| at >= claimed.scheduled_at)
                        {
                            metrics::histogram!("herald_claim_lag_seconds").record(lag);
                        }
                        tracing::info!(
                            run = claimed.id,
                            campaign = claimed.campaign_id,
                            "run claimed"
                        );
                        // Everything the run's task logs carries its ids.
                        let span = tracing::info_span!(
                            "run",
                            run = claimed.id,
                            campaign = claimed.campaign_id
                        );
                        let task = runs
                            .spawn(tracing::Instrument::instrument(
                                run::drive(shared.clone(), claimed.clone(), owner),
                                span,
                            ))
                            .id();
                        tasks.insert(task, claimed.id);
                        continue;
                    }
                    Ok(None) => {}
                    Err(err) => tracing::warn!(error = %err, "claiming a run failed; retrying"),
                }
            }
            tokio::select! {
                () = shared.shutdown.cancelled() => break,
                () = wakeup.notified() => {}
                () = tokio::time::sleep(shared.config.poll) => {}
                Some(done) = runs.join_next_with_id(), if !runs.is_empty() => {
                    task_ended(done, &mut tasks, &mut failed);
                }
            }
        }
        while let Some(done) = runs.join_next_with_id().await {
            let (task, end) = task_end(done);
            if let (Some(run), run::TaskEnd::Failed) = (tasks.remove(&task), end) {
                metrics::counter!("herald_run_task_failures_total").increment(1);
                tracing::warn!(
                    run,
                    "run task failed while the engine stopped; its leases expire for another node"
                );
            }
        }
        let _ = receipts.await;
        tracing::info!("engine stopped");
    }
}

/// Forgets an ended run task; one that failed (or panicked) holds its run
/// back for a while.
fn task_ended(
    done: Result<(tokio::task::Id, run::TaskEnd), tokio::task::JoinError>,
    tasks: &mut HashMap<tokio::task::Id, i64>,
    failed: &mut FailedRuns,
) {
    let (task, end) = task_end(done);
    let Some(run) = tasks.remove(&task) else {
        return;
    };
    match end {
        run::TaskEnd::Done => failed.succeeded(run),
        run::TaskEnd::Failed => {
            metrics::counter!("herald_run_task_failures_total").increment(1);
            let wait = failed.failed(run, Instant::now());
            tracing::warn!(
                run,
                wait_ms = wait.as_millis() as u64,
                "run held back before this node claims it again"
            );
        }
    }
}

/// How a run task ended; a panic is a failure.
fn task_end(
    done: Result<(tokio::task::Id, run::TaskEnd), tokio::task::JoinError>,
) -> (tokio::task::Id, run::TaskEnd) {
    match done {
        Ok((task, end)) => (task, end),
        Err(err) => {
            tracing::error!(error = %err, "a run task panicked");
            (err.id(), run::TaskEnd::Failed)
        }
    }
}

/// Runs whose task failed, held back before this node claims them again.
///
/// A run whose task fails before it leases anything (a row it cannot read,
/// a statement the database refuses) is free again at once: claimed
/// straight back, it failed again hundreds of times a second (792 claims
/// in 4 s in the test that damages a run's rows), each failure a
/// transaction and an error in the log. Each failure in a row doubles the
/// wait, from [`FailedRuns::FIRST`] up to [`FailedRuns::LONGEST`]; a task
/// that ends well clears it. Other nodes keep their own count, so a run
/// may end well elsewhere: a run not failed here again within
/// [`FailedRuns::FORGOTTEN_AFTER`] of its wait ending is forgotten.
#[derive(Debug, Default)]
struct FailedRuns {
    /// Failures in a row, and when the run may be claimed again.
    runs: HashMap<i64, (u32, Instant)>,
}

impl FailedRuns {
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(60);
    const FORGOTTEN_AFTER: Duration = Duration::from_secs(600);

    /// Counts a failure; how long the run is held back.
    fn failed(&mut self, run: i64, now: Instant) -> Duration {
        let entry = self.runs.entry(run).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        let wait = Self::FIRST
            .saturating_mul(1 << (entry.0 - 1).min(16))
            .min(Self::LONGEST);
        entry.1 = now + wait;
        wait
    }

    fn succeeded(&mut self, run: i64) {
        self.runs.remove(&run);
    }

    /// Runs still held back at `now`. Forgets those whose wait ended
    /// [`Self::FORGOTTEN_AFTER`] ago.
    fn held_back(&mut self, now: Instant) -> impl Iterator<Item = i64> + '_ {
        self.runs
            .retain(|_, (_, until)| now.saturating_duration_since(*until) < Self::FORGOTTEN_AFTER);
        self.runs
            .iter()
            .filter(move |(_, (_, until))| *until > now)
            .map(|(run, _)| *run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_in_a_row_doubles_the_wait_up_to_a_minute() {
        let mut failed = FailedRuns::default();
        let now = Instant::now();
        let waits: Vec<u64> = (0..9).map(|_| failed.failed(7, now).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        for _ in 0..100 {
            failed.failed(7, now);
        }
        assert_eq!(failed.failed(7, now), FailedRuns::LONGEST);
    }

    #[test]
    fn a_run_is_held_back_until_its_wait_is_over_and_cleared_by_a_good_end() {
        let mut failed = FailedRuns::default();
        let now = Instant::now();
        failed.failed(1, now);
        failed.failed(2, now);
        failed.failed(2, now);
        let held = |failed: &mut FailedRuns, at| {
            let mut runs: Vec<i64> = failed.held_back(at).collect();
            runs.sort();
            runs
        };
        assert_eq!(held(&mut failed, now), vec![1, 2]);
        assert_eq!(
            held(&mut failed, now + Duration::from_millis(1500)),
            vec![2]
        );
        assert!(held(&mut failed, now + Duration::from_secs(2)).is_empty());
        // Past its wait, a run still counts its failures: the next doubles.
        assert_eq!(failed.failed(2, now), Duration::from_secs(4));
        failed.succeeded(2);
        assert_eq!(failed.failed(2, now), FailedRuns::FIRST);
    }

    #[test]
    fn a_run_that_stops_failing_here_is_forgotten_once_its_wait_is_long_over() {
        // Another node may finish the run: this node never sees it end well.
        let mut failed = FailedRuns::default();
        let now = Instant::now();
        failed.failed(1, now);
        failed.failed(1, now);
        failed.failed(2, now + Duration::from_secs(300));
        let later = now + Duration::from_secs(2) + FailedRuns::FORGOTTEN_AFTER;
        assert_eq!(failed.held_back(later).count(), 0);
        assert_eq!(failed.runs.len(), 1, "run 1 forgotten, run 2 still counted");
        // Failing again, run 1 starts from the first wait.
        assert_eq!(failed.failed(1, later), FailedRuns::FIRST);
        assert_eq!(failed.failed(2, later), Duration::from_secs(2));
    }
}
