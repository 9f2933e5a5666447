"""The bench's scratch resources (a database, stream keys, a mirror key prefix) and the checks
that every phase's result is exactly right, so that a fast wrong phase cannot pass."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import urllib.parse
from typing import Final

import asyncpg
import redis.asyncio as aioredis

from ingestd.daemon import db
from ingestd.errors import ConfigError
from ingestd.tools.bench.workload import SUM_COLUMNS, VERIFIED_TABLES, Expected

log = logging.getLogger("ingestd.tools.bench")

# Quoted as an identifier in CREATE/DROP DATABASE, which cannot take a bind parameter.
DB_NAME: Final = re.compile(r"[a-z0-9_]{1,63}\Z")
WRITTEN_TABLES: Final = (
    "spreads",
    "fx_rates",
    "orders",
    "trades",
    "positions",
    "position_closes_pending",
    "dead_letters",
)


class BenchFailed(Exception):
    """A phase produced a wrong result (row count, sums, dead letters, pending entries)."""


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
    return await db.connect(dsn, database="postgres", timeout_s=10)


async def recreate_database(dsn: str, name: str) -> None:
    """Drop (if left by an earlier run) and create the scratch database."""
    if not DB_NAME.match(name):
        raise ConfigError(f"scratch database name {name!r} must match [a-z0-9_]{{1,63}}")
    conn = await _admin_connect(dsn)
    try:
        # Identifiers cannot be bind parameters; the name was checked to be [a-z0-9_].
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(dsn: str, name: str) -> None:
    """Drop the scratch database (its connections are terminated)."""
    if not DB_NAME.match(name):
        raise ConfigError(f"scratch database name {name!r} must match [a-z0-9_]{{1,63}}")
    conn = await _admin_connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def reset_tables(conn: asyncpg.Connection) -> None:
    """Empty every table a phase writes, then checkpoint so its WAL is not the next one's cost."""
    await conn.execute(f"TRUNCATE {', '.join(WRITTEN_TABLES)}")
    # Without the privilege the phases just share that noise.
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def delete_keys(client: aioredis.Redis, keys: list[str], prefix: str) -> None:
    """Delete the scratch stream keys and every key under the scratch mirror prefix."""
    if keys:
        await client.delete(*keys)
    batch: list[str | bytes] = []
    async for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await client.delete(*batch)
            batch.clear()
    if batch:
        await client.delete(*batch)


async def verify(
    conn: asyncpg.Connection, label: str, expected: Expected, *, ingestd: bool = True
) -> None:
    """Raise BenchFailed unless the tables hold exactly the expected rows and sums.

    ``ingestd`` also checks what only ingestd does: no dead letters, no parked closes, and every
    order and trade linked to its position.
    """
    problems: list[str] = []
    for table in VERIFIED_TABLES:
        sums = SUM_COLUMNS[table]
        # Table and column names come from the fixed lists in ingestd.tools.bench.workload.
        select = ", ".join(["count(*)", *(f"sum({c})" for c in sums)])
        row = await conn.fetchrow(f"SELECT {select} FROM {table}")
        assert row is not None
        want_n = expected.counts.get(table, 0)
        if row[0] != want_n:
            problems.append(f"{row[0]} rows in {table}, expected {want_n}")
        for i, column in enumerate(sums, 1):
            want = expected.sums.get(f"{table}.{column}")
            if row[i] != want:
                problems.append(f"sum({table}.{column}) is {row[i]}, expected {want}")
    closed = await conn.fetchval("SELECT count(*) FROM positions WHERE status = 'CLOSED'")
    if closed != expected.closed_positions:
        problems.append(f"{closed} closed positions, expected {expected.closed_positions}")
    if ingestd:
        dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
        if dead:
            problems.append(f"{dead} dead letters")
        parked = await conn.fetchval("SELECT count(*) FROM position_closes_pending")
        if parked:
            problems.append(f"{parked} closes still parked")
        for table in ("orders", "trades"):
            unlinked = await conn.fetchval(
                f"SELECT count(*) FROM {table} "
                "WHERE position_key IS NOT NULL AND position_id IS NULL"
            )
            if unlinked:
                problems.append(f"{unlinked} {table} not linked to their position")
    if problems:
        raise BenchFailed(f"{label}: " + "; ".join(problems))
    log.info(
        "%s verified: %d events, %d rows, sums exact",
        label,
        expected.events,
        expected.rows,
        extra={"action": "bench_verified"},
    )


async def stream_pending(client: aioredis.Redis, key: str, group: str) -> int:
    """Entries delivered to ``group`` and not yet acknowledged."""
    summary = await client.xpending(key, group)
    return int(summary["pending"])


def parse_entry_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as ``(milliseconds, sequence)``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def last_entry_id(client: aioredis.Redis, key: str) -> tuple[int, int]:
    """The id of the newest entry of a stream."""
    newest = await client.xrevrange(key, count=1)
    if not newest:
        raise BenchFailed(f"stream {key} is empty")
    entry_id = newest[0][0]
    assert entry_id is not None
    return parse_entry_id(entry_id)


async def group_done(client: aioredis.Redis, key: str, group: str, last: tuple[int, int]) -> bool:
    """True once ``group`` was delivered every entry up to ``last`` and acknowledged them all."""
    for g in await client.xinfo_groups(key):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            delivered = g["last-delivered-id"]
            assert delivered is not None
            return int(g["pending"]) == 0 and parse_entry_id(delivered) >= last
    return False


async def wait_group_done(
    client: aioredis.Redis,
    key: str,
    group: str,
    last: tuple[int, int],
    *,
    deadline_s: float,
    label: str,
    poll_s: float = 0.01,
) -> None:
    """Wait until ``group`` has every entry up to ``last`` delivered and acknowledged.

    Redis's own group state is the signal (ingestd acknowledges an entry only after its commit),
    not a counter of the service under test.
    """
    end = time.monotonic() + deadline_s
    while not await group_done(client, key, group, last):
        if time.monotonic() >= end:
            pending = await stream_pending(client, key, group)
            raise BenchFailed(
                f"{label}: entries not all acknowledged after {deadline_s:.0f}s ({pending} pending)"
            )
        await asyncio.sleep(poll_s)
