"""The producer's outboxes: events logged and not yet published, in the order they were logged.

``Outbox`` is a bounded in-memory FIFO, pure bookkeeping. The publishing loops (a thread for
synchronous code, a task for asyncio) ``take`` a chunk, send it in one pipelined round trip, and
``settle`` it; on failure they ``put_back`` the chunk at the front, so order is kept and nothing is
lost while the stream is unreachable. When it is full, the ``block`` policy makes producers wait;
the ``drop_oldest`` policy (dual write, where the CSV file already holds every event) drops the
oldest and counts it.

``DiskOutbox`` is the same queue kept in a local directory, with the same ``take`` / ``settle`` /
``put_back`` protocol: the ``postgres`` backend's outbox, so that ``log_*`` never waits for Redis
and what it returned from survives ``kill -9`` of the producer. Its files are the spool's
(``ingestd.spool``): segments ``spool-<sequence>.log`` of ``[u32 length][u32 CRC-32][payload]``
records, a lock file, and the same recovery at open (a torn tail is cut at the last valid record).
What differs is when a record counts as kept. The in-process spool's ``append`` is an asyncio
group commit that returns after ``fsync``; a trading loop cannot wait for a disk flush per event,
so here:

* ``append`` writes the record with one ``pwrite(2)`` in the caller's thread before it returns:
  the bytes are in the kernel's page cache, which a killed process does not take with it. So
  ``kill -9`` (or any crash of the producer) loses nothing that ``log_*`` returned from.
* a background thread ``fsync``s at most ``fsync_interval_s`` later (group commit: one fsync for
  everything written meanwhile), so a power loss or kernel crash costs at most that window of
  events not yet published; ``fsync_interval_s=0`` fsyncs every record before ``append`` returns.

Every event goes through the directory, also while Redis answers: an outbox that spilled only once
a publish failed would hold in memory what was logged before the failure was noticed (up to a
socket timeout of events), and a kill then would lose it. Memory holds one chunk at a time; the
publisher reads the records back from the page cache. A segment is deleted once all of its records
are published (the active one truncated), so after a restart at most the records whose publish was
not yet confirmed are published again, under their fixed ``event_id``s: at-least-once into the
stream, exactly once in the database (ingestd stores an ``event_id`` once).

The directory is bounded by ``max_bytes``. A full outbox refuses the record (``OutboxFull``): the
caller's ``log_*`` raises, nothing is dropped silently, and an alarm is raised once per episode
(an ERROR log line, ``alarm`` and ``refused``), cleared when publishing has brought it below half.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import random
import threading
from pathlib import Path
from typing import Final, Literal, NoReturn

from ingestd import errors
from ingestd.settings import OutboxSettings
from ingestd.spool import (
    DISK_FULL_ERRNOS,
    HEADER,
    MAX_RECORD_BYTES,
    READ_CHUNK_BYTES,
    create_segment_file,
    encode_record,
    lock_directory,
    recover_segments,
    scan,
)

log = logging.getLogger("ingestd.storage.outbox")

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
    """Capped, fully jittered exponential backoff (the pipeline's defaults, scaled down)."""

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


@dataclasses.dataclass(frozen=True, slots=True)
class Spilled:
    """One record handed to the publisher, with where it is (to settle or put it back)."""

    segment: int
    offset: int
    payload: bytes


@dataclasses.dataclass(slots=True, eq=False)
class _Segment:
    seq: int
    path: Path
    size: int = 0  # bytes written (in the page cache at least)
    records: int = 0
    read_offset: int = 0  # the next record to hand out
    read_records: int = 0
    settled: int = 0
    sealed: bool = False

    @property
    def done(self) -> bool:
        return self.settled >= self.records and self.read_offset >= self.size


class DiskOutbox:
    """Events on local disk until published: thread-safe; see the module's text for durability.

    ``append`` may be called from any thread (and from an event loop: it is one ``pwrite``);
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
        self.segment_bytes = segment_bytes
        self.fsync_interval_s = fsync_interval_s
        self._lock = threading.Lock()
        # Held while an fsync runs on the active fd, so that a rotation never closes it under
        # the fsync. Taken after _lock, never before.
        self._fsync_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # the active (last, unsealed) segment
        self._lock_fd: int | None = None
        self._bytes = 0
        self._dirty = False
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
        """Bytes in the directory's segments."""
        return self._bytes

    # --- open / close ------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self._lock_fd = lock_directory(self.directory, "another producer process")
            for seq, path, size, records in recover_segments(self.directory):
                self._segments.append(_Segment(seq, path, size, records, sealed=True))
        except OSError as exc:
            self._release_lock()
            raise OutboxBroken(f"outbox directory {self.directory} is unusable: {exc}") from exc
        except errors.IngestdError as exc:  # the spool's "in use" refusal, in the outbox's words
            self._release_lock()
            raise OutboxBroken(str(exc).replace("spool directory", "outbox directory")) from None
        self._bytes = sum(s.size for s in self._segments)
        self.recovered = self.added = sum(s.records for s in self._segments)
        self._collect()
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

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """fsync what is written, release the files; unpublished records stay for the next run."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):  # the records stay; a torn tail is cut at open
                    os.fsync(self._fd)
                self._seal_active()
            self._collect()
            self._release_lock()

    # --- appending ---------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Write one record before returning (see the module's text); the unread count after it.

        Raises OutboxFull (no room now) or OutboxBroken; then nothing of the record is kept.
        """
        if not payload or len(payload) > MAX_RECORD_BYTES:
            # Recovery reads such a record as a torn one: it would never be published.
            raise OutboxError(f"an event of {len(payload)} bytes cannot be kept in the outbox")
        record = encode_record(payload)
        with self._lock:
            if self.broken is not None:
                self._refuse(f"the outbox is broken: {self.broken}", OutboxBroken)
            if self._bytes + len(record) > self.max_bytes:
                self._refuse(
                    f"it holds {self._bytes} bytes of max_bytes={self.max_bytes}", OutboxFull
                )
            active = self._active_for(len(record))
            fd = self._fd
            assert fd is not None
            self._write(fd, active.size, record)
            if self.fsync_interval_s == 0:
                try:
                    self._fsync_now(fd)
                except OutboxBroken:
                    # Not kept: the caller is told so, and the record must not be published.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, active.size)
                    raise
            active.size += len(record)
            active.records += 1
            self._bytes += len(record)
            self.added += 1
            self._dirty = self.fsync_interval_s > 0
            if self.alarm:
                self._end_alarm()  # after a refusal that was not a full outbox (permissions)
            return len(self)

    def _active_for(self, need: int) -> _Segment:
        """The segment that takes the next record: a new one when the active one is full."""
        if self._fd is not None and self._segments[-1].size + need <= self.segment_bytes:
            return self._segments[-1]
        if self._fd is not None and self._segments[-1].size == 0:
            return self._segments[-1]  # one record larger than a segment goes in alone
        if self._fd is not None:
            # The outgoing segment is made durable before it is only read from now on.
            self._fsync_now(self._fd)
            self._seal_active()
        seq = self._segments[-1].seq + 1 if self._segments else 1
        try:
            fd, path = create_segment_file(self.directory, seq)
        except OSError as exc:
            self._refuse(f"cannot create a segment: {exc.strerror or exc}", _refusal(exc))
        self._fd = fd
        self._segments.append(_Segment(seq, path))
        return self._segments[-1]

    def _write(self, fd: int, at: int, record: bytes) -> None:
        try:
            view = memoryview(record)
            written = 0
            while written < len(record):
                written += os.pwrite(fd, view[written:], at + written)
        except OSError as exc:
            # Undo a partial write, so that no half record stays in front of the next one.
            try:
                os.ftruncate(fd, at)
            except OSError as undo:
                self.broken = f"a write failed ({exc}) and could not be undone ({undo})"
                self._refuse(self.broken, OutboxBroken)
            self._refuse(f"writing failed: {exc.strerror or exc}", _refusal(exc))

    def _fsync_now(self, fd: int) -> None:
        with self._fsync_lock:
            try:
                os.fsync(fd)
            except OSError as exc:
                self._fsync_failed(exc)
                self._refuse(f"the outbox is broken: {self.broken}", OutboxBroken)
            self._dirty = False

    def _fsync_failed(self, exc: OSError) -> None:
        # After a failed fsync the kernel may have dropped the dirty pages: what is on disk is
        # unknown, so no more records are taken. Those written stay readable.
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
        """Group commit: one fsync for everything written in the last interval."""
        while not self._stop.wait(self.fsync_interval_s):
            self._lock.acquire()
            if not self._dirty or self._fd is None or self.broken is not None:
                self._lock.release()
                continue
            fd = self._fd
            self._dirty = False
            with self._fsync_lock:  # taken under _lock (the order), so fd cannot close meanwhile
                self._lock.release()
                failure: OSError | None = None
                try:
                    os.fsync(fd)
                except OSError as exc:
                    failure = exc
            if failure is not None:
                with self._lock:  # not under _fsync_lock: the locks are taken in one order only
                    self._fsync_failed(failure)

    # --- publishing --------------------------------------------------------------------------

    def take(self, limit: int) -> list[Spilled]:
        """The next records not yet handed out, in order, at most ``limit``, from one segment."""
        while True:
            with self._lock:
                seg = next((s for s in self._segments if s.read_offset < s.size), None)
                if seg is None:
                    return []
                start, end = seg.read_offset, seg.size
                # About ``limit`` records' worth (twice the segment's mean record), not more:
                # a backlog is read once, not a read chunk per publish.
                window = 2 * limit * max(1, seg.size // max(1, seg.records))
            # Read outside the lock: appends go on meanwhile (past ``end``), and only this, the
            # one publisher, moves the read offset or removes segments.
            data = _pread(seg.path, start, min(end - start, READ_CHUNK_BYTES, window))
            records, _ = scan(data, limit)
            if not records and len(data) >= HEADER.size:
                need = HEADER.size + HEADER.unpack_from(data)[0]
                if need <= end - start:  # one record longer than a read chunk
                    records, _ = scan(_pread(seg.path, start, need))
            if not records:
                self._skip_corrupt(seg, start, end)
                continue
            records = records[:limit]
            last_offset, last_payload = records[-1]
            with self._lock:
                seg.read_offset = start + last_offset + HEADER.size + len(last_payload)
                seg.read_records += len(records)
                self.in_flight += len(records)
            return [Spilled(seg.seq, start + off, payload) for off, payload in records]

    def _skip_corrupt(self, seg: _Segment, start: int, end: int) -> None:
        # Bytes that passed their checksum when written fail it now: the disk changed them.
        # They cannot be published; they are kept aside, not dropped, and loudly logged.
        aside = seg.path.with_suffix(f".{start}.corrupt")
        aside.write_bytes(_pread(seg.path, start, end - start))
        with self._lock:
            skipped = seg.records - seg.read_records
            log.error(
                "outbox %s: %d record(s) after offset %d fail their checksum; kept in %s, "
                "not published",
                seg.path,
                skipped,
                start,
                aside.name,
                extra={"action": "outbox_corrupt"},
            )
            self.corrupt_records += skipped
            seg.read_offset = end
            seg.read_records = seg.records
            seg.settled += skipped  # never to be published: flush() does not wait for them
            self._collect()

    def put_back(self, records: list[Spilled]) -> None:
        """An unsent chunk: handed out again next, in order."""
        if not records:
            return
        with self._lock:
            seg = next(s for s in self._segments if s.seq == records[0].segment)
            seg.read_offset = records[0].offset
            seg.read_records -= len(records)
            self.in_flight -= len(records)

    def settle(self, records: list[Spilled]) -> None:
        """A published chunk: segments wholly published are removed (the active one emptied)."""
        with self._lock:
            by_seq = {s.seq: s for s in self._segments}
            for r in records:
                by_seq[r.segment].settled += 1
            self.sent += len(records)
            self.in_flight -= len(records)
            self._collect()

    def _collect(self) -> None:
        keep: list[_Segment] = []
        for seg in self._segments:
            if seg.sealed and seg.done:
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
                self._bytes -= seg.size
            else:
                keep.append(seg)
        self._segments = keep
        active = self._segments[-1] if self._segments else None
        if active is not None and not active.sealed and active.size and active.done:
            # Everything in it is published: empty it, so that a restart republishes nothing.
            # No fsync: if a power loss brings the records back, they are published again
            # under the same event ids, which ingestd stores once.
            assert self._fd is not None
            try:
                os.ftruncate(self._fd, 0)
            except OSError as exc:
                log.warning("outbox truncate failed: %s", exc, extra={"action": "outbox_truncate"})
            else:
                self._bytes -= active.size
                active.size = active.records = active.read_offset = 0
                active.read_records = active.settled = 0
        self._end_alarm()

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

    def _seal_active(self) -> None:
        """Close the active segment's fd: it is only read from now on (under both locks)."""
        if self._fd is not None:
            with self._fsync_lock:
                os.close(self._fd)
            self._fd = None
            self._segments[-1].sealed = True


def _refusal(exc: OSError) -> type[OutboxError]:
    # A full disk frees up as the outbox is published; anything else (permissions) is reported
    # as such, and the next append tries again.
    return OutboxFull if exc.errno in DISK_FULL_ERRNOS else OutboxError


def _pread(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


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
