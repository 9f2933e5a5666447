"""What ``/readyz`` checks, and the periodic sample of the stream behind the stream gauges."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from ingestd import errors, migrations
from ingestd.metrics import Metrics
from ingestd.settings import redact

log = logging.getLogger("ingestd.probes")

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
    except (
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    ) as exc:
        return redact(f"{type(exc).__name__}: {exc}")
    except (redis.exceptions.RedisError, errors.IngestdError) as exc:
        return redact(f"{type(exc).__name__}: {exc}")


async def _database(pool: asyncpg.Pool, schema: dict[str, str]) -> str:
    async with pool.acquire() as conn:
        try:
            await migrations.check_current(conn)
        except errors.IngestdError as exc:
            schema["schema"] = redact(str(exc))
        else:
            schema["schema"] = OK
    return OK


async def _redis(client: aioredis.Redis) -> str:
    await client.ping()
    return OK


async def readiness(
    pool: asyncpg.Pool | None,
    client: aioredis.Redis | None,
    *,
    accepting: bool,
    timeout_s: float = READY_CHECK_TIMEOUT_S,
) -> tuple[bool, dict[str, str]]:
    """(ready, check -> "ok" or the reason): database, schema current, Redis, intake open."""
    if pool is None or client is None:
        return False, {"service": "not started"}
    schema: dict[str, str] = {"schema": "not checked: database unreachable"}
    database, redis_state = await asyncio.gather(
        _bounded(_database(pool, schema), timeout_s), _bounded(_redis(client), timeout_s)
    )
    checks = {
        "database": database,
        "schema": schema["schema"],
        "redis": redis_state,
        "intake": OK if accepting else "draining: shutting down",
    }
    return all(v == OK for v in checks.values()), checks


async def sample_stream(client: aioredis.Redis, key: str, group: str, metrics: Metrics) -> None:
    """Store the group's pending count and lag and the stream's length in ``metrics``."""
    pipe = client.pipeline(transaction=False)
    pipe.xinfo_groups(key)
    pipe.xlen(key)
    try:
        groups, length = await pipe.execute()
    except redis.exceptions.ResponseError as exc:
        if "no such key" not in str(exc).lower():
            raise
        groups, length = [], 0  # the stream does not exist yet: nothing is waiting
    info: dict[str, Any] | None = next((g for g in groups if _text(g.get("name")) == group), None)
    metrics.stream_length = int(length)
    if info is None:
        metrics.stream_pending = 0
        metrics.stream_lag = int(length)
        return
    metrics.stream_pending = int(info["pending"])
    lag = info.get("lag")
    # Redis reports no lag when it cannot tell (entries deleted in the undelivered range).
    metrics.stream_lag = None if lag is None else int(lag)


async def sample_stream_forever(
    client: aioredis.Redis,
    key: str,
    group: str,
    metrics: Metrics,
    interval_s: float = STREAM_SAMPLE_INTERVAL_S,
) -> None:
    """``sample_stream`` every ``interval_s``; failures are counted, logged once per outage."""
    failing = False
    while True:
        try:
            await sample_stream(client, key, group, metrics)
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.stream_sample_errors += 1
            if not failing:
                log.warning(
                    "cannot sample the stream: %s", exc, extra={"action": "stream_sample_failed"}
                )
                failing = True
        else:
            failing = False
        await asyncio.sleep(interval_s)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None
