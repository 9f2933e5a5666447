"""sql/schema.sql and sql/migrations/ describe the same database (procrastinate keeps this test).

One database is built by applying every migration in order, one from ``sql/schema.sql``; their
catalogs (relations, columns, indexes, constraints, views, functions, triggers, the database's
settings, and on TimescaleDB the hypertables, compression settings, policies and continuous
aggregates) must be equal. Also: migration 0003 applies again, unchanged, where it already ran.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from ingestd.daemon import migrations
from tests.conftest import PgServer

pytestmark = pytest.mark.pg


EmptyDb = Callable[[], Awaitable[str]]


@pytest.fixture
async def empty_db(server: tuple[str, PgServer]) -> AsyncIterator[EmptyDb]:
    """Creates empty databases on this parameter's server; drops them afterwards."""
    _, srv = server
    made: list[str] = []

    async def make() -> str:
        made.append(await srv.create_empty("ingestd_sf"))
        return made[-1]

    yield make
    for url in made:
        await srv.drop(url)


# TimescaleDB numbers its internal objects (hypertable ids, chunk and job ids) by creation order.
_INTERNAL_IDS = re.compile(r"(_materialized_hypertable_|_hyper_|_compressed_hypertable_)[0-9]+")
_ID_KEYS = {"hypertable_id", "mat_hypertable_id"}


def _norm(text: Any) -> Any:
    return _INTERNAL_IDS.sub(r"\1N", text) if isinstance(text, str) else text


_CATALOG_QUERIES: dict[str, str] = {
    "relations": """
        SELECT c.relname::text, c.relkind::text, c.relpersistence::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'S', 'p')
          AND c.relname <> 'ingestd_migrations' AND c.relname NOT LIKE 'ingestd\\_migrations%'
    """,
    "columns": """
        SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attnum
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind IN ('r', 'v', 'm', 'p') AND c.relname <> 'ingestd_migrations'
    """,
    "indexes": """
        SELECT i.indexname::text, i.tablename::text, i.indexdef
        FROM pg_indexes i
        WHERE i.schemaname = 'public' AND i.tablename <> 'ingestd_migrations'
    """,
    "constraints": """
        SELECT c.conname::text, r.relname::text, pg_get_constraintdef(c.oid)
        FROM pg_constraint c
        JOIN pg_class r ON r.oid = c.conrelid
        JOIN pg_namespace n ON n.oid = r.relnamespace
        WHERE n.nspname = 'public' AND r.relname <> 'ingestd_migrations'
    """,
    "views": """
        SELECT c.relname::text, pg_get_viewdef(c.oid, true)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm')
    """,
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), p.prosecdef,
               p.proconfig::text, p.proacl::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                            AND d.deptype = 'e')
    """,
    "triggers": """
        SELECT t.tgname::text, c.relname::text, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND NOT t.tgisinternal
    """,
    "extensions": "SELECT extname::text FROM pg_extension",
    "database_settings": """
        SELECT s.setconfig::text FROM pg_db_role_setting s
        JOIN pg_database d ON d.oid = s.setdatabase
        WHERE d.datname = current_database() AND s.setrole = 0
    """,
}

_TIMESCALE_QUERIES: dict[str, str] = {
    "hypertables": """
        SELECT h.hypertable_name::text, d.column_name::text, d.time_interval::text,
               h.compression_enabled
        FROM timescaledb_information.hypertables h
        JOIN timescaledb_information.dimensions d USING (hypertable_schema, hypertable_name)
        WHERE h.hypertable_schema = 'public'
    """,
    "compression_settings": """
        SELECT hypertable_name::text, attname::text, segmentby_column_index,
               orderby_column_index, orderby_asc, orderby_nullsfirst
        FROM timescaledb_information.compression_settings
        WHERE hypertable_schema = 'public'
    """,
    "continuous_aggregates": """
        SELECT view_name::text, materialized_only, compression_enabled, view_definition
        FROM timescaledb_information.continuous_aggregates
    """,
    "jobs": """
        SELECT j.proc_name::text, coalesce(ca.view_name::text, j.hypertable_name::text),
               j.schedule_interval::text, j.config::text, j.scheduled
        FROM timescaledb_information.jobs j
        LEFT JOIN timescaledb_information.continuous_aggregates ca
          ON ca.materialization_hypertable_name = j.hypertable_name
        WHERE j.hypertable_name IS NOT NULL OR j.proc_name LIKE 'ingestd\\_%'
    """,
}


def _row(values: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    out = []
    for value in values:
        if name == "jobs" and isinstance(value, str) and value.startswith("{"):
            cfg = {k: x for k, x in json.loads(value).items() if k not in _ID_KEYS}
            out.append(json.dumps(cfg, sort_keys=True))
        else:
            out.append(_norm(value))
    return tuple(out)


async def catalog(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """A normalised description of everything the schema defines."""
    conn = await asyncpg.connect(dsn)
    try:
        queries = dict(_CATALOG_QUERIES)
        if await migrations.timescaledb_enabled(conn):
            queries.update(_TIMESCALE_QUERIES)
        out: dict[str, list[tuple[Any, ...]]] = {}
        for name, sql in queries.items():
            rows = [_row(tuple(r.values()), name) for r in await conn.fetch(sql)]
            out[name] = sorted(rows, key=repr)
        return out
    finally:
        await conn.close()


async def test_migrations_and_schema_file_build_the_same_database(
    server: tuple[str, PgServer], empty_db: EmptyDb
) -> None:
    kind, _ = server
    migrated, from_file = await empty_db(), await empty_db()
    conn = await asyncpg.connect(migrated)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()
    conn = await asyncpg.connect(from_file)
    try:
        async with conn.transaction():
            await conn.execute((migrations.sql_dir() / "schema.sql").read_text(encoding="utf-8"))
    finally:
        await conn.close()
    a, b = await catalog(migrated), await catalog(from_file)
    assert a.keys() == b.keys()
    for section in a:
        assert a[section] == b[section], section
    # Not vacuous: the things this layer adds are in both.
    relations = {r[0]: r[1] for r in a["relations"]}
    assert relations["daily_pnl_summary"] == "m"
    assert relations["hourly_spread_avg"] == ("v" if kind == "timescale" else "m")
    assert any("timezone=utc" in str(r[0]).lower() for r in a["database_settings"])
    # 0003: refresh all, delete expired, set retention; 0005: refresh one; 0009: queue backfill
    assert {str(f[0]).split("(")[0] for f in a["functions"]} >= {
        "ingestd_refresh_aggregates",
        "ingestd_delete_expired",
        "ingestd_set_retention",
        "ingestd_refresh_aggregate",
        "ingestd_queue_backfill",
    }
    if kind == "timescale":
        assert len(a["hypertables"]) == 4 and len(a["jobs"]) == 7  # 0009: the backfill job


async def test_migration_0003_applies_again_unchanged(
    server: tuple[str, PgServer], empty_db: EmptyDb
) -> None:
    dsn = await empty_db()
    conn = await asyncpg.connect(dsn)
    try:
        # Up to 0003 only: later migrations (0007) change what 0003 created.
        known = migrations.load_migrations()
        await migrations.migrate(conn, [m for m in known if m.version <= 3])
        before = await catalog(dsn)
        layer = next(m for m in known if m.version == 3)
        async with conn.transaction():
            await conn.execute(layer.sql)
        assert await catalog(dsn) == before
        assert await migrations.migrate(conn, [m for m in known if m.version <= 3]) == []
    finally:
        await conn.close()
