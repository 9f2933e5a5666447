"""Latency phases: submit->commit at paced loads, and XADD->commit through the stream.

The load is open-loop: a pacer starts each event at its scheduled moment whether or not the
earlier ones have committed (a closed loop would slow down with the service and hide its
queueing). The latency of one event is measured in its caller, from the call of ``submit`` to
its return, which is after the batch holding it committed (and was mirrored).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis

from ingestd.daemon.app import Service
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.sources.inprocess import Outcome
from ingestd.settings import Settings
from ingestd.tools.bench.producer import Producer
from ingestd.tools.bench.results import LatencyResult
from ingestd.tools.bench.scratch import BenchFailed, last_entry_id, parse_entry_id, wait_group_done
from ingestd.tools.bench.workload import Workload

PACE_TICK_S: Final = 0.001
STREAM_SLACK_S: Final = 60.0


async def paced_submit(
    settings: Settings, workload: Workload, rate: float, *, label: str
) -> LatencyResult:
    """Submit ``workload``'s events at ``rate`` per second, each from its own caller task."""
    events = workload.events
    latencies: list[float] = []
    outcomes: collections.Counter[Outcome] = collections.Counter()
    service = Service(settings, stream_intake=False)
    await service.start(wait_for_database=True)

    async def one(ev: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        outcome = await service.submit(ev)
        latencies.append(time.perf_counter() - t0)
        outcomes[outcome] += 1

    try:
        tasks: list[asyncio.Task[None]] = []
        sent = 0
        t0 = time.perf_counter()
        while sent < len(events):
            due = min(len(events), int((time.perf_counter() - t0) * rate) + 1)
            for ev in events[sent:due]:
                tasks.append(asyncio.create_task(one(ev)))
            sent = due
            await asyncio.sleep(PACE_TICK_S)
        paced_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        completed_s = time.perf_counter() - t0
    finally:
        await service.stop()
    if outcomes[Outcome.COMMITTED] != len(events):
        raise BenchFailed(f"{label}: outcomes {dict(outcomes)}, expected all committed")
    p = settings.pipeline
    return LatencyResult(
        "submit_latency",
        label,
        rate,
        len(events) / paced_s if paced_s > 0 else rate,
        latencies,
        settings={
            "batch_max_rows": p.batch_max_rows,
            "batch_max_age_ms": p.batch_max_age_ms,
            "writers": p.writers,
        },
        completed_rate=len(events) / completed_s if completed_s > 0 else rate,
    )


class AckProbe:
    """Records, for each stream entry, XADD time (its id's milliseconds) to acknowledgement.

    A measuring probe put in front of the stream source's ``acknowledge``: the pipeline calls it
    right after the batch's commit and mirror write, before the XACK. Redis and the bench share
    this host's clock, so the entry id's millisecond timestamp and ``time.time()`` compare.
    """

    def __init__(self, service: Service) -> None:
        assert service.stream is not None
        self.latencies_s: list[float] = []
        self._source = service.stream
        self._acknowledge = service.stream.acknowledge
        # Instrumentation of this bench's own Service instance; nothing else sees it.
        service.stream.acknowledge = self._probe  # type: ignore[method-assign]

    async def _probe(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        now_ms = time.time() * 1000
        for item in items:
            added_ms, _ = parse_entry_id(item.token)
            self.latencies_s.append((now_ms - added_ms) / 1000)
        await self._acknowledge(items, outcome)


async def paced_stream(
    settings: Settings,
    client: aioredis.Redis,
    workload: Workload,
    jsonl: Path,
    rate: float,
    *,
    label: str,
) -> LatencyResult:
    """A producer process XADDs at ``rate``; ingestd reads; latency is XADD -> commit."""
    n = len(workload.events)
    service = Service(settings, stream_intake=True)
    await service.start(wait_for_database=True)
    try:
        probe = AckProbe(service)
        t0 = time.perf_counter()
        producer = await Producer.start(
            label, settings.storage.redis.url, "paced", str(jsonl), settings.stream.key, str(rate)
        )
        try:
            out = await producer.result(n / rate + STREAM_SLACK_S)
        except BaseException:
            await producer.kill()
            raise
        sent_text, seconds_text = out.decode().split()
        if int(sent_text) != n:
            raise BenchFailed(f"{label}: the producer sent {sent_text} events, expected {n}")
        paced_s = float(seconds_text)
        last = await last_entry_id(client, settings.stream.key)
        await wait_group_done(
            client,
            settings.stream.key,
            settings.stream.group,
            last,
            deadline_s=STREAM_SLACK_S,
            label=label,
        )
        # The producer process's start-up is not the service's time: count from its first XADD.
        completed_s = time.perf_counter() - t0 - (producer.elapsed_s - paced_s)
    finally:
        await service.stop()
    p = settings.pipeline
    return LatencyResult(
        "stream_latency",
        label,
        rate,
        n / paced_s if paced_s > 0 else rate,
        probe.latencies_s,
        settings={
            "batch_max_rows": p.batch_max_rows,
            "batch_max_age_ms": p.batch_max_age_ms,
            "writers": p.writers,
            "block_ms": settings.stream.block_ms,
            "measured_to": "commit + mirror write (before XACK)",
        },
        completed_rate=n / completed_s if completed_s > 0 else rate,
    )
