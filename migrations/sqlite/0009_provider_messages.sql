-- Provider message ids in a table of their own, for matching delivery
-- receipts and call-status callbacks to their executions (the same schema
-- as Postgres, where this keeps recording a send a HOT update; here it is
-- the same one b-tree insert as the index it replaces).
--
-- `executions.provider_message_id` stays the execution's current id (what
-- the APIs show). A later attempt's id replaces an earlier one's here too,
-- and a row here goes with its execution.
CREATE TABLE provider_messages (
    provider_message_id TEXT    NOT NULL,
    execution_id        INTEGER NOT NULL,
    PRIMARY KEY (provider_message_id, execution_id)
) WITHOUT ROWID;
INSERT INTO provider_messages (provider_message_id, execution_id)
    SELECT provider_message_id, id FROM executions
    WHERE provider_message_id IS NOT NULL;
DROP INDEX executions_by_provider_id;
