"""The hand-written spool that ingestd used before SQLite, kept to reproduce the measurement.

``ingestd bench --spool`` weighs it against ``ingestd.spool`` (SQLite in WAL mode); see
docs/spool.md. It is the in-process spool as it was, unchanged but for its errors (the spool's
own) and this text: a directory of segment files ``spool-<sequence>.log``, written append-only,
each record ``[u32 length][u32 CRC-32 of the payload][payload]`` (big-endian); appends
group-committed (one ``pwrite`` and one ``fsync`` for every append waiting at that moment); at
open a torn tail (a record cut short by a crash, or whose checksum fails) is cut off at the last
valid record; a full disk is a temporary refusal, a failed fsync fatal. ``FileOutbox`` is the
producer outbox's append path as it was on these files: one ``pwrite`` in the caller's thread,
an ``fsync`` from a thread of its own at most ``fsync_interval_s`` later (or before returning).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Final

from ingestd.spool import DISK_FULL_ERRNOS, SpoolBroken, SpoolError, SpoolFull, lock_directory

log = logging.getLogger("ingestd.tools.bench.spill_file")

HEADER: Final = struct.Struct(">II")
# A record longer than this cannot be ours (events are bounded by max_event_bytes): a torn length.
MAX_RECORD_BYTES: Final = 64 * 1024 * 1024
SEGMENT_PREFIX: Final = "spool-"
SEGMENT_SUFFIX: Final = ".log"
# Replay reads this much at a time.
READ_CHUNK_BYTES: Final = 4 * 1024 * 1024
# After a failed write, wait this long before trying the disk again (each try costs a syscall).
WRITE_RETRY_S: Final = 1.0


class _SegmentCutBack(SpoolFull):
    """An fsync found the disk full and the active segment was cut back: seal it."""


@dataclasses.dataclass(slots=True, eq=False)
class SegmentRecord:
    """One record handed to the replay: where it is (for acknowledgement) and its payload."""

    segment: int
    offset: int
    payload: bytes


@dataclasses.dataclass(slots=True, eq=False)
class _Segment:
    seq: int
    path: Path
    size: int = 0  # durable bytes (fsync'd)
    records: int = 0  # durable records
    read_offset: int = 0
    read_records: int = 0  # records handed to the replay
    committed: int = 0
    sealed: bool = False

    @property
    def done(self) -> bool:
        return self.committed >= self.records and self.read_offset >= self.size


def segment_name(seq: int) -> str:
    """The file name of segment ``seq`` (names sort in sequence order)."""
    return f"{SEGMENT_PREFIX}{seq:012d}{SEGMENT_SUFFIX}"


def encode_record(payload: bytes) -> bytes:
    """Header plus payload."""
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def scan(data: bytes, limit: int | None = None) -> tuple[list[tuple[int, bytes]], int]:
    """The valid records at the start of ``data`` (offset, payload) and where validity ends.

    With ``limit``, stops after that many records (the end is then where the last one ends).
    """
    out: list[tuple[int, bytes]] = []
    pos = 0
    end = len(data)
    while pos + HEADER.size <= end and (limit is None or len(out) < limit):
        length, crc = HEADER.unpack_from(data, pos)
        start = pos + HEADER.size
        # A record is never empty: zeros where records should be (a hole in a file, a page the
        # disk never wrote) would otherwise pass as empty records, since crc32(b"") == 0.
        if length == 0 or length > MAX_RECORD_BYTES or start + length > end:
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            break
        out.append((pos, payload))
        pos = start + length
    return out, pos


def recover_segments(directory: Path) -> list[tuple[int, Path, int, int]]:
    """Every segment in ``directory``, in order, as (sequence, path, valid bytes, records).

    A torn tail of the last segment (a write cut short by a crash) is cut off; damage anywhere
    else is kept aside in a ``.corrupt`` file and logged. Call it with the directory locked.
    """
    found: list[tuple[int, Path, int, int]] = []
    paths = sorted(directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))
    for i, path in enumerate(paths):
        seq = int(path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)])
        data = path.read_bytes()
        records, valid = scan(data)
        if valid < len(data):
            _cut_tail(path, data, valid, torn_tail=i == len(paths) - 1)
        found.append((seq, path, valid, len(records)))
    return found


def create_segment_file(directory: Path, seq: int) -> tuple[int, Path]:
    """Create segment ``seq`` empty, its name durable; returns its open fd and path.

    If that fails, no half-made file stays (the next try makes it again, same name).
    """
    path = directory / segment_name(seq)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name is durable before records are
        finally:
            os.close(dir_fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return fd, path


def _cut_tail(path: Path, data: bytes, valid: int, *, torn_tail: bool) -> None:
    if torn_tail:
        log.warning(
            "spool %s: cut a torn tail of %d bytes (a write cut short by a crash)",
            path.name,
            len(data) - valid,
            extra={"action": "spool_torn_tail"},
        )
    else:
        # Only the last segment is ever appended to: damage elsewhere means the disk lied.
        aside = path.with_suffix(".corrupt")
        aside.write_bytes(data[valid:])
        log.error(
            "spool %s: %d bytes after offset %d fail their checksum; kept in %s, not replayed",
            path.name,
            len(data) - valid,
            valid,
            aside.name,
            extra={"action": "spool_corrupt"},
        )
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, valid)
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSpool:
    """An append-only, checksummed, fsync'd local spool with in-order replay."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int = 16 * 1024 * 1024,
        full_retry_s: float = WRITE_RETRY_S,
    ) -> None:
        if segment_bytes < 1024 or max_bytes < segment_bytes:
            raise ValueError("need segment_bytes >= 1024 and max_bytes >= segment_bytes")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.full_retry_s = full_retry_s
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # the active (last) segment, open for writing
        self._lock_fd: int | None = None
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self._reserved = 0
        self._io_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._retry_at = 0.0
        self.broken: str | None = None
        self.appended = 0
        self.replayed = 0
        self.corrupt_records = 0

    # --- state -------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Durable bytes on disk, all segments."""
        return sum(s.size for s in self._segments)

    @property
    def pending_records(self) -> int:
        """Durable records not yet committed to the database."""
        return sum(s.records - s.committed for s in self._segments)

    @property
    def unread(self) -> bool:
        """True while records wait to be replayed (or appends to become durable)."""
        return bool(self._waiting) or any(s.read_offset < s.size for s in self._segments)

    # --- open / close ------------------------------------------------------------------------

    async def open(self) -> int:
        """Lock the directory, recover every segment, and return the records found to replay."""
        try:
            await asyncio.to_thread(self._open_sync)
        except OSError as exc:
            raise SpoolBroken(f"spool directory {self.directory} is unusable: {exc}") from exc
        self._io_task = asyncio.create_task(self._io_loop(), name="ingestd-spool-io")
        found = self.pending_records
        if found:
            log.info(
                "spool holds %d records (%d bytes) to replay",
                found,
                self.size_bytes,
                extra={"action": "spool_recovered"},
            )
        return found

    def _open_sync(self) -> None:
        self._lock_fd = lock_directory(self.directory, "another ingestd process")
        for seq, path, size, records in recover_segments(self.directory):
            self._segments.append(_Segment(seq, path, size=size, records=records, sealed=True))
        # New appends go to a fresh segment, made by the first append (not here: a full disk
        # must not keep the backlog from being replayed). Recovered ones are only read now.

    def _next_seq(self) -> int:
        return self._segments[-1].seq + 1 if self._segments else 1

    def _create_segment_file(self, seq: int) -> tuple[int, int, Path]:
        """Create and open a segment file; only system calls, so it may run in a thread."""
        fd, path = create_segment_file(self.directory, seq)
        return seq, fd, path

    def _add_segment(self, seq: int, fd: int, path: Path) -> None:
        """Make a created segment the active one (in the event loop's thread only)."""
        self._seal_active()
        self._fd = fd
        self._segments.append(_Segment(seq, path))

    def _seal_active(self) -> None:
        """Close the active segment: from now on it is only read (and removed once done)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._segments[-1].sealed = True
            self._collect()

    async def close(self) -> None:
        """Finish pending appends, then release the files (records stay for the next start)."""
        self._closing = True
        self._wake.set()
        if self._io_task is not None:
            await self._io_task
        self._collect()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- appending ---------------------------------------------------------------------------

    async def append(self, payload: bytes) -> None:
        """Append one record; return once it is durable, or raise SpoolError (nothing kept)."""
        if self.broken is not None:
            raise SpoolBroken(self.broken)
        if self._closing:
            raise SpoolBroken("the spool is closing")
        if time.monotonic() < self._retry_at:
            raise SpoolFull("the spool's disk was full a moment ago")
        need = HEADER.size + len(payload)
        if self.size_bytes + self._reserved + need > self.max_bytes:
            raise SpoolFull(f"the spool holds {self.size_bytes} bytes, max_bytes={self.max_bytes}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((payload, fut))
        self._reserved += need
        self._wake.set()
        await fut

    async def _io_loop(self) -> None:
        """The only writer of the active segment: group-committed appends and truncation."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._waiting:
                await self._write_waiting()
            elif self._active_done() and self.broken is None:
                await self._truncate_active()
            if self._closing and not self._waiting:
                return

    async def _write_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        data = b"".join(encode_record(p) for p, _ in batch)
        try:
            if self._fd is None or self._segments[-1].size >= self.segment_bytes:
                await self._new_segment()
            seg = self._segments[-1]
            await asyncio.to_thread(self._write_sync, seg.size, data)
        except SpoolError as exc:
            self._reserved -= len(data)
            if isinstance(exc, _SegmentCutBack):
                self._seal_active()
            refusal = SpoolBroken if isinstance(exc, SpoolBroken) else SpoolFull
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(refusal(str(exc)))
            return
        # Reserved until now, so that appends meanwhile see this batch against max_bytes.
        self._reserved -= len(data)
        seg.size += len(data)
        seg.records += len(batch)
        self.appended += len(batch)
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    async def _new_segment(self) -> None:
        """Make the next segment the active one; SpoolFull (for now) if it cannot be made.

        Nothing has been written when this fails, so the spool's state is intact: a full disk
        (no space, no inode left) or a directory not writable for now is a temporary refusal,
        tried again after ``full_retry_s``. The file is made in a thread; the bookkeeping stays
        here, in the loop, where the replay also changes the segment list.
        """
        try:
            created = await asyncio.to_thread(self._create_segment_file, self._next_seq())
        except OSError as exc:
            self._retry_at = time.monotonic() + self.full_retry_s
            log.warning(
                "cannot create a spool segment in %s, nothing kept: %s",
                self.directory,
                exc,
                extra={"action": "spool_full"},
            )
            raise SpoolFull(
                f"cannot create a spool segment in {self.directory}: {exc.strerror or exc}"
            ) from exc
        self._add_segment(*created)

    def _write_sync(self, at: int, data: bytes) -> None:
        assert self._fd is not None
        fd = self._fd
        try:
            view = memoryview(data)
            written = 0
            while written < len(data):
                written += os.pwrite(fd, view[written:], at + written)
        except OSError as exc:
            # Disk full or file too large: undo the partial write so no half record remains.
            try:
                os.ftruncate(fd, at)
            except OSError as undo:
                self.broken = f"spool write failed ({exc}) and could not be undone ({undo})"
                log.error("%s", self.broken, extra={"action": "spool_broken"})
                raise SpoolBroken(self.broken) from exc
            self._retry_at = time.monotonic() + self.full_retry_s
            log.warning(
                "spool write of %d bytes failed, nothing kept: %s",
                len(data),
                exc,
                extra={"action": "spool_full"},
            )
            raise SpoolFull(f"spool write failed: {exc.strerror or exc}") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS and self._cut_back(fd, at):
                self._retry_at = time.monotonic() + self.full_retry_s
                log.warning(
                    "spool fsync of %d bytes found the disk full, nothing kept; the segment "
                    "was cut back to its last durable record and sealed: %s",
                    len(data),
                    exc,
                    extra={"action": "spool_full"},
                )
                raise _SegmentCutBack(f"spool fsync failed: {exc.strerror or exc}") from exc
            self.broken = f"spool fsync failed ({exc}): the spool is no longer trusted"
            log.error("%s", self.broken, extra={"action": "spool_broken"})
            raise SpoolBroken(self.broken) from exc

    @staticmethod
    def _cut_back(fd: int, at: int) -> bool:
        """After an fsync that found the disk full: drop what it covered, durably.

        Everything before ``at`` was fsync'd earlier and is on disk; what was written after it
        may or may not be. Cutting the file at ``at`` and fsyncing that (a size change, no data
        to write) leaves it in a known state; the segment is then sealed, never written again.
        """
        try:
            os.ftruncate(fd, at)
            os.fsync(fd)
        except OSError as undo:
            log.error(
                "spool: cutting a segment back after a failed fsync failed too: %s",
                undo,
                extra={"action": "spool_broken"},
            )
            return False
        return True

    # --- replaying ---------------------------------------------------------------------------

    async def read_batch(self, limit: int) -> list[SegmentRecord]:
        """The next durable records not yet handed out, in order (at most ``limit``)."""
        for seg in self._segments:
            if seg.read_offset >= seg.size:
                continue
            start = seg.read_offset
            length = min(seg.size - start, READ_CHUNK_BYTES)
            data = await asyncio.to_thread(_pread, seg.path, start, length)
            records, _ = scan(data)
            if not records and len(data) >= HEADER.size:
                # One record larger than a chunk: read exactly it.
                need = HEADER.size + HEADER.unpack_from(data)[0]
                if need <= seg.size - start:
                    data = await asyncio.to_thread(_pread, seg.path, start, need)
                    records, _ = scan(data)
            if not records:
                # Durable bytes that no longer pass their checksum: the disk changed them after
                # they were fsync'd. They cannot be replayed; they are kept aside, not dropped.
                aside = seg.path.with_suffix(f".{start}.corrupt")
                await asyncio.to_thread(_copy_range, seg.path, start, seg.size - start, aside)
                skipped = seg.records - seg.read_records
                log.error(
                    "spool %s: %d records after offset %d fail their checksum since they were "
                    "written; kept in %s, not replayed",
                    seg.path.name,
                    skipped,
                    start,
                    aside.name,
                    extra={"action": "spool_corrupt"},
                )
                self.corrupt_records += skipped
                seg.read_offset = seg.size
                seg.read_records = seg.records
                seg.committed += skipped  # what was handed out before still counts on its own
                self._collect()
                continue
            records = records[:limit]
            last_offset, last_payload = records[-1]
            seg.read_offset = start + last_offset + HEADER.size + len(last_payload)
            seg.read_records += len(records)
            self.replayed += len(records)
            return [SegmentRecord(seg.seq, start + off, payload) for off, payload in records]
        return []

    def committed(self, records: list[SegmentRecord]) -> None:
        """Mark records as committed to the database; remove what is wholly done."""
        by_seq = {s.seq: s for s in self._segments}
        for r in records:
            seg = by_seq.get(r.segment)
            if seg is not None:
                seg.committed += 1
        self._collect()

    def _collect(self) -> None:
        keep: list[_Segment] = []
        for seg in self._segments:
            if seg.sealed and seg.done:
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
            else:
                keep.append(seg)
        self._segments = keep
        if self._active_done() and self._segments[-1].size > 0:
            self._wake.set()  # the io loop truncates the active segment

    def _active_done(self) -> bool:
        if not self._segments or self._waiting:
            return False
        active = self._segments[-1]
        return not active.sealed and active.size > 0 and active.done

    async def _truncate_active(self) -> None:
        seg = self._segments[-1]
        try:
            await asyncio.to_thread(self._truncate_sync)
        except OSError as exc:
            log.warning("spool truncate failed: %s", exc, extra={"action": "spool_truncate"})
            return
        seg.size = seg.records = seg.read_offset = seg.read_records = seg.committed = 0

    def _truncate_sync(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)


def _copy_range(source: Path, offset: int, length: int, target: Path) -> None:
    target.write_bytes(_pread(source, offset, length))


def _pread(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


class FileOutbox:
    """The producer outbox's append path on segment files, as ``DiskOutbox`` had it.

    ``append`` writes the record with one ``pwrite`` in the caller's thread; a thread of its own
    fsyncs at most ``fsync_interval_s`` later (one fsync for everything written meanwhile), or,
    with ``fsync_interval_s=0``, ``append`` fsyncs before it returns. Segments rotate at
    ``segment_bytes``; the publishing side (reading, removing) is not part of the measurement.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync_interval_s: float,
        segment_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.directory = directory
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fsync_lock = threading.Lock()  # held while an fsync runs on the active fd
        self._lock_fd = lock_directory(directory, "another producer process")
        self._seq = 0
        self._fd: int | None = None
        self._size = 0
        self._dirty = False
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if fsync_interval_s > 0:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True)
            self._syncer.start()

    def append(self, payload: bytes) -> None:
        """Write one record before returning (and fsync it, with ``fsync_interval_s=0``)."""
        record = encode_record(payload)
        with self._lock:
            if self._fd is None or self._size + len(record) > self.segment_bytes:
                self._rotate()
            assert self._fd is not None
            os.pwrite(self._fd, record, self._size)
            if self.fsync_interval_s == 0:
                with self._fsync_lock:
                    os.fsync(self._fd)
            self._size += len(record)
            self._dirty = self.fsync_interval_s > 0

    def _rotate(self) -> None:
        if self._fd is not None:
            with self._fsync_lock:
                os.fsync(self._fd)  # the outgoing segment is durable before it is only read
                os.close(self._fd)
        self._seq += 1
        self._fd, _ = create_segment_file(self.directory, self._seq)
        self._size = 0

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            self._lock.acquire()
            if not self._dirty or self._fd is None:
                self._lock.release()
                continue
            fd = self._fd
            self._dirty = False
            with self._fsync_lock:  # taken under _lock, so fd cannot close meanwhile
                self._lock.release()
                os.fsync(fd)

    def close(self) -> None:
        """Stop the fsync thread, fsync and close the files."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)
