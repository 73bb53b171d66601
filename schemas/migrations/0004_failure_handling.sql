-- Failure handling: the worker registry, leader leases, and what the reaper
-- and manual retries need on jobs.

-- One row per worker id, written from its heartbeats by the leading reaper.
-- last_seen is the database clock, so liveness never compares two machines'
-- clocks. Rows of workers gone for long are pruned by the reaper.
CREATE TABLE workers (
    id             text PRIMARY KEY,
    -- One per run of the worker process: a restart under the same id shows.
    instance       text NOT NULL,
    state          text NOT NULL CHECK (state IN ('alive', 'draining', 'dead', 'stopped')),
    queues         text[] NOT NULL DEFAULT '{}',
    cpu            real NOT NULL DEFAULT 0,
    memory_mb      integer NOT NULL DEFAULT 0,
    vram_mb        integer NOT NULL DEFAULT 0,
    tags           jsonb NOT NULL DEFAULT '{}',
    hostname       text NOT NULL DEFAULT '',
    version        text NOT NULL DEFAULT '',
    -- The worker's own heartbeat period: it is dead after three missed.
    heartbeat_s    double precision NOT NULL,
    running        integer NOT NULL DEFAULT 0,
    -- The executions of the last heartbeat, with the reply subjects of their
    -- deliveries: once the reaper gives a job a new attempt, it acks the old
    -- delivery through that subject so the message cannot run again.
    executions     jsonb NOT NULL DEFAULT '[]',
    started_at     timestamptz,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    last_seen      timestamptz NOT NULL DEFAULT now(),
    left_at        timestamptz
);
-- The reaper's scan for silent workers.
CREATE INDEX workers_live ON workers (last_seen) WHERE state IN ('alive', 'draining');

-- Leader leases (reaper, later cron): one row per role. epoch grows with
-- every change of holder and fences a deposed leader's writes: each leader
-- transaction first locks its row FOR SHARE, checking holder and epoch.
CREATE TABLE leases (
    name         text PRIMARY KEY,
    holder       text NOT NULL,
    epoch        bigint NOT NULL,
    acquired_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at   timestamptz NOT NULL
);

-- Attempts a job had used before its last manual retry: a retry grants the
-- job's original budget again (max_attempts - attempt_base per run).
ALTER TABLE jobs ADD COLUMN attempt_base integer NOT NULL DEFAULT 0;

-- Running jobs of a worker, for when it dies.
CREATE INDEX jobs_running_worker ON jobs (worker_id) WHERE state = 'running';
-- Jobs dispatched long ago and never started: their message may be lost.
CREATE INDEX jobs_dispatched_at ON jobs (dispatched_at) WHERE state = 'dispatched';
