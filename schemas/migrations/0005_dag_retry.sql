-- Retrying inside a DAG: a retried job reopens the descendants its failure
-- cancelled, found by walking every edge out of it, resolved ones included
-- (job_deps_open only holds the open ones; the primary key leads with the
-- child). Covering job_id keeps the walk on the index.
CREATE INDEX job_deps_parent ON job_deps (depends_on, job_id);
