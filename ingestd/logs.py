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


class _Redacting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# The event name of a line that did not set one (e.g. from asyncpg or redis-py themselves).
DEFAULT_ACTION = "log"


class PlainFormatter(_Redacting):
    """``time level logger action=... message``; every line has an action."""

    def format(self, record: logging.LogRecord) -> str:
        action = getattr(record, "action", None) or DEFAULT_ACTION
        record.action_part = f" action={action}"
        return super().format(record)


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
        return orjson.dumps(doc).decode()


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
