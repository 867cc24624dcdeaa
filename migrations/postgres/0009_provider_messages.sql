-- Provider message ids in a table of their own, for matching delivery
-- receipts and call-status callbacks to their executions. Indexed on the
-- executions table, the id made recording a send (which sets it) change an
-- indexed column: on Postgres that update could never be a HOT update, so
-- each send added an entry to every index of executions (five). Now
-- recording a send changes no indexed column and adds one narrow row.
--
-- `executions.provider_message_id` stays the execution's current id (what
-- the APIs show). A later attempt's id replaces an earlier one's here too,
-- and a row here goes with its execution.
CREATE TABLE provider_messages (
    provider_message_id TEXT   NOT NULL,
    execution_id        BIGINT NOT NULL,
    PRIMARY KEY (provider_message_id, execution_id)
);
INSERT INTO provider_messages (provider_message_id, execution_id)
    SELECT provider_message_id, id FROM executions
    WHERE provider_message_id IS NOT NULL;
DROP INDEX executions_by_provider_id;
