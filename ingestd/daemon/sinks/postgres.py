"""The database sink: one batch, one transaction.

Append-only tables are written with a CSV COPY of the validated decimal/time text (the cheapest
exact path, docs/performance.md), first optimistically: every statement straight in the transaction.
If the database refuses anything, the batch is written again carefully, in savepoints: a unique
violation means a redelivered event met its earlier copy, and the table's rows are then merged
through a staging table with ``ON CONFLICT DO NOTHING`` (a staged row whose stored copy has other
content is a conflict: a dead letter, the stored row stays); a row that PostgreSQL rejects for its
data is isolated by halving, so only it becomes a dead letter and the rest of the batch commits.
``positions`` is a plain mutable table, written once per open and once per close under a
transaction-scoped advisory lock: a position is named by ``(producer, position_key)``, and the
first open and the first close of a position that commit stand (later ones with other event ids
are conflicts), so that they end as one row whatever the order and batching of their arrival,
across writers and replicas.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, Final

import asyncpg

from ingestd import errors, failpoints
from ingestd.daemon import gaps
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.db import Connection
from ingestd.daemon.deadletters import DeadLetter, ascii_dead_letter, make_dead_letter
from ingestd.wire import tables
from ingestd.wire.events import EVENT_TYPES, Event

log = logging.getLogger("ingestd.daemon.sinks.postgres")

# Serialises the writers (of all replicas) that touch positions, orders-with-position or trades-
# with-position, so that linking and open/close merging never race. Those events are few.
POSITIONS_LOCK_ID: Final = 0x1D6E58A

_ENTRY = [name for name, _ in tables.POSITION_ENTRY_COLUMNS]
_EXIT = [name for name, _ in tables.POSITION_EXIT_COLUMNS]
_CAST = {
    **{
        name: "::text::numeric"
        for name, kind in tables.POSITION_ENTRY_COLUMNS
        if isinstance(kind, tables.Numeric)
    },
    **{
        name: "::text::numeric"
        for name, kind in tables.POSITION_EXIT_COLUMNS
        if isinstance(kind, tables.Numeric)
    },
    "timestamp_open": "::text::timestamptz",
    "timestamp_close": "::text::timestamptz",
}


# --- positions: set-based, one statement per step for all the batch's opens or closes ----------
#
# Write-once: the first open and the first close of a position that commit stand; a later one
# with another event id changes nothing and is a conflict (a dead letter naming the standing
# event). Every step runs under the positions lock, so "first committed" is the lock's order.


def _unnest(names: Sequence[str]) -> tuple[str, str]:
    """``unnest($1::text[], ...) AS u(a, ...)`` and its select list, cast to the columns' types."""
    arrays = ", ".join(f"${i}::text[]" for i in range(1, len(names) + 1))
    select = ", ".join(f"u.{n}{_CAST.get(n, '').replace('::text', '')}" for n in names)
    return f"unnest({arrays}) AS u({', '.join(names)})", select


# A position is named by its producer and the producer's key (producer NULL being one name of
# its own): two producers that use the same key have two positions. Each statement takes the key
# as two arrays, producers and keys, and matches with IS NOT DISTINCT FROM on the producer.
_KEYS_FROM: Final = "unnest($1::text[], $2::text[]) AS k(producer, position_key)"

_OPEN_COLS: Final = ["producer", "position_key", *_ENTRY, "mode", "open_event_id"]
_OPEN_FROM, _OPEN_SELECT = _unnest(_OPEN_COLS)
# An open takes a row no open has taken yet: a new one, or one a close that repeats the entry
# columns created before it (the open's entry columns then replace the close's, so that the row
# ends the same in either order; its mode, when it has one, too). A row an open already holds is
# left alone.
_SQL_OPEN_MANY: Final = f"""
INSERT INTO positions ({", ".join(_OPEN_COLS)})
SELECT {_OPEN_SELECT} FROM {_OPEN_FROM}
ON CONFLICT (producer, position_key) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _ENTRY)},
    mode = coalesce(EXCLUDED.mode, positions.mode),
    open_event_id = EXCLUDED.open_event_id,
    updated_at = CURRENT_TIMESTAMP
WHERE positions.open_event_id IS NULL
RETURNING producer, position_key, symbol
"""

# Apply the parked closes of positions that now exist, and remove them. A position has at most
# one standing close, in positions.close_event_id or here, never both.
_SQL_UNPARK: Final = f"""
WITH parked AS (
    DELETE FROM position_closes_pending AS c
    USING positions AS p, {_KEYS_FROM}
    WHERE c.position_key = p.position_key AND c.producer IS NOT DISTINCT FROM p.producer
      AND c.position_key = k.position_key AND c.producer IS NOT DISTINCT FROM k.producer
    RETURNING c.*
)
UPDATE positions AS p SET
    {", ".join(f"{c} = parked.{c}" for c in _EXIT)},
    mode = coalesce(p.mode, parked.mode),
    status = 'CLOSED',
    close_event_id = parked.event_id,
    updated_at = CURRENT_TIMESTAMP
FROM parked
WHERE p.position_key = parked.position_key AND p.producer IS NOT DISTINCT FROM parked.producer
RETURNING p.symbol
"""

_CLOSE_COLS: Final = ["producer", "position_key", *_EXIT, "mode", "close_event_id"]
_CLOSE_FROM, _ = _unnest(_CLOSE_COLS)
# A close takes a row no close has taken yet; a position that does not exist yet is looked up
# next (_SQL_STANDING).
_SQL_CLOSE_MANY: Final = f"""
UPDATE positions AS p SET
    {", ".join(f"{c} = u.{c}{_CAST.get(c, '').replace('::text', '')}" for c in _EXIT)},
    mode = coalesce(p.mode, u.mode),
    status = 'CLOSED',
    close_event_id = u.close_event_id,
    updated_at = CURRENT_TIMESTAMP
FROM {_CLOSE_FROM}
WHERE p.position_key = u.position_key AND p.producer IS NOT DISTINCT FROM u.producer
  AND p.close_event_id IS NULL
RETURNING p.producer, p.position_key, p.symbol
"""

# The standing open and close of positions an open or close did not take.
_SQL_STANDING: Final = f"""
SELECT k.producer, k.position_key, p.open_event_id, p.close_event_id,
       c.event_id AS parked_event_id
FROM {_KEYS_FROM}
LEFT JOIN positions AS p
    ON p.position_key = k.position_key AND p.producer IS NOT DISTINCT FROM k.producer
LEFT JOIN position_closes_pending AS c
    ON c.position_key = k.position_key AND c.producer IS NOT DISTINCT FROM k.producer
"""

_CLOSED_COLS: Final = [
    "position_key",
    "producer",
    *_ENTRY,
    *_EXIT,
    "mode",
    "open_event_id",
    "close_event_id",
]
_CLOSED_FROM, _CLOSED_SELECT = _unnest(_CLOSED_COLS)
_SQL_INSERT_CLOSED_MANY: Final = f"""
INSERT INTO positions ({", ".join(_CLOSED_COLS)}, status)
SELECT {_CLOSED_SELECT}, 'CLOSED' FROM {_CLOSED_FROM}
RETURNING symbol
"""

_PARK_COLS: Final = ["position_key", "event_id", "producer", *_EXIT, "mode"]
_PARK_FROM, _PARK_SELECT = _unnest(_PARK_COLS)
# No ON CONFLICT: only a close of a position with no standing close is parked (under the lock),
# so a conflict here would be a broken invariant, which must fail loudly rather than be skipped.
_SQL_PARK_MANY: Final = f"""
INSERT INTO position_closes_pending ({", ".join(_PARK_COLS)})
SELECT {_PARK_SELECT} FROM {_PARK_FROM}
"""

# A close whose open never came: past the configured age it leaves the parking table for
# dead_letters, as the close event it was (numbers as exact JSON numbers, times with offsets).
_SQL_EXPIRE_PARKED: Final = """
DELETE FROM position_closes_pending
WHERE received_at < CURRENT_TIMESTAMP - make_interval(secs => $1)
RETURNING position_key, event_id, producer, received_at,
    json_build_object(
        'type', 'position_close', 'event_id', event_id, 'producer', producer,
        'position_key', position_key, 'exit_upbit_price', exit_upbit_price,
        'exit_binance_price', exit_binance_price, 'exit_spread_pct', exit_spread_pct,
        'pnl_krw', pnl_krw, 'pnl_pct', pnl_pct, 'timestamp_close', timestamp_close,
        'mode', mode
    )::text AS payload
"""
_SQL_PARKED_SUMMARY: Final = """
SELECT count(*)::int AS waiting, min(received_at) AS oldest,
       extract(epoch FROM CURRENT_TIMESTAMP - min(received_at))::float8 AS oldest_age_s
FROM position_closes_pending
"""
PARKED_CLOSE_SOURCE: Final = "parked_closes"


def _has_entry(ev: Event) -> bool:
    """True when a close repeats every entry column (it can stand as the whole row)."""
    return all(ev.values.get(c) is not None for c in _ENTRY)


def _columns(rows: Sequence[Sequence[str | None]]) -> list[list[str | None]]:
    """Rows of values to one list per column (the unnest arrays)."""
    return [list(col) for col in zip(*rows, strict=True)]


# A position's identity: (producer, position_key).
PositionId = tuple[str | None, str]


def position_id(ev: Event) -> PositionId:
    """The position an event names: its producer's, by the producer's key."""
    return ev.producer, str(ev.values["position_key"])


def _key_arrays(ids: Collection[PositionId]) -> list[list[str | None]]:
    """The two arrays ($1 producers, $2 keys) of ``_KEYS_FROM`` for some positions."""
    ordered = sorted(ids, key=lambda i: (i[0] is not None, i[0] or "", i[1]))
    return [[p for p, _ in ordered], [k for _, k in ordered]]


def _returned_id(r: asyncpg.Record) -> PositionId:
    return r["producer"], r["position_key"]


def _first_per_key(events: Sequence[tuple[Item, Event]]) -> dict[PositionId, Event]:
    """The first event of each position in batch order: the one that stands if any of them."""
    first: dict[PositionId, Event] = {}
    for _, ev in events:
        first.setdefault(position_id(ev), ev)
    return first


def _settle_positions(
    events: Sequence[tuple[Item, Event]],
    first: dict[PositionId, Event],
    written: Collection[PositionId],
    standing: dict[PositionId, tuple[str, bool]],
    verb: str,
    outcome: BatchOutcome,
) -> list[tuple[Item, Event]]:
    """Each open (or close) of the batch against its position's standing one, after the step.

    The first event of a key in ``written`` was written by this step; another with the standing
    event id is a redelivery, returned so that its content is compared with what stands
    (``_check_redelivered``); one with another id is a conflict and becomes a dead letter.
    ``standing`` maps a key to (event id, whether that close is parked waiting for its open).
    """
    redelivered: list[tuple[Item, Event]] = []
    for item, ev in events:
        key = position_id(ev)
        event_id, parked = standing[key]
        if ev.event_id == event_id:
            if not (key in written and first[key] is ev):
                redelivered.append((item, ev))
            continue
        reason = f"conflict: position {key[1]} already {verb} by event {event_id}"
        outcome.reject(item, reason + (" (its open has not arrived)" if parked else ""))
    return redelivered


def _differs_sql(names: Sequence[str], stored: str) -> str:
    """The names of the columns where ``stored`` and the unnested ``u`` differ, as a text[]."""
    cases = ", ".join(
        f"CASE WHEN {stored}.{n} IS DISTINCT FROM u.{n}{_CAST.get(n, '').replace('::text', '')} "
        f"THEN '{n}' END"
        for n in names
    )
    return f"array_remove(ARRAY[{cases}]::text[], NULL)"


def _numbered(unnest_from: str) -> str:
    """``unnest(...) AS u(a, b)`` numbered: ``unnest(...) WITH ORDINALITY AS u(a, b, n)``, so
    that the answer comes back in the order of the rows sent."""
    head, _, names = unnest_from.rpartition(" AS u(")
    return f"{head} WITH ORDINALITY AS u({names[:-1]}, n)"


# A redelivered open (the standing open's event id) against the stored entry columns; a
# redelivered close against the stored exit columns, or against the parked close while its open
# has not arrived. Only redeliveries pay for this (the step before found them).
_SAME_OPEN_COLS: Final = ["position_key", "producer", *_ENTRY]
_SAME_OPEN_FROM = _numbered(_unnest(_SAME_OPEN_COLS)[0])
_SQL_REDELIVERED_OPENS: Final = f"""
SELECT u.position_key, {_differs_sql(_ENTRY, "p")} AS differs
FROM {_SAME_OPEN_FROM}
LEFT JOIN positions AS p
    ON p.position_key = u.position_key AND p.producer IS NOT DISTINCT FROM u.producer
ORDER BY u.n
"""
_SAME_CLOSE_COLS: Final = ["position_key", "producer", *_EXIT]
_SAME_CLOSE_FROM = _numbered(_unnest(_SAME_CLOSE_COLS)[0])
_SQL_REDELIVERED_CLOSES: Final = f"""
SELECT u.position_key,
       CASE WHEN c.position_key IS NOT NULL THEN {_differs_sql(_EXIT, "c")}
            ELSE {_differs_sql(_EXIT, "p")} END AS differs
FROM {_SAME_CLOSE_FROM}
LEFT JOIN position_closes_pending AS c
    ON c.position_key = u.position_key AND c.producer IS NOT DISTINCT FROM u.producer
LEFT JOIN positions AS p
    ON p.position_key = u.position_key AND p.producer IS NOT DISTINCT FROM u.producer
ORDER BY u.n
"""


async def _check_redelivered(
    conn: Connection, redelivered: Sequence[tuple[Item, Event]], verb: str, outcome: BatchOutcome
) -> None:
    """A redelivery with the same content is a duplicate (nothing changes); one whose content
    differs from the standing open or close is a conflict: the row stays, the newcomer becomes a
    dead letter naming the columns that differ (as for the append-only tables)."""
    if not redelivered:
        return
    opening = verb == "opened"
    names = ["position_key", "producer", *(_ENTRY if opening else _EXIT)]
    rows = [
        [ev.values.get(n) if n != "producer" else ev.producer for n in names]
        for _, ev in redelivered
    ]
    sql = _SQL_REDELIVERED_OPENS if opening else _SQL_REDELIVERED_CLOSES
    differs: list[list[str]] = [
        list(r["differs"] or ()) for r in await conn.fetch(sql, *_columns(rows))
    ]
    for (item, ev), columns in zip(redelivered, differs, strict=True):
        if not columns:
            outcome.duplicates += 1
            continue
        key = ev.values["position_key"]
        outcome.reject(
            item,
            f"conflict: position {key} already {verb} by event {ev.event_id} with other content "
            f"(differs in: {', '.join(columns)})",
            ",".join(columns),
        )


@dataclasses.dataclass(slots=True)
class _PositionsStep:
    """What a positions step did inside a savepoint; counted only once the savepoint holds."""

    outcome: BatchOutcome = dataclasses.field(default_factory=BatchOutcome)
    touched: set[str] = dataclasses.field(default_factory=set)
    keys: set[PositionId] = dataclasses.field(default_factory=set)

    def settle(self, outcome: BatchOutcome, touched: set[str], keys: set[PositionId]) -> None:
        """Add this step's results to the batch's."""
        outcome.duplicates += self.outcome.duplicates
        outcome.rejected.update(self.outcome.rejected)
        outcome.rejected_fields.update(self.outcome.rejected_fields)
        touched |= self.touched
        keys |= self.keys


_LINKED_TABLES: Final = frozenset({"orders", "trades"})
# Orders and trades that name a position get its id once it exists: both tables, one statement
# (a data-modifying WITH runs to completion whether or not the outer query reads it).
# An order or trade belongs to its own producer's position of that key.
_SQL_LINK_BOTH: Final = f"""
WITH k AS MATERIALIZED (
    SELECT p.id, p.producer, p.position_key
    FROM {_KEYS_FROM.replace(" AS k(", " AS u(")}
    JOIN positions AS p
        ON p.position_key = u.position_key AND p.producer IS NOT DISTINCT FROM u.producer
), link_orders AS (
    UPDATE orders AS t SET position_id = k.id
    FROM k
    WHERE t.position_id IS NULL AND t.position_key = k.position_key
      AND t.producer IS NOT DISTINCT FROM k.producer
)
UPDATE trades AS t SET position_id = k.id
FROM k
WHERE t.position_id IS NULL AND t.position_key = k.position_key
  AND t.producer IS NOT DISTINCT FROM k.producer
"""

# The version of open-count mirror writes: drawn under the positions lock, so that a later
# count always has a higher one (migration 0006 says why not the transaction id).
_SQL_COUNT_VERSION: Final = "SELECT nextval('ingestd_open_count_version')"

SQL_OPEN_COUNTS: Final = """
WITH v AS (SELECT nextval('ingestd_open_count_version') AS version)
SELECT s.symbol,
       (SELECT count(*) FROM positions WHERE symbol = s.symbol AND status = 'OPEN')::int AS n,
       v.version
FROM unnest($1::text[]) AS s(symbol), v
"""

SQL_ALL_OPEN_COUNTS: Final = """
SELECT symbol, (count(*) FILTER (WHERE status = 'OPEN'))::int AS n FROM positions GROUP BY symbol
"""

_SQL_DEAD_LETTER: Final = """
INSERT INTO dead_letters
    (dedup_key, source, event_type, event_id, producer, field, error,
     payload, payload_bytes, payload_sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (dedup_key) DO NOTHING
"""


def _required_fields(table: tables.Table) -> frozenset[str]:
    """The columns validation never leaves NULL (required fields of the table's event type)."""
    spec = next(spec for spec in EVENT_TYPES.values() if spec.table is table)
    return frozenset(
        {f.name for f in spec.fields if f.required or f.name == "is_opportunity"} | table.derived
    )


def _compile_encoder(table: tables.Table) -> Callable[[Sequence[Event]], bytes]:
    """``COPY ... (FORMAT csv)`` input for one table from validated event text, generated once.

    Text columns are always quoted (doubling inner quotes), so commas, quotes and line breaks
    in them are data; numbers, times and booleans are validated text without such characters
    and go as they are. An empty field is NULL, which is unambiguous because validation refuses
    empty strings. Generated as straight-line code, like the validators: the C ``csv`` writer
    took twice as long, checking every field for what needs quoting (the intake is
    CPU-bound in Python).
    """
    required = _required_fields(table)
    parts = ["'\"' + ev.event_id.replace('\"', '\"\"') + '\"'"]
    parts.append("('' if ev.producer is None else '\"' + ev.producer.replace('\"', '\"\"') + '\"')")
    for name, kind in table.columns:
        if name in ("event_id", "producer"):
            continue
        value = f"v[{name!r}]"
        text = (
            f"'\"' + {value}.replace('\"', '\"\"') + '\"'"
            if isinstance(kind, tables.Varchar)
            else value
        )
        parts.append(text if name in required else f"('' if {value} is None else {text})")
    source = (
        "def encode(events):\n"
        "    lines = []\n"
        "    append = lines.append\n"
        "    for ev in events:\n"
        "        v = ev.values\n"
        f"        append(','.join(({', '.join(parts)},)))\n"
        "    append('')\n"
        "    return '\\n'.join(lines).encode('utf-8')\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<ingestd COPY encoder {table.name}>", "exec"), namespace)  # noqa: S102
    encode: Callable[[Sequence[Event]], bytes] = namespace["encode"]
    return encode


_ENCODERS: Final = {t.name: _compile_encoder(t) for t in tables.APPEND_TABLES}


def _sql_type(kind: tables.ColumnType) -> str:
    if isinstance(kind, tables.Numeric):
        return f"NUMERIC({kind.precision}, {kind.scale})"
    if isinstance(kind, tables.Varchar):
        return f"VARCHAR({kind.length})"
    return "BOOLEAN" if isinstance(kind, tables.Boolean) else "TIMESTAMPTZ"


# The merge's staging tables: the table's columns with its types (so values are stored, rounded
# and compared exactly as in the table), and each row's position in the COPY.
_MERGE_STAGE: Final = {t.name: f"ingestd_merge_{t.name}" for t in tables.APPEND_TABLES}
_SQL_CREATE_STAGE: Final = {
    t.name: f"CREATE TEMP TABLE IF NOT EXISTS {_MERGE_STAGE[t.name]} ("
    "ingestd_ordinal BIGINT GENERATED ALWAYS AS IDENTITY, "
    + ", ".join(f"{name} {_sql_type(kind)}" for name, kind in t.columns)
    + ") ON COMMIT DELETE ROWS"
    for t in tables.APPEND_TABLES
}


def _conflicts_sql(table: tables.Table) -> str:
    """Staged rows whose stored row (same event id and time) has other content, and where."""
    content = [
        n
        for n in table.column_names
        if n not in ("event_id", table.time_column) and n not in table.derived
    ]
    differs = ", ".join(f"CASE WHEN s.{c} IS DISTINCT FROM t.{c} THEN '{c}' END" for c in content)
    return (
        f"SELECT s.ingestd_ordinal, t.{table.time_column} AS stored_time,"
        f" array_remove(ARRAY[{differs}], NULL) AS differs"
        f" FROM {_MERGE_STAGE[table.name]} AS s JOIN {table.name} AS t"
        f" ON t.event_id = s.event_id AND t.{table.time_column} = s.{table.time_column}"
        f" WHERE ({', '.join(f's.{c}' for c in content)})"
        f" IS DISTINCT FROM ({', '.join(f't.{c}' for c in content)})"
        " ORDER BY s.ingestd_ordinal"
    )


_SQL_CONFLICTS: Final = {t.name: _conflicts_sql(t) for t in tables.APPEND_TABLES}


def _utc(moment: dt.datetime) -> str:
    """An instant as RFC 3339 UTC with milliseconds, or microseconds when it has them."""
    utc = moment.astimezone(dt.UTC)
    spec = "microseconds" if utc.microsecond % 1000 else "milliseconds"
    return utc.isoformat(timespec=spec).replace("+00:00", "Z")


# COPY names the offending column only in the error context: 'COPY spreads, line 1, column x: ..'
_COPY_CONTEXT_COLUMN: Final = re.compile(
    r"\bCOPY [^,]+, line [0-9]+, column ([A-Za-z_][A-Za-z0-9_]*)"
)


def rejected_column(exc: BaseException) -> str | None:
    """The column PostgreSQL blames for a data error, from the error or its COPY context."""
    column = getattr(exc, "column_name", None)
    if isinstance(column, str) and column:
        return column
    context = getattr(exc, "context", None)
    if isinstance(context, str):
        m = _COPY_CONTEXT_COLUMN.search(context)
        if m is not None:
            return m.group(1)
    return None


def describe_pg_error(exc: BaseException) -> str:
    """A dead letter's reason: SQLSTATE, message, and the column when PostgreSQL names one."""
    parts = [f"database rejected the row: {getattr(exc, 'message', None) or exc}"]
    code = errors.sqlstate(exc)
    if code:
        parts.append(f"(SQLSTATE {code})")
    column = rejected_column(exc)
    if column:
        parts.append(f"column: {column}")
    detail = getattr(exc, "detail", None)
    if detail:
        parts.append(f"detail: {detail}")
    return " ".join(parts)


@dataclasses.dataclass(slots=True)
class _Batch:
    """A batch sorted for writing: rows per table (each event once), positions, dead letters."""

    items: Sequence[Item]
    by_table: dict[str, list[tuple[Item, Event]]]
    opens: list[tuple[Item, Event]]
    closes: list[tuple[Item, Event]]
    dead: list[DeadLetter]
    linked_keys: set[PositionId]
    needs_lock: bool

    @classmethod
    def of(cls, items: Sequence[Item]) -> _Batch:
        """Sort the items.

        The same event twice in one batch is not dropped here: its second copy meets the first
        in the unique index and goes through the merge, which tells a redelivery (a duplicate)
        from a conflict (same event id and time, other content) by comparing them as stored.
        """
        by_table: dict[str, list[tuple[Item, Event]]] = {}
        opens: list[tuple[Item, Event]] = []
        closes: list[tuple[Item, Event]] = []
        dead: list[DeadLetter] = []
        linked: set[PositionId] = set()
        for item in items:
            ev = item.event
            if ev is None:
                assert item.dead_letter is not None
                dead.append(item.dead_letter)
                continue
            table = ev.table
            if table is not None:
                name = table.name
                rows = by_table.get(name)
                if rows is None:
                    rows = by_table[name] = []
                rows.append((item, ev))
                if name in _LINKED_TABLES:
                    position_key = ev.values.get("position_key")
                    if position_key is not None:
                        linked.add((ev.producer, position_key))
            elif ev.type == "position_open":
                opens.append((item, ev))
            elif ev.type == "position_close":
                closes.append((item, ev))
        needs_lock = bool(opens or closes or linked)
        return cls(items, by_table, opens, closes, dead, linked, needs_lock)


class PostgresSink:
    """Writes batches into PostgreSQL/TimescaleDB through an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    @errors.at_database_edge
    async def write(self, items: Sequence[Item]) -> BatchOutcome:
        """Commit every item of the batch in one transaction, or raise and commit nothing.

        First optimistically: every COPY and statement straight in the transaction, about ten
        round trips for a batch. Should the database refuse anything (a redelivered event's
        unique key, a row it rejects), that transaction is rolled back whole and the batch is
        written again carefully: each table in a savepoint, the staging merge for duplicates,
        halving to isolate bad rows, positions row by row.
        """
        batch = _Batch.of(items)
        try:
            return await self._attempt(batch, careful=False)
        except asyncpg.PostgresError as exc:
            if not (errors.is_unique_violation(exc) or errors.is_data_error(exc)):
                raise
        return await self._attempt(batch, careful=True)

    @errors.at_database_edge
    async def probe(self) -> None:
        """Raise unless a write could commit now: the evidence that tells "the database is
        unavailable" (everything waits) from "this batch is unwritable" (it is split)."""
        conn: Connection
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
            await probe_write(conn)

    @errors.at_database_edge
    async def write_dead_letter(self, letter: DeadLetter) -> None:
        """Commit one dead letter on its own (an entry given up after its attempts), or raise."""
        conn: Connection
        async with (
            self._pool.acquire(timeout=self._acquire_timeout_s) as conn,
            conn.transaction(),
        ):
            await insert_dead_letters(conn, [letter])

    @staticmethod
    def describe(exc: BaseException) -> tuple[str, str | None]:
        """A refusal as a dead letter's reason and the column PostgreSQL blames (if any)."""
        exc = errors.driver_error(exc)  # the write raised it translated (DatabaseError)
        if errors.sqlstate(exc) is None:  # not the server's: a bug, a client-side error
            return f"{type(exc).__name__}: {exc}", None
        return describe_pg_error(exc), rejected_column(exc)

    async def _attempt(self, batch: _Batch, *, careful: bool) -> BatchOutcome:
        outcome = BatchOutcome()
        dead = list(batch.dead)
        conn: Connection
        async with (
            self._pool.acquire(timeout=self._acquire_timeout_s) as conn,
            conn.transaction(),
        ):
            failpoints.hit("before_copy")
            for name, rows in batch.by_table.items():
                table = tables.APPEND_TABLES_BY_NAME[name]
                if careful:
                    await self._insert(conn, table, rows, outcome, merge=False)
                else:
                    await self._copy(conn, table.name, table, [ev for _, ev in rows])
                    outcome.inserted[name] = len(rows)
            # The lock is taken only now, after the COPYs, so that two writers' COPYs overlap
            # and only positions and linking take turns. Linking stays right in either order:
            # under the lock each statement sees every position and order committed before it,
            # and whichever of an order and its position commits second links the pair.
            if batch.needs_lock:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", POSITIONS_LOCK_ID)
            touched: set[str] = set()
            keys: set[PositionId] = set()
            if batch.opens or batch.closes:
                if careful:
                    await self._positions(conn, batch.opens, batch.closes, outcome, touched, keys)
                else:
                    await self._positions_bulk(
                        conn, batch.opens, batch.closes, touched, keys, outcome
                    )
            keys |= batch.linked_keys
            if keys:
                await conn.execute(_SQL_LINK_BOTH, *_key_arrays(keys))
            for item in batch.items:
                reason = outcome.rejected.get(id(item))
                if reason is not None and item.event is not None:
                    field = outcome.rejected_fields.get(id(item))
                    dead.append(item.refused(item.event, reason, field))
            if dead:
                await insert_dead_letters(conn, dead)
                outcome.dead_letters = len(dead)
            if touched:
                rows_ = await conn.fetch(SQL_OPEN_COUNTS, sorted(touched))
                outcome.open_counts = {r["symbol"]: r["n"] for r in rows_}
                outcome.open_counts_version = rows_[0]["version"] if rows_ else None
            await queue_aggregate_backfill(conn, batch.by_table.get("spreads"), outcome)
            # The seqs of the events whose rows are stored (or were already): a dead letter's
            # data did not land, so its number stays missing (ingestd.daemon.gaps).
            await gaps.record_ranges(
                conn, (item.event for item in batch.items if id(item) not in outcome.rejected)
            )
            failpoints.hit("before_commit")
        failpoints.hit("after_commit")
        return outcome

    async def _insert(
        self,
        conn: Connection,
        table: tables.Table,
        rows: Sequence[tuple[Item, Event]],
        outcome: BatchOutcome,
        *,
        merge: bool,
    ) -> None:
        conflicts: list[tuple[Item, str, str]] = []
        try:
            async with conn.transaction():  # a savepoint: a failure leaves the batch usable
                if merge:
                    inserted, conflicts = await self._merge(conn, table, rows)
                else:
                    await self._copy(conn, table.name, table, [ev for _, ev in rows])
                    inserted = len(rows)
        except asyncpg.UniqueViolationError:
            if merge:
                raise
            await self._insert(conn, table, rows, outcome, merge=True)
            return
        except asyncpg.PostgresError as exc:
            if not errors.is_data_error(exc):
                raise
            if len(rows) == 1:
                outcome.reject(rows[0][0], describe_pg_error(exc), rejected_column(exc))
                return
            mid = len(rows) // 2
            await self._insert(conn, table, rows[:mid], outcome, merge=merge)
            await self._insert(conn, table, rows[mid:], outcome, merge=merge)
            return
        outcome.inserted[table.name] = outcome.inserted.get(table.name, 0) + inserted
        outcome.duplicates += len(rows) - inserted - len(conflicts)
        for conflicting, reason, columns in conflicts:
            outcome.reject(conflicting, reason, columns)

    async def _copy(
        self, conn: Connection, target: str, table: tables.Table, events: Sequence[Event]
    ) -> None:
        data = _ENCODERS[table.name](events)
        # An async iterable, not a BytesIO: for a file-like source asyncpg builds a reader class
        # per call, and the class's reference cycle keeps each batch's bytes alive until the
        # cyclic GC runs (+20 MiB per million rows measured in verify-csv).
        await conn.copy_to_table(
            target, source=_once(data), columns=list(table.column_names), format="csv"
        )

    async def _merge(
        self, conn: Connection, table: tables.Table, rows: Sequence[tuple[Item, Event]]
    ) -> tuple[int, list[tuple[Item, str, str]]]:
        """Insert the rows not stored yet; (rows inserted, conflicts: item, reason, columns).

        Every row whose (event id, time) is stored already, by an earlier batch or earlier in
        this one, is compared with the stored row as stored (decimals at the column's scale,
        times as instants): the same content is a redelivery, other content a conflict.
        """
        stage = _MERGE_STAGE[table.name]
        await conn.execute(_SQL_CREATE_STAGE[table.name])
        # RESTART IDENTITY: the stage's ordinals are then the rows' positions in this COPY.
        await conn.execute(f"TRUNCATE {stage} RESTART IDENTITY")
        await self._copy(conn, stage, table, [ev for _, ev in rows])
        cols = ", ".join(table.column_names)
        status = await conn.execute(
            f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {stage} "
            f"ORDER BY ingestd_ordinal ON CONFLICT (event_id, {table.time_column}) DO NOTHING"
        )
        conflicts = []
        for r in await conn.fetch(_SQL_CONFLICTS[table.name]):
            item, ev = rows[r["ingestd_ordinal"] - 1]
            differs = ", ".join(r["differs"])
            reason = (
                f"conflict: {table.name} already holds event {ev.event_id} at "
                f"{_utc(r['stored_time'])} with other content (differs in: {differs})"
            )
            conflicts.append((item, reason, differs))
        return int(status.rsplit(" ", 1)[1]), conflicts

    async def _positions(
        self,
        conn: Connection,
        opens: Sequence[tuple[Item, Event]],
        closes: Sequence[tuple[Item, Event]],
        outcome: BatchOutcome,
        touched: set[str],
        keys: set[PositionId],
    ) -> None:
        """All the batch's opens and closes in a few set-based statements; one by one (each in
        a savepoint, so that a bad one alone is rejected) only when the database refuses data.
        """
        bulk = _PositionsStep()
        try:
            async with conn.transaction():
                await self._positions_bulk(
                    conn, opens, closes, bulk.touched, bulk.keys, bulk.outcome
                )
        except asyncpg.PostgresError as exc:
            if not errors.is_data_error(exc):
                raise
            await self._positions_by_row(conn, opens, closes, outcome, touched, keys)
            return
        bulk.settle(outcome, touched, keys)

    async def _positions_bulk(
        self,
        conn: Connection,
        opens: Sequence[tuple[Item, Event]],
        closes: Sequence[tuple[Item, Event]],
        touched: set[str],
        keys: set[PositionId],
        outcome: BatchOutcome,
    ) -> None:
        """Opens, then closes, write-once: in batch order the first of a position stands.

        Costs two statements for the opens (take the rows, apply parked closes) and one for
        the closes while every event finds its row free, as before write-once; the standing
        events are looked up (one more statement) only when some do not.
        """
        if opens:
            first_open = _first_per_key(opens)
            rows = [
                [p, k, *(ev.values[c] for c in _ENTRY), ev.values["mode"], ev.event_id]
                for (p, k), ev in first_open.items()
            ]
            taken = {
                _returned_id(r): r["symbol"]
                for r in await conn.fetch(_SQL_OPEN_MANY, *_columns(rows))
            }
            touched.update(taken.values())
            keys.update(first_open)
            standing = {k: (first_open[k].event_id, False) for k in taken}
            others = [k for k in first_open if k not in taken]
            if others:
                for r in await conn.fetch(_SQL_STANDING, *_key_arrays(others)):
                    standing[_returned_id(r)] = (r["open_event_id"], False)
            if taken:
                for r in await conn.fetch(_SQL_UNPARK, *_key_arrays(taken)):
                    touched.add(r["symbol"])
            again = _settle_positions(opens, first_open, taken.keys(), standing, "opened", outcome)
            await _check_redelivered(conn, again, "opened", outcome)
        if not closes:
            return
        first_close = _first_per_key(closes)
        keys.update(first_close)
        rows = [
            [p, k, *(ev.values[c] for c in _EXIT), ev.values["mode"], ev.event_id]
            for (p, k), ev in first_close.items()
        ]
        taken = {
            _returned_id(r): r["symbol"] for r in await conn.fetch(_SQL_CLOSE_MANY, *_columns(rows))
        }
        touched.update(taken.values())
        standing = {k: (first_close[k].event_id, False) for k in taken}
        written = set(taken)
        others = [k for k in first_close if k not in taken]
        whole: list[tuple[PositionId, Event]] = []
        wait: list[tuple[PositionId, Event]] = []
        for r in await conn.fetch(_SQL_STANDING, *_key_arrays(others)) if others else []:
            k = _returned_id(r)
            if r["close_event_id"] is not None:
                standing[k] = (r["close_event_id"], False)
            elif r["parked_event_id"] is not None:
                standing[k] = (r["parked_event_id"], True)
            else:  # the position does not exist yet: this close is its first
                ev = first_close[k]
                (whole if _has_entry(ev) else wait).append((k, ev))
        # Before its open: a close that repeats the entry columns is the whole row already...
        if whole:
            rows = [
                [
                    k,
                    p,
                    *(ev.values[c] for c in _ENTRY),
                    *(ev.values[c] for c in _EXIT),
                    ev.values["mode"],
                    None,
                    ev.event_id,
                ]
                for (p, k), ev in whole
            ]
            inserted = await conn.fetch(_SQL_INSERT_CLOSED_MANY, *_columns(rows))
            touched.update(r["symbol"] for r in inserted)
            standing.update((k, (ev.event_id, False)) for k, ev in whole)
            written.update(k for k, _ in whole)
        # ...the others wait for it.
        if wait:
            rows = [
                [k, ev.event_id, p, *(ev.values[c] for c in _EXIT), ev.values["mode"]]
                for (p, k), ev in wait
            ]
            await conn.execute(_SQL_PARK_MANY, *_columns(rows))
            standing.update((k, (ev.event_id, True)) for k, ev in wait)
            written.update(k for k, _ in wait)
        again = _settle_positions(closes, first_close, written, standing, "closed", outcome)
        await _check_redelivered(conn, again, "closed", outcome)

    async def _positions_by_row(
        self,
        conn: Connection,
        opens: Sequence[tuple[Item, Event]],
        closes: Sequence[tuple[Item, Event]],
        outcome: BatchOutcome,
        touched: set[str],
        keys: set[PositionId],
    ) -> None:
        """The same, one event at a time in batch order, each in a savepoint of its own."""
        for item, ev in [*opens, *closes]:
            one = [(item, ev)]
            step = _PositionsStep()
            try:
                async with conn.transaction():
                    await self._positions_bulk(
                        conn,
                        one if ev.type == "position_open" else (),
                        one if ev.type == "position_close" else (),
                        step.touched,
                        step.keys,
                        step.outcome,
                    )
            except asyncpg.PostgresError as exc:
                if not errors.is_data_error(exc):
                    raise
                outcome.reject(item, describe_pg_error(exc), rejected_column(exc))
                continue
            step.settle(outcome, touched, keys)


# A batch with spreads older than this queues their hours for hourly_spread_avg (migration 0009;
# the drain refreshes only those before the refresh policy's window). Live batches skip the call.
BACKFILL_CANDIDATE_AGE: Final = dt.timedelta(hours=1)


async def queue_aggregate_backfill(
    conn: Connection, rows: Sequence[tuple[Item, Event]] | None, outcome: BatchOutcome
) -> None:
    """In the batch's transaction: queue the hours of old spreads for hourly_spread_avg's refresh.

    In the same transaction as the rows, so that a crash cannot commit the spreads and lose the
    range; the maintenance task refreshes the queued ranges (ingestd.daemon.maintenance).
    """
    if not rows:
        return
    oldest = min(ev.time for _, ev in rows)
    if oldest >= dt.datetime.now(dt.UTC) - BACKFILL_CANDIDATE_AGE:
        return
    newest = max(ev.time for _, ev in rows)
    if await conn.fetchval("SELECT ingestd_queue_backfill($1, $2)", oldest, newest):
        outcome.backfill_queued = (oldest, newest)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def insert_dead_letters(conn: Connection, letters: Sequence[DeadLetter]) -> None:
    """Insert dead letters so that none can spoil the transaction around it.

    They are storable and bounded by construction (ingestd.daemon.deadletters); still, each write
    is in
    a savepoint: all at once first, and should the database refuse that, one by one, a refused
    one again in printable ASCII (a database whose encoding is not UTF-8 cannot store every
    character). One refused even so (a trigger, a permission) raises: the pipeline then isolates
    its entry and, if its dead letter stays unwritable, quarantines it.
    """
    try:
        async with conn.transaction():
            await conn.executemany(_SQL_DEAD_LETTER, [_dl_args(d) for d in letters])
    except asyncpg.PostgresError as exc:
        if errors.is_retriable(exc):
            raise
    else:
        return
    for letter in letters:
        try:
            async with conn.transaction():
                await conn.execute(_SQL_DEAD_LETTER, *_dl_args(letter))
        except asyncpg.PostgresError as exc:
            if errors.is_retriable(exc):
                raise
            log.error(
                "dead letter refused (%s), writing it in ASCII: %s",
                errors.sqlstate(exc),
                exc,
                extra={"action": "dead_letter_refused"},
            )
        else:
            continue
        async with conn.transaction():
            await conn.execute(_SQL_DEAD_LETTER, *_dl_args(ascii_dead_letter(letter)))


# A write that changes nothing into every table a batch may write: it fails as a real batch
# would when the database is read-only (default_transaction_read_only, a standby), a table is
# locked, gone or no longer granted; it needs no row and leaves none.
SQL_PROBE_WRITE: Final = "\n".join(
    f"INSERT INTO {name} ({column}) SELECT NULL WHERE false;"
    for name, column in (
        *((t.name, t.column_names[0]) for t in tables.APPEND_TABLES),
        ("positions", "position_key"),
        ("position_closes_pending", "position_key"),
        ("dead_letters", "source"),
    )
)


async def probe_write(conn: Connection) -> None:
    """Raise unless a write transaction can commit now (see SQL_PROBE_WRITE)."""
    async with conn.transaction():
        await conn.execute(SQL_PROBE_WRITE)


def _dl_args(d: DeadLetter) -> tuple[Any, ...]:
    return (
        d.dedup_key,
        d.source,
        d.event_type,
        d.event_id,
        d.producer,
        d.field,
        d.error,
        d.payload,
        d.payload_bytes,
        d.payload_sha256,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class ParkedCloses:
    """Closes waiting for their open, after a sweep."""

    waiting: int
    oldest_received_at: dt.datetime | None
    oldest_age_s: float | None
    dead_lettered: int  # by this sweep: past the age, "close without open"


async def sweep_parked_closes(conn: Connection, *, max_age_s: float) -> ParkedCloses:
    """Move the closes parked longer than ``max_age_s`` to ``dead_letters``; count the rest.

    Under the positions lock, so that an open being written meanwhile either finds its close
    still parked (and applies it) or finds it gone (and the position stays open); and so that
    replicas sweeping at once dead-letter each close once. A close parked, expired, and then
    redelivered and expired again is the same dead letter (its key names position and event).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", POSITIONS_LOCK_ID)
        expired = await conn.fetch(_SQL_EXPIRE_PARKED, float(max_age_s))
        if expired:
            dead = [
                make_dead_letter(
                    r["payload"],
                    f"close without open: position {r['position_key']} was closed by event "
                    f"{r['event_id']}, and its open did not arrive within {max_age_s:g} s "
                    f"(parked since {_utc(r['received_at'])})",
                    source=PARKED_CLOSE_SOURCE,
                    dedup_key=f"{PARKED_CLOSE_SOURCE}:{r['position_key']}:{r['event_id']}",
                    event_type="position_close",
                    event_id=r["event_id"],
                    producer=r["producer"],
                )
                for r in expired
            ]
            await conn.executemany(_SQL_DEAD_LETTER, [_dl_args(d) for d in dead])
        summary = await conn.fetchrow(_SQL_PARKED_SUMMARY)
    assert summary is not None
    return ParkedCloses(
        summary["waiting"], summary["oldest"], summary["oldest_age_s"], len(expired)
    )


async def fetch_all_open_counts(conn: Connection) -> tuple[dict[str, int], int]:
    """Open positions per symbol (0 for symbols with none open) and a version for the mirror."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", POSITIONS_LOCK_ID)
        rows = await conn.fetch(SQL_ALL_OPEN_COUNTS)
        version = await conn.fetchval(_SQL_COUNT_VERSION)
    return {r["symbol"]: r["n"] for r in rows}, int(version)
