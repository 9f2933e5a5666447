"""Shutdown helpers: a background task that will not end must not hold up the exit."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from ingestd.daemon.pipeline import cancel_quietly


async def test_cancel_quietly_gives_up_on_a_task_that_swallows_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        # What a redis-py read blocked in XREADGROUP was seen to do: ignore the cancellation.
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_quietly(task, timeout_s=0.2), timeout=2)
    assert not task.done()
    assert "did not end" in caplog.text and "stubborn" in caplog.text
    release.set()
    await task


async def test_cancel_quietly_logs_an_error_the_task_ends_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing_on_cancel() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("reset failed") from None

    task = asyncio.create_task(failing_on_cancel(), name="resetting")
    await asyncio.sleep(0)
    await cancel_quietly(task)
    assert "RuntimeError" in caplog.text and "resetting" in caplog.text
