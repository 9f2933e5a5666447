"""What the numbers were measured on: CPUs, memory, versions, server settings, load."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis

from ingestd.daemon import migrations


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine shows here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


PG_SETTINGS: Final = (
    "shared_buffers",
    "synchronous_commit",
    "fsync",
    "wal_level",
    "max_wal_size",
    "checkpoint_timeout",
)


async def machine_info(conn: asyncpg.Connection, client: aioredis.Redis) -> dict[str, Any]:
    """What the numbers were measured on."""
    info = await client.info("server")
    pg = {name: await conn.fetchval("SELECT current_setting($1)", name) for name in PG_SETTINGS}
    timescale = await migrations.timescaledb_enabled(conn)
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "asyncpg": asyncpg.__version__,
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "orjson": _version("orjson"),
        "msgspec": _version("msgspec"),
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "postgresql": await conn.fetchval("SHOW server_version"),
        "timescaledb": (
            await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
            if timescale
            else None
        ),
        "postgresql_settings": pg,
        "redis": info.get("redis_version"),
        "load_average": {"before": load_average()},
    }
