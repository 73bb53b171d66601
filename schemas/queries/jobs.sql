-- name: jobs_insert
-- One statement for a whole batch of submissions. A conflict on id (the same
-- submission delivered twice) or on idempotency_key (the same job submitted
-- twice) inserts nothing; the caller looks the winner up.
-- $19-$21: DAG id, ref in the DAG, and dependencies still to be met.
-- Each job written gets its `submitted` event in the same statement.
WITH inserted AS (
    INSERT INTO jobs (
        id, queue, state, priority, task, payload, command, shell, max_attempts,
        backoff, timeout_s, run_at, idempotency_key, cpu, memory_mb, vram_mb,
        labels, traceparent, dispatched_at, dag_id, dag_ref, unmet_deps)
    SELECT id, queue, state, priority, task, payload, command, shell, max_attempts,
           backoff, timeout_s, coalesce(run_at, statement_timestamp()), idempotency_key, cpu,
           memory_mb, vram_mb, labels, traceparent,
           CASE WHEN state = 'dispatched' THEN statement_timestamp() END, dag_id, dag_ref, unmet_deps
    FROM unnest(
        $1::uuid[], $2::text[], $3::text[], $4::integer[], $5::text[], $6::jsonb[],
        $7::jsonb[], $8::boolean[], $9::integer[], $10::jsonb[], $11::float8[],
        $12::timestamptz[], $13::text[], $14::real[], $15::integer[], $16::integer[],
        $17::jsonb[], $18::text[], $19::uuid[], $20::text[], $21::integer[])
        AS t(id, queue, state, priority, task, payload, command, shell, max_attempts,
             backoff, timeout_s, run_at, idempotency_key, cpu, memory_mb, vram_mb,
             labels, traceparent, dag_id, dag_ref, unmet_deps)
    ON CONFLICT DO NOTHING
    RETURNING id, state
), events AS (
    INSERT INTO job_events (job_id, kind, attempt, detail)
    SELECT id, 'submitted', 1, state FROM inserted
)
SELECT id FROM inserted;

-- name: jobs_find_existing
SELECT id, idempotency_key, state FROM jobs
WHERE id = ANY($1::uuid[]) OR idempotency_key = ANY($2::text[]);

-- name: job_events_insert
INSERT INTO job_events (job_id, kind, attempt, delivery, worker_id, detail)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::integer[], $4::integer[], $5::text[], $6::text[]);

-- name: job_get
SELECT * FROM jobs WHERE id = $1;

-- name: job_events_list
SELECT at, kind, attempt, delivery, worker_id, detail
FROM job_events WHERE job_id = $1 ORDER BY id;

-- name: jobs_list
-- Newest first; ids are time-ordered, so the cursor is the last id seen.
SELECT * FROM jobs
WHERE ($1::text IS NULL OR state = $1)
  AND ($2::text IS NULL OR queue = $2)
  AND ($3::text IS NULL OR task = $3)
  AND ($4::uuid IS NULL OR id < $4)
ORDER BY id DESC
LIMIT $5;

-- name: job_cancel
-- previous_state says whether an execution may be running (dispatched,
-- running): it must then be told to stop.
WITH before AS (SELECT id, state FROM jobs WHERE id = $1 FOR UPDATE)
UPDATE jobs
SET state = 'cancelled', finished_at = statement_timestamp(), updated_at = statement_timestamp(),
    error = coalesce($2, error), lease_until = NULL
FROM before
WHERE jobs.id = before.id AND jobs.state = ANY($3::text[])
RETURNING jobs.id, jobs.queue, jobs.attempt, jobs.delivery, jobs.worker_id, jobs.state,
          before.state AS previous_state;
