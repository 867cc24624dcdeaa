-- A run's executions by batch, without their status. With the status in the
-- key, each execution's every status change (claimed, then sent or failed)
-- moved its index entry: a delete and an insert on the writer's path, about
-- a fifth of a slice's claim and record. A claim now reads its batch's range
-- (at most one batch, 1,000 rows) and keeps those still pending; a finished
-- run, whose counters say nothing is pending or in flight, reads none.
DROP INDEX executions_by_run;
CREATE INDEX executions_by_run ON executions (run_id, batch_sequence, id);

-- Room on each page for the new versions of its rows: an update that
-- changes no indexed column (a claim, a delivery receipt) can then stay on
-- its page and add no index entry (a HOT update). Packed pages (the default)
-- made every one of an execution's three writes a new entry in every index.
ALTER TABLE executions SET (fillfactor = 50);
