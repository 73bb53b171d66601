-- The ledger: jobs, their history, and the transactional outbox and inbox.

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    queue            text NOT NULL,
    state            text NOT NULL CHECK (state IN (
                         'blocked', 'pending', 'dispatched', 'running',
                         'succeeded', 'failed', 'cancelled',
                         'reserved', 'draining', 'preempted')),
    priority         integer NOT NULL DEFAULT 0,
    task             text,
    payload          jsonb,
    command          jsonb,
    shell            boolean NOT NULL DEFAULT false,
    -- Fencing token of the current execution: (attempt, delivery). attempt
    -- counts ledger decisions to run the job; delivery is JetStream's
    -- delivery count of the running attempt's work message.
    attempt          integer NOT NULL DEFAULT 1,
    delivery         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3,
    backoff          jsonb NOT NULL DEFAULT '{}',
    timeout_s        double precision,
    run_at           timestamptz NOT NULL DEFAULT now(),
    idempotency_key  text,
    cpu              real NOT NULL DEFAULT 0,
    memory_mb        integer NOT NULL DEFAULT 0,
    vram_mb          integer NOT NULL DEFAULT 0,
    labels           jsonb NOT NULL DEFAULT '{}',
    dag_id           uuid,
    unmet_deps       integer NOT NULL DEFAULT 0,
    gang_id          uuid,
    gang_rank        integer,
    checkpoint       bytea,
    result           jsonb,
    error            text,
    worker_id        text,
    lease_until      timestamptz,
    traceparent      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    dispatched_at    timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    CHECK ((command IS NULL) <> (task IS NULL))
);

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The dispatcher's scan: only pending rows, in dispatch order.
CREATE INDEX jobs_pending ON jobs (priority DESC, run_at, id) WHERE state = 'pending';
-- When the next delayed job falls due.
CREATE INDEX jobs_pending_run_at ON jobs (run_at) WHERE state = 'pending';
-- Live executions, for lease expiry and worker death.
CREATE INDEX jobs_live ON jobs (lease_until) WHERE state IN ('dispatched', 'running');
-- Listing with filters; ids are time-ordered (UUIDv7) so id is the cursor.
CREATE INDEX jobs_state_id ON jobs (state, id);
CREATE INDEX jobs_queue_id ON jobs (queue, id);

CREATE TABLE job_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at         timestamptz NOT NULL DEFAULT now(),
    kind       text NOT NULL,  -- submitted, dispatched, started, succeeded, failed, retrying, cancelled, fenced
    attempt    integer NOT NULL,
    delivery   integer NOT NULL DEFAULT 0,
    worker_id  text,
    detail     text
);
CREATE INDEX job_events_job ON job_events (job_id, id);

-- Messages to publish, written in the transaction that decided them. A row
-- is claimable by the relay once available_at has passed: a process that
-- publishes its own rows right after commit sets it a few seconds ahead, so
-- the relay only steps in when that process died.
CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject       text NOT NULL,
    payload       bytea NOT NULL,
    headers       jsonb,
    available_at  timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    dead          boolean NOT NULL DEFAULT false
);
CREATE INDEX outbox_live ON outbox (available_at, id) WHERE NOT dead;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE available_at <= now()) THEN
        PERFORM pg_notify('workron_outbox', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Messages a consumer has applied, written with the effect they caused, so
-- a redelivery is recognised and skipped.
CREATE TABLE inbox (
    consumer      text NOT NULL,
    msg_id        text NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, msg_id)
);
CREATE INDEX inbox_age ON inbox (processed_at);

-- Messages terminated as poison, with their reason.
CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text NOT NULL,
    subject     text,
    msg_id      text,
    reason      text NOT NULL,
    body        bytea,
    at          timestamptz NOT NULL DEFAULT now()
);

-- Counters the services bump inside their own transactions (fenced reports).
CREATE TABLE counters (
    name   text PRIMARY KEY,
    value  bigint NOT NULL DEFAULT 0
);
