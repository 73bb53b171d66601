-- Failure handling seen from the API: retrying finished jobs, the worker
-- registry, dead letters.

-- name: recovery_lock_job
-- The job a retry is asked for, locked before the descendants it reopens
-- (parents before dependents, as everywhere).
SELECT id, state, attempt FROM jobs WHERE id = $1 FOR UPDATE;

-- name: recovery_reopen_lock
-- The descendants the cascade cancelled below job $1: reached through
-- edges that do not allow failure, and only through jobs cancelled with
-- 'upstream_failed: …'. Locked in id order; the state is checked again
-- under the lock, so one reopened meanwhile by another retry drops out.
WITH RECURSIVE reached (id) AS (
    SELECT d.job_id FROM job_deps d
    WHERE d.depends_on = $1 AND NOT d.allow_failure
      AND (SELECT j.state = 'cancelled' AND j.error LIKE 'upstream_failed:%'
           FROM jobs j WHERE j.id = d.job_id)
    UNION
    -- Edges by job_deps_parent, the child's state by primary key, as a
    -- subplan (a join could be planned from every cancelled job instead).
    -- Starting from the edges out of $1, not $1 itself, gives the planner
    -- the fan-out's real width for the steps below it. LATERAL with OFFSET 0
    -- is never flattened into a join, which a planner expecting few rows
    -- could run as a scan of job_deps for every reached job.
    SELECT o.job_id
    FROM reached r
    CROSS JOIN LATERAL (
        SELECT d.job_id FROM job_deps d
        WHERE d.depends_on = r.id AND NOT d.allow_failure
          AND (SELECT j.state = 'cancelled' AND j.error LIKE 'upstream_failed:%'
               FROM jobs j WHERE j.id = d.job_id)
        OFFSET 0
    ) o
)
SELECT j.id, j.attempt
FROM reached r JOIN jobs j ON j.id = r.id
WHERE j.state = 'cancelled' AND j.error LIKE 'upstream_failed:%'
ORDER BY j.id
FOR UPDATE OF j;

-- name: recovery_edges_into
-- Every edge into jobs $1, with its parent's state (NULL: no such job).
SELECT d.job_id, d.depends_on, d.allow_failure, d.resolved, p.state, p.error
FROM job_deps d LEFT JOIN jobs p ON p.id = d.depends_on
WHERE d.job_id IN (SELECT unnest($1::uuid[]));

-- name: recovery_unresolve
-- Edges ($1 child, $2 parent) whose parent will finish again: its next
-- outcome resolves them, once.
UPDATE job_deps SET resolved = false
FROM unnest($1::uuid[], $2::uuid[]) AS u (job_id, depends_on)
WHERE job_deps.job_id = u.job_id AND job_deps.depends_on = u.depends_on
  AND job_deps.resolved;

-- name: recovery_new_attempt
-- Jobs $1 run again, each in state $2: 'pending' (the dispatcher takes it
-- from there, now), or 'blocked' with $3 unmet dependencies (a retried job
-- whose parent runs again; a descendant the retry reopens). Each gets the
-- next attempt number, a newer fencing token than any execution before (and
-- for a reopened job, whose cancel's job.finished is on the bus already, an
-- outcome that cannot be taken for it), and the attempts budget it was
-- submitted with, granted again. Guarded by $4: the states it may leave.
UPDATE jobs
SET state = u.state,
    unmet_deps = u.n,
    attempt = jobs.attempt + 1,
    attempt_base = jobs.attempt,
    max_attempts = jobs.attempt + (jobs.max_attempts - jobs.attempt_base),
    delivery = 0,
    run_at = CASE WHEN u.state = 'pending' THEN statement_timestamp() ELSE jobs.run_at END,
    error = NULL,
    result = NULL,
    worker_id = NULL,
    lease_until = NULL,
    dispatched_at = NULL,
    started_at = NULL,
    finished_at = NULL,
    updated_at = statement_timestamp()
FROM unnest($1::uuid[], $2::text[], $3::integer[]) AS u (id, state, n)
WHERE jobs.id = u.id AND jobs.state = ANY($4::text[])
RETURNING jobs.id, jobs.attempt, jobs.max_attempts;

-- name: recovery_keep_cancelled
-- Cascade-cancelled jobs $1 that stay cancelled: each error names the
-- upstream $2 that still keeps it from running.
UPDATE jobs SET error = u.reason, updated_at = statement_timestamp()
FROM unnest($1::uuid[], $2::text[]) AS u (id, reason)
WHERE jobs.id = u.id AND jobs.state = 'cancelled' AND jobs.error IS DISTINCT FROM u.reason;

-- name: recovery_workers
SELECT id, state, queues, cpu, memory_mb, vram_mb, tags, hostname, version, heartbeat_s,
       running, executions, started_at, registered_at, last_seen, left_at,
       extract(epoch FROM statement_timestamp() - last_seen)::float8 AS seen_s_ago
FROM workers
WHERE ($1::text IS NULL OR state = $1)
ORDER BY id;

-- name: recovery_dead_letters
-- Newest first; the id is the cursor.
SELECT id, source, subject, msg_id, reason, body, at
FROM dead_letters
WHERE ($1::text IS NULL OR source = $1) AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC
LIMIT $3;
