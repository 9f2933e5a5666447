"""``CsvStorage``: the CSV logs producers keep as a backup.

One append-only file per table in one directory: ``positions.csv``, ``orders.csv``,
``spreads.csv``, ``trades.csv``, ``fx_rates.csv``, in the CSV layout of docs/csv-migration.md
(UTF-8, ``\\n`` line ends, RFC 4180 quoting), each row with its ``event_id``, so that
``ingestd import-csv`` of these files is exactly idempotent. ``positions.csv`` gets one row per
event: an ``OPEN`` row when a position is opened and a ``CLOSED`` row (with the entry columns
again) when it is closed; the import replays them in order, so the file is safe to import at any
time, also while it grows.

Durability: every row is handed to the operating system as it is logged (one ``write`` as a
rule, repeated when the kernel takes only part of it, so a crash of the producer loses nothing
already logged), and fsync'd at most ``fsync_interval_s`` later by a timer (default 1 s, like
Redis ``appendfsync everysec``), and at ``flush()``/``close()``; ``fsync_interval_s=0`` fsyncs
every row. After a power loss, at most the last interval is lost. A row that cannot be written
(disk full) is cut off again and ``CsvWriteFailed`` is raised: it is not logged, and no torn row
stays. A failed fsync is fatal for its file: what is on disk is unknown, so the
file takes no more rows, and every later ``log_*`` to it, ``flush()`` and ``close()`` raise
``CsvWriteFailed`` (a failure on the timer thread is logged once and kept for those calls).
A file left with a torn last row (no line end) gets a line end before the next row, so that only
the torn row is bad (``import-csv`` reports it), never the next one.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import logging
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from ingestd.errors import IngestdError, InvalidEvent
from ingestd.producer.storage.base import AsyncLogMethods, EventBuilder, LogMethods
from ingestd.settings import CsvSettings, Settings
from ingestd.wire import csv_format, events

log = logging.getLogger("ingestd.producer.storage.csv")

DEFAULT_FSYNC_INTERVAL_S = 1.0


class CsvWriteFailed(IngestdError):
    """A CSV row could not be written (disk full, I/O error), or an fsync of its file failed.

    Raised by a dual write (``DualStorage``), it names the event: ``event_id`` is the id the
    event was given, and ``published`` says whether it went to the database side all the same.
    """

    event_id: str | None = None
    published: bool = False


def check_header(path: Path, table: csv_format.CsvTable) -> bool:
    """CsvLayoutError unless ``path`` is absent, empty or has CsvStorage's header for ``table``;
    True when the file ends with a torn row (no line end)."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        first = next(csv_format.read_records(f), None)
        header = tuple(h.strip() for h in first.fields or ()) if first else ()
        if header != table.columns:
            raise csv_format.CsvLayoutError(
                f"{path} has the header {','.join(header)!r}, but CsvStorage writes "
                f"{','.join(table.columns)!r}: import it (`ingestd import-csv`) and move "
                "it aside, or log to another directory"
            )
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class CsvFile:
    """One append-only CSV file of the layout, opened for appending (header written if new)."""

    def __init__(self, path: Path, table: csv_format.CsvTable) -> None:
        self.path = path
        self.table = table
        self.rows = 0
        # Rows handed to the OS and rows known fsync'd: a counter, not a flag, so that a row
        # written while an fsync runs (outside the storage's lock) is not taken for synced.
        self._written = 1  # the header, or the directory entry of a new file
        self._synced = 0
        self._fsync_error: OSError | None = None
        created = not path.exists()
        self._needs_line_end = check_header(path, table)
        if self._needs_line_end:
            log.warning(
                "%s ends with a torn row; it stays a bad row of its own",
                path,
                extra={"action": "csv_torn_row"},
            )
        self._f = path.open("ab", buffering=0)
        self._buf = io.StringIO()
        self._writer = csv.writer(self._buf, lineterminator="\n")
        try:
            if os.lseek(self._f.fileno(), 0, os.SEEK_END) == 0:
                self._write(list(table.columns))
            elif self._needs_line_end:
                self._write_bytes(b"")
            if created:
                _fsync_dir(path.parent)
        except BaseException:
            self._f.close()
            raise

    def _write(self, row: list[str]) -> None:
        self._writer.writerow(row)
        data = self._buf.getvalue().encode("utf-8")
        self._buf.seek(0)
        self._buf.truncate()
        self._write_bytes(data)

    def _write_bytes(self, data: bytes) -> None:
        # One write(2) per row as a rule, but a write may be short (a disk filling up takes what
        # fits): loop until all of it is there. On an error, cut the file back to where the row
        # began, so that no torn row stays behind, and raise: the row is not logged.
        if self._needs_line_end:
            data = b"\n" + data  # after a torn row: this row starts on a line of its own
        fd = self._f.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)  # O_APPEND: the row goes where the file ends now
        try:
            _write_all(fd, data)
        except OSError as exc:
            kept = "nothing of it was kept"
            try:
                os.ftruncate(fd, start)
            except OSError as cut_exc:
                kept = f"a part of it may be left ({cut_exc.strerror}); the next row starts anew"
                self._needs_line_end = True
            raise CsvWriteFailed(
                f"{self.path}: could not write a row ({exc.strerror or exc}): the row is not "
                f"logged, {kept}"
            ) from exc
        self._needs_line_end = False

    def check(self) -> None:
        """Raise CsvWriteFailed if an fsync of this file failed: it takes no more rows."""
        exc = self._fsync_error
        if exc is not None:
            reason = exc.strerror or str(exc)
            raise CsvWriteFailed(
                f"{self.path}: an fsync failed ({reason}): what is on disk is unknown, so this "
                "file takes no more rows; log to another directory (an fsync failure is fatal)"
            ) from exc

    @property
    def failed(self) -> bool:
        """True once an fsync of this file failed."""
        return self._fsync_error is not None

    @property
    def dirty(self) -> bool:
        """True when rows were written since the last successful fsync."""
        return self._written != self._synced

    def append(self, row: list[str]) -> None:
        """Write one row (handed to the OS at once; fsync'd later)."""
        self.check()
        self._write(row)
        self.rows += 1
        self._written += 1

    def sync(self) -> None:
        """fsync the file if rows were written since the last fsync (CsvWriteFailed if not)."""
        self.check()
        target = self._written
        if target == self._synced:
            return
        try:
            os.fsync(self._f.fileno())
        except OSError as exc:
            self._fsync_error = exc
            self.check()
        self._synced = target

    def close(self) -> None:
        """fsync and close (the file is closed even when the fsync fails)."""
        try:
            self.sync()
        finally:
            self._f.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    done = 0
    while done < len(data):
        n = os.write(fd, view[done:])
        if n <= 0:  # never for a regular file, but a loop must not spin on it
            raise OSError(errno.EIO, "write(2) wrote nothing")
        done += n


def _fsync_dir(directory: Path) -> None:
    # A new file's directory entry is durable only once the directory itself is fsync'd.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CsvStorage(LogMethods):
    """``CsvStorage``: the ``log_*`` calls write rows of the CSV layout."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        producer: str | None = None,
        id_prefix: str | None = None,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # A file with another header is refused now, not at the first row a producer logs.
        for table in csv_format.CSV_TABLES:
            check_header(self.directory / table.file_name, table)
        self._events = EventBuilder(producer, id_prefix)
        self._fsync_interval_s = fsync_interval_s
        self._files: dict[str, CsvFile] = {}
        # _lock guards the files and rows; _sync_lock is held across fsyncs (and close), so that
        # a row is never written while waiting for an fsync (an asyncio producer would stall).
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls, settings: Settings | CsvSettings, *, producer: str | None = None
    ) -> CsvStorage:
        """Write to ``storage.csv.dir`` with its fsync interval."""
        csv_settings = settings.storage.csv if isinstance(settings, Settings) else settings
        return cls(
            csv_settings.dir, producer=producer, fsync_interval_s=csv_settings.fsync_interval_s
        )

    def __enter__(self) -> CsvStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def fsyncs_every_row(self) -> bool:
        """True when each ``log_*`` call fsyncs its row (``fsync_interval_s=0``)."""
        return self._fsync_interval_s <= 0

    def is_open(self, event_type: str) -> bool:
        """True when the file of this event type is open (its next row is a ``write`` only)."""
        return csv_format.TABLE_OF_EVENT.get(event_type) in self._files

    def path(self, table: str) -> Path:
        """The file of a table (``spreads`` -> ``DIR/spreads.csv``)."""
        return self.directory / csv_format.CSV_TABLES_BY_NAME[table].file_name

    def _emit(self, event: dict[str, Any]) -> str:
        ev = events.parse_event(event)
        self.write_event(ev)
        return ev.event_id

    def write_event(self, ev: events.Event) -> None:
        """Append the row of one validated event to its table's file."""
        name = csv_format.TABLE_OF_EVENT.get(ev.type)
        if name is None:
            raise InvalidEvent(f"a {ev.type} event has no CSV file", field="type")
        table = csv_format.CSV_TABLES_BY_NAME[name]
        row = csv_format.row_of(table, ev)
        with self._lock:
            if self._closed:
                raise ValueError("this CsvStorage is closed")
            f = self._files.get(name)
            if f is None:
                f = self._files[name] = CsvFile(self.directory / table.file_name, table)
            f.append(row)
            if self._fsync_interval_s <= 0:
                f.sync()
            elif self._timer is None:
                self._timer = threading.Timer(self._fsync_interval_s, self._timed_sync)
                self._timer.daemon = True
                self._timer.start()

    def _timed_sync(self) -> None:
        with self._lock:
            self._timer = None
        # A failure stays on its file and is raised from the next log_* to it and from flush();
        # here it is logged once, and the timer thread lives on for the other files.
        for f, exc in self._sync_all(skip_failed=True):
            log.error(
                "fsync of %s failed; it takes no more rows: %s",
                f.path,
                exc,
                extra={"action": "csv_fsync_failed"},
            )

    def _sync_all(self, *, skip_failed: bool) -> list[tuple[CsvFile, CsvWriteFailed]]:
        failures: list[tuple[CsvFile, CsvWriteFailed]] = []
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    return failures
                files = list(self._files.values())
            for f in files:  # outside _lock: rows go on being written meanwhile
                if skip_failed and f.failed:
                    continue
                try:
                    f.sync()
                except CsvWriteFailed as exc:
                    failures.append((f, exc))
        return failures

    def flush(self, timeout: float | None = None) -> None:
        """fsync every file written to; CsvWriteFailed if one cannot be (``timeout``: parity)."""
        failures = self._sync_all(skip_failed=False)
        if failures:
            raise failures[0][1]

    def close(self) -> None:
        """fsync and close every file; CsvWriteFailed (after closing all) if one failed."""
        failure: CsvWriteFailed | None = None
        with self._sync_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for f in self._files.values():
                try:
                    f.close()
                except CsvWriteFailed as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure


async def emit_off_the_loop(storage: CsvStorage, event: dict[str, Any]) -> str:
    """``storage._emit`` for asyncio code: inline when it is one ``write(2)``, in a thread when
    it fsyncs (every row with ``fsync_interval_s=0``; a new file's directory entry), so that no
    fsync blocks the event loop."""
    if storage.fsyncs_every_row or not storage.is_open(str(event.get("type"))):
        return await asyncio.to_thread(storage._emit, event)
    return storage._emit(event)


class AsyncCsvStorage(AsyncLogMethods):
    """``CsvStorage`` for asyncio code: a row is one ``write(2)``; every fsync runs in a thread."""

    def __init__(self, csv_storage: CsvStorage) -> None:
        self.csv = csv_storage
        self._events = csv_storage._events

    async def __aenter__(self) -> AsyncCsvStorage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _emit(self, event: dict[str, Any]) -> str:
        return await emit_off_the_loop(self.csv, event)

    async def flush(self) -> None:
        """fsync every file written to (in a thread: the event loop goes on meanwhile)."""
        await asyncio.to_thread(self.csv.flush)

    async def aclose(self) -> None:
        """fsync and close every file (in a thread)."""
        await asyncio.to_thread(self.csv.close)
