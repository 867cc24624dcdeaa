//! One run, from claim to its end. See the module docs of `engine`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::Shared;
use crate::domain::breaker::Breaker;
use crate::domain::run::retry_delay;
use crate::domain::sms::sms_parts;
use crate::domain::{CampaignStatus, Channel, ExecutionStatus, SendResult, Template};
use crate::providers::{self, OutboundMessage, Provider};
use crate::store::{
    now_ms, Control, ExecutionOutcome, PendingExecution, PriceRecipient, RecipientRow, RunEnd,
    RunRecord, RunSnapshot, Slice, StoreError, Variables,
};

/// Provider faults in a row (5xx, 429, timeouts) that pause a run's sends.
const BREAKER_FAULTS: u32 = 20;
/// The first pause; it doubles while probes keep failing.
const BREAKER_FIRST_PAUSE: Duration = Duration::from_secs(1);
const BREAKER_LONGEST_PAUSE: Duration = Duration::from_secs(30);
/// A provider's `Retry-After` is obeyed up to this, so a bogus value cannot
/// park a recipient for days.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How a run task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskEnd {
    /// The run ended, or nothing of it was left for this worker.
    Done,
    /// An error stopped it; the run is retried later.
    Failed,
}

/// Works a run until it ends or nothing of it is left for this worker.
/// `owner` names this task in leases (`{worker id}/{task number}`).
pub(super) async fn drive(shared: Arc<Shared>, run: RunRecord, owner: String) -> TaskEnd {
    let run_id = run.id;
    match drive_inner(&shared, run, &owner).await {
        Ok(()) => TaskEnd::Done,
        Err(err) => {
            // Its leases expire and a worker (maybe this one) retries.
            tracing::error!(run = run_id, error = %err, "run task failed; it will be retried");
            TaskEnd::Failed
        }
    }
}

/// The value a template variable takes for a recipient, as sent and as
/// priced.
fn lookup<'a>(recipient: &'a RecipientRow<'a>, variable: &str) -> Option<&'a str> {
    crate::domain::contact::variable_value(
        recipient.phone,
        recipient.name,
        |v| recipient.variables.get(v),
        variable,
    )
}

/// Credits one delivered message costs.
fn cost_of(channel: Channel, body: &str) -> i64 {
    match channel {
        Channel::Sms => i64::from(sms_parts(body)),
        _ => 1,
    }
}

async fn drive_inner(shared: &Shared, run: RunRecord, owner: &str) -> anyhow::Result<()> {
    let store = &shared.store;
    let campaign = store
        .campaign_of_run(run.id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("run {} has no campaign", run.id))?;
    let notify = || shared.hub.notify(campaign.id, campaign.workspace_id);
    // Claiming may have written off a dead worker's sends.
    notify();
    if campaign.status == CampaignStatus::Cancelled {
        store
            .finish_run(run.id, &RunEnd::Cancelled, now_ms())
            .await?;
        notify();
        return Ok(());
    }

    let run = if run.frozen_at.is_none() {
        let snapshot = RunSnapshot {
            channel: campaign.channel,
            provider: campaign.provider.clone(),
            sender: campaign.sender.clone(),
            template: campaign.template.clone().unwrap_or_default(),
            max_attempts: campaign.max_attempts,
        };
        store.freeze_run(run.id, &snapshot).await?
    } else {
        run
    };
    let snapshot = run
        .snapshot
        .clone()
        .ok_or_else(|| anyhow::anyhow!("run {} was frozen without a snapshot", run.id))?;
    let template = match Template::parse(&snapshot.template) {
        Ok(t) => t,
        Err(err) => {
            let reason = format!("the frozen template is not usable: {err}");
            store
                .finish_run(run.id, &RunEnd::Failed(reason), now_ms())
                .await?;
            notify();
            return Ok(());
        }
    };

    if run.status == crate::domain::RunStatus::Claimed {
        let pricing = std::time::Instant::now();
        let cost = price(shared, &run, &snapshot, &template).await?;
        tracing::debug!(
            run = run.id,
            cost,
            elapsed_ms = pricing.elapsed().as_millis() as u64,
            "run priced"
        );
        let started = store.start_run(run.id, cost, now_ms()).await?;
        notify();
        if started.run.status.is_terminal() {
            tracing::warn!(run = run.id, error = ?started.run.error, "run could not start");
            return Ok(());
        }
    }

    let provider = providers::build(&snapshot.provider, snapshot.channel, &shared.providers);
    let sending = Sending {
        shared,
        run_uuid: run.uuid.clone(),
        campaign_id: run.campaign_id,
        snapshot: &snapshot,
        template: &template,
        provider,
    };
    let mut breaker = Breaker::new(BREAKER_FAULTS, BREAKER_FIRST_PAUSE, BREAKER_LONGEST_PAUSE);
    let mut pipeline = Pipeline {
        shared,
        owner,
        limit: shared.config.slice,
        run_id: run.id,
        campaign: (campaign.id, campaign.workspace_id),
        unrecorded: None,
        claimed: None,
    };
    loop {
        if shared.shutdown.is_cancelled() {
            pipeline.wind_down().await?;
            store.release_run(run.id, owner).await?;
            tracing::info!(run = run.id, "run released for shutdown");
            return Ok(());
        }
        let slice = pipeline.next_slice().await?;
        match slice.control {
            Control::Paused => {
                store.release_run(run.id, owner).await?;
                tracing::info!(run = run.id, "campaign paused; run released");
                return Ok(());
            }
            Control::Cancelled => {
                store
                    .finish_run(run.id, &RunEnd::Cancelled, now_ms())
                    .await?;
                notify();
                tracing::info!(run = run.id, "run cancelled");
                return Ok(());
            }
            Control::Continue => {}
        }
        if slice.executions.is_empty() {
            let c = slice.counters;
            if c.pending == 0 && c.processing == 0 {
                let end = if c.sent == 0 && c.failed > 0 {
                    RunEnd::Failed(format!("every one of {} sends failed", c.failed))
                } else {
                    RunEnd::Completed
                };
                let done = store.finish_run(run.id, &end, now_ms()).await?;
                metrics::counter!("herald_runs_finished_total", "status" => done.run.status.as_str())
                    .increment(1);
                notify();
                tracing::info!(
                    run = run.id,
                    status = done.run.status.as_str(),
                    sent = c.sent,
                    failed = c.failed,
                    "run finished"
                );
                return Ok(());
            }
            // Nothing of the run is ours or free: other workers hold the
            // rest. Should one die, its batches come free and are claimed.
            let Some(next_retry_at) = slice.next_retry_at else {
                tracing::info!(
                    run = run.id,
                    "no batch left to take; other workers finish the run"
                );
                return Ok(());
            };
            // Only retries are left in our batches, and none is due yet.
            let wait = (next_retry_at - now_ms()).clamp(10, 1000);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                () = shared.shutdown.cancelled() => {}
            }
            continue;
        }

        // The batches a slice spans name its sends in logs.
        let first_batch = slice.executions.first().map_or(0, |e| e.batch_sequence);
        let last_batch = slice.executions.last().map_or(0, |e| e.batch_sequence);
        let span = tracing::info_span!(
            "slice",
            batches = %format!("{first_batch}..={last_batch}"),
            size = slice.executions.len()
        );
        // Send this slice while the writer records the previous one's
        // outcomes and claims the next: the database and the provider work
        // at the same time instead of taking turns.
        let t0 = std::time::Instant::now();
        let sends = tracing::Instrument::instrument(
            async {
                // The write is a task spawned from this worker, so it waits
                // in the worker's LIFO slot, which other workers do not
                // take from, until this task yields; sends to a fast
                // provider yield only when the slice is sent. Yielding
                // first lets the write start beside them.
                tokio::task::yield_now().await;
                futures::stream::iter(slice.executions)
                    .map(|execution| sending.send(execution))
                    .buffer_unordered(shared.config.in_flight)
                    .collect::<Vec<_>>()
                    .await
            },
            span.clone(),
        );
        let (results, claimed_ahead) = tokio::join!(sends, pipeline.record_and_claim());
        let claimed_ahead = Some(claimed_ahead?);
        let misconfigured = results.iter().find_map(|sent| sent.misconfigured.clone());
        for sent in &results {
            breaker.record(sent.provider_fault);
        }
        let outcomes: Vec<ExecutionOutcome> =
            results.into_iter().map(|sent| sent.outcome).collect();
        span.in_scope(|| tracing::debug!(elapsed = ?t0.elapsed(), "slice sent"));
        pipeline.unrecorded = Some(outcomes);
        pipeline.claimed = claimed_ahead;
        if breaker.is_open() && misconfigured.is_none() {
            // The provider is down: stop before every recipient's attempts
            // go into the outage. What was claimed ahead goes back unsent;
            // after the cool-down one send probes whether it is back.
            pipeline.wind_down().await?;
            let pause = breaker.trip();
            metrics::counter!("herald_provider_circuit_opened_total",
                "provider" => snapshot.provider.kind())
            .increment(1);
            tracing::warn!(
                run = run.id,
                pause = ?pause,
                "the provider keeps failing; sending paused, then one send probes it"
            );
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shared.shutdown.cancelled() => {}
            }
            pipeline.limit = 1;
            continue;
        }
        pipeline.limit = shared.config.slice;
        if let Some(reason) = misconfigured {
            pipeline.wind_down().await?;
            tracing::error!(run = run.id, %reason, "provider refuses every send; failing the run");
            store
                .finish_run(
                    run.id,
                    &RunEnd::Failed(format!("provider misconfigured: {reason}")),
                    now_ms(),
                )
                .await?;
            notify();
            return Ok(());
        }
    }
}

/// The writes around the slice being sent: the outcomes of the slice sent
/// before it, not yet recorded, and the slice claimed after it, not yet
/// sent. Each slice's write records the one and claims the other in one
/// transaction, while the slice between them is on the wire.
struct Pipeline<'a> {
    shared: &'a Shared,
    /// The task's name in leases.
    owner: &'a str,
    run_id: i64,
    /// Campaign and workspace, for the hub.
    campaign: (i64, i64),
    /// Executions per claim: the configured slice, or 1 while a tripped
    /// circuit breaker probes the provider.
    limit: i64,
    unrecorded: Option<Vec<ExecutionOutcome>>,
    claimed: Option<Slice>,
}

impl Pipeline<'_> {
    /// The slice to send next: the one claimed ahead when it has work, or
    /// else a fresh claim made after recording what is unrecorded, so an
    /// empty slice's counters (run done? only retries left?) are current.
    async fn next_slice(&mut self) -> Result<Slice, StoreError> {
        if let Some(slice) = self.claimed.take() {
            if !slice.executions.is_empty() {
                return Ok(slice);
            }
        }
        self.record_and_claim().await
    }

    /// Records the unrecorded outcomes and claims a slice, in one
    /// transaction.
    ///
    /// The transaction runs in a task of its own. It is a dozen statements,
    /// each a round trip to the database; polled in the run's task beside
    /// the sends, each round trip waited until the sends yielded, and sends
    /// to a fast provider yield only when the whole slice is sent.
    async fn record_and_claim(&mut self) -> Result<Slice, StoreError> {
        let (shared, run_id, limit) = (self.shared, self.run_id, self.limit);
        let store = Arc::clone(&shared.store);
        let owner = self.owner.to_owned();
        let now = now_ms();
        let lease_until = now + shared.config.lease.as_millis() as i64;
        let unrecorded = self.unrecorded.take();
        let hub = shared.hub.clone();
        let (campaign, workspace) = self.campaign;
        let write = tokio::spawn(async move {
            let written = match unrecorded {
                Some(outcomes) => retry_transient(|| {
                    store.record_and_take(run_id, &outcomes, &owner, now, lease_until, limit)
                })
                .await
                .map(|(update, mut slice)| {
                    let mut events = update.events;
                    events.append(&mut slice.events);
                    (events, slice)
                }),
                None => {
                    retry_transient(|| store.take_slice(run_id, &owner, now, lease_until, limit))
                        .await
                        .map(|mut slice| (std::mem::take(&mut slice.events), slice))
                }
            };
            // Recording moved counters and appended progress; opening a
            // batch appended its event. The hub hears of them here, as the
            // commit returns, rather than once the run's task is next polled.
            match written {
                Ok((events, slice)) => {
                    hub.publish(campaign, workspace, events);
                    Ok(slice)
                }
                Err(error) => {
                    hub.notify(campaign, workspace);
                    Err(error)
                }
            }
        });
        let slice = match write.await {
            Ok(slice) => slice?,
            Err(join) => match join.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only a runtime shutting down cancels a task.
                Err(_) => {
                    return Err(StoreError::Unavailable(
                        "the runtime is shutting down".into(),
                    ))
                }
            },
        };
        Ok(slice)
    }

    /// Records what was sent and returns what was claimed but not sent to
    /// pending, before the run is let go or ended.
    async fn wind_down(&mut self) -> Result<(), StoreError> {
        let store = &self.shared.store;
        if let Some(outcomes) = self.unrecorded.take() {
            retry_transient(|| store.record_outcomes(self.run_id, &outcomes, now_ms())).await?;
        }
        if let Some(slice) = self.claimed.take() {
            let ids: Vec<i64> = slice.executions.iter().map(|e| e.id).collect();
            if !ids.is_empty() {
                retry_transient(|| store.unclaim(self.run_id, &ids, now_ms())).await?;
            }
        }
        self.notify();
        Ok(())
    }

    fn notify(&self) {
        let (campaign, workspace) = self.campaign;
        self.shared.hub.notify(campaign, workspace);
    }
}

/// Retries a store call that failed transiently (a lost deadlock race on
/// Postgres, a busy database): its transaction rolled back, so trying again
/// is safe, and giving up would strand the slice's outcomes until the
/// batch leases expire.
async fn retry_transient<T, F, Fut>(mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(20);
    for _ in 0..5 {
        match call().await {
            Err(err) if err.is_transient() => {
                tracing::warn!(error = %err, "transient database error; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            done => return done,
        }
    }
    call().await
}

/// Prices a frozen run: SMS parts for SMS, one unit per call otherwise.
async fn price(
    shared: &Shared,
    run: &RunRecord,
    snapshot: &RunSnapshot,
    template: &Template,
) -> anyhow::Result<i64> {
    if snapshot.channel != Channel::Sms {
        return Ok(run.counters.total);
    }
    // Without variables every recipient gets the same text.
    if template.variables().is_empty() {
        let body = template.render(|_| None).unwrap_or_default();
        return Ok(run.counters.total * cost_of(Channel::Sms, &body));
    }
    let template = template.clone();
    let price: PriceRecipient = Arc::new(move |recipient: &RecipientRow<'_>| {
        // One body per reader thread, reused: no allocation per recipient.
        thread_local!(static BODY: std::cell::RefCell<String> = const {
            std::cell::RefCell::new(String::new())
        });
        BODY.with_borrow_mut(|body| {
            body.clear();
            // A recipient missing a variable is not sent, and costs nothing
            // more than an empty message would.
            if template
                .render_into(body, |v| lookup(recipient, v))
                .is_err()
            {
                body.clear();
            }
            cost_of(Channel::Sms, body)
        })
    });
    Ok(shared.store.price_executions(run.id, price).await?)
}

/// What one send produced, and what it says about the provider.
struct Sent {
    outcome: ExecutionOutcome,
    /// The provider refuses every send (bad credentials, no such endpoint).
    misconfigured: Option<String>,
    /// A failure on the provider's side, for the circuit breaker.
    provider_fault: bool,
}

impl Sent {
    fn of(outcome: ExecutionOutcome) -> Self {
        Self {
            outcome,
            misconfigured: None,
            provider_fault: false,
        }
    }
}

struct Sending<'a> {
    shared: &'a Shared,
    run_uuid: String,
    campaign_id: i64,
    snapshot: &'a RunSnapshot,
    template: &'a Template,
    provider: Arc<dyn Provider>,
}

impl Sending<'_> {
    /// Sends one execution and classifies the result.
    async fn send(&self, execution: PendingExecution) -> Sent {
        let sent = self.send_once(execution).await;
        let outcome = &sent.outcome;
        let result = if outcome.status == ExecutionStatus::Pending {
            metrics::counter!("herald_retries_total", "provider" => self.snapshot.provider.kind())
                .increment(1);
            "retry"
        } else {
            outcome.status.as_str()
        };
        metrics::counter!("herald_sends_total",
            "channel" => self.snapshot.channel.as_str(),
            "provider" => self.snapshot.provider.kind(),
            "outcome" => result)
        .increment(1);
        sent
    }

    async fn send_once(&self, execution: PendingExecution) -> Sent {
        let mut outcome = ExecutionOutcome {
            id: execution.id,
            batch_sequence: execution.batch_sequence,
            attempt: execution.attempt,
            status: ExecutionStatus::Failed,
            message_status: None,
            provider_id: None,
            duration_seconds: None,
            error_details: None,
            retry_reason: None,
            next_attempt_at: None,
            charged_units: 0,
        };
        let recipient = match Variables::parse(&execution.variables) {
            Ok(variables) => RecipientRow {
                phone: &execution.phone,
                name: execution.name.as_deref(),
                variables,
            },
            Err(corrupt) => {
                outcome.error_details = Some(corrupt.to_string());
                return Sent::of(outcome);
            }
        };
        let body = match self.template.render(|v| lookup(&recipient, v)) {
            Ok(body) => body,
            Err(missing) => {
                outcome.error_details = Some(missing.to_string());
                return Sent::of(outcome);
            }
        };
        if let Some(limiter) = self
            .snapshot
            .sender
            .as_deref()
            .and_then(|s| self.shared.limiter(s))
        {
            limiter.until_ready().await;
        }
        let message = OutboundMessage {
            id: format!("{}:{}:{}", self.run_uuid, execution.id, execution.attempt),
            channel: self.snapshot.channel,
            to: execution.phone.clone(),
            from: self.snapshot.sender.clone(),
            body,
            campaign_id: self.campaign_id,
            run_id: self.run_uuid.clone(),
            execution_id: execution.id,
            attempt: execution.attempt,
        };
        let sent_at = std::time::Instant::now();
        let result = self.provider.send(&message).await;
        let provider = self.snapshot.provider.kind();
        metrics::histogram!("herald_provider_latency_seconds", "provider" => provider)
            .record(sent_at.elapsed().as_secs_f64());
        match result {
            SendResult::Delivered {
                status,
                provider_id,
                duration_seconds,
            } => {
                outcome.status = status;
                outcome.provider_id = provider_id;
                outcome.duration_seconds = duration_seconds;
                outcome.charged_units = cost_of(self.snapshot.channel, &message.body);
                if self.snapshot.channel == Channel::Sms {
                    outcome.message_status = Some("sent");
                }
                Sent::of(outcome)
            }
            SendResult::Retriable {
                status,
                provider_id,
                reason,
            } => {
                outcome.provider_id = provider_id;
                self.retry_later(&mut outcome, &execution, status, reason, Duration::ZERO);
                // A busy line is the recipient's answer; a retriable
                // failure is the provider's (5xx, 429, no connection).
                Sent {
                    outcome,
                    misconfigured: None,
                    provider_fault: status == ExecutionStatus::Failed,
                }
            }
            SendResult::RetryAfter { wait, reason } => {
                let wait = wait.min(LONGEST_RETRY_AFTER);
                self.retry_later(
                    &mut outcome,
                    &execution,
                    ExecutionStatus::Failed,
                    reason,
                    wait,
                );
                Sent {
                    outcome,
                    misconfigured: None,
                    provider_fault: true,
                }
            }
            SendResult::Permanent {
                provider_id,
                reason,
            } => {
                outcome.provider_id = provider_id;
                outcome.error_details = Some(reason);
                Sent::of(outcome)
            }
            SendResult::Unknown { reason } => {
                outcome.error_details = Some(format!(
                    "outcome unknown: {reason}; not resent so no recipient is contacted twice"
                ));
                Sent {
                    outcome,
                    misconfigured: None,
                    provider_fault: true,
                }
            }
            SendResult::Misconfigured { reason } => {
                outcome.error_details = Some(reason.clone());
                Sent {
                    outcome,
                    misconfigured: Some(reason),
                    provider_fault: false,
                }
            }
        }
    }
}

impl Sending<'_> {
    /// Schedules another attempt, after the backoff and no sooner than
    /// `at_least`, or gives up with `final_status` after `max_attempts`.
    fn retry_later(
        &self,
        outcome: &mut ExecutionOutcome,
        execution: &PendingExecution,
        final_status: ExecutionStatus,
        reason: String,
        at_least: Duration,
    ) {
        let max_attempts = i64::from(self.snapshot.max_attempts);
        outcome.error_details = Some(reason.clone());
        if execution.attempt < max_attempts {
            let delay = retry_delay(
                self.shared.config.retry_base,
                execution.attempt as u32,
                self.shared.config.retry_cap,
                rand::random::<f64>(),
            )
            .max(at_least);
            outcome.status = ExecutionStatus::Pending;
            outcome.next_attempt_at = Some(now_ms() + delay.as_millis() as i64);
            outcome.retry_reason = Some(format!(
                "{reason}; will retry in {} (attempt {} of {max_attempts})",
                human(delay),
                execution.attempt + 1
            ));
        } else {
            outcome.status = final_status;
            outcome.retry_reason =
                (max_attempts > 1).then(|| format!("gave up after {max_attempts} attempts"));
        }
    }
}

fn human(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs >= 120.0 {
        format!("{:.0} minutes", secs / 60.0)
    } else if secs >= 1.0 {
        format!("{secs:.0} seconds")
    } else {
        format!("{} ms", d.as_millis())
    }
}
