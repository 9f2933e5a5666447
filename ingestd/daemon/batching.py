"""The intake queue and the batcher: pure bookkeeping, no I/O.

``IntakeQueue`` is a bounded FIFO of items whose ``put`` waits while it is full (backpressure).
``Batcher`` accumulates items and says when a batch is due, on size (per table) or age, or at once
when the pipeline is idle after a quiet spell; its clock is injectable so that tests drive it
without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import orjson

from ingestd.daemon.deadletters import DeadLetter, make_dead_letter
from ingestd.wire.events import Event, to_wire


class Acknowledger(Protocol):
    """A source that hears back, after commit, which of its items are done."""

    name: str

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Called once per committed batch with this source's items."""

    def dead_letter_key(self, item: Item) -> str | None:
        """A key that makes a redelivered poison item land in ``dead_letters`` once."""


# What an in-process event given as a mapping (no raw payload) counts for in the byte bounds.
ESTIMATED_EVENT_BYTES = 400


@dataclasses.dataclass(slots=True, eq=False)
class Item:
    """One unit of work: a valid event or a dead letter, with how to acknowledge it."""

    event: Event | None
    dead_letter: DeadLetter | None
    source: Acknowledger
    token: Any
    raw: bytes | str | None
    enqueued_at: float
    _size: int = dataclasses.field(default=-1, repr=False)

    @property
    def size(self) -> int:
        """Bytes this item stands for, for the byte bounds (its raw payload, else an estimate)."""
        size = self._size
        if size < 0:  # the queue, its take and the batcher all ask: worked out once
            raw = self.raw
            if raw is not None:
                size = len(raw)
            elif self.dead_letter is not None:
                size = len(self.dead_letter.payload)
            else:
                size = ESTIMATED_EVENT_BYTES
            self._size = size
        return size

    def payload(self) -> bytes | str | None:
        """The entry as received (its raw payload), else its validated event on the wire (an
        in-process event given as a mapping: the JSON a producer would have sent)."""
        if self.raw is not None:
            return self.raw
        if self.event is not None:
            return orjson.dumps(to_wire(self.event))
        return None if self.dead_letter is None else self.dead_letter.payload

    def refused(self, event: Event, reason: str, field: str | None) -> DeadLetter:
        """This item's valid ``event`` as the dead letter of the database's refusal."""
        return make_dead_letter(
            self.payload() or b"",
            reason,
            source=self.source.name,
            field=field,
            dedup_key=self.source.dead_letter_key(self),
            event_type=event.type,
            event_id=event.event_id,
            producer=event.producer,
        )

    @property
    def route(self) -> str:
        """The batch lane this item counts against: its table, or a side lane."""
        ev = self.event
        if ev is None:
            return "dead_letters"
        table = ev.table
        return table.name if table is not None else ev.type


@dataclasses.dataclass(slots=True)
class BatchOutcome:
    """What a committed batch did, for acknowledgements, the mirror and metrics."""

    inserted: dict[str, int] = dataclasses.field(default_factory=dict)
    duplicates: int = 0
    rejected: dict[int, str] = dataclasses.field(default_factory=dict)  # id(item) -> reason
    rejected_fields: dict[int, str] = dataclasses.field(default_factory=dict)  # id(item) -> column
    dead_letters: int = 0
    open_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    open_counts_version: int | None = None
    # (oldest, newest) spread time when the batch queued a refresh of hourly_spread_avg for hours
    # before its policy's window (migration 0009), else None.
    backfill_queued: tuple[dt.datetime, dt.datetime] | None = None

    def reject(self, item: Item, reason: str, field: str | None = None) -> None:
        """Mark one item as refused by the database (it becomes a dead letter)."""
        self.rejected[id(item)] = reason
        if field is not None:
            self.rejected_fields[id(item)] = field


class IntakeQueue:
    """Bounded FIFO; ``put_many`` waits while the queue holds ``max_items`` items or more, or
    ``max_bytes`` of payload (so that large events cannot multiply memory by the count bound)."""

    def __init__(self, max_items: int, max_bytes: int | None = None) -> None:
        self._items: collections.deque[Item] = collections.deque()
        self._max = max_items
        self._max_bytes = max_bytes if max_bytes is not None else sys.maxsize
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Payload bytes queued."""
        return self._bytes

    @property
    def full(self) -> bool:
        """True while a producer would wait."""
        return len(self._items) >= self._max or self._bytes >= self._max_bytes

    @property
    def max_items(self) -> int:
        """The bound past which producers wait."""
        return self._max

    async def put_many(self, items: Iterable[Item]) -> None:
        """Append items once there is room; a chunk may overshoot the bound by its own size."""
        while self.full:
            self._room.clear()
            await self._room.wait()
        chunk = list(items)
        self._bytes += sum(item.size for item in chunk)
        self._items.extend(chunk)
        self._arrived.set()

    def take(self, limit: int) -> list[Item]:
        """Remove and return up to ``limit`` items without waiting."""
        n = min(limit, len(self._items))
        popleft = self._items.popleft
        taken = [popleft() for _ in range(n)]
        self._bytes -= sum(item.size for item in taken)
        if not self.full:
            self._room.set()
        if not self._items:
            self._arrived.clear()
        return taken

    def wake(self) -> None:
        """Wake a waiting consumer without adding an item (used when draining starts)."""
        self._arrived.set()

    async def wait(self, within_s: float | None) -> bool:
        """Wait until an item is there (True) or ``within_s`` seconds pass (False)."""
        if self._items:
            return True
        try:
            async with asyncio.timeout(within_s):
                await self._arrived.wait()
        except TimeoutError:
            return False
        return bool(self._items)


class Batcher:
    """Collects items; due when one lane reaches ``max_rows`` or the oldest item ``max_age_s``,
    or, when the pipeline is idle, as soon as the last batch was cut ``max_age_s`` ago or more.

    The age bound exists to let a batch gather company while events keep coming. An event that
    arrives after a quiet spell, with nothing queued behind it and a writer free, has no company
    to wait for: waiting would only add ``max_age_s`` to its latency (and to start-up, and to the
    moment a trader's position shows). Cutting it at once keeps the rate bound the age gives:
    two cuts are never closer than ``max_age_s`` unless a batch fills up, since an age cut's
    first item, too, arrived after the previous cut.
    """

    def __init__(
        self,
        max_rows: int,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int | None = None,
    ) -> None:
        if max_rows < 1 or max_age_s < 0:
            raise ValueError("max_rows must be >= 1 and max_age_s >= 0")
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes if max_bytes is not None else sys.maxsize
        self._bytes = 0
        self._clock = clock
        self._items: list[Item] = []
        self._lanes: collections.Counter[str] = collections.Counter()
        self._started: float | None = None
        self._last_cut: float | None = None
        self._full = False

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Item) -> None:
        """Add one item; the batch's age counts from its first item."""
        if self._started is None:
            self._started = self._clock()
        self._items.append(item)
        lane = item.route
        self._lanes[lane] += 1
        self._bytes += item.size
        if self._lanes[lane] >= self.max_rows or self._bytes >= self.max_bytes:
            self._full = True

    @property
    def full(self) -> bool:
        """True once any lane holds ``max_rows`` items."""
        return self._full

    def room(self) -> int:
        """How many more items surely fit before some lane is full."""
        return 0 if self._full else self.max_rows - max(self._lanes.values(), default=0)

    def due_in(self, *, idle: bool = False) -> float | None:
        """Seconds until the batch is due (0 when due now); None when empty.

        ``idle``: nothing is queued behind the batch and a writer is free; then the batch is due
        at once if no batch was cut in the last ``max_age_s`` (or none ever was).
        """
        started = self._started
        if started is None:
            return None
        if self._full:
            return 0.0
        now = self._clock()
        if idle and (self._last_cut is None or now - self._last_cut >= self.max_age_s):
            return 0.0
        return max(0.0, started + self.max_age_s - now)

    def take(self) -> list[Item]:
        """Hand over the batch and start a new one."""
        items, self._items = self._items, []
        if items:
            self._last_cut = self._clock()
        self._lanes.clear()
        self._bytes = 0
        self._started = None
        self._full = False
        return items
