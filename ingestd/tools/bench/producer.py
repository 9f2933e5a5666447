"""The bench's producer process: fills the stream from a file, paced or at full speed, or
publishes the simulated feed and reports what the database must then hold.

It runs as ``python -m ingestd.tools.bench.producer MODE ...`` with the Redis URL on stdin (a
password
in argv would be visible in ``ps``), so that producing never shares ingestd's CPU time slice.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from ingestd.producer.publisher import Publisher
from ingestd.tools.bench.scratch import BenchFailed
from ingestd.tools.bench.workload import expect, simulated

CHUNK: Final = 1_000
PACE_TICK_S: Final = 0.002


def publish_file(path: str, url: str, stream: str) -> int:
    """XADD every line of a JSONL file to ``stream`` with the shipped publisher, pipelined."""
    publisher = Publisher.from_url(url, stream=stream)
    try:
        with open(path, "rb") as fh:
            return publisher.publish_many((orjson.loads(line) for line in fh), chunk=CHUNK)
    finally:
        publisher.close()


def publish_paced(path: str, url: str, stream: str, rate: float) -> tuple[int, float]:
    """XADD the file's events at ``rate`` per second: each tick sends what is due by then.

    Returns how many were sent and in how many seconds (the achieved rate, start-up excluded).
    """
    events = [orjson.loads(line) for line in Path(path).read_bytes().splitlines()]
    publisher = Publisher.from_url(url, stream=stream)
    sent = 0
    t0 = time.perf_counter()
    try:
        while sent < len(events):
            due = min(len(events), int((time.perf_counter() - t0) * rate) + 1)
            if due > sent:
                sent += publisher.publish_many(events[sent:due], chunk=CHUNK)
            else:
                time.sleep(PACE_TICK_S)
    finally:
        publisher.close()
    return sent, time.perf_counter() - t0


def publish_simulated(url: str, stream: str, count: int, seed: int) -> dict[str, object]:
    """Publish ``count`` simulated events; return their expected contents (as JSON)."""
    expected = expect([])
    publisher = Publisher.from_url(url, stream=stream)

    def tally() -> Iterator[dict[str, Any]]:
        for ev in itertools.islice(simulated(seed), count):
            expected.add(ev)
            yield ev

    try:
        publisher.publish_many(tally(), chunk=CHUNK)
    finally:
        publisher.close()
    return expected.to_json()


def main(argv: Sequence[str]) -> int:
    """``file PATH STREAM`` | ``paced PATH STREAM RATE`` | ``simulate STREAM COUNT SEED``."""
    url = sys.stdin.readline().strip()
    mode, *args = argv
    if mode == "file":
        path, stream = args
        print(publish_file(path, url, stream))
    elif mode == "paced":
        path, stream, rate = args
        sent, seconds = publish_paced(path, url, stream, float(rate))
        print(sent, seconds)
    elif mode == "simulate":
        stream, count, seed = args
        sys.stdout.buffer.write(orjson.dumps(publish_simulated(url, stream, int(count), int(seed))))
    else:
        print(f"unknown producer mode {mode!r}", file=sys.stderr)
        return 2
    return 0


class Producer:
    """A running producer process."""

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self.proc = proc
        self.label = label
        self._t0 = time.perf_counter()
        self.elapsed_s = 0.0  # from start to exit, once finished

    @classmethod
    async def start(cls, label: str, url: str, *argv: str) -> Producer:
        """Start ``python -m ingestd.tools.bench.producer ARGV`` and hand it the URL."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ingestd.tools.bench.producer",
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(url.encode() + b"\n")
        await proc.stdin.drain()
        proc.stdin.close()
        return cls(proc, label)

    async def result(self, timeout_s: float) -> bytes:
        """Wait for the producer to finish; its stdout, or BenchFailed."""
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise BenchFailed(
                f"{self.label}: the producer process did not finish in {timeout_s:.0f}s"
            ) from None
        self.elapsed_s = time.perf_counter() - self._t0
        if self.proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-2000:]
            raise BenchFailed(f"{self.label}: the producer exited {self.proc.returncode}: {tail}")
        return out

    async def kill(self) -> None:
        """Stop it now (a failing phase)."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def fill_stream(label: str, url: str, stream: str, jsonl: Path, timeout_s: float) -> float:
    """Fill ``stream`` from ``jsonl`` in a producer process; return the seconds it took."""
    t0 = time.perf_counter()
    producer = await Producer.start(label, url, "file", str(jsonl), stream)
    await producer.result(timeout_s)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
