"""The spool: in-process events past the in-memory bound, kept on local disk until committed.

The records live in one SQLite database in WAL mode (``spool.sqlite3`` in the spool's
directory, beside its ``-wal`` and ``-shm`` files and a lock file): SQLite's write-ahead log
already does what a hand-written spool would have to get right (a commit is all there or not
there after a crash, a torn tail of the log is ignored at the next open) and is tested far beyond
what this project could test. ``docs/spool.md`` has the measurements behind the choice.

A record is a row ``(id, crc, payload)``: ids grow in append order and the replay reads them in
that order. The CRC-32 of the payload is checked at replay: SQLite checksums its log but not its
database pages, so a payload the disk changed after it was written is caught here; such records
are kept aside in a ``records-<id>.corrupt`` file, logged, and not replayed.

Appends are group-committed: every append waiting at that moment goes into one transaction,
committed with ``synchronous=FULL`` (the log is fsync'd before the commit returns), and an append
returns only once its record is durable, so an event counts as accepted exactly when it is on
disk, power loss included. A record committed to the database is removed (its removal is not
fsync'd on its own: one lost to a power loss replays the record again, and its ``event_id`` makes
it land once). The log is copied into the database file (a checkpoint) every ``segment_bytes``
of log, inside the commit that crosses it, which is SQLite's own way.

A full disk (SQLite's ``SQLITE_FULL``) is a temporary refusal (``SpoolFull``): SQLite rolls the
transaction back, so nothing of the refused records stays, and the spool takes appends again once
space is freed. Any other I/O error (a failed fsync among them) is fatal for the spool: after it,
what is on disk is unknown, so it takes no more appends, but still replays what was durable.

``RecordStore`` is the mechanism itself, shared with the producer's disk outbox
(``ingestd.producer.storage.outbox``), which commits its appends without an fsync each and syncs
the log
from a thread of its own instead. All of the ``Spool``'s state lives in the event loop's thread;
the database is used from worker threads, one call at a time per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ingestd.errors import IngestdError

log = logging.getLogger("ingestd.spool")

DATABASE_FILE: Final = "spool.sqlite3"
# The files of the earlier format (append-only segments), refused at open while they hold records.
EARLIER_SEGMENTS: Final = "spool-*.log"
LOCK_FILE: Final = "spool.lock"
# Counted per record besides its payload against max_bytes (its id and checksum).
RECORD_OVERHEAD: Final = 16
# A record longer than this cannot be ours (events are bounded by max_event_bytes).
MAX_RECORD_BYTES: Final = 64 * 1024 * 1024
# SQLite's page size: the unit of its log and of the checkpoint threshold.
PAGE_BYTES: Final = 4096
# After a refused write, wait this long before trying the disk again (each try costs a syscall).
WRITE_RETRY_S: Final = 1.0
# The errors of a disk (or a quota, or a file size limit) that is full for now.
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# SQLite's primary result code for a full disk (the low byte of an extended code).
SQLITE_FULL: Final = 13


class SpoolError(IngestdError):
    """The spool cannot take this record now; the caller falls back to waiting (backpressure)."""

    retriable = True


def refuse_earlier_segments(directory: Path) -> None:
    """Refuse a directory that still holds records in the earlier format (``spool-*.log``
    segment files, before the records moved into SQLite): this version cannot replay them, and
    starting beside them would leave accepted events unreplayed without a word."""
    segments = [p for p in sorted(directory.glob(EARLIER_SEGMENTS)) if p.stat().st_size > 0]
    if segments:
        size = sum(p.stat().st_size for p in segments)
        raise SpoolError(
            f"{directory} holds {len(segments)} segment file(s) of the earlier spool format "
            f"({EARLIER_SEGMENTS}, {size} bytes) that this version cannot replay: run the earlier "
            "ingestd version on it until it is empty (it removes each segment it has replayed), "
            "then start this one; nothing was read or removed"
        )


class SpoolFull(SpoolError):
    """The spool reached ``max_bytes``, or the disk (or file size limit) is full."""


class SpoolBroken(SpoolError):
    """An fsync failed, or the directory is unusable: the spool takes no more appends."""

    retriable = False


@dataclasses.dataclass(slots=True, eq=False)
class SpoolRecord:
    """One record handed to the replay: its id (for acknowledgement) and its payload."""

    record_id: int
    payload: bytes


def lock_directory(directory: Path, holder: str) -> int:
    """Create ``directory`` and take its lock file; SpoolBroken naming ``holder`` if it is held.

    The lock (``flock``) goes with the process: a killed process leaves no stale lock behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise SpoolBroken(f"spool directory {directory} is in use by {holder}") from None
    return lock_fd


def is_disk_full(exc: BaseException) -> bool:
    """True for SQLite's or the system's "disk full" (a refusal for now, not a breakage)."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", 0) & 0xFF == SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def record_bytes(payload: bytes) -> int:
    """What one record counts against ``max_bytes``."""
    return RECORD_OVERHEAD + len(payload)


class RecordStore:
    """Records in one SQLite database in WAL mode: the mechanism of the spool and the outbox.

    ``fsync_each_commit``: each append's commit fsyncs the log (``synchronous=FULL``); without it
    a commit is written to the log (the page cache, which a killed process does not take with it)
    and the owner calls ``sync_log`` to make it durable. ``checkpoint_bytes``: the log is copied
    into the database file once this much of it was written; inside the commit that crosses it,
    or, with ``background_checkpoint``, only when the owner calls ``checkpoint`` (from a thread of
    its own: a PASSIVE checkpoint never blocks the writer). Not thread-safe: one thread at a time
    uses the writer (``append``, ``remove``), one the reader (``read``).
    """

    def __init__(
        self,
        directory: Path,
        *,
        holder: str,
        checkpoint_bytes: int,
        fsync_each_commit: bool = True,
        background_checkpoint: bool = False,
    ) -> None:
        self.directory = directory
        self.path = directory / DATABASE_FILE
        self.holder = holder
        self.checkpoint_bytes = checkpoint_bytes
        self.fsync_each_commit = fsync_each_commit
        self.background_checkpoint = background_checkpoint
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._log_fd: int | None = None
        self.last_id = 0  # the id of the last record appended (ids grow in append order)
        self.first_id = 1  # the first record's id at open

    def open(self) -> tuple[int, int]:
        """Lock the directory and open (so recover) the database: (records, their bytes)."""
        self._lock_fd = lock_directory(self.directory, self.holder)
        try:
            refuse_earlier_segments(self.directory)
            # Incremental: the file gives back the room of removed records when asked (remove).
            # Set on a new database only (it stays set; setting it again writes, which a full
            # disk refuses), and before WAL mode, which writes the new database's first page.
            new = not self.path.exists()
            self._writer = self._connect(setup="PRAGMA auto_vacuum=INCREMENTAL" if new else None)
            self._writer.execute(
                f"PRAGMA synchronous={'FULL' if self.fsync_each_commit else 'NORMAL'}"
            )
            # In the background, the writer checkpoints only if that falls far behind (a bound).
            threshold = self.checkpoint_bytes * (4 if self.background_checkpoint else 1)
            self._writer.execute(f"PRAGMA wal_autocheckpoint={max(1, threshold // PAGE_BYTES)}")
            self._writer.execute(
                "CREATE TABLE IF NOT EXISTS records ("
                "id INTEGER PRIMARY KEY, crc INTEGER NOT NULL, payload BLOB NOT NULL)"
            )
            self._reader = self._connect()
            if self.background_checkpoint:
                self._checkpointer = self._connect()
            if not self.fsync_each_commit:
                # The log's file, to fsync it (SQLite made it above, in WAL mode; it stays until
                # the last connection closes).
                self._log_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CREAT, 0o600)
            count, total, first, last = self._reader.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0), min(id), max(id) FROM records"
            ).fetchone()
        except BaseException:
            self.close()
            raise
        self.last_id = last or 0
        self.first_id = first or 1
        return count, total + RECORD_OVERHEAD * count

    def _connect(self, setup: str | None = None) -> sqlite3.Connection:
        # isolation_level=None: our transactions only (BEGIN IMMEDIATE ... COMMIT), none implied;
        # check_same_thread=False: each call may run in another worker thread, one at a time.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if setup is not None:
            conn.execute(setup)
        # Opening in WAL mode recovers: log frames after the last complete commit (a torn tail)
        # are ignored.
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def close(self) -> None:
        """Close the connections (the last one checkpoints and removes the log) and the lock."""
        for conn in (self._checkpointer, self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._checkpointer = self._reader = self._writer = None
        for fd in (self._log_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._log_fd = self._lock_fd = None

    def append(self, payloads: Sequence[bytes]) -> int:
        """Commit the records in one transaction; the id of the last. Raises sqlite3.Error."""
        conn = self._writer
        assert conn is not None
        first = self.last_id + 1
        rows = [(first + i, zlib.crc32(p), p) for i, p in enumerate(payloads)]
        try:
            if len(rows) == 1:
                conn.execute("INSERT INTO records (id, crc, payload) VALUES (?, ?, ?)", rows[0])
            else:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO records (id, crc, payload) VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
        except sqlite3.Error:
            _rollback(conn)
            raise
        self.last_id = first + len(rows) - 1
        return self.last_id

    def read(self, after: int, limit: int) -> list[tuple[int, int, bytes]]:
        """Up to ``limit`` records with ids above ``after``, in order: (id, crc, payload)."""
        assert self._reader is not None
        rows: list[tuple[int, int, bytes]] = self._reader.execute(
            "SELECT id, crc, payload FROM records WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()
        return rows

    def remove(self, ids: Sequence[int], *, emptied: bool) -> None:
        """Remove records (done with); ``emptied``: none is left, the file may give room back.

        Not fsync'd on its own (``synchronous=NORMAL`` for this commit): a removal lost to a
        power loss brings records back that are replayed again, under their fixed event ids.
        """
        conn = self._writer
        assert conn is not None
        if self.fsync_each_commit:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("DELETE FROM records WHERE id = ?", ((i,) for i in ids))
            conn.execute("COMMIT")
            # Giving room back shrinks the file, which the next appends grow again: only worth
            # it once an emptied spool holds a backlog's worth of free pages.
            if emptied:
                free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
                if free_pages * PAGE_BYTES >= self.checkpoint_bytes:
                    # executescript steps it to the end (execute would free one page).
                    conn.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error:
            _rollback(conn)
            raise
        finally:
            if self.fsync_each_commit:
                conn.execute("PRAGMA synchronous=FULL")

    def sync_log(self) -> None:
        """fsync the log: every record committed so far survives a power loss. Raises OSError."""
        assert self._log_fd is not None
        os.fsync(self._log_fd)

    def checkpoint(self) -> None:
        """Copy the log into the database file (PASSIVE: the writer goes on meanwhile)."""
        assert self._checkpointer is not None
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def set_aside(self, rows: Sequence[tuple[int, int, bytes]], what: str) -> Path:
        """Keep records that fail their checksum in a file of their own, logged; the file."""
        aside = self.directory / f"records-{rows[0][0]}.corrupt"
        aside.write_bytes(b"".join(payload for _, _, payload in rows))
        log.error(
            "%s: %d record(s) from id %d fail their checksum since they were written (the disk "
            "changed them); kept in %s, not %s",
            self.directory,
            len(rows),
            rows[0][0],
            aside.name,
            what,
            extra={"action": "spool_corrupt"},
        )
        return aside


def split_corrupt(
    rows: Sequence[tuple[int, int, bytes]],
) -> tuple[list[tuple[int, int, bytes]], list[tuple[int, int, bytes]]]:
    """(records whose payload passes its checksum, those that fail it)."""
    good: list[tuple[int, int, bytes]] = []
    bad: list[tuple[int, int, bytes]] = []
    for row in rows:
        (good if zlib.crc32(row[2]) == row[1] else bad).append(row)
    return good, bad


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # SQLite rolls back itself when it must; logged only
            log.warning("rollback failed: %s", exc, extra={"action": "spool_rollback"})


class Spool:
    """A durable, checksummed local spool with in-order replay (SQLite WAL, group commit)."""

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
        # The log is copied into the database file every segment_bytes of it.
        self.segment_bytes = segment_bytes
        self.full_retry_s = full_retry_s
        self._store = RecordStore(
            directory, holder="another ingestd process", checkpoint_bytes=segment_bytes
        )
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self._reserved = 0
        self._bytes = 0  # durable records not yet removed, as counted against max_bytes
        self._records = 0
        self._read_id = 0  # the last id handed to the replay
        self._done: list[SpoolRecord] = []  # committed to the database, to remove
        self._removing = 0  # of those, being removed now
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
        """Durable records not yet removed, as counted against ``max_bytes``."""
        return self._bytes

    @property
    def pending_records(self) -> int:
        """Durable records not yet committed to the database."""
        return self._records - len(self._done) - self._removing

    @property
    def unread(self) -> bool:
        """True while records wait to be replayed (or appends to become durable)."""
        return bool(self._waiting) or self._read_id < self._store.last_id

    # --- open / close ------------------------------------------------------------------------

    async def open(self) -> int:
        """Lock the directory, recover the database, and return the records found to replay."""
        try:
            self._records, self._bytes = await asyncio.to_thread(self._store.open)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolBroken(f"spool directory {self.directory} is unusable: {exc}") from exc
        self._read_id = self._store.first_id - 1
        self._io_task = asyncio.create_task(self._io_loop(), name="ingestd-spool-io")
        if self._records:
            log.info(
                "spool holds %d records (%d bytes) to replay",
                self._records,
                self._bytes,
                extra={"action": "spool_recovered"},
            )
        return self._records

    async def close(self) -> None:
        """Finish pending appends and removals, then release the files (records stay)."""
        self._closing = True
        self._wake.set()
        if self._io_task is not None:
            await self._io_task
        await asyncio.to_thread(self._store.close)

    # --- appending ---------------------------------------------------------------------------

    async def append(self, payload: bytes) -> None:
        """Append one record; return once it is durable, or raise SpoolError (nothing kept)."""
        if self.broken is not None:
            raise SpoolBroken(self.broken)
        if self._closing:
            raise SpoolBroken("the spool is closing")
        if time.monotonic() < self._retry_at:
            raise SpoolFull("the spool's disk was full a moment ago")
        need = record_bytes(payload)
        if self._bytes + self._reserved + need > self.max_bytes:
            raise SpoolFull(f"the spool holds {self._bytes} bytes, max_bytes={self.max_bytes}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((payload, fut))
        self._reserved += need
        self._wake.set()
        await fut

    async def _io_loop(self) -> None:
        """The only user of the writer: group-committed appends, then removals."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._waiting:
                await self._write_waiting()
            while self._done and self.broken is None and await self._remove_done():
                pass  # what was committed while the last removal ran, too
            if self._closing and not self._waiting:
                return  # what could not be removed is replayed again after a restart

    async def _write_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        need = sum(record_bytes(p) for p, _ in batch)
        try:
            await asyncio.to_thread(self._store.append, [p for p, _ in batch])
        except sqlite3.Error as exc:
            self._reserved -= need
            refusal = self._refusal(exc)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(type(refusal)(str(refusal)))
            return
        # Reserved until now, so that appends meanwhile see this batch against max_bytes.
        self._reserved -= need
        self._bytes += need
        self._records += len(batch)
        self.appended += len(batch)
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    def _refusal(self, exc: sqlite3.Error) -> SpoolError:
        if is_disk_full(exc):
            # SQLite rolled the transaction back: nothing of the batch stays.
            self._retry_at = time.monotonic() + self.full_retry_s
            log.warning(
                "spool write failed, the disk is full, nothing kept: %s",
                exc,
                extra={"action": "spool_full"},
            )
            return SpoolFull(f"spool write failed, the disk is full: {exc}")
        self.broken = f"spool write failed ({exc}): the spool is no longer trusted"
        log.error("%s", self.broken, extra={"action": "spool_broken"})
        return SpoolBroken(self.broken)

    # --- replaying ---------------------------------------------------------------------------

    async def read_batch(self, limit: int) -> list[SpoolRecord]:
        """The next durable records not yet handed out, in order (at most ``limit``)."""
        while self._read_id < self._store.last_id:
            rows = await asyncio.to_thread(self._store.read, self._read_id, limit)
            if not rows:
                return []
            self._read_id = rows[-1][0]
            good, bad = split_corrupt(rows)
            if bad:
                await asyncio.to_thread(self._store.set_aside, bad, "replayed")
                self.corrupt_records += len(bad)
                self._done.extend(SpoolRecord(i, p) for i, _, p in bad)
                self._wake.set()
            if good:
                self.replayed += len(good)
                return [SpoolRecord(i, p) for i, _, p in good]
        return []

    def committed(self, records: list[SpoolRecord]) -> None:
        """Mark records as committed to the database; the io loop removes them."""
        self._done.extend(records)
        self._wake.set()

    async def _remove_done(self) -> bool:
        done, self._done = self._done, []
        emptied = len(done) == self._records and not self._waiting
        self._removing = len(done)
        try:
            await asyncio.to_thread(
                self._store.remove, [r.record_id for r in done], emptied=emptied
            )
        except sqlite3.Error as exc:
            # They stay on disk (replayed again after a restart, stored once); tried again.
            log.warning("spool removal failed: %s", exc, extra={"action": "spool_truncate"})
            self._done = done + self._done
            return False
        finally:
            self._removing = 0
        self._records -= len(done)
        self._bytes -= sum(record_bytes(r.payload) for r in done)
        return True
