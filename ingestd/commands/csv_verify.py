"""``ingestd verify-csv DIR``: do the CSV files and the database agree?

Per table: row counts, the sum of every numeric column, and the keys missing on either side and
the rows that differ (the first few of each listed), in a readable table; the exit code is non-zero
on any mismatch.

What "the database side" is: the database may also hold rows from other sources (the daemon, other
hosts' files), so each file is compared with the rows *it names*: for the append-only tables the
rows whose ``event_id`` is one of the file's (its column, else the derived ``csv:<file>:<line>``),
keyed by ``(event_id, timestamp)``; for ``positions`` the rows whose ``(producer, position_key)``
is one of the file's (a position is named by both: two producers' ``pos_001`` are two positions;
a row's producer is its ``producer`` column, else ``--producer`` as given to import-csv, else
none), compared with the file's final state of each position (its last CLOSED row, with the entry
columns of its last OPEN row, as the import applies them). Database rows in the file's time
span that it does not name are counted as information, not as a mismatch.

Rows that the import rejected (in ``dead_letters`` under ``csv:<file>:<line>``) are listed apart
and left out of the comparison; a bad row that is *not* in ``dead_letters`` is a
mismatch (the import has not seen it). A last record without its line end is left out and noted,
as import-csv leaves it for its next run. The file's rows are loaded into a temporary table with
COPY (constant client memory) and compared in SQL, where the column types round exactly as the
import's did.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import asyncpg

from ingestd import errors
from ingestd.commands import common as commands
from ingestd.commands.csv_import import (
    converter_for,
    event_of,
    load_checkpoint,
    replaced_reason,
    source_name,
)
from ingestd.commands.textui import format_table
from ingestd.daemon.db import Connection
from ingestd.settings import Settings
from ingestd.wire import csv_format, events, tables

_COPY_ROWS: Final = 5000
# The comparison of a multi-GB file runs statements of minutes; the connection's command timeout
# (10 s) bounds the small ones. Both end the command when the server hangs.
COMPARE_TIMEOUT_S: Final = 600.0
_ENTRY: Final = tuple(name for name, _ in tables.POSITION_ENTRY_COLUMNS)
_EXIT: Final = tuple(name for name, _ in tables.POSITION_EXIT_COLUMNS)


def _q(name: str) -> str:
    # Identifiers come from the fixed layout in csv_format/tables; quoted because of "timestamp".
    return f'"{name}"'


@dataclasses.dataclass(frozen=True, slots=True)
class _Shape:
    """The SQL pieces of one table's comparison, all from the fixed allow-list."""

    table: csv_format.CsvTable
    loaded: tuple[str, ...]  # columns of the temp table (besides line)
    key: tuple[str, ...]
    compared: tuple[str, ...]
    numeric: tuple[str, ...]
    time_column: str

    @property
    def temp(self) -> str:
        return f"verify_{self.table.name}"

    def csv_side(self) -> str:
        """A query of the file's rows, one per key (the final state for positions)."""
        keys = ", ".join(_q(k) for k in self.key)
        if self.table.name != "positions":
            return f"SELECT DISTINCT ON ({keys}) * FROM {self.temp} ORDER BY {keys}, line"
        cols = [f"coalesce(o.{_q(c)}, c.{_q(c)}) AS {_q(c)}" for c in _ENTRY] + [
            f"c.{_q(c)} AS {_q(c)}" for c in _EXIT
        ]
        # The temp table holds '' for "no producer" (never NULL), so USING matches it.
        return (
            "SELECT producer, position_key, "
            + ", ".join(cols)
            + ", CASE WHEN c.position_key IS NULL THEN 'OPEN' ELSE 'CLOSED' END AS status, "
            "least(o.line, c.line) AS line "
            f"FROM (SELECT DISTINCT ON ({keys}) * FROM {self.temp} WHERE status = 'OPEN' "
            f"ORDER BY {keys}, line DESC) AS o "
            f"FULL JOIN (SELECT DISTINCT ON ({keys}) * FROM {self.temp} "
            f"WHERE status = 'CLOSED' ORDER BY {keys}, line DESC) AS c "
            f"USING ({keys})"
        )

    def db_side(self) -> str:
        """The database rows the file names."""
        if self.table.name == "positions":
            # A position without a producer has NULL in the table and '' in the temp table.
            others = ", ".join(f"t.{_q(c)}" for c in self.loaded if c != "producer")
            return (
                f"SELECT coalesce(t.producer, '') AS producer, {others} FROM positions AS t "
                f"WHERE t.position_key IN (SELECT position_key FROM {self.temp}) "
                f"AND (coalesce(t.producer, ''), t.position_key) IN "
                f"(SELECT producer, position_key FROM {self.temp})"
            )
        k = self.key[0]
        return (
            f"SELECT t.* FROM {self.table.name} AS t "
            f"WHERE t.{_q(k)} IN (SELECT {_q(k)} FROM {self.temp})"
        )

    def join_on(self, a: str, b: str) -> str:
        return " AND ".join(f"{a}.{_q(k)} = {b}.{_q(k)}" for k in self.key)


def _shape(table: csv_format.CsvTable) -> _Shape:
    if table.name == "positions":
        # A position is named by (producer, position_key): the producer is loaded and keyed.
        loaded = (
            "producer",
            *(c for c in table.columns if c not in (csv_format.EVENT_ID, "producer")),
        )
        key: tuple[str, ...] = ("producer", "position_key")
        time_column = "timestamp_open"
    else:
        loaded = tuple(c for c in table.columns if c != "producer")
        time_column = tables.APPEND_TABLES_BY_NAME[table.name].time_column
        key = (csv_format.EVENT_ID, time_column)
    compared = tuple(c for c in loaded if c not in key and c != csv_format.EVENT_ID)
    return _Shape(table, loaded, key, compared, table.numeric_columns, time_column)


@dataclasses.dataclass(slots=True)
class TableCheck:
    """The comparison of one file with the database."""

    table: str
    source: str
    status: str = "checked"  # checked, absent, empty, refused
    csv_rows: int = 0
    csv_duplicates: int = 0
    db_rows: int = 0
    missing_in_db: int = 0
    missing_in_csv: int = 0
    differing: int = 0
    other_db_rows: int = 0
    sum_mismatches: list[str] = dataclasses.field(default_factory=list)
    examples: list[str] = dataclasses.field(default_factory=list)
    rejected: list[str] = dataclasses.field(default_factory=list)  # in dead_letters
    unrecorded_bad: list[str] = dataclasses.field(default_factory=list)  # not in dead_letters
    rejected_count: int = 0
    unrecorded_count: int = 0
    incomplete_line: int | None = None  # a last record without its line end: not compared
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the file and the database agree."""
        if self.status == "refused":
            return False
        return (
            self.csv_rows == self.db_rows
            and not (self.missing_in_db or self.missing_in_csv or self.differing)
            and not self.sum_mismatches
            and not self.unrecorded_count
        )


class CsvVerifier:
    """Compares the files of a directory with the database over one connection."""

    def __init__(
        self,
        conn: Connection,
        *,
        id_prefix: str = "",
        show: int = 5,
        timeout_s: float = COMPARE_TIMEOUT_S,
        default_producer: str | None = None,
    ) -> None:
        self._conn = conn
        self._id_prefix = id_prefix
        self._default_producer = default_producer
        self._show = show
        self._timeout_s = timeout_s

    async def verify_directory(self, directory: Path) -> list[TableCheck]:
        """Check every file of the layout that is in ``directory``."""
        checks = []
        for table in csv_format.CSV_TABLES:
            path = directory / table.file_name
            source = source_name(table.file_name, self._id_prefix)
            if not path.is_file():
                checks.append(TableCheck(table.name, source, status="absent"))
                continue
            checks.append(await self.verify_file(table, path, source))
        return checks

    async def verify_file(self, table: csv_format.CsvTable, path: Path, source: str) -> TableCheck:
        """Load the file into a temp table and compare it with the database in SQL."""
        check = TableCheck(table.name, source)
        shape = _shape(table)
        rejected = await self._dead_letter_lines(source)
        with path.open("rb") as f:
            records = csv_format.read_records(f)
            header = next(records, None)
            if header is None:
                check.status = "empty"
                return check
            try:
                converter = converter_for(table, header, source, self._default_producer)
            except csv_format.CsvLayoutError as exc:
                check.status = "refused"
                check.message = str(exc)
                return check
            replaced = await self._replaced(converter, f.fileno())
            if replaced is not None:
                # Still compared (an edited file's differences are worth seeing), but import-csv
                # refuses this file: its derived ids would name the old file's rows.
                check.message = (
                    f"this file's start differs from the file import-csv imported under this name "
                    f"({replaced}): import-csv refuses it. If it replaced that file, import and "
                    "verify it with a distinct --id-prefix; the comparison above is with the old "
                    "file's rows"
                )
            await self._create_temp(shape)
            await self._load(shape, converter, records, rejected, check)
        await self._compare(shape, check)
        return check

    async def _replaced(self, converter: csv_format.RowConverter, fd: int) -> str | None:
        if converter.has_event_id_column:
            return None
        saved = await load_checkpoint(self._conn, converter.source)
        if saved is None:
            return None
        return replaced_reason(saved, fd, os.fstat(fd).st_size)

    async def _dead_letter_lines(self, source: str) -> dict[int, str]:
        prefix = csv_format.dead_letter_key(source, 0)[:-1]  # "csv:<source>:"
        rows = await self._conn.fetch(
            "SELECT dedup_key, error FROM dead_letters WHERE starts_with(dedup_key, $1)",
            prefix,
            timeout=self._timeout_s,
        )
        lines: dict[int, str] = {}
        for r in rows:
            tail = r["dedup_key"][len(prefix) :]
            if tail.isdigit():
                lines[int(tail)] = r["error"]
        return lines

    async def _create_temp(self, shape: _Shape) -> None:
        cols = ", ".join(_q(c) for c in shape.loaded)
        try:
            await self._conn.execute(f"DROP TABLE IF EXISTS {shape.temp}")
            # The layout's columns all exist in the table: the temp table gets their exact types,
            # so COPY rounds the file's values as the import's COPY did.
            await self._conn.execute(
                f"CREATE TEMP TABLE {shape.temp} AS "
                f"SELECT {cols} FROM {shape.table.name} WITH NO DATA"
            )
        except (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError) as exc:
            # The dashboards' reader: read-only sessions, and no TEMPORARY on the database.
            raise commands.CommandRefused(
                "verify-csv needs TEMPORARY on the database (it loads each file into a temporary "
                "table): run it as the writer login (ingestd_writer) or the owner, not as the "
                f"read-only reader ({type(exc).__name__}: {exc})"
            ) from exc
        await self._conn.execute(f"ALTER TABLE {shape.temp} ADD COLUMN line BIGINT NOT NULL")

    async def _load(
        self,
        shape: _Shape,
        converter: csv_format.RowConverter,
        records: Any,
        rejected: dict[int, str],
        check: TableCheck,
    ) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        pending = 0
        for rec in records:
            if not rec.terminated:
                # As import-csv does: a last record without its line end is not there yet.
                check.incomplete_line = rec.line
                break
            if rec.line in rejected:
                check.rejected_count += 1
                if len(check.rejected) < self._show:
                    where = f"{converter.source}:{rec.line}: "
                    reason = rejected[rec.line].removeprefix(where)
                    check.rejected.append(where + reason)
                continue
            try:
                ev = event_of(converter, rec)
            except errors.InvalidEvent as exc:
                check.unrecorded_count += 1
                if len(check.unrecorded_bad) < self._show:
                    check.unrecorded_bad.append(f"{converter.source}:{rec.line}: {exc}")
                continue
            writer.writerow(self._row(shape, ev, rec.line))
            pending += 1
            if pending >= _COPY_ROWS:
                await self._copy(shape, buf)
                pending = 0
        if pending:
            await self._copy(shape, buf)
        await self._conn.execute(
            f"CREATE INDEX ON {shape.temp} ({', '.join(_q(k) for k in shape.key)})",
            timeout=self._timeout_s,
        )
        await self._conn.execute(f"ANALYZE {shape.temp}", timeout=self._timeout_s)

    @staticmethod
    def _row(shape: _Shape, ev: events.Event, line: int) -> list[str]:
        row = []
        for name in shape.loaded:
            if name == csv_format.EVENT_ID:
                row.append(ev.event_id)
            elif name == csv_format.STATUS:
                row.append("CLOSED" if ev.type == "position_close" else "OPEN")
            elif name == csv_format.PRODUCER:
                row.append(ev.producer or "")  # '' kept (FORCE_NOT_NULL): "no producer"
            else:
                value = ev.values.get(name)
                row.append("" if value is None else value)
        row.append(str(line))
        return row

    async def _copy(self, shape: _Shape, buf: io.StringIO) -> None:
        data = buf.getvalue().encode("utf-8")
        buf.seek(0)
        buf.truncate()
        # An async iterable, not a BytesIO: for a file-like source asyncpg defines a reader class
        # per call, in a reference cycle that holds the data until the cyclic GC runs (measured:
        # RSS grew by 20 MiB over a million rows). Plain bytes would be taken for a file path.
        await self._conn.copy_to_table(
            shape.temp,
            source=_once(data),
            columns=[*shape.loaded, "line"],
            format="csv",
            # '' stays '' for the producer ("no producer"); asyncpg needs None, not [], for none.
            force_not_null=[csv_format.PRODUCER] if csv_format.PRODUCER in shape.loaded else None,
        )

    async def _compare(self, shape: _Shape, check: TableCheck) -> None:
        conn = self._conn
        t = self._timeout_s
        csv_side, db_side = shape.csv_side(), shape.db_side()
        sums = ", ".join(f"sum({_q(c)})" for c in shape.numeric)
        counts = await conn.fetchrow(f"SELECT count(*), {sums} FROM ({csv_side}) AS s", timeout=t)
        dbrow = await conn.fetchrow(f"SELECT count(*), {sums} FROM ({db_side}) AS d", timeout=t)
        assert counts is not None and dbrow is not None
        check.csv_rows, check.db_rows = counts[0], dbrow[0]
        check.csv_duplicates = (
            await conn.fetchval(f"SELECT count(*) FROM {shape.temp}", timeout=t) - check.csv_rows
            if shape.table.name != "positions"
            else 0
        )
        for i, name in enumerate(shape.numeric, start=1):
            if counts[i] != dbrow[i]:
                check.sum_mismatches.append(f"sum({name}): csv {counts[i]}, database {dbrow[i]}")
        keys = ", ".join(f"s.{_q(k)}" for k in shape.key)
        missing_db = (
            f"FROM ({csv_side}) AS s WHERE NOT EXISTS "
            f"(SELECT 1 FROM ({db_side}) AS d WHERE {shape.join_on('d', 's')})"
        )
        check.missing_in_db = await conn.fetchval(f"SELECT count(*) {missing_db}", timeout=t)
        for r in await conn.fetch(
            f"SELECT s.line, {keys} {missing_db} ORDER BY s.line LIMIT {int(self._show)}", timeout=t
        ):
            check.examples.append(
                f"{check.source}:{r['line']}: not in the database ({_key_text(shape, r)})"
            )
        dkeys = ", ".join(f"d.{_q(k)}" for k in shape.key)
        missing_csv = (
            f"FROM ({db_side}) AS d WHERE NOT EXISTS "
            f"(SELECT 1 FROM ({csv_side}) AS s WHERE {shape.join_on('s', 'd')})"
        )
        check.missing_in_csv = await conn.fetchval(f"SELECT count(*) {missing_csv}", timeout=t)
        for r in await conn.fetch(
            f"SELECT {dkeys} {missing_csv} LIMIT {int(self._show)}", timeout=t
        ):
            check.examples.append(
                f"{check.source}: in the database, not in the file ({_key_text(shape, r)})"
            )
        differs = " OR ".join(f"s.{_q(c)} IS DISTINCT FROM d.{_q(c)}" for c in shape.compared)
        names = ", ".join(
            f"CASE WHEN s.{_q(c)} IS DISTINCT FROM d.{_q(c)} THEN '{c}' END" for c in shape.compared
        )
        joined = (
            f"FROM ({csv_side}) AS s JOIN ({db_side}) AS d ON {shape.join_on('s', 'd')} "
            f"WHERE {differs}"
        )
        check.differing = await conn.fetchval(f"SELECT count(*) {joined}", timeout=t)
        for r in await conn.fetch(
            f"SELECT s.line, {keys}, array_remove(ARRAY[{names}], NULL) AS cols {joined} "
            f"ORDER BY s.line LIMIT {int(self._show)}",
            timeout=t,
        ):
            check.examples.append(
                f"{check.source}:{r['line']}: differs in {', '.join(r['cols'])} "
                f"({_key_text(shape, r)})"
            )
        if shape.table.name != "positions":
            tc = _q(shape.time_column)
            check.other_db_rows = await conn.fetchval(
                f"SELECT count(*) FROM {shape.table.name} AS t "
                f"WHERE t.{tc} BETWEEN (SELECT min({tc}) FROM {shape.temp}) "
                f"AND (SELECT max({tc}) FROM {shape.temp}) "
                f"AND NOT EXISTS (SELECT 1 FROM {shape.temp} AS v WHERE v.event_id = t.event_id)",
                timeout=t,
            )


async def _once(data: bytes) -> AsyncIterator[bytes]:
    """One chunk of COPY data as an async iterable."""
    yield data


def _key_text(shape: _Shape, record: asyncpg.Record) -> str:
    parts = []
    for k in shape.key:
        value = record[k]
        if k == csv_format.PRODUCER and not value:
            continue  # a position without a producer is named by its position_key alone
        parts.append(f"{k}={events.utc_iso(value) if hasattr(value, 'tzinfo') else value}")
    return ", ".join(parts)


def render(checks: Sequence[TableCheck]) -> str:
    """The summary table and, below it, what differs and what was rejected."""
    headers = ["table", "file", "csv rows", "db rows", "missing in db", "missing in csv"]
    headers += ["differing", "sums", "rejected", "result"]
    rows: list[list[object]] = []
    for c in checks:
        if c.status in ("absent", "empty", "refused"):
            rows.append([c.table, c.source, "-", "-", "-", "-", "-", "-", "-", c.status])
            continue
        rows.append(
            [
                c.table,
                c.source,
                c.csv_rows,
                c.db_rows,
                c.missing_in_db,
                c.missing_in_csv,
                c.differing,
                "differ" if c.sum_mismatches else "equal",
                c.rejected_count,
                "OK" if c.ok else "MISMATCH",
            ]
        )
    out = [format_table(headers, rows)]
    for c in checks:
        details = [f"  {m}" for m in c.sum_mismatches] + [f"  {e}" for e in c.examples]
        if c.unrecorded_count:
            details.append(
                f"  {c.unrecorded_count} bad row(s) not in dead_letters (run import-csv):"
            )
            details += [f"    {b}" for b in c.unrecorded_bad]
        if c.message:
            details.append(f"  {c.message}")
        if details:
            out.append(f"\n{c.table} ({c.source}):")
            out += details
    for c in checks:
        if c.rejected_count:
            out.append(
                f"\n{c.table}: {c.rejected_count} row(s) rejected by import-csv "
                "(in dead_letters; not counted as mismatches):"
            )
            out += [f"  {r}" for r in c.rejected]
            if c.rejected_count > len(c.rejected):
                out.append(f"  ... and {c.rejected_count - len(c.rejected)} more")
    info = [
        f"{c.table}: {c.other_db_rows:,} database row(s) in the file's time span come from "
        "elsewhere (not named by the file; not a mismatch)"
        for c in checks
        if c.other_db_rows
    ]
    info += [
        f"{c.table}: {c.csv_duplicates:,} repeated row(s) in the file (same key; they land once)"
        for c in checks
        if c.csv_duplicates
    ]
    info += [
        f"{c.source}:{c.incomplete_line}: incomplete last line: not compared "
        "(import-csv imports it once it ends with a line end)"
        for c in checks
        if c.incomplete_line is not None
    ]
    if info:
        out.append("")
        out += info
    return "\n".join(out)


async def run_verify(
    settings: Settings,
    directory: Path,
    *,
    id_prefix: str = "",
    show: int = 5,
    default_producer: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``ingestd verify-csv``: 0 when every file agrees with the database, 1 on any mismatch, 2
    when the check could not run."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not directory.is_dir():  # noqa: ASYNC240 - a one-shot command; nothing else runs
        print(f"ingestd verify-csv: {directory} is not a directory", file=err)
        return 2

    async def body(pool: asyncpg.Pool) -> int:
        # One connection throughout: the temporary tables live in its session.
        async with pool.acquire() as conn:
            verifier = CsvVerifier(
                conn, id_prefix=id_prefix, show=show, default_producer=default_producer
            )
            checks = await verifier.verify_directory(directory)
        print(render(checks), file=out)
        present = [c for c in checks if c.status != "absent"]
        if not present:
            known = ", ".join(csv_format.KNOWN_FILE_NAMES)
            print(
                f"ingestd verify-csv: no CSV files of the layout in {directory} (it reads {known})",
                file=err,
            )
            return 1
        return 0 if all(c.ok or c.status == "empty" for c in present) else 1

    return await commands.run_with_database("verify-csv", settings, body, err=err)
