-- Each execution's position in its campaign (1, 2, … in id order, runs
-- appended after one another), so a seed-001 page at any offset is an index
-- range instead of a scan past every row above it.
ALTER TABLE executions ADD COLUMN campaign_ordinal BIGINT;
UPDATE executions SET campaign_ordinal = r.n
FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY campaign_id ORDER BY id) AS n
      FROM executions) AS r
WHERE executions.id = r.id;
CREATE INDEX executions_by_campaign_ordinal ON executions (campaign_id, campaign_ordinal);
