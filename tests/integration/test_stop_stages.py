"""``Service.stop`` runs named stages, each bounded by its own deadline.

A stage held up by a hung dependency costs its deadline and no more, and the stages after it
still run: the clients and the pool are closed whatever happened before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time

import pytest

from ingestd.daemon import app
from ingestd.daemon.app import Service
from ingestd.daemon.sources.inprocess import Outcome
from ingestd.settings import Settings
from tests.samples import fx_rate

pytestmark = [pytest.mark.pg, pytest.mark.redis]


class HungMirrorFlush:
    """Stands in for the mirror's last flush to a Redis that never answers."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def flush(self) -> None:
        self.started.set()
        await asyncio.Event().wait()  # forever, until cancelled by the stage's deadline


async def test_a_hung_stage_costs_its_deadline_and_the_later_stages_still_run(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "MIRROR_FLUSH_TIMEOUT_S", 0.3)
    service = Service(settings, stream_intake=False)
    await service.start()
    hung = HungMirrorFlush()
    service.mirror = hung  # type: ignore[assignment]
    pool = service.pool
    assert pool is not None
    started = time.monotonic()
    # Clean all the same: the mirror is a cache, its last values are not data.
    assert await asyncio.wait_for(service.stop(grace_s=2.0), timeout=10) is True
    took = time.monotonic() - started
    assert hung.started.is_set()
    assert 0.3 <= took < 3.0, took
    assert pool.is_closing()  # the last stage ran after the hung one


async def test_a_clean_stop_runs_every_stage_once(settings: Settings) -> None:
    service = Service(settings, stream_intake=False)
    await service.start()
    try:
        now = dt.datetime.now(dt.UTC)
        rate = dataclasses.replace(fx_rate(0), timestamp=now)
        outcome = await service.submit(rate.to_event(event_id="stop-1", producer="collector"))
        assert outcome is Outcome.COMMITTED
    finally:
        assert await service.stop(grace_s=5.0) is True
    assert service.pool is not None and service.pool.is_closing()
    assert await service.stop() is True  # a second stop is a no-op
