"""In-process counters and gauges that the pipeline keeps (exported by the operations layer)."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(slots=True)
class Metrics:
    """Counters since start; names match the Prometheus metrics (``ingestd_`` prefix)."""

    events_received: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    rows_written: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    dead_letters: int = 0
    duplicates: int = 0
    batches: int = 0
    flush_retries: int = 0
    acks: int = 0
    spooled: int = 0
    spool_rejections: int = 0
    last_commit_monotonic: float | None = None
    flush_failing_since: float | None = None
