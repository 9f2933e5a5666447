"""What a new user reads first: ``ingestd --help``, each command's --help and ``--version``,
checked on the real argparse tree of every subcommand."""

from __future__ import annotations

import argparse
import importlib.metadata
import re

import pytest

from ingestd.cli import build_parser
from ingestd.wire import csv_format
from tests.commands import run_ingestd

# The commands that open a database connection / a Redis connection (what each command's code
# does); a connection option anywhere else would be a knob that does nothing.
USES_DATABASE = {
    "run",
    "migrate",
    "roles",
    "retention",
    "stats",
    "import-csv",
    "verify-csv",
    "bench",
}
USES_REDIS = {"run", "health", "halt", "resume", "trading-state", "simulate", "stats", "bench"}

# reStructuredText and Sphinx markup, and pointers to documents a user does not have.
MARKUP = re.compile(r"``|`[^`]+`_?|:[a-z]+:`|\.\. [a-z]+::|§|DESIGN|RELIABILITY|PERFORMANCE")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _summaries() -> dict[str, str | None]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {choice.dest: choice.help for choice in action._choices_actions}


SUBCOMMANDS = sorted(_subcommands())


def test_the_tables_above_name_every_subcommand() -> None:
    assert USES_DATABASE | USES_REDIS | {"health"} == set(SUBCOMMANDS)


def test_the_top_level_help_has_no_markup_and_a_summary_per_command() -> None:
    text = build_parser().format_help()
    assert not MARKUP.search(text), MARKUP.search(text)
    summaries = _summaries()
    assert set(summaries) == set(SUBCOMMANDS)
    for name, summary in summaries.items():
        assert summary and summary.strip(), f"{name} has no summary in ingestd --help"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_command_has_a_description_and_help_on_every_option(name: str) -> None:
    p = _subcommands()[name]
    assert p.description and len(p.description.split()) >= 5, f"{name}: no description"
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        what = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"ingestd {name} {what} has no help"
    text = p.format_help()
    found = MARKUP.search(text)
    assert found is None, f"ingestd {name} --help shows {found.group()!r}:\n{text}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_connection_options_only_where_the_command_connects(name: str) -> None:
    options = {o for a in _subcommands()[name]._actions for o in a.option_strings}
    assert ("--database-url" in options) == (name in USES_DATABASE)
    assert ("--redis-url" in options) == (name in USES_REDIS)


def test_import_csv_help_names_every_file_it_reads() -> None:
    text = " ".join(_subcommands()["import-csv"].format_help().split())
    for table in csv_format.CSV_TABLES:
        assert table.file_name in text


def test_version_comes_from_the_package_metadata() -> None:
    done = run_ingestd(None, "--version", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ingestd {importlib.metadata.version('ingestd')}"
