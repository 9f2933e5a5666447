"""Terminal output of the CSV commands and ``ingestd stats``, through rich: a progress bar on a
terminal and plain progress lines otherwise, aligned tables, and sections of tables and lines.

rich detects the terminal and its width, measures wide (East Asian) characters, and honours
``NO_COLOR``. Off a terminal (a pipe, a file, a CI log) nothing but plain text comes out: one line
per table row, no escape sequences, so the output stays greppable.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable, Sequence
from typing import Final, Literal, TextIO

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.progress import (
    BarColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

ProgressMode = Literal["auto", "bar", "lines", "off"]

# The width of sections off a terminal, where there is no width to measure.
PLAIN_WIDTH: Final = 100
# Wide enough that a table rendered "at its natural width" is never cut or wrapped.
_UNBOUNDED: Final = 10_000


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def console(out: TextIO, *, width: int | None = None) -> Console:
    """A console writing to ``out``: on a terminal at its width (styles unless ``NO_COLOR``),
    elsewhere plain text at ``width`` (default ``PLAIN_WIDTH``) columns."""
    probe = Console(file=out)
    terminal = probe.is_terminal
    return Console(
        file=out,
        width=width if width is not None else (None if terminal else PLAIN_WIDTH),
        highlight=False,
        markup=False,  # text from files and producers is shown as it is, never as markup
        emoji=False,
        soft_wrap=False,
    )


class Progress:
    """Rows, rows/s and an ETA (from bytes read) for one file at a time: a rich progress bar
    (``bar``), a plain line every ``line_interval_s`` (``lines``), or nothing (``off``); ``auto``
    is the bar on a terminal, lines elsewhere."""

    def __init__(
        self,
        out: TextIO,
        *,
        mode: ProgressMode = "auto",
        line_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._console = console(out)
        if mode == "auto":
            mode = "bar" if self._console.is_terminal else "lines"
        self.mode = mode
        self._out = out
        self._interval = line_interval_s
        self._clock = clock
        self._bar: RichProgress | None = None
        self._task = TaskID(0)
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
        if self.mode == "bar":
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rows]:,} rows  {task.fields[rate]:,.0f} rows/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._task = self._bar.add_task(
                name, total=max(total_bytes, 1), completed=done_bytes, rows=0, rate=0.0
            )
            self._bar.start()

    def update(self, done_bytes: int, rows: int, *, force: bool = False) -> None:
        """Report progress (a plain line at most every interval, or now when ``force``)."""
        if self.mode == "off":
            return
        now = self._clock()
        elapsed = max(now - self._started, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=done_bytes, rows=rows, rate=rows / elapsed)
            return
        if not force and now - self._last < self._interval:
            return
        self._last = now
        fraction = done_bytes / self._total if self._total else 1.0
        byte_rate = (done_bytes - self._start_bytes) / elapsed
        eta = (self._total - done_bytes) / byte_rate if byte_rate > 0 else 0.0
        self._out.write(
            f"import-csv: {self._name} {fraction:.0%}  {rows:,} rows  "
            f"{rows / elapsed:,.0f} rows/s  ETA {_duration(eta)}\n"
        )
        self._out.flush()

    def note(self, text: str) -> None:
        """A line of its own (a bad row, a resume), even with progress off; a bar stays below."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
            return
        self._out.write(text + "\n")
        self._out.flush()
        self._last = 0.0

    def finish(self, done_bytes: int, rows: int) -> None:
        """The file is done: a last report (the bar stays on the screen, complete)."""
        if self.mode == "off":
            return
        self.update(done_bytes, rows, force=True)
        self.close()

    def close(self) -> None:
        """Stop the bar's display (it hides the cursor while drawn), also when an import stops
        half way; nothing to do otherwise."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    """A table column: numbers are right-aligned; ``cut`` columns give way (cut with "…") when
    the table is wider than the output, the others keep their width."""

    header: str
    numeric: bool = False
    cut: bool = False


# Columns apart: one space of padding and SIMPLE_HEAD's (blank) divider.
_GAP: Final = 2


class FittedTable:
    """A table that fits the width it is printed at: a header, a rule, one line per row, no
    borders; the columns that may be cut share what the others leave, and are cut with "…"."""

    def __init__(self, columns: Sequence[Column], rows: Sequence[Sequence[object]]) -> None:
        self.columns = tuple(columns)
        self.rows = [[cell(v) for v in row] for row in rows]

    def natural_widths(self) -> list[int]:
        """Each column's width with nothing cut."""
        return [
            max([cell_len(c.header), *(cell_len(r[i]) for r in self.rows)])
            for i, c in enumerate(self.columns)
        ]

    def __rich_console__(self, con: Console, options: ConsoleOptions) -> RenderResult:
        natural = self.natural_widths()
        cut = [i for i, c in enumerate(self.columns) if c.cut]
        fixed = sum(w for i, w in enumerate(natural) if i not in cut)
        spare = options.max_width - fixed - _GAP * (len(natural) - 1)
        widths = list(natural)
        # The narrowest first: what one does not need is left to the next.
        for n, i in enumerate(sorted(cut, key=lambda i: natural[i])):
            share = max(spare // (len(cut) - n), cell_len(self.columns[i].header), 1)
            widths[i] = min(natural[i], share)
            spare -= widths[i]
        t = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            padding=(0, 1, 0, 0),
            header_style="bold",
        )
        for c, width in zip(self.columns, widths, strict=True):
            t.add_column(
                c.header,
                justify="right" if c.numeric else "left",
                no_wrap=True,
                overflow="ellipsis",
                width=width,
            )
        for row in self.rows:
            t.add_row(*row)
        yield t


def table(columns: Sequence[Column], rows: Sequence[Sequence[object]]) -> FittedTable:
    """A table of ``columns`` (see ``FittedTable``)."""
    return FittedTable(columns, rows)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned plain-text table at its natural width (numbers right-aligned, text
    left-aligned); nothing is cut or wrapped, one line per row."""
    numeric = [
        bool(rows)
        and all(isinstance(row[i], int | float) or row[i] in (None, "", "-") for row in rows)
        for i in range(len(headers))
    ]
    columns = [Column(h, numeric=n) for h, n in zip(headers, numeric, strict=True)]
    return render_text([table(columns, rows)], width=_UNBOUNDED).rstrip("\n")


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    """A titled part of a report: its lines and tables in order."""

    title: str
    body: Sequence[RenderableType]


def print_sections(out: TextIO, header: Sequence[str], sections: Sequence[Section]) -> None:
    """The header lines, then each section: its title, its body, a blank line between; on a
    terminal at its width, elsewhere as plain text ``PLAIN_WIDTH`` columns wide."""
    con = console(out)
    if con.is_terminal:
        _print_sections(con, header, sections)
    else:
        out.write(render_sections(header, sections))


def _print_sections(con: Console, header: Sequence[str], sections: Sequence[Section]) -> None:
    for line in header:
        con.print(line)
    for section in sections:
        con.print()
        con.print(section.title, style="bold")
        for part in section.body:
            con.print(part)


def render_text(parts: Sequence[RenderableType], *, width: int = PLAIN_WIDTH) -> str:
    """Lines and tables as plain text ``width`` columns wide (no escape sequences)."""
    buf = io.StringIO()
    con = console(buf, width=width)
    for part in parts:
        con.print(part)
    return _plain_lines(buf.getvalue())


def render_sections(
    header: Sequence[str], sections: Sequence[Section], *, width: int = PLAIN_WIDTH
) -> str:
    """``print_sections`` as plain text ``width`` columns wide."""
    buf = io.StringIO()
    _print_sections(console(buf, width=width), header, sections)
    return _plain_lines(buf.getvalue())


def _plain_lines(text: str) -> str:
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def cell(value: object) -> str:
    """A table cell's text: numbers with thousands separators, booleans yes/no, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)
