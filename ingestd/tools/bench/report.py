"""The bench's results in one place, printed as a table (ratios first), and as JSON."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from ingestd.tools.bench.results import LatencyResult, PhaseResult
from ingestd.tools.bench.startup import AIM_S, StartupResult

P99_TARGET_MS: Final = 250.0
P99_TARGET_RATE: Final = 5_000.0
RSS_TARGET_MIB: Final = 200.0
STREAM_RATIO_TARGET: Final = 0.8

# Each throughput phase is a ratio to the ceiling of its workload, measured in the same run.
CEILING_OF: Final = {
    "server_copy": "copy",
    "submit": "copy",
    "submit_many": "copy",
    "stream": "copy",
    "insert": "copy",
    "executemany": "copy",
    "multirow": "copy",
    "mix_submit": "mix_copy",
    "mix_submit_many": "mix_copy",
    "mix_stream": "mix_copy",
}
SPREAD_ROWS: Final = (
    ("a", "copy"),
    ("a2", "server_copy"),
    ("b", "submit"),
    ("b'", "submit_many"),
    ("c", "stream"),
    ("d", "insert"),
    ("e", "executemany"),
    ("f", "multirow"),
)
MIX_ROWS: Final = (
    ("A", "mix_copy"),
    ("B", "mix_submit"),
    ("B'", "mix_submit_many"),
    ("C", "mix_stream"),
)


@dataclasses.dataclass(slots=True)
class Report:
    """Everything one ``ingestd bench`` run measured."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    options: dict[str, Any]
    mix: dict[str, Any] = dataclasses.field(default_factory=dict)
    phases: dict[str, PhaseResult] = dataclasses.field(default_factory=dict)
    batch_sweep: list[PhaseResult] = dataclasses.field(default_factory=list)
    writer_sweep: list[PhaseResult] = dataclasses.field(default_factory=list)
    replica_sweep: list[PhaseResult] = dataclasses.field(default_factory=list)
    latency: list[LatencyResult] = dataclasses.field(default_factory=list)
    stream_latency: list[LatencyResult] = dataclasses.field(default_factory=list)
    memory: PhaseResult | None = None
    startup: StartupResult | None = None
    plots: list[str] = dataclasses.field(default_factory=list)
    plots_note: str | None = None

    @property
    def mix_ceiling(self) -> PhaseResult | None:
        """The raw writer of the mix: the reference of mix, sweep and replica phases."""
        return self.phases.get("mix_copy")

    def ratio(self, result: PhaseResult, reference: str | None = None) -> float | None:
        """``result``'s events/s over its ceiling's, when that ceiling ran in this run."""
        key = reference or CEILING_OF.get(result.key)
        if key is None:
            return 1.0  # a ceiling itself
        ref = self.phases.get(key)
        if ref is None or ref.rate <= 0:
            return None
        mine = result.details.get("rounds_events_per_s")
        theirs = ref.details.get("rounds_events_per_s")
        if mine and theirs and len(mine) == len(theirs):
            # Repeated rounds: the median of each round's ratio (both measured minutes apart).
            ratios: list[float] = [a / b for a, b in zip(mine, theirs, strict=True)]
            return statistics.median(ratios)
        return result.rate / ref.rate

    def all_verified(self) -> bool:
        """True when every phase that ran checked its rows."""
        runs: list[PhaseResult | LatencyResult] = [
            *self.phases.values(),
            *self.batch_sweep,
            *self.writer_sweep,
            *self.replica_sweep,
            *self.latency,
            *self.stream_latency,
        ]
        if self.memory is not None:
            runs.append(self.memory)
        return all(r.verified for r in runs)

    def p99_winners(self) -> list[LatencyResult]:
        """The grid settings whose p99 submit->commit is under 250 ms at 5k events/s."""
        return [
            r
            for r in self.latency
            if r.target_rate == P99_TARGET_RATE
            and r.sustained
            and r.kept_up
            and 1000 * r.percentile(99) < P99_TARGET_MS
        ]

    def headline(self) -> dict[str, Any]:
        """The figures the issue asks about."""
        out: dict[str, Any] = {}
        for key in ("mix_stream", "stream", "mix_submit", "submit"):
            if key in self.phases:
                out[f"{key}/ceiling"] = self.ratio(self.phases[key])
        if self.latency:
            best = [r for r in self.latency if r.target_rate == P99_TARGET_RATE]
            if best:
                top = min(best, key=lambda r: r.percentile(99))
                out["best_p99_ms_at_5k"] = 1000 * top.percentile(99)
                out["best_p99_setting"] = {
                    "batch_max_rows": top.settings["batch_max_rows"],
                    "batch_max_age_ms": top.settings["batch_max_age_ms"],
                }
            out["p99_under_250ms_at_5k"] = [
                {k: r.settings[k] for k in ("batch_max_rows", "batch_max_age_ms")}
                for r in self.p99_winners()
            ]
        if self.memory is not None:
            out["peak_rss_mib"] = self.memory.details["peak_rss_mib"]
        return out

    def to_json(self) -> dict[str, Any]:
        """The whole report as JSON."""

        def with_ratio(r: PhaseResult, reference: str | None = None) -> dict[str, Any]:
            return {**r.to_json(), "ratio_to_ceiling": self.ratio(r, reference)}

        return {
            "machine": self.machine,
            "settings": self.settings,
            "options": self.options,
            "mix": self.mix,
            "headline": self.headline(),
            "phases": {k: with_ratio(p) for k, p in self.phases.items()},
            "ceilings": {k: v for k, v in CEILING_OF.items() if k in self.phases},
            "scaling": {
                "batch_max_rows": [with_ratio(p, "mix_copy") for p in self.batch_sweep],
                "writers": [with_ratio(p, "mix_copy") for p in self.writer_sweep],
                "replicas": [with_ratio(p, "mix_copy") for p in self.replica_sweep],
            },
            "latency": {
                "submit_to_commit": [r.to_json() for r in self.latency],
                "stream_xadd_to_commit": [r.to_json() for r in self.stream_latency],
            },
            "memory": None if self.memory is None else self.memory.to_json(),
            "startup": None if self.startup is None else self.startup.to_json(),
            "plots": self.plots,
            "plots_note": self.plots_note,
            "verified": self.all_verified(),
        }

    def write_json(self, path: str) -> None:
        """Write the JSON document."""
        Path(path).write_bytes(orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2) + b"\n")


def _fmt_ratio(x: float | None) -> str:
    return "    -" if x is None or math.isnan(x) else f"{x:5.2f}"


def _fmt_ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{1000 * x:.0f}"


def _per_100k(seconds: float | None, events: int) -> str:
    return "-" if seconds is None or events <= 0 else f"{seconds * 100_000 / events:.2f}"


def _phase_line(tag: str, p: PhaseResult, ratio: float | None) -> str:
    split = p.cpu_split or {}
    cpu = "".join(
        f"{_per_100k(split.get(k), p.events):>7}" for k in ("process_s", "postgresql_s", "redis_s")
    )
    ok = "ok" if p.verified else "NOT VERIFIED"
    return (
        f"  ({tag:<2}) {p.label:<48} {_fmt_ratio(ratio)}  {p.rate:>10,.0f} {p.events:>9,} "
        f"{p.seconds:>7.2f} {cpu}  {ok}"
    )


_HEAD: Final = (
    f"  {'':<53} {'ratio':>5}  {'events/s':>10} {'events':>9} {'seconds':>7}"
    "  CPU s per 100k events\n"
    f"  {'':<53} {'':>5}  {'':>10} {'':>9} {'':>7} {'bench':>7}{'PG':>7}{'Redis':>7}"
)


def _machine_lines(r: Report) -> list[str]:
    m = r.machine
    pg = m.get("postgresql_settings", {})
    pg_line = ", ".join(f"{k} {v}" for k, v in pg.items())
    load = m.get("load_average", {})
    flavour = f"TimescaleDB {m['timescaledb']}" if m.get("timescaledb") else "plain"
    lines = [
        f"ingestd bench  {m.get('started', '')}",
        f"machine: {m.get('cpu_count')} CPUs ({m.get('cpu_model')}), "
        f"{m.get('memory_gib', 0):.1f} GiB, {m.get('platform')}",
        f"PostgreSQL {m.get('postgresql')} ({flavour}): {pg_line}",
        f"Redis {m.get('redis')}; Python {m.get('python')}, asyncpg {m.get('asyncpg')}, "
        f"redis-py {m.get('redis_py')}, hiredis {m.get('hiredis')}, loop {m.get('event_loop')}",
        f"load average (1/5/15 min) before: {load.get('before')}, after: {load.get('after')}",
    ]
    s = r.settings
    lines.append(
        f"settings: batch_max_rows {s['batch_max_rows']}, "
        f"batch_max_age_ms {s['batch_max_age_ms']}, "
        f"writers {s['writers']}, pool_max_size {s['pool_max_size']}, "
        f"queue_max_events {s['queue_max_events']}, stream read_count {s['stream_read_count']}"
    )
    return lines


QUICK_NOTE: Final = (
    "--quick: sizes too small for the targets (start-up and the first batches dominate); "
    "not judged against them"
)


def _judged(r: Report) -> bool:
    """Whether the figures are compared with the targets: not for ``--quick`` sizes."""
    return not r.options.get("quick", False)


def _target(r: Report, text: str) -> str:
    """`` (target ...)`` after a figure, or nothing for a quick run."""
    return f" (target {text})" if _judged(r) else ""


def _headline_lines(r: Report) -> list[str]:
    lines = ["", "Headline (ratios measured in this run)"]
    if not _judged(r):
        lines.append(f"  {QUICK_NOTE}")
    h = r.headline()
    names = {
        "mix_stream/ceiling": "stream -> DB, mix, vs raw writer" + _target(r, ">= 0.80"),
        "stream/ceiling": "stream -> DB, spreads only, vs binary COPY",
        "mix_submit/ceiling": "in-process submit, mix, vs raw writer",
        "submit/ceiling": "in-process submit, spreads only, vs binary COPY",
    }
    for key, text in names.items():
        if key in h:
            lines.append(f"  {text:<58} {_fmt_ratio(h[key])}")
    if "best_p99_ms_at_5k" in h:
        best = h["best_p99_setting"]
        lines.append(
            f"  {'best p99 submit->commit at 5k events/s' + _target(r, '< 250 ms'):<58} "
            f"{h['best_p99_ms_at_5k']:5.0f} ms  (batch_max_rows {best['batch_max_rows']}, "
            f"batch_max_age_ms {best['batch_max_age_ms']})"
        )
    if r.memory is not None:
        peak = r.memory.details["peak_rss_mib"]
        shown = "unknown" if peak is None else f"{peak:5.0f} MiB"
        label = f"peak RSS of ingestd run, {r.memory.events:,} events" + _target(r, "< 200 MiB")
        lines.append(f"  {label:<58} {shown}")
    if r.startup is not None:
        s = r.startup
        runs = ", ".join(f"{x:.2f}" for x in s.first_row_s)
        lines.append(
            f"  {f'ingestd run to first committed row (aim <= {AIM_S:g} s)':<58} "
            f"{s.median_s:5.2f} s  (median of {runs}; {s.events:,} events waiting; "
            f"first run {s.first_run_s:.2f} s)"
        )
    return lines


def _throughput_lines(r: Report) -> list[str]:
    lines: list[str] = []
    repeat = r.options.get("repeat", 1)
    rounds = f"; median of {repeat} rounds" if repeat > 1 else ""
    spread_phases = [(t, r.phases[k]) for t, k in SPREAD_ROWS if k in r.phases]
    if spread_phases:
        n = r.options["events"]
        lines += ["", f"Throughput, spreads only ({n:,} events; ratio to (a){rounds})", _HEAD]
        lines += [_phase_line(t, p, r.ratio(p)) for t, p in spread_phases]
    mix_phases = [(t, r.phases[k]) for t, k in MIX_ROWS if k in r.phases]
    if mix_phases:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in r.mix.get("shares", {}).items())
        lines += [
            "",
            f"Throughput, realistic mix ({r.options['events']:,} events: {shares}; "
            f"ratio to (A){rounds})",
            _HEAD,
        ]
        lines += [_phase_line(t, p, r.ratio(p)) for t, p in mix_phases]
    return lines


def _latency_lines(r: Report) -> list[str]:
    lines: list[str] = []
    if r.latency:
        loads = sorted({x.target_rate for x in r.latency})
        grid = sorted(
            {(x.settings["batch_max_rows"], x.settings["batch_max_age_ms"]) for x in r.latency}
        )
        lines += [
            "",
            "Latency submit -> commit, open-loop paced load: p50 / p95 / p99 ms "
            "(* pacer fell short of the rate, ! commits fell behind it: saturated)",
            f"  {'batch_max_rows':>14} {'age_ms':>6}  "
            + "".join(f"{f'{x:,.0f}/s':>20}" for x in loads),
        ]
        for rows, age in grid:
            cells = []
            for load in loads:
                hit = [
                    x
                    for x in r.latency
                    if x.target_rate == load
                    and (x.settings["batch_max_rows"], x.settings["batch_max_age_ms"])
                    == (rows, age)
                ]
                if not hit:
                    cells.append(f"{'-':>20}")
                    continue
                x = hit[0]
                text = "/".join(_fmt_ms(x.percentile(p)) for p in (50, 95, 99))
                mark = ("" if x.sustained else "*") + ("" if x.kept_up else "!")
                cells.append(f"{text + mark:>20}")
            lines.append(f"  {rows:>14} {age:>6}  " + "".join(cells))
        winners = r.p99_winners()
        if _judged(r) and any(x.target_rate == P99_TARGET_RATE for x in r.latency):
            shown = (
                ", ".join(
                    f"{w.settings['batch_max_rows']}/{w.settings['batch_max_age_ms']} ms"
                    for w in winners
                )
                or "none"
            )
            lines.append(f"  p99 < 250 ms at 5,000/s (rows/age): {shown}")
    if r.stream_latency:
        lines += ["", "Latency XADD -> commit through the stream (producer process, paced): ms"]
        for x in r.stream_latency:
            lines.append(
                f"  {x.target_rate:>8,.0f}/s (sent {x.achieved_rate:,.0f}/s, "
                f"committed {x.completed_rate:,.0f}/s): "
                + "  ".join(f"p{p} {_fmt_ms(x.percentile(p))}" for p in (50, 95, 99))
                + f"  max {_fmt_ms(max(x.latencies_s) if x.latencies_s else math.nan)}"
                + f"  (batch_max_rows {x.settings['batch_max_rows']}, "
                f"age {x.settings['batch_max_age_ms']} ms)"
            )
    return lines


def _sweep_lines(r: Report, name: str, runs: Sequence[PhaseResult], value: str) -> list[str]:
    if not runs:
        return []
    return [
        f"  {name:<16}" + "".join(f"{p.details[value]:>10,}" for p in runs),
        f"  {'ratio':<16}" + "".join(f"{_fmt_ratio(r.ratio(p, 'mix_copy')):>10}" for p in runs),
        f"  {'events/s':<16}" + "".join(f"{p.rate:>10,.0f}" for p in runs),
    ]


def _scaling_lines(r: Report) -> list[str]:
    lines: list[str] = []
    if r.batch_sweep or r.writer_sweep:
        lines += [
            "",
            f"Scaling, ingestd via the stream, mix ({r.options['scaling_events']:,} events "
            "pre-filled; ratio to (A))",
        ]
        lines += _sweep_lines(r, "batch_max_rows", r.batch_sweep, "batch_max_rows")
        lines += _sweep_lines(r, "writers", r.writer_sweep, "writers")
    if r.replica_sweep:
        lines += [
            "",
            f"Scaling, ingestd run replicas in one group ({r.options['replica_events']:,} events "
            "pre-filled; ratio to (A))",
        ]
        lines += _sweep_lines(r, "replicas", r.replica_sweep, "replicas")
    if r.memory is not None:
        m = r.memory
        peak = m.details["peak_rss_mib"]
        lines += [
            "",
            f"Memory: {m.events:,} events through the stream into one ingestd run: peak RSS "
            + ("unknown" if peak is None else f"{peak:.0f} MiB")
            + _target(r, "< 200")
            + f", {m.rate:,.0f} events/s with the producer running alongside",
        ]
    return lines


def format_table(r: Report) -> str:
    """The human-readable report: machine, headline ratios, then each section."""
    lines = _machine_lines(r) + _headline_lines(r) + _throughput_lines(r)
    lines += _latency_lines(r) + _scaling_lines(r)
    if not _judged(r):
        lines += ["", QUICK_NOTE + "; run without --quick to compare with the targets"]
    lines.append("")
    lines.append(
        "every phase verified (row counts, exact Decimal sums, no dead letters, 0 pending)"
        if r.all_verified()
        else "SOME PHASES NOT VERIFIED"
    )
    if r.plots:
        lines.append("plots: " + ", ".join(r.plots))
    if r.plots_note:
        lines.append(r.plots_note)
    return "\n".join(lines)
