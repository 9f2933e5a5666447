"""The producer's outboxes: events logged and not yet published, in the order they were logged.

``Outbox`` is a bounded in-memory FIFO, pure bookkeeping. The publishing loops (a thread for
synchronous code, a task for asyncio) ``take`` a chunk, send it in one pipelined round trip, and
``settle`` it; on failure they ``put_back`` the chunk at the front, so order is kept and nothing is
lost while the stream is unreachable. When it is full, the ``block`` policy makes producers wait;
the ``drop_oldest`` policy (dual write, where the CSV file already holds every event) drops the
oldest and counts it.

``DiskOutbox`` is the same queue kept in a local directory, with the same ``take`` / ``settle`` /
``put_back`` protocol: the ``postgres`` backend's outbox, so that ``log_*`` never waits for Redis
and what it returned from survives ``kill -9`` of the producer. It is the in-process spool's
mechanism (``ingestd.spool.RecordStore``): the records are rows of one SQLite database in WAL
mode (``spool.sqlite3`` and its ``-wal`` file, a lock file), each with the CRC-32 of its payload,
recovered by SQLite at open (a torn tail of the log is ignored). What differs is when a record
counts as kept. The in-process spool's ``append`` is an asyncio group commit that returns after
``fsync``; a trading loop cannot wait for a disk flush per event, so here:

* ``append`` commits the record (one ``INSERT``, ``synchronous=NORMAL``) in the caller's thread
  before it returns: it is written to the log, in the kernel's page cache, which a killed process
  does not take with it. So ``kill -9`` (or any crash of the producer) loses nothing that
  ``log_*`` returned from.
* a background thread ``fsync``s the log at most ``fsync_interval_s`` later (one fsync for
  everything committed meanwhile), so a power loss or kernel crash costs at most that window of
  events not yet published; the same thread copies the log into the database file (a SQLite
  checkpoint) every ``segment_bytes`` of log, so the appending thread never waits for that.
  ``fsync_interval_s=0`` commits with ``synchronous=FULL``: every record is fsync'd before
  ``append`` returns.

Every event goes through the directory, also while Redis answers: an outbox that spilled only once
a publish failed would hold in memory what was logged before the failure was noticed (up to a
socket timeout of events), and a kill then would lose it. Memory holds one chunk at a time; the
publisher reads the records back (from the page cache). A record is removed once published, so
after a restart only the records whose publish was not yet confirmed are published again, under
their fixed ``event_id``s: at-least-once into the stream, exactly once in the database (ingestd
stores an ``event_id`` once).

The directory is bounded by ``max_bytes`` (payloads plus a few bytes each; the files take some
more: the log until it is copied, and the database's pages). A full outbox refuses the record
(``OutboxFull``): the caller's ``log_*`` raises, nothing is dropped silently, and an alarm is
raised once per episode (an ERROR log line, ``alarm`` and ``refused``), cleared when publishing
has brought it below half.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import random
import sqlite3
import threading
from pathlib import Path
from typing import Final, Literal, NoReturn

from ingestd import errors
from ingestd.settings import OutboxSettings
from ingestd.spool import (
    MAX_RECORD_BYTES,
    PAGE_BYTES,
    RecordStore,
    SpoolRecord,
    is_disk_full,
    record_bytes,
    split_corrupt,
)

log = logging.getLogger("ingestd.producer.storage.outbox")

DEFAULT_SEGMENT_BYTES: Final = 16 * 1024 * 1024

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
    """Capped, fully jittered exponential backoff: 0.1 s doubling, at most 5 s."""

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


class OutboxError(errors.IngestdError):
    """The disk outbox cannot take this event: ``log_*`` raises it and the event is not logged."""


class OutboxFull(OutboxError):
    """The outbox holds ``max_bytes``, or its disk is full: retried after publishing frees room."""

    retriable = True


class OutboxBroken(OutboxError):
    """An fsync or an undo failed: what is on disk is unknown, so the outbox takes no more."""


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxState:
    """What a producer can read about its outbox (``storage.outbox_state()``)."""

    directory: str | None  # None: in memory only
    pending_events: int  # logged, not yet published
    disk_bytes: int
    max_bytes: int
    alarm: bool  # full (or broken) in this episode: log_* is being refused
    refused: int  # log_* calls refused since the storage was made
    publishing: bool  # False while the stream is unreachable
    broken: str | None = None


# What the publisher is handed: the spool's record (its id, to settle or put it back).
Spilled = SpoolRecord
# SQLite's primary result code for an I/O error (a failed write or fsync among them).
SQLITE_IOERR: Final = 10


class DiskOutbox:
    """Events on local disk until published: thread-safe; see the module's text for durability.

    ``append`` may be called from any thread (and from an event loop: it is one short commit);
    ``take`` / ``settle`` / ``put_back`` from one publisher at a time.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        segment_bytes: int | None = None,
        fsync_interval_s: float = 0.05,
    ) -> None:
        if segment_bytes is None:
            segment_bytes = min(DEFAULT_SEGMENT_BYTES, max_bytes)
        if segment_bytes < 1024 or max_bytes < segment_bytes:
            raise ValueError("need segment_bytes >= 1024 and max_bytes >= segment_bytes")
        if fsync_interval_s < 0:
            raise ValueError("fsync_interval_s must be >= 0")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # The log is copied into the database file every segment_bytes of it.
        self.segment_bytes = segment_bytes
        self.fsync_interval_s = fsync_interval_s
        self._store = RecordStore(
            self.directory,
            holder="another producer process",
            checkpoint_bytes=segment_bytes,
            fsync_each_commit=fsync_interval_s == 0,
            background_checkpoint=fsync_interval_s > 0,
        )
        # Guards the writer (appends, removals) and the counters. The publisher reads with a
        # connection of its own, the fsync thread syncs the log's file and checkpoints with one
        # of its own: neither needs it.
        self._lock = threading.Lock()
        self._bytes = 0
        self._read_id = 0  # the last id handed to the publisher
        self._unremoved: list[SpoolRecord] = []  # published, their removal failed: tried again
        self._dirty = False
        self._log_bytes = 0  # written to the log since the last checkpoint (about)
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self.added = 0  # recovered at open + appended
        self.sent = 0
        self.in_flight = 0
        self.recovered = 0
        self.refused = 0
        self.alarm = False
        self.broken: str | None = None
        self.corrupt_records = 0
        self._open()

    # --- state -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Records not yet handed to the publisher."""
        return self.added - self.settled - self.in_flight

    @property
    def settled(self) -> int:
        """Records done with: published, or found corrupt on disk (kept aside, logged)."""
        return self.sent + self.corrupt_records

    @property
    def size_bytes(self) -> int:
        """Bytes of the records held (payloads and a few bytes each), as bounded by max_bytes."""
        return self._bytes

    # --- open / close ------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            records, self._bytes = self._store.open()
        except (OSError, sqlite3.Error) as exc:
            raise OutboxBroken(f"outbox directory {self.directory} is unusable: {exc}") from exc
        except errors.IngestdError as exc:  # the spool's "in use" refusal, in the outbox's words
            raise OutboxBroken(str(exc).replace("spool directory", "outbox directory")) from None
        self._read_id = self._store.first_id - 1
        self.recovered = self.added = records
        if self.recovered:
            log.info(
                "outbox %s holds %d event(s) (%d bytes) from an earlier run: publishing them first",
                self.directory,
                self.recovered,
                self._bytes,
                extra={"action": "outbox_recovered"},
            )
        if self.fsync_interval_s > 0:
            self._syncer = threading.Thread(
                target=self._sync_loop, name="ingestd-outbox-fsync", daemon=True
            )
            self._syncer.start()

    def close(self) -> None:
        """fsync what is committed, release the files; unpublished records stay for next run."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            if self.fsync_interval_s > 0 and self.broken is None:
                with contextlib.suppress(OSError):  # the records stay: SQLite recovers at open
                    self._store.sync_log()
            self._store.close()

    # --- appending ---------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Commit one record before returning (see the module's text); the unread count after it.

        Raises OutboxFull (no room now) or OutboxBroken; then nothing of the record is kept.
        """
        if not payload or len(payload) > MAX_RECORD_BYTES:
            raise OutboxError(f"an event of {len(payload)} bytes cannot be kept in the outbox")
        need = record_bytes(payload)
        with self._lock:
            if self.broken is not None:
                self._refuse(f"the outbox is broken: {self.broken}", OutboxBroken)
            if self._bytes + need > self.max_bytes:
                self._refuse(
                    f"it holds {self._bytes} bytes of max_bytes={self.max_bytes}", OutboxFull
                )
            try:
                self._store.append([payload])
            except sqlite3.Error as exc:
                self._append_failed(exc)
            self._bytes += need
            # A commit adds at least a page to the log, however small its record.
            self._log_bytes += PAGE_BYTES * (1 + need // PAGE_BYTES)
            self.added += 1
            self._dirty = self.fsync_interval_s > 0
            if self.alarm:
                self._end_alarm()  # after a refusal that was not a full outbox (permissions)
            return len(self)

    def _append_failed(self, exc: sqlite3.Error) -> NoReturn:
        # SQLite rolled the commit back: the record is not kept, and the caller is told so.
        if is_disk_full(exc):
            self._refuse(f"the disk is full: {exc}", OutboxFull)
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == SQLITE_IOERR:
            # A write or (fsync_interval_s=0) an fsync failed: what is on disk is unknown.
            self._fsync_failed(exc)
            self._refuse(f"the outbox is broken: {self.broken}", OutboxBroken)
        # Anything else (permissions, a read-only directory): the next append tries again.
        self._refuse(f"writing failed: {exc}", OutboxError)

    def _fsync_failed(self, exc: BaseException) -> None:
        # After a failed fsync the kernel may have dropped the dirty pages: what is on disk is
        # unknown, so no more records are taken. Those committed stay readable and published.
        self.broken = f"fsync failed ({exc})"
        log.error(
            "outbox %s: %s: it takes no more events; those it holds are still published",
            self.directory,
            self.broken,
            extra={"action": "outbox_broken"},
        )

    def _refuse(self, reason: str, kind: type[OutboxError]) -> NoReturn:
        self.refused += 1
        if not self.alarm:
            self.alarm = True
            until = "publishing frees room" if kind is OutboxFull else "the cause is fixed"
            log.error(
                "producer outbox %s cannot take more events (%s): log_* raises %s until %s; "
                "nothing is dropped",
                self.directory,
                reason,
                kind.__name__,
                until,
                extra={"action": "outbox_full"},
            )
        raise kind(f"producer outbox {self.directory} cannot take the event: {reason}")

    def _sync_loop(self) -> None:
        """Group commit: one fsync of the log for everything committed in the last interval."""
        while not self._stop.wait(self.fsync_interval_s):
            with self._lock:
                if not self._dirty or self.broken is not None:
                    continue
                self._dirty = False
                checkpoint = self._log_bytes >= self.segment_bytes
                if checkpoint:
                    self._log_bytes = 0
            try:
                self._store.sync_log()  # its own fd: appends go on meanwhile
            except OSError as exc:
                with self._lock:
                    self._fsync_failed(exc)
                continue
            if checkpoint:
                try:
                    self._store.checkpoint()  # its own connection: appends go on meanwhile
                except sqlite3.Error as exc:  # the log keeps the records; tried again later
                    log.warning(
                        "outbox %s: checkpoint failed: %s",
                        self.directory,
                        exc,
                        extra={"action": "outbox_checkpoint"},
                    )

    # --- publishing --------------------------------------------------------------------------

    def take(self, limit: int) -> list[SpoolRecord]:
        """The next records not yet handed out, in order, at most ``limit``."""
        while True:
            with self._lock:
                after = self._read_id
            # Read outside the lock, with the reader's own connection: appends go on meanwhile,
            # and only this, the one publisher, moves the read position.
            rows = self._store.read(after, limit)
            if not rows:
                return []
            good, bad = split_corrupt(rows)
            with self._lock:
                self._read_id = rows[-1][0]
                self.in_flight += len(good)
                if bad:
                    self._skip_corrupt(bad)
            if good:
                return [SpoolRecord(record_id, payload) for record_id, _, payload in good]

    def _skip_corrupt(self, bad: list[tuple[int, int, bytes]]) -> None:
        # Bytes that passed their checksum when written fail it now: the disk changed them.
        # They cannot be published; they are kept aside, not dropped, and loudly logged.
        self._store.set_aside(bad, "published")
        self.corrupt_records += len(bad)  # settled: flush() does not wait for them
        self._remove([SpoolRecord(record_id, payload) for record_id, _, payload in bad])

    def put_back(self, records: list[SpoolRecord]) -> None:
        """An unsent chunk: handed out again next, in order."""
        if not records:
            return
        with self._lock:
            self._read_id = records[0].record_id - 1
            self.in_flight -= len(records)

    def settle(self, records: list[SpoolRecord]) -> None:
        """A published chunk: its records are removed."""
        with self._lock:
            self.sent += len(records)
            self.in_flight -= len(records)
            self._remove(records)
            self._end_alarm()

    def _remove(self, records: list[SpoolRecord]) -> None:
        done = self._unremoved + records
        emptied = self.added == self.settled and not self.in_flight
        try:
            self._store.remove([r.record_id for r in done], emptied=emptied)
        except sqlite3.Error as exc:
            # They stay on disk: removed with the next chunk, or published again after a
            # restart under the same event ids, which ingestd stores once.
            log.warning("outbox removal failed: %s", exc, extra={"action": "outbox_truncate"})
            self._unremoved = done
            return
        self._unremoved = []
        self._bytes -= sum(record_bytes(r.payload) for r in done)

    def _end_alarm(self) -> None:
        """The episode ends below half of max_bytes (hysteresis: no flapping at the edge)."""
        if self.alarm and self.broken is None and self._bytes <= self.max_bytes // 2:
            self.alarm = False
            log.warning(
                "producer outbox %s has room again (%d bytes): log_* takes events again",
                self.directory,
                self._bytes,
                extra={"action": "outbox_room"},
            )


def open_disk_outbox(settings: OutboxSettings, producer: str | None) -> DiskOutbox | None:
    """The outbox directory ``<storage.outbox.dir>/<producer>`` (None when ``dir`` is empty)."""
    if not settings.dir:
        return None
    name = producer or "default"
    if name in {".", ".."} or "/" in name or "\\" in name or "\0" in name:
        raise errors.ConfigError(f"producer name {name!r} cannot name an outbox directory")
    return DiskOutbox(
        Path(settings.dir) / name,
        max_bytes=settings.max_bytes,
        segment_bytes=settings.segment_bytes,
        fsync_interval_s=settings.fsync_interval_s,
    )
