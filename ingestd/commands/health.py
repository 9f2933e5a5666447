"""``ingestd health``: are the heartbeats in Redis fresh? (the container HEALTHCHECK)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import redis.exceptions

from ingestd.clients import redis_async
from ingestd.settings import Settings, redact
from ingestd.wire import keys

# How far ahead of this host's clock a heartbeat may be dated and still count (as just now): the
# clocks of two hosts kept by NTP differ by far less. Further ahead, the writer's clock is wrong,
# and a heartbeat from a wrong clock says nothing about when the component was last alive.
MAX_CLOCK_SKEW_S = 2.0


def heartbeat_age(value: bytes | str | None, now: dt.datetime) -> float | None:
    """Seconds since a ``health:*`` timestamp (never negative), or None when missing,
    unreadable, or dated more than ``MAX_CLOCK_SKEW_S`` in the future (not fresh)."""
    moment = _moment(value)
    if moment is None:
        return None
    age = (now - moment).total_seconds()
    if age < -MAX_CLOCK_SKEW_S:
        return None
    return max(age, 0.0)


def _seconds_ahead(value: bytes | str | None, now: dt.datetime) -> float | None:
    """How far in the future a readable heartbeat is dated (None: not readable or not ahead)."""
    moment = _moment(value)
    if moment is None or moment <= now:
        return None
    return (moment - now).total_seconds()


def _moment(value: bytes | str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.decode() if isinstance(value, bytes) else value)
    except (ValueError, UnicodeDecodeError):
        return None
    return moment if moment.tzinfo is not None else None


async def check_health(
    settings: Settings, components: Sequence[str], max_age_s: float
) -> tuple[bool, str]:
    """(ok, one-line reason) for the named components' heartbeats."""
    client = redis_async(settings.storage.redis.url, socket_timeout_s=2.0)
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
            ahead = _seconds_ahead(value, now)
            problems.append(
                f"{component}: no heartbeat"
                if ahead is None
                else f"{component}: heartbeat dated {ahead:.1f}s in the future (clock skew > "
                f"{MAX_CLOCK_SKEW_S:g}s)"
            )
        elif age > max_age_s:
            problems.append(f"{component}: last heartbeat {age:.1f}s ago (> {max_age_s:g}s)")
        else:
            ages.append(f"{component} {age:.1f}s")
    if problems:
        return False, "unhealthy: " + "; ".join(problems)
    return True, "healthy: " + ", ".join(ages)
