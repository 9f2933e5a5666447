"""Terminal output of the CSV commands: a progress bar on a TTY, plain progress lines otherwise,
and aligned tables for the summaries."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final, Literal, TextIO

ProgressMode = Literal["auto", "bar", "lines", "off"]

_BAR_WIDTH: Final = 24


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Rows, rows/s and an ETA (from bytes read) for one file at a time."""

    def __init__(
        self,
        out: TextIO,
        *,
        mode: ProgressMode = "auto",
        line_interval_s: float = 5.0,
        bar_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode == "auto":
            isatty = getattr(out, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        self.mode = mode
        self._out = out
        self._interval = bar_interval_s if mode == "bar" else line_interval_s
        self._clock = clock
        self._name = ""
        self._total = 0
        self._start_bytes = 0
        self._started = 0.0
        self._last = 0.0

    def start(self, name: str, total_bytes: int, done_bytes: int = 0) -> None:
        """A new file; ``done_bytes`` is where a resumed import starts."""
        self._name = name
        self._total = total_bytes
        self._start_bytes = done_bytes
        self._started = self._last = self._clock()

    def update(self, done_bytes: int, rows: int, *, force: bool = False) -> None:
        """Report progress at most every interval (or now when ``force``)."""
        if self.mode == "off":
            return
        now = self._clock()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        elapsed = max(now - self._started, 1e-9)
        rate = rows / elapsed
        fraction = done_bytes / self._total if self._total else 1.0
        byte_rate = (done_bytes - self._start_bytes) / elapsed
        eta = (self._total - done_bytes) / byte_rate if byte_rate > 0 else 0.0
        stats = f"{rows:,} rows  {rate:,.0f} rows/s  ETA {_duration(eta)}"
        if self.mode == "bar":
            filled = round(_BAR_WIDTH * min(fraction, 1.0))
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            self._out.write(f"\r{self._name} [{bar}] {fraction:4.0%}  {stats}\x1b[K")
        else:
            self._out.write(f"import-csv: {self._name} {fraction:.0%}  {stats}\n")
        self._out.flush()

    def note(self, text: str) -> None:
        """A line of its own (a bad row, a resume), even with progress off; the bar is redrawn."""
        if self.mode == "bar":
            self._out.write("\r\x1b[K")
        self._out.write(text + "\n")
        self._out.flush()
        self._last = 0.0

    def finish(self, done_bytes: int, rows: int) -> None:
        """The file is done: a last report (and a line end after the bar)."""
        if self.mode == "off":
            return
        self.update(done_bytes, rows, force=True)
        if self.mode == "bar":
            self._out.write("\n")
            self._out.flush()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned plain-text table (numbers right-aligned, text left-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [
        all(isinstance(row[i], int | float) or row[i] in ("", "-") for row in rows) and rows
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)
