"""Measure TimescaleDB compression of ingestd's spreads and fx_rates on simulated data.

    .venv/bin/python scripts/measure_compression.py \
        --dsn postgresql://postgres@127.0.0.1:5433/postgres --tick 6

Creates a scratch database on that server (dropped at the end), migrates it, writes a simulated
week (ingestd.tools.simulate; 3 symbols, one market tick per --tick seconds) through ingestd's own
PostgresSink, runs the compression policies (CALL run_job), and prints the size of the compressed
chunks before and after (hypertable_compression_stats) plus the whole hypertable's size.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

import ingestd.daemon.db as ingestd_db
from ingestd.daemon import migrations
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.settings import load_settings
from ingestd.tools.simulate import Simulator
from ingestd.wire import decoding


class _Source:
    """Items need an acknowledger; nothing is acknowledged here."""

    name = "measure"

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Nothing to acknowledge."""

    def dead_letter_key(self, token: Any) -> str | None:
        """No dedup keys."""
        return None


def _with_db(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


async def main(dsn: str, tick_s: float, days: int) -> None:
    """Create, fill, compress, report, drop."""
    name = f"ingestd_compression_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    url = _with_db(dsn, name)
    try:
        conn = await asyncpg.connect(url)
        await migrations.migrate(conn)
        if not await migrations.timescaledb_enabled(conn):
            raise SystemExit("this server has no TimescaleDB: nothing to compress")
        settings = load_settings(None, environ={}, overrides={"storage.postgres.dsn": url})
        pool = await ingestd_db.create_pool(settings.storage.postgres)
        sink = PostgresSink(pool)
        end = dt.datetime.now(dt.UTC).replace(microsecond=0)
        sim = Simulator(seed=3, start=end - dt.timedelta(days=days), tick_s=tick_s)
        source = _Source()
        batch: list[Item] = []
        t0 = time.monotonic()
        while sim.now + sim.tick < end:
            for ev in sim.step():
                if ev["type"] == "heartbeat":
                    continue
                raw = orjson.dumps(ev)
                decoded = decoding.decode_event(raw, max_bytes=1 << 20, default_event_id=None)
                batch.append(Item(decoded, None, source, None, raw, time.monotonic()))
            if len(batch) >= 5000:
                await sink.write(batch)
                batch = []
        if batch:
            await sink.write(batch)
        await pool.close()
        counts = {
            t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in ("spreads", "fx_rates")
        }
        print(f"wrote {counts} in {time.monotonic() - t0:.1f}s ({days} days, tick {tick_s}s)")
        await conn.execute("ANALYZE")
        for table in ("spreads", "fx_rates"):
            total_before = await conn.fetchval("SELECT hypertable_size($1::regclass)", table)
            job = await conn.fetchval(
                "SELECT job_id FROM timescaledb_information.jobs"
                " WHERE proc_name = 'policy_compression' AND hypertable_name = $1",
                table,
            )
            await conn.execute(f"CALL run_job({int(job)})")
            stats = await conn.fetchrow(
                "SELECT total_chunks, number_compressed_chunks AS compressed,"
                " before_compression_total_bytes AS before, after_compression_total_bytes AS after"
                " FROM hypertable_compression_stats($1::regclass)",
                table,
            )
            total_after = await conn.fetchval("SELECT hypertable_size($1::regclass)", table)
            assert stats is not None
            ratio = (stats["before"] / stats["after"]) if stats["after"] else float("nan")
            print(
                f"{table}: {stats['compressed']}/{stats['total_chunks']} chunks compressed;"
                f" those chunks {stats['before'] / 1e6:.1f} MB -> {stats['after'] / 1e6:.2f} MB"
                f" ({ratio:.1f}x); whole table {total_before / 1e6:.1f} MB ->"
                f" {total_after / 1e6:.1f} MB"
            )
        await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5433/postgres")
    parser.add_argument("--tick", type=float, default=6.0, help="simulated seconds per tick")
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.dsn, args.tick, args.days))
