-- DAGs: jobs that wait for other jobs.
--
-- A job with dependencies is written 'blocked' with jobs.unmet_deps = its
-- number of edges; the resolver (on job.finished) resolves the edges out of
-- a finished job, decrements its dependents and releases those reaching 0,
-- or cancels them when the parent failed (unless the edge allows failure).

CREATE TABLE dags (
    id               uuid PRIMARY KEY,
    name             text,
    idempotency_key  text,
    nodes            integer NOT NULL,
    edges            integer NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX dags_idempotency_key ON dags (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- No foreign keys: the edges of a 10,000-node DAG are written in one
-- statement inside the admission budget, and each FK costs a trigger per
-- row. Admission checks every id it is given (under FOR SHARE), and jobs are
-- never deleted while their DAG lives.
CREATE TABLE job_deps (
    job_id         uuid NOT NULL,
    depends_on     uuid NOT NULL,
    -- The parent failing or being cancelled counts as satisfied.
    allow_failure  boolean NOT NULL DEFAULT false,
    -- Set, once, by whoever applies the parent's outcome to this edge (the
    -- resolver, or admission for a parent already finished). An edge is
    -- counted in unmet_deps until then; a replayed outcome finds it set.
    resolved       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (job_id, depends_on)
);
-- The resolver's lookup: the unresolved edges out of a finished job.
CREATE INDEX job_deps_open ON job_deps (depends_on) WHERE NOT resolved;

-- A DAG job's local name; results are passed to dependents under it.
ALTER TABLE jobs ADD COLUMN dag_ref text;
CREATE INDEX jobs_dag ON jobs (dag_id, id) WHERE dag_id IS NOT NULL;
