"""Producer gaps: the ``seq`` values a producer's session skipped, recorded in ``producer_gaps``.

A producer may number its events (``seq``, from 0 up, within one run of it, named by
``session``). ingestd works out which numbers never arrived from the database, not from what one
replica sees (with several replicas each sees only part of the stream):

- every committed batch records, in its own transaction, the runs of consecutive seqs it held per
  (producer, session) in ``producer_seq_ranges`` (``record_ranges``): a seq is recorded exactly
  when its event's row is committed or found already stored (a dead letter's data did not land:
  its number stays missing);
- a sweep (``GapSweeper``), one replica at a time under a transaction-level advisory lock, merges
  each session's runs into the fewest rows; a hole between two of them is a gap once the seqs
  above it have been recorded for ``grace_s`` (a batch of another replica, or a stream entry being
  reclaimed from a dead replica, may still bring them). A gap is a ``producer_gaps`` row (first
  and last missing seq, ``detected_at``), closed (``closed_at``) when all of its seqs have arrived.
- a new session starts afresh: a producer restart is never a gap, and neither are the seqs
  below a session's first one (ingestd cannot know where a run starts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

import asyncpg

from ingestd import errors
from ingestd.daemon.db import Connection

if TYPE_CHECKING:
    from ingestd.daemon.metrics import Metrics
    from ingestd.wire.events import Event

log = logging.getLogger("ingestd.daemon.gaps")

# "ingestd producer gaps" in the advisory-lock space (hedges use 0x1D6E700).
LOCK_ID: Final = 0x1D6E701

# clock_timestamp(), not the transaction's start: a batch whose transaction waited long must not
# make the holes below its seqs look old already (the grace period counts from about its commit).
_SQL_RECORD: Final = """
INSERT INTO producer_seq_ranges
    (producer, session, first_seq, last_seq, recorded_at, last_recorded_at)
SELECT p, s, f, l, clock_timestamp(), clock_timestamp()
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(p, s, f, l)
"""

# Sessions to look at: more than one run (to merge, or with a hole), or an open gap.
_SQL_SESSIONS: Final = """
SELECT producer, session FROM producer_seq_ranges GROUP BY producer, session HAVING count(*) > 1
UNION
SELECT producer, session FROM producer_gaps WHERE closed_at IS NULL
"""

_SQL_RANGES: Final = """
SELECT id, first_seq, last_seq, recorded_at,
       coalesce(last_recorded_at, recorded_at) AS last_recorded_at
FROM producer_seq_ranges
WHERE producer = $1 AND session = $2 ORDER BY first_seq, last_seq
"""

_SQL_REPLACE: Final = """
WITH gone AS (DELETE FROM producer_seq_ranges WHERE id = ANY($3::bigint[]))
INSERT INTO producer_seq_ranges
    (producer, session, first_seq, last_seq, recorded_at, last_recorded_at)
SELECT $1, $2, f, l, r, n
FROM unnest($4::bigint[], $5::bigint[], $6::timestamptz[], $7::timestamptz[]) AS u(f, l, r, n)
"""

_SQL_OPEN_GAPS: Final = """
SELECT id, first_missing, last_missing FROM producer_gaps
WHERE producer = $1 AND session = $2 AND closed_at IS NULL
"""

_SQL_OPEN_GAP: Final = """
INSERT INTO producer_gaps (producer, session, first_missing, last_missing) VALUES ($1, $2, $3, $4)
ON CONFLICT ON CONSTRAINT producer_gaps_one DO NOTHING
RETURNING id
"""

_SQL_CLOSE_GAP: Final = """
UPDATE producer_gaps SET closed_at = greatest(now(), detected_at)
WHERE id = $1 AND closed_at IS NULL
"""

SQL_COUNT_OPEN: Final = "SELECT count(*) FROM producer_gaps WHERE closed_at IS NULL"

SQL_LIST_OPEN: Final = """
SELECT producer, session, first_missing, last_missing, detected_at FROM producer_gaps
WHERE closed_at IS NULL ORDER BY detected_at, producer, session, first_missing
"""


def runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted runs of consecutive values: ``[5, 1, 2, 3, 3]`` -> ``[(1, 3), (5, 5)]``."""
    out: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


async def record_ranges(conn: Connection, batch: Iterable[Event | None]) -> None:
    """Record the batch's seq runs per (producer, session), in the caller's transaction."""
    by_session: dict[tuple[str, str], list[int]] = {}
    for ev in batch:
        if ev is not None and ev.seq is not None:
            by_session.setdefault((ev.producer or "", ev.session or ""), []).append(ev.seq)
    if not by_session:
        return
    producers: list[str] = []
    sessions: list[str] = []
    firsts: list[int] = []
    lasts: list[int] = []
    for (producer, session), seqs in by_session.items():
        for first, last in runs(seqs):
            producers.append(producer)
            sessions.append(session)
            firsts.append(first)
            lasts.append(last)
    await conn.execute(_SQL_RECORD, producers, sessions, firsts, lasts)


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """Seqs ``first..last`` recorded, the earliest of them at ``recorded_at`` and the newest at
    ``last_recorded_at`` (retention keeps a session's ranges while it is recent)."""

    first: int
    last: int
    recorded_at: dt.datetime
    last_recorded_at: dt.datetime | None = None


def merge(ranges: Sequence[Range]) -> list[Range]:
    """Overlapping and adjacent ranges merged (input sorted by ``first``)."""
    out: list[Range] = []
    for r in ranges:
        if out and r.first <= out[-1].last + 1:
            prev = out[-1]
            out[-1] = Range(
                prev.first,
                max(prev.last, r.last),
                min(prev.recorded_at, r.recorded_at),
                _latest(prev.last_recorded_at, r.last_recorded_at),
            )
        else:
            out.append(r)
    return out


def _latest(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


@dataclasses.dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did: open gaps after it, and the gaps it opened and closed."""

    open: int
    opened: list[tuple[str, str, int, int]]
    closed: int


class GapSweeper:
    """Merges the recorded runs and opens and closes ``producer_gaps`` rows, every interval."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        grace_s: float,
        interval_s: float,
        acquire_timeout_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.acquire_timeout_s = acquire_timeout_s

    async def run(self) -> None:
        """Forever: one sweep per interval; a failed sweep is logged and retried next time."""
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval_s)

    async def run_once(self) -> Sweep | None:
        """One sweep (None when it failed)."""
        try:
            result = await self._sweep()
        except Exception as exc:  # noqa: BLE001 - the next sweep retries; never die silently
            log.log(
                logging.WARNING if errors.is_retriable(exc) else logging.ERROR,
                "producer gap sweep failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"action": "gap_sweep_failed"},
            )
            return None
        self.metrics.producer_gaps_open = result.open
        for producer, session, first, last in result.opened:
            log.warning(
                "producer gap: %s (session %s) skipped seq %d to %d (%d events)",
                producer or "(none)",
                session or "(none)",
                first,
                last,
                last - first + 1,
                extra={"action": "producer_gap"},
            )
        if result.closed:
            log.info(
                "%d producer gap(s) closed: their late events arrived",
                result.closed,
                extra={"action": "producer_gap_closed"},
            )
        return result

    async def _sweep(self) -> Sweep:
        opened: list[tuple[str, str, int, int]] = []
        closed = 0
        async with (
            self.pool.acquire(timeout=self.acquire_timeout_s) as conn,
            conn.transaction(),
        ):
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_ID):
                now: dt.datetime = await conn.fetchval("SELECT now()")
                for producer, session in await conn.fetch(_SQL_SESSIONS):
                    o, c = await self._sweep_session(conn, producer, session, now)
                    opened += [(producer, session, first, last) for first, last in o]
                    closed += c
            count = int(await conn.fetchval(SQL_COUNT_OPEN))
        return Sweep(count, opened, closed)

    async def _sweep_session(
        self, conn: Connection, producer: str, session: str, now: dt.datetime
    ) -> tuple[list[tuple[int, int]], int]:
        rows = await conn.fetch(_SQL_RANGES, producer, session)
        ranges = [
            Range(r["first_seq"], r["last_seq"], r["recorded_at"], r["last_recorded_at"])
            for r in rows
        ]
        merged = merge(ranges)
        if len(merged) < len(ranges):
            await conn.execute(
                _SQL_REPLACE,
                producer,
                session,
                [r["id"] for r in rows],
                [m.first for m in merged],
                [m.last for m in merged],
                [m.recorded_at for m in merged],
                [m.last_recorded_at or m.recorded_at for m in merged],
            )
        holes = [
            (below.last + 1, above.first - 1, above.recorded_at)
            for below, above in itertools.pairwise(merged)
        ]
        open_gaps = await conn.fetch(_SQL_OPEN_GAPS, producer, session)
        opened: list[tuple[int, int]] = []
        for first, last, evidence in holes:
            if any(g["first_missing"] <= first and last <= g["last_missing"] for g in open_gaps):
                continue  # part of a gap already open (some of its late events have come)
            if (now - evidence).total_seconds() < self.grace_s:
                continue  # the seqs above may have overtaken it: wait for the grace period
            if await conn.fetchval(_SQL_OPEN_GAP, producer, session, first, last):
                opened.append((first, last))
        closed = 0
        for g in open_gaps:
            still_missing = any(
                first <= g["last_missing"] and g["first_missing"] <= last
                for first, last, _ in holes
            )
            if not still_missing:
                await conn.execute(_SQL_CLOSE_GAP, g["id"])
                closed += 1
        return opened, closed
