-- The reaper: worker heartbeats, dead workers, expired leases, lost work
-- messages. Queries that change jobs run in leader transactions (lease_hold).

-- name: reaper_workers_upsert
-- One row per worker from a batch of heartbeats (one per worker id); the
-- database clock stamps last_seen. $4 and $8 are JSON (queues, tags), $13
-- the executions of the heartbeat.
INSERT INTO workers (
    id, instance, state, queues, cpu, memory_mb, vram_mb, tags, hostname, version,
    heartbeat_s, running, executions, started_at, last_seen, left_at)
SELECT id, instance, state, ARRAY(SELECT jsonb_array_elements_text(queues)), cpu,
       memory_mb, vram_mb, tags, hostname, version, heartbeat_s, running, executions,
       started_at, statement_timestamp(), CASE WHEN state = 'stopped' THEN statement_timestamp() END
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::jsonb[], $5::real[], $6::integer[],
    $7::integer[], $8::jsonb[], $9::text[], $10::text[], $11::float8[], $12::integer[],
    $13::jsonb[], $14::timestamptz[])
    AS t(id, instance, state, queues, cpu, memory_mb, vram_mb, tags, hostname, version,
         heartbeat_s, running, executions, started_at)
ON CONFLICT (id) DO UPDATE
SET instance = excluded.instance,
    state = excluded.state,
    queues = excluded.queues,
    cpu = excluded.cpu,
    memory_mb = excluded.memory_mb,
    vram_mb = excluded.vram_mb,
    tags = excluded.tags,
    hostname = excluded.hostname,
    version = excluded.version,
    heartbeat_s = excluded.heartbeat_s,
    running = excluded.running,
    executions = excluded.executions,
    started_at = excluded.started_at,
    registered_at = CASE WHEN workers.instance = excluded.instance THEN workers.registered_at
                         ELSE statement_timestamp() END,
    last_seen = statement_timestamp(),
    left_at = excluded.left_at;

-- name: reaper_jobs_renew
-- Renew the ledger lease of each execution a heartbeat names, only where
-- it is the job's current execution on that very worker: a fenced
-- execution renews nothing. Rows being written right now are skipped (the
-- next heartbeat renews them), so this never waits on, or deadlocks with,
-- a dispatcher batch.
WITH beat AS (
    SELECT * FROM unnest($1::uuid[], $2::integer[], $3::integer[], $4::text[])
        AS h(id, attempt, delivery, worker_id)),
live AS (
    SELECT jobs.id FROM jobs JOIN beat ON jobs.id = beat.id
    WHERE jobs.state = 'running' AND jobs.attempt = beat.attempt
      AND jobs.delivery = beat.delivery AND jobs.worker_id = beat.worker_id
    ORDER BY jobs.id
    FOR UPDATE OF jobs SKIP LOCKED)
UPDATE jobs SET lease_until = statement_timestamp() + make_interval(secs => $5)
FROM live
WHERE jobs.id = live.id
RETURNING jobs.id;

-- name: reaper_jobs_tokens
-- The ledger's current token of the jobs heartbeats name.
SELECT id, state, attempt, delivery FROM jobs WHERE id = ANY($1::uuid[]);

-- name: reaper_jobs_hand_back
-- Executions a stopping worker handed back (nak): the job waits in its
-- queue again, so it is dispatched rather than running on a gone worker.
-- Locked in id order, like the dispatcher's batches.
WITH back AS (
    SELECT * FROM unnest($1::uuid[], $2::integer[], $3::integer[], $4::text[])
        AS h(id, attempt, delivery, worker_id)),
mine AS (
    SELECT jobs.id FROM jobs JOIN back ON jobs.id = back.id
    WHERE jobs.state = 'running' AND jobs.attempt = back.attempt
      AND jobs.delivery = back.delivery AND jobs.worker_id = back.worker_id
    ORDER BY jobs.id
    FOR UPDATE OF jobs)
UPDATE jobs
SET state = 'dispatched', worker_id = NULL, lease_until = NULL, dispatched_at = statement_timestamp(),
    updated_at = statement_timestamp()
FROM mine
WHERE jobs.id = mine.id
RETURNING jobs.id, jobs.attempt, jobs.delivery;

-- name: reaper_workers_mark_dead
-- Workers that missed $1 heartbeats in a row. $2: seconds this reaper has
-- been hearing heartbeats without a gap; a worker is judged only once the
-- reaper could have heard $1 of its heartbeats.
UPDATE workers
SET state = 'dead', left_at = statement_timestamp()
WHERE state IN ('alive', 'draining')
  AND last_seen < statement_timestamp() - make_interval(secs => heartbeat_s * $1)
  AND $2 >= heartbeat_s * $1
RETURNING id, last_seen;

-- name: reaper_orphans
-- Running jobs no live execution holds, locked (rows being written elsewhere
-- are left for the next scan), each with why:
--   dead, stopped: its worker's state;
--   untracked: its worker is alive, but a heartbeat sent well after the job
--     started does not name it (restarted under the same id, or lost track);
--   unknown: its worker was never heard of, though this reaper listened for
--     $4 seconds since the job started (it died before any reaper heard it);
--   expired: its ledger lease ran out.
-- $2: whether heartbeats were heard long enough to judge by their absence;
-- $3: the lease length. All times by the database clock.
WITH candidates AS (
    SELECT r.id, d.state AS why
    FROM workers d JOIN jobs r ON r.worker_id = d.id AND r.state = 'running'
    WHERE d.state IN ('dead', 'stopped')
    UNION ALL
    -- A heartbeat may reach the ledger ~2 s after it was built: only one
    -- recorded 2 periods + 2 s after the start (or last renewal) counts.
    SELECT r.id, 'untracked'
    FROM workers a JOIN jobs r ON r.worker_id = a.id AND r.state = 'running'
    WHERE $2 AND a.state IN ('alive', 'draining')
      AND NOT a.executions @> jsonb_build_array(jsonb_build_object('job_id', r.id))
      AND a.last_seen > r.lease_until - make_interval(secs => $3 - 2 * a.heartbeat_s - 2)
    UNION ALL
    SELECT r.id, 'unknown'
    FROM jobs r
    WHERE $2 AND r.state = 'running'
      AND r.lease_until < statement_timestamp() + make_interval(secs => $3 - $4)
      AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = r.worker_id)
    UNION ALL
    SELECT id, 'expired' FROM jobs WHERE $2 AND state = 'running' AND lease_until < statement_timestamp()),
orphans AS (
    SELECT DISTINCT ON (id) id, why FROM candidates
    ORDER BY id, array_position(ARRAY['dead', 'stopped', 'unknown', 'untracked', 'expired'], why))
SELECT j.id, j.queue, j.attempt, j.delivery, j.max_attempts, j.backoff, j.worker_id,
       orphans.why, w.executions
FROM jobs j
JOIN orphans ON orphans.id = j.id
LEFT JOIN workers w ON w.id = j.worker_id
WHERE j.state = 'running'
ORDER BY j.id
LIMIT $1
FOR UPDATE OF j SKIP LOCKED;

-- name: reaper_requeue
-- The reaper's decision for each orphaned execution (states.apply_report of a
-- failure): a new attempt after the retry delay, or failed for good. Guarded
-- by the token read under lock.
UPDATE jobs
SET state = u.state,
    attempt = u.attempt,
    delivery = u.delivery,
    error = u.error,
    run_at = CASE WHEN u.state = 'pending' THEN statement_timestamp() + make_interval(secs => u.retry_in)
                  ELSE jobs.run_at END,
    started_at = CASE WHEN u.state = 'pending' THEN NULL ELSE jobs.started_at END,
    finished_at = CASE WHEN u.state = 'failed' THEN statement_timestamp() END,
    lease_until = NULL,
    updated_at = statement_timestamp()
FROM unnest(
    $1::uuid[], $2::integer[], $3::integer[], $4::text[], $5::text[], $6::integer[],
    $7::integer[], $8::text[], $9::float8[])
    AS u(id, old_attempt, old_delivery, old_worker, state, attempt, delivery, error, retry_in)
WHERE jobs.id = u.id
  AND jobs.state = 'running'
  AND jobs.attempt = u.old_attempt
  AND jobs.delivery = u.old_delivery
  AND jobs.worker_id IS NOT DISTINCT FROM u.old_worker
RETURNING jobs.id;

-- name: reaper_unstarted
-- Jobs dispatched more than $1 seconds ago that no worker has started,
-- oldest first, with how often the reaper re-dispatched them already and
-- whether their work message still waits in the outbox (then it is not lost:
-- the relay publishes it).
SELECT j.id, j.queue, j.attempt, j.dispatched_at,
       (SELECT count(*) FROM job_events e
        WHERE e.job_id = j.id AND e.kind = 'redispatched') AS redispatched,
       EXISTS (SELECT 1 FROM outbox o
               WHERE o.headers->>'Nats-Msg-Id' = 'work:' || j.id || ':' || j.attempt)
           AS in_outbox
FROM jobs j
WHERE j.state = 'dispatched' AND j.dispatched_at < statement_timestamp() - make_interval(secs => $1)
ORDER BY j.dispatched_at
LIMIT $2;

-- name: reaper_live_counts
-- Jobs per queue that hold a message in WORK (dispatched or running).
SELECT queue, count(*) AS live FROM jobs
WHERE state IN ('dispatched', 'running') AND queue = ANY($1::text[])
GROUP BY queue;

-- name: reaper_redispatch
-- A new attempt for jobs whose work message is gone, not charged to their
-- budget (max_attempts grows with it): the job never ran. Guarded by the
-- state, attempt and dispatch time seen by the scan.
WITH lost AS (
    SELECT jobs.id FROM jobs
    JOIN unnest($1::uuid[], $2::integer[], $3::timestamptz[]) AS u(id, attempt, dispatched_at)
      ON jobs.id = u.id
    WHERE jobs.state = 'dispatched' AND jobs.attempt = u.attempt
      AND jobs.dispatched_at = u.dispatched_at
    ORDER BY jobs.id
    FOR UPDATE OF jobs SKIP LOCKED)
UPDATE jobs
SET state = 'pending', attempt = jobs.attempt + 1, max_attempts = jobs.max_attempts + 1,
    delivery = 0, run_at = statement_timestamp(), worker_id = NULL, lease_until = NULL, started_at = NULL,
    updated_at = statement_timestamp()
FROM lost
WHERE jobs.id = lost.id
RETURNING jobs.id, jobs.queue, jobs.attempt;

-- name: reaper_fail_unstarted
-- Jobs whose work message was lost too often: failed, with the reason.
WITH lost AS (
    SELECT jobs.id FROM jobs
    JOIN unnest($1::uuid[], $2::integer[], $3::timestamptz[]) AS u(id, attempt, dispatched_at)
      ON jobs.id = u.id
    WHERE jobs.state = 'dispatched' AND jobs.attempt = u.attempt
      AND jobs.dispatched_at = u.dispatched_at
    ORDER BY jobs.id
    FOR UPDATE OF jobs SKIP LOCKED)
UPDATE jobs
SET state = 'failed', error = $4, finished_at = statement_timestamp(), lease_until = NULL, updated_at = statement_timestamp()
FROM lost
WHERE jobs.id = lost.id
RETURNING jobs.id, jobs.queue, jobs.attempt, jobs.delivery;

-- name: reaper_workers_prune
-- Workers gone (dead or stopped) for more than $1 seconds.
DELETE FROM workers
WHERE state IN ('dead', 'stopped') AND left_at < statement_timestamp() - make_interval(secs => $1);

-- name: reaper_workers_by_state
SELECT state, count(*) AS n FROM workers GROUP BY state;

-- name: reaper_queues
-- Queues that need a work consumer: those of live jobs and of live workers.
SELECT DISTINCT queue FROM jobs WHERE state IN ('dispatched', 'running')
UNION
SELECT DISTINCT unnest(queues) FROM workers WHERE state IN ('alive', 'draining');
