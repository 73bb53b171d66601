-- name: dispatcher_take_batch
-- One round trip to start a batch: its report ids $2 recorded in the inbox
-- of consumer $1 (ids seen before come back as nothing, so a redelivered
-- report never applies twice), then the jobs $3 the reports touch, locked
-- in id order (two dispatchers applying overlapping batches wait for each
-- other instead of deadlocking). The inbox goes first, as it would in two
-- statements: it is the outer side of a join with no clause, which only a
-- nested loop can run, outer side first. Every row carries the new ids;
-- one row with no job when no job is found.
-- waiters: the jobs that depend on it through open edges (an admission
-- adding one later waits for this lock, then resolves the edge itself).
-- next_*: the row of its only waiter, if it has one and the job is among
-- $4 (those the batch reports succeeded), as the work message needs it,
-- with whether it is due and its parents' ids, keys (as in
-- resolver_parents) and results, for the caller to build the work message
-- before the statement that releases it. The waiter is locked, or skipped
-- if another transaction holds it: with its parents and itself locked, its
-- release is certain once this transaction commits, so the caller may
-- publish the message before then (no outcome of it can be recorded
-- sooner; write_release still writes it only if the release happens as
-- foreseen). Read once per waiter (on the first of its parents in the
-- batch), and only for a waiter that this batch could release (no more
-- edges unmet than jobs in the batch): a fan-in's sink, waiting on
-- thousands, is not read for each of them.
WITH recorded AS (
    INSERT INTO inbox (consumer, msg_id)
    SELECT $1, m FROM unnest($2::text[]) AS t(m)
    ON CONFLICT DO NOTHING
    RETURNING msg_id)
SELECT new.ids AS new_ids, j.*, n.*
FROM (SELECT coalesce(array_agg(msg_id), '{}') AS ids FROM recorded) new
LEFT JOIN (
    SELECT l.*,
           cardinality(l.waiters) = 1 AND l.id = ANY($4::uuid[])
               AND row_number() OVER (PARTITION BY l.waiters[1] ORDER BY l.id) = 1 AS foresee
    FROM (
        SELECT id, queue, state, attempt, delivery, max_attempts, backoff, run_at,
               worker_id, started_at, finished_at, error,
               ARRAY(SELECT d.job_id FROM job_deps d
                     WHERE d.depends_on = jobs.id AND NOT d.resolved) AS waiters
        FROM jobs
        WHERE id = ANY($3::uuid[])
        ORDER BY id
        FOR UPDATE) l) j ON true
LEFT JOIN LATERAL (
    SELECT c.id AS next_id, c.state AS next_state, c.unmet_deps AS next_unmet,
           c.run_at <= statement_timestamp() AS next_due, c.queue AS next_queue, c.priority AS next_priority,
           c.run_at AS next_run_at, c.attempt AS next_attempt,
           c.max_attempts AS next_max_attempts, c.task AS next_task,
           c.payload AS next_payload, c.command AS next_command, c.shell AS next_shell,
           c.timeout_s AS next_timeout_s, c.checkpoint AS next_checkpoint,
           c.traceparent AS next_traceparent, p.ids AS next_parent_ids,
           p.keys AS next_parent_keys, p.results AS next_parent_results
    FROM jobs c
    CROSS JOIN LATERAL (
        SELECT array_agg(pj.id) AS ids,
               array_agg(CASE WHEN pj.dag_id IS NOT NULL AND pj.dag_id = c.dag_id
                              THEN pj.dag_ref ELSE pj.id::text END) AS keys,
               array_agg(coalesce(pj.result::text, 'null')) AS results
        FROM job_deps d JOIN jobs pj ON pj.id = d.depends_on
        WHERE d.job_id = c.id) p
    WHERE j.foresee AND c.id = j.waiters[1]
      AND c.unmet_deps <= cardinality($3::uuid[])
    FOR UPDATE OF c SKIP LOCKED) n ON true;

-- name: dispatcher_count
INSERT INTO counters (name, value) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value;

-- name: dispatcher_take_due
-- Pending jobs whose time has come, best first; rows another dispatcher is
-- taking are skipped. Callers re-sort: RETURNING keeps no order.
WITH due AS (
    SELECT id FROM jobs
    WHERE state = 'pending' AND run_at <= statement_timestamp()
    ORDER BY priority DESC, run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
UPDATE jobs
SET state = 'dispatched', dispatched_at = statement_timestamp(), delivery = 0, updated_at = statement_timestamp()
FROM due
WHERE jobs.id = due.id AND jobs.state = 'pending'
RETURNING jobs.id, jobs.queue, jobs.priority, jobs.run_at, jobs.attempt, jobs.max_attempts,
          jobs.task, jobs.payload, jobs.command, jobs.shell, jobs.timeout_s,
          jobs.checkpoint, jobs.traceparent;

-- name: dispatcher_next_due
-- Seconds until the earliest pending job falls due (negative: overdue), or
-- NULL when nothing is pending. Answered from jobs_pending_run_at.
SELECT extract(epoch FROM min(run_at) - statement_timestamp())::float8 FROM jobs WHERE state = 'pending';

-- name: dispatcher_inbox_prune
-- A bounded batch of this consumer's inbox rows older than $2 seconds.
WITH gone AS (
    DELETE FROM inbox
    WHERE consumer = $1 AND msg_id IN (
        SELECT msg_id FROM inbox
        WHERE consumer = $1 AND processed_at < statement_timestamp() - make_interval(secs => $2)
        ORDER BY processed_at
        LIMIT $3)
    RETURNING 1)
SELECT count(*) FROM gone;

-- name: dispatcher_record
-- The history rows of a batch ($1-$6, as job_events_insert) and its outbox
-- rows ($7-$10, as outbox_insert) in one round trip: the last statement
-- before the commit of every DAG hop.
WITH history AS (
    INSERT INTO job_events (job_id, kind, attempt, delivery, worker_id, detail)
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::integer[], $4::integer[], $5::text[],
                         $6::text[]))
INSERT INTO outbox (subject, payload, headers, available_at)
SELECT s, p, h, statement_timestamp() + make_interval(secs => $10)
FROM unnest($7::text[], $8::bytea[], $9::jsonb[]) AS t(s, p, h)
RETURNING id;
