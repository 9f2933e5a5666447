"""``PostgresStorage``: producers log rows; ingestd's pipeline writes them to PostgreSQL.

``log_position_open(pos)`` and its siblings do not talk to PostgreSQL themselves (one round trip
per row is the slowest path there is, docs/performance.md): they append the wire event, with
its stable ``event_id``, to an outbox and return at once. A background publisher (a thread for plain
synchronous code, a task for asyncio) sends the outbox in chunks, one pipelined round trip per
chunk, to the Redis Stream that ``ingestd run`` consumes (or, in-process, to ``Service.submit``),
and ingestd COPY-batches them into the database.

The outbox is a ``DiskOutbox`` (``storage.outbox.dir``, what ``create_storage`` and
``from_settings`` give the ``postgres`` backend): ``log_*`` writes the event to local disk before
it returns and never waits for Redis, a killed producer loses nothing it logged, and a full
outbox makes ``log_*`` raise ``OutboxFull`` (see ``ingestd.producer.storage.outbox``). Without one,
the
in-memory ``Outbox`` holds the events: ``overflow="block"`` makes ``log_*`` wait when it is full
(backpressure); dual write uses ``overflow="drop_oldest"``, because its CSV files hold every event
already (see ``ingestd.producer.storage.dual``). While the stream is unreachable the publisher
retries with
capped, jittered backoff; a retried chunk may land twice in the stream, and its event ids make it
one row. ``flush()`` returns once everything logged before it is in the stream (in-process:
committed); ``close()`` flushes first. A synchronous storage still open when the interpreter exits
is closed by an ``atexit`` handler, bounded by ``exit_timeout_s``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol

import orjson
import redis
import redis.asyncio as aioredis
import redis.exceptions

from ingestd import errors
from ingestd.clients import redis_async, redis_sync
from ingestd.producer.publisher import DEFAULT_STREAM
from ingestd.producer.storage.base import AsyncLogMethods, EventBuilder, LogMethods
from ingestd.producer.storage.outbox import (
    Backoff,
    DiskOutbox,
    Outbox,
    OutboxError,
    OutboxState,
    Overflow,
    Pending,
    Spilled,
    open_disk_outbox,
)
from ingestd.settings import Settings

log = logging.getLogger("ingestd.producer.storage.postgres")

DEFAULT_MAX_BUFFER_EVENTS = 100_000
DEFAULT_CHUNK_EVENTS = 1000
DEFAULT_LINGER_S = 0.05
DEFAULT_CLOSE_TIMEOUT_S = 10.0
# A process that exits without close() still publishes what it logged, for at most this long.
DEFAULT_EXIT_TIMEOUT_S = 5.0

# What a failed publish can raise: the stream or in-process service is unreachable for now.
_RETRIABLE = (redis.exceptions.RedisError, OSError, errors.IngestdError)


class _Health:
    """Logs the first failure of an outage, its recovery, and drops: once per outage, that is once
    until publishing works again and the outbox has room; the next drops are logged again."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._drops_logged = False

    def failed(self, exc: BaseException, pending: int) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning(
                "cannot publish to %s (%s); %d events held, retrying",
                self.target,
                self.last_error,
                pending,
                extra={"action": "storage_publish_failed"},
            )

    def recovered(self, outbox: Outbox) -> None:
        """After a chunk was published."""
        if self.failing_since is not None:
            dropped = outbox.recent_drops
            log.info(
                "publishing to %s again after %.1fs%s",
                self.target,
                time.monotonic() - self.failing_since,
                f" ({dropped} event(s) dropped from memory meanwhile)" if dropped else "",
                extra={"action": "storage_publish_recovered"},
            )
            self.failing_since = None
            self.last_error = None
        if self._drops_logged and not outbox.full:
            # The outage is over (drops may start before a publish has even failed): the next
            # drops are another outage's, and are logged again.
            outbox.reset_recent_drops()
            self._drops_logged = False

    def dropped(self, outbox: Outbox) -> None:
        if outbox.recent_drops and not self._drops_logged:
            log.warning(
                "outbox full (%d events) while %s is unreachable: dropping the oldest from memory "
                "(first %s); the CSV files hold them: run `ingestd import-csv DIR` to catch up",
                outbox.max_events,
                self.target,
                outbox.first_recent_drop,
                extra={"action": "storage_outbox_dropped"},
            )
            self._drops_logged = True

    def unavailable(self, unsent: int) -> errors.SinkUnavailable:
        return errors.SinkUnavailable(
            f"{unsent} event(s) not yet published to {self.target}"
            + (f": {self.last_error}" if self.last_error else "")
        )


def _outbox_state(disk: DiskOutbox | None, pending: int, health: _Health) -> OutboxState:
    publishing = health.failing_since is None
    if disk is None:
        return OutboxState(None, pending, 0, 0, False, 0, publishing)
    return OutboxState(
        str(disk.directory),
        pending,
        disk.size_bytes,
        disk.max_bytes,
        disk.alarm,
        disk.refused,
        publishing,
        disk.broken,
    )


def _kept_on_disk(pending: int, disk: DiskOutbox, failure: errors.SinkUnavailable) -> None:
    """Closing while the stream is unreachable: nothing is lost, the next start publishes it."""
    log.warning(
        "closing with %d unpublished event(s) kept in outbox %s; the next start of this "
        "producer (same outbox directory) publishes them first: %s",
        pending,
        disk.directory,
        failure,
        extra={"action": "storage_closed_unsent"},
    )


def _validate(chunk_events: int, linger_s: float) -> None:
    if chunk_events < 1 or linger_s < 0:
        raise ValueError("chunk_events must be >= 1 and linger_s >= 0")


class PostgresStorage(LogMethods):
    """``PostgresStorage`` for synchronous code: buffered, pipelined stream publishing."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = DEFAULT_STREAM,
        producer: str | None = None,
        id_prefix: str | None = None,
        max_buffer_events: int = DEFAULT_MAX_BUFFER_EVENTS,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
        linger_s: float = DEFAULT_LINGER_S,
        overflow: Overflow = "block",
        owns_client: bool = False,
        exit_timeout_s: float = DEFAULT_EXIT_TIMEOUT_S,
        outbox: DiskOutbox | None = None,
    ) -> None:
        _validate(chunk_events, linger_s)
        self._client = client
        # Given, every event goes through this directory and log_* never waits for Redis; the
        # in-memory outbox (and ``overflow``) serves only storages without one.
        self._disk = outbox
        self._exit_timeout_s = exit_timeout_s
        self._at_exit: Callable[[], None] | None = None
        self.stream = stream
        self._events = EventBuilder(producer, id_prefix)
        self._outbox = Outbox(max_buffer_events, overflow=overflow)
        self._chunk = chunk_events
        self._linger_s = linger_s
        self._owns_client = owns_client
        self._cond = threading.Condition()
        self._health = _Health(f"stream {stream}")
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._urgent = 0  # flush() callers waiting: send without lingering
        self.round_trips = 0
        if outbox is not None and len(outbox):
            with self._cond:
                self._start_publisher()  # an earlier run's events go first, logged or not

    @classmethod
    def from_settings(
        cls, settings: Settings, *, producer: str | None = None, **kwargs: Any
    ) -> PostgresStorage:
        """Publish to the configured Redis and stream, through ``storage.outbox.dir``."""
        if "outbox" not in kwargs:
            kwargs["outbox"] = open_disk_outbox(settings.storage.outbox, producer)
        try:
            client = redis_sync(
                settings.storage.redis.url, socket_timeout_s=settings.storage.redis.socket_timeout_s
            )
        except BaseException:
            if kwargs["outbox"] is not None:
                kwargs["outbox"].close()
            raise
        kwargs.setdefault("max_buffer_events", settings.storage.buffer_max_events)
        return cls(
            client, stream=settings.stream.key, producer=producer, owns_client=True, **kwargs
        )

    def __enter__(self) -> PostgresStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- state, for callers and tests -------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events logged but not yet published (with a disk outbox: an earlier run's too)."""
        with self._cond:
            return self._added - self._settled

    @property
    def _added(self) -> int:
        return self._outbox.added if self._disk is None else self._disk.added

    @property
    def _settled(self) -> int:
        return self._outbox.settled if self._disk is None else self._disk.settled

    def outbox_state(self) -> OutboxState:
        """The outbox: pending events, bytes on disk, and the full alarm (see DiskOutbox)."""
        return _outbox_state(self._disk, self.pending, self._health)

    @property
    def dropped(self) -> int:
        """Events dropped from memory under ``overflow="drop_oldest"``."""
        return self._outbox.dropped

    @property
    def sent(self) -> int:
        """Events published."""
        return self._outbox.sent if self._disk is None else self._disk.sent

    @property
    def target(self) -> str:
        """Where events are published, for messages (``stream ingestd:events``)."""
        return self._health.target

    # --- producing --------------------------------------------------------------------------------

    def _start_publisher(self) -> None:
        """Under ``_cond``: start the publisher thread once."""
        if self._thread is None:
            # A daemon thread, so that a forgotten close() never keeps the process alive; the
            # exit handler publishes what is left, for at most exit_timeout_s.
            self._thread = threading.Thread(
                target=self._run, name="ingestd-storage-publisher", daemon=True
            )
            self._thread.start()
            self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
            atexit.register(self._at_exit)

    def _emit(self, event: dict[str, Any]) -> str:
        event = self._events.numbered(event)
        event_id: str = event["event_id"]
        payload = orjson.dumps(event)
        if self._disk is not None:
            return self._emit_to_disk(event_id, payload)
        item = Pending(event_id, payload)
        with self._cond:
            if self._closing:
                raise errors.ShuttingDown("this PostgresStorage is closed")
            self._start_publisher()
            while self._outbox.overflow == "block" and self._outbox.full:
                self._cond.wait()  # backpressure: the publisher makes room
            was_empty = not len(self._outbox)
            self._outbox.add(item)
            if self._outbox.dropped:
                self._health.dropped(self._outbox)
            if was_empty or len(self._outbox) >= self._chunk:
                self._cond.notify_all()
        return event_id

    def _emit_to_disk(self, event_id: str, payload: bytes) -> str:
        disk = self._disk
        assert disk is not None
        with self._cond:
            if self._closing:
                raise errors.ShuttingDown("this PostgresStorage is closed")
            self._start_publisher()
        try:
            unread = disk.append(payload)  # written before we return: survives kill -9
        except OutboxError as exc:
            exc.add_note(f"event_id {event_id} was not logged")
            raise
        # Wake the publisher when it may be waiting: for a first event, or a full chunk.
        if unread in (1, self._chunk):
            with self._cond:
                self._cond.notify_all()
        return event_id

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything logged so far is in the stream; SinkUnavailable on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._added
            if self._settled >= target:
                return
            self._urgent += 1
            self._cond.notify_all()
            try:
                while self._settled < target:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise self._health.unavailable(target - self._settled)
                    if self._thread is None or not self._thread.is_alive():
                        raise self._health.unavailable(target - self._settled)
                    self._cond.wait(remaining)
            finally:
                self._urgent -= 1

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Flush (up to ``timeout``), stop the publisher; SinkUnavailable if events remain."""
        if self._closed:
            return
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        failure: errors.SinkUnavailable | None = None
        try:
            if self._thread is not None:
                self.flush(timeout)
        except errors.SinkUnavailable as exc:
            failure = exc
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self._closed = True
        if self._owns_client:
            self._client.close()
        if self._disk is not None:
            self._disk.close()
            if failure is not None:
                _kept_on_disk(self.pending, self._disk, failure)
            return
        if failure is not None:
            log.error(
                "closing with %d unpublished event(s): %s",
                self.pending,
                failure,
                extra={"action": "storage_closed_unsent"},
            )
            raise failure

    # --- the publisher thread ---------------------------------------------------------------------

    def _unread(self) -> int:
        return len(self._outbox) if self._disk is None else len(self._disk)

    def _run(self) -> None:
        backoff = Backoff()
        disk = self._disk
        while True:
            with self._cond:
                while not self._unread():
                    if self._closing:
                        return
                    self._cond.wait()
                deadline = time.monotonic() + self._linger_s
                # Linger briefly so that one round trip carries many events.
                while self._unread() < self._chunk and not (self._closing or self._urgent):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                in_memory = self._outbox.take(self._chunk) if disk is None else []
            # The disk outbox is read outside _cond: log_* never waits for that read.
            spilled = disk.take(self._chunk) if disk is not None else []
            batch: Sequence[Pending | Spilled] = in_memory or spilled
            try:
                self._send(batch)
            except Exception as exc:  # the publisher outlives any failure; its events stay queued
                if not isinstance(exc, _RETRIABLE):
                    log.exception("unexpected publish failure", extra={"action": "storage_bug"})
                if disk is not None:
                    disk.put_back(spilled)
                with self._cond:
                    self._outbox.put_back(in_memory)
                    self._health.failed(exc, self._added - self._settled)
                    if self._closing:
                        return
                    self._cond.notify_all()
                    self._cond.wait(backoff.next_delay())
                continue
            backoff.reset()
            if disk is not None:
                disk.settle(spilled)
            with self._cond:
                self._outbox.settle(in_memory)
                self._health.recovered(self._outbox)
                self._cond.notify_all()

    def _send(self, batch: Sequence[Pending | Spilled]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for item in batch:
            pipe.xadd(self.stream, {"event": item.payload})
        self.round_trips += 1
        pipe.execute()


def _close_at_exit(ref: weakref.ref[PostgresStorage]) -> None:
    """At interpreter exit: close a storage its owner did not close (bounded; logged if late)."""
    storage = ref()
    if storage is None or storage._closed:
        return
    if storage.pending:
        log.warning(
            "exiting without PostgresStorage.close(): publishing %d pending event(s) for up to "
            "%.0fs%s",
            storage.pending,
            storage._exit_timeout_s,
            "" if storage._disk is None else f" (outbox {storage._disk.directory} keeps the rest)",
            extra={"action": "storage_exit_flush"},
        )
    with contextlib.suppress(errors.SinkUnavailable):  # close() logged what stayed unsent
        storage.close(storage._exit_timeout_s)


class _Transport(Protocol):
    """Where the asyncio publisher sends a chunk."""

    target: str

    async def send(self, batch: Sequence[Pending | Spilled]) -> None:
        """Deliver every event of the chunk or raise."""

    async def aclose(self) -> None:
        """Release the transport's resources."""


class StreamTransport:
    """XADD a chunk in one pipelined round trip."""

    def __init__(self, client: aioredis.Redis, stream: str, *, owns_client: bool) -> None:
        self._client = client
        self.stream = stream
        self.target = f"stream {stream}"
        self._owns_client = owns_client

    async def send(self, batch: Sequence[Pending | Spilled]) -> None:
        """XADD every event of the chunk."""
        pipe = self._client.pipeline(transaction=False)
        for item in batch:
            pipe.xadd(self.stream, {"event": item.payload})
        await pipe.execute()

    async def aclose(self) -> None:
        """Close the client if this transport made it."""
        if self._owns_client:
            await self._client.aclose()


class InProcessService(Protocol):
    """What in-process publishing needs of ``ingestd.Service``.

    A protocol, not the class: the producer library does not import the daemon (a collector
    publishing to Redis must not load the pipeline, asyncpg and prometheus_client for it).
    """

    @property
    def settings(self) -> Settings: ...

    async def submit(self, event: bytes) -> object:
        """Accept one event; returns once it is committed (or durably held)."""
        ...


class InProcessTransport:
    """``Service.submit`` every event of a chunk at once; returns once they are committed."""

    target = "in-process ingestd"

    def __init__(self, service: InProcessService) -> None:
        self._service = service

    async def send(self, batch: Sequence[Pending | Spilled]) -> None:
        """Submit the chunk concurrently (the pipeline batches it); raise if any is not done."""
        results = await asyncio.gather(
            *(self._service.submit(item.payload) for item in batch), return_exceptions=True
        )
        for result in results:
            # An invalid event is done: it was stored in dead_letters. Anything else is retried.
            if isinstance(result, BaseException) and not isinstance(result, errors.InvalidEvent):
                raise result

    async def aclose(self) -> None:
        """The service belongs to the caller."""


class AsyncPostgresStorage(AsyncLogMethods):
    """``PostgresStorage`` for asyncio code: via the Redis Stream, or in-process via ``Service``."""

    def __init__(
        self,
        transport: _Transport,
        *,
        producer: str | None = None,
        id_prefix: str | None = None,
        max_buffer_events: int = DEFAULT_MAX_BUFFER_EVENTS,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
        linger_s: float = DEFAULT_LINGER_S,
        overflow: Overflow = "block",
        outbox: DiskOutbox | None = None,
    ) -> None:
        _validate(chunk_events, linger_s)
        self._transport = transport
        self._disk = outbox  # as in PostgresStorage
        self._events = EventBuilder(producer, id_prefix)
        self._outbox = Outbox(max_buffer_events, overflow=overflow)
        self._chunk = chunk_events
        self._linger_s = linger_s
        self._health = _Health(transport.target)
        self._cond: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._urgent = 0
        self.round_trips = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, *, producer: str | None = None, **kwargs: Any
    ) -> AsyncPostgresStorage:
        """Publish to the configured Redis and stream, through ``storage.outbox.dir``."""
        if "outbox" not in kwargs:
            kwargs["outbox"] = open_disk_outbox(settings.storage.outbox, producer)
        r = settings.storage.redis
        try:
            client = redis_async(r.url, socket_timeout_s=r.socket_timeout_s)
        except BaseException:
            if kwargs["outbox"] is not None:
                kwargs["outbox"].close()
            raise
        kwargs.setdefault("max_buffer_events", settings.storage.buffer_max_events)
        transport = StreamTransport(client, settings.stream.key, owns_client=True)
        return cls(transport, producer=producer, **kwargs)

    @classmethod
    def in_process(
        cls, service: InProcessService, *, producer: str | None = None, **kwargs: Any
    ) -> AsyncPostgresStorage:
        """Submit to a running ``Service`` in this process (``flush`` then means committed)."""
        kwargs.setdefault("chunk_events", service.settings.pipeline.batch_max_rows)
        return cls(InProcessTransport(service), producer=producer, **kwargs)

    async def __aenter__(self) -> AsyncPostgresStorage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def pending(self) -> int:
        """Events logged but not yet published (with a disk outbox: an earlier run's too)."""
        return self._added - self._settled

    @property
    def _added(self) -> int:
        return self._outbox.added if self._disk is None else self._disk.added

    @property
    def _settled(self) -> int:
        return self._outbox.settled if self._disk is None else self._disk.settled

    def _unread(self) -> int:
        return len(self._outbox) if self._disk is None else len(self._disk)

    def outbox_state(self) -> OutboxState:
        """The outbox: pending events, bytes on disk, and the full alarm (see DiskOutbox)."""
        return _outbox_state(self._disk, self.pending, self._health)

    @property
    def dropped(self) -> int:
        """Events dropped from memory under ``overflow="drop_oldest"``."""
        return self._outbox.dropped

    @property
    def sent(self) -> int:
        """Events published."""
        return self._outbox.sent if self._disk is None else self._disk.sent

    @property
    def target(self) -> str:
        """Where events are published, for messages (``stream ingestd:events``)."""
        return self._health.target

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def _start_publisher(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ingestd-storage-publisher")

    async def _emit(self, event: dict[str, Any]) -> str:
        event = self._events.numbered(event)
        event_id: str = event["event_id"]
        payload = orjson.dumps(event)
        cond = self._condition()
        if self._disk is not None:
            if self._closing:
                raise errors.ShuttingDown("this AsyncPostgresStorage is closed")
            self._start_publisher()
            try:
                if self._disk.fsync_interval_s == 0:
                    # An fsync per event: never on the event loop.
                    unread = await asyncio.to_thread(self._disk.append, payload)
                else:
                    # One pwrite(2) into the page cache (microseconds): done before we return,
                    # so that kill -9 loses nothing; the fsync is the outbox's own thread's.
                    unread = self._disk.append(payload)
            except OutboxError as exc:
                exc.add_note(f"event_id {event_id} was not logged")
                raise
            if unread in (1, self._chunk):
                async with cond:
                    cond.notify_all()
            return event_id
        item = Pending(event_id, payload)
        async with cond:
            if self._closing:
                raise errors.ShuttingDown("this AsyncPostgresStorage is closed")
            self._start_publisher()
            if self._outbox.overflow == "block":
                await cond.wait_for(lambda: not self._outbox.full)
            was_empty = not len(self._outbox)
            self._outbox.add(item)
            if self._outbox.dropped:
                self._health.dropped(self._outbox)
            if was_empty or len(self._outbox) >= self._chunk:
                cond.notify_all()
        return event_id

    async def flush(self) -> None:
        """Wait until everything logged so far is published (bound it with ``asyncio.timeout``)."""
        cond = self._condition()
        async with cond:
            target = self._added
            if self._settled >= target:
                return
            if self._task is None and self._disk is not None:
                self._start_publisher()  # an earlier run's events, nothing logged yet
            if self._task is None or self._task.done():
                raise self._health.unavailable(target - self._settled)
            self._urgent += 1
            cond.notify_all()
            try:
                await cond.wait_for(lambda: self._settled >= target)
            finally:
                self._urgent -= 1

    async def aclose(self, grace_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Flush (for up to ``grace_s``), stop the publisher; SinkUnavailable if events remain."""
        if self._closed:
            return
        failure: errors.SinkUnavailable | None = None
        try:
            async with asyncio.timeout(grace_s):
                await self.flush()
        except TimeoutError:
            failure = self._health.unavailable(self.pending)
        except errors.SinkUnavailable as exc:
            failure = exc
        cond = self._condition()
        async with cond:
            self._closing = True
            cond.notify_all()
        if self._task is not None:
            try:
                async with asyncio.timeout(grace_s):
                    await self._task
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._closed = True
        await self._transport.aclose()
        if self._disk is not None:
            await asyncio.to_thread(self._disk.close)
            if failure is not None:
                _kept_on_disk(self.pending, self._disk, failure)
            return
        if failure is not None:
            log.error(
                "closing with %d unpublished event(s): %s",
                self.pending,
                failure,
                extra={"action": "storage_closed_unsent"},
            )
            raise failure

    async def _run(self) -> None:
        cond = self._condition()
        backoff = Backoff()
        disk = self._disk
        while True:
            async with cond:
                await cond.wait_for(lambda: bool(self._unread()) or self._closing)
                if not self._unread():
                    return
                if not (self._closing or self._urgent):
                    # Linger briefly so that one round trip carries many events.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._linger_s):
                            await cond.wait_for(
                                lambda: (
                                    self._unread() >= self._chunk
                                    or self._closing
                                    or bool(self._urgent)
                                )
                            )
                in_memory = self._outbox.take(self._chunk) if disk is None else []
            spilled = await asyncio.to_thread(disk.take, self._chunk) if disk is not None else []
            batch: Sequence[Pending | Spilled] = in_memory or spilled
            try:
                self.round_trips += 1
                await self._transport.send(batch)
            except Exception as exc:  # the publisher outlives any failure; its events stay queued
                if not isinstance(exc, _RETRIABLE):
                    log.exception("unexpected publish failure", extra={"action": "storage_bug"})
                if disk is not None:
                    disk.put_back(spilled)
                async with cond:
                    self._outbox.put_back(in_memory)
                    self._health.failed(exc, self._added - self._settled)
                    if self._closing:
                        return
                    cond.notify_all()
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if disk is not None:
                await asyncio.to_thread(disk.settle, spilled)
            async with cond:
                self._outbox.settle(in_memory)
                self._health.recovered(self._outbox)
                cond.notify_all()
