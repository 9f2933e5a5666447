"""The heartbeat history (ingestd.daemon.liveness) on real PostgreSQL and Redis: intervals extended
and
opened by the gap limit, replicas taking turns, the merged view, the daemon's intake writing it,
and ``ingestd stats`` showing each component's liveness."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import asyncpg
import pytest

from ingestd.commands.stats import collect_database, render
from ingestd.daemon.app import Service
from ingestd.daemon.db import Connection
from ingestd.daemon.liveness import LivenessRecorder, history, write_intervals
from ingestd.settings import Settings
from ingestd.wire import keys
from ingestd.wire.events import utc_iso

pytestmark = [pytest.mark.pg, pytest.mark.redis]

GAP_S = 10.0


def at(base: dt.datetime, seconds: float) -> dt.datetime:
    return base + dt.timedelta(seconds=seconds)


async def write(conn: Connection, component: str, *moments: dt.datetime) -> None:
    """Note the heartbeats in a recorder of their own and write them (one write)."""
    recorder = LivenessRecorder(gap_s=GAP_S, max_intervals=1000)
    for m in moments:
        recorder.note(component, m)
    await write_intervals(conn, recorder.take(), gap_s=GAP_S)


async def rows(conn: asyncpg.Connection, component: str) -> list[tuple[Any, ...]]:
    found = await conn.fetch(
        "SELECT first_seen, last_seen, beats FROM heartbeat_history WHERE component = $1"
        " ORDER BY first_seen",
        component,
    )
    return [tuple(r) for r in found]


async def test_writes_extend_the_interval_within_the_gap_and_open_one_after_it(
    db: asyncpg.Connection,
) -> None:
    t = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    await write(db, "collector", at(t, 0), at(t, 1), at(t, 2))
    await write(db, "collector", at(t, 11), at(t, 12))  # 9 s after the last: the same interval
    assert await rows(db, "collector") == [(at(t, 0), at(t, 12), 5)]
    await write(db, "collector", at(t, 60))  # 48 s of silence: down in between
    await write(db, "paper", at(t, 5))
    assert await rows(db, "collector") == [(at(t, 0), at(t, 12), 5), (at(t, 60), at(t, 60), 1)]
    alive = await history(db, component="collector")
    assert [(a.alive_from, a.alive_until, a.beats) for a in alive] == [
        (at(t, 0), at(t, 12), 5),
        (at(t, 60), at(t, 60), 1),
    ]
    # since: only the intervals that reach it.
    later = await history(db, since=at(t, 30))
    assert [(a.component, a.alive_from) for a in later] == [("collector", at(t, 60))]
    # A late heartbeat that bridges the two intervals: the view shows one.
    await write(db, "collector", at(t, 20), at(t, 28), at(t, 36), at(t, 44), at(t, 52))
    alive = await history(db, component="collector")
    assert [(a.alive_from, a.alive_until) for a in alive] == [(at(t, 0), at(t, 60))]


async def test_replicas_writing_at_once_never_open_one_interval_twice(
    db_pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Each replica sees part of a component's heartbeats; they take turns, so the table keeps
    one row per interval (not one per replica that found none to extend)."""
    t = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)

    async def replica(offset: float) -> None:
        async with db_pool.acquire() as conn:
            for i in range(20):
                await write(conn, "collector", at(t, i * 2 + offset))

    for _ in range(3):
        await db.execute("DELETE FROM heartbeat_history")
        await asyncio.gather(replica(0), replica(1), replica(0.5))
        assert await rows(db, "collector") == [(at(t, 0), at(t, 39), 60)]


async def test_the_daemon_records_heartbeats_taken_in_and_its_own_and_stats_shows_them(
    settings: Settings, db: asyncpg.Connection
) -> None:
    settings = settings.replace(
        **{"heartbeat_history.flush_interval_s": 0.2, "mirror.heartbeat_interval_s": 0.2}
    )
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    async with Service(settings, stream_intake=False) as service:
        for i, s in enumerate((-3, -2, -1)):
            await service.submit(
                {
                    "type": "heartbeat",
                    "event_id": f"hb-{i}",
                    "producer": "collector",
                    "component": "collector",
                    "timestamp": utc_iso(at(now, s)),
                }
            )
        # A component that was alive an hour ago, and not since.
        await service.submit(
            {
                "type": "heartbeat",
                "event_id": "hb-old",
                "producer": "paper",
                "component": "paper",
                "timestamp": utc_iso(at(now, -3600)),
            }
        )
        replica = keys.replica_component(settings.consumer_name)
        deadline = time.monotonic() + 20
        while True:
            found = {a.component: a for a in await history(db)}
            if {"collector", "paper", replica} <= set(found):
                break
            assert time.monotonic() < deadline, f"history has only {found}"
            await asyncio.sleep(0.1)
    assert (found["collector"].alive_from, found["collector"].alive_until) == (
        at(now, -3),
        at(now, -1),
    )
    assert found["collector"].beats == 3
    # ingestd's own replica heartbeat is noted as it writes it (and a final write on stop).
    assert found[replica].alive_until >= now - dt.timedelta(seconds=5)

    # --exact counts the history too (it was left blank: not in the allow-list of countable
    # tables).
    exact = await collect_database(db, exact=True, liveness_alive_within_s=GAP_S + 5)
    counted = {t["tablename"]: t for t in exact["tables"]}
    intervals = await db.fetchval("SELECT count(*) FROM heartbeat_history")
    assert counted["heartbeat_history"]["rows"] == intervals and intervals >= 3
    assert counted["heartbeat_history"]["rows_exact"] is True
    for name in ("alerts", "producer_gaps", "producer_seq_ranges"):
        assert counted[name]["rows_exact"] is True, name
    report = await collect_database(db, liveness_alive_within_s=GAP_S + 5)
    by_name = {c["component"]: c for c in report["liveness"]["components"]}
    assert by_name["collector"]["alive"] is True
    assert by_name["paper"]["alive"] is False and by_name["paper"]["intervals"] == 1
    text = render(report)
    assert "component liveness (heartbeat history): 3 component(s)" in text
    paper_line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["paper"])
    assert "DOWN" in paper_line
    collector_line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["collector"])
    # component, state, alive since, last seen (relative to when the report was collected; the
    # first beat was 3 s before the test's now), intervals.
    words = collector_line.split()
    assert words[1] == "alive" and words[3] == words[5] == "ago" and words[6] == "1", words
    assert 3 <= int(words[2].rstrip("s")) <= 30, words
