"""``ingestd import-csv DIR``: the producers' CSV history into the database, exactly once.

Each file is streamed record by record (constant memory: a batch of rows at a time, the next one
parsed while the previous one is written), every row is validated through ``ingestd.wire.events``
(the rules of the wire format, also for CSV text), and the batches go through ``PostgresSink``,
the daemon's own writer: CSV COPY, the staging merge ``ON CONFLICT DO NOTHING`` after a unique
violation, poison rows isolated by halving, positions upserted, dead letters — one code path.

* **Idempotent.** A row's key is its ``event_id`` column, else ``csv:<file>:<line>`` (its first
  physical line), so running the import twice, or again after rows were appended, adds only the
  new rows. A bad row goes to ``dead_letters`` under ``dedup_key`` ``csv:<file>:<line>``, once.
* **Resumable.** After each committed batch, ``csv_import_checkpoints`` records the byte offset
  after the batch's last complete record, its line number, and SHA-256s of the file's first 64 KiB
  and of the 64 KiB before the offset. The next run seeks there when both digests still match
  (the file was at most appended to); otherwise it reads the file from the start, except that a
  file whose start differs (replaced, not appended to) and that has no ``event_id`` column is
  refused: its derived ids would be the old file's (pass ``--id-prefix``). The checkpoint
  is written after the batch's commit, not in its transaction: a crash in between re-imports one
  batch, which its keys make a no-op. A last record without a line end (a file still being
  written) is never imported: a half-flushed row can still validate, and the complete row, with
  the same key, would then be skipped as already there. It is reported, the checkpoint stays
  before it, the next run imports it once it ends with a line end, and the exit code is 2.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, TextIO

import asyncpg

from ingestd import errors, logs
from ingestd.commands import common as commands
from ingestd.commands.textui import Progress, ProgressMode, format_table
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.db import Connection
from ingestd.daemon.deadletters import make_dead_letter
from ingestd.daemon.maintenance import backfill_now
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.producer.storage.outbox import Backoff
from ingestd.settings import Settings
from ingestd.wire import csv_format, events

log = logging.getLogger("ingestd.commands.csv_import")

DEFAULT_BATCH_ROWS: Final = 5000
FINGERPRINT_BYTES: Final = 64 * 1024
# Let a batch's COPY round trips progress while the next batch is parsed.
_YIELD_EVERY_ROWS: Final = 256

INCOMPLETE_LAST_LINE: Final = (
    "incomplete last line: not imported; it will be imported once it ends with a line end"
)

_SQL_LOAD_CHECKPOINT: Final = """
SELECT byte_offset, line, rows, head_sha256, tail_sha256
FROM csv_import_checkpoints WHERE source = $1
"""
_SQL_SAVE_CHECKPOINT: Final = """
INSERT INTO csv_import_checkpoints (source, byte_offset, line, rows, head_sha256, tail_sha256)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (source) DO UPDATE SET
    byte_offset = EXCLUDED.byte_offset, line = EXCLUDED.line, rows = EXCLUDED.rows,
    head_sha256 = EXCLUDED.head_sha256, tail_sha256 = EXCLUDED.tail_sha256,
    updated_at = CURRENT_TIMESTAMP
"""
# A position is named by (producer, position_key).
_SQL_EXISTING_POSITIONS: Final = """
SELECT count(*) FROM unnest($1::text[], $2::text[]) AS k(producer, position_key)
JOIN positions AS p
    ON p.position_key = k.position_key AND p.producer IS NOT DISTINCT FROM k.producer
"""


def source_name(file_name: str, id_prefix: str = "") -> str:
    """How ids and dead-letter keys name a file: ``spreads.csv`` or ``<prefix>/spreads.csv``."""
    return f"{id_prefix.rstrip('/')}/{file_name}" if id_prefix else file_name


def converter_for(
    table: csv_format.CsvTable,
    header: csv_format.Record,
    source: str,
    default_producer: str | None = None,
) -> csv_format.RowConverter:
    """The row converter for a file's header record; CsvLayoutError when it cannot be used."""
    if header.fields is None or header.error:
        raise csv_format.CsvLayoutError(
            f"{source}:{header.line}: cannot read the header: {header.error}"
        )
    return csv_format.RowConverter(
        table, header.fields, source=source, default_producer=default_producer
    )


class CsvRowSource:
    """The ``Acknowledger`` of imported rows: their dead letters are keyed ``csv:<file>:<line>``."""

    name = "csv"

    def __init__(self, source: str) -> None:
        self.source = source

    def dead_letter_key(self, item: Item) -> str | None:
        """``csv:<file>:<line>``: a re-import records a rejected row once."""
        return csv_format.dead_letter_key(self.source, int(item.token))

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Nothing to acknowledge: progress is the checkpoint."""


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a file's import got to."""

    byte_offset: int
    line: int
    rows: int
    head_sha256: str
    tail_sha256: str


def fingerprint(fd: int, offset: int) -> tuple[str, str]:
    """SHA-256 of the first 64 KiB (up to ``offset``) and of the 64 KiB before ``offset``."""
    head = os.pread(fd, min(FINGERPRINT_BYTES, offset), 0)
    start = max(0, offset - FINGERPRINT_BYTES)
    tail = os.pread(fd, offset - start, start)
    return hashlib.sha256(head).hexdigest(), hashlib.sha256(tail).hexdigest()


async def load_checkpoint(db: asyncpg.Pool | Connection, source: str) -> Checkpoint | None:
    """The checkpoint recorded for ``source``, if any."""
    row = await db.fetchrow(_SQL_LOAD_CHECKPOINT, source)
    if row is None:
        return None
    return Checkpoint(
        row["byte_offset"],
        row["line"],
        row["rows"],
        row["head_sha256"].strip(),
        row["tail_sha256"].strip(),
    )


class CsvFileReplaced(csv_format.CsvLayoutError):
    """A file replaced since its import, without event_id column: its derived ids would collide."""


def replaced_reason(saved: Checkpoint, fd: int, size: int) -> str | None:
    """Why the file is not the one ``saved`` was recorded for (its start differs), else None."""
    head_bytes = min(FINGERPRINT_BYTES, saved.byte_offset)
    if size < head_bytes:
        # Not provably the same file: a shorter file with another start would collide as well.
        return f"it is shorter ({size:,} bytes) than the {head_bytes:,} bytes fingerprinted before"
    if hashlib.sha256(os.pread(fd, head_bytes, 0)).hexdigest() != saved.head_sha256:
        return f"its first {head_bytes:,} bytes differ from those of the file imported before"
    return None


def replaced_file_refusal(source: str, reason: str) -> str:
    """The refusal of a replaced file whose rows have no event_id (their ids would collide)."""
    quoted = source.replace("'", "''")
    return (
        f"{source}: refused: this is not the file imported before under this name ({reason}). "
        f"It has no event_id column, so its rows' ids (csv:{source}:<line>) and dead-letter keys "
        "would be those of the old file's rows: a row would be skipped as already there, or a "
        "bad row not recorded. Import it with a distinct --id-prefix (for example --id-prefix "
        "rotated-1, and verify-csv with the same), or, if the rows imported from the old file "
        "were removed from the database, delete its checkpoint first (as the owner: DELETE FROM "
        f"csv_import_checkpoints WHERE source = '{quoted}'). If it is the same file edited "
        "rather than replaced, `ingestd verify-csv` shows what differs from the rows imported"
    )


@dataclasses.dataclass(slots=True)
class FileResult:
    """What importing one file did in this run."""

    table: str
    source: str
    status: str = "imported"  # imported, incomplete, up to date, empty, absent, refused, failed
    rows: int = 0
    inserted: int = 0
    present: int = 0
    bad: int = 0
    rejected: int = 0
    resumed_at_line: int | None = None
    incomplete_line: int | None = None  # a last record without its line end, left for next time
    bytes_read: int = 0
    elapsed_s: float = 0.0
    message: str = ""

    @property
    def rate(self) -> float:
        """Rows per second of this run."""
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclasses.dataclass(slots=True)
class ImportReport:
    """Every file's result."""

    files: list[FileResult]

    @property
    def complete(self) -> bool:
        """False when a file's last record has no line end yet (run the import again later)."""
        return all(f.incomplete_line is None for f in self.files)

    @property
    def clean(self) -> bool:
        """True when every present file was read and every row landed."""
        return all(
            f.status not in ("refused", "failed") and f.bad == 0 and f.rejected == 0
            for f in self.files
        )

    def summary(self) -> str:
        """The per-table summary table."""
        headers = ["table", "file", "status", "rows read", "inserted", "already there", "bad"]
        headers += ["resumed at", "rows/s"]
        rows = [
            [
                f.table,
                f.source,
                f.status,
                f.rows,
                f.inserted,
                f.present,
                f.bad + f.rejected,
                "-" if f.resumed_at_line is None else f"line {f.resumed_at_line}",
                round(f.rate),
            ]
            for f in self.files
        ]
        return format_table(headers, rows)


class CsvImporter:
    """Imports the CSV files of a directory through ``PostgresSink``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        progress: Progress,
        report_to: TextIO,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        id_prefix: str = "",
        default_producer: str | None = None,
        resume: bool = True,
        flush_timeout_s: float = 60.0,
        retry_deadline_s: float = 60.0,
        acquire_timeout_s: float = 5.0,
        retention: events.Retention | None = None,
    ) -> None:
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        self._pool = pool
        self._sink = PostgresSink(pool, acquire_timeout_s=acquire_timeout_s)
        self._progress = progress
        self._out = report_to
        self._batch_rows = batch_rows
        self._id_prefix = id_prefix
        self._default_producer = default_producer
        self._resume = resume
        self._flush_timeout_s = flush_timeout_s
        self._retry_deadline_s = retry_deadline_s
        # History older than its table's retention is reported, not imported: the next retention
        # run would delete it (the daemon refuses such events the same way).
        self._retention = retention

    async def import_directory(self, directory: Path) -> ImportReport:
        """Import every file of the layout that is in ``directory`` (positions first)."""
        results = []
        for table in csv_format.CSV_TABLES:
            path = directory / table.file_name
            source = source_name(table.file_name, self._id_prefix)
            if not path.is_file():
                results.append(FileResult(table.name, source, status="absent"))
                continue
            results.append(await self.import_file(table, path, source))
        return ImportReport(results)

    def _say(self, text: str) -> None:
        # Reasons quote the file's own text (a field name, a value): one line each, no controls.
        self._progress.note(logs.escape(text))

    async def import_file(self, table: csv_format.CsvTable, path: Path, source: str) -> FileResult:
        """Import one file; bad rows are reported as ``file:line: reason`` and dead-lettered."""
        result = FileResult(table.name, source)
        t0 = time.monotonic()
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            reader = csv_format.RecordReader(f)
            records = iter(reader)
            header = next(records, None)
            if header is None:
                result.status = "empty"
                return result
            try:
                converter = converter_for(table, header, source, self._default_producer)
            except csv_format.CsvLayoutError as exc:
                result.status = "refused"
                result.message = str(exc)
                self._say(f"import-csv: {exc}")
                return result
            start = Checkpoint(header.end_offset, header.end_line, 0, "", "")
            try:
                saved = await self._checkpoint(converter, f.fileno(), size, header.end_offset)
            except CsvFileReplaced as exc:
                result.status = "refused"
                result.message = str(exc)
                self._say(f"import-csv: {exc}")
                return result
            if saved is not None:
                start = saved
                if saved.byte_offset >= size:
                    result.status = "up to date"
                    result.bytes_read = size
                    return result
                f.seek(saved.byte_offset)
                reader = csv_format.RecordReader(f, offset=saved.byte_offset, line=saved.line)
                records = iter(reader)
                result.resumed_at_line = saved.line + 1
                self._say(
                    f"import-csv: {source}: resuming at line {saved.line + 1} "
                    f"(byte {saved.byte_offset:,}; {saved.rows:,} rows committed before)"
                )
            await self._run(converter, reader, records, f.fileno(), start, size, result)
        result.elapsed_s = time.monotonic() - t0
        return result

    async def _checkpoint(
        self, converter: csv_format.RowConverter, fd: int, size: int, header_end: int
    ) -> Checkpoint | None:
        """Where to resume (None: from the start); CsvFileReplaced for a replaced file."""
        source = converter.source
        saved = await load_checkpoint(self._pool, source)
        if saved is None:
            return None
        # Checked also with --no-resume: the checkpoint records which file this source was.
        replaced = replaced_reason(saved, fd, size)
        if replaced is not None:
            if not converter.has_event_id_column:
                raise CsvFileReplaced(replaced_file_refusal(source, replaced))
            self._say(
                f"import-csv: {source} is not the file imported before under this name "
                f"({replaced}): reading it from the start. Rows whose event_id is already in the "
                "database are not added again, and a bad row is not recorded again where the old "
                f"file's row at its line is already a dead letter (csv:{source}:<line>); pass "
                "--id-prefix to keep the two files apart"
            )
            return None
        if not self._resume:
            return None
        if header_end <= saved.byte_offset <= size and fingerprint(fd, saved.byte_offset) == (
            saved.head_sha256,
            saved.tail_sha256,
        ):
            return saved
        self._say(
            f"import-csv: {source} changed since its last import (its start is the same, but it "
            "was not only appended to): reading it from the start. A row whose key (event_id, "
            f"else csv:{source}:<line>, and time) is already in the database is not added again; "
            "one whose other values were edited is a conflict (a dead letter), and `ingestd "
            "verify-csv` shows what differs"
        )
        return None

    async def _run(
        self,
        converter: csv_format.RowConverter,
        reader: csv_format.RecordReader,
        records: Iterator[csv_format.Record],
        fd: int,
        start: Checkpoint,
        size: int,
        result: FileResult,
    ) -> None:
        source = CsvRowSource(converter.source)
        progress = self._progress
        progress.start(converter.source, size, start.byte_offset)
        batch: list[Item] = []
        rows = start.rows
        safe = start  # the checkpoint after the last complete (line-ended) record
        writing: asyncio.Task[None] | None = None
        offset = start.byte_offset
        for rec in records:
            if not rec.terminated:
                # The file ends inside this record: a producer is still writing it. A half-flushed
                # row may still validate ("2.9836" cut to "2.98") and would then be permanent,
                # since the complete row has the same key. Leave it, and the checkpoint before it.
                result.incomplete_line = rec.line
                self._say(f"{converter.source}:{rec.line}: {INCOMPLETE_LAST_LINE}")
                break
            rows += 1
            result.rows += 1
            offset = rec.end_offset
            batch.append(self._item(converter, rec, source, result))
            safe = Checkpoint(rec.end_offset, rec.end_line, rows, "", "")
            if len(batch) >= self._batch_rows:
                if writing is not None:
                    await writing
                writing = asyncio.create_task(self._commit(converter, batch, fd, safe, result))
                batch = []
                progress.update(offset, result.rows)
            elif writing is not None and len(batch) % _YIELD_EVERY_ROWS == 0:
                await asyncio.sleep(0)
        if writing is not None:
            await writing
        if reader.terminated and result.incomplete_line is None:
            # Blank lines after the last record: the file is read to its (line-ended) end.
            safe = Checkpoint(reader.offset, reader.line, rows, "", "")
        if batch or safe.byte_offset > start.byte_offset:
            await self._commit(converter, batch, fd, safe, result)
        result.bytes_read = reader.offset
        if result.incomplete_line is not None:
            result.status = "incomplete"
        progress.finish(reader.offset, result.rows)

    def _item(
        self,
        converter: csv_format.RowConverter,
        rec: csv_format.Record,
        source: CsvRowSource,
        result: FileResult,
    ) -> Item:
        now = time.monotonic()
        error = rec.error
        field: str | None = None
        if error is None:
            assert rec.fields is not None
            try:
                ev = converter.event(rec.fields, rec.line)
                if self._retention is not None:
                    self._retention.check(ev)
            except errors.InvalidEvent as exc:
                error, field = str(exc), exc.field
            else:
                return Item(ev, None, source, rec.line, rec.raw, now)
        result.bad += 1
        self._say(f"{converter.source}:{rec.line}: {error}")
        dead = make_dead_letter(
            rec.raw,
            f"{converter.source}:{rec.line}: {error}",
            source=source.name,
            field=field,
            dedup_key=csv_format.dead_letter_key(converter.source, rec.line),
            event_type=converter.table.event_type,
        )
        return Item(None, dead, source, rec.line, rec.raw, now)

    async def _commit(
        self,
        converter: csv_format.RowConverter,
        batch: list[Item],
        fd: int,
        safe: Checkpoint,
        result: FileResult,
    ) -> None:
        table = converter.table.name
        good = [it for it in batch if it.event is not None]
        existing = 0
        keys: set[tuple[str | None, str]] = set()
        if table == "positions" and good:
            keys = {
                (it.event.producer, str(it.event.values["position_key"])) for it in good if it.event
            }
            existing = int(
                await self._pool.fetchval(
                    _SQL_EXISTING_POSITIONS, [p for p, _ in keys], [k for _, k in keys]
                )
            )
        outcome = await self._write(batch) if batch else BatchOutcome()
        if table == "positions":
            result.inserted += len(keys) - existing
            result.present += len(good) - (len(keys) - existing)
        else:
            result.inserted += outcome.inserted.get(table, 0)
            result.present += outcome.duplicates
        for item in batch:
            reason = outcome.rejected.get(id(item))
            if reason is not None:
                result.rejected += 1
                self._say(f"{converter.source}:{item.token}: {reason}")
        head, tail = fingerprint(fd, safe.byte_offset)
        await self._pool.execute(
            _SQL_SAVE_CHECKPOINT,
            converter.source,
            safe.byte_offset,
            safe.line,
            safe.rows,
            head,
            tail,
        )

    async def _write(self, batch: list[Item]) -> BatchOutcome:
        backoff = Backoff()
        deadline = time.monotonic() + self._retry_deadline_s
        while True:
            try:
                async with asyncio.timeout(self._flush_timeout_s):
                    return await self._sink.write(batch)
            except Exception as exc:
                if not errors.is_retriable(exc) or time.monotonic() > deadline:
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "batch of %d rows not committed (%s: %s); retrying in %.2fs",
                    len(batch),
                    type(exc).__name__,
                    exc,
                    delay,
                    extra={"action": "import_retry"},
                )
                await asyncio.sleep(delay)


def event_of(converter: csv_format.RowConverter, rec: csv_format.Record) -> events.Event:
    """The validated event of a record (for callers that read files themselves)."""
    if rec.error is not None or rec.fields is None:
        raise errors.InvalidEvent(rec.error or "malformed CSV")
    return converter.event(rec.fields, rec.line)


async def _refresh_imported_hours(pool: asyncpg.Pool, settings: Settings, err: TextIO) -> None:
    """Refresh hourly_spread_avg over the imported hours before its policy's window right away.

    Each batch queued its hours in its own transaction; should this refresh fail, they stay
    queued for ``ingestd run``'s maintenance, so the import's result does not depend on it.
    """
    try:
        async with pool.acquire(timeout=settings.storage.postgres.acquire_timeout_s) as conn:
            detail = await backfill_now(
                conn, statement_timeout_s=settings.maintenance.statement_timeout_s
            )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        detail = f"failed, the hours stay queued for `ingestd run`: {exc}"
    print(f"hourly_spread_avg: {detail}", file=err)


async def run_import(
    settings: Settings,
    directory: Path,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    id_prefix: str = "",
    default_producer: str | None = None,
    resume: bool = True,
    progress_mode: ProgressMode = "auto",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``ingestd import-csv``: 0 when every row landed, 1 when rows or files were rejected, 2 when
    the work is not complete: the import could not run or stopped, or a file's last line has no
    line end yet (running it again resumes where it stopped)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not directory.is_dir():  # noqa: ASYNC240 - a one-shot command; nothing else runs
        print(f"ingestd import-csv: {directory} is not a directory", file=err)
        return 2
    known = ", ".join(csv_format.KNOWN_FILE_NAMES)
    unknown = csv_format.unknown_csv_files(directory)
    if not csv_format.has_known_files(directory):
        found = f"; it has {', '.join(unknown)}" if unknown else ", and no *.csv file at all"
        print(
            f"ingestd import-csv: none of the files import-csv reads ({known}) is in "
            f"{directory}{found}",
            file=err,
        )
        return 2
    for name in unknown:
        print(f"import-csv: {name}: not read (import-csv reads {known} only)", file=err)

    async def body(pool: asyncpg.Pool) -> int:
        events.configure_staleness_from(settings)  # imported spreads are judged alike
        progress = Progress(err, mode=progress_mode)
        importer = CsvImporter(
            pool,
            progress=progress,
            report_to=err,
            batch_rows=batch_rows,
            id_prefix=id_prefix,
            default_producer=default_producer,
            resume=resume,
            flush_timeout_s=settings.pipeline.flush_timeout_s,
            acquire_timeout_s=settings.storage.postgres.acquire_timeout_s,
            retention=events.retention_of(settings.retention),
        )
        try:
            report = await importer.import_directory(directory)
        finally:
            progress.close()  # a bar stopped by an error gives the terminal its cursor back
        print(report.summary(), file=out)
        await _refresh_imported_hours(pool, settings, err)
        if not report.complete:
            return 2  # not yet complete work: the next run imports the rest
        return 0 if report.clean and not unknown else 1

    return await commands.run_with_database(
        "import-csv",
        settings,
        body,
        err=err,
        stopped_hint="; run the same command again to resume",
    )
