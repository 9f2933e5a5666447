"""The pipeline: intake queue -> batcher -> writers (database commit, then mirror, then acks).

Sources (``ingestd.sources``) put items on a bounded queue and wait while it is full. One loop
cuts batches (size or age); up to ``writers`` batches are written at once, each in one
transaction. A batch is retried with capped, fully jittered exponential backoff until it
commits: nothing is acknowledged, and nothing is dropped, before that. After the commit the
mirror is written and each source hears which of its items are done (the stream XACKs them;
in-process callers are woken; the spool marks records committed).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ingestd import errors, failpoints
from ingestd.batching import Acknowledger, Batcher, BatchOutcome, IntakeQueue, Item
from ingestd.metrics import Metrics
from ingestd.settings import PipelineSettings
from ingestd.sinks.mirror import RedisMirror

log = logging.getLogger("ingestd.pipeline")


class Sink(Protocol):
    """Where batches are committed."""

    async def write(self, items: Sequence[Item]) -> BatchOutcome:
        """Commit the batch atomically or raise."""


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
        self.queue = IntakeQueue(settings.queue_max_events, settings.queue_max_bytes)
        self.metrics = metrics or Metrics()
        self._sink = sink
        self._mirror = mirror
        self._batcher = Batcher(
            settings.batch_max_rows,
            settings.batch_max_age_ms / 1000,
            max_bytes=settings.batch_max_bytes,
        )
        self._slots = asyncio.Semaphore(settings.writers)
        self._writers: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._on_failure: list[Callable[[BaseException], None]] = []

    def start(self) -> None:
        """Start the batching loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="ingestd-batcher")
            self._loop_task.add_done_callback(self._loop_ended)

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback`` if the batching loop dies: its waiters must not wait forever."""
        self._on_failure.append(callback)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        log.critical(
            "the batching loop died: %s: %s", type(exc).__name__, exc, extra={"action": "crash"}
        )
        for callback in self._on_failure:
            callback(exc)

    @property
    def failing(self) -> bool:
        """True while batches fail to commit (the database is down, hung or refusing)."""
        return self.metrics.flush_failing_since is not None

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
        self.metrics.events_received.update(
            it.event.type if it.event is not None else "invalid" for it in items
        )
        await self.queue.put_many(items)

    async def drain(self) -> None:
        """Stop intake, write everything queued and in flight, and return when all is done."""
        self._closing = True
        self.queue.wake()
        if self._loop_task is not None:
            await self._loop_task
        while self._writers:
            results = await asyncio.gather(*list(self._writers), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError
                ):
                    log.error(
                        "a writer failed while draining: %s: %s",
                        type(result).__name__,
                        result,
                        extra={"action": "writer_failed"},
                    )

    async def abort(self) -> None:
        """Cancel everything now; uncommitted work is simply not acknowledged."""
        self._closing = True
        tasks = [t for t in (self._loop_task, *self._writers) if t is not None]
        await asyncio.gather(*(cancel_quietly(t) for t in tasks))

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
        failpoints.hit("before_ack")
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


def count_by_type(items: Sequence[Item]) -> Mapping[str, int]:
    """Items per event type (``invalid`` for dead letters), for logs and tests."""
    return collections.Counter(i.event.type if i.event else "invalid" for i in items)


# How long a cancelled background task may take to end before it is left behind.
TASK_CANCEL_TIMEOUT_S = 5.0


async def cancel_quietly(
    task: asyncio.Task[Any] | None, *, timeout_s: float = TASK_CANCEL_TIMEOUT_S
) -> None:
    """Cancel a background task and wait for it; an error it ends with is logged, not raised.

    Shutdown must go on whatever a task was doing: cancelled inside ``pool.acquire()``, asyncpg
    may raise from the connection reset instead of ``CancelledError``, and a redis-py read can
    swallow a cancellation; so the wait is bounded and a task that will not end is left behind.
    """
    if task is None:
        return
    task.cancel()
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            log.warning(
                "background task %s did not end %.0fs after its cancellation; left behind",
                task.get_name(),
                timeout_s,
                extra={"action": "task_stuck"},
            )
            return
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves, not just the task
    except Exception as exc:  # noqa: BLE001 - logged; shutdown continues
        log.warning(
            "background task %s ended with %s: %s",
            task.get_name(),
            type(exc).__name__,
            exc,
            extra={"action": "task_failed"},
        )
