"""Throughput phases: the raw-writer ceilings, the baselines a user would otherwise pick, and
ingestd at full speed in-process and through the Redis Stream.

Every function here only runs and times its phase; the runner empties the tables before and
verifies the rows after each one (``ingestd.tools.bench.scratch.verify``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis

from ingestd.daemon.app import Service
from ingestd.daemon.sources.inprocess import Outcome
from ingestd.settings import Settings
from ingestd.tools.bench.cpu import CpuSplit
from ingestd.tools.bench.results import PhaseResult, Stopwatch
from ingestd.tools.bench.scratch import BenchFailed, last_entry_id, wait_group_done
from ingestd.tools.bench.workload import (
    POSITION_CLOSE_COLUMNS,
    POSITION_OPEN_COLUMNS,
    RawBatch,
    Workload,
    append_row,
)
from ingestd.wire import tables

log = logging.getLogger("ingestd.tools.bench")

COPY_BATCH_ROWS: Final = 5_000
MULTIROW_ROWS: Final = 1_000  # 10 columns: 10,000 bind parameters, under PostgreSQL's 32,767
SUBMIT_MANY_CHUNK: Final = 1_000

_SPREAD_COLUMNS: Final = tables.SPREADS.column_names
_SPREAD_PARAMS: Final = ", ".join(f"${i}" for i in range(1, len(_SPREAD_COLUMNS) + 1))
SQL_INSERT_SPREAD: Final = (
    f"INSERT INTO spreads ({', '.join(_SPREAD_COLUMNS)}) VALUES ({_SPREAD_PARAMS})"
)
_ENTRY: Final = POSITION_OPEN_COLUMNS[2:-1]
_EXIT: Final = POSITION_CLOSE_COLUMNS[1:-1]
# What a hand-written writer does for positions: an upsert for the open, an update for the close.
SQL_RAW_OPEN: Final = f"""
INSERT INTO positions ({", ".join(POSITION_OPEN_COLUMNS)})
VALUES ({", ".join(f"${i}" for i in range(1, len(POSITION_OPEN_COLUMNS) + 1))})
ON CONFLICT (producer, position_key) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _ENTRY)},
    open_event_id = EXCLUDED.open_event_id,
    updated_at = CURRENT_TIMESTAMP
"""
SQL_RAW_CLOSE: Final = f"""
UPDATE positions SET
    {", ".join(f"{c} = ${i}" for i, c in enumerate(_EXIT, 2))},
    status = 'CLOSED',
    close_event_id = ${len(_EXIT) + 2},
    updated_at = CURRENT_TIMESTAMP
WHERE position_key = $1
"""
# The server reads a file we wrote into a directory of our own; only such a path is quoted in.
_SAFE_PATH: Final = re.compile(r"/[A-Za-z0-9/_.-]+\Z")


def _spread_rows(workload: Workload) -> list[tuple[Any, ...]]:
    return [append_row(ev, tables.SPREADS) for ev in workload.events]


def _batches(rows: Sequence[tuple[Any, ...]], size: int) -> list[Sequence[tuple[Any, ...]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


# --- ceilings ----------------------------------------------------------------------------------


async def binary_copy(
    conn: asyncpg.Connection, workload: Workload, *, split: CpuSplit | None = None
) -> PhaseResult:
    """(a) asyncpg binary COPY of pre-built spread rows, batches of 5,000, one connection."""
    batches = _batches(_spread_rows(workload), COPY_BATCH_ROWS)
    watch = Stopwatch(split)
    await watch.begin()
    for batch in batches:
        await conn.copy_records_to_table("spreads", records=batch, columns=_SPREAD_COLUMNS)
    await watch.end()
    return PhaseResult(
        "copy",
        "raw binary COPY, pre-built rows",
        len(workload.events),
        watch.seconds,
        cpu_split=watch.cpu_split,
        rows=len(workload.events),
        details={"batch_rows": COPY_BATCH_ROWS, "connections": 1},
    )


async def file_copy(
    conn: asyncpg.Connection, workload: Workload, csv_path: Path, *, split: CpuSplit | None = None
) -> PhaseResult:
    """(a2) ``COPY spreads FROM 'file'`` on the server; where not permitted, from the client."""
    columns = ", ".join(_SPREAD_COLUMNS)
    path = str(csv_path)
    if not _SAFE_PATH.match(path):
        raise BenchFailed(f"(a2): unexpected characters in the CSV path {path!r}")
    label = "server-side COPY FROM a CSV file"
    fallback: str | None = None
    watch = Stopwatch(split)
    await watch.begin()
    try:
        # COPY FROM a file cannot take its path as a bind parameter; the path is our own.
        await conn.execute(f"COPY spreads ({columns}) FROM '{path}' WITH (FORMAT csv)")
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedFileError) as exc:
        fallback = f"{type(exc).__name__}: {exc}"
        log.info(
            "(a2) server-side COPY not possible (%s); copying the file from the client",
            fallback,
            extra={"action": "bench"},
        )
        await watch.begin()
        await conn.copy_to_table(
            "spreads", source=csv_path, columns=list(_SPREAD_COLUMNS), format="csv"
        )
        label = "client COPY of the CSV file (server-side not permitted)"
    await watch.end()
    return PhaseResult(
        "server_copy",
        label,
        len(workload.events),
        watch.seconds,
        cpu_split=watch.cpu_split,
        rows=len(workload.events),
        details={"server_side": fallback is None, "fallback_reason": fallback, "statements": 1},
    )


async def mix_ceiling(
    conn: asyncpg.Connection, batches: Sequence[RawBatch], *, split: CpuSplit | None = None
) -> PhaseResult:
    """(A) What a raw writer does for the mix, per batch of 5,000 events, one transaction each:
    a binary COPY of pre-built rows per append-only table, then one ``executemany`` upsert of
    the opened positions and one ``executemany`` update of the closed ones."""
    events = 0
    rows = 0
    watch = Stopwatch(split)
    await watch.begin()
    for batch in batches:
        async with conn.transaction():
            for name, records in batch.rows.items():
                await conn.copy_records_to_table(
                    name, records=records, columns=tables.APPEND_TABLES_BY_NAME[name].column_names
                )
                rows += len(records)
            if batch.opens:
                await conn.executemany(SQL_RAW_OPEN, batch.opens)
            if batch.closes:
                await conn.executemany(SQL_RAW_CLOSE, batch.closes)
            rows += len(batch.opens)
    await watch.end()
    events = sum(len(b.opens) + len(b.closes) + sum(map(len, b.rows.values())) for b in batches)
    return PhaseResult(
        "mix_copy",
        "raw writer: binary COPY + position upserts",
        events,
        watch.seconds,
        cpu_split=watch.cpu_split,
        rows=rows,
        details={"batch_events": COPY_BATCH_ROWS, "connections": 1},
    )


# --- baselines ---------------------------------------------------------------------------------


async def insert_per_row(
    conn: asyncpg.Connection, workload: Workload, *, split: CpuSplit | None = None
) -> PhaseResult:
    """(d) One autocommitted ``INSERT`` per row, with bind parameters (on a sample)."""
    rows = _spread_rows(workload)
    watch = Stopwatch(split)
    await watch.begin()
    for row in rows:
        await conn.execute(SQL_INSERT_SPREAD, *row)
    await watch.end()
    return PhaseResult(
        "insert",
        "one INSERT per row, autocommit",
        len(rows),
        watch.seconds,
        rows=len(rows),
        cpu_split=watch.cpu_split,
    )


async def executemany(
    conn: asyncpg.Connection, workload: Workload, *, split: CpuSplit | None = None
) -> PhaseResult:
    """(e) ``executemany`` of the ``INSERT``, 5,000 rows per call (each call is atomic)."""
    rows = _spread_rows(workload)
    watch = Stopwatch(split)
    await watch.begin()
    for batch in _batches(rows, COPY_BATCH_ROWS):
        await conn.executemany(SQL_INSERT_SPREAD, batch)
    await watch.end()
    return PhaseResult(
        "executemany",
        "executemany INSERT, 5,000 per call",
        len(rows),
        watch.seconds,
        cpu_split=watch.cpu_split,
        rows=len(rows),
        details={"batch_rows": COPY_BATCH_ROWS},
    )


def _multirow_sql(n: int) -> str:
    width = len(_SPREAD_COLUMNS)
    groups = (
        "(" + ", ".join(f"${r * width + c}" for c in range(1, width + 1)) + ")" for r in range(n)
    )
    return f"INSERT INTO spreads ({', '.join(_SPREAD_COLUMNS)}) VALUES {', '.join(groups)}"


async def multirow_insert(
    conn: asyncpg.Connection, workload: Workload, *, split: CpuSplit | None = None
) -> PhaseResult:
    """(f) Multi-row ``INSERT ... VALUES (...), (...)`` of 1,000 rows, bind parameters."""
    rows = _spread_rows(workload)
    statements = {n: _multirow_sql(n) for n in {len(b) for b in _batches(rows, MULTIROW_ROWS)}}
    watch = Stopwatch(split)
    await watch.begin()
    for batch in _batches(rows, MULTIROW_ROWS):
        await conn.execute(statements[len(batch)], *(v for row in batch for v in row))
    await watch.end()
    return PhaseResult(
        "multirow",
        "multi-row INSERT, 1,000 rows each",
        len(rows),
        watch.seconds,
        cpu_split=watch.cpu_split,
        rows=len(rows),
        details={"rows_per_statement": MULTIROW_ROWS},
    )


# --- ingestd -----------------------------------------------------------------------------------


def _pipeline_details(service: Service) -> dict[str, Any]:
    assert service.pipeline is not None
    m = service.pipeline.metrics
    p = service.settings.pipeline
    return {
        "batch_max_rows": p.batch_max_rows,
        "batch_max_age_ms": p.batch_max_age_ms,
        "writers": p.writers,
        "pool_max_size": service.settings.storage.postgres.pool_max_size,
        "batches": m.batches,
        "duplicates": m.duplicates,
        "flush_retries": m.flush_retries,
    }


async def submit(
    key: str,
    label: str,
    settings: Settings,
    workload: Workload,
    outstanding: int,
    *,
    split: CpuSplit | None = None,
) -> PhaseResult:
    """(b) ``await service.submit(event)`` from ``outstanding`` callers at a time."""
    events = workload.events
    service = Service(settings, stream_intake=False)
    await service.start(wait_for_database=True)
    outcomes: collections.Counter[Outcome] = collections.Counter()
    watch = Stopwatch(split)
    try:
        feed = iter(events)

        async def caller() -> None:
            # Callers share one iterator: each takes the next event when its last one committed.
            for ev in feed:
                outcomes[await service.submit(ev)] += 1

        await watch.begin()
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(outstanding, len(events))):
                tg.create_task(caller())
        await watch.end()
        details = {**_pipeline_details(service), "outstanding_submits": outstanding}
    finally:
        await service.stop()
    if outcomes[Outcome.COMMITTED] != len(events):
        raise BenchFailed(f"{label}: submit outcomes {dict(outcomes)}, expected all committed")
    return PhaseResult(
        key,
        label,
        len(events),
        watch.seconds,
        cpu_split=watch.cpu_split,
        rows=workload.expected.rows,
        cpu_s=watch.cpu_s,
        details=details,
    )


async def submit_many(
    key: str,
    label: str,
    settings: Settings,
    workload: Workload,
    callers: int,
    *,
    split: CpuSplit | None = None,
) -> PhaseResult:
    """(b') ``await service.submit_many(chunk)`` of 1,000 events from ``callers`` at a time."""
    events = workload.events
    chunks = [events[i : i + SUBMIT_MANY_CHUNK] for i in range(0, len(events), SUBMIT_MANY_CHUNK)]
    service = Service(settings, stream_intake=False)
    await service.start(wait_for_database=True)
    outcomes: collections.Counter[Outcome] = collections.Counter()
    watch = Stopwatch(split)
    try:
        feed = iter(chunks)

        async def caller() -> None:
            for chunk in feed:
                outcomes.update(await service.submit_many(chunk))

        await watch.begin()
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(callers, len(chunks))):
                tg.create_task(caller())
        await watch.end()
        details = {
            **_pipeline_details(service),
            "chunk": SUBMIT_MANY_CHUNK,
            "concurrent_callers": callers,
        }
    finally:
        await service.stop()
    if outcomes[Outcome.COMMITTED] != len(events):
        raise BenchFailed(f"{label}: submit_many outcomes {dict(outcomes)}, expected all committed")
    return PhaseResult(
        key,
        label,
        len(events),
        watch.seconds,
        cpu_split=watch.cpu_split,
        rows=workload.expected.rows,
        cpu_s=watch.cpu_s,
        details=details,
    )


async def stream(
    key: str,
    label: str,
    settings: Settings,
    client: aioredis.Redis,
    workload: Workload,
    deadline_s: float,
    *,
    split: CpuSplit | None = None,
) -> PhaseResult:
    """(c) ingestd reading the pre-filled scratch stream: from start of intake to the last ack."""
    n = len(workload.events)
    last = await last_entry_id(client, settings.stream.key)
    service = Service(settings, stream_intake=True)
    watch = Stopwatch(split)
    await service.start(wait_for_database=True)
    try:
        await watch.begin()
        await wait_group_done(
            client,
            settings.stream.key,
            settings.stream.group,
            last,
            deadline_s=deadline_s,
            label=label,
        )
        await watch.end()
        details = {
            **_pipeline_details(service),
            "read_count": settings.stream.read_count,
            "block_ms": settings.stream.block_ms,
        }
    finally:
        await service.stop()
    return PhaseResult(
        key,
        label,
        n,
        watch.seconds,
        cpu_split=watch.cpu_split,
        rows=workload.expected.rows,
        cpu_s=watch.cpu_s,
        details=details,
    )
