"""``ingestd bench``: a quick run end to end, and the checks that make a wrong phase fail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis

from ingestd.errors import ConfigError
from ingestd.tools.bench import options, throughput
from ingestd.tools.bench.scratch import BenchFailed, reset_tables, verify
from ingestd.tools.bench.workload import make_mix, make_spreads, raw_batches
from tests.commands import operator_env, run_ingestd
from tests.conftest import PgServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(
    pg_server: PgServer,
    redis_url: str,
    tmp_path: Path,
    *args: str,
    pythonpath: str | None = None,
) -> tuple[subprocess.CompletedProcess[str], str]:
    database = f"ingestd_bench_test_{uuid.uuid4().hex[:10]}"
    env = operator_env(
        DATABASE_URL=pg_server.admin_dsn, REDIS_URL=redis_url, INGESTD_METRICS_PORT="0"
    )
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = run_ingestd(
        env, "bench", "--scratch-database", database, *args, timeout=600, cwd=tmp_path
    )
    return done, database


@pytest.mark.e2e
@pytest.mark.pg
@pytest.mark.redis
def test_quick_bench_runs_every_phase_verified_and_writes_table_json_plots(
    pg_server: PgServer, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    plots_dir = tmp_path / "plots"
    done, database = _bench(
        pg_server, redis_url, tmp_path, "--quick", "--json", str(out), "--plots", str(plots_dir)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout

    # The table: machine header, headline ratios, every section, and the verdict.
    for text in (
        "machine: ",
        "PostgreSQL ",
        "load average",
        "Headline",
        "raw binary COPY, pre-built rows",
        "COPY",
        "Throughput, realistic mix",
        "raw writer: binary COPY + position upserts",
        "ingestd via Redis Stream",
        "one INSERT per row",
        "executemany",
        "multi-row INSERT",
        "Latency submit -> commit",
        "Latency XADD -> commit",
        "batch_max_rows",
        "replicas",
        "Memory: ",
        "ingestd run to first committed row",
        "every phase verified",
        "--quick: sizes too small for the targets",
    ):
        assert text in table, f"{text!r} missing from:\n{table}"
    assert "(target" not in table
    assert "NOT VERIFIED" not in table
    assert table.index("Headline") < table.index("Throughput, spreads only")

    report = json.loads(out.read_text())
    assert report["verified"] is True
    phases = report["phases"]
    assert set(phases) == {
        "copy",
        "server_copy",
        "submit",
        "submit_many",
        "stream",
        "insert",
        "executemany",
        "multirow",
        "mix_copy",
        "mix_submit",
        "mix_submit_many",
        "mix_stream",
    }
    for key, phase in phases.items():
        assert phase["verified"] is True, key
        assert phase["events"] == (300 if key == "insert" else 2_000), key
        assert phase["events_per_s"] > 0 and phase["ratio_to_ceiling"] is not None, key
    assert phases["copy"]["ratio_to_ceiling"] == phases["mix_copy"]["ratio_to_ceiling"] == 1.0
    for key in ("stream", "mix_stream"):
        assert phases[key]["pending_after_stop"] == 0
    # The mix really is mixed, and its positions were opened and closed.
    assert report["mix"]["types"]["spread"] > report["mix"]["types"]["fx_rate"] > 0
    assert report["mix"]["types"]["position_close"] > 0

    scaling = report["scaling"]
    assert [r["batch_max_rows"] for r in scaling["batch_max_rows"]] == [500, 2_000]
    assert [r["writers"] for r in scaling["writers"]] == [1, 2]
    assert [r["replicas"] for r in scaling["replicas"]] == [1, 2]
    for run in (*scaling["batch_max_rows"], *scaling["writers"], *scaling["replicas"]):
        assert run["verified"] is True
    for run in scaling["replicas"]:
        assert set(run["exit_codes"].values()) == {0}
        assert run["pending_after_stop"] == 0

    lat = report["latency"]
    assert len(lat["submit_to_commit"]) == 4  # 2 settings x 2 loads
    for run in (*lat["submit_to_commit"], *lat["stream_xadd_to_commit"]):
        assert run["verified"] is True
        assert run["events"] > 0
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert run["achieved_rate"] > 0 and run["completed_rate"] > 0
    assert len(lat["stream_xadd_to_commit"]) == 1

    memory = report["memory"]
    assert memory["verified"] is True and memory["events"] == 10_000
    assert memory["peak_rss_mib"] > 10
    assert report["headline"]["peak_rss_mib"] == memory["peak_rss_mib"]
    assert report["startup"]["median_first_row_s"] > 0

    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["postgresql"] and machine["redis"]
    assert set(machine["load_average"]) == {"before", "after"}

    names = {Path(p).name for p in report["plots"]}
    assert names == {
        "throughput_vs_batch_size.png",
        "latency_vs_load.png",
        "scaling.png",
        "memory_rss.png",
    }
    for path in report["plots"]:
        assert Path(path).read_bytes()[:8] == PNG_MAGIC

    # Nothing scratch is left behind: the database is dropped, the keys deleted.
    assert _database_exists(pg_server, database) is False
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match="ingestd:bench:*")) == []
    finally:
        client.close()


@pytest.mark.e2e
@pytest.mark.pg
@pytest.mark.redis
def test_only_reruns_a_part_with_its_ceiling_and_repeat_keeps_every_round(
    pg_server: PgServer, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "part.json"
    done, _ = _bench(
        pg_server,
        redis_url,
        tmp_path,
        "--quick",
        "--only",
        "mix-submit",
        "--repeat",
        "2",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    # The ratio needs its ceiling from the same run, so --only brings it along.
    assert set(report["phases"]) == {"mix_copy", "mix_submit", "mix_submit_many"}
    assert report["phases"]["mix_submit"]["ratio_to_ceiling"] is not None
    # Two rounds, each with its own ceiling run: every round's rate is kept, the median shown.
    for phase in report["phases"].values():
        assert len(phase["rounds_events_per_s"]) == 2 and phase["verified"] is True
    assert report["latency"]["submit_to_commit"] == [] and report["memory"] is None


@pytest.mark.e2e
@pytest.mark.pg
@pytest.mark.redis
def test_without_matplotlib_the_bench_says_so_and_still_reports(
    pg_server: PgServer, redis_url: str, tmp_path: Path
) -> None:
    # A matplotlib that cannot be imported, first on the path: as on a machine without the extra.
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    out = tmp_path / "copy.json"
    plots_dir = tmp_path / "plots"
    done, _ = _bench(
        pg_server,
        redis_url,
        tmp_path,
        "--quick",
        "--only",
        "copy",
        "--json",
        str(out),
        "--plots",
        str(plots_dir),
        pythonpath=str(shadow.parent),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "matplotlib is not installed, so no PNGs were written" in done.stderr
    assert "pip install 'ingestd[bench]'" in done.stdout
    report = json.loads(out.read_text())
    assert report["plots"] == [] and "matplotlib" in report["plots_note"]
    assert set(report["phases"]) == {"copy"} and report["verified"] is True
    assert not plots_dir.exists() or list(plots_dir.iterdir()) == []


@pytest.mark.e2e
@pytest.mark.pg
@pytest.mark.redis
def test_the_startup_figure_is_measured_and_printed(
    pg_server: PgServer, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "startup.json"
    done, _ = _bench(
        pg_server, redis_url, tmp_path, "--quick", "--only", "startup", "--json", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ingestd run to first committed row (aim <= 0.3 s)" in done.stdout
    startup = json.loads(out.read_text())["startup"]
    assert len(startup["first_row_s"]) == 3 and startup["events_in_stream"] == 1_000
    # The first row follows the process's own "started" line, which follows the spawn.
    for row_s, started_s in zip(startup["first_row_s"], startup["started_line_s"], strict=True):
        assert 0 < started_s < row_s
    assert startup["median_first_row_s"] == sorted(startup["first_row_s"])[1]


def _database_exists(pg_server: PgServer, name: str) -> bool:
    async def check() -> bool:
        conn = await asyncpg.connect(pg_server.admin_dsn)
        try:
            return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
        finally:
            await conn.close()

    return asyncio.run(check())


@pytest.mark.pg
async def test_verify_fails_on_a_wrong_sum_a_missing_row_and_an_unlinked_order(
    db: asyncpg.Connection,
) -> None:
    mix = make_mix(3_000)
    assert mix.expected.counts["orders"] > 0
    await reset_tables(db)
    await throughput.mix_ceiling(db, raw_batches(mix.events, 1_000))
    # What the raw writer wrote is right by the raw writer's standard ...
    await verify(db, "raw", mix.expected, ingestd=False)
    # ... but it does not link orders to positions, which ingestd must.
    with pytest.raises(BenchFailed, match="orders not linked"):
        await verify(db, "raw as ingestd", mix.expected)

    await db.execute(
        "UPDATE spreads SET upbit_price = upbit_price + 0.01 "
        "WHERE id = (SELECT min(id) FROM spreads)"
    )
    with pytest.raises(BenchFailed, match=r"sum\(spreads.upbit_price\)"):
        await verify(db, "tampered", mix.expected, ingestd=False)

    spreads = make_spreads(500)
    await reset_tables(db)
    await throughput.binary_copy(db, spreads)
    await db.execute("DELETE FROM spreads WHERE id = (SELECT max(id) FROM spreads)")
    with pytest.raises(BenchFailed, match="499 rows in spreads, expected 500"):
        await verify(db, "short", spreads.expected, ingestd=False)


def test_phase_selection_groups_skip_and_ceilings() -> None:
    assert options.select_phases([], []) == options.PHASES
    assert options.select_phases(["mix-stream"], []) == ("mix-copy", "mix-stream")
    assert options.select_phases(["scaling"], ["replicas"]) == ("mix-copy", "batch-size", "writers")
    assert "memory" not in options.select_phases([], ["memory", "latency"])
    with pytest.raises(ConfigError, match="unknown bench phase 'nope'"):
        options.select_phases(["nope"], [])
    assert options.parse_grid("1000x25, 5000x200") == ((1000, 25), (5000, 200))
    with pytest.raises(ConfigError, match="ROWSxAGE_MS"):
        options.parse_grid("1000")
