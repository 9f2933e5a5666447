"""Every metric ingestd exports: plain counters on the hot path, Prometheus text at scrape time.

The pipeline and the sources bump plain ints and ``Counter``s (no locks, no label lookups per
event) and fill the histograms once per batch. A ``MetricsCollector`` turns them into Prometheus
families when ``/metrics`` is scraped, registered in a per-Service ``CollectorRegistry`` (not the
global one), so several Services in one process never collide. Every name starts with
``ingestd_`` and is defined in this module only.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ingestd.wire import keys

if TYPE_CHECKING:
    from ingestd.daemon.batching import BatchOutcome, Item

PREFIX: Final = "ingestd_"
# Seconds: from 5 ms (a quick flush) to a minute (a database outage being ridden out).
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Events per batch: batch_max_rows is 5,000 per table by default, several tables can share one.
BATCH_EVENTS_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000)
# Dead letters are labelled with the event type only when it is a known one: a label value never
# comes from input (unbounded cardinality), so anything that did not parse is "invalid".
INVALID_TYPE: Final = "invalid"


class BulkHistogram:
    """A cumulative histogram that takes a whole batch of observations in one call."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds: tuple[float, ...] = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """One observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observe_ages(self, now: float, started: list[float]) -> None:
        """Observe ``now - t`` for every ``t`` in ``started`` (sorted here, in place).

        Costs one sort (the items of a batch arrive nearly in order, so it is linear) and one
        bisection per bucket, instead of one histogram update per event.
        """
        if not started:
            return
        started.sort()
        n = len(started)
        below = n  # items whose age is <= the previous (larger) bound
        counts = self.counts
        # An age is <= b exactly when the start is >= now - b: walk the bounds from the largest.
        for i in range(len(self.bounds) - 1, -1, -1):
            within = n - bisect.bisect_left(started, now - self.bounds[i])
            counts[i + 1] += below - within
            below = within
        counts[0] += below
        self.sum += now * n - sum(started)
        self.count += n

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs, ending with ``+Inf``, as Prometheus wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_go_float(bound), float(running)))
        out.append(("+Inf", float(running + self.counts[-1])))
        return out


@dataclasses.dataclass(slots=True)
class Metrics:
    """Counters since start; each field is exported under the name in its comment."""

    # ingestd_events_received_total{type}: queued by a source (``invalid`` when not parsed)
    events_received: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    # ingestd_rows_written_total{table}: rows inserted (duplicates excluded)
    rows_written: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    dead_letters: int = 0  # total rows added to dead_letters (by type below)
    duplicates: int = 0  # ingestd_duplicates_total
    batches: int = 0  # ingestd_batches_total
    flush_retries: int = 0  # ingestd_flush_retries_total
    acks: int = 0  # ingestd_stream_acks_total
    spooled: int = 0  # ingestd_spooled_events_total
    spool_rejections: int = 0  # ingestd_spool_rejections_total
    batch_splits: int = 0  # ingestd_batch_splits_total
    # ingestd_entries_given_up_total: refused alone max_entry_attempts times (dead letter or
    # quarantine); ingestd_quarantined_total: even the dead letter was refused
    entries_given_up: int = 0
    quarantined: int = 0
    last_commit_monotonic: float | None = None
    flush_failing_since: float | None = None
    # ingestd_events_written_total{type}: committed (a duplicate of a stored event included)
    events_written: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    # ingestd_stale_spreads_total{symbol}: committed spreads stored with is_stale (a redelivery
    # of one counted again, as in events_written)
    stale_spreads: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # ingestd_events_dead_lettered_total{type}
    events_dead_lettered: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    # ingestd_batch_events, ingestd_flush_duration_seconds, ingestd_commit_latency_seconds
    batch_events: BulkHistogram = dataclasses.field(
        default_factory=lambda: BulkHistogram(BATCH_EVENTS_BUCKETS)
    )
    flush_seconds: BulkHistogram = dataclasses.field(
        default_factory=lambda: BulkHistogram(LATENCY_BUCKETS)
    )
    commit_latency_seconds: BulkHistogram = dataclasses.field(
        default_factory=lambda: BulkHistogram(LATENCY_BUCKETS)
    )
    # Sampled from XINFO GROUPS / XLEN every few seconds (None until the first sample).
    stream_pending: int | None = None  # ingestd_stream_pending
    stream_lag: int | None = None  # ingestd_stream_lag
    stream_length: int | None = None  # ingestd_stream_length
    stream_sample_errors: int = 0  # ingestd_stream_sample_errors_total
    # ingestd_stream_oldest_pending_seconds: age of the group's oldest unacknowledged entry
    stream_oldest_pending_s: float | None = None
    # Age of the oldest entry the group has not delivered to any consumer yet (None: none). Not
    # a health signal (a replica catching up on a backlog is healthy), but ingest lag for
    # trading:state: an entry waiting unread is as late as one read and not yet committed.
    stream_oldest_undelivered_s: float | None = None
    # Why the stream cannot be read (wrong type at its key, read errors), None when it can.
    stream_problem: str | None = None
    # Sampled by the open-count reconciliation: closes parked waiting for their open.
    parked_closes: int | None = None  # ingestd_parked_closes
    parked_close_oldest_age_s: float | None = None  # ingestd_parked_close_oldest_age_seconds
    # The half-hedge check (ingestd.daemon.hedges): open alerts (the table's count, read by every
    # replica) and those this replica raised and cleared (one replica counts each).
    half_hedges_open: int | None = None  # ingestd_half_hedges
    half_hedges_raised: int = 0  # ingestd_half_hedges_raised_total
    half_hedges_cleared: int = 0  # ingestd_half_hedges_cleared_total
    # Open producer_gaps rows (ingestd.daemon.gaps; the table's count, read by every replica).
    producer_gaps_open: int | None = None  # ingestd_producer_gaps_open

    def observe_parked_closes(self, waiting: int, oldest_age_s: float | None, expired: int) -> None:
        """A sweep of the parked closes: the gauges, and those it moved to dead_letters."""
        self.parked_closes = waiting
        self.parked_close_oldest_age_s = oldest_age_s
        if expired:  # (a Counter entry of 0 would be exported as a type that had some)
            self.dead_letters += expired
            self.events_dead_lettered["position_close"] += expired

    def observe_batch(self, items: Sequence[Item], outcome: BatchOutcome, flush_s: float) -> None:
        """Per committed batch: events by type, dead letters by type, the three histograms."""
        now = time.monotonic()
        self.batch_events.observe(len(items))
        self.flush_seconds.observe(flush_s)
        rejected = outcome.rejected
        if rejected or outcome.dead_letters:
            for it in items:
                ev = it.event
                if ev is None:
                    self.events_dead_lettered[INVALID_TYPE] += 1
                elif id(it) in rejected:
                    self.events_dead_lettered[ev.type] += 1
                else:
                    self.events_written[ev.type] += 1
        else:
            self.events_written.update([it.event.type for it in items if it.event is not None])
        if outcome.inserted.get("spreads"):
            for it in items:
                ev = it.event
                if (
                    ev is not None
                    and ev.values.get("is_stale") == "true"
                    and id(it) not in rejected
                ):
                    self.stale_spreads[str(ev.values["symbol"])] += 1
        self.commit_latency_seconds.observe_ages(now, [it.enqueued_at for it in items])


class _SpoolStats(Protocol):
    @property
    def size_bytes(self) -> int: ...

    @property
    def pending_records(self) -> int: ...

    broken: str | None


class _Sized(Protocol):
    def __len__(self) -> int: ...

    @property
    def max_items(self) -> int:
        """The queue's bound."""


class _MirrorStats(Protocol):
    errors: int
    stale_skipped: collections.Counter[str]

    @property
    def pending(self) -> int:
        """Keys waiting to be written."""


class _StreamStats(Protocol):
    redelivered: int
    claimed: int


class MetricsCollector(Collector):
    """Reads a Service's counters and gauges at scrape time."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        version: str | None = None,
        queue: _Sized | None = None,
        mirror: _MirrorStats | None = None,
        stream: _StreamStats | None = None,
        spool: _SpoolStats | None = None,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        self.metrics = metrics
        self.version = version or package_version()
        self.queue = queue
        self.mirror = mirror
        self.stream = stream
        self.spool = spool
        self.healthy = healthy

    def collect(self) -> Iterator[Metric]:
        """Every ingestd family, built from the current values."""
        m = self.metrics
        info = GaugeMetricFamily(
            PREFIX + "build_info", "ingestd version and Python", labels=["version", "python"]
        )
        info.add_metric([self.version, platform.python_version()], 1.0)
        yield info
        yield _labelled(
            "events_received", "Events queued by a source, by type", "type", m.events_received
        )
        yield _labelled(
            "events_written",
            "Events committed, by type (a redelivered duplicate counts here and in duplicates)",
            "type",
            m.events_written,
        )
        yield _labelled(
            "events_dead_lettered",
            "Events stored in dead_letters, by type (invalid: did not parse)",
            "type",
            m.events_dead_lettered,
        )
        yield _labelled("rows_written", "Rows inserted, by table", "table", m.rows_written)
        yield _labelled(
            "stale_spreads",
            "Spreads stored as stale (inputs too far apart or FX rate too old), by symbol",
            "symbol",
            m.stale_spreads,
        )
        yield _counter("duplicates", "Events that were already stored", m.duplicates)
        yield _counter("batches", "Batches committed", m.batches)
        yield _counter("flush_retries", "Batch commits retried after a failure", m.flush_retries)
        yield _counter("stream_acks", "Stream entries acknowledged (XACK)", m.acks)
        yield _counter(
            "batch_splits",
            "Batches split in halves to isolate an entry the database refused while taking writes",
            m.batch_splits,
        )
        yield _counter(
            "entries_given_up",
            "Entries refused alone pipeline.max_entry_attempts times (dead letter or quarantine)",
            m.entries_given_up,
        )
        yield _counter(
            "quarantined",
            "Entries whose dead letter was refused too: written to the quarantine file",
            m.quarantined,
        )
        yield _histogram("batch_events", "Events per committed batch", m.batch_events)
        yield _histogram(
            "flush_duration_seconds",
            "Time to commit one batch (the successful attempt)",
            m.flush_seconds,
        )
        yield _histogram(
            "commit_latency_seconds",
            "From an event's arrival at ingestd to the commit of its batch",
            m.commit_latency_seconds,
        )
        yield _gauge(
            "stream_pending",
            "Entries delivered to the consumer group and not acknowledged (sampled)",
            m.stream_pending,
        )
        yield _gauge(
            "stream_lag",
            "Entries in the stream not yet delivered to the group (sampled)",
            m.stream_lag,
        )
        yield _gauge("stream_length", "Entries in the stream (sampled)", m.stream_length)
        yield _counter(
            "stream_sample_errors", "Failed samples of the stream's state", m.stream_sample_errors
        )
        yield _gauge(
            "parked_closes",
            "Position closes waiting for their open (sampled; past the age: dead letters)",
            m.parked_closes,
        )
        yield _gauge(
            "parked_close_oldest_age_seconds",
            "How long the oldest parked close has waited for its open (sampled)",
            m.parked_close_oldest_age_s,
        )
        yield _gauge(
            "half_hedges",
            "Positions with an open half-hedge alert (filled legs that do not match; sampled)",
            m.half_hedges_open,
        )
        yield _counter(
            "half_hedges_raised",
            "Half-hedge alerts raised (each once, by the replica that raised it)",
            m.half_hedges_raised,
        )
        yield _counter(
            "half_hedges_cleared",
            "Half-hedge alerts cleared because the missing leg landed",
            m.half_hedges_cleared,
        )
        yield _gauge(
            "producer_gaps_open",
            "Gaps in producers' seq numbers whose events have not arrived (sampled)",
            m.producer_gaps_open,
        )
        yield _gauge(
            "stream_oldest_pending_seconds",
            "Age of the consumer group's oldest unacknowledged entry, by its id (sampled)",
            m.stream_oldest_pending_s,
        )
        yield _gauge(
            "stream_usable",
            "1 while the stream can be read, 0 when its key has the wrong type or reads fail",
            None if self.stream is None else int(m.stream_problem is None),
        )
        spool = self.spool
        yield _gauge(
            "spool_bytes", "Bytes held in the local spool", 0 if spool is None else spool.size_bytes
        )
        yield _gauge(
            "spool_pending_records",
            "Spooled events not yet committed",
            0 if spool is None else spool.pending_records,
        )
        yield _gauge(
            "spool_broken",
            "1 once the spool refuses appends for good (an fsync failed)",
            0 if spool is None or spool.broken is None else 1,
        )
        yield _counter("spooled_events", "In-process events accepted onto the spool", m.spooled)
        yield _counter(
            "spool_rejections",
            "In-process events the spool refused (full or broken): they waited in memory",
            m.spool_rejections,
        )
        if self.queue is not None:
            yield _gauge("queue_depth", "Events waiting in the intake queue", len(self.queue))
            yield _gauge("queue_capacity", "Bound of the intake queue", self.queue.max_items)
        if self.mirror is not None:
            yield _counter("mirror_errors", "Failed writes to the Redis mirror", self.mirror.errors)
            yield _gauge(
                "mirror_pending_keys", "Mirror keys waiting for Redis", self.mirror.pending
            )
            # Every kind of key with a TTL from the first scrape on, so that rate() sees the
            # first skip (a series appearing at 1 has no increase).
            stale = collections.Counter(dict.fromkeys(keys.TTL_KEY_KINDS, 0))
            stale.update(self.mirror.stale_skipped)
            yield _labelled(
                "mirror_stale_skipped",
                "Mirror values not written because their event time is older than their TTL",
                "key_kind",
                stale,
            )
        if self.stream is not None:
            yield _counter(
                "stream_redelivered",
                "Own pending entries re-read at start (after a crash)",
                self.stream.redelivered,
            )
            yield _counter(
                "stream_claimed", "Idle entries claimed from other consumers", self.stream.claimed
            )
        if self.healthy is not None:
            yield _gauge(
                "healthy", "1 unless /healthz would fail (see its reasons)", int(self.healthy())
            )


def _go_float(bound: float) -> str:
    # Prometheus' own spelling of a bucket bound (``1.0``, ``0.005``), as the client library uses.
    return repr(float(bound))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc)
    if value is not None:
        family.add_metric([], float(value))
    return family


def _labelled(
    name: str, doc: str, label: str, values: collections.Counter[str]
) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
    for key, n in sorted(values.items()):
        family.add_metric([key], n)
    return family


def _histogram(name: str, doc: str, h: BulkHistogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(PREFIX + name, doc, buckets=h.cumulative(), sum_value=h.sum)


def package_version() -> str:
    """The installed ingestd's version (``unknown`` when run from a bare source tree)."""
    try:
        return metadata.version("ingestd")
    except metadata.PackageNotFoundError:
        return "unknown"


def create_registry(collector: MetricsCollector) -> CollectorRegistry:
    """A registry of its own with ingestd's families and the process's (CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(namespace=PREFIX.rstrip("_"), registry=registry)
    return registry


def names(families: Iterable[Metric]) -> set[str]:
    """Sample names a scrape of these families contains (for tests and the dashboard check)."""
    return {sample.name for family in families for sample in family.samples}


class _TradingStats(Protocol):
    @property
    def published_state(self) -> str | None:
        """The state this replica last wrote (None: not the writer, or nothing written)."""

    @property
    def transitions(self) -> collections.Counter[tuple[str, str]]:
        """State changes this replica made, by (from, to)."""


class TradingStateCollector(Collector):
    """``ingestd_trading_state{state}`` (1 for the state this replica wrote, 0 for the others;
    all 0 on a replica that is not the writer) and ``ingestd_trading_state_transitions_total``."""

    def __init__(self, keeper: _TradingStats, states: Sequence[str]) -> None:
        self.keeper = keeper
        self.states = tuple(states)

    def collect(self) -> Iterator[Metric]:
        """The two families, from the keeper's current values."""
        current = self.keeper.published_state
        gauge = GaugeMetricFamily(
            PREFIX + "trading_state",
            "trading:state as written by this replica (1 = current; all 0 when not the writer)",
            labels=["state"],
        )
        for state in self.states:
            gauge.add_metric([state], 1.0 if state == current else 0.0)
        yield gauge
        counter = CounterMetricFamily(
            PREFIX + "trading_state_transitions",
            "Changes of trading:state made by this replica, by from and to",
            labels=["from", "to"],
        )
        for (old, new), n in sorted(self.keeper.transitions.items()):
            counter.add_metric([old, new], n)
        yield counter
