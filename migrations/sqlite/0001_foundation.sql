-- Foundation: workspaces, their API keys, campaigns and contacts.
-- Timestamps are Unix milliseconds (INTEGER), so both backends compare them
-- the same way and the API formats them once, as RFC 3339.

-- A workspace owns keys, campaigns, contacts and credits; nothing crosses one.
CREATE TABLE workspaces (
    id             INTEGER PRIMARY KEY,
    name           TEXT    NOT NULL UNIQUE,
    -- Region used to read phone numbers written without a country code.
    default_region TEXT    NOT NULL DEFAULT 'US',
    -- NULL means unlimited: credits are opt-in.
    credit_balance INTEGER,
    created_at     INTEGER NOT NULL
);

-- Keys are stored only as a SHA-256 hash; the prefix finds the row.
CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    prefix       TEXT    NOT NULL UNIQUE,
    key_hash     BLOB    NOT NULL,
    label        TEXT,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX api_keys_by_workspace ON api_keys (workspace_id, id);

-- A campaign: `id` serves the integer-keyed seed surfaces (Burki),
-- `uuid` the string-keyed ones (Briq).
CREATE TABLE campaigns (
    id            INTEGER PRIMARY KEY,
    uuid          TEXT    NOT NULL UNIQUE,
    workspace_id  INTEGER NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name          TEXT    NOT NULL,
    channel       TEXT    NOT NULL CHECK (channel IN ('sms', 'voice', 'external')),
    template      TEXT,
    sender        TEXT,
    -- ProviderSettings as JSON, e.g. {"kind":"simulated"}.
    provider      TEXT    NOT NULL,
    max_attempts  INTEGER NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN
                    ('draft', 'scheduled', 'running', 'paused', 'completed', 'cancelled', 'failed')),
    start_at      INTEGER,
    -- Kept equal to the number of contacts rows by every import.
    contact_count INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    started_at    INTEGER,
    completed_at  INTEGER
);
CREATE INDEX campaigns_by_workspace ON campaigns (workspace_id, id);

-- One row per phone number per campaign: imports merge duplicates.
CREATE TABLE contacts (
    id          INTEGER PRIMARY KEY,
    campaign_id INTEGER NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    phone       TEXT    NOT NULL,
    name        TEXT,
    -- Template variables as a JSON object of strings.
    variables   TEXT    NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL,
    UNIQUE (campaign_id, phone)
);
