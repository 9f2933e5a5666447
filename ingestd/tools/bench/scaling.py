"""Scaling phases: settings variants for the batch-size and writer sweeps, and 1..3 ``ingestd
run`` replicas sharing one consumer group on one pre-filled stream.

The replicas are started on an empty stream first, so that their start-up (imports, pools) is not
timed and none of them reads ahead before the others run: the pre-filled entries (a server-side
``COPY`` of the filled stream, with the group at id 0) are then swapped in with one ``RENAME``,
which serves the replicas' blocked ``XREADGROUP`` at once. Time runs from the ``RENAME`` to the
last acknowledgement (each one after its commit).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Final

import redis.asyncio as aioredis

from ingestd.settings import Settings
from ingestd.tools.bench.replicas import (
    Replica,
    kib_to_mib,
    replica_config,
    replica_env,
    write_config,
)
from ingestd.tools.bench.results import PhaseResult
from ingestd.tools.bench.scratch import BenchFailed, group_done, stream_pending
from ingestd.tools.bench.workload import Workload

START_TIMEOUT_S: Final = 90.0
STOP_TIMEOUT_S: Final = 60.0
DONE_POLL_S: Final = 0.01
# Let every replica reach its blocking XREADGROUP after its 'started' line.
SETTLE_S: Final = 0.5


def with_batch_rows(settings: Settings, rows: int) -> Settings:
    """``settings`` with ``batch_max_rows`` = ``rows`` (the queue holds at least two batches)."""
    queue = max(settings.pipeline.queue_max_events, 2 * rows)
    return settings.replace(
        **{"pipeline.batch_max_rows": rows, "pipeline.queue_max_events": queue}
    ).check()


def with_writers(settings: Settings, writers: int) -> Settings:
    """``settings`` with ``writers`` writers and a pool of ``writers + 1`` connections."""
    pool = writers + 1
    return settings.replace(
        **{
            "pipeline.writers": writers,
            "storage.postgres.pool_max_size": pool,
            "storage.postgres.pool_min_size": min(settings.storage.postgres.pool_min_size, pool),
        }
    ).check()


def outstanding_for(settings: Settings, minimum: int) -> int:
    """Enough callers that the batcher fills the next batch while every writer is busy."""
    p = settings.pipeline
    return max(minimum, (p.writers + 1) * p.batch_max_rows)


async def replicas_run(
    client: aioredis.Redis,
    settings: Settings,
    workload: Workload,
    *,
    replicas: int,
    filled_key: str,
    stream_key: str,
    group: str,
    last_id: tuple[int, int],
    workdir: Path,
    deadline_s: float,
) -> PhaseResult:
    """``replicas`` ``ingestd run`` processes consume a copy of ``filled_key`` in one group."""
    n = len(workload.events)
    staged = f"{stream_key}:staged"
    await client.delete(stream_key, staged)
    # The copy carries the group created at id 0 on the filled stream: every entry is new to it.
    if not await client.copy(filled_key, staged):
        raise BenchFailed(f"replicas x{replicas}: COPY {filled_key} {staged} failed")
    # Batches wait for nothing here; a long command timeout only guards a stuck run.
    config = replica_config(
        settings.replace(
            **{
                "storage.postgres.command_timeout_s": max(
                    settings.storage.postgres.command_timeout_s, 60.0
                ),
                "shutdown.grace_s": max(settings.shutdown.grace_s, 30.0),
            }
        ),
        key=stream_key,
        group=group,
    )
    path = write_config(workdir / f"replicas-{replicas}.yml", config)
    env = replica_env(settings)
    procs = [
        Replica(
            f"bench-r{replicas}-{i + 1}", path, env, workdir / f"replica-{replicas}-{i + 1}.log"
        )
        for i in range(replicas)
    ]
    try:
        for r in procs:
            r.start()
        for r in procs:
            await r.wait_started(START_TIMEOUT_S)
        await asyncio.sleep(SETTLE_S)
        t0 = time.perf_counter()
        await client.rename(staged, stream_key)
        end = time.monotonic() + deadline_s
        while not await group_done(client, stream_key, group, last_id):
            if time.monotonic() > end:
                raise BenchFailed(f"replicas x{replicas}: not all entries acked in {deadline_s}s")
            for r in procs:
                r.sample_rss_kib()
                if r.proc is not None and r.proc.poll() is not None:
                    raise BenchFailed(f"replica {r.name} exited early: {r.tail}")
            await asyncio.sleep(DONE_POLL_S)
        seconds = time.perf_counter() - t0
        codes = {r.name: await r.stop(STOP_TIMEOUT_S) for r in procs}
    finally:
        for r in procs:
            r.kill()
    if set(codes.values()) != {0}:
        raise BenchFailed(f"replicas x{replicas}: exit codes {codes}")
    pending = await stream_pending(client, stream_key, group)
    if pending:
        raise BenchFailed(f"replicas x{replicas}: {pending} entries pending after stop")
    await client.delete(stream_key)
    return PhaseResult(
        f"replicas_{replicas}",
        f"{replicas} ingestd run replica(s), one group",
        n,
        seconds,
        rows=workload.expected.rows,
        details={
            "replicas": replicas,
            "peak_rss_mib": {r.name: kib_to_mib(r.peak_rss_kib) for r in procs},
            "exit_codes": codes,
            "pending_after_stop": pending,
        },
    )
