"""What the phases measure: plain records that the report, the JSON and the plots read."""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingestd.tools.bench.cpu import CpuSplit


@dataclasses.dataclass(slots=True)
class PhaseResult:
    """One timed throughput run: events written (and verified) in ``seconds``."""

    key: str
    label: str
    events: int
    seconds: float
    rows: int = 0
    cpu_s: float | None = None  # this process's CPU time during the run (in-process phases)
    cpu_split: dict[str, Any] | None = None  # this process / PostgreSQL backends / Redis
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    verified: bool = False

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "label": self.label,
            "events": self.events,
            "rows": self.rows,
            "seconds": self.seconds,
            "events_per_s": self.rate,
            "cpu_s": self.cpu_s,
            "cpu_split_s": self.cpu_split,
            "verified": self.verified,
            **self.details,
        }


@dataclasses.dataclass(slots=True)
class LatencyResult:
    """One paced run: latencies (seconds) of each event at a target rate."""

    key: str
    label: str
    target_rate: float
    achieved_rate: float
    latencies_s: list[float]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    verified: bool = False
    # Events over the time from the first submit (XADD) to the last commit.
    completed_rate: float = math.nan

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (nearest rank), seconds."""
        return percentile(sorted(self.latencies_s), p)

    @property
    def sustained(self) -> bool:
        """True when the paced producer kept within 5 % of its target rate."""
        return self.achieved_rate >= 0.95 * self.target_rate

    @property
    def kept_up(self) -> bool:
        """True when the service committed within 5 % of the target rate (not saturated)."""
        return self.completed_rate >= 0.95 * self.target_rate

    def to_json(self) -> dict[str, Any]:
        """The JSON form (milliseconds)."""
        ordered = sorted(self.latencies_s)
        return {
            "label": self.label,
            "target_rate": self.target_rate,
            "achieved_rate": self.achieved_rate,
            "sustained": self.sustained,
            "completed_rate": self.completed_rate,
            "kept_up": self.kept_up,
            "events": len(ordered),
            "p50_ms": 1000 * percentile(ordered, 50),
            "p95_ms": 1000 * percentile(ordered, 95),
            "p99_ms": 1000 * percentile(ordered, 99),
            "max_ms": 1000 * (ordered[-1] if ordered else math.nan),
            "verified": self.verified,
            **self.settings,
        }


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (NaN when empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Stopwatch:
    """Wall time and this process's CPU time of one run (and, given a split, where CPU went)."""

    def __init__(self, split: CpuSplit | None = None) -> None:
        self._t0 = 0.0
        self._cpu0 = 0.0
        self.seconds = 0.0
        self.cpu_s = 0.0
        self._split = split
        self.cpu_split: dict[str, Any] | None = None

    async def begin(self) -> None:
        """Take the CPU split's readings, then start timing."""
        if self._split is not None:
            await self._split.begin()
        self.start()

    async def end(self) -> float:
        """Stop timing, then read the CPU split; return the wall seconds."""
        seconds = self.stop()
        if self._split is not None:
            self.cpu_split = await self._split.end()
        return seconds

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        """Start timing."""
        self._cpu0 = self._cpu()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Stop timing; return the wall seconds."""
        self.seconds = time.perf_counter() - self._t0
        self.cpu_s = self._cpu() - self._cpu0
        return self.seconds
