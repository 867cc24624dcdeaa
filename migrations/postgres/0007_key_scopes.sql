-- Key scopes: what a key may do beyond everyday reads and writes,
-- comma-separated names (today only `pii`: recipients in run snapshots).
ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT '';
