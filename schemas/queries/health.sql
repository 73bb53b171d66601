-- name: health_ping
-- Readiness probe: the ledger answers a query.
SELECT 1;
