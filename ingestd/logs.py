"""Logging set-up: plain lines or JSON lines, each with a stable ``action``; secrets redacted."""

from __future__ import annotations

import datetime as dt
import logging
import sys
import types

import orjson

from ingestd.settings import redact

log = logging.getLogger("ingestd")
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


# Characters that must never reach a log line as themselves: C0 and C1 controls and DEL (line
# ends, terminal escapes), the Unicode line and paragraph separators, and the bidirectional
# controls that make a viewer show text in another order than it is. Input reaches log lines
# (an unknown field's name, a value in an error): escaped, a producer cannot write a line that
# passes for one of ingestd's own.
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = [
    *range(0x20),
    *range(0x7F, 0xA0),
    0x2028,
    0x2029,
    0x200E,
    0x200F,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_ESCAPES = {
    code: _SHORT_ESCAPES.get(chr(code)) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in _UNSAFE
}
# In a JSON document the same characters become JSON escapes (orjson leaves DEL, C1 and U+2028/9
# as they are): the document decodes to the exact text, and its line holds no control.
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in _UNSAFE if code >= 0x7F}

# Lines of a traceback (or stack) after a record's line start with this: a line that starts
# otherwise is the head of a record, so that a line break in an exception's text cannot begin
# a line that passes for a record.
CONTINUATION = "  | "


def escape(text: str) -> str:
    """``text`` on one line with no control characters (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return text.translate(_ESCAPES)


def _continued(text: str) -> str:
    return "".join(f"\n{CONTINUATION}{escape(line)}" for line in text.split("\n"))


# The event name of a line that did not set one (e.g. from asyncpg or redis-py themselves).
DEFAULT_ACTION = "log"


class PlainFormatter(logging.Formatter):
    """``time level logger action=... message``; every line has an action.

    The record's line is escaped as a whole (message, arguments, logger name, action): no call
    site has to remember which of its arguments came from input. A traceback follows on
    continuation lines (``CONTINUATION``), each escaped as well. Passwords are redacted.
    """

    def format(self, record: logging.LogRecord) -> str:
        action = getattr(record, "action", None) or DEFAULT_ACTION
        record.action_part = f" action={action}"
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = escape(redact(self.formatMessage(record)))
        if record.exc_info:
            text += _continued(redact(self.formatException(record.exc_info)))
        elif record.exc_text:
            text += _continued(redact(record.exc_text))
        if record.stack_info:
            text += _continued(redact(self.formatStack(record.stack_info)))
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line with ``ts``, ``level``, ``logger``, ``action``, ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "action": getattr(record, "action", None) or DEFAULT_ACTION,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc and key != "action_part":
                doc[key] = value if isinstance(value, int | float | bool) else redact(str(value))
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exc"] = redact(record.exc_text)
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(doc).decode().translate(_JSON_ESCAPES)


def configure(level: str = "INFO", fmt: str = "plain") -> None:
    """Install one stderr handler on the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            PlainFormatter("%(asctime)s %(levelname)s %(name)s%(action_part)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # An exception nobody caught is logged like any other line, so it is redacted as well (its
    # text may hold a DSN); the default hook would print it raw.
    sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], exc: BaseException, tb: types.TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    log.critical("uncaught exception: %s", exc, exc_info=(kind, exc, tb), extra={"action": "crash"})
