"""Start-up phase: from ``ingestd run`` starting to its first committed row, on a full stream.

The stream is filled first (``STARTUP_EVENTS`` FX rates); then ``ingestd run`` is started as a
real process and the clock runs from just before the process is spawned (interpreter start and
imports included: they are most of it) until the first event of the stream is visible in
``fx_rates``, polled every ``POLL_S``. Repeated ``STARTUP_RUNS`` times on fresh streams; the
median is the figure (the aim is 0.3 s). Each run also notes when the process logged that it
had started (connected, migrated, reading). A figure, not a pass/fail: the bench prints it.

The process may write its bytecode cache (``PYTHONDONTWRITEBYTECODE`` is dropped from its
environment), and one uncounted first run fills it: an installed wheel has its modules compiled
already, while a checkout run with ``PYTHONDONTWRITEBYTECODE`` set compiles every ingestd module
from source at each start. That first run's figure is reported too ("without a bytecode cache"
when the checkout had none).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import statistics
import time
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson
import redis.asyncio as aioredis

from ingestd.settings import Settings
from ingestd.tools.bench.replicas import (
    STARTED_LINE,
    Replica,
    replica_config,
    replica_env,
    write_config,
)
from ingestd.tools.bench.scaling import STOP_TIMEOUT_S
from ingestd.tools.bench.scratch import BenchFailed
from ingestd.wire.events import utc_iso

STARTUP_EVENTS: Final = 1_000
STARTUP_RUNS: Final = 3
POLL_S: Final = 0.002
TIMEOUT_S: Final = 60.0
AIM_S: Final = 0.3


@dataclasses.dataclass(frozen=True, slots=True)
class StartupResult:
    """Seconds from spawning ``ingestd run`` to its first committed row, per run."""

    first_row_s: tuple[float, ...]
    started_s: tuple[float | None, ...]  # to its "ingestd started" log line, per run
    events: int
    first_run_s: float  # the uncounted first run, which may have compiled ingestd's modules

    @property
    def median_s(self) -> float:
        """The figure: the median run."""
        return statistics.median(self.first_row_s)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "events_in_stream": self.events,
            "first_row_s": list(self.first_row_s),
            "started_line_s": list(self.started_s),
            "median_first_row_s": self.median_s,
            "first_run_s": self.first_run_s,
            "aim_s": AIM_S,
        }


def _events(run: int, n: int) -> list[bytes]:
    now = dt.datetime.now(dt.UTC)
    return [
        orjson.dumps(
            {
                "type": "fx_rate",
                "event_id": f"startup-{run}-{i}",
                "producer": "collector",
                "pair": "USDKRW",
                "rate": "1385.5",
                "source": "bench",
                "timestamp": utc_iso(now + dt.timedelta(microseconds=i)),
            }
        )
        for i in range(n)
    ]


async def _fill(client: aioredis.Redis, key: str, payloads: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(key, {"event": payload})
    await pipe.execute()


async def _one_run(
    client: aioredis.Redis,
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    run: int,
    stream_key: str,
    group: str,
    workdir: Path,
) -> tuple[float, float | None]:
    await client.delete(stream_key)
    await _fill(client, stream_key, _events(run, STARTUP_EVENTS))
    path = write_config(
        workdir / f"startup-{run}.yml", replica_config(settings, key=stream_key, group=group)
    )
    env = {k: v for k, v in replica_env(settings).items() if k != "PYTHONDONTWRITEBYTECODE"}
    replica = Replica(f"bench-startup-{run}", path, env, workdir / f"startup-{run}.log")
    first_id = f"startup-{run}-0"
    started: float | None = None
    t0 = time.perf_counter()
    replica.start()
    try:
        end = time.monotonic() + TIMEOUT_S
        while True:
            if started is None and STARTED_LINE in replica.log_text:
                started = time.perf_counter() - t0
            if await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM fx_rates WHERE event_id = $1)", first_id
            ):
                first_row = time.perf_counter() - t0
                break
            if replica.proc is not None and replica.proc.poll() is not None:
                raise BenchFailed(f"startup: ingestd run exited early: {replica.tail}")
            if time.monotonic() > end:
                raise BenchFailed(f"startup: no row committed in {TIMEOUT_S:.0f}s")
            await asyncio.sleep(POLL_S)
        code = await replica.stop(STOP_TIMEOUT_S)
    finally:
        replica.kill()
    if code != 0:
        raise BenchFailed(f"startup: ingestd run exited {code}: {replica.tail}")
    await client.delete(stream_key)
    return first_row, started


async def startup_run(
    client: aioredis.Redis,
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    stream_key: str,
    group: str,
    workdir: Path,
    runs: int = STARTUP_RUNS,
) -> StartupResult:
    """Measure ``runs`` start-ups, one after the other, each on a freshly filled stream, after
    one that fills the bytecode cache."""
    first: list[float] = []
    started: list[float | None] = []
    first_run_s = 0.0
    for run in range(runs + 1):
        row_s, line_s = await _one_run(
            client, conn, settings, run=run, stream_key=stream_key, group=group, workdir=workdir
        )
        if run == 0:
            first_run_s = row_s
            continue
        first.append(row_s)
        started.append(line_s)
    return StartupResult(tuple(first), tuple(started), STARTUP_EVENTS, first_run_s)
