"""Log lines: JSON or plain, each with an action, secrets redacted."""

from __future__ import annotations

import ast
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd import logs

PLAIN_FMT = "%(asctime)s %(levelname)s %(name)s%(action_part)s %(message)s"


def record(
    msg: str,
    *args: object,
    level: int = logging.INFO,
    action: str | None = None,
    exc: bool = False,
    **extra: object,
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ConnectionError("could not reach postgresql://ingest:hunter2@db:5432/ingestd")
        except ConnectionError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("ingestd.daemon.pipeline", level, __file__, 42, msg, args, exc_info)
    if action is not None:
        rec.action = action
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_formatter_one_object_per_line() -> None:
    line = logs.JsonFormatter().format(
        record("batch of %d committed", 5000, action="flush", level=logging.WARNING)
    )
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "warning"
    assert doc["logger"] == "ingestd.daemon.pipeline"
    assert doc["action"] == "flush"
    assert doc["msg"] == "batch of 5000 committed"
    ts = dt.datetime.fromisoformat(doc["ts"])
    assert ts.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - ts) < dt.timedelta(minutes=5)


def test_json_formatter_default_action_and_multiline_message() -> None:
    line = logs.JsonFormatter().format(record("first\nsecond"))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["action"] == "log"
    assert doc["msg"] == "first\nsecond"
    assert set(doc) == {"ts", "level", "logger", "action", "msg"}


def test_json_formatter_redacts_dsn_passwords() -> None:
    line = logs.JsonFormatter().format(
        record(
            "connecting to %s and %s",
            "postgresql://ingest:hunter2@db:5432/ingestd",
            "rediss://:topsecret@cache:6380/0",
            action="connect",
        )
    )
    assert "hunter2" not in line
    assert "topsecret" not in line
    doc = json.loads(line)
    assert doc["msg"] == (
        "connecting to postgresql://ingest:***@db:5432/ingestd and rediss://:***@cache:6380/0"
    )


def test_json_formatter_extras_are_kept_and_redacted() -> None:
    line = logs.JsonFormatter().format(
        record("x", action="a", attempt=3, ok=True, delay=0.5, dsn="host=h password=pw1 user=u")
    )
    doc = json.loads(line)
    assert doc["attempt"] == 3
    assert doc["ok"] is True
    assert doc["delay"] == 0.5
    assert doc["dsn"] == "host=h password=*** user=u"
    assert "action_part" not in doc


def test_json_formatter_redacts_exception_text() -> None:
    line = logs.JsonFormatter().format(record("failed", level=logging.ERROR, exc=True))
    assert "hunter2" not in line
    doc = json.loads(line)
    assert "ConnectionError" in doc["exc"]
    assert "postgresql://ingest:***@db:5432/ingestd" in doc["exc"]


def test_plain_formatter_includes_action() -> None:
    out = logs.PlainFormatter(PLAIN_FMT).format(record("batch committed", action="flush"))
    assert " INFO ingestd.daemon.pipeline action=flush batch committed" in out


def test_plain_formatter_without_action() -> None:
    # A line from a library (asyncpg, redis-py) still carries an event name.
    out = logs.PlainFormatter(PLAIN_FMT).format(record("hello"))
    assert out.endswith(" INFO ingestd.daemon.pipeline action=log hello")


def test_plain_formatter_redacts() -> None:
    out = logs.PlainFormatter(PLAIN_FMT).format(
        record("dsn %s", "postgresql://u:hunter2@h/db", action="connect", exc=True)
    )
    assert "hunter2" not in out
    assert "action=connect dsn postgresql://u:***@h/db" in out


@pytest.fixture
def restore_root() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("fmt", "cls"), [("json", logs.JsonFormatter), ("plain", logs.PlainFormatter)]
)
def test_configure_installs_one_handler(
    restore_root: logging.Logger, fmt: str, cls: type[logging.Formatter]
) -> None:
    logs.configure("debug", fmt)
    assert len(restore_root.handlers) == 1
    assert isinstance(restore_root.handlers[0].formatter, cls)
    assert restore_root.level == logging.DEBUG


def test_uncaught_exceptions_are_logged_redacted(
    restore_root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    hook = sys.excepthook
    try:
        logs.configure("info", "json")
        try:
            raise RuntimeError("boom at postgresql://u:hunter2@db/x")
        except RuntimeError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    finally:
        sys.excepthook = hook
    err = capsys.readouterr().err
    assert "hunter2" not in err
    doc = json.loads(err.strip().splitlines()[-1])
    assert doc["action"] == "crash"
    assert doc["level"] == "critical"
    assert "postgresql://u:***@db/x" in doc["msg"]
    assert "RuntimeError" in doc["exc"]


LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _log_calls() -> Iterator[tuple[str, int, ast.Call]]:
    root = Path(logs.__file__).parent
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"log", "logger"}
            ):
                yield path.name, node.lineno, node


def test_every_log_call_in_ingestd_names_its_event() -> None:
    """Every line ingestd logs has a stable ``action``: a constant, snake_case, in ``extra``."""
    calls = list(_log_calls())
    assert len(calls) > 20
    actions: set[str] = set()
    for name, line, call in calls:
        extra = next((k.value for k in call.keywords if k.arg == "extra"), None)
        assert isinstance(extra, ast.Dict), f"{name}:{line}: no extra={{'action': ...}}"
        keys = [k.value for k in extra.keys if isinstance(k, ast.Constant)]
        assert "action" in keys, f"{name}:{line}: extra without an action"
        value = extra.values[keys.index("action")]
        assert isinstance(value, ast.Constant), f"{name}:{line}: action must be a constant"
        assert isinstance(value.value, str), f"{name}:{line}"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", value.value), f"{name}:{line}"
        actions.add(value.value)
    assert {"started", "stopped", "dead_letter", "flush_retry", "crash"} <= actions


# A producer's text meant to look like a line of ingestd's own, after a line break.
FORGED = "2026-12-03 10:00:00,000 CRITICAL ingestd.daemon.pipeline action=crash database lost"
HOSTILE = [
    f"x\n{FORGED}",
    f"x\r{FORGED}",
    f"x\r\n{FORGED}",
    f"x\u2028{FORGED}",
    f"x\u2029{FORGED}",
    f"x\x85{FORGED}",
    f"x\x0b{FORGED}",
    f"x\x0c{FORGED}",
    f"x\x1c{FORGED}",
    "colour \x1b[31mred\x1b[0m, bell \x07, nul \x00, del \x7f, bidi \u202e",
]
# Every character that a terminal or a log viewer may take as a line end or a control.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@pytest.mark.parametrize("hostile", HOSTILE)
def test_plain_lines_escape_input_derived_text(hostile: str) -> None:
    out = logs.PlainFormatter(PLAIN_FMT).format(
        record("invalid event in entry %s: %s", "1-0", hostile, action="dead_letter")
    )
    assert CONTROL.search(out) is None, repr(out)
    assert len(out.splitlines()) == 1
    assert "action=dead_letter invalid event in entry 1-0: x" in out or "colour" in out


@pytest.mark.parametrize("hostile", HOSTILE)
def test_plain_traceback_lines_cannot_pass_for_a_record(hostile: str) -> None:
    try:
        raise ValueError(hostile)
    except ValueError:
        rec = record("failed", level=logging.ERROR)
        rec.exc_info = sys.exc_info()
    out = logs.PlainFormatter(PLAIN_FMT).format(rec)
    head, *rest = out.split("\n")
    assert head.endswith("action=log failed")
    assert rest and all(line.startswith(logs.CONTINUATION) for line in rest), out
    for line in out.split("\n"):
        assert CONTROL.search(line) is None, repr(line)
    assert "ValueError: " in out


@pytest.mark.parametrize("hostile", HOSTILE)
def test_json_lines_escape_input_derived_text(hostile: str) -> None:
    try:
        raise ValueError(hostile)
    except ValueError:
        rec = record("bad %s", hostile, field=hostile, action="dead_letter")
        rec.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(rec)
    assert CONTROL.search(line) is None, repr(line)
    doc = json.loads(line)
    # The JSON escapes keep the text exact for whoever reads the document.
    assert doc["msg"] == f"bad {hostile}"
    assert doc["field"] == hostile
    assert hostile.split("\x1b", maxsplit=1)[0] in doc["exc"]


def test_escape_is_readable_and_leaves_ordinary_text_alone() -> None:
    assert logs.escape("plain text, 한국어, €") == "plain text, 한국어, €"
    assert logs.escape("a\nb\r\tc\x1b\u2028") == "a\\nb\\r\\tc\\x1b\\u2028"
