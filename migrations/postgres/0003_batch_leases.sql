-- Batches are leased: several workers (nodes) share a running run, each
-- working the batches it holds; an expired lease may be taken over.
ALTER TABLE batches ADD COLUMN lease_owner TEXT;
ALTER TABLE batches ADD COLUMN lease_expires_at BIGINT;
