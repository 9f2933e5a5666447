"""PostgreSQL connections: the pool with its timeouts, and the connection type used everywhere."""

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
