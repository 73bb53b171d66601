-- Failure handling seen from the API: retrying finished jobs, the worker
-- registry, dead letters.

-- name: recovery_retry
-- Run a failed or cancelled job again: the next attempt number (a newer
-- fencing token than any execution before), and the attempts budget it was
-- submitted with, granted again. The dispatcher takes it from 'pending'.
UPDATE jobs
SET state = 'pending',
    attempt = attempt + 1,
    attempt_base = attempt,
    max_attempts = attempt + (max_attempts - attempt_base),
    delivery = 0,
    run_at = now(),
    error = NULL,
    result = NULL,
    worker_id = NULL,
    lease_until = NULL,
    dispatched_at = NULL,
    started_at = NULL,
    finished_at = NULL,
    updated_at = now()
WHERE id = $1 AND state = ANY($2::text[])
RETURNING id, attempt, max_attempts;

-- name: recovery_workers
SELECT id, state, queues, cpu, memory_mb, vram_mb, tags, hostname, version, heartbeat_s,
       running, executions, started_at, registered_at, last_seen, left_at,
       extract(epoch FROM now() - last_seen)::float8 AS seen_s_ago
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
