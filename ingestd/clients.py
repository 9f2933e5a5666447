"""Every Redis client ingestd makes is made here (``ingestd.daemon.db`` makes the PostgreSQL ones).

redis-py's ``from_url`` sets no timeouts and no retries: a client made anywhere else would hang
on a dead server. One place keeps the settings alike, and says which differ and why (a
producer's publish rides out a Redis restart; the daemon's clients fail fast and let their caller
retry). The producer library uses this module, so it imports no PostgreSQL driver.
"""

from __future__ import annotations

from typing import Any, Final

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ingestd.redis_packing import use_hiredis_packing

# The daemon's and the commands' clients: two quick retries (about 0.05 s, 0.1 s), then the error
# goes to the caller, whose own loop (backoff, health, the pipeline's retry budget) decides.
DAEMON_RETRIES: Final = 2
DAEMON_BACKOFF: Final = (0.05, 1.0)  # base, cap in seconds
# A producer's publish waits through a Redis restart (about 0.1 s, 0.2 s, ... capped at 2 s per
# try) rather than fails; a chunk retried after a lost reply may be added twice, which is
# harmless: every event carries its event_id, so ingestd stores it once.
PRODUCER_RETRIES: Final = 20
PRODUCER_BACKOFF: Final = (0.1, 2.0)
# Pings an idle connection before use after this long, so a connection a server or a NAT dropped
# while idle fails fast and is replaced rather than timing out a real command.
HEALTH_CHECK_INTERVAL_S: Final = 30


def _redis_options(socket_timeout_s: float) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # RESP2: every reply shape ingestd parses (XREADGROUP, XINFO, INFO) is the RESP2 one.
        "protocol": 2,
    }


def redis_async(
    url: str,
    *,
    socket_timeout_s: float,
    retries: int = DAEMON_RETRIES,
    backoff: tuple[float, float] = DAEMON_BACKOFF,
) -> aioredis.Redis:
    """An asyncio Redis client with explicit timeouts and retries, packing commands in C."""
    base, cap = backoff
    client = aioredis.Redis.from_url(
        url,
        retry=AsyncRetry(ExponentialBackoff(cap=cap, base=base), retries),
        **_redis_options(socket_timeout_s),
    )
    use_hiredis_packing(client)
    return client


def redis_sync(
    url: str,
    *,
    socket_timeout_s: float,
    retries: int = DAEMON_RETRIES,
    backoff: tuple[float, float] = DAEMON_BACKOFF,
) -> redis.Redis:
    """A synchronous Redis client with explicit timeouts and retries."""
    base, cap = backoff
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=cap, base=base), retries),
        **_redis_options(socket_timeout_s),
    )
