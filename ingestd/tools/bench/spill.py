"""``ingestd bench --spool``: the spill path's spool on SQLite WAL against the hand-written one.

``ingestd.spool`` (SQLite in WAL mode) and ``ingestd.tools.bench.spill_file`` (the segment files
ingestd used before) keep the same promise (``append`` returns once the record survives a power
loss; replay in order; a full disk is a temporary refusal). Measured on each, in a scratch
directory:

* durable appends: one at a time (the latency of an append, fsync included, p50/p99) and from
  many concurrent producers (group commit: throughput and latency);
* the replay of the backlog that left (read, commit, remove, until empty);
* reopening a large backlog (what a restart costs before the replay starts);
* ``kill -9`` of a process mid-append, then recovery, with and without a torn tail added to the
  file being written: every acknowledged record must come back, once, in order;
* a disk that fills up (a small tmpfs in a private mount namespace; needs root or
  unprivileged user namespaces, else reported as skipped): a clean refusal, no torn record, and
  appends taken again once space is freed;
* the producer outbox's append, in the caller's thread: written before it returns (survives
  ``kill -9``), fsync'd at most 50 ms later, or (``fsync_interval_s=0``) before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from ingestd.commands.textui import format_table
from ingestd.producer.storage.outbox import DiskOutbox
from ingestd.spool import DATABASE_FILE, Spool, SpoolError
from ingestd.tools.bench.machine import _cpu_model, load_average
from ingestd.tools.bench.spill_file import FileOutbox, FileSpool
from ingestd.tools.bench.workload import make_mix

# The hand-written segment files, and SQLite WAL (ingestd.spool).
IMPLEMENTATIONS: Final = ("file", "sqlite")
CONCURRENCY: Final = (16, 256)
MAX_BYTES: Final = 8 * 1024 * 1024 * 1024
KILL_ROUNDS: Final = 6


class SpoolLike(Protocol):
    """What the spill path uses of a spool."""

    appended: int

    async def open(self) -> int: ...
    async def close(self) -> None: ...
    async def append(self, payload: bytes) -> None: ...
    async def read_batch(self, limit: int) -> list[Any]: ...
    def committed(self, records: list[Any]) -> None: ...

    @property
    def pending_records(self) -> int: ...

    @property
    def size_bytes(self) -> int: ...


def make_spool(kind: str, directory: Path, **kw: Any) -> SpoolLike:
    """The segment-file spool (``file``) or the SQLite one (``sqlite``)."""
    kw.setdefault("max_bytes", MAX_BYTES)
    return FileSpool(directory, **kw) if kind == "file" else Spool(directory, **kw)


def payloads(n: int) -> list[bytes]:
    """``n`` wire events of the simulator's realistic mix (as the in-process source spools)."""
    events = make_mix(min(n, 20_000)).events
    return [orjson.dumps(events[i % len(events)] | {"seq": i}) for i in range(n)]


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _sequential(kind: str, directory: Path, data: list[bytes]) -> dict[str, Any]:
    s = make_spool(kind, directory)
    await s.open()
    lat: list[float] = []
    written = _written()
    start = time.perf_counter()
    for p in data:
        t = time.perf_counter()
        await s.append(p)
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    await s.close()
    return {
        "records": len(data),
        "written_per_record": round((_written() - written) / len(data)),
        "per_s": round(len(data) / elapsed),
        "p50_ms": _ms(_pct(lat, 0.5)),
        "p99_ms": _ms(_pct(lat, 0.99)),
        "max_ms": _ms(max(lat)),
    }


async def _concurrent(
    kind: str, directory: Path, data: list[bytes], producers: int
) -> tuple[dict[str, Any], SpoolLike]:
    s = make_spool(kind, directory)
    await s.open()
    lat: list[float] = []

    async def producer(mine: list[bytes]) -> None:
        for p in mine:
            t = time.perf_counter()
            await s.append(p)
            lat.append(time.perf_counter() - t)

    written = _written()
    start = time.perf_counter()
    await asyncio.gather(*(producer(data[i::producers]) for i in range(producers)))
    elapsed = time.perf_counter() - start
    return {
        "producers": producers,
        "written_per_record": round((_written() - written) / len(data)),
        "records": len(data),
        "per_s": round(len(data) / elapsed),
        "p50_ms": _ms(_pct(lat, 0.5)),
        "p99_ms": _ms(_pct(lat, 0.99)),
        "disk_bytes": _disk_bytes(directory),
    }, s


async def _drain(s: SpoolLike, batch: int = 1000) -> dict[str, Any]:
    """Replay everything as the spool source does: read a batch, commit it, until empty."""
    n = s.pending_records
    start = time.perf_counter()
    while True:
        records = await s.read_batch(batch)
        if not records:
            break
        s.committed(records)
        await asyncio.sleep(0)  # the io loop removes what is done, as in the service
    while s.size_bytes:  # noqa: ASYNC110 - removal finished (truncated, or rows deleted)
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    return {"records": n, "per_s": round(n / elapsed), "seconds": round(elapsed, 3)}


async def _reopen(kind: str, directory: Path, expect: int) -> dict[str, Any]:
    s = make_spool(kind, directory)
    start = time.perf_counter()
    found = await s.open()
    elapsed = time.perf_counter() - start
    await s.close()
    return {"records": found, "expected": expect, "seconds": round(elapsed, 3)}


def _written() -> int:
    """Bytes this process has sent to storage so far (Linux; 0 elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/io").read_text(encoding="ascii").splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


# --- kill -9 mid-append ----------------------------------------------------------------------

CHILD_PRODUCERS: Final = 64


async def _child_append_forever(kind: str, directory: Path) -> None:
    """Append records numbered 0, 1, ... from many producers; print each acknowledged batch."""
    s = make_spool(kind, directory)
    await s.open()
    out = sys.stdout
    next_seq = 0
    pad = b"x" * 300
    while True:
        seqs = range(next_seq, next_seq + CHILD_PRODUCERS)
        await asyncio.gather(*(s.append(b"%010d" % i + pad) for i in seqs))
        next_seq += CHILD_PRODUCERS
        out.write(f"{next_seq}\n")  # every record below this is acknowledged
        out.flush()


def _tear_tail(kind: str, directory: Path) -> int:
    """Add half a record of garbage to the file being written (as a torn write leaves)."""
    if kind == "file":
        target = sorted(directory.glob("spool-*.log"))[-1]
    else:
        target = directory / f"{DATABASE_FILE}-wal"
        if not target.exists():
            return 0
    garbage = os.urandom(1500)
    with target.open("ab") as f:
        f.write(garbage)
    return len(garbage)


async def _kill_round(kind: str, directory: Path, run_s: float, tear: bool) -> dict[str, Any]:
    child = subprocess.Popen(  # noqa: S603, ASYNC220 - our own arguments; read from a thread
        [sys.executable, "-m", "ingestd.tools.bench.spill", "child-append", kind, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acked = 0
    deadline = time.monotonic() + run_s
    lines: list[str] = []

    def read_lines() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    while time.monotonic() < deadline and child.poll() is None:  # noqa: ASYNC110 - a deadline
        await asyncio.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # mid-append: the child never stops appending
    child.wait()
    reader.join(5)
    if lines:
        acked = int(lines[-1])
    torn = _tear_tail(kind, directory) if tear else 0
    s = make_spool(kind, directory)
    start = time.perf_counter()
    found = await s.open()
    open_s = time.perf_counter() - start
    seqs: list[int] = []
    while records := await s.read_batch(5000):
        seqs.extend(int(r.payload[:10]) for r in records)
        s.committed(records)
    await s.close()
    shutil.rmtree(directory)
    missing = sorted(set(range(acked)) - set(seqs))
    return {
        "acked": acked,
        "recovered": found,
        "torn_bytes_added": torn,
        "lost": len(missing),
        "duplicates": len(seqs) - len(set(seqs)),
        "in_order": seqs == sorted(seqs),
        "open_ms": _ms(open_s),
    }


# --- a full disk -----------------------------------------------------------------------------


async def _child_fill(kind: str, mnt: Path, segment_bytes: int | None = None) -> None:
    """Fill a small disk, free it, go on; print what happened as JSON. The unit tests run this
    same scenario on the SQLite spool (tests/unit/test_spool.py), with a checkpoint every
    ``segment_bytes`` of log where given."""
    directory = mnt / "spool"
    options: dict[str, Any] = {"full_retry_s": 0}
    if segment_bytes is not None:
        options["segment_bytes"] = segment_bytes

    async def fill(s: SpoolLike, start: int) -> tuple[int, SpoolError]:
        ok = 0
        while True:
            try:
                await s.append(b"%06d" % (start + ok) + b"z" * 300)
            except SpoolError as exc:
                return ok, exc
            ok += 1

    s = make_spool(kind, directory, **options)
    await s.open()
    ok, refused = await fill(s, 0)
    report: dict[str, Any] = {"ok": ok, "kind": type(refused).__name__, "refused": str(refused)}
    try:
        await s.append(b"%06d" % ok + b"z" * 300)
        report["again"] = "accepted"
    except SpoolError as exc:
        report["again"] = type(exc).__name__
    await s.close()
    # A restart while the disk is still full: the backlog is there and replayable.
    s = make_spool(kind, directory, **options)
    try:
        report["recovered_while_full"] = await s.open()
    except SpoolError as exc:
        report["recovered_while_full"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(report))
        return
    report["first"] = [r.payload[:6].decode() for r in await s.read_batch(2)]
    (mnt / "filler").unlink()  # space is freed
    more, _ = await fill(s, ok)
    report["more"] = more
    await s.close()
    s = make_spool(kind, directory, **options)
    report["recovered"] = await s.open()
    seen: list[int] = []
    while records := await s.read_batch(1000):
        seen.extend(int(r.payload[:6]) for r in records)
        s.committed(records)
    await s.close()
    report["in_order"] = seen == list(range(ok + more))
    print(json.dumps(report))


def _disk_full(kind: str, scratch: Path) -> dict[str, Any]:
    if shutil.which("unshare") is None:
        return {"skipped": "needs unshare(1)"}
    mnt = scratch / f"tiny-{kind}"
    mnt.mkdir()
    shell = (
        f"mount -t tmpfs -o size=1m ingestd-spill-bench {mnt} && "
        f"head -c {256 * 1024} /dev/zero > {mnt}/filler && "
        f"exec {sys.executable} -m ingestd.tools.bench.spill child-fill {kind} {mnt}"
    )
    done = subprocess.run(  # noqa: S603 - our own arguments: paths and this module
        ["unshare", "-m", "sh", "-c", shell],  # noqa: S607 - found on PATH, as the tests do
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        return {"skipped": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    report: dict[str, Any] = json.loads(done.stdout)
    return report


# --- the producer outbox's append (synchronous, in the caller's thread) ----------------------


def _outbox_latencies(
    kind: str, directory: Path, data: list[bytes], fsync_interval_s: float
) -> list[float]:
    box: FileOutbox | DiskOutbox
    if kind == "file":
        box = FileOutbox(directory, fsync_interval_s=fsync_interval_s)
    else:
        box = DiskOutbox(directory, max_bytes=MAX_BYTES, fsync_interval_s=fsync_interval_s)
    lat: list[float] = []
    try:
        for p in data:
            t = time.perf_counter()
            box.append(p)
            lat.append(time.perf_counter() - t)
    finally:
        box.close()
    return lat


def _latency_row(lat: list[float]) -> dict[str, Any]:
    return {
        "records": len(lat),
        "per_s": round(len(lat) / sum(lat)),
        "p50_us": round(_pct(lat, 0.5) * 1e6, 1),
        "p99_us": round(_pct(lat, 0.99) * 1e6, 1),
        "p999_us": round(_pct(lat, 0.999) * 1e6, 1),
        "max_us": round(max(lat) * 1e6, 1),
    }


def _raw_fsync(directory: Path, rounds: int = 500) -> dict[str, Any]:
    """The disk's own cost: a 512-byte append plus fsync(2), the floor under both spools."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    lat: list[float] = []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            os.write(fd, b"p" * 512)
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return {"p50_ms": _ms(_pct(lat, 0.5)), "p99_ms": _ms(_pct(lat, 0.99))}


# --- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SpillOptions:
    """Sizes of one run."""

    records: int = 200_000
    sequential: int = 3_000
    outbox_records: int = 50_000
    rounds: int = 3
    directory: str | None = None
    json_path: str | None = None


OUTBOXES: Final[tuple[tuple[str, Callable[[Path, list[bytes]], list[float]]], ...]] = (
    ("file, fsync within 50 ms", lambda d, data: _outbox_latencies("file", d, data, 0.05)),
    ("sqlite, fsync within 50 ms", lambda d, data: _outbox_latencies("sqlite", d, data, 0.05)),
    ("file, fsync each", lambda d, data: _outbox_latencies("file", d, data, 0)),
    ("sqlite, fsync each", lambda d, data: _outbox_latencies("sqlite", d, data, 0)),
)


async def _append_round(
    kind: str, directory: Path, data: list[bytes], opts: SpillOptions
) -> dict[str, Any]:
    """Durable appends one at a time and concurrent; then reopen and replay the backlog."""
    directory.mkdir(parents=True)  # noqa: ASYNC240 - the bench runs alone in its loop
    res: dict[str, Any] = {}
    d = directory / "seq"
    res["sequential"] = await _sequential(kind, d, data[: opts.sequential])
    shutil.rmtree(d)
    res["concurrent"] = []
    for producers in CONCURRENCY:
        d = directory / f"c{producers}"
        row, s = await _concurrent(kind, d, data, producers)
        res["concurrent"].append(row)
        if producers == CONCURRENCY[-1]:
            await s.close()
            res["reopen"] = await _reopen(kind, d, len(data))
            s = make_spool(kind, d)
            await s.open()
            res["drain"] = await _drain(s)
        await s.close()
        shutil.rmtree(d)
    shutil.rmtree(directory)
    return res


def _median_of(rows: list[Any]) -> Any:
    """The field-wise median of like-shaped results (numbers; other values from the first)."""
    first = rows[0]
    if isinstance(first, dict):
        return {k: _median_of([row[k] for row in rows]) for k in first}
    if isinstance(first, list):
        return [_median_of([row[i] for row in rows]) for i in range(len(first))]
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    middle = statistics.median(rows)
    return round(middle) if isinstance(first, int) else round(middle, 3)


def _filesystem(path: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(  # noqa: S603 - our own arguments
            ["df", "-T", str(path)],  # noqa: S607 - found on PATH
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
        parts = out.split()
        return f"{parts[1]} on {parts[0]}"
    return "unknown"


async def run_spill_bench(opts: SpillOptions) -> dict[str, Any]:
    """Every measurement on both spools; the results as a JSON-able document."""
    base = Path(opts.directory) if opts.directory else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ingestd-spill-bench-", dir=base))
    doc: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "filesystem": _filesystem(scratch),
        "load_average_before": load_average(),
        "options": dataclasses.asdict(opts),
        "raw_fsync": _raw_fsync(scratch),
        "results": {},
    }
    data = payloads(opts.records)
    doc["mean_record_bytes"] = round(sum(map(len, data)) / len(data))
    rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in IMPLEMENTATIONS}
    outbox_rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in OUTBOXES}
    try:
        # Rounds interleave the spools (and rotate their order), so that other work on the
        # machine falls on each alike; the medians are reported.
        for r in range(opts.rounds):
            kinds = IMPLEMENTATIONS[r % 3 :] + IMPLEMENTATIONS[: r % 3]
            for kind in kinds:
                rounds[kind].append(await _append_round(kind, scratch / f"{kind}-{r}", data, opts))
            for name, run in OUTBOXES[r % 2 :] + OUTBOXES[: r % 2]:
                n = opts.outbox_records if "within" in name else opts.outbox_records // 20
                outbox_rounds[name].append(_latency_row(run(scratch / f"ob-{r}-{name}", data[:n])))
        for kind in IMPLEMENTATIONS:
            res = _median_of(rounds[kind])
            res["kill9"] = [
                await _kill_round(kind, scratch / f"{kind}-kill{i}", 0.5 + 0.37 * i, i % 2 == 1)
                for i in range(KILL_ROUNDS)
            ]
            res["disk_full"] = _disk_full(kind, scratch)
            doc["results"][kind] = res
        doc["outbox"] = {name: _median_of(rows) for name, rows in outbox_rounds.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    doc["load_average_after"] = load_average()
    return doc


def render(doc: dict[str, Any]) -> str:
    """The results as aligned tables."""
    out = [
        f"spill-path spool bench, {doc['started']}: {doc['cpu_model']} x{doc['cpu_count']}, "
        f"{doc['filesystem']}, Python {doc['python']}, SQLite {doc['sqlite']}",
        f"raw 512 B write+fsync: p50 {doc['raw_fsync']['p50_ms']} ms, "
        f"p99 {doc['raw_fsync']['p99_ms']} ms; mean record {doc['mean_record_bytes']} B; "
        f"load {doc['load_average_before']} -> {doc['load_average_after']}",
        "",
    ]
    rows: list[list[object]] = []
    for kind, res in doc["results"].items():
        seq = res["sequential"]
        rows.append(
            [
                kind,
                "1 (sequential)",
                seq["per_s"],
                seq["p50_ms"],
                seq["p99_ms"],
                seq["written_per_record"],
                "",
            ]
        )
        for c in res["concurrent"]:
            rows.append(
                [
                    kind,
                    c["producers"],
                    c["per_s"],
                    c["p50_ms"],
                    c["p99_ms"],
                    c["written_per_record"],
                    c["disk_bytes"],
                ]
            )
    out.append("durable appends (each returns after its fsync)")
    out.append(
        format_table(
            [
                "spool",
                "producers",
                "records/s",
                "p50 ms",
                "p99 ms",
                "written B/record",
                "disk bytes at end",
            ],
            rows,
        )
    )
    out.append("")
    rows = []
    for kind, res in doc["results"].items():
        kills = res["kill9"]
        rows.append(
            [
                kind,
                res["drain"]["per_s"],
                res["reopen"]["seconds"],
                sum(k["acked"] for k in kills),
                sum(k["lost"] for k in kills),
                sum(k["duplicates"] for k in kills),
                all(k["in_order"] for k in kills),
                max(k["open_ms"] for k in kills),
            ]
        )
    out.append("replay, reopen of the backlog, and kill -9 mid-append (torn tail every 2nd round)")
    out.append(
        format_table(
            [
                "spool",
                "replay rec/s",
                "reopen s",
                "acked",
                "lost",
                "dup",
                "in order",
                "max reopen ms",
            ],
            rows,
        )
    )
    out.append("")
    out.append("a full disk (1 MiB tmpfs)")
    for kind, res in doc["results"].items():
        out.append(f"  {kind}: {json.dumps(res['disk_full'])}")
    out.append("")
    out.append("producer outbox append, in the caller's thread")
    out.append(
        format_table(
            ["outbox", "appends/s", "p50 us", "p99 us", "p99.9 us", "max us"],
            [
                [k, v["per_s"], v["p50_us"], v["p99_us"], v["p999_us"], v["max_us"]]
                for k, v in doc["outbox"].items()
            ],
        )
    )
    return "\n".join(out)


async def run_spill_command(opts: SpillOptions) -> int:
    """``ingestd bench --spool``: run, print, optionally write JSON."""
    doc = await run_spill_bench(opts)
    print(render(doc))
    if opts.json_path:
        text = json.dumps(doc, indent=2) + "\n"
        Path(opts.json_path).write_text(text, encoding="utf-8")  # noqa: ASYNC240 - at the end
    return 0


def main(argv: list[str]) -> None:
    """The child processes of the kill -9 and full-disk measurements."""
    role, kind, directory, *rest = argv
    if role == "child-append":
        asyncio.run(_child_append_forever(kind, Path(directory)))
    elif role == "child-fill":
        segment_bytes = int(rest[0]) if rest else None
        asyncio.run(_child_fill(kind, Path(directory), segment_bytes))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
