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

from ingestd import clients

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


# Through a Redis restart a publish waits rather than fails (``ingestd.clients``).
DEFAULT_RETRIES = clients.PRODUCER_RETRIES
SOCKET_TIMEOUT_S = 5.0


_INSTANCES = itertools.count(1)


class _Ids:
    """``{prefix}-{n}`` ids unique per publisher instance (host, pid and start time in prefix),
    and the instance's ``session`` (host, pid, start time; at most 50 characters) for ``seq``."""

    def __init__(self, prefix: str | None) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        self.prefix = prefix or f"{socket.gethostname()[:30]}-{os.getpid()}-{stamp}"
        # Unique per run even when the caller chose the id prefix: a new run is a new session,
        # and so is each publisher or storage of one process (each counts from 0).
        started = stamp[:15]  # to the second: the instance number tells the rest apart
        self.session = f"{socket.gethostname()[:16]}-{os.getpid()}-{started}-{next(_INSTANCES)}"
        self._n = itertools.count(1)
        self._seq = itertools.count(0)

    def next(self) -> str:
        return f"{self.prefix}-{next(self._n)}"

    def next_seq(self) -> int:
        """The next ``seq`` of this session (0, 1, 2, ...; thread-safe)."""
        return next(self._seq)


# Public name for ingestd.producer.storage, which gives every event it logs an id of this form.
EventIds = _Ids


def encode(event: Mapping[str, Any], ids: _Ids, seq: int | None = None) -> bytes:
    """Serialise one event, adding an ``event_id`` when it has none, and ``seq`` (with the
    publisher's ``session``) when one is given and the event has none of its own."""
    if "event_id" not in event or event["event_id"] is None:
        event = {**event, "event_id": ids.next()}
    if seq is not None:
        event = {**event, "seq": seq, "session": ids.session}
    return orjson.dumps(event, default=_default, option=orjson.OPT_PASSTHROUGH_DATETIME)


def _numbered(event: Mapping[str, Any], counters: dict[str | None, int]) -> int | None:
    """The seq to give ``event`` (None when it carries its own), counted in ``counters``.

    Each producer is counted apart: ingestd looks for gaps per (producer, session), and one
    publisher (the simulator's, say) may send the events of several producers.
    A publisher advances its counters only once a publish has succeeded: a publish that raised
    and is called again with the same events numbers them the same, so ingestd sees no gap for
    events that were never sent (and stores a repeated event once, by its event_id).
    """
    if event.get("seq") is not None:
        return None
    producer = event.get("producer")
    key = producer if isinstance(producer, str) else None
    seq = counters.get(key, 0)
    counters[key] = seq + 1
    return seq


class Publisher:
    """Synchronous publisher (plain scripts)."""

    def __init__(
        self, client: redis.Redis, *, stream: str = DEFAULT_STREAM, id_prefix: str | None = None
    ) -> None:
        self._client = client
        self.stream = stream
        self._ids = _Ids(id_prefix)
        self._next_seq: dict[str | None, int] = {}

    @property
    def session(self) -> str:
        """This publisher's ``session``: every event it numbers carries it with its ``seq``."""
        return self._ids.session

    @classmethod
    def from_url(cls, url: str, *, retries: int = DEFAULT_RETRIES, **kwargs: Any) -> Publisher:
        """Connect with explicit timeouts; publishes ride through a Redis restart."""
        client = clients.redis_sync(
            url,
            socket_timeout_s=SOCKET_TIMEOUT_S,
            retries=retries,
            backoff=clients.PRODUCER_BACKOFF,
        )
        return cls(client, **kwargs)

    def publish(self, event: Mapping[str, Any]) -> str:
        """XADD one event; returns its stream entry id."""
        next_seq = dict(self._next_seq)
        seq = _numbered(event, next_seq)
        entry = self._client.xadd(self.stream, {"event": encode(event, self._ids, seq)})
        self._next_seq = next_seq
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def publish_many(self, events: Iterable[Mapping[str, Any]], *, chunk: int = 1000) -> int:
        """XADD many events in pipelined chunks; returns how many were added."""
        n = 0
        next_seq = dict(self._next_seq)
        pipe = self._client.pipeline(transaction=False)
        for ev in events:
            seq = _numbered(ev, next_seq)
            pipe.xadd(self.stream, {"event": encode(ev, self._ids, seq)})
            n += 1
            if n % chunk == 0:
                pipe.execute()
        pipe.execute()
        self._next_seq = next_seq
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
        self._next_seq: dict[str | None, int] = {}

    @property
    def session(self) -> str:
        """This publisher's ``session``: every event it numbers carries it with its ``seq``."""
        return self._ids.session

    @classmethod
    def from_url(cls, url: str, *, retries: int = DEFAULT_RETRIES, **kwargs: Any) -> AsyncPublisher:
        """Connect with explicit timeouts; publishes ride through a Redis restart."""
        client = clients.redis_async(
            url,
            socket_timeout_s=SOCKET_TIMEOUT_S,
            retries=retries,
            backoff=clients.PRODUCER_BACKOFF,
        )
        return cls(client, **kwargs)

    async def publish(self, event: Mapping[str, Any]) -> str:
        """XADD one event; returns its stream entry id."""
        next_seq = dict(self._next_seq)
        seq = _numbered(event, next_seq)
        entry = await self._client.xadd(self.stream, {"event": encode(event, self._ids, seq)})
        self._next_seq = next_seq
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def publish_many(self, events: Iterable[Mapping[str, Any]], *, chunk: int = 1000) -> int:
        """XADD many events in pipelined chunks; returns how many were added."""
        n = 0
        next_seq = dict(self._next_seq)
        pipe = self._client.pipeline(transaction=False)
        for ev in events:
            seq = _numbered(ev, next_seq)
            pipe.xadd(self.stream, {"event": encode(ev, self._ids, seq)})
            n += 1
            if n % chunk == 0:
                await pipe.execute()
        await pipe.execute()
        self._next_seq = next_seq
        return n

    async def publish_raw(self, payload: bytes) -> str:
        """XADD a payload exactly as given (already-encoded JSON, or a test's malformed one)."""
        entry = await self._client.xadd(self.stream, {"event": payload})
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
