"""How long ``PostgresStorage.log_spread`` takes with the disk outbox, Redis up and Redis down.

    .venv/bin/python scripts/producer_outbox_latency.py [--events 50000] [--redis-url URL]

Each call is timed on its own (``perf_counter_ns``); the table gives p50, p99, p99.9 and the
maximum per case. "Redis down" publishes to a port where nothing listens, so the publisher thread
fails and retries all along while the producer logs. Nothing is asserted: the figures go into
docs/producer.md. A case's outbox directory is a fresh temporary one.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingestd.producer.storage import PostgresStorage
from ingestd.producer.storage.outbox import DiskOutbox
from tests.samples import spread


def dead_url() -> str:
    """A Redis URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def measure(url: str, events: int, fsync_interval_s: float) -> list[int]:
    """Nanoseconds per log_spread call."""
    models = [spread(i) for i in range(events)]
    with tempfile.TemporaryDirectory() as directory:
        outbox = DiskOutbox(Path(directory), max_bytes=1 << 30, fsync_interval_s=fsync_interval_s)
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        storage = PostgresStorage(
            client, stream="bench:outbox-latency", producer="bench", owns_client=True, outbox=outbox
        )
        took: list[int] = []
        clock = time.perf_counter_ns
        for model in models:
            start = clock()
            storage.log_spread(model)
            took.append(clock() - start)
        storage.close(timeout=1)  # Redis down: the events stay in the (temporary) outbox
    return took


def replay(url: str, events: int) -> float:
    """Seconds to publish a backlog of ``events`` left by a producer that ran while Redis was
    down: a new storage on the same directory, as a restarted producer would make."""
    models = [spread(i) for i in range(events)]
    with tempfile.TemporaryDirectory() as directory:
        outage = PostgresStorage(
            redis.Redis.from_url(dead_url(), socket_connect_timeout=1),
            stream="bench:outbox-latency",
            owns_client=True,
            outbox=DiskOutbox(Path(directory), max_bytes=1 << 30),
        )
        for model in models:
            outage.log_spread(model)
        outage.close(timeout=0.1)
        start = time.perf_counter()
        back = PostgresStorage(
            redis.Redis.from_url(url, socket_timeout=5),
            stream="bench:outbox-latency",
            owns_client=True,
            outbox=DiskOutbox(Path(directory), max_bytes=1 << 30),
        )
        back.flush(600)
        took = time.perf_counter() - start
        back.close()
    return took


def row(name: str, took: list[int]) -> str:
    """One table row in microseconds."""
    q = statistics.quantiles(took, n=1000)
    us = [q[499] / 1000, q[989] / 1000, q[998] / 1000, max(took) / 1000]
    return f"| {name} | {len(took):,} | " + " | ".join(f"{v:,.1f}" for v in us) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    down = dead_url()
    cases = [
        ("Redis down, fsync every 50 ms (default)", down, args.events, 0.05),
        ("Redis up, fsync every 50 ms (default)", args.redis_url, args.events, 0.05),
        ("Redis down, fsync per call (`fsync_interval_s: 0`)", down, args.events // 10, 0.0),
    ]
    print("| case | calls | p50 µs | p99 µs | p99.9 µs | max µs |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, url, n, interval in cases:
        print(row(name, measure(url, n, interval)), flush=True)
    n = args.events * 2
    seconds = replay(args.redis_url, n)
    print(f"\nA backlog of {n:,} events published in {seconds:.1f} s ({n / seconds:,.0f}/s).")
    cleanup = redis.Redis.from_url(args.redis_url)
    try:
        cleanup.delete("bench:outbox-latency")
    except redis.exceptions.RedisError:
        pass
    finally:
        cleanup.close()


if __name__ == "__main__":
    main()
