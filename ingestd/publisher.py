"""The producer side of the stream: what collector, paper and live use to hand events to ingestd.

    publisher = Publisher.from_url("redis://127.0.0.1:6379/0")
    publisher.publish({"type": "fx_rate", "event_id": "fx-1", ...})

Every event gets an ``event_id`` (the idempotency key) if it has none, so that a publish retried
after a timeout lands once. Decimals and datetimes are serialised exactly (as strings).
"""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DEFAULT_STREAM = "ingestd:events"


def _default(value: object) -> str:
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise TypeError(f"{value} is not a finite decimal")
        return format(value, "f")
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise TypeError("naive datetime: give it a time zone")
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


# Through a Redis restart a publish waits (about 0.1 s, 0.2 s, ... capped at 2 s per try)
# rather than fails; a chunk retried after a lost reply may be added twice, which is harmless:
# every event carries its event_id, so ingestd stores it once.
DEFAULT_RETRIES = 20


def _client_options(retries: int) -> dict[str, Any]:
    # redis-py's from_url() sets no retry and no timeouts unless asked (RELIABILITY.md).
    return {
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "protocol": 2,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    }


class _Ids:
    """``{prefix}-{n}`` ids unique per publisher instance (host, pid and start time in prefix)."""

    def __init__(self, prefix: str | None) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        self.prefix = prefix or f"{socket.gethostname()[:30]}-{os.getpid()}-{stamp}"
        self._n = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self._n)}"


# Public name for ingestd.storage, which gives every event it logs an id of this form.
EventIds = _Ids


def encode(event: Mapping[str, Any], ids: _Ids) -> bytes:
    """Serialise one event, adding an ``event_id`` when it has none."""
    if "event_id" not in event or event["event_id"] is None:
        event = {**event, "event_id": ids.next()}
    return orjson.dumps(event, default=_default, option=orjson.OPT_PASSTHROUGH_DATETIME)


class Publisher:
    """Synchronous publisher (plain scripts, the seed's style)."""

    def __init__(
        self, client: redis.Redis, *, stream: str = DEFAULT_STREAM, id_prefix: str | None = None
    ) -> None:
        self._client = client
        self.stream = stream
        self._ids = _Ids(id_prefix)

    @classmethod
    def from_url(cls, url: str, *, retries: int = DEFAULT_RETRIES, **kwargs: Any) -> Publisher:
        """Connect with explicit timeouts; publishes ride through a Redis restart."""
        client = redis.Redis.from_url(url, **_client_options(retries))
        return cls(client, **kwargs)

    def publish(self, event: Mapping[str, Any]) -> str:
        """XADD one event; returns its stream entry id."""
        entry = self._client.xadd(self.stream, {"event": encode(event, self._ids)})
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def publish_many(self, events: Iterable[Mapping[str, Any]], *, chunk: int = 1000) -> int:
        """XADD many events in pipelined chunks; returns how many were added."""
        n = 0
        pipe = self._client.pipeline(transaction=False)
        for ev in events:
            pipe.xadd(self.stream, {"event": encode(ev, self._ids)})
            n += 1
            if n % chunk == 0:
                pipe.execute()
        pipe.execute()
        return n

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


class AsyncPublisher:
    """Asyncio publisher for producers that run an event loop."""

    def __init__(
        self, client: aioredis.Redis, *, stream: str = DEFAULT_STREAM, id_prefix: str | None = None
    ) -> None:
        self._client = client
        self.stream = stream
        self._ids = _Ids(id_prefix)

    @classmethod
    def from_url(cls, url: str, *, retries: int = DEFAULT_RETRIES, **kwargs: Any) -> AsyncPublisher:
        """Connect with explicit timeouts; publishes ride through a Redis restart."""
        options = _client_options(retries)
        options["retry"] = AsyncRetry(ExponentialBackoff(cap=2.0, base=0.1), retries)
        client = aioredis.Redis.from_url(url, **options)
        return cls(client, **kwargs)

    async def publish(self, event: Mapping[str, Any]) -> str:
        """XADD one event; returns its stream entry id."""
        entry = await self._client.xadd(self.stream, {"event": encode(event, self._ids)})
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def publish_many(self, events: Iterable[Mapping[str, Any]], *, chunk: int = 1000) -> int:
        """XADD many events in pipelined chunks; returns how many were added."""
        n = 0
        pipe = self._client.pipeline(transaction=False)
        for ev in events:
            pipe.xadd(self.stream, {"event": encode(ev, self._ids)})
            n += 1
            if n % chunk == 0:
                await pipe.execute()
        await pipe.execute()
        return n

    async def publish_raw(self, payload: bytes) -> str:
        """XADD a payload exactly as given (already-encoded JSON, or a test's malformed one)."""
        entry = await self._client.xadd(self.stream, {"event": payload})
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
