"""A sink for tests that read from a source without writing anything (one place, not a copy)."""

from __future__ import annotations

from collections.abc import Sequence

from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.deadletters import DeadLetter


class UnusedSink:
    """Satisfies the pipeline's Sink protocol; any call fails the test."""

    async def write(self, items: Sequence[Item]) -> BatchOutcome:
        raise AssertionError("nothing is written in this test")

    async def probe(self) -> None:
        raise AssertionError("nothing is written in this test")

    async def write_dead_letter(self, letter: DeadLetter) -> None:
        raise AssertionError("nothing is written in this test")

    def describe(self, exc: BaseException) -> tuple[str, str | None]:
        raise AssertionError("nothing is written in this test")
