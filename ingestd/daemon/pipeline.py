"""The pipeline: intake queue -> batcher -> writers (database commit, then mirror, then acks).

Sources (``ingestd.daemon.sources``) put items on a bounded queue and wait while it is full. One
loop cuts batches (size or age, or at once when idle after a quiet spell: ``Batcher``); up to
``writers`` batches are written at once, each in one transaction. After the commit the mirror is
written and each source hears which of its items are done (the stream XACKs them; in-process
callers are woken; the spool marks records committed).

When a batch fails, the evidence decides what happens (never the error's class alone):

- The database is unavailable (the connection is lost, a deadline passes, the server shuts
  down, or a probe write fails as well: read-only, a standby, a lock): the batch is retried
  with capped, fully jittered exponential backoff until it commits. Nothing is given up.
- The database takes writes but refuses this batch (the probe write commits): the batch is
  split in halves, each written on its own, until the failing entry is alone. An entry refused
  alone ``max_entry_attempts`` times becomes a dead letter carrying the last error; if even the
  dead letter is refused, the entry goes to the quarantine file (fsync'd), is acknowledged, and
  is alarmed (metric, CRITICAL log, unhealthy until an operator clears the file).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ingestd import errors, failpoints
from ingestd.daemon.batching import Acknowledger, Batcher, BatchOutcome, IntakeQueue, Item
from ingestd.daemon.deadletters import DeadLetter
from ingestd.daemon.metrics import INVALID_TYPE, Metrics
from ingestd.daemon.quarantine import Quarantine, QuarantineRecord
from ingestd.settings import PipelineSettings

log = logging.getLogger("ingestd.daemon.pipeline")


# How long the probe that tells "unavailable" from "unwritable" may take (it is a few no-op
# statements); a probe that does not answer in time says "unavailable".
PROBE_TIMEOUT_S = 5.0


class Sink(Protocol):
    """Where batches are committed."""

    async def write(self, items: Sequence[Item]) -> BatchOutcome:
        """Commit the batch atomically or raise."""

    async def probe(self) -> None:
        """Raise unless a write could commit now."""

    async def write_dead_letter(self, letter: DeadLetter) -> None:
        """Commit one dead letter on its own, or raise."""

    def describe(self, exc: BaseException) -> tuple[str, str | None]:
        """A refusal as a dead letter's reason (SQLSTATE, message) and the column it blames."""


class Mirror(Protocol):
    """Where committed events' latest values go (``RedisMirror``; ``MemoryMirror`` in tests)."""

    def stage_events(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Take the newest value per key of a committed batch, to be written by ``flush``."""

    async def flush(self) -> bool:
        """Write what is staged; False (kept for the next flush) if the store is unreachable."""


class Pipeline:
    """Batches items from every source into the sink, then mirrors and acknowledges them."""

    def __init__(
        self,
        sink: Sink,
        mirror: Mirror | None,
        settings: PipelineSettings,
        *,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        quarantine: Quarantine | None = None,
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
        self.quarantine = quarantine or Quarantine(Path(settings.quarantine_path))
        # When each writer's batch arrived (its oldest item), for the pending-age health check.
        self._in_flight_since: dict[int, float] = {}

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
        """True while batches fail to commit because the database is unavailable (down, hung,
        read-only); not while it refuses one entry and takes other writes."""
        return self.metrics.flush_failing_since is not None

    def oldest_pending_age_s(self, now: float | None = None) -> float | None:
        """Seconds the oldest batch being written has waited since it arrived (None: none)."""
        since = min(self._in_flight_since.values(), default=None)
        if since is None:
            return None
        return (time.monotonic() if now is None else now) - since

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
            # Idle: the sources have handed over all they had and a writer waits for work.
            idle = not len(queue) and not self._slots.locked()
            if batcher.due_in(idle=idle) == 0:
                await self._dispatch(batcher.take())

    async def _dispatch(self, items: list[Item]) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._write(items), name="ingestd-writer")
        self._writers.add(task)
        task.add_done_callback(self._writers.discard)

    async def _write(self, items: list[Item]) -> None:
        key = id(items)
        # The batcher takes items in arrival order: the first is the oldest.
        self._in_flight_since[key] = items[0].enqueued_at
        try:
            try:
                outcome = await self._commit(items)
            finally:
                self._slots.release()
            if outcome is not None:
                await self._deliver(items, outcome)
        finally:
            del self._in_flight_since[key]

    async def _deliver(self, items: list[Item], outcome: BatchOutcome) -> None:
        """After a commit: the mirror, then each source hears which of its items are done."""
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

    def _delay(self, attempt: int) -> float:
        s = self.settings
        return self._rng.uniform(0, min(s.backoff_cap_s, s.backoff_base_s * 2**attempt))

    async def _commit(self, items: list[Item]) -> BatchOutcome | None:
        """Commit ``items`` and return the outcome; or, when the database refuses them while it
        takes other writes, split them, deliver each part as it commits, and return None."""
        attempt = 0
        refused_alone = 0
        s = self.settings
        while True:
            started = time.monotonic()
            try:
                async with asyncio.timeout(s.flush_timeout_s):
                    outcome = await self._sink.write(items)
            except Exception as exc:  # noqa: BLE001 - the evidence decides: retry, split, give up
                attempt += 1
                self.metrics.flush_retries += 1
                if await self._refused_while_writable(exc):
                    if len(items) > 1:
                        await self._split(items, exc)
                        return None
                    refused_alone += 1
                    if refused_alone >= s.max_entry_attempts:
                        await self._give_up(items[0], exc, refused_alone)
                        return None
                elif self.metrics.flush_failing_since is None:
                    self.metrics.flush_failing_since = started
                delay = self._delay(attempt)
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

    async def _refused_while_writable(self, exc: BaseException) -> bool:
        """True only with evidence that the database takes writes while refusing this work.

        A lost connection, a deadline, a shutdown, a lock or a serialization failure is the
        database being unavailable, whatever else is true: such work waits, never given up.
        Any other failure is put to the test: a probe write that commits now is the evidence.
        """
        if errors.is_retriable(exc):
            return False
        try:
            async with asyncio.timeout(min(PROBE_TIMEOUT_S, self.settings.flush_timeout_s)):
                await self._sink.probe()
        except Exception as probe_exc:  # noqa: BLE001 - any failure of the probe: unavailable
            log.warning(
                "the database takes no writes either (%s: %s): waiting",
                type(probe_exc).__name__,
                probe_exc,
                extra={"action": "probe_failed"},
            )
            return False
        return True

    async def _split(self, items: list[Item], exc: BaseException) -> None:
        """Write each half on its own (recursively), delivering each part once it commits."""
        self.metrics.batch_splits += 1
        mid = len(items) // 2
        log.warning(
            "batch of %d refused while the database takes writes (%s: %s): "
            "splitting it to isolate the entry",
            len(items),
            type(exc).__name__,
            exc,
            extra={"action": "batch_split"},
        )
        for half in (items[:mid], items[mid:]):
            outcome = await self._commit(half)
            if outcome is not None:
                await self._deliver(half, outcome)

    async def _give_up(self, item: Item, exc: BaseException, attempts: int) -> None:
        """The entry was refused alone ``attempts`` times: a dead letter, else the quarantine."""
        reason, column = self._sink.describe(exc)
        letter = _dead_letter_for(item, reason, column)
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.settings.flush_timeout_s):
                    await self._sink.write_dead_letter(letter)
            except Exception as dl_exc:  # noqa: BLE001 - unavailable: wait; refused: quarantine
                if await self._refused_while_writable(dl_exc):
                    await self._quarantine(item, reason, self._sink.describe(dl_exc)[0])
                    return
                attempt += 1
                delay = self._delay(attempt)
                log.warning(
                    "dead letter of a given-up entry not written (retry in %.2fs): %s: %s",
                    delay,
                    type(dl_exc).__name__,
                    dl_exc,
                    extra={"action": "dead_letter_retry"},
                )
                await asyncio.sleep(delay)
                continue
            break
        outcome = BatchOutcome(dead_letters=1)
        outcome.reject(item, reason, column)
        m = self.metrics
        m.dead_letters += 1
        m.entries_given_up += 1
        m.events_dead_lettered[item.event.type if item.event is not None else INVALID_TYPE] += 1
        log.error(
            "entry %s refused alone %d times while the database takes writes: dead-lettered: %s",
            letter.dedup_key or letter.event_id or "(no key)",
            attempts,
            reason,
            extra={"action": "entry_dead_lettered"},
        )
        await self._deliver([item], outcome)

    async def _quarantine(self, item: Item, reason: str, dead_letter_error: str) -> None:
        key = item.source.dead_letter_key(item)
        if key is None and item.dead_letter is not None:
            key = item.dead_letter.dedup_key
        record = QuarantineRecord(
            source=item.source.name,
            key=key,
            error=reason,
            dead_letter_error=dead_letter_error,
            payload=item.payload(),
            event_id=item.event.event_id if item.event is not None else None,
        )
        attempt = 0
        while True:
            try:
                await self.quarantine.add(record)
                break
            except OSError as exc:
                # Not on disk, so not acknowledged: the entry stays pending (and this writer
                # busy) until the file can be written. Loud, since intake is now held up.
                attempt += 1
                log.critical(
                    "cannot write the quarantine file %s (%s); entry %s stays unacknowledged",
                    self.quarantine.path,
                    exc,
                    key,
                    extra={"action": "quarantine_failed"},
                )
                await asyncio.sleep(self._delay(attempt))
        self.metrics.quarantined += 1
        self.metrics.entries_given_up += 1
        log.critical(
            "entry %s QUARANTINED to %s: the database refused it (%s) and its dead letter (%s); "
            "it is acknowledged: replay it from the file",
            key,
            self.quarantine.path,
            reason,
            dead_letter_error,
            extra={"action": "quarantined"},
        )
        outcome = BatchOutcome()
        outcome.reject(item, reason)
        await self._deliver([item], outcome)


def _dead_letter_for(item: Item, reason: str, column: str | None) -> DeadLetter:
    if item.event is None:
        # Bad input whose own dead letter was refused: that dead letter is tried once more.
        assert item.dead_letter is not None
        return item.dead_letter
    return item.refused(item.event, reason, column)


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
