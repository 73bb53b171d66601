-- The cascade's walk, defined once for the two statements that use it
-- (resolver_lock_reached, then resolver_open_edges under those locks).
-- The open edges finished jobs reach: those out of them and, through edges
-- that do not allow failure, out of every job a failed one dooms,
-- transitively. Only job_deps is read (the partial index of open edges).
-- finished: jobs that finished; failed: those of them that did not
-- succeed; only: only edges into these jobs (empty: any). Arrays are
-- matched through hashed subqueries: `= ANY(array)` would scan a
-- 10,000-element array per row.
CREATE FUNCTION workron_reached_edges(finished uuid[], failed uuid[], only_into uuid[])
RETURNS TABLE (job_id uuid, depends_on uuid, allow_failure boolean)
LANGUAGE sql STABLE ROWS 1000 AS $$
WITH RECURSIVE edge (job_id, depends_on, allow_failure, doomed) AS (
    SELECT d.job_id, d.depends_on, d.allow_failure,
           NOT d.allow_failure AND d.depends_on IN (SELECT unnest(failed))
    FROM job_deps d
    WHERE d.depends_on = ANY(finished) AND NOT d.resolved
      AND (cardinality(only_into) = 0 OR d.job_id IN (SELECT unnest(only_into)))
    UNION
    -- LATERAL: from each doomed job to its open edges by index, whatever
    -- the planner's statistics say about the work table. OFFSET 0 keeps the
    -- subquery from being flattened into a join: flattened, a planner that
    -- expects few open edges scans all of them once per doomed job
    -- (38 s for a 10,000-node fan in a ledger with 140,000 edges).
    SELECT o.job_id, o.depends_on, o.allow_failure, NOT o.allow_failure
    FROM edge e
    CROSS JOIN LATERAL (
        SELECT d.job_id, d.depends_on, d.allow_failure
        FROM job_deps d
        WHERE d.depends_on = e.job_id AND NOT d.resolved
          AND (cardinality(only_into) = 0 OR d.job_id IN (SELECT unnest(only_into)))
        OFFSET 0
    ) o
    WHERE e.doomed
)
SELECT DISTINCT edge.job_id, edge.depends_on, edge.allow_failure FROM edge
$$;
