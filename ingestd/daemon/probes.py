"""What ``/readyz`` checks, and the periodic sample of the stream behind the stream gauges.

Readiness means a commit can succeed now: the database answers AND takes a write (a probe
write into every table ingestd writes, which fails on a read-only database or a standby), the
schema is current, Redis answers, the stream key holds a stream (or nothing yet), and the
service is healthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from ingestd import errors
from ingestd.daemon import migrations
from ingestd.daemon.metrics import Metrics
from ingestd.daemon.sinks.postgres import probe_write
from ingestd.settings import redact

log = logging.getLogger("ingestd.daemon.probes")

# Each readiness check is bounded: a hung database must not hang the probe (nor the kubelet or
# compose waiting on it).
READY_CHECK_TIMEOUT_S: Final = 2.0
# XINFO GROUPS + XLEN every few seconds: cheap for Redis, and never per event.
STREAM_SAMPLE_INTERVAL_S: Final = 5.0
OK: Final = "ok"


async def _bounded(check: Awaitable[str], timeout_s: float) -> str:
    try:
        async with asyncio.timeout(timeout_s):
            return await check
    except TimeoutError:
        return f"timed out after {timeout_s:g}s"
    except errors.DriverError as exc:  # its text is the driver's "Type: message"
        return redact(str(exc))
    except (OSError, errors.IngestdError) as exc:
        return redact(f"{type(exc).__name__}: {exc}")


async def _database(pool: asyncpg.Pool, found: dict[str, str]) -> str:
    with errors.database_edge():
        async with pool.acquire() as conn:
            try:
                await migrations.check_current(conn)
            except errors.IngestdError as exc:
                found["schema"] = redact(str(exc))
            else:
                found["schema"] = OK
            try:
                with errors.database_edge():
                    await probe_write(conn)
            except errors.DatabaseError as exc:
                if exc.sqlstate is None:  # not refused by the server: the database is unreachable
                    raise
                found["commit"] = (
                    "the database is read-only (a standby, or read-only by default): "
                    f"{errors.driver_error(exc)}"
                    if exc.sqlstate == errors.READ_ONLY_SQL_TRANSACTION
                    else redact(f"a write cannot commit: {exc}")
                )
            else:
                found["commit"] = OK
    return OK


async def _redis(client: aioredis.Redis) -> str:
    with errors.redis_edge():
        await client.ping()
    return OK


async def _stream(client: aioredis.Redis, key: str) -> str:
    # XLEN, not TYPE: the ingestd Redis user may run the stream commands only, and XLEN answers
    # 0 for a missing key and WRONGTYPE for a key that holds something else.
    try:
        with errors.redis_edge():
            await client.xlen(key)
    except errors.RedisError as exc:
        if _is_wrong_type(exc):
            return wrong_type(key)
        raise
    return OK


def _is_wrong_type(exc: BaseException) -> bool:
    # A pipeline prefixes the reply: "Command # 1 (XINFO GROUPS k) of pipeline caused error: ..."
    return "WRONGTYPE" in str(exc)


def wrong_type(key: str) -> str:
    """The reason given when the stream's key holds something else."""
    return f"the stream key {key!r} holds another type, not a stream: nothing can be read"


async def readiness(
    pool: asyncpg.Pool | None,
    client: aioredis.Redis | None,
    *,
    accepting: bool,
    stream_key: str | None = None,
    timeout_s: float = READY_CHECK_TIMEOUT_S,
) -> tuple[bool, dict[str, str]]:
    """(ready, check -> "ok" or the reason): database, a write commits, schema current, Redis,
    the stream key (when the stream intake runs), intake open."""
    if pool is None or client is None:
        return False, {"service": "not started"}
    found: dict[str, str] = {
        "schema": "not checked: database unreachable",
        "commit": "not checked: database unreachable",
    }
    checks_run = [_bounded(_database(pool, found), timeout_s), _bounded(_redis(client), timeout_s)]
    if stream_key is not None:
        checks_run.append(_bounded(_stream(client, stream_key), timeout_s))
    database, redis_state, *stream_state = await asyncio.gather(*checks_run)
    checks = {
        "database": database,
        "commit": found["commit"],
        "schema": found["schema"],
        "redis": redis_state,
        "intake": OK if accepting else "draining: shutting down",
    }
    if stream_state:
        checks["stream"] = stream_state[0]
    return all(v == OK for v in checks.values()), checks


async def sample_stream(
    client: aioredis.Redis,
    key: str,
    group: str,
    metrics: Metrics,
    *,
    now_ms: int | None = None,
) -> None:
    """Store the group's pending count, lag and oldest pending entry's age and the stream's
    length in ``metrics``; ``metrics.stream_problem`` says why the stream cannot be read."""
    pipe = client.pipeline(transaction=False)
    pipe.xinfo_groups(key)
    pipe.xlen(key)
    try:
        groups, length = await pipe.execute()
    except redis.exceptions.ResponseError as exc:
        if _is_wrong_type(exc):
            # XREADGROUP can never succeed on it: intake has stopped, whatever else is well.
            metrics.stream_problem = wrong_type(key)
            metrics.stream_pending = metrics.stream_lag = metrics.stream_length = None
            metrics.stream_oldest_pending_s = metrics.stream_oldest_undelivered_s = None
            return
        if "no such key" not in str(exc).lower():
            raise
        groups, length = [], 0  # the stream does not exist yet: nothing is waiting
    metrics.stream_problem = None
    info: dict[str, Any] | None = next((g for g in groups if _text(g.get("name")) == group), None)
    metrics.stream_length = int(length)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if info is None:
        metrics.stream_pending = 0
        metrics.stream_lag = int(length)
        metrics.stream_oldest_pending_s = None
        # No group yet: every entry is undelivered (ingestd creates the group at id 0).
        first = await client.xrange(key, count=1) if length else []
        metrics.stream_oldest_undelivered_s = _age_of_first(first, now)
        return
    metrics.stream_pending = int(info["pending"])
    lag = info.get("lag")
    # Redis reports no lag when it cannot tell (entries deleted in the undelivered range).
    metrics.stream_lag = None if lag is None else int(lag)
    metrics.stream_oldest_pending_s = None
    if metrics.stream_pending:
        summary = await client.xpending(key, group)
        oldest = _text(summary.get("min")) if summary else None
        if oldest:
            metrics.stream_oldest_pending_s = _age_of_id(oldest, now)
    metrics.stream_oldest_undelivered_s = None
    last_delivered = _text(info.get("last-delivered-id"))
    if length and last_delivered and metrics.stream_lag != 0:
        # The first entry after the last one delivered (exclusive range, Redis 6.2+).
        first = await client.xrange(key, min="(" + last_delivered, count=1)
        metrics.stream_oldest_undelivered_s = _age_of_first(first, now)


def _age_of_id(entry_id: str, now_ms: int) -> float:
    # An entry id starts with the Redis server's clock (ms) when it was added.
    return max(0.0, (now_ms - int(entry_id.split("-", maxsplit=1)[0])) / 1000)


def _age_of_first(entries: Any, now_ms: int) -> float | None:
    """The age of the first of the entries XRANGE returned (None when it returned none)."""
    if not entries:
        return None
    return _age_of_id(_text(entries[0][0]) or "0", now_ms)


async def sample_stream_forever(
    client: aioredis.Redis,
    key: str,
    group: str,
    metrics: Metrics,
    interval_s: float = STREAM_SAMPLE_INTERVAL_S,
) -> None:
    """``sample_stream`` every ``interval_s``; failures are counted, logged once per outage."""
    failing = False
    reported: str | None = None
    while True:
        try:
            with errors.redis_edge():
                await sample_stream(client, key, group, metrics)
            if metrics.stream_problem is not None and metrics.stream_problem != reported:
                log.error("%s", metrics.stream_problem, extra={"action": "stream_unusable"})
            reported = metrics.stream_problem
        except errors.RedisError as exc:
            metrics.stream_sample_errors += 1
            cause = errors.driver_error(exc)
            if failing:
                # Two samples in a row (a blip is absorbed by the client's own retries).
                metrics.stream_problem = redact(f"cannot read the stream {key!r}: {cause}")
            if not failing:
                log.warning(
                    "cannot sample the stream: %s", cause, extra={"action": "stream_sample_failed"}
                )
                failing = True
        else:
            failing = False
        await asyncio.sleep(interval_s)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None
