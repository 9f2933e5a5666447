"""``ingestd bench``: every phase in one run, on scratch resources, each one verified.

The run creates a scratch database (created, migrated, dropped at the end), scratch stream keys
and a scratch mirror key prefix (deleted at the end), so a bench never touches production data.
Absolute numbers drift from run to run on shared machines; every ratio compares two phases of
the same run against the same servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncpg
import redis
import redis.asyncio as aioredis

from ingestd.clients import redis_async
from ingestd.daemon import db, migrations
from ingestd.daemon.app import GC_THRESHOLDS
from ingestd.errors import ConfigError
from ingestd.settings import Settings, redact
from ingestd.tools.bench import latency, plots, scaling, throughput
from ingestd.tools.bench.cpu import CpuSplit
from ingestd.tools.bench.machine import load_average, machine_info
from ingestd.tools.bench.memory import memory_run
from ingestd.tools.bench.options import Options
from ingestd.tools.bench.producer import fill_stream
from ingestd.tools.bench.report import Report, format_table
from ingestd.tools.bench.results import LatencyResult, PhaseResult
from ingestd.tools.bench.scratch import (
    DB_NAME,
    BenchFailed,
    delete_keys,
    drop_database,
    last_entry_id,
    recreate_database,
    reset_tables,
    scratch_dsn,
    stream_pending,
    verify,
)
from ingestd.tools.bench.startup import startup_run
from ingestd.tools.bench.workload import (
    Expected,
    Workload,
    make_mix,
    make_spreads,
    raw_batches,
    write_jsonl,
    write_spreads_csv,
)

log = logging.getLogger("ingestd.tools.bench")

MIN_OUTSTANDING_SUBMITS: Final = 10_000
STREAM_BLOCK_MS: Final = 100


T = TypeVar("T", PhaseResult, LatencyResult)


@dataclasses.dataclass(slots=True)
class StreamRun:
    """One stream phase's scratch key, settings and input file."""

    key: str
    settings: Settings
    jsonl: Path
    fill_s: float | None = None


class Bench:
    """One bench run: its scratch resources, workloads and results."""

    def __init__(self, settings: Settings, options: Options) -> None:
        self.options = options
        self.base_dsn = settings.storage.postgres.dsn
        self.dsn = scratch_dsn(self.base_dsn, options.scratch_database)
        tag = uuid.uuid4().hex[:12]
        # Mirror keys, ingestd's heartbeat and every stream of the run live under this prefix.
        self.prefix = f"ingestd:bench:{tag}:"
        self.group = f"bench-{tag}"
        # No maintenance rounds (view refreshes) inside the timed runs: they would perturb them.
        self.settings = settings.replace(
            **{
                "storage.postgres.dsn": self.dsn,
                "storage.redis.key_prefix": self.prefix,
                "maintenance.enabled": False,
                "stream.group": self.group,
                "stream.consumer": "bench",
                "stream.block_ms": STREAM_BLOCK_MS,
            }
        ).check()
        self.workdir = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
        # The server reads the CSV of (a2) from here (as its own OS user).
        self.workdir.chmod(0o755)
        self.redis: aioredis.Redis = redis_async(settings.storage.redis.url, socket_timeout_s=30.0)
        self.conn: asyncpg.Connection | None = None
        self.cpu: CpuSplit | None = None
        self.report = Report(machine={}, settings=self._settings_json(), options=options.to_json())
        self._streams = 0

    def _settings_json(self) -> dict[str, Any]:
        p = self.settings.pipeline
        return {
            "batch_max_rows": p.batch_max_rows,
            "batch_max_age_ms": p.batch_max_age_ms,
            "writers": p.writers,
            "queue_max_events": p.queue_max_events,
            "pool_max_size": self.settings.storage.postgres.pool_max_size,
            "stream_read_count": self.settings.stream.read_count,
            "stream_block_ms": STREAM_BLOCK_MS,
            "outstanding_submits": scaling.outstanding_for(self.settings, MIN_OUTSTANDING_SUBMITS),
        }

    def stream_key(self, name: str) -> str:
        """A fresh scratch stream key under the run's prefix."""
        self._streams += 1
        return f"{self.prefix}stream:{self._streams}:" + re.sub(r"[^a-z0-9]+", "-", name.lower())

    def stream_settings(self, key: str, settings: Settings | None = None) -> Settings:
        """``settings`` (default: the bench's) reading ``key``."""
        return (settings or self.settings).replace(**{"stream.key": key}).check()

    @property
    def db(self) -> asyncpg.Connection:
        """The bench's own connection to the scratch database."""
        assert self.conn is not None
        return self.conn

    def deadline(self, n: int) -> float:
        """How long a phase of ``n`` events may take before the bench calls it stuck."""
        return max(120.0, n / 500)

    async def measured(
        self, label: str, expected: Expected, run: Awaitable[T], *, ingestd: bool = True
    ) -> T:
        """Empty the tables, run one phase, verify its rows; the result, marked verified."""
        await reset_tables(self.db)
        settle_memory()
        log.info("%s: running", label, extra={"action": "bench_phase"})
        result = await run
        await verify(self.db, label, expected, ingestd=ingestd)
        result.verified = True
        return result

    async def open_stream(
        self, label: str, workload: Workload, *, fill: bool, settings: Settings | None = None
    ) -> StreamRun:
        """A stream phase's set-up: empty tables, a fresh key, optionally filled beforehand."""
        key = self.stream_key(label)
        jsonl = self.workdir / f"stream-{self._streams}.jsonl"
        await asyncio.to_thread(write_jsonl, jsonl, workload.events)
        await reset_tables(self.db)
        run = StreamRun(key, self.stream_settings(key, settings), jsonl)
        if fill:
            n = len(workload.events)
            url = self.settings.storage.redis.url
            run.fill_s = await fill_stream(label, url, key, jsonl, self.deadline(n))
            length = await self.redis.xlen(key)
            if length != n:
                raise BenchFailed(f"{label}: the stream holds {length} entries, expected {n}")
            log.info("%s: stream filled in %.2fs", label, run.fill_s, extra={"action": "bench"})
        settle_memory()
        log.info("%s: running", label, extra={"action": "bench_phase"})
        return run

    async def close_stream(self, label: str, workload: Workload, run: StreamRun, result: T) -> T:
        """A stream phase's checks: nothing pending, the rows right; then its key removed."""
        pending = await stream_pending(self.redis, run.key, self.group)
        if pending:
            raise BenchFailed(f"{label}: {pending} entries still pending after stop")
        await verify(self.db, label, workload.expected)
        result.verified = True
        if isinstance(result, PhaseResult):
            result.details["pending_after_stop"] = pending
            if run.fill_s is not None:
                result.details["producer_fill_seconds"] = run.fill_s
        await self.redis.delete(run.key)
        await asyncio.to_thread(run.jsonl.unlink, missing_ok=True)
        return result

    async def run(self) -> Report:
        """Run the selected phases; raise BenchFailed on the first wrong result."""
        o = self.options
        selected = set(o.phases)
        latency_n = int(max(o.loads, default=0) * o.latency_seconds)
        stream_latency_n = int(max(o.stream_loads, default=0) * o.latency_seconds)
        mix_n = max(o.events, o.scaling_events, o.replica_events, latency_n, stream_latency_n)
        log.info(
            "generating %d mix events and %d spreads", mix_n, o.events, extra={"action": "bench"}
        )
        mix_all = make_mix(mix_n)
        mix = mix_all.prefix(o.events)
        spreads = make_spreads(o.events)
        counts = sorted(mix.type_counts().items(), key=lambda kv: -kv[1])
        self.report.mix = {
            "events": len(mix.events),
            "types": dict(counts),
            "shares": {k: v / len(mix.events) for k, v in counts},
        }
        # Repeats interleave the ceilings with the phases compared to them, round after round.
        rounds: list[dict[str, PhaseResult]] = []
        for _ in range(o.repeat):
            results: dict[str, PhaseResult] = {}
            if selected & {"copy", "server-copy", "submit", "stream", "baselines"}:
                await self._spreads(spreads, selected, results)
            if selected & {"mix-copy", "mix-submit", "mix-stream"}:
                await self._mix(mix, selected, results)
            rounds.append(results)
        self.report.phases.update(median_runs(rounds))
        if "latency" in selected:
            await self._latency(mix_all)
        if "stream-latency" in selected:
            await self._stream_latency(mix_all)
        if selected & {"batch-size", "writers"}:
            await self._sweeps(mix_all.prefix(o.scaling_events), selected)
        if "replicas" in selected:
            await self._replicas(mix_all.prefix(o.replica_events))
        if "memory" in selected:
            await self._memory()
        if "startup" in selected:
            await self._startup()
        return self.report

    def _outstanding(self) -> tuple[int, int]:
        outstanding = scaling.outstanding_for(self.settings, MIN_OUTSTANDING_SUBMITS)
        return outstanding, max(4, outstanding // throughput.SUBMIT_MANY_CHUNK)

    async def _spreads(
        self, spreads: Workload, selected: set[str], ph: dict[str, PhaseResult]
    ) -> None:
        o = self.options
        db = self.db
        cpu = self.cpu
        outstanding, callers = self._outstanding()
        if "copy" in selected:
            ph["copy"] = await self.measured(
                "(a)",
                spreads.expected,
                throughput.binary_copy(db, spreads, split=cpu),
                ingestd=False,
            )
        if "server-copy" in selected:
            csv_path = self.workdir / "spreads.csv"
            await asyncio.to_thread(write_spreads_csv, csv_path, spreads.events)
            csv_path.chmod(0o644)
            ph["server_copy"] = await self.measured(
                "(a2)",
                spreads.expected,
                throughput.file_copy(db, spreads, csv_path, split=cpu),
                ingestd=False,
            )
        if "submit" in selected:
            ph["submit"] = await self.measured(
                "(b)",
                spreads.expected,
                throughput.submit(
                    "submit",
                    f"ingestd submit, {outstanding:,} callers",
                    self.settings,
                    spreads,
                    outstanding,
                    split=cpu,
                ),
            )
            ph["submit_many"] = await self.measured(
                "(b')",
                spreads.expected,
                throughput.submit_many(
                    "submit_many",
                    f"ingestd submit_many of 1,000, {callers} callers",
                    self.settings,
                    spreads,
                    callers,
                    split=cpu,
                ),
            )
        if "stream" in selected:
            run = await self.open_stream("(c)", spreads, fill=True)
            result = await throughput.stream(
                "stream",
                "ingestd via Redis Stream (separate producer)",
                run.settings,
                self.redis,
                spreads,
                self.deadline(o.events),
                split=cpu,
            )
            ph["stream"] = await self.close_stream("(c)", spreads, run, result)
        if "baselines" in selected:
            sample = spreads.prefix(min(o.naive_rows, o.events))
            ph["insert"] = await self.measured(
                "(d)",
                sample.expected,
                throughput.insert_per_row(db, sample, split=cpu),
                ingestd=False,
            )
            ph["insert"].label = f"one INSERT per row, autocommit ({len(sample.events):,} sample)"
            ph["executemany"] = await self.measured(
                "(e)",
                spreads.expected,
                throughput.executemany(db, spreads, split=cpu),
                ingestd=False,
            )
            ph["multirow"] = await self.measured(
                "(f)",
                spreads.expected,
                throughput.multirow_insert(db, spreads, split=cpu),
                ingestd=False,
            )

    async def _mix(self, mix: Workload, selected: set[str], ph: dict[str, PhaseResult]) -> None:
        cpu = self.cpu
        outstanding, callers = self._outstanding()
        if "mix-copy" in selected:
            batches = raw_batches(mix.events, throughput.COPY_BATCH_ROWS)
            ph["mix_copy"] = await self.measured(
                "(A)",
                mix.expected,
                throughput.mix_ceiling(self.db, batches, split=cpu),
                ingestd=False,
            )
            # Per event of the mix, heartbeats included (a raw writer has nothing to do for them).
            ph["mix_copy"].events = len(mix.events)
        if "mix-submit" in selected:
            ph["mix_submit"] = await self.measured(
                "(B)",
                mix.expected,
                throughput.submit(
                    "mix_submit",
                    f"ingestd submit, {outstanding:,} callers",
                    self.settings,
                    mix,
                    outstanding,
                    split=cpu,
                ),
            )
            ph["mix_submit_many"] = await self.measured(
                "(B')",
                mix.expected,
                throughput.submit_many(
                    "mix_submit_many",
                    f"ingestd submit_many of 1,000, {callers} callers",
                    self.settings,
                    mix,
                    callers,
                    split=cpu,
                ),
            )
        if "mix-stream" in selected:
            run = await self.open_stream("(C)", mix, fill=True)
            result = await throughput.stream(
                "mix_stream",
                "ingestd via Redis Stream (separate producer)",
                run.settings,
                self.redis,
                mix,
                self.deadline(len(mix.events)),
                split=cpu,
            )
            ph["mix_stream"] = await self.close_stream("(C)", mix, run, result)

    async def _sweeps(self, sweep: Workload, selected: set[str]) -> None:
        """Batch size and writers, through the stream: one pre-filled stream, a group per run."""
        o = self.options
        cpu = self.cpu
        variants: list[tuple[list[PhaseResult], str, Settings]] = []
        if "batch-size" in selected:
            for rows in o.batch_sizes:
                s = scaling.with_batch_rows(self.settings, rows)
                variants.append((self.report.batch_sweep, f"batch_max_rows {rows}", s))
        if "writers" in selected:
            for writers in o.writers:
                s = scaling.with_writers(self.settings, writers)
                variants.append((self.report.writer_sweep, f"writers {writers}", s))
        n = len(sweep.events)
        key = self.stream_key("sweep")
        jsonl = self.workdir / "sweep.jsonl"
        await asyncio.to_thread(write_jsonl, jsonl, sweep.events)
        await fill_stream("sweep", self.settings.storage.redis.url, key, jsonl, self.deadline(n))
        # Every group exists from the start at id 0, so no run's trim can remove the entries
        # that a later run's group has still to read.
        groups = [f"{self.group}-sweep-{i}" for i in range(len(variants))]
        for group in groups:
            await self.redis.xgroup_create(key, group, id="0")
        for (out, label, s), group in zip(variants, groups, strict=True):
            run_settings = s.replace(**{"stream.key": key, "stream.group": group}).check()
            result = await self.measured(
                label,
                sweep.expected,
                throughput.stream(
                    "sweep", label, run_settings, self.redis, sweep, self.deadline(n), split=cpu
                ),
            )
            pending = await stream_pending(self.redis, key, group)
            if pending:
                raise BenchFailed(f"{label}: {pending} entries still pending after stop")
            result.details["pending_after_stop"] = pending
            out.append(result)
        await self.redis.delete(key)

    async def _latency(self, mix_all: Workload) -> None:
        o = self.options
        for rows, age in o.grid:
            s = scaling.with_batch_rows(self.settings, rows).replace(
                **{"pipeline.batch_max_age_ms": age}
            )
            for load in o.loads:
                w = mix_all.prefix(max(1, int(load * o.latency_seconds)))
                label = f"latency {load:,.0f}/s rows {rows} age {age}"
                self.report.latency.append(
                    await self.measured(
                        label, w.expected, latency.paced_submit(s, w, load, label=label)
                    )
                )

    async def _stream_latency(self, mix_all: Workload) -> None:
        """XADD -> commit at each load: with the configured settings, and with the grid setting
        that had the lowest p99 submit->commit at 5k/s (when the latency phase found one)."""
        o = self.options
        variants = [self.settings]
        winners = sorted(self.report.p99_winners(), key=lambda r: r.percentile(99))
        if winners:
            best = winners[0].settings
            tuned = scaling.with_batch_rows(self.settings, best["batch_max_rows"]).replace(
                **{"pipeline.batch_max_age_ms": best["batch_max_age_ms"]}
            )
            if tuned.pipeline != self.settings.pipeline:
                variants.append(tuned)
        for s in variants:
            p = s.pipeline
            for load in o.stream_loads:
                w = mix_all.prefix(max(1, int(load * o.latency_seconds)))
                label = (
                    f"stream latency {load:,.0f}/s rows {p.batch_max_rows} age {p.batch_max_age_ms}"
                )
                run = await self.open_stream(label, w, fill=False, settings=s)
                result = await latency.paced_stream(
                    run.settings, self.redis, w, run.jsonl, load, label=label
                )
                self.report.stream_latency.append(await self.close_stream(label, w, run, result))

    async def _replicas(self, workload: Workload) -> None:
        o = self.options
        n = len(workload.events)
        filled = self.stream_key("replicas-filled")
        jsonl = self.workdir / "replicas.jsonl"
        await asyncio.to_thread(write_jsonl, jsonl, workload.events)
        url = self.settings.storage.redis.url
        await fill_stream("replicas", url, filled, jsonl, self.deadline(n))
        await self.redis.xgroup_create(filled, self.group, id="0")
        last = await last_entry_id(self.redis, filled)
        target = self.stream_key("replicas")
        for count in o.replicas:
            run = scaling.replicas_run(
                self.redis,
                self.settings,
                workload,
                replicas=count,
                filled_key=filled,
                stream_key=target,
                group=self.group,
                last_id=last,
                workdir=self.workdir,
                deadline_s=self.deadline(n),
            )
            self.report.replica_sweep.append(
                await self.measured(f"replicas x{count}", workload.expected, run)
            )
        await self.redis.delete(filled)

    async def _memory(self) -> None:
        o = self.options
        key = self.stream_key("memory")
        await reset_tables(self.db)
        log.info(
            "memory: %d events through one ingestd run",
            o.memory_events,
            extra={"action": "bench_phase"},
        )
        result, expected = await memory_run(
            self.redis,
            self.settings,
            events=o.memory_events,
            stream_key=key,
            group=self.group,
            workdir=self.workdir,
            deadline_s=max(300.0, o.memory_events / 300),
        )
        await verify(self.db, "memory", expected)
        result.verified = True
        self.report.memory = result
        await self.redis.delete(key)

    async def _startup(self) -> None:
        key = self.stream_key("startup")
        await reset_tables(self.db)
        log.info(
            "startup: ingestd run to its first committed row on a full stream",
            extra={"action": "bench_phase"},
        )
        self.report.startup = await startup_run(
            self.redis,
            self.db,
            self.settings,
            stream_key=key,
            group=self.group,
            workdir=self.workdir,
        )

    async def open(self) -> None:
        """Create and migrate the scratch database; record the machine."""
        log.info(
            "creating scratch database %s on %s",
            self.options.scratch_database,
            redact(self.base_dsn),
            extra={"action": "bench"},
        )
        await recreate_database(self.base_dsn, self.options.scratch_database)
        self.conn = await db.connect(self.dsn, timeout_s=10)
        await migrations.migrate(self.conn)
        self.report.machine = await machine_info(self.conn, self.redis)
        self.cpu = CpuSplit(self.conn, self.redis)

    async def close(self) -> None:
        """Remove every scratch resource (also after a failure)."""
        if self.conn is not None:
            await self.conn.close()
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await drop_database(self.base_dsn, self.options.scratch_database)
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await delete_keys(self.redis, [], self.prefix)
        await self.redis.aclose()
        await asyncio.to_thread(shutil.rmtree, self.workdir, True)


def median_runs(rounds: Sequence[dict[str, PhaseResult]]) -> dict[str, PhaseResult]:
    """Per phase, the run with the median rate of the rounds, carrying every round's rate."""
    out: dict[str, PhaseResult] = {}
    for key in rounds[0] if rounds else ():
        runs = sorted((r[key] for r in rounds), key=lambda p: p.rate)
        chosen = runs[(len(runs) - 1) // 2]
        if len(runs) > 1:
            chosen.details["rounds_events_per_s"] = [r[key].rate for r in rounds]
        out[key] = chosen
    return out


def settle_memory() -> None:
    """Collect the last phase's garbage, then exempt everything alive from the cyclic GC.

    The bench holds its pre-built workloads (hundreds of thousands of objects) in the same
    process as the in-process service; without the freeze every full collection during a timed
    phase would walk them, a cost that a service without the bench's data does not have. The
    collector runs with the thresholds ``ingestd run`` sets (``GC_THRESHOLDS``), so that the
    in-process phases measure the daemon's process, ceilings and ingestd alike; with CPython's
    defaults the mix through the stream measured 0.77 of the raw writer instead of 0.88.
    """
    gc.collect()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


async def run_bench(settings: Settings, options: Options) -> int:
    """``ingestd bench``: run the selected phases, print the table, write JSON and plots."""
    if options.events < 1:
        print("ingestd bench: --events must be at least 1", file=sys.stderr)
        return 2
    if not DB_NAME.match(options.scratch_database):
        print(
            f"ingestd bench: scratch database name {options.scratch_database!r} "
            "must match [a-z0-9_]{1,63}",
            file=sys.stderr,
        )
        return 2
    if not options.phases:
        print("ingestd bench: no phase selected", file=sys.stderr)
        return 2
    try:
        bench = Bench(settings, options)
    except ConfigError as exc:
        print(f"ingestd bench: {exc}", file=sys.stderr)
        return 2
    try:
        await bench.open()
        report = await bench.run()
    except BenchFailed as exc:
        print(f"ingestd bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, redis.exceptions.RedisError) as exc:
        print(f"ingestd bench: cannot run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        await bench.close()
    report.machine["load_average"]["after"] = load_average()
    if options.plots_dir:
        if plots.available():
            report.plots = await asyncio.to_thread(plots.write_plots, report, options.plots_dir)
        else:
            report.plots_note = plots.MISSING
            print(f"ingestd bench: {plots.MISSING}", file=sys.stderr)
    print(format_table(report))
    if options.json_path:
        report.write_json(options.json_path)
        log.info("wrote %s", options.json_path, extra={"action": "bench"})
    return 0 if report.all_verified() else 1
