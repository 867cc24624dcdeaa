-- Retention of a run's executions: 'kept'; 'purging' once the purge has
-- taken the run (its executions no longer count from then); 'purged' when
-- the last row is gone. The run's own counters and credits always stay.
ALTER TABLE runs ADD COLUMN executions_state TEXT NOT NULL DEFAULT 'kept'
    CHECK (executions_state IN ('kept', 'purging', 'purged'));

-- The metrics purge deletes by age across campaigns.
CREATE INDEX metrics_minutes_by_minute ON metrics_minutes (minute);
