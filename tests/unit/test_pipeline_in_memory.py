"""The pipeline's retry and acknowledgement order, on the in-memory sink and mirror.

No servers: ``MemorySink``/``MemoryMirror`` keep the real ones' contract
(tests/integration/test_sink_contract.py), and share one timeline with the source, so the
order of commit, mirror write and acknowledgement is seen directly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from ingestd.daemon.batching import Item
from ingestd.daemon.pipeline import Pipeline
from ingestd.daemon.sinks.memory import (
    MemoryMirror,
    MemorySink,
    RecordingSource,
    Step,
    outage,
    refusal,
)
from ingestd.settings import PipelineSettings
from ingestd.wire import keys
from tests.pipeline_parts import item
from tests.samples import fx_rate


def fx_items(source: RecordingSource, *numbers: int) -> list[Item]:
    now = dt.datetime.now(dt.UTC)
    return [
        item(
            {
                **fx_rate(i).to_event(event_id=f"fx-{i}", producer="collector"),
                "timestamp": (now + dt.timedelta(milliseconds=i)).isoformat(),
            },
            source,
            token=f"{i}-0",
        )
        for i in numbers
    ]


def pipeline(
    tmp_path: Path, sink: MemorySink, mirror: MemoryMirror, *, batch_max_age_ms: int = 10
) -> Pipeline:
    settings = PipelineSettings(
        batch_max_age_ms=batch_max_age_ms,
        writers=1,
        backoff_base_s=0.01,
        backoff_cap_s=0.02,
        quarantine_path=str(tmp_path / "quarantine.jsonl"),
    )
    return Pipeline(sink, mirror, settings)


async def test_the_mirror_is_written_after_the_commit_and_acks_come_last(tmp_path: Path) -> None:
    timeline: list[Step] = []
    sink, mirror = MemorySink(timeline), MemoryMirror(timeline)
    source = RecordingSource("stream", timeline)
    p = pipeline(tmp_path, sink, mirror)
    p.start()
    await p.put(fx_items(source, 1, 2, 3))
    await p.drain()
    ids = ("fx-1", "fx-2", "fx-3")
    assert timeline == [("commit", ids), ("mirror", (keys.fx("USDKRW"),)), ("ack", ids)]


async def test_a_batch_waits_while_the_database_is_unavailable_and_is_acked_once(
    tmp_path: Path,
) -> None:
    timeline: list[Step] = []
    sink, mirror = MemorySink(timeline), MemoryMirror(timeline)
    source = RecordingSource("stream", timeline)
    sink.unavailable = outage()
    p = pipeline(tmp_path, sink, mirror)
    p.start()
    await p.put(fx_items(source, 1, 2))
    async with asyncio.timeout(5):
        while sink.writes < 3:  # retried, not given up
            await asyncio.sleep(0.01)
    assert source.acked == [] and p.failing
    assert sink.event_ids("fx_rates") == set()
    sink.unavailable = None
    await p.drain()
    assert [step for step, _ in timeline] == ["commit", "mirror", "ack"]
    assert sink.event_ids("fx_rates") == {"fx-1", "fx-2"} and not p.failing
    assert sink.dead_letters == {}


async def test_a_refused_entry_is_isolated_and_dead_lettered_the_rest_committed(
    tmp_path: Path,
) -> None:
    timeline: list[Step] = []
    sink, mirror = MemorySink(timeline), MemoryMirror(timeline)
    source = RecordingSource("stream", timeline)
    sink.refuse["fx-3"] = refusal("22003", "numeric field overflow")
    p = pipeline(tmp_path, sink, mirror)
    p.start()
    await p.put(fx_items(source, 1, 2, 3, 4))
    await p.drain()
    assert sink.event_ids("fx_rates") == {"fx-1", "fx-2", "fx-4"}
    (letter,) = sink.dead_letters.values()
    assert letter.event_id == "fx-3" and "numeric field overflow" in letter.error
    acked = [i.event.event_id for items, _ in source.acked for i in items if i.event]
    assert sorted(acked) == ["fx-1", "fx-2", "fx-3", "fx-4"]  # each once, the refused one too
    # Every acknowledgement follows the commit of what it acknowledges.
    for n, (step, ids) in enumerate(timeline):
        if step == "ack" and ids != ("fx-3",):
            assert ("commit", ids) in timeline[:n]


async def test_an_event_after_a_quiet_spell_is_written_at_once_later_ones_gather(
    tmp_path: Path,
) -> None:
    """With a minute's batch age, the first event is committed without waiting for it (nothing
    was cut before, nothing queued behind it, a writer free); the next two, arriving right
    after that cut, wait for company and go together."""
    timeline: list[Step] = []
    sink, mirror = MemorySink(timeline), MemoryMirror(timeline)
    source = RecordingSource("stream", timeline)
    p = pipeline(tmp_path, sink, mirror, batch_max_age_ms=60_000)
    p.start()
    await p.put(fx_items(source, 1))
    async with asyncio.timeout(5):  # far below the minute the age alone would take
        while not source.acked:
            await asyncio.sleep(0.005)
    await p.put(fx_items(source, 2))
    await p.put(fx_items(source, 3))
    for _ in range(20):  # the loop takes them in; the last cut is too recent to cut again
        await asyncio.sleep(0)
    assert not len(p.queue)
    assert [ids for step, ids in timeline if step == "commit"] == [("fx-1",)]
    await p.drain()
    assert [ids for step, ids in timeline if step == "commit"] == [("fx-1",), ("fx-2", "fx-3")]
