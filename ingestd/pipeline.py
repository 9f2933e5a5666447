"""The pipeline: intake queue -> batcher -> writers (database commit, then mirror, then acks).

Sources put items on a bounded queue and wait while it is full. One loop cuts batches (size or
age); up to ``writers`` batches are written at once, each in one transaction. A batch is retried
with capped, fully jittered exponential backoff until it commits: nothing is acknowledged, and
nothing is dropped, before that. After the commit the mirror is written and each source hears which
of its items are done (the stream XACKs them; in-process callers are woken).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson

from ingestd import errors, events
from ingestd.batching import Acknowledger, Batcher, BatchOutcome, IntakeQueue, Item
from ingestd.deadletters import make_dead_letter
from ingestd.metrics import Metrics
from ingestd.settings import PipelineSettings
from ingestd.sinks.mirror import RedisMirror

log = logging.getLogger("ingestd.pipeline")


class Sink(Protocol):
    """Where batches are committed."""

    async def write(self, items: Sequence[Item]) -> BatchOutcome:
        """Commit the batch atomically or raise."""


class Outcome(enum.Enum):
    """What became of one in-process event."""

    COMMITTED = "committed"
    DEAD_LETTER = "dead_letter"


class Pipeline:
    """Batches items from every source into the sink, then mirrors and acknowledges them."""

    def __init__(
        self,
        sink: Sink,
        mirror: RedisMirror | None,
        settings: PipelineSettings,
        *,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.queue = IntakeQueue(settings.queue_max_events)
        self.metrics = metrics or Metrics()
        self._sink = sink
        self._mirror = mirror
        self._batcher = Batcher(settings.batch_max_rows, settings.batch_max_age_ms / 1000)
        self._slots = asyncio.Semaphore(settings.writers)
        self._writers: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    def start(self) -> None:
        """Start the batching loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="ingestd-batcher")

    @property
    def accepting(self) -> bool:
        """False once draining has begun."""
        return not self._closing

    @property
    def batching(self) -> bool:
        """False if the batching loop has ended although nobody asked it to (it crashed)."""
        task = self._loop_task
        return task is None or not task.done() or self._closing

    async def put(self, items: Sequence[Item]) -> None:
        """Queue items, waiting while the queue is full (backpressure)."""
        if self._closing:
            raise errors.ShuttingDown("ingestd is shutting down and accepts no new events")
        for it in items:
            self.metrics.events_received[it.event.type if it.event else "invalid"] += 1
        await self.queue.put_many(items)

    async def drain(self) -> None:
        """Stop intake, write everything queued and in flight, and return when all is done."""
        self._closing = True
        self.queue.wake()
        if self._loop_task is not None:
            await self._loop_task
        while self._writers:
            await asyncio.gather(*list(self._writers), return_exceptions=True)

    async def abort(self) -> None:
        """Cancel everything now; uncommitted work is simply not acknowledged."""
        self._closing = True
        tasks = [t for t in (self._loop_task, *self._writers) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        batcher = self._batcher
        queue = self.queue
        while True:
            if self._closing and not len(queue):
                if len(batcher):
                    await self._dispatch(batcher.take())
                return
            due = batcher.due_in()
            if not len(queue):
                arrived = await queue.wait(due)
                if not arrived and len(batcher):
                    await self._dispatch(batcher.take())
                continue
            for item in queue.take(max(1, batcher.room())):
                batcher.add(item)
            if batcher.full or batcher.due_in() == 0:
                await self._dispatch(batcher.take())

    async def _dispatch(self, items: list[Item]) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._write(items), name="ingestd-writer")
        self._writers.add(task)
        task.add_done_callback(self._writers.discard)

    async def _write(self, items: list[Item]) -> None:
        try:
            outcome = await self._commit(items)
        finally:
            self._slots.release()
        if self._mirror is not None:
            self._mirror.stage_events(items, outcome)
            await self._mirror.flush()
        by_source: dict[int, tuple[Acknowledger, list[Item]]] = {}
        for item in items:
            by_source.setdefault(id(item.source), (item.source, []))[1].append(item)
        for source, its in by_source.values():
            try:
                await source.acknowledge(its, outcome)
            except Exception:  # an ack failure must not kill the writer; entries are redelivered
                log.exception("acknowledgement failed", extra={"action": "ack_failed"})

    async def _commit(self, items: list[Item]) -> BatchOutcome:
        attempt = 0
        s = self.settings
        while True:
            started = time.monotonic()
            try:
                async with asyncio.timeout(s.flush_timeout_s):
                    outcome = await self._sink.write(items)
            except Exception as exc:  # noqa: BLE001 - every failure is retried: dropping loses events
                attempt += 1
                self.metrics.flush_retries += 1
                if self.metrics.flush_failing_since is None:
                    self.metrics.flush_failing_since = started
                delay = self._rng.uniform(0, min(s.backoff_cap_s, s.backoff_base_s * 2**attempt))
                level = logging.WARNING if errors.is_retriable(exc) else logging.ERROR
                log.log(
                    level,
                    "batch of %d not committed (attempt %d, retry in %.2fs): %s: %s",
                    len(items),
                    attempt,
                    delay,
                    type(exc).__name__,
                    exc,
                    extra={"action": "flush_retry"},
                )
                await asyncio.sleep(delay)
                continue
            m = self.metrics
            m.batches += 1
            m.last_commit_monotonic = time.monotonic()
            m.flush_failing_since = None
            m.duplicates += outcome.duplicates
            m.dead_letters += outcome.dead_letters
            for table, n in outcome.inserted.items():
                m.rows_written[table] += n
            m.observe_batch(items, outcome, time.monotonic() - started)
            if attempt:
                log.info(
                    "batch committed after %d retries", attempt, extra={"action": "flush_recovered"}
                )
            if outcome.rejected:
                for reason in outcome.rejected.values():
                    log.warning(
                        "event dead-lettered by the database: %s",
                        reason,
                        extra={"action": "dead_letter"},
                    )
            return outcome


class InProcessSource:
    """``await submit(event)`` for producers in the same process (DESIGN §4)."""

    name = "submit"

    def __init__(self, pipeline: Pipeline, *, max_event_bytes: int) -> None:
        self._pipeline = pipeline
        self._max_event_bytes = max_event_bytes

    def dead_letter_key(self, token: Any) -> str | None:
        """In-process events are never redelivered: no key needed."""
        return None

    async def submit(self, event: Mapping[str, Any] | bytes | str) -> Outcome:
        """Queue one event and wait until it is committed (or stored as a dead letter).

        Raises ``InvalidEvent`` for bad input, after it has been recorded in ``dead_letters``.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        raw: bytes | str | None = None
        try:
            if isinstance(event, bytes | str):
                raw = event
                parsed = events.decode_event(event, max_bytes=self._max_event_bytes)
            else:
                parsed = events.normalize(event)
            item = Item(parsed, None, self, fut, raw, time.monotonic())
        except errors.InvalidEvent as exc:
            if raw is None:
                raw = _repr_payload(event)
            etype = event.get("type") if isinstance(event, Mapping) else None
            dl = make_dead_letter(
                raw,
                str(exc),
                source=self.name,
                field=exc.field,
                event_type=etype if isinstance(etype, str) else None,
            )
            log.warning("invalid event rejected: %s", exc, extra={"action": "dead_letter"})
            await self._pipeline.put([Item(None, dl, self, fut, raw, time.monotonic())])
            await fut
            raise
        await self._pipeline.put([item])
        return await fut

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Wake the callers of the committed items."""
        for item in items:
            fut: asyncio.Future[Outcome] = item.token
            if fut.done():
                continue
            if item.event is None or id(item) in outcome.rejected:
                fut.set_result(Outcome.DEAD_LETTER)
            else:
                fut.set_result(Outcome.COMMITTED)


def _repr_payload(event: object) -> str:
    try:
        return orjson.dumps(event, default=str).decode()
    except TypeError:
        return repr(event)


def count_by_type(items: Sequence[Item]) -> Mapping[str, int]:
    """Items per event type (``invalid`` for dead letters), for logs and tests."""
    return collections.Counter(i.event.type if i.event else "invalid" for i in items)


async def cancel_quietly(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait for it, swallowing only its cancellation."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
