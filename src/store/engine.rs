//! Records and traits for the engine's side of the store: runs, batches,
//! executions, receipts, credits, events, and the reads behind the seed
//! surfaces.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Campaign, CampaignRef, StoreResult, Workspace};
use crate::domain::{Channel, ExecutionStatus, ProviderSettings, Recipients, RunStatus};

/// What a run sends, frozen when a worker claims it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSnapshot {
    pub channel: Channel,
    pub provider: ProviderSettings,
    pub sender: Option<String>,
    pub template: String,
    pub max_attempts: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub total: i64,
    pub pending: i64,
    pub processing: i64,
    pub sent: i64,
    pub failed: i64,
    pub skipped: i64,
    pub delivered: i64,
    pub failed_delivery: i64,
}

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: i64,
    pub uuid: String,
    pub campaign_id: i64,
    pub status: RunStatus,
    pub recipients: Recipients,
    pub scheduled_at: i64,
    pub lease_owner: Option<String>,
    pub claimed_at: Option<i64>,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub snapshot: Option<RunSnapshot>,
    pub frozen_at: Option<i64>,
    pub counters: Counters,
    pub total_batches: i64,
    pub completed_batches: i64,
    pub cost_units: i64,
    pub reserved_credits: i64,
    pub charged_credits: i64,
    pub refunded_credits: i64,
    pub first_sent_at: Option<i64>,
    pub last_sent_at: Option<i64>,
    pub error: Option<String>,
    pub updated_at: i64,
}

#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub run_id: i64,
    pub batch_sequence: i64,
    pub status: String,
    pub recipient_count: i64,
    pub counters: Counters,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub error_detail: Option<serde_json::Value>,
}

/// A frozen recipient, borrowed from its row: what its message is
/// rendered from, to price it or to send it.
pub struct RecipientRow<'a> {
    pub phone: &'a str,
    pub name: Option<&'a str>,
    pub variables: super::Variables<'a>,
}

/// What one recipient's message costs, in credits; called from the
/// readers' threads.
pub type PriceRecipient = std::sync::Arc<dyn Fn(&RecipientRow<'_>) -> i64 + Send + Sync>;

/// An execution handed to a worker to send.
#[derive(Debug, Clone)]
pub struct PendingExecution {
    pub id: i64,
    pub batch_sequence: i64,
    pub phone: String,
    pub name: Option<String>,
    /// The template variables as stored, a JSON object of strings, read
    /// when the message is rendered ([`super::Variables::parse`]): parsed
    /// into a map as the slice was read, they took the writer's time.
    pub variables: String,
    /// The attempt this send is (1 for the first).
    pub attempt: i64,
}

/// What a worker learned from one send.
#[derive(Debug, Clone, Serialize)]
pub struct ExecutionOutcome {
    pub id: i64,
    pub batch_sequence: i64,
    /// The attempt this send was (1 for the first): a later attempt's
    /// provider id replaces an earlier one's.
    pub attempt: i64,
    /// `Pending` means "retry at `next_attempt_at`".
    pub status: ExecutionStatus,
    pub message_status: Option<&'static str>,
    pub provider_id: Option<String>,
    pub duration_seconds: Option<i64>,
    pub error_details: Option<String>,
    pub retry_reason: Option<String>,
    pub next_attempt_at: Option<i64>,
    /// Credits this send costs (0 unless it reached the recipient).
    pub charged_units: i64,
}

/// Whether a run's worker should keep sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// The campaign is paused: stop sending and let the run go.
    Paused,
    /// The campaign was cancelled: finalise the run as cancelled.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Slice {
    pub control: Control,
    pub executions: Vec<PendingExecution>,
    /// Earliest retry still waiting in this worker's batches, when nothing
    /// is due now. `None` with no executions: this worker holds no work of
    /// the run and none is free to take (other workers are finishing it).
    pub next_retry_at: Option<i64>,
    pub counters: Counters,
    /// Events the claim appended (a batch opened or written off), to
    /// publish after commit.
    pub events: Vec<StoredEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    Completed,
    Failed(String),
    Cancelled,
}

/// A delivery receipt from a provider.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub provider_id: String,
    pub delivered: bool,
    pub error: Option<String>,
}

/// An entry of a campaign's event log.
#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    pub campaign_id: i64,
    pub seq: i64,
    pub kind: String,
    pub data: serde_json::Value,
    pub created_at: i64,
}

/// The outcome of a write that changed a run: its new state, and the
/// events it appended (to publish after commit).
#[derive(Debug, Clone)]
pub struct RunUpdate {
    pub run: RunRecord,
    pub events: Vec<StoredEvent>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LedgerEntry {
    pub id: i64,
    pub run_id: Option<i64>,
    pub kind: String,
    pub amount: i64,
    pub balance_after: i64,
    pub note: Option<String>,
    pub created_at: i64,
}

/// One execution as the seed-001 list shows it.
#[derive(Debug, Clone)]
pub struct ExecutionRecord {
    pub id: i64,
    pub run_id: i64,
    pub batch_sequence: i64,
    pub contact_id: i64,
    pub phone: String,
    pub name: Option<String>,
    pub variables: BTreeMap<String, String>,
    pub status: ExecutionStatus,
    pub message_status: Option<String>,
    pub attempts: i64,
    pub provider_message_id: Option<String>,
    pub duration_seconds: Option<i64>,
    pub error_details: Option<String>,
    pub retry_reason: Option<String>,
    pub executed_at: Option<i64>,
    pub delivered_at: Option<i64>,
}

/// Totals across all of a campaign's runs (seed 002 analytics).
#[derive(Debug, Clone, Default)]
pub struct CampaignTotals {
    pub runs: i64,
    pub counters: Counters,
    pub first_sent_at: Option<i64>,
    pub last_sent_at: Option<i64>,
    /// Recipients on cancelled runs.
    pub cancelled: i64,
    /// The newest run that ended (completed, failed or cancelled): its
    /// uuid and when it ended.
    pub last_ended_run: Option<String>,
    pub last_ended_at: Option<i64>,
}

/// What a status poll shows of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub uuid: String,
    pub status: RunStatus,
    pub counters: Counters,
    pub total_batches: i64,
    pub completed_batches: i64,
    pub updated_at: i64,
}

/// Sends per minute, for `metrics_history` and charts.
#[derive(Debug, Clone, Copy)]
pub struct MinuteBucket {
    pub minute: i64,
    pub completed: i64,
    pub failed: i64,
}

/// A page of executions as [`ReportStore::execution_page`] reads it.
#[derive(Debug, Clone)]
pub struct ExecutionPageRead {
    /// The campaign's workspace, for the caller's access check.
    pub workspace_id: i64,
    pub executions: super::ExecutionRows,
    /// Executions that match the filter, on every page.
    pub total: i64,
    /// The frozen settings of each run the page's executions are of.
    pub snapshots: std::collections::HashMap<i64, Option<RunSnapshot>>,
}

/// What a caller makes of an [`ExecutionPageRead`] (see
/// [`ReportStore::execution_page`]).
pub type RenderPage = Box<dyn FnOnce(ExecutionPageRead) -> StoreResult<RenderedPage> + Send>;

/// A page of executions as its caller rendered it.
#[derive(Debug, Clone)]
pub struct RenderedPage {
    /// The campaign's workspace, for the caller's access check.
    pub workspace_id: i64,
    pub body: Vec<u8>,
}

/// Filters for listing executions.
#[derive(Debug, Clone, Default)]
pub struct ExecutionQuery {
    pub status: Option<ExecutionStatus>,
    pub run_id: Option<i64>,
    /// Keyset: only executions with an id below this one.
    pub before_id: Option<i64>,
    pub offset: i64,
    pub limit: i64,
}

impl ExecutionQuery {
    /// Rows at most for a page read on the request's own worker (see
    /// [`ExecutionQuery::reads_one_short_range`]).
    pub const SHORT_PAGE: i64 = 100;

    /// Whether the page is one index range of at most [`Self::SHORT_PAGE`]
    /// rows (no filter: an offset goes by ordinal, a cursor by id), so that
    /// reading it takes about a tenth of a millisecond whatever its depth.
    /// A filtered page may scan or count far more rows than it returns.
    pub fn reads_one_short_range(&self) -> bool {
        self.is_unfiltered() && self.limit <= Self::SHORT_PAGE
    }

    /// No status or run filter: the campaign's executions in id order, so
    /// any page of them is one range of an index.
    pub fn is_unfiltered(&self) -> bool {
        self.status.is_none() && self.run_id.is_none()
    }
}

#[async_trait]
pub trait EngineStore: Send + Sync {
    /// Finds a run for `worker` to work on, other than the `busy` ones it
    /// already works: a scheduled run that is due (or one claimed by a
    /// worker whose lease expired), which it leases to freeze and start; or
    /// a running run with a batch free to take (never leased, or its lease
    /// expired), or one left to finalise. Several workers share a running
    /// run: each leases batches in [`EngineStore::take_slice`].
    async fn claim_run(
        &self,
        worker: &str,
        now: i64,
        lease_ms: i64,
        busy: &[i64],
    ) -> StoreResult<Option<RunRecord>>;
    /// How many tasks of one node work a run at once unless configured:
    /// as many as the database lets write at the same time.
    fn tasks_per_run(&self) -> usize;
    /// Earliest time a scheduled run becomes due, if any.
    async fn next_due_at(&self) -> StoreResult<Option<i64>>;
    /// Freezes the snapshot and creates executions and batches (idempotent).
    async fn freeze_run(&self, run_id: i64, snapshot: &RunSnapshot) -> StoreResult<RunRecord>;
    /// Sums `price` over every frozen execution of a run, to price it
    /// before it starts. The run's id range is read in parts, one a core on
    /// the readers, and each recipient is priced where its row is read:
    /// memory is bounded by a part, not the run.
    async fn price_executions(&self, run_id: i64, price: PriceRecipient) -> StoreResult<i64>;
    /// Reserves `cost_units` credits and marks the run running; when the
    /// workspace cannot cover it, fails the run with the reason.
    async fn start_run(&self, run_id: i64, cost_units: i64, now: i64) -> StoreResult<RunUpdate>;
    /// Lets go of a run and the batches `worker` leased (on pause or
    /// shutdown) so any worker may take them.
    async fn release_run(&self, run_id: i64, worker: &str) -> StoreResult<()>;
    /// Renews `worker`'s batch leases, leases free batches when it holds
    /// fewer than `limit` pending recipients (taking over an expired lease
    /// writes off the sends that were in flight: outcome unknown, never
    /// resent), and marks up to `limit` due executions of its batches in
    /// progress.
    async fn take_slice(
        &self,
        run_id: i64,
        worker: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> StoreResult<Slice>;
    /// Records send outcomes, counters, batch completion, metrics and an event.
    async fn record_outcomes(
        &self,
        run_id: i64,
        outcomes: &[ExecutionOutcome],
        now: i64,
    ) -> StoreResult<RunUpdate>;
    /// Puts executions this worker took but never sent back to pending (the
    /// slice claimed ahead when the run stops: shutdown, a misconfigured
    /// provider), so they are sent later rather than written off as
    /// "outcome unknown".
    async fn unclaim(&self, run_id: i64, execution_ids: &[i64], now: i64) -> StoreResult<()>;
    /// `record_outcomes` then `take_slice`, in one transaction: the hot loop's
    /// only write per slice.
    #[allow(clippy::too_many_arguments)]
    async fn record_and_take(
        &self,
        run_id: i64,
        outcomes: &[ExecutionOutcome],
        worker: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> StoreResult<(RunUpdate, Slice)>;
    /// Ends a run: unsent executions become skipped, credits are refunded,
    /// the campaign takes the matching status.
    async fn finish_run(&self, run_id: i64, end: &RunEnd, now: i64) -> StoreResult<RunUpdate>;
    /// Applies delivery receipts; unknown ids are counted, not errors.
    async fn record_receipts(&self, receipts: &[Receipt], now: i64) -> StoreResult<ReceiptReport>;

    /// Adds (or, negative, removes) credits; the first top-up turns credit
    /// accounting on for the workspace.
    async fn add_credits(
        &self,
        workspace_id: i64,
        amount: i64,
        note: Option<&str>,
    ) -> StoreResult<Workspace>;
    async fn credit_ledger(&self, workspace_id: i64, limit: i64) -> StoreResult<Vec<LedgerEntry>>;

    /// Appends events a producer posted for a campaign Herald does not run
    /// itself, moving a draft to `running` on the first one and to `to` when
    /// `finish` says the work ended. Returns the stored events.
    async fn append_external_events(
        &self,
        campaign_id: i64,
        events: &[(String, serde_json::Value)],
        finish: Option<crate::domain::CampaignStatus>,
    ) -> StoreResult<Vec<StoredEvent>>;
}

#[derive(Debug, Clone, Default)]
pub struct ReceiptReport {
    pub applied: u64,
    pub unknown: u64,
    pub duplicate: u64,
    /// Provider ids of receipts that settled no message and name none
    /// already settled: the send is not recorded (yet: a receipt can
    /// overtake the write that records its send), so they may be retried.
    pub unknown_ids: Vec<String>,
    /// `(campaign id, workspace id, the progress event appended)` of every
    /// campaign whose counters moved.
    pub campaigns: Vec<(i64, i64, StoredEvent)>,
}

#[async_trait]
pub trait ReportStore: Send + Sync {
    async fn run(&self, run_id: i64) -> StoreResult<Option<RunRecord>>;
    async fn run_by_uuid(&self, uuid: &str) -> StoreResult<Option<RunRecord>>;
    async fn latest_run(&self, campaign_id: i64) -> StoreResult<Option<RunRecord>>;
    async fn runs_of(&self, campaign_id: i64) -> StoreResult<Vec<RunRecord>>;
    async fn batches(&self, run_id: i64) -> StoreResult<Vec<BatchRecord>>;
    async fn executions(
        &self,
        campaign_id: i64,
        query: &ExecutionQuery,
    ) -> StoreResult<Vec<ExecutionRecord>>;
    /// A page of a campaign's executions with what a page shows beside
    /// them, read together; `None` when there is no such campaign.
    ///
    /// `render` makes the caller's answer of it (a response body) on the
    /// thread that read it: the page's rows are then allocated, used and
    /// freed on one thread, and the work of the answer is spread over the
    /// reading threads rather than left to the async workers.
    async fn execution_page(
        &self,
        by: &CampaignRef,
        query: &ExecutionQuery,
        render: RenderPage,
    ) -> StoreResult<Option<RenderedPage>>;
    /// Executions of a campaign (in one status, if given), for paging.
    async fn count_executions(
        &self,
        campaign_id: i64,
        status: Option<ExecutionStatus>,
    ) -> StoreResult<i64>;
    /// The run, if any, that sent `provider_id` (for callback checks).
    async fn run_of_message(&self, provider_id: &str) -> StoreResult<Option<RunRecord>>;
    /// Every phone number of a run, in execution order.
    async fn run_phones(&self, run_id: i64) -> StoreResult<Vec<String>>;
    /// A campaign with its totals over every run, in one statement (seed
    /// 002 analytics is what dashboards poll).
    async fn campaign_totals(
        &self,
        by: &CampaignRef,
    ) -> StoreResult<Option<(Campaign, CampaignTotals)>>;
    /// A campaign with its latest run, in one statement (seed 002 status is
    /// polled likewise).
    async fn campaign_status(
        &self,
        by: &CampaignRef,
    ) -> StoreResult<Option<(Campaign, Option<RunSummary>)>>;
    async fn metrics_history(
        &self,
        campaign_id: i64,
        since_minute: i64,
    ) -> StoreResult<Vec<MinuteBucket>>;
    async fn events_since(
        &self,
        campaign_id: i64,
        after_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Deletes, in chunks of at most `limit`, events that are both older
    /// than `older_than` (Unix ms) and not among the newest `keep_last` of
    /// their campaign. Returns how many went.
    async fn purge_events(&self, older_than: i64, keep_last: i64, limit: i64) -> StoreResult<u64>;
    /// Deletes up to `limit` executions of the oldest run that ended before
    /// `ended_before` (Unix ms) and whose campaign has no older run still
    /// kept, so what remains of a campaign is always its newest executions
    /// (offsets counted from the newest stay right). The run stops counting
    /// its executions at once; its counters stay. Returns the rows deleted
    /// (at least 1 while there was work), 0 when nothing is due.
    async fn purge_executions(&self, ended_before: i64, limit: i64) -> StoreResult<u64>;
    /// Deletes up to `limit` per-minute send counts before `before_minute`
    /// (Unix minutes). Returns how many went.
    async fn purge_metrics(&self, before_minute: i64, limit: i64) -> StoreResult<u64>;
    /// The newest sequence number of a campaign's log (0 when empty).
    async fn last_seq(&self, campaign_id: i64) -> StoreResult<i64>;
    /// `(campaign id, newest sequence)` of every campaign of a workspace.
    async fn last_seqs_of_workspace(&self, workspace_id: i64) -> StoreResult<Vec<(i64, i64)>>;
    /// The oldest sequence number still in the log, if any.
    async fn oldest_seq(&self, campaign_id: i64) -> StoreResult<Option<i64>>;
    /// The campaign a run belongs to.
    async fn campaign_of_run(&self, run_id: i64) -> StoreResult<Option<Campaign>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unfiltered_page_of_up_to_a_hundred_rows_is_one_short_range() {
        let page = |limit| ExecutionQuery {
            limit,
            ..ExecutionQuery::default()
        };
        assert!(page(50).reads_one_short_range());
        assert!(page(ExecutionQuery::SHORT_PAGE).reads_one_short_range());
        assert!(!page(ExecutionQuery::SHORT_PAGE + 1).reads_one_short_range());
        // Deep or by cursor, an unfiltered page is still one index range.
        let deep = ExecutionQuery {
            offset: 999_900,
            before_id: Some(7),
            ..page(100)
        };
        assert!(deep.reads_one_short_range());
        // A filter may scan (and count) far more rows than the page holds.
        let by_status = ExecutionQuery {
            status: Some(crate::domain::ExecutionStatus::Failed),
            ..page(50)
        };
        let by_run = ExecutionQuery {
            run_id: Some(3),
            ..page(50)
        };
        assert!(!by_status.reads_one_short_range());
        assert!(!by_run.reads_one_short_range());
    }
}
