"""Memory phase: the peak resident set of one ``ingestd run`` process through a long stream run.

A producer process publishes the simulated feed (it generates the events itself and reports what
the database must then hold, so the bench keeps no million events in memory) while the replica
consumes; the replica's ``VmRSS`` is sampled along the way and its ``VmHWM`` (the kernel's
peak) read until it exits.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from ingestd.settings import Settings
from ingestd.tools.bench.producer import Producer
from ingestd.tools.bench.replicas import (
    Replica,
    kib_to_mib,
    replica_config,
    replica_env,
    write_config,
)
from ingestd.tools.bench.results import PhaseResult
from ingestd.tools.bench.scaling import START_TIMEOUT_S, STOP_TIMEOUT_S
from ingestd.tools.bench.scratch import BenchFailed, group_done, last_entry_id, stream_pending
from ingestd.tools.bench.workload import Expected

SAMPLE_S: Final = 0.25
MEMORY_SEED: Final = 7


async def memory_run(
    client: aioredis.Redis,
    settings: Settings,
    *,
    events: int,
    stream_key: str,
    group: str,
    workdir: Path,
    deadline_s: float,
) -> tuple[PhaseResult, Expected]:
    """Run ``events`` simulated events through one replica; the result and what must be stored."""
    path = write_config(
        workdir / "memory.yml", replica_config(settings, key=stream_key, group=group)
    )
    replica = Replica("bench-memory", path, replica_env(settings), workdir / "memory.log")
    samples: list[tuple[float, float]] = []
    replica.start()
    try:
        await replica.wait_started(START_TIMEOUT_S)
        t0 = time.perf_counter()
        producer = await Producer.start(
            "memory",
            settings.storage.redis.url,
            "simulate",
            stream_key,
            str(events),
            str(MEMORY_SEED),
        )
        task = asyncio.create_task(producer.result(deadline_s))
        last: tuple[int, int] | None = None
        expected_doc: dict[str, Any] = {}
        produced_s = 0.0
        end = time.monotonic() + deadline_s
        while True:
            rss = replica.sample_rss_kib()
            if rss is not None:
                samples.append((time.perf_counter() - t0, rss / 1024))
            if replica.proc is not None and replica.proc.poll() is not None:
                raise BenchFailed(f"memory: the replica exited early: {replica.tail}")
            if task.done():
                if last is None:
                    expected_doc = orjson.loads(task.result())
                    last = await last_entry_id(client, stream_key)
                    produced_s = time.perf_counter() - t0
                if await group_done(client, stream_key, group, last):
                    break
            if time.monotonic() > end:
                await producer.kill()
                raise BenchFailed(f"memory: {events} events not through in {deadline_s:.0f}s")
            await asyncio.sleep(SAMPLE_S)
        seconds = time.perf_counter() - t0
        code = await replica.stop(STOP_TIMEOUT_S)
    finally:
        replica.kill()
    if code != 0:
        raise BenchFailed(f"memory: the replica exited {code}: {replica.tail}")
    pending = await stream_pending(client, stream_key, group)
    if pending:
        raise BenchFailed(f"memory: {pending} entries pending after stop")
    expected = Expected.from_json(expected_doc)
    if expected.events != events:
        raise BenchFailed(f"memory: the producer reports {expected.events} events, not {events}")
    peak = kib_to_mib(replica.peak_rss_kib)
    result = PhaseResult(
        "memory",
        "peak RSS of ingestd run, stream",
        events,
        seconds,
        rows=expected.rows,
        details={
            "peak_rss_mib": peak,
            "target_mib": 200,
            "producer_seconds": produced_s,
            "rss_samples": [[round(t, 2), round(m, 1)] for t, m in samples],
            "measured_by": "/proc/PID/status VmHWM",
        },
    )
    return result, expected
