"""``ingestd bench``: ingestd's throughput against a raw binary COPY, on one schema, in one run.

Phases (see PERFORMANCE.md): (a) asyncpg binary COPY of pre-built rows, the ceiling; (b) ingestd
fed in-process through ``submit``; (c) ingestd reading a Redis Stream that a separate producer
process filled beforehand; (d) one autocommitted ``INSERT`` per row, the naive baseline. Absolute
numbers drift from run to run on shared machines, so every phase runs in the same process against
the same servers and is reported as a ratio to (a).

Everything the run creates is scratch and removed at the end: a database (created, migrated,
dropped), a stream key, and a mirror key prefix, so a bench never touches production keys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import platform
import re
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson
import redis.asyncio as aioredis

from ingestd import migrations
from ingestd.app import Service, create_redis
from ingestd.errors import ConfigError
from ingestd.publisher import Publisher
from ingestd.settings import Settings, redact
from ingestd.simulate import Simulator
from ingestd.sources.inprocess import Outcome

log = logging.getLogger("ingestd.bench")

SPREAD_COLUMNS: Final = (
    "event_id",
    "producer",
    "symbol",
    "upbit_price",
    "binance_price",
    "binance_price_krw",
    "spread_pct",
    "net_spread_pct",
    "is_opportunity",
    "timestamp",
)
SYMBOLS: Final = ("BTC", "ETH", "XRP", "SOL", "DOGE")
COPY_BATCH_ROWS: Final = 5_000
NAIVE_MAX_ROWS: Final = 3_000
MIN_OUTSTANDING_SUBMITS: Final = 10_000
STREAM_BLOCK_MS: Final = 100
PRODUCER_CHUNK: Final = 1_000
# The metric poll is an attribute read, so it can be fine-grained; the count(*) fallback is a
# full scan that competes with the writers for the (two) cores, so it stays rare.
METRIC_POLL_S: Final = 0.005
COUNT_POLL_S: Final = 1.0

# Quoted as an identifier in CREATE/DROP DATABASE, which cannot take a bind parameter.
_DB_NAME: Final = re.compile(r"[a-z0-9_]{1,63}\Z")

_PRODUCER_CODE: Final = (
    "import sys; from ingestd.bench import producer_main; sys.exit(producer_main(sys.argv[1:]))"
)


class BenchFailed(Exception):
    """A phase produced a wrong result (row count, sums, dead letters, pending entries)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """The pre-generated spread events, the same events as COPY rows, and their exact sums."""

    events: list[dict[str, Any]]
    rows: list[tuple[Any, ...]]
    sum_upbit_price: Decimal
    sum_spread_pct: Decimal


@dataclasses.dataclass(slots=True)
class PhaseResult:
    """One timed phase."""

    key: str
    label: str
    rows: int
    seconds: float
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Rows per second."""
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


# --- the workload ------------------------------------------------------------------------------


def spread_sums(events: Iterable[Mapping[str, Any]]) -> tuple[Decimal, Decimal]:
    """Exact ``sum(upbit_price)`` and ``sum(spread_pct)`` of spread events, with Decimal."""
    upbit = Decimal(0)
    spread = Decimal(0)
    for ev in events:
        upbit += Decimal(ev["upbit_price"])
        spread += Decimal(ev["spread_pct"])
    return upbit, spread


def spread_row(ev: Mapping[str, Any]) -> tuple[Any, ...]:
    """The COPY row of one spread event: Decimals and an aware datetime, as a producer has them."""
    moment = dt.datetime.fromisoformat(ev["timestamp"])
    if moment.tzinfo is None:
        raise ValueError(f"naive timestamp in generated event {ev['event_id']}")
    return (
        ev["event_id"],
        ev["producer"],
        ev["symbol"],
        Decimal(ev["upbit_price"]),
        Decimal(ev["binance_price"]),
        Decimal(ev["binance_price_krw"]),
        Decimal(ev["spread_pct"]),
        Decimal(ev["net_spread_pct"]),
        bool(ev["is_opportunity"]),
        moment,
    )


def make_workload(n: int, *, seed: int = 1) -> Workload:
    """``n`` spread events from the simulator (several symbols), as dicts and as rows."""
    sim = Simulator(seed=seed, symbols=SYMBOLS)
    events: list[dict[str, Any]] = []
    for ev in sim.events():
        if ev["type"] == "spread":
            events.append(ev)
            if len(events) >= n:
                break
    rows = [spread_row(ev) for ev in events]
    upbit, spread = spread_sums(events)
    return Workload(events, rows, upbit, spread)


def write_jsonl(path: Path, events: Iterable[Mapping[str, Any]]) -> None:
    """One JSON event per line: what the producer process publishes."""
    with path.open("wb") as fh:
        for ev in events:
            fh.write(orjson.dumps(ev))
            fh.write(b"\n")


# --- the producer process (phase c) ------------------------------------------------------------


def publish_jsonl(path: str, url: str, stream: str) -> int:
    """XADD every line of a JSONL file to ``stream`` with the shipped publisher, pipelined."""
    publisher = Publisher.from_url(url, stream=stream)
    try:
        with open(path, "rb") as fh:
            return publisher.publish_many((orjson.loads(line) for line in fh), chunk=PRODUCER_CHUNK)
    finally:
        publisher.close()


def producer_main(argv: Sequence[str]) -> int:
    """Entry point of the producer subprocess: ``PATH STREAM``, the Redis URL on stdin."""
    path, stream = argv
    # The URL comes on stdin, not argv, because a password in argv is visible in `ps`.
    url = sys.stdin.readline().strip()
    print(publish_jsonl(path, url, stream))
    return 0


# --- helpers -----------------------------------------------------------------------------------


def scratch_dsn(dsn: str, database: str) -> str:
    """The configured DSN pointed at ``database`` (same server, user, password and options)."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ConfigError("ingestd bench needs a postgresql:// DSN")
    query = urllib.parse.parse_qs(parts.query)
    if "dbname" in query or "database" in query:
        raise ConfigError("ingestd bench cannot redirect a DSN that names its database in options")
    if parts.path.lstrip("/") == database:
        raise ConfigError(
            f"the scratch database {database!r} is the configured database; it would be dropped"
        )
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


async def _admin_connect(dsn: str) -> asyncpg.Connection:
    # CREATE/DROP DATABASE must run from another database; "postgres" exists on every server.
    return await asyncpg.connect(dsn, database="postgres", timeout=10)


async def _recreate_database(dsn: str, name: str) -> None:
    conn = await _admin_connect(dsn)
    try:
        # Identifiers cannot be bind parameters; the name was checked to be [a-z0-9_].
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(dsn: str, name: str) -> None:
    conn = await _admin_connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _reset_table(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE spreads, dead_letters")
    # A checkpoint now keeps one phase's WAL from being flushed during the next one's timing;
    # without the privilege the phases just share that noise.
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def _verify(
    conn: asyncpg.Connection, label: str, events: Sequence[Mapping[str, Any]]
) -> None:
    want_upbit, want_spread = spread_sums(events)
    row = await conn.fetchrow(
        "SELECT count(*) AS n, sum(upbit_price) AS upbit, sum(spread_pct) AS spread FROM spreads"
    )
    dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
    assert row is not None
    problems: list[str] = []
    if row["n"] != len(events):
        problems.append(f"{row['n']} rows in spreads, expected {len(events)}")
    if row["upbit"] != want_upbit:
        problems.append(f"sum(upbit_price) is {row['upbit']}, expected {want_upbit}")
    if row["spread"] != want_spread:
        problems.append(f"sum(spread_pct) is {row['spread']}, expected {want_spread}")
    if dead:
        problems.append(f"{dead} dead letters")
    if problems:
        raise BenchFailed(f"{label}: " + "; ".join(problems))
    log.info("%s verified: %d rows, sums exact", label, len(events), extra={"action": "bench"})


async def _delete_scratch_keys(client: aioredis.Redis, stream_key: str, prefix: str) -> None:
    await client.delete(stream_key)
    batch: list[str | bytes] = []
    async for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await client.delete(*batch)
            batch.clear()
    if batch:
        await client.delete(*batch)


def _write_json(path: str, doc: Mapping[str, Any]) -> None:
    Path(path).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


# --- the phases --------------------------------------------------------------------------------


async def phase_copy(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> PhaseResult:
    """(a) The ceiling: binary COPY of pre-built rows, batches of 5,000, one connection."""
    batches = [rows[i : i + COPY_BATCH_ROWS] for i in range(0, len(rows), COPY_BATCH_ROWS)]
    t0 = time.perf_counter()
    for batch in batches:
        await conn.copy_records_to_table("spreads", records=batch, columns=SPREAD_COLUMNS)
    seconds = time.perf_counter() - t0
    return PhaseResult(
        "a",
        "raw binary COPY, pre-built rows",
        len(rows),
        seconds,
        {"batch_rows": COPY_BATCH_ROWS, "connections": 1},
    )


async def phase_submit(
    settings: Settings, events: Sequence[Mapping[str, Any]], outstanding: int
) -> PhaseResult:
    """(b) ingestd in-process: ``await submit(event)`` with ``outstanding`` callers at a time."""
    service = Service(settings, stream_intake=False)
    await service.start()
    outcomes: collections.Counter[Outcome] = collections.Counter()
    try:
        feed = iter(events)

        async def caller() -> None:
            # Callers share one iterator: each takes the next event when its last one committed.
            for ev in feed:
                outcomes[await service.submit(ev)] += 1

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(outstanding, len(events))):
                tg.create_task(caller())
        seconds = time.perf_counter() - t0
        assert service.pipeline is not None
        metrics = service.pipeline.metrics
        details: dict[str, Any] = {
            "outstanding_submits": outstanding,
            "batches": metrics.batches,
            "duplicates": metrics.duplicates,
            "flush_retries": metrics.flush_retries,
        }
    finally:
        await service.stop()
    if outcomes[Outcome.COMMITTED] != len(events):
        raise BenchFailed(f"(b): submit outcomes {dict(outcomes)}, expected all committed")
    return PhaseResult("b", "ingestd in-process submit", len(events), seconds, details)


async def run_producer(jsonl: Path, url: str, stream_key: str, timeout_s: float) -> int:
    """Publish the JSONL file from a separate Python process; return how many it added."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PRODUCER_CODE,
        str(jsonl),
        stream_key,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(url.encode() + b"\n"), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchFailed(f"(c): the producer process did not finish in {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip()[-2000:]
        raise BenchFailed(f"(c): the producer process exited {proc.returncode}: {tail}")
    return int(out.strip())


async def _wait_committed(
    service: Service, conn: asyncpg.Connection, n: int, deadline_s: float
) -> None:
    """Return when ``n`` spreads are committed: signalled by the metric, confirmed by count(*).

    The pipeline bumps ``rows_written`` right after each commit, so polling it gives the commit
    time without scanning the table on every poll; ``count(*)`` then proves the rows are there.
    """
    assert service.pipeline is not None
    metrics = service.pipeline.metrics
    end = time.monotonic() + deadline_s
    next_count = time.monotonic() + COUNT_POLL_S
    while True:
        now = time.monotonic()
        if metrics.rows_written["spreads"] >= n or now >= next_count:
            count = await conn.fetchval("SELECT count(*) FROM spreads")
            if count >= n:
                return
            next_count = time.monotonic() + COUNT_POLL_S
            if metrics.rows_written["spreads"] >= n:
                raise BenchFailed(
                    f"(c): ingestd reports {metrics.rows_written['spreads']} spreads written "
                    f"but the table holds {count}"
                )
        if now >= end:
            raise BenchFailed(
                f"(c): only {metrics.rows_written['spreads']} of {n} events committed "
                f"after {deadline_s:.0f}s"
            )
        await asyncio.sleep(METRIC_POLL_S)


async def phase_stream(
    settings: Settings,
    conn: asyncpg.Connection,
    client: aioredis.Redis,
    *,
    n: int,
    group: str,
    deadline_s: float,
) -> PhaseResult:
    """(c) ingestd reading the pre-filled scratch stream: from start of intake to last commit."""
    service = Service(settings, stream_intake=True)
    await service.start()
    try:
        t0 = time.perf_counter()
        await _wait_committed(service, conn, n, deadline_s)
        seconds = time.perf_counter() - t0
        assert service.pipeline is not None
        metrics = service.pipeline.metrics
        details: dict[str, Any] = {
            "read_count": settings.stream.read_count,
            "block_ms": settings.stream.block_ms,
            "batches": metrics.batches,
            "duplicates": metrics.duplicates,
            "flush_retries": metrics.flush_retries,
        }
    finally:
        await service.stop()
    summary = await client.xpending(settings.stream.key, group)
    pending = int(summary["pending"])
    details["pending_after_stop"] = pending
    if pending:
        raise BenchFailed(f"(c): {pending} entries still pending in group {group} after stop")
    return PhaseResult("c", "ingestd via Redis Stream", n, seconds, details)


async def produce_and_consume(
    settings: Settings,
    conn: asyncpg.Connection,
    client: aioredis.Redis,
    jsonl: Path,
    *,
    n: int,
    deadline_s: float,
) -> PhaseResult:
    """(c) with its untimed preparation: the producer process fills the stream first."""
    key = settings.stream.key
    log.info("(c) producer process publishing %d events", n, extra={"action": "bench"})
    t0 = time.perf_counter()
    published = await run_producer(jsonl, settings.storage.redis.url, key, deadline_s)
    produce_s = time.perf_counter() - t0
    length = await client.xlen(key)
    if published != n or length != n:
        raise BenchFailed(
            f"(c): the producer published {published} and the stream holds {length}, expected {n}"
        )
    log.info(
        "(c) producer done in %.2fs; ingestd reading the stream",
        produce_s,
        extra={"action": "bench"},
    )
    result = await phase_stream(
        settings, conn, client, n=n, group=settings.stream.group, deadline_s=deadline_s
    )
    result.details["producer_seconds"] = produce_s
    result.details["producer_rate"] = n / produce_s if produce_s > 0 else None
    return result


async def phase_naive(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> PhaseResult:
    """(d) The naive baseline: one autocommitted INSERT per row, with bind parameters."""
    params = ", ".join(f"${i}" for i in range(1, len(SPREAD_COLUMNS) + 1))
    sql = f"INSERT INTO spreads ({', '.join(SPREAD_COLUMNS)}) VALUES ({params})"
    t0 = time.perf_counter()
    for row in rows:
        await conn.execute(sql, *row)
    seconds = time.perf_counter() - t0
    return PhaseResult("d", "one INSERT per row, autocommit", len(rows), seconds)


# --- report ------------------------------------------------------------------------------------


def _ratio(num: PhaseResult, den: PhaseResult) -> float:
    return num.rate / den.rate if den.rate > 0 else float("nan")


def format_table(phases: Sequence[PhaseResult]) -> str:
    """The human-readable result table (ratios are to phase (a))."""
    ceiling = phases[0]
    lines = [f"{'phase':<40} {'rows':>9} {'seconds':>9} {'rows/s':>11} {'vs (a)':>7}"]
    for p in phases:
        lines.append(
            f"({p.key}) {p.label:<36} {p.rows:>9,} {p.seconds:>9.3f} {p.rate:>11,.0f} "
            f"{_ratio(p, ceiling):>7.2f}"
        )
    by_key = {p.key: p for p in phases}
    lines.append(
        f"b/a = {_ratio(by_key['b'], by_key['a']):.2f}   "
        f"c/a = {_ratio(by_key['c'], by_key['a']):.2f}   "
        f"c/d = {_ratio(by_key['c'], by_key['d']):.1f}"
    )
    return "\n".join(lines)


async def _machine_info(conn: asyncpg.Connection, client: aioredis.Redis) -> dict[str, Any]:
    info = await client.info("server")
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "asyncpg": asyncpg.__version__,
        "postgresql": await conn.fetchval("SHOW server_version"),
        "timescaledb": await migrations.timescaledb_enabled(conn),
        "redis": info.get("redis_version"),
    }


# --- the command -------------------------------------------------------------------------------


async def run_bench(
    settings: Settings, *, events: int, json_path: str | None, scratch_database: str
) -> int:
    """``ingestd bench``: run phases (a)-(d) in a scratch database and print the table."""
    if events < 1:
        print("ingestd bench: --events must be at least 1", file=sys.stderr)
        return 2
    if not _DB_NAME.match(scratch_database):
        print(
            f"ingestd bench: scratch database name {scratch_database!r} "
            "must match [a-z0-9_]{1,63}",
            file=sys.stderr,
        )
        return 2
    base_dsn = settings.storage.postgres.dsn
    try:
        dsn = scratch_dsn(base_dsn, scratch_database)
    except ConfigError as exc:
        print(f"ingestd bench: {exc}", file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex[:12]
    stream_key = f"ingestd:bench:{tag}"
    group = f"bench-{tag}"
    # Mirror keys and ingestd's own heartbeat go under a scratch prefix, deleted at the end.
    key_prefix = f"ingestd:bench:{tag}:"
    # No maintenance rounds (view refreshes) inside the timed runs: they would perturb them.
    bench_settings = settings.replace(
        **{
            "storage.postgres.dsn": dsn,
            "storage.redis.key_prefix": key_prefix,
            "maintenance.enabled": False,
        }
    )
    stream_settings = bench_settings.replace(
        **{
            "stream.key": stream_key,
            "stream.group": group,
            "stream.consumer": "bench",
            "stream.block_ms": STREAM_BLOCK_MS,
        }
    ).check()
    pipe = settings.pipeline
    # Enough callers that the batcher can fill the next batch while every writer is busy.
    outstanding = max(MIN_OUTSTANDING_SUBMITS, (pipe.writers + 1) * pipe.batch_max_rows)
    deadline_s = max(120.0, events / 500)

    log.info("generating %d spread events", events, extra={"action": "bench"})
    workload = make_workload(events)
    naive_events = workload.events[:NAIVE_MAX_ROWS]
    handle, name = tempfile.mkstemp(prefix="ingestd-bench-", suffix=".jsonl")
    os.close(handle)
    jsonl = Path(name)
    write_jsonl(jsonl, workload.events)

    log.info(
        "creating scratch database %s on %s",
        scratch_database,
        redact(base_dsn),
        extra={"action": "bench"},
    )
    await _recreate_database(base_dsn, scratch_database)
    client = create_redis(settings.storage.redis.url, socket_timeout_s=30.0)
    conn: asyncpg.Connection | None = None
    phases: list[PhaseResult] = []
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
        await migrations.migrate(conn)
        machine = await _machine_info(conn, client)

        log.info("(a) binary COPY of %d pre-built rows", events, extra={"action": "bench"})
        await _reset_table(conn)
        phases.append(await phase_copy(conn, workload.rows))
        await _verify(conn, "(a)", workload.events)

        log.info("(b) ingestd in-process submit of %d events", events, extra={"action": "bench"})
        await _reset_table(conn)
        phases.append(await phase_submit(bench_settings, workload.events, outstanding))
        await _verify(conn, "(b)", workload.events)

        await _reset_table(conn)
        phases.append(
            await produce_and_consume(
                stream_settings, conn, client, jsonl, n=events, deadline_s=deadline_s
            )
        )
        await _verify(conn, "(c)", workload.events)

        log.info("(d) %d single-row INSERTs", len(naive_events), extra={"action": "bench"})
        await _reset_table(conn)
        phases.append(await phase_naive(conn, workload.rows[: len(naive_events)]))
        await _verify(conn, "(d)", naive_events)
    except BenchFailed as exc:
        print(f"ingestd bench: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if conn is not None:
            await conn.close()
        await _drop_database(base_dsn, scratch_database)
        await _delete_scratch_keys(client, stream_key, key_prefix)
        await client.aclose()
        await asyncio.to_thread(jsonl.unlink, missing_ok=True)

    print(format_table(phases))
    by_key = {p.key: p for p in phases}
    produce_s = by_key["c"].details["producer_seconds"]
    print(
        f"producer process (before (c), not timed): {events:,} XADDs in {produce_s:.3f}s "
        f"({events / produce_s:,.0f}/s)"
    )
    if json_path:
        doc = {
            "started": dt.datetime.now(dt.UTC).isoformat(),
            "events": events,
            "machine": machine,
            "settings": {
                "batch_max_rows": pipe.batch_max_rows,
                "batch_max_age_ms": pipe.batch_max_age_ms,
                "writers": pipe.writers,
                "queue_max_events": pipe.queue_max_events,
                "stream_read_count": settings.stream.read_count,
                "stream_block_ms": STREAM_BLOCK_MS,
                "outstanding_submits": outstanding,
            },
            "phases": {
                p.key: {
                    "label": p.label,
                    "rows": p.rows,
                    "seconds": p.seconds,
                    "rows_per_s": p.rate,
                    "ratio_to_a": _ratio(p, by_key["a"]),
                    **p.details,
                }
                for p in phases
            },
            "ratios": {
                "b/a": _ratio(by_key["b"], by_key["a"]),
                "c/a": _ratio(by_key["c"], by_key["a"]),
                "c/d": _ratio(by_key["c"], by_key["d"]),
            },
            "verified": True,
        }
        _write_json(json_path, doc)
        log.info("wrote %s", json_path, extra={"action": "bench"})
    return 0
