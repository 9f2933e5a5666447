"""The pipeline's sink and mirror in memory: unit tests of the pipeline without servers.

``MemorySink`` and ``MemoryMirror`` keep the contract of ``PostgresSink`` and ``RedisMirror``
that the pipeline relies on, and ``tests/integration/test_sink_contract.py`` runs the same
assertions against both pairs. They model:

- ``MemorySink``: the append tables (spreads, fx_rates, orders, trades), one row per
  (event_id, time) as their unique keys: a repeat of the same event is a duplicate, the same
  key with other values is refused (a write-once conflict: a dead letter in the same commit); a
  heartbeat has no table; dead letters land once per ``dedup_key``. Positions are not modelled
  (a batch with one raises ``ValueError``). Outages and refusals are set by the test:
  ``unavailable`` (every write and probe raises it: the database is down) and ``refuse`` (a
  batch holding that event raises, the probe passes: the data is refused while the database
  takes writes), each a ``DatabaseError`` like the real sink's.
- ``MemoryMirror``: the same keys and values as ``RedisMirror`` (``MirrorStaging``), written
  only if newer (by version); TTLs are not modelled. ``unavailable`` makes a flush fail and
  keep its values for the next one, as Redis being down does.

``timeline`` (shared when given the same list) records commits, mirror flushes and, through
``RecordingSource``, acknowledgements, in the order they happened.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from ingestd import errors
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.deadletters import DeadLetter
from ingestd.daemon.sinks.mirror import MirrorStaging
from ingestd.wire import tables

# One entry of a timeline: ("commit" | "mirror" | "ack", the event ids or mirror keys).
Step = tuple[str, tuple[str, ...]]


def _ids(items: Sequence[Item]) -> tuple[str, ...]:
    return tuple(i.event.event_id if i.event is not None else "(dead letter)" for i in items)


class ServerRefusal(Exception):
    """Stands for the driver's error of a statement the server refused (it has a SQLSTATE)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def refusal(sqlstate: str, message: str) -> errors.DatabaseError:
    """A ``DatabaseError`` as the database edge raises it for a refusal with ``sqlstate``."""
    return errors.DatabaseError(ServerRefusal(sqlstate, message))


def outage(message: str = "connection refused") -> errors.DatabaseError:
    """A ``DatabaseError`` as the database edge raises it when the server is unreachable."""
    return errors.DatabaseError(ConnectionRefusedError(111, message))


@dataclasses.dataclass(frozen=True, slots=True)
class _Row:
    values: dict[str, str | None]
    producer: str | None


class MemorySink:
    """The pipeline's ``Sink`` in memory (see the module's docstring for what it models)."""

    def __init__(self, timeline: list[Step] | None = None) -> None:
        self.rows: dict[str, dict[tuple[str, dt.datetime], _Row]] = {
            name: {} for name in tables.APPEND_TABLES_BY_NAME
        }
        self.dead_letters: dict[str, DeadLetter] = {}
        self.timeline: list[Step] = [] if timeline is None else timeline
        self.unavailable: errors.DatabaseError | None = None
        self.refuse: dict[str, errors.DatabaseError] = {}  # event_id -> what its batch raises
        self.writes = 0  # calls, failed or not

    def event_ids(self, table: str) -> set[str]:
        """The event ids stored in ``table``."""
        return {event_id for event_id, _ in self.rows[table]}

    async def write(self, items: Sequence[Item]) -> BatchOutcome:
        """Commit every item of the batch, or raise and commit nothing."""
        self.writes += 1
        if self.unavailable is not None:
            raise self.unavailable
        for item in items:
            ev = item.event
            if ev is not None and ev.event_id in self.refuse:
                raise self.refuse[ev.event_id]
            if ev is not None and ev.table is None and ev.type != "heartbeat":
                raise ValueError(f"MemorySink does not model {ev.type} events")
        outcome = BatchOutcome()
        added: dict[str, dict[tuple[str, dt.datetime], _Row]] = {}
        dead: list[DeadLetter] = []
        for item in items:
            ev = item.event
            if ev is None:
                assert item.dead_letter is not None
                dead.append(item.dead_letter)
                continue
            if ev.table is None:  # a heartbeat: mirrored only
                continue
            name = ev.table.name
            stored = self.rows[name]
            key = (ev.event_id, ev.time)
            row = _Row(dict(ev.values), ev.producer)
            earlier = stored.get(key) or added.get(name, {}).get(key)
            outcome.inserted.setdefault(name, 0)
            if earlier is None:
                added.setdefault(name, {})[key] = row
                outcome.inserted[name] += 1
            elif earlier == row:
                outcome.duplicates += 1
            else:
                # Refused as the write-once check refuses it: a dead letter in the same commit.
                columns = sorted(k for k in row.values if row.values[k] != earlier.values.get(k))
                reason = (
                    f"event_id {ev.event_id} was stored before with other values "
                    f"({', '.join(columns) or 'producer'})"
                )
                field = columns[0] if columns else None
                outcome.reject(item, reason, field)
                dead.append(item.refused(ev, reason, field))
        for name, rows in added.items():
            self.rows[name].update(rows)
        for letter in dead:
            self._add_dead_letter(letter)
        outcome.dead_letters = len(dead)
        self.timeline.append(("commit", _ids(items)))
        return outcome

    async def probe(self) -> None:
        """Raise while ``unavailable``; a refused batch does not stop other writes."""
        if self.unavailable is not None:
            raise self.unavailable

    async def write_dead_letter(self, letter: DeadLetter) -> None:
        """Store one dead letter (once per ``dedup_key``), or raise while ``unavailable``."""
        if self.unavailable is not None:
            raise self.unavailable
        self._add_dead_letter(letter)

    @staticmethod
    def describe(exc: BaseException) -> tuple[str, str | None]:
        """A refusal as a dead letter's reason and no column."""
        return str(exc), None

    def _add_dead_letter(self, letter: DeadLetter) -> None:
        key = letter.dedup_key or f"(no key {len(self.dead_letters)})"
        self.dead_letters.setdefault(key, letter)


class MemoryMirror(MirrorStaging):
    """``RedisMirror``'s keys and values in a dict (see the module's docstring)."""

    def __init__(self, timeline: list[Step] | None = None, **ttls: Any) -> None:
        super().__init__(**ttls)
        self.values: dict[str, str] = {}
        self.versions: dict[str, int] = {}
        self.timeline: list[Step] = [] if timeline is None else timeline
        self.unavailable = False

    async def flush(self) -> bool:
        """Write every pending key if its version is not older than the stored one."""
        if not self._pending:
            return True
        if self.unavailable:
            return False  # kept in _pending for the next flush, as RedisMirror does
        pending, self._pending = self._pending, {}
        for key, write in pending.items():
            if write.version >= self.versions.get(key, -1):
                self.values[key] = write.value
                self.versions[key] = write.version
        self.timeline.append(("mirror", tuple(sorted(pending))))
        return True


class RecordingSource:
    """An ``Acknowledger`` that records each acknowledgement (in ``acked`` and the timeline)."""

    def __init__(self, name: str = "memory", timeline: list[Step] | None = None) -> None:
        self.name = name
        self.timeline: list[Step] = [] if timeline is None else timeline
        self.acked: list[tuple[Sequence[Item], BatchOutcome]] = []

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Record the acknowledged items."""
        self.acked.append((items, outcome))
        self.timeline.append(("ack", _ids(items)))

    def dead_letter_key(self, item: Item) -> str | None:
        """The item's token, as a stream entry id keys its dead letter."""
        return None if item.token is None else f"{self.name}:{item.token}"
