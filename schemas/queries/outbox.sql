-- name: outbox_insert
-- $4: seconds the writer keeps the rows to publish them itself (0: relay now).
INSERT INTO outbox (subject, payload, headers, available_at)
SELECT s, p, h, statement_timestamp() + make_interval(secs => $4)
FROM unnest($1::text[], $2::bytea[], $3::jsonb[]) AS t(s, p, h)
RETURNING id;

-- name: outbox_delete
DELETE FROM outbox WHERE id = ANY($1::bigint[]);

-- name: outbox_claim
-- Rows that are due, oldest first; rows another relay holds are skipped, and
-- rows committed out of id order are found because nothing is remembered
-- between claims.
SELECT id, subject, payload, headers
FROM outbox
WHERE NOT dead AND available_at <= statement_timestamp()
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: outbox_set_aside
-- A poison row: kept for inspection, never retried.
UPDATE outbox SET dead = true, attempts = attempts + 1, last_error = t.reason
FROM unnest($1::bigint[], $2::text[]) AS t(id, reason)
WHERE outbox.id = t.id;

-- name: outbox_retry_later
UPDATE outbox
SET attempts = attempts + 1, available_at = statement_timestamp() + make_interval(secs => least(30, attempts + 1))
WHERE id = ANY($1::bigint[]);

-- name: outbox_next_due
SELECT min(available_at) - statement_timestamp() FROM outbox WHERE NOT dead;

-- name: dead_letter_insert
INSERT INTO dead_letters (source, subject, msg_id, reason, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[]);
