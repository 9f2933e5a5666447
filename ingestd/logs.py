"""Logging set-up: plain lines or JSON lines, each with a stable ``action``; secrets redacted."""

from __future__ import annotations

import datetime as dt
import logging
import sys

import orjson

from ingestd.settings import redact

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _Redacting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class PlainFormatter(_Redacting):
    """``time level logger action=... message``."""

    def format(self, record: logging.LogRecord) -> str:
        action = getattr(record, "action", None)
        record.action_part = f" action={action}" if action else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with ``ts``, ``level``, ``logger``, ``action``, ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "action": getattr(record, "action", None) or "log",
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
