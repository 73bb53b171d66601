-- The ledger's clock is the statement's: statement_timestamp(), never now().
-- now() is when the transaction began, and the dispatcher begins its next
-- transaction with the last one's COMMIT, so that a batch arriving later
-- saves a round trip; its statements may run long after that BEGIN. Every
-- query, column default and trigger stamps the time its statement runs.

ALTER TABLE jobs ALTER COLUMN run_at SET DEFAULT statement_timestamp(),
                 ALTER COLUMN created_at SET DEFAULT statement_timestamp(),
                 ALTER COLUMN updated_at SET DEFAULT statement_timestamp();
ALTER TABLE job_events ALTER COLUMN at SET DEFAULT statement_timestamp();
ALTER TABLE outbox ALTER COLUMN available_at SET DEFAULT statement_timestamp(),
                   ALTER COLUMN created_at SET DEFAULT statement_timestamp();
ALTER TABLE inbox ALTER COLUMN processed_at SET DEFAULT statement_timestamp();
ALTER TABLE dead_letters ALTER COLUMN at SET DEFAULT statement_timestamp();
ALTER TABLE dags ALTER COLUMN created_at SET DEFAULT statement_timestamp();
ALTER TABLE workers ALTER COLUMN registered_at SET DEFAULT statement_timestamp(),
                    ALTER COLUMN last_seen SET DEFAULT statement_timestamp();

CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE available_at <= statement_timestamp()) THEN
        PERFORM pg_notify('workron_outbox', '');
    END IF;
    RETURN NULL;
END $$;
