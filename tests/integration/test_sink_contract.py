"""The in-memory sink and mirror keep the real ones' contract: the same assertions, both pairs.

``MemorySink``/``MemoryMirror`` (ingestd.daemon.sinks.memory) exist so that the pipeline's retry and
acknowledgement order can be unit-tested without servers; these tests are what makes such a
unit test mean something about ``PostgresSink`` (PostgreSQL) and ``RedisMirror`` (Redis).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from ingestd.clients import redis_async
from ingestd.daemon import db
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.pipeline import Mirror, Sink
from ingestd.daemon.sinks.memory import MemoryMirror, MemorySink, RecordingSource
from ingestd.daemon.sinks.mirror import RedisMirror
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.settings import Settings
from ingestd.wire import keys
from ingestd.wire.events import utc_iso
from tests.pipeline_parts import dead_item, item
from tests.samples import fx_rate, spread

pytestmark = [pytest.mark.pg, pytest.mark.redis]

SOURCE = RecordingSource("contract")


@dataclass
class SinkUnderTest:
    sink: Sink
    stored: Callable[[str], Awaitable[set[str]]]  # table -> its event ids


@dataclass
class MirrorUnderTest:
    mirror: Mirror
    value: Callable[[str], Awaitable[str | None]]  # mirror key name -> its value


@pytest.fixture(params=["memory", "postgres"])
async def under_test(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[SinkUnderTest]:
    if request.param == "memory":
        memory = MemorySink()

        async def stored_in_memory(table: str) -> set[str]:
            return memory.event_ids(table)

        yield SinkUnderTest(memory, stored_in_memory)
        return
    pool = await db.create_pool(settings.storage.postgres, min_size=1)

    async def stored_in_postgres(table: str) -> set[str]:
        rows = await pool.fetch(f"SELECT event_id FROM {table}")  # table: a test constant
        return {r["event_id"] for r in rows}

    try:
        yield SinkUnderTest(PostgresSink(pool), stored_in_postgres)
    finally:
        await pool.close()


@pytest.fixture(params=["memory", "redis"])
async def mirror_under_test(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[MirrorUnderTest]:
    if request.param == "memory":
        memory = MemoryMirror()

        async def in_memory(name: str) -> str | None:
            return memory.values.get(name)

        yield MirrorUnderTest(memory, in_memory)
        return
    client: aioredis.Redis = redis_async(redis_url, socket_timeout_s=2.0)

    async def in_redis(name: str) -> str | None:
        value = await client.get(name)
        return value.decode() if isinstance(value, bytes) else value

    try:
        yield MirrorUnderTest(RedisMirror(client), in_redis)
    finally:
        await client.aclose()


@pytest.fixture
def base() -> dt.datetime:
    """The events' time: now, since the Redis mirror does not write values older than a TTL."""
    return dt.datetime.now(dt.UTC)


def fx_items(base: dt.datetime, *numbers: int, rate_offset: int = 0) -> list[Item]:
    """fx-{i} at ``base`` + i ms; ``rate_offset`` changes the rate but not the key."""
    items = []
    for i in numbers:
        event = fx_rate(i + rate_offset).to_event(event_id=f"fx-{i}", producer="collector")
        event["timestamp"] = utc_iso(base + dt.timedelta(milliseconds=i))
        items.append(item(event, SOURCE, token=f"fx-{i}"))
    return items


def nonzero(outcome: BatchOutcome) -> dict[str, int]:
    return {table: n for table, n in outcome.inserted.items() if n}


async def test_a_batch_is_stored_once_and_its_repeat_is_duplicates(
    under_test: SinkUnderTest, base: dt.datetime
) -> None:
    spreads = [
        item(spread(i).to_event(event_id=f"sp-{i}", producer="collector"), SOURCE) for i in range(2)
    ]
    batch = [*fx_items(base, 1, 2, 3), *spreads]
    first = await under_test.sink.write(batch)
    assert nonzero(first) == {"fx_rates": 3, "spreads": 2}
    assert first.duplicates == 0 and first.rejected == {} and first.dead_letters == 0
    again = await under_test.sink.write([*fx_items(base, 1, 2, 3), *spreads])
    assert nonzero(again) == {} and again.duplicates == 5
    assert await under_test.stored("fx_rates") == {"fx-1", "fx-2", "fx-3"}
    assert await under_test.stored("spreads") == {"sp-0", "sp-1"}


async def test_an_event_id_reused_with_other_values_is_refused_as_a_dead_letter(
    under_test: SinkUnderTest, base: dt.datetime
) -> None:
    await under_test.sink.write(fx_items(base, 1))
    changed, fresh = fx_items(base, 1, rate_offset=50)[0], fx_items(base, 2)[0]
    outcome = await under_test.sink.write([changed, fresh])
    assert set(outcome.rejected) == {id(changed)}
    assert outcome.dead_letters == 1
    assert nonzero(outcome) == {"fx_rates": 1}
    assert await under_test.stored("fx_rates") == {"fx-1", "fx-2"}


async def test_bad_input_is_committed_as_a_dead_letter_and_the_probe_passes(
    under_test: SinkUnderTest, base: dt.datetime
) -> None:
    bad = dead_item(b'{"type": "nope"}', "type: unknown event type 'nope'", SOURCE, token="1-0")
    outcome = await under_test.sink.write([bad, *fx_items(base, 7)])
    assert outcome.dead_letters == 1 and nonzero(outcome) == {"fx_rates": 1}
    await under_test.sink.probe()


async def test_the_mirror_keeps_the_newest_value_per_key(
    mirror_under_test: MirrorUnderTest, base: dt.datetime
) -> None:
    mirror = mirror_under_test.mirror
    newer, older = fx_items(base, 5, rate_offset=10)[0], fx_items(base, 1)[0]
    mirror.stage_events([older, newer], BatchOutcome())
    assert await mirror.flush() is True
    expected = str(newer.event.values["rate"]) if newer.event else None
    assert await mirror_under_test.value(keys.fx("USDKRW")) == expected
    # A later flush of an older event does not replace it (set only if newer).
    mirror.stage_events([older], BatchOutcome())
    assert await mirror.flush() is True
    assert await mirror_under_test.value(keys.fx("USDKRW")) == expected


async def test_the_mirror_leaves_out_what_the_database_refused(
    mirror_under_test: MirrorUnderTest, base: dt.datetime
) -> None:
    mirror = mirror_under_test.mirror
    refused = fx_items(base, 1)[0]
    outcome = BatchOutcome()
    outcome.reject(refused, "refused")
    mirror.stage_events([refused], outcome)
    assert await mirror.flush() is True
    assert await mirror_under_test.value(keys.fx("USDKRW")) is None
