"""The producer's bounded buffer of encoded events waiting to be published: pure bookkeeping.

The publishing loops (a thread for synchronous code, a task for asyncio) ``take`` a chunk, send it
in one pipelined round trip, and ``settle`` it; on failure they ``put_back`` the chunk at the front,
so order is kept and nothing is lost while the stream is unreachable. When the buffer is full, the
``block`` policy makes producers wait (backpressure); the ``drop_oldest`` policy (dual write, where
the CSV file already holds every event) drops the oldest and counts it.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Final, Literal

Overflow = Literal["block", "drop_oldest"]


@dataclasses.dataclass(frozen=True, slots=True)
class Pending:
    """One encoded event and its id."""

    event_id: str
    payload: bytes


class Outbox:
    """A bounded FIFO with counters: ``added == settled + len(self) + in_flight``.

    The bound counts the chunk being sent too: memory holds at most ``max_events`` events.
    """

    def __init__(self, max_events: int, *, overflow: Overflow = "block") -> None:
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        self.max_events = max_events
        self.overflow: Overflow = overflow
        self._items: collections.deque[Pending] = collections.deque()
        self.in_flight = 0
        self.added = 0
        self.sent = 0
        self.dropped = 0
        self.first_dropped: str | None = None
        self.last_dropped: str | None = None
        # Drops since the last reset_recent_drops() (an outage's drops, for its log line).
        self.recent_drops = 0
        self.first_recent_drop: str | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def settled(self) -> int:
        """Events that are done: published, or dropped under ``drop_oldest``."""
        return self.sent + self.dropped

    @property
    def full(self) -> bool:
        """True when ``add`` would block (``block``) or drop (``drop_oldest``)."""
        return len(self._items) + self.in_flight >= self.max_events

    def add(self, item: Pending) -> None:
        """Append; under ``drop_oldest`` a full buffer first drops its oldest queued event."""
        self._trim(self.max_events - 1)
        self.added += 1
        if self.overflow == "drop_oldest" and len(self) + self.in_flight >= self.max_events:
            # Everything held is the chunk in flight: the new event is the oldest queued one.
            self._drop(item)
            return
        self._items.append(item)

    def _trim(self, limit: int) -> None:
        # Only queued events can be dropped; the chunk in flight is the publisher's.
        while self.overflow == "drop_oldest" and self._items and len(self) + self.in_flight > limit:
            self._drop(self._items.popleft())

    def _drop(self, item: Pending) -> None:
        self.dropped += 1
        if self.first_dropped is None:
            self.first_dropped = item.event_id
        self.last_dropped = item.event_id
        self.recent_drops += 1
        if self.first_recent_drop is None:
            self.first_recent_drop = item.event_id

    def reset_recent_drops(self) -> int:
        """Start counting drops anew (after an outage); returns how many there were."""
        n = self.recent_drops
        self.recent_drops = 0
        self.first_recent_drop = None
        return n

    def take(self, limit: int) -> list[Pending]:
        """Remove and return up to ``limit`` of the oldest events (to be sent)."""
        n = min(limit, len(self._items))
        popleft = self._items.popleft
        self.in_flight += n
        return [popleft() for _ in range(n)]

    def settle(self, items: list[Pending]) -> None:
        """Record a chunk as published."""
        self.in_flight -= len(items)
        self.sent += len(items)

    def put_back(self, items: list[Pending]) -> None:
        """Return an unsent chunk to the front, in order (trimmed again under ``drop_oldest``)."""
        self.in_flight -= len(items)
        self._items.extendleft(reversed(items))
        self._trim(self.max_events)


class Backoff:
    """Capped, fully jittered exponential backoff (RELIABILITY.md's defaults, scaled down)."""

    BASE_S: Final = 0.1
    CAP_S: Final = 5.0

    def __init__(self, rng: random.Random | None = None) -> None:
        self.attempt = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    def next_delay(self) -> float:
        """The delay before the next attempt."""
        self.attempt += 1
        return self._rng.uniform(0, min(self.CAP_S, self.BASE_S * 2**self.attempt))

    def reset(self) -> None:
        """After a success."""
        self.attempt = 0
