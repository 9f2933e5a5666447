#!/usr/bin/env python3
"""Measure ``ingestd import-csv`` on a generated spreads.csv: rows/s and peak RSS.

    .venv/bin/python scripts/csv_import_bench.py --rows 1000000
    .venv/bin/python scripts/csv_import_bench.py --rows 100000 --rows 1000000   # flat memory?

For each size it writes a spreads.csv (no event_id column, as the producers' old files: ids are
derived from the line numbers) into a temporary directory, creates a scratch database, migrates it,
and runs, each as its own process under ``/usr/bin/time``: the import, the same import again
(checkpoint: nothing to read), the import with ``--no-resume`` (every row read, validated and met
by its unique key), and ``verify-csv``. The scratch database and the file are removed afterwards.
Nothing here is a test: the numbers go into docs/csv-migration.md by hand.
"""

# ruff: noqa: S603, S607 - runs ingestd, psql and /usr/bin/time with arguments built here

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = (
    "symbol,upbit_price,binance_price,binance_price_krw,spread_pct,net_spread_pct,"
    "is_opportunity,timestamp\n"
)


def generate(path: Path, rows: int, seed: int = 1) -> None:
    """A realistic spreads.csv: three symbols, a tick every 10 ms, exact decimal text."""
    rng = random.Random(seed)  # noqa: S311 - test data, not security
    base = {"BTC": 140_000_000.0, "ETH": 5_200_000.0, "XRP": 850.0}
    usdkrw = 1385.5
    start = 1_763_178_015  # 2025-11-15T03:40:15Z
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(HEADER)
        symbols = list(base)
        lines = []
        for i in range(rows):
            sym = symbols[i % 3]
            upbit = base[sym] * (1 + rng.uniform(-0.002, 0.002))
            binance = upbit / usdkrw / (1 + rng.uniform(0.01, 0.04))
            krw = binance * usdkrw
            spread = (upbit - krw) / krw * 100
            net = spread - 0.2
            ms = i * 10
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + ms // 1000))
            lines.append(
                f"{sym},{upbit:.2f},{binance:.8f},{krw:.2f},{spread:.4f},{net:.4f},"
                f"{'true' if net > 2.5 else 'false'},{ts}.{ms % 1000:03d}Z\n"
            )
            if len(lines) == 10_000:
                f.write("".join(lines))
                lines.clear()
        f.write("".join(lines))


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, stdout) of one command run under /usr/bin/time."""
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "TIME %e %M", *cmd],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"TIME ([0-9.]+) ([0-9]+)", proc.stderr)
    if proc.returncode not in (0, 1) or m is None:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    return float(m.group(1)), int(m.group(2)), proc.stdout


def _figures(rows: int, wall: float, rss_kib: int) -> str:
    return f"{wall:7.1f}s  {rows / wall:9,.0f} rows/s  peak RSS {rss_kib / 1024:6.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="rows (repeatable)")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get(
            "INGESTD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    sizes = args.rows or [1_000_000]
    ingestd = [sys.executable, "-m", "ingestd.cli"]
    for rows in sizes:
        name = f"ingestd_csv_bench_{os.getpid()}"
        dsn = args.admin_url.rsplit("/", 1)[0] + f"/{name}"
        env = {**os.environ, "DATABASE_URL": dsn}
        with tempfile.TemporaryDirectory(prefix="csv-bench-") as tmp:
            path = Path(tmp) / "spreads.csv"
            t0 = time.monotonic()
            generate(path, rows)
            size_mb = path.stat().st_size / 1e6
            print(f"generated {rows:,} rows ({size_mb:.0f} MB) in {time.monotonic() - t0:.1f}s")
            subprocess.run(
                [*ingestd, "migrate", "--create-database"], env=env, check=True, capture_output=True
            )
            try:
                for label, extra in (
                    ("import", []),
                    ("import again (checkpoint)", []),
                    ("import --no-resume (all duplicates)", ["--no-resume"]),
                ):
                    wall, rss, _ = timed(
                        [*ingestd, "import-csv", tmp, "--progress", "off", *extra], env
                    )
                    print(f"{label:38s} {_figures(rows, wall, rss)}")
                wall, rss, out = timed([*ingestd, "verify-csv", tmp], env)
                verdict = "OK" if " OK" in out and "MISMATCH" not in out else "MISMATCH"
                print(f"{'verify-csv':38s} {_figures(rows, wall, rss)}  {verdict}")
            finally:
                subprocess.run(
                    ["psql", args.admin_url, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                    check=False,
                )


if __name__ == "__main__":
    main()
