"""Forward-only numbered SQL migrations (``sql/migrations/NNNN_name.sql``) with checksums.

Each file is applied in its own transaction under ``pg_advisory_xact_lock``, so several replicas
may run ``ingestd migrate`` at once: the second waits, then finds the work done. A transaction-
scoped lock is used because a session lock taken through a pool is released by the pool's reset.

An applied migration must not change: a database whose recorded checksum differs from the file
refuses to start (``SchemaDrift``). The one exception is ``AMENDED_CHECKSUMS``: the former
checksums of migrations whose *comments* were amended after release. A database that applied the
former text is accepted for exactly those versions and those checksums (its schema is the same,
only the comments differ); the ledger keeps the former checksum. Only comments may ever be
amended this way, and each amendment adds the file's previous checksum here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from ingestd.daemon.db import Connection
from ingestd.errors import SchemaBehind, SchemaDrift

log = logging.getLogger("ingestd.daemon.migrations")

# An arbitrary constant naming "ingestd schema migrations" in the advisory-lock space.
MIGRATION_LOCK_ID = 0x1D6E57D
LEDGER_TABLE = "ingestd_migrations"
_FILE_NAME = re.compile(r"([0-9]{4})_([a-z0-9_]+)\.sql\Z")

# Former checksums accepted per version, for migrations whose comments were amended after release
# (the schema they build is unchanged). 2026-12: comments that referred readers to documents
# outside the repository were rewritten to state the thing itself.
AMENDED_CHECKSUMS: Final[Mapping[int, frozenset[str]]] = {
    1: frozenset({"aacd8e9eb77acc222fe4b16c8a341aff531e2289c2ef016f6fc6cb0be0d7594b"}),
    2: frozenset({"453b11b96ec7aa26ef31e5f99a8148d8dc4b0023d52945bb1c85f546a8d49545"}),
    3: frozenset({"acc6ba685858c350dc62f3761a61aee30a6e156653f21275cc161582a10f083d"}),
    5: frozenset({"ad8996bb7f64fa2990447a3d0a4e4d1551356318f9ad43de0d5e86a5a028d0ad"}),
    7: frozenset({"1728afbb713aee1f269836d33b78d599b9d9154a6adf0601a194476b3422caa6"}),
    8: frozenset({"e1d9e88664474354e15ad30b44e201f5174616c5f001827b76d2b95def9fc876"}),
    9: frozenset({"a67a63a0d684a2678be52f17e093d30c4f36e9981916cdc1f1f5f9c092444174"}),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text: an edited, already-applied migration is detected."""
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def sql_dir() -> Path:
    """Where the SQL files are: ``INGESTD_SQL_DIR``, else the ``sql/`` shipped with the package."""
    override = os.environ.get("INGESTD_SQL_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "sql"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """All migrations in version order; a gap or a duplicate version is an error."""
    folder = (directory or sql_dir()) / "migrations"
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        m = _FILE_NAME.match(path.name)
        if m is None:
            raise ValueError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise ValueError(f"migrations must be numbered 1, 2, 3 ...: found {mig.version:04d}")
    return found


_LEDGER_DDL = f"""
CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum CHAR(64) NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
)
"""


async def _applied(conn: Connection) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", LEDGER_TABLE)
    if not exists:
        return {}
    rows = await conn.fetch(f"SELECT version, checksum FROM {LEDGER_TABLE} ORDER BY version")
    return {r["version"]: r["checksum"].strip() for r in rows}


def accepts(mig: Migration, recorded: str, amended: Mapping[int, frozenset[str]]) -> bool:
    """Whether a database that recorded ``recorded`` for ``mig`` applied the same schema."""
    return recorded == mig.checksum or recorded in amended.get(mig.version, frozenset())


def _check_history(
    applied: dict[int, str],
    migrations: list[Migration],
    amended: Mapping[int, frozenset[str]] = AMENDED_CHECKSUMS,
) -> None:
    by_version = {m.version: m for m in migrations}
    for version, checksum in applied.items():
        mig = by_version.get(version)
        if mig is None:
            raise SchemaDrift(
                f"the database has migration {version:04d}, which this build does not know: "
                "it was migrated by a newer ingestd"
            )
        if not accepts(mig, checksum, amended):
            raise SchemaDrift(
                f"migration {version:04d}_{mig.name} was edited after it was applied "
                f"(checksum {checksum[:12]} in the database, {mig.checksum[:12]} in the file)"
            )


async def migrate(conn: Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply every pending migration; return the names applied by this call."""
    migrations = load_migrations() if migrations is None else migrations
    done: list[str] = []
    for mig in migrations:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
            await conn.execute(_LEDGER_DDL)
            applied = await _applied(conn)
            _check_history(applied, migrations)
            if mig.version in applied:
                continue
            await conn.execute(mig.sql)
            await conn.execute(
                f"INSERT INTO {LEDGER_TABLE} (version, name, checksum) VALUES ($1, $2, $3)",
                mig.version,
                mig.name,
                mig.checksum,
            )
            log.info(
                "applied migration %04d_%s",
                mig.version,
                mig.name,
                extra={"action": "migration_applied"},
            )
            done.append(f"{mig.version:04d}_{mig.name}")
    return done


async def check_current(conn: Connection, migrations: list[Migration] | None = None) -> None:
    """Raise SchemaBehind (or SchemaDrift) unless every known migration is applied as written."""
    migrations = load_migrations() if migrations is None else migrations
    applied = await _applied(conn)
    _check_history(applied, migrations)
    pending = [f"{m.version:04d}_{m.name}" for m in migrations if m.version not in applied]
    if pending:
        raise SchemaBehind(
            f"database schema is behind: {len(pending)} pending migration(s) "
            f"({', '.join(pending)}); run `ingestd migrate` first"
        )


async def timescaledb_enabled(conn: Connection) -> bool:
    """True when the timescaledb extension is created in this database."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname='timescaledb')"
        )
    )
