"""Where a phase's CPU time goes: this process (ingestd in-process, or the raw writer's client),
the PostgreSQL backends serving the scratch database, and the Redis server.

PostgreSQL backends are read from ``/proc`` by the pids ``pg_stat_activity`` names, so the split
is only measured when the server runs on this host (otherwise it is left out, never guessed).
Redis's figure is its whole server (``INFO cpu``): other clients of a shared Redis add to it. The
WAL writer and checkpointer are not counted.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a local process in seconds; None if it is not a local postgres."""
    try:
        if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")" of the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuSplit:
    """CPU seconds of this process, the database's backends and Redis between begin and end."""

    def __init__(self, conn: asyncpg.Connection, client: aioredis.Redis) -> None:
        self._conn = conn
        self._client = client
        self._pg0: dict[int, float] | None = None
        self._redis0 = 0.0
        self._self0 = 0.0

    async def _backends(self) -> dict[int, float] | None:
        pids = await self._conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )
        out: dict[int, float] = {}
        for row in pids:
            cpu = _proc_cpu_s(row["pid"])
            if cpu is None:
                return None  # not a server on this host: no split rather than a wrong one
            out[row["pid"]] = cpu
        return out

    async def _redis_cpu_s(self) -> float:
        info = await self._client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def begin(self) -> None:
        """Take the starting readings."""
        self._pg0 = await self._backends()
        self._redis0 = await self._redis_cpu_s()
        self._self0 = _self_cpu_s()

    async def end(self) -> dict[str, Any]:
        """CPU seconds since ``begin`` (backends that started since count from their start)."""
        own = _self_cpu_s() - self._self0
        pg1 = await self._backends()
        redis_s = await self._redis_cpu_s() - self._redis0
        pg_s: float | None = None
        if pg1 is not None and self._pg0 is not None:
            pg_s = sum(cpu - self._pg0.get(pid, 0.0) for pid, cpu in pg1.items())
        return {"process_s": own, "postgresql_s": pg_s, "redis_s": redis_s}
