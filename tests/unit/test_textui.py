"""The terminal output of the CSV commands and ``ingestd stats`` (rich): plain, greppable text
off a terminal, a bar and styles on one, no colour with ``NO_COLOR``."""

from __future__ import annotations

import io
import re

import pytest

from ingestd.commands.textui import Column, Progress, Section, format_table, render_sections, table

ESCAPE = re.compile(r"\x1b\[")
COLOUR = re.compile(r"\x1b\[[0-9;]*3[0-9][;m]")  # a foreground colour (30-39, 38;5;n, 38;2;...)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """Output that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_lines_are_rate_limited_and_show_rows_rate_eta() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, mode="lines", line_interval_s=5, clock=clock)
    progress.start("spreads.csv", 1000)
    clock.now = 1.0
    progress.update(100, 5000)  # too soon
    assert out.getvalue() == ""
    clock.now = 5.0
    progress.update(250, 20000)
    # 20,000 rows in 5 s; 250 of 1,000 bytes in 5 s -> 15 s to go.
    assert out.getvalue() == "import-csv: spreads.csv 25%  20,000 rows  4,000 rows/s  ETA 0:00:15\n"
    progress.finish(1000, 40000)
    assert out.getvalue().splitlines()[-1].startswith("import-csv: spreads.csv 100%  40,000 rows")


def test_progress_auto_is_lines_off_a_terminal_and_a_bar_on_one() -> None:
    assert Progress(io.StringIO()).mode == "lines"
    assert Progress(Terminal()).mode == "bar"


def test_the_bar_shows_file_percent_rows_and_notes_print_on_lines_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    out, clock = Terminal(), Clock()
    progress = Progress(out, clock=clock)
    progress.start("orders.csv", 200, done_bytes=100)  # resumed half way
    clock.now = 2.0
    progress.update(150, 10)
    progress.note("orders.csv:7: qty [bold]x[/bold]")  # file text, never markup
    progress.finish(200, 12)
    text = out.getvalue()
    assert "orders.csv:7: qty [bold]x[/bold]\n" in text
    plain = ESCAPE.sub("", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text))
    assert "orders.csv" in plain and "100%" in plain and "12 rows" in plain
    assert COLOUR.search(text)  # a coloured bar on a terminal


def test_no_color_keeps_colour_off_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = Terminal()
    progress = Progress(out)
    progress.start("orders.csv", 200)
    progress.finish(200, 12)
    assert "orders.csv" in out.getvalue()
    assert not COLOUR.search(out.getvalue()), repr(out.getvalue())


def test_progress_off_still_reports_bad_rows() -> None:
    out = io.StringIO()
    off = Progress(out, mode="off")
    off.start("x", 1)
    off.update(1, 1, force=True)
    off.note("bad row")
    assert out.getvalue() == "bad row\n"


def test_format_table_aligns_numbers_right_and_measures_wide_characters() -> None:
    text = format_table(["table", "rows"], [["spreads", 1000000], ["fx_rates", 5], ["김치", 7]])
    lines = text.splitlines()
    assert [ln.split() for ln in lines[2:]] == [
        ["spreads", "1,000,000"],
        ["fx_rates", "5"],
        ["김치", "7"],
    ]
    assert lines[0].split() == ["table", "rows"] and set(lines[1]) == {"─"}
    # Right-aligned: every row ends in the same terminal column (a Hangul syllable is two wide).
    assert len(lines[2]) == len(lines[3]) == len(lines[4]) + 2
    assert not ESCAPE.search(text)


def test_format_table_never_cuts_or_wraps_a_long_cell() -> None:
    long = "x" * 300
    text = format_table(["file", "status"], [[long, "refused"]])
    assert text.splitlines()[2].split() == [long, "refused"]


def test_sections_fit_the_width_and_cut_only_the_columns_that_give_way() -> None:
    wide = table(
        [Column("task"), Column("runs", numeric=True), Column("detail", cut=True)],
        [["refresh_aggregates", 12, "refreshed " + "daily_pnl_summary " * 20]],
    )
    text = render_sections(
        ["header line"], [Section("rounds", [wide]), Section("notes", ["a line"])], width=60
    )
    lines = text.splitlines()
    assert lines[:3] == ["header line", "", "rounds"]
    assert max(len(ln) for ln in lines) <= 60
    row = next(ln for ln in lines if ln.startswith("refresh_aggregates"))
    assert row.split()[:2] == ["refresh_aggregates", "12"] and row.endswith("…")
    assert lines[-2:] == ["notes", "a line"] and lines[-3] == ""
    assert not ESCAPE.search(text)


def test_a_bar_stopped_half_way_gives_the_cursor_back() -> None:
    out = Terminal()
    progress = Progress(out)
    progress.start("orders.csv", 200)
    progress.update(100, 5)
    progress.close()  # the import failed: no finish
    text = out.getvalue()
    assert "\x1b[?25l" in text and text.rindex("\x1b[?25h") > text.rindex("\x1b[?25l")
    progress.close()  # twice is harmless
