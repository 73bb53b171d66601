-- Leader leases, judged by the database clock (clock_timestamp(): the time of
-- the statement itself, not of its transaction's start).

-- name: lease_acquire
-- Take the lease when nobody holds it or its holder let it expire; every new
-- holding gets the next epoch. Nothing comes back while another holds it.
INSERT INTO leases (name, holder, epoch, acquired_at, expires_at)
VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE
SET holder = excluded.holder,
    epoch = leases.epoch + 1,
    acquired_at = excluded.acquired_at,
    expires_at = excluded.expires_at
WHERE leases.expires_at <= clock_timestamp()
RETURNING epoch;

-- name: lease_renew
-- Extend a holding that has not expired yet. An expired lease is never
-- renewed: its holder must acquire it again, with a new epoch.
UPDATE leases
SET expires_at = clock_timestamp() + make_interval(secs => $4)
WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()
RETURNING epoch;

-- name: lease_release
-- End a holding now, so a standby takes over without waiting out the TTL.
UPDATE leases SET expires_at = clock_timestamp()
WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp();

-- name: lease_hold
-- First statement of every leader transaction: proves the holding is still
-- current and locks it, so no takeover commits before this transaction does.
SELECT epoch FROM leases
WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()
FOR SHARE;
