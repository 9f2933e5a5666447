"""In-process intake: producers in the same process ``await submit(event)``.

An event is accepted when it is committed, or, with a spool configured, when it is durably on
the spool (fsync'd), whichever comes first (an acknowledgement is a promise).
It goes to the spool instead of the bounded in-memory queue when the queue is full, when the
database is failing, or while earlier spooled events still wait (so that order is kept); and an
event already in memory that is not committed within ``spool.spill_after_s`` is spooled too, so
that a producer is not held up by an outage. Such an event may then be written twice (from
memory and from the spool): its ``event_id`` makes it land once. Without a spool, or when the
spool cannot take more (full disk, ``max_bytes``, broken), callers wait: backpressure, never a
silent drop and never unbounded memory.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import reprlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

from ingestd import errors
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.deadletters import DeadLetter, content_key, make_dead_letter
from ingestd.daemon.pipeline import Pipeline
from ingestd.spool import Spool, SpoolError
from ingestd.wire import decoding, events

log = logging.getLogger("ingestd.daemon.sources.inprocess")

EventInput = Mapping[str, Any] | bytes | str


class Outcome(enum.Enum):
    """What became of one in-process event."""

    COMMITTED = "committed"
    DEAD_LETTER = "dead_letter"
    # Durably on the local spool (fsync'd), to be committed when the database takes it.
    SPOOLED = "spooled"


class InProcessSource:
    """``await submit(event)`` / ``await submit_many(events)`` for producers in this process."""

    name = "submit"

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_event_bytes: int,
        spool: Spool | None = None,
        spill_after_s: float = 1.0,
        max_event_depth: int = events.DEFAULT_MAX_DEPTH,
        retention: events.Retention | None = None,
        observer: Callable[[Sequence[Item]], None] | None = None,
    ) -> None:
        self._pipeline = pipeline
        # Sees every valid event as it is taken in, before it is committed or spooled.
        self._observer = observer
        self._max_event_bytes = max_event_bytes
        self._max_event_depth = max_event_depth
        self._retention = retention
        self._spool = spool
        self._spill_after_s = spill_after_s
        self._spool_failing = False
        # Every caller's future until it is resolved: if the pipeline dies or is aborted they
        # are failed, rather than left waiting forever (a background failure fails its waiters).
        self._waiting: set[asyncio.Future[Outcome]] = set()
        pipeline.on_failure(self._pipeline_failed)

    def _pipeline_failed(self, exc: BaseException) -> None:
        self.fail_pending(errors.SinkUnavailable(f"ingestd's batching loop failed: {exc}"))

    def fail_pending(self, exc: Exception) -> int:
        """Fail every caller still waiting (after an abort or a crash); how many there were."""
        failed = 0
        for fut in list(self._waiting):
            if not fut.done():
                fut.set_exception(exc)
                failed += 1
        self._waiting.clear()
        return failed

    def dead_letter_key(self, item: Item) -> str | None:
        """By content, as the spool keys its records (its wire form is what would be spooled).

        A submitted event that waited past ``spill_after_s`` is in memory and in the spool at
        once; should the database refuse it, both copies meet this one key.
        """
        return None if item.event is None else content_key(_wire(item))

    async def submit(self, event: EventInput) -> Outcome:
        """Accept one event: COMMITTED, SPOOLED, or InvalidEvent (after it is a dead letter)."""
        (outcome,) = await self._accept([event], raise_invalid=True)
        return outcome

    async def submit_many(self, batch: Iterable[EventInput]) -> list[Outcome]:
        """Accept many events at once (one wait, one spool fsync); bad ones are DEAD_LETTER."""
        return await self._accept(list(batch), raise_invalid=False)

    async def _accept(self, batch: Sequence[EventInput], *, raise_invalid: bool) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items: list[Item] = []
        rejected: dict[int, errors.InvalidEvent] = {}
        waiting = self._waiting
        for event in batch:
            fut: asyncio.Future[Outcome] = loop.create_future()
            waiting.add(fut)
            fut.add_done_callback(waiting.discard)
            raw = event if isinstance(event, bytes | str) else None
            try:
                parsed = (
                    decoding.decode_event(
                        event,
                        max_bytes=self._max_event_bytes,
                        max_depth=self._max_event_depth,
                        retention=self._retention,
                    )
                    if isinstance(event, bytes | str)
                    else events.normalize(
                        event, max_depth=self._max_event_depth, retention=self._retention
                    )
                )
            except errors.InvalidEvent as exc:
                log.warning("invalid event rejected: %s", exc, extra={"action": "dead_letter"})
                item = Item(None, _dead_letter(event, exc, self.name), self, fut, raw, now)
                rejected[id(item)] = exc
            else:
                item = Item(parsed, None, self, fut, raw, now)
            items.append(item)
        bad = [item for item in items if item.event is None]
        good = [item for item in items if item.event is not None]
        if bad:
            # Bad input is recorded (through the queue, like any write) before the caller hears.
            await self._pipeline.put(bad)
        if good:
            if self._observer is not None:
                self._observer(good)
            if self._should_spill():
                good = await self._to_spool(good)
            if good:
                await self._pipeline.put(good)
                await self._wait_or_spill(good)
        for item in bad:
            await item.token
        if bad and raise_invalid:
            raise rejected[id(bad[0])]
        return [item.token.result() for item in items]

    def _should_spill(self) -> bool:
        spool = self._spool
        return spool is not None and (
            spool.unread or self._pipeline.queue.full or self._pipeline.failing
        )

    async def _wait_or_spill(self, items: list[Item]) -> None:
        """Wait for the commit; past ``spill_after_s`` spool what is still waiting, if we can."""
        futures = [item.token for item in items]
        if self._spool is None:
            for fut in futures:  # plain awaits: gather() costs more than the wait itself
                await fut
            return
        _, waiting = await asyncio.wait(futures, timeout=self._spill_after_s)
        if not waiting:
            return
        # Still in memory and uncommitted (the database is slow or down): make them durable.
        # The in-memory copies go on retrying; whichever lands second meets its event_id.
        late = [item for item in items if not item.token.done()]
        left = await self._to_spool(late)
        if left:
            await asyncio.gather(*(item.token for item in left))

    async def _to_spool(self, items: list[Item]) -> list[Item]:
        """Spool ``items`` (marking them SPOOLED); return those the spool refused."""
        assert self._spool is not None
        results = await asyncio.gather(
            *(self._spool.append(_wire(item)) for item in items), return_exceptions=True
        )
        refused: list[Item] = []
        for item, result in zip(items, results, strict=True):
            if result is None:
                if not item.token.done():
                    item.token.set_result(Outcome.SPOOLED)
                continue
            if not isinstance(result, SpoolError):
                raise result
            refused.append(item)
            if not self._spool_failing:
                log.error(
                    "spool refused events, waiting for room in memory instead: %s",
                    result,
                    extra={"action": "spool_refused"},
                )
                self._spool_failing = True
        metrics = self._pipeline.metrics
        metrics.spooled += len(items) - len(refused)
        metrics.spool_rejections += len(refused)
        if not refused and self._spool_failing:
            log.info("spool takes events again", extra={"action": "spool_recovered"})
            self._spool_failing = False
        return refused

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Wake the callers of the committed items (unless they were spooled meanwhile)."""
        for item in items:
            fut: asyncio.Future[Outcome] = item.token
            if fut.done():
                continue
            if item.event is None or id(item) in outcome.rejected:
                fut.set_result(Outcome.DEAD_LETTER)
            else:
                fut.set_result(Outcome.COMMITTED)


def _wire(item: Item) -> bytes:
    assert item.event is not None
    return orjson.dumps(events.to_wire(item.event))


def _dead_letter(event: EventInput, exc: errors.InvalidEvent, source: str) -> DeadLetter:
    raw = event if isinstance(event, bytes | str) else _repr_payload(event)
    etype = event.get("type") if isinstance(event, Mapping) else None
    return make_dead_letter(
        raw,
        str(exc),
        source=source,
        field=exc.field,
        event_type=etype if isinstance(etype, str) else None,
    )


def _repr_payload(event: object) -> str:
    try:
        return orjson.dumps(event, default=str).decode()
    except TypeError:
        # Not JSON-able as a whole: too deep for orjson, a cycle, a key that is not a string.
        # reprlib stops at a depth and a width, so that even a refused event nested thousands of
        # levels deep (or containing itself) gets a dead letter rather than a RecursionError.
        return _BOUNDED_REPR.repr(event)


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel = events.DEFAULT_MAX_DEPTH
    r.maxdict = r.maxlist = r.maxtuple = r.maxset = r.maxfrozenset = r.maxdeque = 1000
    r.maxstring = r.maxother = 10_000
    return r


_BOUNDED_REPR: Final = _bounded_repr()
