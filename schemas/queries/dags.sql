-- name: deps_lock_parents
-- Existing jobs new ones depend on, locked so that none finishes between
-- admission reading its state and committing the edges (in id order: two
-- admissions sharing parents never deadlock).
SELECT id, state FROM jobs WHERE id = ANY($1::uuid[]) ORDER BY id FOR SHARE;

-- name: deps_insert
INSERT INTO job_deps (job_id, depends_on, allow_failure)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::boolean[]);

-- name: resolver_inbox_insert
-- Records a batch of event ids; ids seen before come back as nothing.
INSERT INTO inbox (consumer, msg_id)
SELECT $1, m FROM unnest($2::text[]) AS t(m)
ON CONFLICT DO NOTHING
RETURNING msg_id;

-- name: resolver_open_edges
-- The open edges finished jobs $1 reach, $2 those of them that did not
-- succeed, $3 only edges into these jobs (empty: any); the walk is
-- workron_reached_edges (migration 0006).
SELECT job_id, depends_on, allow_failure
FROM workron_reached_edges($1::uuid[], $2::uuid[], $3::uuid[]);

-- name: resolver_lock_reached
-- The jobs resolver_open_edges reaches (same parameters), locked in id
-- order: resolvers, admissions and dispatchers lock dependents this way, so
-- they wait for each other instead of deadlocking. The edges are read again
-- under the locks: another resolver may have settled some meanwhile.
SELECT id, state FROM jobs
WHERE id IN (SELECT job_id FROM workron_reached_edges($1::uuid[], $2::uuid[], $3::uuid[]))
ORDER BY id
FOR UPDATE;

-- name: resolver_mark_resolved
UPDATE job_deps SET resolved = true
FROM unnest($1::uuid[], $2::uuid[]) AS u (job_id, depends_on)
WHERE job_deps.job_id = u.job_id AND job_deps.depends_on = u.depends_on
  AND NOT job_deps.resolved;

-- name: write_release
-- A batch's whole write in one statement: job rows, the dependents they
-- release, history and outbox rows. Each part is empty when its input is:
-- 1. The row of each job after a dispatcher's batch ($1-$13; $14 lease
--    seconds for a running execution). Guarded by the state and fencing
--    token read under lock: a row that moved meanwhile is left alone, and
--    the caller, seeing it missing from "written", refuses the batch.
-- 2. Every open edge out of $15 (jobs that succeeded, locked by the caller,
--    so nobody else resolves these edges) is marked resolved.
-- 3. Each blocked dependent $16 takes off $17 satisfied edges (those marked
--    in 2, which the caller read under its locks and counted, or edges it
--    resolved itself). One left with none is released: dispatched now, or
--    pending until its run_at (the dispatcher's trigger wakes it), and due
--    from then on (time blocked is not time waiting). The caller locks
--    dependents in id order first when there are several. The state test
--    is an expression on purpose: no plan can then scan jobs by state,
--    which an estimate of blocked rows lagging a bulk insert could choose.
-- 4. History rows $18-$23 (as job_events_insert), and a "released" row for
--    each job released.
-- 5. Outbox rows $24-$26, available to the relay after $27 seconds; and the
--    work message $28-$30 of job $31, only if it was released to
--    'dispatched' here (the caller built it from what it foresaw).
-- Every row carries the ids written, how many edges 2 marked, the outbox
-- ids of 5 (in the order given) and of the work message (or NULL); one row
-- per dependent released, or one row with none.
WITH written AS (
    UPDATE jobs
    SET state = u.state,
        attempt = u.attempt,
        delivery = u.delivery,
        worker_id = u.worker_id,
        started_at = u.started_at,
        finished_at = u.finished_at,
        result = coalesce(u.result, jobs.result),
        error = u.error,
        run_at = CASE WHEN u.retry_in IS NULL THEN jobs.run_at
                      ELSE statement_timestamp() + make_interval(secs => u.retry_in) END,
        lease_until = CASE WHEN u.state = 'running' THEN statement_timestamp() + make_interval(secs => $14) END,
        updated_at = statement_timestamp()
    FROM unnest(
        $1::uuid[], $2::text[], $3::integer[], $4::integer[], $5::text[], $6::integer[],
        $7::integer[], $8::text[], $9::timestamptz[], $10::timestamptz[], $11::jsonb[],
        $12::text[], $13::float8[])
        AS u(id, old_state, old_attempt, old_delivery, state, attempt, delivery, worker_id,
             started_at, finished_at, result, error, retry_in)
    WHERE jobs.id = u.id
      AND jobs.state = u.old_state
      AND jobs.attempt = u.old_attempt
      AND jobs.delivery = u.old_delivery
    RETURNING jobs.id),
marked AS (
    UPDATE job_deps SET resolved = true
    WHERE depends_on = ANY($15::uuid[]) AND NOT resolved
    RETURNING job_id),
changed AS (
    UPDATE jobs
    SET unmet_deps = jobs.unmet_deps - s.n,
        state = CASE WHEN jobs.unmet_deps > s.n THEN 'blocked'
                     WHEN jobs.run_at > statement_timestamp() THEN 'pending'
                     ELSE 'dispatched' END,
        dispatched_at = CASE WHEN jobs.unmet_deps <= s.n AND jobs.run_at <= statement_timestamp() THEN statement_timestamp() END,
        run_at = CASE WHEN jobs.unmet_deps <= s.n THEN greatest(jobs.run_at, statement_timestamp())
                      ELSE jobs.run_at END,
        updated_at = statement_timestamp()
    FROM unnest($16::uuid[], $17::integer[]) AS s(id, n)
    WHERE jobs.id = s.id AND jobs.state || '' = 'blocked'
    RETURNING jobs.id, jobs.state, jobs.queue, jobs.priority, jobs.run_at, jobs.attempt,
              jobs.max_attempts, jobs.task, jobs.payload, jobs.command, jobs.shell,
              jobs.timeout_s, jobs.checkpoint, jobs.traceparent),
history AS (
    INSERT INTO job_events (job_id, kind, attempt, delivery, worker_id, detail)
    SELECT * FROM unnest($18::uuid[], $19::text[], $20::integer[], $21::integer[],
                         $22::text[], $23::text[])
    UNION ALL
    SELECT id, 'released', attempt, 0, NULL, state FROM changed WHERE state <> 'blocked'),
recorded AS (
    INSERT INTO outbox (subject, payload, headers, available_at)
    SELECT s, p, h, statement_timestamp() + make_interval(secs => $27)
    FROM unnest($24::text[], $25::bytea[], $26::jsonb[]) AS t(s, p, h)
    RETURNING id),
work AS (
    INSERT INTO outbox (subject, payload, headers, available_at)
    SELECT $28::text, $29::bytea, $30::jsonb, statement_timestamp() + make_interval(secs => $27)
    WHERE EXISTS (SELECT 1 FROM changed WHERE id = $31::uuid AND state = 'dispatched')
    RETURNING id)
SELECT w.ids AS written, (SELECT count(*) FROM marked)::integer AS marked,
       (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM recorded) AS outbox_ids,
       (SELECT id FROM work) AS work_id, c.*
FROM (SELECT coalesce(array_agg(id), '{}') AS ids FROM written) w
LEFT JOIN changed c ON c.state <> 'blocked';

-- name: resolver_cancel
UPDATE jobs
SET state = 'cancelled', error = u.reason, finished_at = statement_timestamp(), updated_at = statement_timestamp()
FROM unnest($1::uuid[], $2::text[]) AS u (id, reason)
WHERE jobs.id = u.id AND jobs.state = 'blocked'
RETURNING jobs.id, jobs.queue, jobs.attempt;

-- name: resolver_parents
-- Parents' results of each job, keyed by the parent's ref when both are in
-- one DAG, else by the parent's id.
SELECT d.job_id,
       CASE WHEN p.dag_id IS NOT NULL AND p.dag_id = c.dag_id THEN p.dag_ref
            ELSE p.id::text END AS key,
       p.result
FROM job_deps d
JOIN jobs c ON c.id = d.job_id
JOIN jobs p ON p.id = d.depends_on
WHERE d.job_id = ANY($1::uuid[]);

-- name: resolver_stranded
-- Finished jobs with open edges whose job.finished was never applied (the
-- event aged out of the stream, or was dead-lettered): the backstop sweep.
-- $1: seconds since finishing (leaves the live path alone); $2: how many.
SELECT p.id, p.state
FROM jobs p
WHERE p.id IN (SELECT DISTINCT depends_on FROM job_deps WHERE NOT resolved)
  AND p.state IN ('succeeded', 'failed', 'cancelled')
  AND p.finished_at < statement_timestamp() - make_interval(secs => $1)
ORDER BY p.id
LIMIT $2;

-- name: dag_insert
-- Nothing comes back when an earlier DAG has this idempotency key; a
-- concurrent one with the same key waits here for the first to commit.
INSERT INTO dags (id, name, idempotency_key, nodes, edges)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
RETURNING id;

-- name: dag_by_key
SELECT id FROM dags WHERE idempotency_key = $1;

-- name: dag_get
SELECT id, name, created_at FROM dags WHERE id = $1;

-- name: dag_nodes
SELECT id, dag_ref, state, attempt, error, created_at, started_at, finished_at
FROM jobs WHERE dag_id = $1 ORDER BY id;

-- name: dag_edges
SELECT d.job_id, d.depends_on, d.allow_failure
FROM jobs j JOIN job_deps d ON d.job_id = j.id
WHERE j.dag_id = $1;

-- name: dag_progress
-- A DAG's jobs counted by state, with the first start and last finish of
-- each state, in one aggregate (jobs_dag): what a follower polls, with
-- neither nodes nor edges. No row: no such DAG.
SELECT d.id, d.name, d.created_at, statement_timestamp() AS now, j.state, count(j.id) AS n,
       min(j.started_at) AS started_at, max(j.finished_at) AS finished_at
FROM dags d LEFT JOIN jobs j ON j.dag_id = d.id
WHERE d.id = $1
GROUP BY d.id, j.state;

-- name: dag_lock_open
-- The DAG's unfinished jobs, locked in id order before they are cancelled.
SELECT id FROM jobs WHERE dag_id = $1 AND state = ANY($2::text[]) ORDER BY id FOR UPDATE;

-- name: dag_cancel_jobs
UPDATE jobs
SET state = 'cancelled', finished_at = statement_timestamp(), updated_at = statement_timestamp(),
    error = $2, lease_until = NULL
WHERE id = ANY($1::uuid[]) AND state = ANY($3::text[])
RETURNING id, queue, attempt, delivery;

-- name: resolver_satisfy_succeeded
-- Every open edge out of $1 (jobs that succeeded) is marked resolved; how
-- many per dependent, for write_release. The edges' row locks keep two
-- resolvers from counting one edge twice. No join: nothing in its plan can
-- go wrong on statistics that lag a bulk insert (a fresh 10,000-node DAG).
WITH marked AS (
    UPDATE job_deps SET resolved = true
    WHERE depends_on = ANY($1::uuid[]) AND NOT resolved
    RETURNING job_id)
SELECT job_id, count(*)::integer AS n FROM marked GROUP BY job_id;

-- name: resolver_lock_jobs
-- Jobs $1 locked in id order, as every resolution locks dependents.
SELECT id FROM jobs WHERE id IN (SELECT unnest($1::uuid[])) ORDER BY id FOR UPDATE;
