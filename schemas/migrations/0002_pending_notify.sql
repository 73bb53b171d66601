-- Wake the dispatchers' schedulers when a job becomes pending (a delayed
-- submission, a retry, a dependent released), so it is dispatched when due
-- rather than at the next poll. Row triggers with a WHEN clause cost nothing
-- for the plain jobs of the hot path, which are written 'dispatched'; NOTIFY
-- folds identical notifications of one transaction into one.

CREATE FUNCTION jobs_pending_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('workron_pending', '');
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_pending_insert AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.state = 'pending')
    EXECUTE FUNCTION jobs_pending_notify();

CREATE TRIGGER jobs_pending_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.state = 'pending' AND OLD.state <> 'pending')
    EXECUTE FUNCTION jobs_pending_notify();
