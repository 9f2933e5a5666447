"""The bench's printed report: a ``--quick`` run is a smoke check, and says so instead of printing
its small-size figures against the targets of a full run."""

from __future__ import annotations

from ingestd.tools.bench import options
from ingestd.tools.bench.report import QUICK_NOTE, Report, format_table
from ingestd.tools.bench.results import PhaseResult

SETTINGS = {
    "batch_max_rows": 5000,
    "batch_max_age_ms": 50,
    "writers": 2,
    "pool_max_size": 4,
    "queue_max_events": 100_000,
    "stream_read_count": 1000,
}


def _report(chosen: options.Options) -> Report:
    report = Report(machine={}, settings=SETTINGS, options=chosen.to_json())
    for key, seconds in (("copy", 1.0), ("mix_copy", 1.0), ("mix_stream", 2.5), ("stream", 2.0)):
        report.phases[key] = PhaseResult(key, key, chosen.events, seconds, verified=True)
    report.memory = PhaseResult(
        "memory", "memory", chosen.memory_events, 1.0, details={"peak_rss_mib": 90.0}, verified=True
    )
    return report


def test_a_quick_run_is_not_judged_against_the_targets() -> None:
    text = format_table(_report(options.QUICK))
    assert QUICK_NOTE in text
    assert "(target" not in text, text
    assert " 0.40" in text  # the ratios themselves are still shown
    assert "every phase verified" in text


def test_a_full_run_shows_its_figures_against_the_targets() -> None:
    text = format_table(_report(options.Options()))
    assert QUICK_NOTE not in text
    assert "(target >= 0.80)" in text and "(target < 200 MiB)" in text
