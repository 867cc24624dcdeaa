-- The engine: runs, batches, executions, the event log, per-minute metrics
-- and the credit ledger. Counters live on runs and batches and are changed in
-- the same transaction as the executions they count, never by COUNT(*).

-- One execution of a campaign. `status`: scheduled → claimed → running →
-- completed | failed | cancelled. `claimed` is internal; APIs show `running`.
CREATE TABLE runs (
    id                 INTEGER PRIMARY KEY,
    uuid               TEXT    NOT NULL UNIQUE,
    campaign_id        INTEGER NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    status             TEXT    NOT NULL CHECK (status IN
                         ('scheduled', 'claimed', 'running', 'completed', 'failed', 'cancelled')),
    -- 'all' contacts, or only those whose last execution failed.
    recipients         TEXT    NOT NULL DEFAULT 'all' CHECK (recipients IN ('all', 'failed')),
    scheduled_at       INTEGER NOT NULL,
    -- The worker holding the run, and until when; an expired lease may be taken over.
    lease_owner        TEXT,
    lease_expires_at   INTEGER,
    claimed_at         INTEGER,
    started_at         INTEGER,
    completed_at       INTEGER,
    -- Frozen at claim: provider, sender, template, channel (JSON); NULL before.
    snapshot           TEXT,
    frozen_at          INTEGER,
    total              INTEGER NOT NULL DEFAULT 0,
    pending            INTEGER NOT NULL DEFAULT 0,
    processing         INTEGER NOT NULL DEFAULT 0,
    sent               INTEGER NOT NULL DEFAULT 0,
    failed             INTEGER NOT NULL DEFAULT 0,
    skipped            INTEGER NOT NULL DEFAULT 0,
    delivered          INTEGER NOT NULL DEFAULT 0,
    failed_delivery    INTEGER NOT NULL DEFAULT 0,
    total_batches      INTEGER NOT NULL DEFAULT 0,
    completed_batches  INTEGER NOT NULL DEFAULT 0,
    -- Credits: reserved at claim, charged as sent, the rest refunded at the end.
    cost_units         INTEGER NOT NULL DEFAULT 0,
    reserved_credits   INTEGER NOT NULL DEFAULT 0,
    charged_credits    INTEGER NOT NULL DEFAULT 0,
    refunded_credits   INTEGER NOT NULL DEFAULT 0,
    first_sent_at      INTEGER,
    last_sent_at       INTEGER,
    error              TEXT,
    updated_at         INTEGER NOT NULL
);
CREATE INDEX runs_by_campaign ON runs (campaign_id, id);
CREATE INDEX runs_due ON runs (status, scheduled_at);

-- Up to 1000 recipients of a run.
CREATE TABLE batches (
    id               INTEGER PRIMARY KEY,
    run_id           INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    batch_sequence   INTEGER NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    recipient_count  INTEGER NOT NULL,
    pending          INTEGER NOT NULL,
    processing       INTEGER NOT NULL DEFAULT 0,
    sent             INTEGER NOT NULL DEFAULT 0,
    failed           INTEGER NOT NULL DEFAULT 0,
    skipped          INTEGER NOT NULL DEFAULT 0,
    delivered        INTEGER NOT NULL DEFAULT 0,
    failed_delivery  INTEGER NOT NULL DEFAULT 0,
    started_at       INTEGER,
    completed_at     INTEGER,
    error_detail     TEXT,
    UNIQUE (run_id, batch_sequence)
);

-- One recipient in one run. Contact fields are copied at freeze time, so
-- later edits never change what a run sends.
CREATE TABLE executions (
    id                  INTEGER PRIMARY KEY,
    run_id              INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    campaign_id         INTEGER NOT NULL,
    batch_sequence      INTEGER NOT NULL,
    contact_id          INTEGER NOT NULL,
    phone               TEXT    NOT NULL,
    name                TEXT,
    variables           TEXT    NOT NULL,
    status              TEXT    NOT NULL CHECK (status IN ('pending', 'in_progress', 'completed',
                          'failed', 'no_answer', 'busy', 'voicemail', 'skipped')),
    -- SMS only: sent → delivered | failed, from delivery receipts.
    message_status      TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     INTEGER,
    provider_message_id TEXT,
    duration_seconds    INTEGER,
    error_details       TEXT,
    retry_reason        TEXT,
    executed_at         INTEGER,
    delivered_at        INTEGER,
    updated_at          INTEGER
);
CREATE INDEX executions_by_run ON executions (run_id, status, batch_sequence, id);
CREATE INDEX executions_by_campaign ON executions (campaign_id, id);
CREATE INDEX executions_by_provider_id ON executions (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- The ordered, gap-free event log of each campaign.
CREATE TABLE events (
    campaign_id INTEGER NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    data        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (campaign_id, seq)
) WITHOUT ROWID;
ALTER TABLE campaigns ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;

-- Sends per campaign per minute, for throughput charts and metrics_history.
CREATE TABLE metrics_minutes (
    campaign_id INTEGER NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    minute      INTEGER NOT NULL,
    completed   INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, minute)
) WITHOUT ROWID;

-- Every change of a workspace's credit balance. SUM(amount) = balance.
CREATE TABLE credit_ledger (
    id            INTEGER PRIMARY KEY,
    workspace_id  INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    run_id        INTEGER,
    kind          TEXT    NOT NULL CHECK (kind IN ('topup', 'reserve', 'refund')),
    amount        INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    note          TEXT,
    created_at    INTEGER NOT NULL
);
CREATE INDEX credit_ledger_by_workspace ON credit_ledger (workspace_id, id);
