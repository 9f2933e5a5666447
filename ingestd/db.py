"""The PostgreSQL connection type used everywhere (``ingestd.clients`` makes the connections)."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# A bare connection (migrate, bench) or one lent by the pool: both speak the same API.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
