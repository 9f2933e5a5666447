"""``ingestd stats`` as text: every section fits the width (100 columns off a terminal), the Redis
part shows the fields an operator reads rather than every INFO field, and nothing is lost from the
JSON."""

from __future__ import annotations

from typing import Any

import orjson

from ingestd.commands.stats import render, sections, to_json

NOW = "2026-12-03T12:00:00Z"

INFO_STATS = {
    # A few of the ~50 fields of INFO stats; the text shows the first five only.
    "instantaneous_ops_per_sec": 37,
    "total_commands_processed": 635020,
    "keyspace_hits": 9755,
    "keyspace_misses": 2697,
    "evicted_keys": 0,
    "io_threaded_reads_processed": 0,
    "active_defrag_key_misses": 0,
    "reply_buffer_shrinks": 888,
}


def _report() -> dict[str, Any]:
    job = {
        "job_id": 1004,
        "proc_name": "policy_refresh_continuous_aggregate",
        "target": "hourly_spread_avg",
        "schedule_interval": "00:15:00",
        "config": '{"end_offset": "01:00:00", "start_offset": "3 days", "mat_hypertable_id": 4}',
        "last_run_started_at": "2026-12-03T11:54:59.5Z",
        "last_run_status": "Failed",
        "next_start": "2026-12-03T12:10:00.5Z",
        "total_runs": 1234,
        "total_failures": 1,
        "last_error": "canceling statement due to lock timeout " + "while refreshing " * 10,
        "scheduled": True,
    }
    return {
        "collected_at": NOW,
        "database": {
            "name": "ingestd",
            "server_version": "15.20 (Debian 15.20-0+deb12u1)",
            "timescaledb": "2.28.3",
            "flavour": "TimescaleDB",
            "timezone": "UTC",
        },
        "tables": [
            {
                "schemaname": "public",
                "tablename": "ingestd_aggregate_backfill",
                "size": "8192 bytes",
                "hypertable": True,
                "hypertable_size": "1234 MB",
                "rows": 123456789,
                "rows_exact": False,
            }
        ],
        "hypertables": [
            {
                "name": "spreads",
                "chunk_interval": "1 day",
                "chunks": 120,
                "compressed_chunks": 118,
                "compression_enabled": True,
                "segmentby": "symbol",
                "orderby": "timestamp DESC",
                "before_compression_bytes": 12_345_678_901,
                "after_compression_bytes": 1_234_567_890,
                "compression_ratio": 10.0,
            }
        ],
        "aggregates": [
            {
                "name": "hourly_spread_avg",
                "kind": "continuous aggregate",
                "real_time": True,
                "refreshed_by": "TimescaleDB policy",
                "rows": 5000,
            }
        ],
        "jobs": [job],
        "maintenance": [
            {
                "task": "retention_policies",
                "last_started_at": "2026-12-03T11:59:00Z",
                "last_finished_at": "2026-12-03T11:59:00.25Z",
                "last_status": "success",
                "last_detail": "spreads (90 days): unchanged; " * 10,
                "last_error": None,
                "runs": 100,
                "failures": 0,
            }
        ],
        "slow_queries": {
            "available": True,
            "rows": [{"query": "SELECT " + "x, " * 100, "calls": 3, "mean_exec_time_ms": 1.5}],
        },
        "redis": {
            "db": 0,
            "info_server": {"redis_version": "7.0.15", "uptime_in_seconds": 200_000},
            "info_clients": {"connected_clients": 12, "blocked_clients": 1},
            "info_memory": {
                "used_memory_human": "3.08M",
                "used_memory_peak_human": "47.58M",
                "maxmemory": 0,
                "maxmemory_human": "0B",
                "maxmemory_policy": "noeviction",
            },
            "info_stats": INFO_STATS,
            "info_keyspace": {"db0": {"keys": 1200, "expires": 30}, "db5": {"keys": 9}},
            "metrics_keys": [f"metrics:hourly_spread:2025-11-15-{h:02d}" for h in range(24)],
        },
    }


def test_every_line_fits_100_columns_and_a_narrower_width() -> None:
    for width in (100, 72):
        text = render(_report(), width=width)
        widest = max(text.splitlines(), key=len)
        assert len(widest) <= width, widest


def test_redis_shows_what_an_operator_reads_not_every_info_field() -> None:
    text = render(_report())
    redis_part = text.split("\nredis", 1)[1].split("\n\n", 1)[0]
    for shown in (
        "version                 7.0.15",
        "uptime                  2d 7h",
        "memory used             3.08M",
        "memory max              no limit, policy noeviction",
        "clients connected       12",
        "ops/s                   37",
        "keyspace hits / misses  9,755 / 2,697 (78% hits)",
        "evicted keys            0",
        "keys in db0             1,200 (30 with a TTL)",
    ):
        assert shown in redis_part, redis_part
    for raw in ("io_threaded_reads_processed", "reply_buffer_shrinks", "db5"):
        assert raw not in text
    assert "… and 14 more (--json lists them all)" in text


def test_the_json_keeps_every_field() -> None:
    report = _report()
    doc = orjson.loads(to_json(report))
    assert doc["redis"]["info_stats"] == INFO_STATS
    assert doc["jobs"][0]["config"] == report["jobs"][0]["config"]
    assert len(doc["redis"]["metrics_keys"]) == 24


def test_times_are_relative_to_the_collection_and_errors_are_whole() -> None:
    text = render(_report())
    jobs = text.split("TimescaleDB jobs (policies)", 1)[1].split("\n\n", 1)[0]
    (row,) = [line for line in jobs.splitlines() if line.startswith("1004")]
    expected = "refresh hourly_spread_avg 00:15:00 5m ago Failed in 10m 1,234 1"
    assert row.split()[1:] == expected.split(), row
    assert "job 1004 last error: canceling statement due to lock timeout" in jobs
    assert " ".join(jobs.split()).endswith("while refreshing while refreshing")


def test_each_section_has_a_title_and_renders_alike() -> None:
    titles = [s.title for s in sections(_report())]
    assert titles[0].startswith("tables") and titles[-1] == "metrics keys (24)"
    text = render(_report())
    for title in titles:
        assert f"\n\n{title}\n" in text
