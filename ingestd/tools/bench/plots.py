"""PNG plots of a bench run, drawn with matplotlib's Agg backend when matplotlib is installed
(``pip install 'ingestd[bench]'``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ingestd.tools.bench.report import P99_TARGET_MS, RSS_TARGET_MIB, Report

MISSING: str = (
    "plots: matplotlib is not installed, so no PNGs were written "
    "(pip install 'ingestd[bench]' adds it)"
)


def available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401, PLC0415 - only whether it imports
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    # Imported on use: matplotlib is an optional extra, and slow to import.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt  # noqa: PLC0415

    # Its font-cache and unit-conversion notices are not the bench's output.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)

    return plt


def _subtitle(report: Report) -> str:
    m = report.machine
    return (
        f"{m.get('cpu_count')} CPUs ({m.get('cpu_model')}), PostgreSQL {m.get('postgresql')}, "
        f"Redis {m.get('redis')}; {m.get('started', '')[:16]}"
    )


def _save(plt: Any, fig: Any, path: Path, report: Report) -> str:
    fig.text(0.01, 0.005, _subtitle(report), fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def throughput_vs_batch_size(plt: Any, report: Report, path: Path) -> str | None:
    """events/s of stream -> DB (mix) against batch_max_rows, with the raw-writer line."""
    runs = report.batch_sweep
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sizes = [p.details["batch_max_rows"] for p in runs]
    ax.plot(sizes, [p.rate for p in runs], "o-", label="ingestd via the stream (mix)")
    ceiling = report.mix_ceiling
    if ceiling is not None:
        ax.axhline(ceiling.rate, color="black", ls="--", lw=1, label="raw writer (A), same run")
        for size, p in zip(sizes, runs, strict=True):
            ax.annotate(
                f"{p.rate / ceiling.rate:.2f}x",
                (size, p.rate),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.set_xlabel("pipeline.batch_max_rows")
    ax.set_ylabel("events/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput vs batch size")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path, report)


def latency_vs_load(plt: Any, report: Report, path: Path) -> str | None:
    """p50/p95/p99 submit->commit against the paced load, one line per grid setting."""
    if not report.latency:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), sharey=True)
    grid = sorted(
        {(x.settings["batch_max_rows"], x.settings["batch_max_age_ms"]) for x in report.latency}
    )
    for ax, pct in zip(axes, (50, 95, 99), strict=True):
        for rows, age in grid:
            runs = sorted(
                (
                    x
                    for x in report.latency
                    if (x.settings["batch_max_rows"], x.settings["batch_max_age_ms"]) == (rows, age)
                ),
                key=lambda x: x.target_rate,
            )
            ax.plot(
                [x.target_rate for x in runs],
                [1000 * x.percentile(pct) for x in runs],
                "o-",
                label=f"rows {rows}, age {age} ms",
            )
        for x in report.stream_latency:
            ax.plot(x.target_rate, 1000 * x.percentile(pct), "k^", ms=7)
        ax.axhline(P99_TARGET_MS, color="red", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        loads = sorted({x.target_rate for x in report.latency})
        ax.set_xticks(loads, [f"{x:,.0f}" for x in loads])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(f"p{pct}")
        ax.set_xlabel("paced load, events/s")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("submit -> commit, ms (▲ stream XADD -> commit)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Latency percentiles vs load (red: 250 ms)")
    return _save(plt, fig, path, report)


def scaling(plt: Any, report: Report, path: Path) -> str | None:
    """events/s against replicas in one group, and against writers, as ratios to the raw writer."""
    if not report.replica_sweep and not report.writer_sweep:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    ceiling = report.mix_ceiling
    for ax, runs, key, title in (
        (axes[0], report.replica_sweep, "replicas", "ingestd run replicas, one consumer group"),
        (axes[1], report.writer_sweep, "writers", "pipeline.writers (pool = writers + 1)"),
    ):
        if runs:
            xs = [p.details[key] for p in runs]
            ax.bar(range(len(xs)), [p.rate for p in runs], color="tab:blue")
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            if ceiling is not None:
                ax.axhline(ceiling.rate, color="black", ls="--", lw=1)
                ax.text(-0.4, ceiling.rate, "raw writer (A), same run", va="bottom", fontsize=8)
                ax.set_ylim(top=ceiling.rate * 1.12)
                for i, p in enumerate(runs):
                    ax.annotate(
                        f"{p.rate / ceiling.rate:.2f}x", (i, p.rate), ha="center", va="bottom"
                    )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(key)
        ax.set_ylabel("events/s")
    fig.suptitle("Scaling (realistic mix)")
    return _save(plt, fig, path, report)


def memory(plt: Any, report: Report, path: Path) -> str | None:
    """Resident set of the ingestd run process over the memory run."""
    m = report.memory
    if m is None or not m.details.get("rss_samples"):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    samples = m.details["rss_samples"]
    ax.plot([t for t, _ in samples], [v for _, v in samples], "-")
    ax.axhline(RSS_TARGET_MIB, color="red", ls=":", lw=1, label="200 MiB target")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"ingestd run RSS, {m.events:,} events through the stream")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path, report)


def write_plots(report: Report, directory: str) -> list[str]:
    """Write every plot the run has data for into ``directory``; the paths written."""
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        throughput_vs_batch_size(plt, report, out / "throughput_vs_batch_size.png"),
        latency_vs_load(plt, report, out / "latency_vs_load.png"),
        scaling(plt, report, out / "scaling.png"),
        memory(plt, report, out / "memory_rss.png"),
    ]
    return [p for p in written if p is not None]
