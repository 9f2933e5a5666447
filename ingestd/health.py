"""``ingestd health``: are the heartbeats in Redis fresh? (the container HEALTHCHECK)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import redis.exceptions

from ingestd import keys
from ingestd.app import create_redis
from ingestd.settings import Settings, redact


def heartbeat_age(value: bytes | str | None, now: dt.datetime) -> float | None:
    """Seconds since a ``health:*`` timestamp, or None when missing or unreadable."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.decode() if isinstance(value, bytes) else value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return (now - moment).total_seconds()


async def check_health(
    settings: Settings, components: Sequence[str], max_age_s: float
) -> tuple[bool, str]:
    """(ok, one-line reason) for the named components' heartbeats."""
    client = create_redis(settings.storage.redis.url, socket_timeout_s=2.0)
    prefix = settings.storage.redis.key_prefix
    try:
        values = await client.mget([prefix + keys.health(c) for c in components])
    except (redis.exceptions.RedisError, OSError) as exc:
        return False, redact(f"unhealthy: cannot read Redis at {settings.storage.redis.url}: {exc}")
    finally:
        await client.aclose()
    now = dt.datetime.now(dt.UTC)
    problems = []
    ages = []
    for component, value in zip(components, values, strict=True):
        age = heartbeat_age(value, now)
        if age is None:
            problems.append(f"{component}: no heartbeat")
        elif age > max_age_s:
            problems.append(f"{component}: last heartbeat {age:.1f}s ago (> {max_age_s:g}s)")
        else:
            ages.append(f"{component} {age:.1f}s")
    if problems:
        return False, "unhealthy: " + "; ".join(problems)
    return True, "healthy: " + ", ".join(ages)
