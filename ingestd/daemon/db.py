"""Every PostgreSQL pool and connection ingestd makes is made here, and the connection type.

asyncpg has no timeout on connect or on a command unless asked: a connection made anywhere else
could hang on a dead server. (``ingestd.clients`` makes the Redis clients; the producer library
uses only that one and never loads asyncpg.)
"""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ingestd.settings import PostgresSettings

# A bare connection (migrate, bench) or one lent by the pool: both speak the same API.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


async def create_pool(pg: PostgresSettings, *, min_size: int | None = None) -> asyncpg.Pool:
    """An asyncpg pool with timeouts on connect and on every command (asyncpg has none)."""
    pool = await asyncpg.create_pool(
        pg.dsn,
        min_size=pg.pool_min_size if min_size is None else min_size,
        max_size=pg.pool_max_size,
        timeout=pg.connect_timeout_s,
        command_timeout=pg.command_timeout_s,
        max_inactive_connection_lifetime=60.0,
        server_settings={"application_name": "ingestd"},
    )
    assert pool is not None
    return pool


async def connect(
    dsn: str,
    *,
    timeout_s: float,
    database: str | None = None,
    command_timeout_s: float | None = None,
) -> asyncpg.Connection[Any]:
    """One PostgreSQL connection (the commands that need no pool), with a connect timeout."""
    options: dict[str, Any] = {"timeout": timeout_s, "command_timeout": command_timeout_s}
    if database is not None:
        options["database"] = database
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, **options)
    return conn
