"""The metric families: bulk histograms agree with the client library's, names and labels."""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingestd.daemon import metrics
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.wire.events import normalize


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed back from the text format."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def library_histogram(values: list[float], bounds: tuple[float, ...]) -> dict[str, float]:
    reg = CollectorRegistry()
    h = Histogram("ingestd_reference", "reference", buckets=bounds, registry=reg)
    for v in values:
        h.observe(v)
    return {
        dict(labels).get("le", name): value
        for (name, labels), value in scrape(reg).items()
        if name.startswith("ingestd_reference_") and not name.endswith("_created")
    }


def ours(h: metrics.BulkHistogram) -> dict[str, float]:
    out = dict(h.cumulative())
    out["ingestd_reference_sum"] = h.sum
    out["ingestd_reference_count"] = float(h.count)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_observe_ages_matches_one_observation_at_a_time(seed: int) -> None:
    rng = random.Random(seed)
    now = 1000.0
    # Arrival times nearly in order (a few swapped), with ties, spread over every bucket. (Ages
    # exactly on a bound are left out: ``now - t`` and ``now - b`` round differently there.)
    ages_drawn = [rng.expovariate(1.0) * rng.choice([0.01, 1.0, 30.0]) for _ in range(500)]
    ages_drawn += ages_drawn[:50]
    started = sorted(now - a for a in ages_drawn)
    started[10:20] = reversed(started[10:20])
    ages = [now - t for t in started]
    bulk = metrics.BulkHistogram(metrics.LATENCY_BUCKETS)
    bulk.observe_ages(now, list(started))
    want = library_histogram(ages, metrics.LATENCY_BUCKETS)
    got = ours(bulk)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_observe_matches_the_library() -> None:
    values = [0.0, 0.005, 0.0051, 1.0, 59.9, 60.0, 61.0, 3.3]
    bulk = metrics.BulkHistogram(metrics.LATENCY_BUCKETS)
    for v in values:
        bulk.observe(v)
    assert ours(bulk) == pytest.approx(library_histogram(values, metrics.LATENCY_BUCKETS))


def test_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.BulkHistogram((1.0, 1.0, 2.0))


class _Source:
    name = "test"

    async def acknowledge(self, items: Any, outcome: Any) -> None:
        """Nothing to acknowledge."""

    def dead_letter_key(self, item: Item) -> str | None:
        return None


def _item(ev: dict[str, Any] | None, enqueued_at: float) -> Item:
    return Item(None if ev is None else normalize(ev), None, _Source(), None, None, enqueued_at)


FX = {
    "type": "fx_rate",
    "event_id": "fx-1",
    "pair": "USDKRW",
    "rate": "1385.5",
    "timestamp": "2025-11-15T03:40:15Z",
}
HB = {
    "type": "heartbeat",
    "event_id": "hb-1",
    "component": "c",
    "timestamp": "2025-11-15T03:40:15Z",
}


def test_observe_batch_counts_by_type() -> None:
    m = metrics.Metrics()
    items = [_item(FX, 1.0), _item(FX, 1.0), _item(HB, 1.0)]
    m.observe_batch(items, BatchOutcome(), 0.01)
    bad, rejected, good = _item(None, 2.0), _item(FX, 2.0), _item(HB, 2.0)
    outcome = BatchOutcome(dead_letters=2)
    outcome.reject(rejected, "database rejected the row")
    m.observe_batch([bad, rejected, good], outcome, 0.02)
    assert m.events_written == {"fx_rate": 2, "heartbeat": 2}
    assert m.events_dead_lettered == {"invalid": 1, "fx_rate": 1}
    assert m.batch_events.count == 2 and m.batch_events.sum == 6
    assert m.flush_seconds.count == 2 and m.flush_seconds.sum == pytest.approx(0.03)
    assert m.commit_latency_seconds.count == 6


class _Queue:
    max_items = 100

    def __len__(self) -> int:
        return 7


class _Mirror:
    errors = 3
    pending = 2

    def __init__(self) -> None:
        self.stale_skipped = collections.Counter({"fx": 4})


class _Stream:
    redelivered = 5
    claimed = 4


class _Spool:
    size_bytes = 123
    pending_records = 3
    broken: str | None = None


def test_collector_exports_every_family_with_the_prefix() -> None:
    m = metrics.Metrics()
    m.events_received.update({"spread": 10, "invalid": 1})
    m.rows_written["spreads"] = 9
    m.duplicates, m.batches, m.flush_retries, m.acks = 1, 2, 3, 11
    m.stream_pending, m.stream_lag, m.stream_length = 4, 0, 40
    m.spooled, m.spool_rejections = 6, 2
    registry = metrics.create_registry(
        metrics.MetricsCollector(
            m,
            version="9.9.9",
            queue=_Queue(),
            mirror=_Mirror(),
            stream=_Stream(),
            spool=_Spool(),
            healthy=lambda: False,
        )
    )
    samples = scrape(registry)
    assert all(name.startswith("ingestd_") for name, _ in samples)
    got = {name: value for (name, labels), value in samples.items() if not labels}
    labelled = {(name, labels): value for (name, labels), value in samples.items() if labels}
    assert labelled[("ingestd_events_received_total", (("type", "spread"),))] == 10
    assert labelled[("ingestd_events_received_total", (("type", "invalid"),))] == 1
    assert labelled[("ingestd_rows_written_total", (("table", "spreads"),))] == 9
    build = [k for k in labelled if k[0] == "ingestd_build_info"]
    assert dict(build[0][1])["version"] == "9.9.9"
    assert got["ingestd_duplicates_total"] == 1
    assert got["ingestd_batches_total"] == 2
    assert got["ingestd_flush_retries_total"] == 3
    assert got["ingestd_stream_acks_total"] == 11
    assert got["ingestd_stream_pending"] == 4
    assert got["ingestd_stream_lag"] == 0
    assert got["ingestd_stream_length"] == 40
    assert got["ingestd_spool_bytes"] == 123
    assert got["ingestd_spool_pending_records"] == 3
    assert got["ingestd_spool_broken"] == 0
    assert got["ingestd_spooled_events_total"] == 6
    assert got["ingestd_spool_rejections_total"] == 2
    assert got["ingestd_queue_depth"] == 7
    assert got["ingestd_queue_capacity"] == 100
    assert got["ingestd_mirror_errors_total"] == 3
    assert got["ingestd_mirror_pending_keys"] == 2
    stale = {k[1]: v for k, v in labelled.items() if k[0] == "ingestd_mirror_stale_skipped_total"}
    # Every kind with a TTL is there from the start, counted or not.
    assert stale == {
        (("key_kind", "fx"),): 4,
        (("key_kind", "spread"),): 0,
        (("key_kind", "health"),): 0,
    }
    assert got["ingestd_stream_redelivered_total"] == 5
    assert got["ingestd_stream_claimed_total"] == 4
    assert got["ingestd_healthy"] == 0
    assert got["ingestd_process_resident_memory_bytes"] > 0
    for h in ("batch_events", "flush_duration_seconds", "commit_latency_seconds"):
        assert got[f"ingestd_{h}_count"] == 0


def test_registries_of_two_services_are_independent() -> None:
    a, b = metrics.Metrics(), metrics.Metrics()
    ra = metrics.create_registry(metrics.MetricsCollector(a))
    rb = metrics.create_registry(metrics.MetricsCollector(b))
    a.batches = 5
    assert scrape(ra)[("ingestd_batches_total", ())] == 5
    assert scrape(rb)[("ingestd_batches_total", ())] == 0


def test_unsampled_gauges_have_no_sample() -> None:
    samples = scrape(metrics.create_registry(metrics.MetricsCollector(metrics.Metrics())))
    assert ("ingestd_stream_lag", ()) not in samples
    assert ("ingestd_spool_bytes", ()) in samples
