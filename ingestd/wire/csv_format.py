"""The CSV layout (docs/csv-migration.md), shared by ``CsvStorage``, ``import-csv``, ``verify-csv``.

A file's header is its table's columns minus those the database owns (``id``, ``position_id``,
``created_at``, ``updated_at``), with ``position_key`` in positions/orders/trades, and the optional
``event_id`` and ``producer`` columns. A row becomes a wire event and is validated by
``ingestd.wire.events``, so a CSV value obeys exactly the rules of a JSON one. Files are read as
bytes,
line by line, so the reader knows each record's first line number and the byte offset after it
(for progress, resume and ``file:line`` reports) and holds one record in memory at a time.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

from ingestd.errors import IngestdError, InvalidEvent
from ingestd.wire import events, tables

EVENT_ID: Final = "event_id"
PRODUCER: Final = "producer"
STATUS: Final = "status"
UTF8_BOM: Final = b"\xef\xbb\xbf"


class CsvLayoutError(IngestdError):
    """A CSV file's header cannot be imported (unknown, missing or repeated columns)."""


@dataclasses.dataclass(frozen=True, slots=True)
class CsvTable:
    """One CSV file of the layout: its table, its columns in writing order, their types."""

    name: str
    columns: tuple[str, ...]
    kinds: Mapping[str, tables.ColumnType]
    required: frozenset[str]
    event_type: str | None  # None for positions: a row is an open or a close by its status
    # Optional columns an imported file may have besides ``columns`` (CsvStorage does not write
    # them, so that files it wrote before they existed keep their header and still append).
    extra: tuple[str, ...] = ()

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every column a file of this table may have."""
        return (*self.columns, *self.extra)

    @property
    def file_name(self) -> str:
        """``spreads.csv`` and so on."""
        return f"{self.name}.csv"

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        """Columns whose sums verify-csv compares."""
        return tuple(c for c in self.columns if isinstance(self.kinds.get(c), tables.Numeric))


# Columns added after the first layout: optional on import, not written by CsvStorage.
IMPORT_ONLY: Final = frozenset({"upbit_ts", "binance_ts", "fx_ts", "mode"})


def _append_table(table: tables.Table, event_type: str) -> CsvTable:
    spec = events.EVENT_TYPES[event_type]
    columns = tuple(
        c
        for c in table.column_names
        if c not in (EVENT_ID, PRODUCER) and c not in IMPORT_ONLY and c not in table.derived
    )
    return CsvTable(
        name=table.name,
        columns=(*columns, EVENT_ID, PRODUCER),
        kinds=dict(table.columns),
        required=frozenset(f.name for f in spec.fields if f.required),
        event_type=event_type,
        extra=tuple(c for c in table.column_names if c in IMPORT_ONLY),
    )


_POSITION_COLUMNS: Final = (
    ("position_key", tables.POSITION_KEY),
    *[c for c in tables.POSITION_ENTRY_COLUMNS if c[0] != "timestamp_open"],
    *[c for c in tables.POSITION_EXIT_COLUMNS if c[0] != "timestamp_close"],
    (STATUS, tables.Varchar(20)),
    ("timestamp_open", tables.TIME),
    ("timestamp_close", tables.TIME),
)
POSITIONS: Final = CsvTable(
    name="positions",
    columns=(*(name for name, _ in _POSITION_COLUMNS), EVENT_ID, PRODUCER),
    kinds={**dict(_POSITION_COLUMNS), "mode": tables.MODE},
    required=frozenset(f.name for f in events.EVENT_TYPES["position_open"].fields if f.required),
    event_type=None,
    extra=("mode",),
)

# Import order: positions first, so that orders and trades are linked to them at once.
CSV_TABLES: Final = (
    POSITIONS,
    _append_table(tables.ORDERS, "order"),
    _append_table(tables.TRADES, "trade"),
    _append_table(tables.SPREADS, "spread"),
    _append_table(tables.FX_RATES, "fx_rate"),
)
CSV_TABLES_BY_NAME: Final = {t.name: t for t in CSV_TABLES}
KNOWN_FILE_NAMES: Final = tuple(t.file_name for t in CSV_TABLES)


def unknown_csv_files(directory: Path) -> list[str]:
    """The ``*.csv`` files in ``directory`` that are none of ``KNOWN_FILE_NAMES`` (a misspelt or
    renamed file would otherwise be passed over without a word)."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.suffix.lower() == ".csv" and p.name not in KNOWN_FILE_NAMES and p.is_file()
    )


def has_known_files(directory: Path) -> bool:
    """True when ``directory`` holds at least one file of the layout."""
    return any((directory / name).is_file() for name in KNOWN_FILE_NAMES)


TABLE_OF_EVENT: Final = {
    "spread": "spreads",
    "fx_rate": "fx_rates",
    "order": "orders",
    "trade": "trades",
    "position_open": "positions",
    "position_close": "positions",
}
_EXIT_COLUMNS: Final = tuple(name for name, _ in tables.POSITION_EXIT_COLUMNS)

# ---- identities --------------------------------------------------------------------------------


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:32]
    return f"{text[: limit - 33]}~{digest}"


def derived_event_id(source: str, line: int) -> str:
    """The stable id of a row without ``event_id``: ``csv:<file>:<line>`` (re-import lands once)."""
    return _bounded(f"csv:{source}:{line}", tables.EVENT_ID.length)


def dead_letter_key(source: str, line: int) -> str:
    """The ``dead_letters.dedup_key`` of a rejected row: ``csv:<file>:<line>``."""
    return f"csv:{source}:{line}"


# ---- values ------------------------------------------------------------------------------------

_TRUE: Final = frozenset({"true", "t", "1"})
_FALSE: Final = frozenset({"false", "f", "0"})
# ISO-8601 basic offset (+0900) as strftime's %z writes it; RFC 3339 wants +09:00.
_BASIC_OFFSET: Final = re.compile(r"(.*[0-9])([+-][0-9]{2})([0-9]{2})\Z")


def _numeric(text: str, field: str) -> object:
    text = text.strip()
    # A CSV number is literal text, like a JSON number: an exponent (``1e-05``, as str(float)
    # writes small numbers) is read exactly; plain decimals keep the fast exact-text path.
    if "e" in text or "E" in text:
        return events.JsonNumber(text)
    return text


def _boolean(text: str, field: str) -> object:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise InvalidEvent(f"{text[:40]!r} is not a boolean (true/false, t/f, 1/0)", field=field)


def _time(text: str, field: str) -> object:
    text = text.strip()
    if text[-1:] in ("Z", "z") or text[-3:-2] == ":":
        return text  # the common forms (Z, +09:00): no regex per row
    m = _BASIC_OFFSET.match(text)
    if m is not None and ":" in m.group(1):
        return f"{m.group(1)}{m.group(2)}:{m.group(3)}"
    return text


def _text(text: str, field: str) -> object:
    return text


def _converter(kind: tables.ColumnType) -> Callable[[str, str], object]:
    if isinstance(kind, tables.Numeric):
        return _numeric
    if isinstance(kind, tables.Boolean):
        return _boolean
    if isinstance(kind, tables.Timestamptz):
        return _time
    return _text


class RowConverter:
    """Turns the rows of one file (given its header) into validated ``events.Event``s."""

    def __init__(
        self,
        table: CsvTable,
        header: Sequence[str],
        *,
        source: str,
        default_producer: str | None = None,
    ) -> None:
        names = [h.strip() for h in header]
        repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
        if repeated:
            raise CsvLayoutError(
                f"{source}: column(s) repeated in the header: {', '.join(repeated)}"
            )
        unknown = [n for n in names if n not in table.accepted]
        if unknown:
            raise CsvLayoutError(
                f"{source}: unknown column(s) {', '.join(repr(n) for n in unknown)} "
                f"(the {table.name} layout has: {', '.join(table.accepted)})"
            )
        missing = sorted(table.required - set(names))
        if missing:
            raise CsvLayoutError(f"{source}: missing required column(s): {', '.join(missing)}")
        self.table = table
        self.header = tuple(names)
        self.source = source
        self._width = len(names)
        self._default_producer = default_producer
        index = {n: i for i, n in enumerate(names)}
        self._event_id = index.get(EVENT_ID)
        self._producer = index.get(PRODUCER)
        self._status = index.get(STATUS)
        self._cols = [
            (name, index[name], _converter(table.kinds[name]))
            for name in table.accepted
            if name in index and name not in (EVENT_ID, PRODUCER, STATUS)
        ]
        self._exit = [index[n] for n in _EXIT_COLUMNS if n in index]
        # Derived ids are "csv:<source>:<line>"; the prefix is built once, not per row.
        self._id_prefix = derived_event_id(source, 0)[:-1]
        self._id_fits = len(self._id_prefix) + 20 <= tables.EVENT_ID.length
        self._close_time = index.get("timestamp_close")

    @property
    def has_event_id_column(self) -> bool:
        """True when the file names its rows' ids; else they are derived from file and line."""
        return self._event_id is not None

    def event(self, fields: Sequence[str], line: int) -> events.Event:
        """Validate one row (named by its first line); raise InvalidEvent naming the field."""
        if len(fields) != self._width:
            raise InvalidEvent(f"the row has {len(fields)} field(s), the header has {self._width}")
        etype = self.table.event_type or self._position_type(fields)
        obj: dict[str, Any] = {"type": etype}
        for name, i, convert in self._cols:
            text = fields[i]
            if text:
                obj[name] = convert(text, name)
        if etype == "position_open":
            for name in _EXIT_COLUMNS:
                obj.pop(name, None)
        event_id = fields[self._event_id] if self._event_id is not None else ""
        if not event_id:
            event_id = (
                self._id_prefix + str(line)
                if self._id_fits
                else derived_event_id(self.source, line)
            )
        obj[EVENT_ID] = event_id
        producer = fields[self._producer] if self._producer is not None else ""
        if producer or self._default_producer:
            obj[PRODUCER] = producer or self._default_producer
        return events.parse_event(obj)

    def _position_type(self, fields: Sequence[str]) -> str:
        status = fields[self._status].strip().upper() if self._status is not None else ""
        if not status:
            closed = self._close_time is not None and fields[self._close_time].strip() != ""
            return "position_close" if closed else "position_open"
        if status == "CLOSED":
            return "position_close"
        if status != "OPEN":
            raise InvalidEvent(f"must be OPEN or CLOSED, got {status[:20]!r}", field=STATUS)
        for i in self._exit:
            if fields[i].strip():
                raise InvalidEvent("is set on an OPEN row", field=self.header[i])
        return "position_open"


def row_of(table: CsvTable, ev: events.Event) -> list[str]:
    """The CSV row (in ``table.columns`` order) of a validated event, as CsvStorage writes it."""
    values = ev.values
    row: list[str] = []
    for name in table.columns:
        if name == EVENT_ID:
            row.append(ev.event_id)
        elif name == PRODUCER:
            row.append(ev.producer or "")
        elif name == STATUS:
            row.append("CLOSED" if ev.type == "position_close" else "OPEN")
        else:
            v = values.get(name)
            row.append("" if v is None else v)
    return row


# ---- reading -----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Record:
    """One CSV record: where it starts, its fields (None when malformed), its raw text."""

    line: int
    fields: list[str] | None
    raw: str
    end_offset: int
    end_line: int  # physical lines read up to end_offset
    error: str | None
    terminated: bool  # False: the file ends inside this record (no line end yet, or in quotes)


class _Lines:
    """An iterator of decoded lines for ``csv.reader`` that counts lines and bytes."""

    def __init__(self, f: IO[bytes], offset: int, line: int) -> None:
        self._readline = f.readline
        self.offset = offset
        self.line = line
        self.raw: list[str] = []
        self.bad_utf8 = False
        self.terminated = True
        self.eof = False
        self._first = offset == 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        b = self._readline()
        if not b:
            self.eof = True
            raise StopIteration
        self.offset += len(b)
        self.line += 1
        if self._first:
            self._first = False
            if b.startswith(UTF8_BOM):
                b = b[len(UTF8_BOM) :]
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            text = b.decode("utf-8", errors="surrogateescape")
            self.bad_utf8 = True
        self.terminated = b.endswith(b"\n")
        self.raw.append(text)
        return text


class RecordReader:
    """The records of a CSV file from byte ``offset`` (after ``line`` lines); blank lines skipped.

    ``f`` must be positioned at ``offset``. A record with broken quoting or invalid UTF-8 comes
    back with ``error`` set, and reading goes on with the next line. The file's last record comes
    back with ``terminated`` False when the file ends inside it (no line end yet, or inside a
    quoted field): a producer may still be writing it. After iterating, ``offset``, ``line`` and
    ``terminated`` describe the end of what was read (blank lines included).
    """

    def __init__(self, f: IO[bytes], *, offset: int = 0, line: int = 0) -> None:
        self._lines = _Lines(f, offset, line)

    @property
    def offset(self) -> int:
        """Bytes read so far (from the start of the file)."""
        return self._lines.offset

    @property
    def line(self) -> int:
        """Physical lines read so far."""
        return self._lines.line

    @property
    def terminated(self) -> bool:
        """True when the last line read ended with a line end."""
        return self._lines.terminated

    def __iter__(self) -> Iterator[Record]:
        lines = self._lines
        reader = csv.reader(lines, strict=True)
        while True:
            start = lines.line + 1
            lines.raw = []
            lines.bad_utf8 = False
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                text = "".join(lines.raw)
                reason = f"malformed CSV: {exc}"
                # A quoted field still open at the end of the file: the record has not ended yet.
                ended = lines.terminated and not lines.eof
                yield Record(start, None, text, lines.offset, lines.line, reason, ended)
                continue
            if not fields:
                continue
            raw = lines.raw[0] if len(lines.raw) == 1 else "".join(lines.raw)
            error = "not valid UTF-8" if lines.bad_utf8 else None
            yield Record(start, fields, raw, lines.offset, lines.line, error, lines.terminated)


def read_records(f: IO[bytes], *, offset: int = 0, line: int = 0) -> Iterator[Record]:
    """Iterate the records of ``f`` (see ``RecordReader``)."""
    return iter(RecordReader(f, offset=offset, line=line))
