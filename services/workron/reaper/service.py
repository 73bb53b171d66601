"""The reaper: a leader-elected singleton that takes back what failures leave.

Run several for availability; one leads (``leases.LeaderLease`` "reaper",
TTL ``lease_ttl_s``, renewed every ``renew_s``), the others stand by and take
over within a few seconds of its death. Loops, supervised together:

- ``lease``: acquire or renew the lease. The leader alone listens to
  worker heartbeats (``bus.HEARTBEAT_SUBJECTS``): the process that judges
  workers dead is the one that hears them, so it knows when it could not.
- ``heartbeats``: record each batch of heartbeats (workers' rows, ledger
  lease renewals) in one transaction and reply with the executions to stop.
- ``scan``: every ``scan_s`` while leading: workers that missed
  ``misses`` heartbeats are dead; the running jobs of dead and stopped
  workers, and jobs whose ledger lease expired, get a new attempt (or fail)
  by the retry policy; every ``lost_scan_s``, jobs whose work message
  JetStream lost are dispatched again and missing streams rebuilt.
- ``advisories``: every reaper (queue group) records JetStream's
  max-delivery and termination advisories as dead letters.

Judging needs hearing: the leader declares nobody dead, and no lease
expired, until it has heard heartbeats without a gap (subscription up,
recording succeeding, connection unbroken) for as long as that judgment
needs. So a new leader, a ledger outage or a reconnect never turns silence
it could not hear into deaths.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from uuid import UUID

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from workron import bus, outbox
from workron._service import supervise
from workron._wake import sleep
from workron.errors import LedgerUnavailableError, ValidationError
from workron.leases import LeaderLease, LeadershipLostError
from workron.ledger import Pool, ledger_errors, queries
from workron.liveness import Heartbeat, HeartbeatReply
from workron.reaper import advisories, heartbeats, lost, orphans
from workron.telemetry import Metrics

__all__ = ["LEASE_NAME", "Reaper", "Round"]

log = logging.getLogger(__name__)

LEASE_NAME = "reaper"
_NOT_LEADER = HeartbeatReply(error="this reaper does not lead any more")


@dataclass(frozen=True, slots=True)
class Round:
    """What one ``run_until_idle`` did."""

    leading: bool
    heartbeats: int = 0
    dead_letters: int = 0
    dead: tuple[str, ...] = ()
    reaped: int = 0
    waiting: int = 0
    redispatched: int = 0


class Reaper:
    """Dead workers, expired leases, lost messages and dead letters."""

    name = "reaper"

    def __init__(
        self,
        pool: Pool,
        nc: NATS,
        metrics: Metrics,
        *,
        holder: str | None = None,
        lease_ttl_s: float = 5.0,
        renew_s: float = 1.5,
        scan_s: float = 1.0,
        misses: int = bus.HEARTBEAT_MISSES,
        judge_leases_after_s: float = bus.HEARTBEAT_S * bus.HEARTBEAT_MISSES,
        lost_after_s: float = 2 * bus.LEASE_S,
        lost_scan_s: float = 10.0,
        max_redispatch: int = 3,
        batch: int = 500,
        workers_keep_s: float = 86400.0,
        record_timeout_s: float = 1.0,
        report_wait_s: float = 2 * bus.LEASE_S,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._js = nc.jetstream()
        self._metrics = metrics
        self.lease = LeaderLease(pool, LEASE_NAME, holder=holder, ttl_s=lease_ttl_s)
        self._renew_s = renew_s
        self._scan_s = scan_s
        self._misses = misses
        self._judge_leases_after_s = judge_leases_after_s
        self._lost_after_s = lost_after_s
        self._lost_scan_s = lost_scan_s
        self._max_redispatch = max_redispatch
        self._batch = batch
        self._workers_keep_s = workers_keep_s
        self._record_timeout_s = record_timeout_s
        self._report_wait_s = report_wait_s
        self._rng = rng
        self._stop = asyncio.Event()
        self._beats: list[Msg] = []
        self._beat = asyncio.Event()
        self._advisories: list[advisories.Advisory] = []
        self._advisory = asyncio.Event()
        self._hb_sub: Subscription | None = None
        self._hearing_since: float | None = None
        self._reconnects = 0
        #: Orphan → (REPORTS sequence, time) when first seen (see orphans.py).
        self._marks: dict[UUID, tuple[int, float]] = {}
        self._next_lost = 0.0
        #: Advisories handled (recorded, or skipped as recorded elsewhere).
        self.advisories_handled = 0

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        subs = await self._watch_advisories()
        try:
            await supervise(
                self.name,
                {
                    "lease": self._lease_loop(),
                    "heartbeats": self._heartbeat_loop(),
                    "scan": self._scan_loop(),
                    "advisories": self._advisory_loop(),
                },
                self._stop,
            )
        finally:
            for sub in subs:
                await _unsubscribe(sub)
            await self._deafen()
            try:
                await self.lease.release()  # a standby takes over at once
            except LedgerUnavailableError:
                log.warning("lease not released", extra={"action": "reaper.release"})
            self._metrics.leader.labels(service=self.name).set(0)

    def stop(self) -> None:
        self._stop.set()
        self._beat.set()
        self._advisory.set()

    async def run_until_idle(self) -> Round:
        """One round, for tests: lead if the lease is free, record what is
        waiting, then scan once (lost messages included). Heartbeats are
        heard during the round only: workers get "no responders" after it."""
        try:
            if not await self.lead_once():
                return Round(leading=False)
            beats, self._beats = self._beats, []
            letters, self._advisories = self._advisories, []
            if beats:
                await self._record(beats)
            recorded = await advisories.record(self._pool, self._js, letters) if letters else 0
            dead, reaped, redispatched = await self.scan(lost_too=True)
        finally:
            await self._deafen()
        return Round(
            True, len(beats), recorded, dead, len(reaped.taken), reaped.waiting, redispatched
        )

    # -- leadership ------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while not self._stop.is_set():
            await self.lead_once()
            await sleep(self._renew_s, self._stop)

    async def lead_once(self) -> bool:
        """Acquire or renew the lease; listen to heartbeats while leading."""
        try:
            if self.lease.epoch is None:
                await self.lease.acquire()
            else:
                await self.lease.renew()
        except LedgerUnavailableError as exc:
            log.warning("lease not renewed", extra={"action": "reaper.lease", "error": str(exc)})
            if not self.lease.leading:
                self.lease.lose("ledger unavailable for longer than the lease")
        leading = self.lease.leading
        if leading and self._hb_sub is None:
            await self._listen()
        elif not leading and self._hb_sub is not None:
            await self._deafen()
        self._metrics.leader.labels(service=self.name).set(1 if leading else 0)
        return leading

    async def _listen(self) -> None:
        try:
            self._hb_sub = await self._nc.subscribe(
                bus.HEARTBEAT_SUBJECTS, queue=bus.REAPER_QUEUE_GROUP, cb=self._on_beat
            )
        except NatsError as exc:
            log.warning(
                "heartbeats not heard", extra={"action": "reaper.listen", "error": str(exc)}
            )
            return
        self._hearing_since = asyncio.get_running_loop().time()
        self._reconnects = self._nc.stats["reconnects"]
        log.info("leading: listening to heartbeats", extra={"action": "reaper.lead"})

    async def _deafen(self) -> None:
        sub, self._hb_sub = self._hb_sub, None
        self._hearing_since = None
        if sub is not None:
            await _unsubscribe(sub)
        beats, self._beats = self._beats, []
        await self._respond(beats, [_NOT_LEADER] * len(beats))

    async def _hearing_for(self) -> float:
        """Seconds heartbeats have been heard without a gap (0: not now)."""
        loop = asyncio.get_running_loop()
        if self._hb_sub is None or self._hearing_since is None:
            return 0.0
        reconnects = self._nc.stats["reconnects"]
        if reconnects != self._reconnects:  # heartbeats sent meanwhile were lost
            self._reconnects = reconnects
            self._hearing_since = loop.time()
        try:
            await self._nc.flush(timeout=1)  # a round trip: the connection works now
        except (NatsError, TimeoutError):
            self._hearing_since = None
            return 0.0
        return loop.time() - self._hearing_since

    # -- heartbeats -------------------------------------------------------------

    async def _on_beat(self, msg: Msg) -> None:
        self._beats.append(msg)
        self._beat.set()

    async def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            await sleep(self._renew_s, self._beat, self._stop)
            self._beat.clear()
            beats, self._beats = self._beats, []
            if beats:
                await self._record(beats)

    async def _record(self, msgs: list[Msg]) -> None:
        decoded = [heartbeats.decode(m.data) for m in msgs]
        replies = [HeartbeatReply(error=d) if isinstance(d, str) else None for d in decoded]
        beats = [(i, d) for i, d in enumerate(decoded) if isinstance(d, Heartbeat)]
        if not self.lease.leading:
            await self._respond(msgs, [_NOT_LEADER] * len(msgs))
            return
        if not beats:
            await self._respond(msgs, [r or _NOT_LEADER for r in replies])
            return
        try:
            async with asyncio.timeout(self._record_timeout_s):
                recorded = await heartbeats.record(self._pool, [b for _, b in beats], bus.LEASE_S)
        except ValidationError as exc:  # decoding lets nothing through the ledger refuses
            log.error("heartbeats refused", extra={"action": "reaper.hb", "error": str(exc)})
            await self._respond(msgs, [r or HeartbeatReply(error=str(exc)) for r in replies])
            return
        except (LedgerUnavailableError, TimeoutError) as exc:
            # Heard, not recorded: judge nobody until hearing is whole again.
            self._hearing_since = None
            log.warning(
                "heartbeats not recorded", extra={"action": "reaper.hb", "error": repr(exc)}
            )
            error = HeartbeatReply(error="the ledger is unavailable")
            await self._respond(msgs, [r or error for r in replies])
            return
        if self._hearing_since is None and self._hb_sub is not None:
            self._hearing_since = asyncio.get_running_loop().time()
        for (position, _), reply in zip(beats, recorded.replies, strict=True):
            replies[position] = reply
        await self._respond(msgs, [r or _NOT_LEADER for r in replies])

    async def _respond(self, msgs: list[Msg], replies: list[HeartbeatReply]) -> None:
        for msg, reply in zip(msgs, replies, strict=True):
            if not msg.reply:
                continue
            try:
                await msg.respond(heartbeats.encode_reply(reply))
            except NatsError:
                log.debug("heartbeat reply lost", extra={"action": "reaper.hb.reply"})

    # -- the scan ----------------------------------------------------------------

    async def _scan_loop(self) -> None:
        while not self._stop.is_set():
            if self.lease.leading:
                try:
                    await self.scan()
                except LeadershipLostError as exc:
                    log.warning("deposed", extra={"action": "reaper.deposed", "error": str(exc)})
                    await self._deafen()
                except LedgerUnavailableError as exc:
                    log.warning("scan failed", extra={"action": "reaper.scan", "error": str(exc)})
                except (NatsError, TimeoutError) as exc:
                    log.warning("scan failed", extra={"action": "reaper.scan", "error": repr(exc)})
            await sleep(self._scan_s, self._stop)

    async def scan(self, *, lost_too: bool = False) -> tuple[tuple[str, ...], orphans.Reaped, int]:
        """One pass of the leader's duties: (workers found dead, orphans, re-dispatched)."""
        hearing = await self._hearing_for()
        dead = await orphans.mark_dead(self.lease, self._misses, hearing)
        for row in dead:
            log.warning(
                "worker dead",
                extra={"action": "reaper.worker.dead", "worker_id": row["id"]},
            )
        backlog = await orphans.reports_backlog(self._js)
        reaped = await orphans.reap(
            self.lease,
            backlog,
            self._marks,
            judge_leases=hearing >= self._judge_leases_after_s,
            unknown_after_s=self._judge_leases_after_s,
            batch=self._batch,
            max_wait_s=self._report_wait_s,
            rng=self._rng,
        )
        await self._after_reap(reaped)
        redispatched = 0
        now = asyncio.get_running_loop().time()
        if lost_too or now >= self._next_lost:
            self._next_lost = now + self._lost_scan_s
            redispatched = await self._lost_scan()
        return tuple(r["id"] for r in dead), reaped, redispatched

    async def _after_reap(self, reaped: orphans.Reaped) -> None:
        if reaped.finished:
            await outbox.publish_own(self._pool, self._js, reaped.finished)
        for orphan, decision in reaped.taken:
            self._metrics.reaped.labels(why=orphan.why).inc()
            if orphan.ack:
                # The superseded message must never run again: ack it on the
                # dead holder's behalf (a lost ack only costs a stop later).
                try:
                    await self._nc.publish(orphan.ack, b"+ACK")
                except NatsError:
                    log.debug("old delivery not acked", extra={"action": "reaper.ack"})
            log.warning(
                "job taken back",
                extra={
                    "action": "reaper.requeue",
                    "job_id": str(orphan.id),
                    "why": orphan.why,
                    "outcome": decision.kind,
                    "worker_id": orphan.worker_id,
                },
            )

    async def _lost_scan(self) -> int:
        async with ledger_errors():
            queues = [r["queue"] for r in await self._pool.fetch(queries()["reaper_queues"])]
        await lost.ensure_contracts(self._js, queues)
        found = await lost.find_lost(
            self._pool,
            self._js,
            older_than_s=self._lost_after_s,
            max_redispatch=self._max_redispatch,
        )
        async with self.lease.transaction() as conn:
            await conn.execute(queries()["reaper_workers_prune"], self._workers_keep_s)
            states = await conn.fetch(queries()["reaper_workers_by_state"])
        for state in ("alive", "draining", "dead", "stopped"):
            count = next((r["n"] for r in states if r["state"] == state), 0)
            self._metrics.workers.labels(state=state).set(count)
        if not (found.again or found.give_up):
            return 0
        done = await lost.redispatch(self.lease, found)
        if done.finished:
            await outbox.publish_own(self._pool, self._js, done.finished)
        self._metrics.reaped.labels(why="message_lost").inc(len(done.again) + len(done.failed))
        return len(done.again)

    # -- advisories ---------------------------------------------------------------

    async def _watch_advisories(self) -> list[Subscription]:
        return [
            await self._nc.subscribe(subject, queue=bus.REAPER_QUEUE_GROUP, cb=self._on_advisory)
            for subject in (bus.ADVISORY_MAX_DELIVERIES, bus.ADVISORY_TERMINATED)
        ]

    async def _on_advisory(self, msg: Msg) -> None:
        if (advisory := advisories.parse(msg.subject, msg.data)) is not None:
            self._advisories.append(advisory)
            self._advisory.set()

    async def _advisory_loop(self) -> None:
        while not self._stop.is_set():
            await sleep(self._renew_s, self._advisory, self._stop)
            self._advisory.clear()
            batch, self._advisories = self._advisories, []
            if not batch:
                continue
            try:
                recorded = await advisories.record(self._pool, self._js, batch)
            except LedgerUnavailableError as exc:
                # Kept, not lost: an advisory is never sent again.
                self._advisories[:0] = batch
                log.warning(
                    "dead letters not recorded", extra={"action": "reaper.dl", "error": str(exc)}
                )
                await sleep(1.0, self._stop)
                continue
            self.advisories_handled += len(batch)
            self._metrics.dead_letters.labels(source="advisory").inc(recorded)


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except NatsError:
        log.debug("unsubscribe failed", extra={"action": "reaper.unsubscribe"})
