"""Migrations and schema conformance against real PostgreSQL (and TimescaleDB where it runs)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingestd.daemon import migrations
from ingestd.errors import SchemaBehind, SchemaDrift
from ingestd.wire import events, tables
from tests.conftest import PgServer

pytestmark = pytest.mark.pg

UTC = dt.UTC


FreshDb = Callable[[PgServer], Awaitable[str]]


@pytest.fixture
async def fresh_db() -> AsyncIterator[FreshDb]:
    """Creates empty (unmigrated) databases on a server; drops them after the test."""
    made: list[tuple[PgServer, str]] = []

    async def make(server: PgServer) -> str:
        url = await server.create_empty("ingestd_it")
        made.append((server, url))
        return url

    yield make
    for server, url in made:
        await server.drop(url)


async def ledger(conn: asyncpg.Connection) -> list[tuple[int, str, str]]:
    """The migration ledger as (version, name, checksum) rows."""
    rows = await conn.fetch(
        f"SELECT version, name, checksum FROM {migrations.LEDGER_TABLE} ORDER BY version"
    )
    return [(r["version"], r["name"], r["checksum"].strip()) for r in rows]


# --- applying migrations ------------------------------------------------------------------------


async def test_fresh_database_migrates_and_second_run_applies_nothing(
    pg_server: PgServer, fresh_db: FreshDb
) -> None:
    dsn = await fresh_db(pg_server)
    known = migrations.load_migrations()
    assert [m.version for m in known] == list(range(1, len(known) + 1))
    conn = await asyncpg.connect(dsn)
    try:
        applied = await migrations.migrate(conn)
        assert applied == [f"{m.version:04d}_{m.name}" for m in known]
        assert await ledger(conn) == [(m.version, m.name, m.checksum) for m in known]
        await migrations.check_current(conn)  # does not raise

        assert await migrations.migrate(conn) == []
        assert await ledger(conn) == [(m.version, m.name, m.checksum) for m in known]
        names = ["positions", "position_closes_pending", "dead_letters"]
        names += [t.name for t in tables.APPEND_TABLES]
        for name in names:
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name), name
    finally:
        await conn.close()


async def _concurrent_migrate(dsn: str) -> None:
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrations.migrate(c) for c in conns))
        known = migrations.load_migrations()
        # Every migration was applied by exactly one of the three callers.
        applied = sorted(name for names in results for name in names)
        assert applied == sorted(f"{m.version:04d}_{m.name}" for m in known)
        rows = await ledger(conns[0])
        assert [v for v, _, _ in rows] == [m.version for m in known]
        for c in conns:
            await migrations.check_current(c)
    finally:
        for c in conns:
            await c.close()


async def test_three_concurrent_migrations_all_succeed(
    pg_server: PgServer, fresh_db: FreshDb
) -> None:
    await _concurrent_migrate(await fresh_db(pg_server))


@pytest.mark.timescale
async def test_three_concurrent_migrations_on_timescaledb(
    timescale_server: PgServer, fresh_db: FreshDb
) -> None:
    dsn = await fresh_db(timescale_server)
    await _concurrent_migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        assert await migrations.timescaledb_enabled(conn)
    finally:
        await conn.close()


async def test_check_current_on_unmigrated_database_names_the_command(
    pg_server: PgServer, fresh_db: FreshDb
) -> None:
    conn = await asyncpg.connect(await fresh_db(pg_server))
    try:
        with pytest.raises(SchemaBehind) as excinfo:
            await migrations.check_current(conn)
        assert "ingestd migrate" in str(excinfo.value)
        # Partly migrated is behind as well, and names what is pending.
        known = migrations.load_migrations()
        await migrations.migrate(conn, known[:1])
        with pytest.raises(SchemaBehind) as excinfo:
            await migrations.check_current(conn)
        assert "ingestd migrate" in str(excinfo.value)
        assert f"{known[1].version:04d}_{known[1].name}" in str(excinfo.value)
        assert f"{known[0].version:04d}_" not in str(excinfo.value)
    finally:
        await conn.close()


async def test_edited_migration_is_drift(pg_server: PgServer, fresh_db: FreshDb) -> None:
    conn = await asyncpg.connect(await fresh_db(pg_server))
    try:
        known = migrations.load_migrations()
        await migrations.migrate(conn)
        first = known[0]
        edited = [
            dataclasses.replace(first, sql=first.sql + "\n-- an edit after release\n"),
            *known[1:],
        ]
        with pytest.raises(SchemaDrift, match=f"{first.version:04d}"):
            await migrations.check_current(conn, edited)
        with pytest.raises(SchemaDrift):
            await migrations.migrate(conn, edited)
        # A database migrated by a newer build (a version this build does not know) is drift too.
        with pytest.raises(SchemaDrift, match="newer"):
            await migrations.check_current(conn, known[:1])
        assert await ledger(conn) == [(m.version, m.name, m.checksum) for m in known]
    finally:
        await conn.close()


async def test_drift_stops_migrate_before_applying_anything(
    pg_server: PgServer, fresh_db: FreshDb
) -> None:
    conn = await asyncpg.connect(await fresh_db(pg_server))
    try:
        known = migrations.load_migrations()
        await migrations.migrate(conn, known[:1])
        edited = [dataclasses.replace(known[0], sql=known[0].sql + "\n-- edited\n"), *known[1:]]
        with pytest.raises(SchemaDrift):
            await migrations.migrate(conn, edited)
        assert [v for v, _, _ in await ledger(conn)] == [known[0].version]
    finally:
        await conn.close()


async def record_checksum(conn: asyncpg.Connection, version: int, checksum: str) -> None:
    """Make the ledger say that ``version`` was applied from a file with ``checksum``."""
    await conn.execute(
        f"UPDATE {migrations.LEDGER_TABLE} SET checksum = $2 WHERE version = $1", version, checksum
    )


async def test_a_database_that_applied_an_amended_migrations_former_text_still_starts(
    pg_server: PgServer, fresh_db: FreshDb
) -> None:
    # Amended migrations differ from their former text in comments only, so a database that
    # applied the former text has the same schema and, in its ledger, the former checksum.
    conn = await asyncpg.connect(await fresh_db(pg_server))
    try:
        await migrations.migrate(conn)
        assert migrations.AMENDED_CHECKSUMS
        for version, former in migrations.AMENDED_CHECKSUMS.items():
            await record_checksum(conn, version, sorted(former)[0])
        await migrations.check_current(conn)  # what `ingestd run` checks at start: no raise
        assert await migrations.migrate(conn) == []
        recorded = {v: c for v, _, c in await ledger(conn)}
        for version, former in migrations.AMENDED_CHECKSUMS.items():
            assert recorded[version] in former  # the ledger keeps what was applied
    finally:
        await conn.close()


async def test_a_former_checksum_is_accepted_only_for_its_own_version(
    pg_server: PgServer, fresh_db: FreshDb
) -> None:
    conn = await asyncpg.connect(await fresh_db(pg_server))
    try:
        known = {m.version: m for m in await _migrated(conn)}
        amended = sorted(migrations.AMENDED_CHECKSUMS)
        first_former = sorted(migrations.AMENDED_CHECKSUMS[amended[0]])[0]
        other_amended = amended[1]
        not_amended = next(v for v in known if v not in migrations.AMENDED_CHECKSUMS)
        for version, checksum in (
            (other_amended, first_former),  # another amended version's former checksum
            (not_amended, first_former),  # a version that was never amended
            (amended[0], "0" * 64),  # an amended version with a checksum never released
        ):
            await record_checksum(conn, version, checksum)
            with pytest.raises(SchemaDrift, match=f"{version:04d}_{known[version].name}"):
                await migrations.check_current(conn)
            with pytest.raises(SchemaDrift):
                await migrations.migrate(conn)
            await record_checksum(conn, version, known[version].checksum)
        await migrations.check_current(conn)
    finally:
        await conn.close()


async def _migrated(conn: asyncpg.Connection) -> list[migrations.Migration]:
    """Migrates ``conn``'s database; returns the migrations."""
    await migrations.migrate(conn)
    return migrations.load_migrations()


def without_comments(sql: str) -> list[str]:
    """The SQL's statements as lines, with ``--`` comments, blank lines and indentation removed."""
    lines = (re.sub(r"--.*", "", line).strip() for line in sql.splitlines())
    return [line for line in lines if line]


def test_former_checksums_are_of_released_texts_that_differ_only_in_comments() -> None:
    root = Path(__file__).resolve().parents[2]
    history_ok = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--is-shallow-repository"],
        capture_output=True,
        text=True,
        check=False,
    )
    if history_ok.returncode != 0 or history_ok.stdout.strip() != "false":
        pytest.skip("needs the repository's full git history")
    by_version = {m.version: m for m in migrations.load_migrations()}
    for version, former in migrations.AMENDED_CHECKSUMS.items():
        mig = by_version[version]
        path = f"sql/migrations/{version:04d}_{mig.name}.sql"
        commits = subprocess.run(
            ["git", "-C", str(root), "log", "--format=%H", "--", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        released = {}
        for commit in commits:
            text = subprocess.run(
                ["git", "-C", str(root), "show", f"{commit}:{path}"],
                capture_output=True,
                check=True,
            ).stdout.decode("utf-8")
            released[hashlib.sha256(text.encode("utf-8")).hexdigest()] = text
        assert former <= released.keys(), f"{path}: a former checksum no commit ever had"
        for checksum in former:
            assert without_comments(released[checksum]) == without_comments(mig.sql), path


def _write(folder: Path, names: list[str]) -> Path:
    mig = folder / "migrations"
    mig.mkdir()
    for name in names:
        (mig / name).write_text("SELECT 1;\n", encoding="utf-8")
    return folder


def test_load_migrations_rejects_a_gap(tmp_path: Path) -> None:
    folder = _write(tmp_path, ["0001_first.sql", "0003_third.sql"])
    with pytest.raises(ValueError, match="0003"):
        migrations.load_migrations(folder)


def test_load_migrations_rejects_a_duplicate_and_a_bad_name(tmp_path: Path) -> None:
    dup = tmp_path / "dup"
    dup.mkdir()
    _write(dup, ["0001_first.sql", "0001_again.sql"])
    with pytest.raises(ValueError, match="numbered"):
        migrations.load_migrations(dup)
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad, ["0001_first.sql", "2_second.sql"])
    with pytest.raises(ValueError, match=re.escape("2_second.sql")):
        migrations.load_migrations(bad)


def test_load_migrations_in_order(tmp_path: Path) -> None:
    folder = _write(tmp_path, [f"{i:04d}_m{i}.sql" for i in (3, 1, 2, 10, 4, 5, 6, 7, 8, 9)])
    assert [m.version for m in migrations.load_migrations(folder)] == list(range(1, 11))


# --- schema conformance ----------------------------------------------------------------------


def _expected(kind: tables.ColumnType) -> tuple[str, int | None, int | None, int | None]:
    if isinstance(kind, tables.Numeric):
        return ("numeric", kind.precision, kind.scale, None)
    if isinstance(kind, tables.Varchar):
        return ("character varying", None, None, kind.length)
    if isinstance(kind, tables.Boolean):
        return ("boolean", None, None, None)
    return ("timestamp with time zone", None, None, None)


async def _columns(
    conn: asyncpg.Connection, table: str
) -> dict[str, tuple[tuple[str, int | None, int | None, int | None], bool]]:
    rows = await conn.fetch(
        """
        SELECT column_name, data_type, numeric_precision, numeric_scale,
               character_maximum_length, is_nullable
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = $1
        """,
        table,
    )
    out: dict[str, tuple[tuple[str, int | None, int | None, int | None], bool]] = {}
    for r in rows:
        numeric = r["data_type"] == "numeric"
        out[r["column_name"]] = (
            (
                r["data_type"],
                r["numeric_precision"] if numeric else None,
                r["numeric_scale"] if numeric else None,
                r["character_maximum_length"],
            ),
            r["is_nullable"] == "YES",
        )
    return out


async def _keys(conn: asyncpg.Connection, table: str) -> set[tuple[str, tuple[str, ...]]]:
    rows = await conn.fetch(
        """
        SELECT c.contype::text AS kind, array_agg(a.attname::text ORDER BY k.ord) AS cols
        FROM pg_constraint c
        CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
        WHERE c.conrelid = $1::regclass AND c.contype IN ('p', 'u')
        GROUP BY c.oid, c.contype
        """,
        table,
    )
    return {(r["kind"], tuple(r["cols"])) for r in rows}


@pytest.mark.parametrize("table", tables.APPEND_TABLES, ids=lambda t: t.name)
async def test_append_table_columns_match_tables_py(
    db: asyncpg.Connection, table: tables.Table
) -> None:
    cols = await _columns(db, table.name)
    assert cols, f"table {table.name} missing"
    for name, kind in table.columns:
        assert name in cols, f"{table.name}.{name} missing"
        assert cols[name][0] == _expected(kind), f"{table.name}.{name}"
    assert table.time_column in table.column_names
    for owned in ("id", "created_at"):
        assert owned in cols


async def test_positions_columns_match_tables_py(db: asyncpg.Connection) -> None:
    positions = await _columns(db, "positions")
    for name, kind in (*tables.POSITION_ENTRY_COLUMNS, *tables.POSITION_EXIT_COLUMNS):
        assert positions[name][0] == _expected(kind), f"positions.{name}"
    assert positions["position_key"][0] == _expected(tables.POSITION_KEY)
    assert positions["producer"][0] == _expected(tables.PRODUCER)
    for name, _ in tables.POSITION_ENTRY_COLUMNS:
        assert not positions[name][1], f"positions.{name} should be NOT NULL"
    for name, _ in tables.POSITION_EXIT_COLUMNS:
        assert positions[name][1], f"positions.{name} is NULL until the close"
    pending = await _columns(db, "position_closes_pending")
    for name, kind in tables.POSITION_EXIT_COLUMNS:
        assert pending[name][0] == _expected(kind), f"position_closes_pending.{name}"


@pytest.mark.parametrize("etype", ["spread", "fx_rate", "order", "trade"])
async def test_optional_event_fields_are_nullable_columns(
    db: asyncpg.Connection, etype: str
) -> None:
    """A valid event that omits an optional field must not be refused by a NOT NULL column."""
    spec = events.EVENT_TYPES[etype]
    assert spec.table is not None
    cols = await _columns(db, spec.table.name)
    for f in spec.fields:
        assert cols[f.name][0] == _expected(f.kind), f"{etype}.{f.name}"
        # spreads.is_opportunity is NOT NULL DEFAULT FALSE: parse_event fills in false.
        if not f.required and not (etype == "spread" and f.name == "is_opportunity"):
            assert cols[f.name][1], f"{spec.table.name}.{f.name} is optional on the wire"
    assert cols["producer"][1]


@pytest.mark.parametrize("table", tables.APPEND_TABLES, ids=lambda t: t.name)
async def test_hypertable_ready_keys(db: asyncpg.Connection, table: tables.Table) -> None:
    keys = await _keys(db, table.name)
    assert ("p", ("id", table.time_column)) in keys
    assert ("u", ("event_id", table.time_column)) in keys
    # TimescaleDB: every unique index of a hypertable must include its time column.
    for _, cols in keys:
        assert table.time_column in cols


async def test_positions_and_dead_letter_keys(db: asyncpg.Connection) -> None:
    # A position is named by its producer and key (migration 0008), NULL producer included.
    assert await _keys(db, "positions") == {("p", ("id",)), ("u", ("producer", "position_key"))}
    assert ("u", ("dedup_key",)) in await _keys(db, "dead_letters")
    assert await _keys(db, "position_closes_pending") == {("u", ("producer", "position_key"))}
    nulls_not_distinct = await db.fetch(
        "SELECT indrelid::regclass::text AS t FROM pg_index WHERE indnullsnotdistinct"
    )
    assert {"positions", "position_closes_pending"} <= {r["t"] for r in nulls_not_distinct}


# --- time_bucket ---------------------------------------------------------------------------

SAMPLES = [
    "2025-11-15T12:40:15.123+09:00",
    "2025-11-15T00:00:00Z",
    "2024-02-29T23:59:59.999999-05:00",
    "1999-12-31T23:30:00Z",
    "2000-01-02T12:00:00Z",
    "2030-06-30T18:45:01+05:30",
]
WIDTHS = {
    "1 hour": dt.timedelta(hours=1),
    "1 day": dt.timedelta(days=1),
    "15 minutes": dt.timedelta(minutes=15),
    "1 week": dt.timedelta(weeks=1),
}


def _ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _floor(moment: dt.datetime, width: str) -> dt.datetime:
    utc = moment.astimezone(UTC)
    if width == "1 hour":
        return utc.replace(minute=0, second=0, microsecond=0)
    if width == "1 day":
        return utc.replace(hour=0, minute=0, second=0, microsecond=0)
    if width == "15 minutes":
        return utc.replace(minute=utc.minute - utc.minute % 15, second=0, microsecond=0)
    day = utc.replace(hour=0, minute=0, second=0, microsecond=0)
    return day - dt.timedelta(days=day.weekday())  # weeks start on Monday, as TimescaleDB's


async def _buckets(conn: asyncpg.Connection) -> dict[tuple[str, str], dt.datetime]:
    out: dict[tuple[str, str], dt.datetime] = {}
    for width, interval in WIDTHS.items():
        for sample in SAMPLES:
            out[(width, sample)] = await conn.fetchval(
                "SELECT time_bucket($1::interval, $2::timestamptz)", interval, _ts(sample)
            )
    return out


async def _time_bucket_owner(conn: asyncpg.Connection) -> list[Any]:
    """The extensions owning ``time_bucket(interval, timestamptz)`` ([None] when none does)."""
    rows = await conn.fetch(
        """
        SELECT e.extname::text
        FROM (SELECT to_regprocedure('time_bucket(interval, timestamptz)')::oid AS oid) p
        LEFT JOIN pg_depend d
          ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
        LEFT JOIN pg_extension e ON e.oid = d.refobjid
        WHERE p.oid IS NOT NULL
        """
    )
    return [r["extname"] for r in rows]


async def test_time_bucket_on_plain_postgresql_is_utc(db: asyncpg.Connection) -> None:
    assert not await migrations.timescaledb_enabled(db)
    assert await _time_bucket_owner(db) == [None]  # ingestd's own fallback
    # The session time zone must not move hour/day buckets: they are UTC.
    await db.execute("SET TimeZone = 'Asia/Seoul'")
    hour = await db.fetchval(
        "SELECT time_bucket('1 hour', '2025-11-15T12:40:15.123+09:00'::timestamptz)"
    )
    assert hour == dt.datetime(2025, 11, 15, 3, 0, tzinfo=UTC)
    day = await db.fetchval("SELECT time_bucket('1 day', '2025-11-15T08:40:15+09:00'::timestamptz)")
    assert day == dt.datetime(2025, 11, 14, 0, 0, tzinfo=UTC)
    for (width, sample), got in (await _buckets(db)).items():
        assert got == _floor(_ts(sample), width), (width, sample)
    # The usual form: time_bucket('1 hour', timestamp) on a table column.
    await db.execute(
        "INSERT INTO spreads (event_id, symbol, upbit_price, binance_price, binance_price_krw,"
        " spread_pct, net_spread_pct, timestamp) VALUES"
        " ('a', 'BTC', 1, 1, 1, 1, 1, '2025-11-15T12:40:15+09:00'),"
        " ('b', 'BTC', 1, 1, 1, 3, 1, '2025-11-15T12:59:59+09:00')"
    )
    row = await db.fetchrow(
        "SELECT time_bucket('1 hour', timestamp) AS hour, symbol, avg(spread_pct) AS avg"
        " FROM spreads GROUP BY hour, symbol"
    )
    assert row is not None
    assert row["hour"] == dt.datetime(2025, 11, 15, 3, 0, tzinfo=UTC)


@pytest.mark.timescale
async def test_timescaledb_hypertables_and_time_bucket(
    timescale_server: PgServer, fresh_db: FreshDb, db: asyncpg.Connection
) -> None:
    # A fresh database migrated here rather than a clone of the template: TimescaleDB's
    # background-worker scheduler stays connected to the template, which makes
    # CREATE DATABASE ... TEMPLATE fail ("being accessed by other users").
    conn = await asyncpg.connect(await fresh_db(timescale_server))
    try:
        await migrations.migrate(conn)
        assert await migrations.timescaledb_enabled(conn)
        hyper = {
            r["hypertable_name"]: r["column_name"]
            for r in await conn.fetch(
                "SELECT h.hypertable_name::text, d.column_name::text"
                " FROM timescaledb_information.hypertables h"
                " JOIN timescaledb_information.dimensions d"
                "   USING (hypertable_schema, hypertable_name)"
                " WHERE h.hypertable_schema = 'public'"
            )
        }
        assert hyper == {t.name: t.time_column for t in tables.APPEND_TABLES}
        assert "positions" not in hyper
        assert await _time_bucket_owner(conn) == ["timescaledb"]
        on_timescale = await _buckets(conn)
        for (width, sample), value in on_timescale.items():
            assert value == _floor(_ts(sample), width), (width, sample)
        assert on_timescale == await _buckets(db)
        # The schema is the same on both servers.
        for name in (*(t.name for t in tables.APPEND_TABLES), "positions", "dead_letters"):
            assert await _columns(conn, name) == await _columns(db, name), name
            assert await _keys(conn, name) == await _keys(db, name), name
    finally:
        await conn.close()
