"""Heartbeat history: when was each component alive (``heartbeat_history``, migration 0011).

``health:{component}`` in Redis says whether a component is alive *now* (it is written at intake
and expires); this keeps, in the database, the intervals in which it was alive, so that "was the
collector up at 03:12?" has an answer after the fact.

- Every heartbeat taken in (a producer's, at intake, before any commit, so the database being down
  loses nothing of it) and each of ingestd's own replica heartbeats is noted in memory
  (``LivenessRecorder.note``): a heartbeat within ``gap_s`` of an interval extends it, a later one
  opens a new interval. Heartbeats are frequent (one a second per component is usual) and
  carry no data of their own, so they are coalesced: the database sees one statement every
  ``flush_interval_s`` whatever their number, and never a statement in a data batch's
  transaction (a hiccup of the history cannot fail or slow down a batch).
- ``LivenessWriter`` writes what was noted, every ``flush_interval_s``, as one statement under a
  transaction-level advisory lock (replicas take turns, so two of them never open the same
  interval twice): the interval of the table within ``gap_s`` of each noted one is extended, or a
  new row is inserted. While the database is unreachable the intervals wait in memory (at most
  ``max_pending_intervals``, the oldest dropped past it, counted and logged) and are written when
  it returns.
- Readers use the view ``component_liveness`` (rows that overlap merged) or ``history()``; ``ingestd
  stats`` shows each component's newest interval (``collect_section``).
- Retention (the owner's, ``retention.heartbeat_history_days``) deletes intervals whose last
  heartbeat is older than that (ingestd/daemon/maintenance.py).

A heartbeat dated ahead of the host's clock is recorded as taken in now: a wrong clock must not
make a component look alive in the future.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

import asyncpg

from ingestd import errors
from ingestd.daemon.db import Connection

log = logging.getLogger("ingestd.daemon.liveness")

# "ingestd heartbeat history" in the advisory-lock space (hedges 0x1D6E700, gaps 0x1D6E701).
LOCK_ID: Final = 0x1D6E702

# One statement for every noted interval: extend the rows within the gap of each, insert the rest.
# All three parts see the table as it was before the statement, so an interval that matched a row
# is not inserted as well. A noted interval that bridges two rows extends both (they then overlap;
# the view merges them).
_SQL_WRITE: Final = """
WITH noted AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::bigint[])
        AS n(component, first_seen, last_seen, beats)
), hit AS (
    SELECT h.id, min(n.first_seen) AS first_seen, max(n.last_seen) AS last_seen,
           sum(n.beats)::bigint AS beats
    FROM noted n JOIN heartbeat_history h
      ON h.component = n.component
     AND h.last_seen >= n.first_seen - make_interval(secs => $5)
     AND h.first_seen <= n.last_seen + make_interval(secs => $5)
    GROUP BY h.id
), extended AS (
    UPDATE heartbeat_history h
    SET first_seen = least(h.first_seen, hit.first_seen),
        last_seen = greatest(h.last_seen, hit.last_seen),
        beats = h.beats + hit.beats
    FROM hit WHERE h.id = hit.id
    RETURNING h.id
)
INSERT INTO heartbeat_history (component, first_seen, last_seen, beats)
SELECT n.component, n.first_seen, n.last_seen, n.beats FROM noted n
WHERE NOT EXISTS (
    SELECT 1 FROM heartbeat_history h
    WHERE h.component = n.component
      AND h.last_seen >= n.first_seen - make_interval(secs => $5)
      AND h.first_seen <= n.last_seen + make_interval(secs => $5))
"""

_SQL_HISTORY: Final = """
SELECT component, alive_from, alive_until, beats FROM component_liveness
WHERE ($1::text IS NULL OR component = $1) AND alive_until >= $2
ORDER BY component, alive_from
"""

# Each component's newest interval, and how many intervals the table keeps for it.
_SQL_NEWEST: Final = """
WITH l AS (SELECT * FROM component_liveness)
SELECT DISTINCT ON (component) component, alive_from, alive_until, beats,
       count(*) OVER (PARTITION BY component) AS intervals,
       extract(epoch FROM now() - alive_until)::float8 AS age_s
FROM l
ORDER BY component, alive_until DESC
LIMIT $1
"""


@dataclasses.dataclass(slots=True)
class Interval:
    """A component alive from ``first`` to ``last`` (heartbeat times), ``beats`` heartbeats."""

    first: dt.datetime
    last: dt.datetime
    beats: int = 1


class LivenessRecorder:
    """The heartbeats taken in, coalesced into intervals per component until written."""

    def __init__(
        self,
        *,
        gap_s: float,
        max_intervals: int,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.gap = dt.timedelta(seconds=gap_s)
        self.max_intervals = max_intervals
        self._clock = clock
        self._pending: dict[str, list[Interval]] = {}
        self._count = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Intervals waiting to be written."""
        return self._count

    def note(self, component: str, moment: dt.datetime) -> None:
        """A heartbeat of ``component`` at ``moment`` (its event time) was taken in."""
        now = self._clock()
        moment = min(moment, now)
        intervals = self._pending.setdefault(component, [])
        # Heartbeats come in order almost always: the newest interval is the one to extend.
        for iv in reversed(intervals):
            if iv.first - self.gap <= moment <= iv.last + self.gap:
                iv.first = min(iv.first, moment)
                iv.last = max(iv.last, moment)
                iv.beats += 1
                return
        intervals.append(Interval(moment, moment))
        self._count += 1
        if self._count > self.max_intervals:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        # The oldest interval of all: what is lost is the furthest past.
        component = min(self._pending, key=lambda c: min(iv.first for iv in self._pending[c]))
        intervals = self._pending[component]
        oldest = min(range(len(intervals)), key=lambda i: intervals[i].first)
        del intervals[oldest]
        if not intervals:
            del self._pending[component]
        self._count -= 1
        self.dropped += 1

    def take(self) -> dict[str, list[Interval]]:
        """Everything noted so far (the recorder starts empty again)."""
        taken, self._pending, self._count = self._pending, {}, 0
        return taken

    def give_back(self, taken: dict[str, list[Interval]]) -> None:
        """Intervals whose write failed: merged back, to go with the next write."""
        for component, intervals in taken.items():
            mine = self._pending.get(component, [])
            merged = _merged([*mine, *intervals], self.gap)
            self._count += len(merged) - len(mine)
            self._pending[component] = merged
        while self._count > self.max_intervals:
            self._drop_oldest()


def _merged(intervals: Sequence[Interval], gap: dt.timedelta) -> list[Interval]:
    """Intervals within ``gap`` of each other merged, in time order."""
    out: list[Interval] = []
    for iv in sorted(intervals, key=lambda i: i.first):
        if out and iv.first <= out[-1].last + gap:
            out[-1] = Interval(out[-1].first, max(out[-1].last, iv.last), out[-1].beats + iv.beats)
        else:
            out.append(Interval(iv.first, iv.last, iv.beats))
    return out


async def write_intervals(
    conn: Connection, taken: dict[str, list[Interval]], *, gap_s: float
) -> int:
    """Write the noted intervals in one transaction, replicas taking turns; rows noted."""
    gap = dt.timedelta(seconds=gap_s)
    components: list[str] = []
    firsts: list[dt.datetime] = []
    lasts: list[dt.datetime] = []
    beats: list[int] = []
    for component in sorted(taken):
        for iv in _merged(taken[component], gap):
            components.append(component)
            firsts.append(iv.first)
            lasts.append(iv.last)
            beats.append(iv.beats)
    if not components:
        return 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
        await conn.execute(_SQL_WRITE, components, firsts, lasts, beats, gap_s)
    return len(components)


class LivenessWriter:
    """Writes the recorder's intervals every ``flush_interval_s`` (see the module doc)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        recorder: LivenessRecorder,
        *,
        gap_s: float,
        flush_interval_s: float,
        acquire_timeout_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.recorder = recorder
        self.gap_s = gap_s
        self.flush_interval_s = flush_interval_s
        self.acquire_timeout_s = acquire_timeout_s
        self._failing = False
        self._dropped_said = 0

    async def run(self) -> None:
        """Forever: one write per interval; a failed write keeps its intervals for the next."""
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()

    async def flush(self) -> bool:
        """Write what was noted; False (intervals kept for the next write) when it failed."""
        taken = self.recorder.take()
        if not taken:
            return True
        try:
            async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
                await write_intervals(conn, taken, gap_s=self.gap_s)
        except asyncio.CancelledError:
            # A stop: what this write held goes with the final one (Service.stop).
            self.recorder.give_back(taken)
            raise
        except Exception as exc:  # noqa: BLE001 - kept and retried; never die silently
            self.recorder.give_back(taken)
            if not self._failing:
                self._failing = True
                log.log(
                    logging.WARNING if errors.is_retriable(exc) else logging.ERROR,
                    "writing the heartbeat history failed (kept in memory, retried): %s: %s",
                    type(exc).__name__,
                    exc,
                    extra={"action": "heartbeat_history_failed"},
                )
            return False
        if self._failing:
            self._failing = False
            log.info(
                "heartbeat history written again", extra={"action": "heartbeat_history_recovered"}
            )
        if self.recorder.dropped > self._dropped_said:
            log.warning(
                "%d heartbeat interval(s) dropped from memory while the database was unreachable "
                "(heartbeat_history.max_pending_intervals)",
                self.recorder.dropped - self._dropped_said,
                extra={"action": "heartbeat_history_dropped"},
            )
            self._dropped_said = self.recorder.dropped
        return True


@dataclasses.dataclass(frozen=True, slots=True)
class Alive:
    """One interval in which a component was alive (overlapping rows merged)."""

    component: str
    alive_from: dt.datetime
    alive_until: dt.datetime
    beats: int


async def history(
    conn: Connection, *, component: str | None = None, since: dt.datetime | None = None
) -> list[Alive]:
    """The liveness intervals (of one component, or all) that reach ``since`` or later."""
    start = since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    rows = await conn.fetch(_SQL_HISTORY, component, start)
    return [Alive(r["component"], r["alive_from"], r["alive_until"], r["beats"]) for r in rows]


# --- ingestd stats: the "component liveness" section ----------------------------------------------


async def collect_section(conn: Connection, *, alive_within_s: float) -> dict[str, Any] | None:
    """Each component's newest liveness interval, for ``ingestd stats`` (None: no such table).

    A component counts as alive when its last heartbeat is at most ``alive_within_s`` old (the
    gap limit plus the write interval: the table lags the heartbeats by up to one write).
    """
    if not await conn.fetchval("SELECT to_regclass('component_liveness') IS NOT NULL"):
        return None
    rows = await conn.fetch(_SQL_NEWEST, 200)
    return {
        "alive_within_s": alive_within_s,
        "components": [
            {
                "component": r["component"],
                "alive": r["age_s"] <= alive_within_s,
                "alive_from": r["alive_from"],
                "last_seen": r["alive_until"],
                "last_seen_age_s": round(r["age_s"], 1),
                "beats": r["beats"],
                "intervals": r["intervals"],
            }
            for r in rows
        ],
    }
