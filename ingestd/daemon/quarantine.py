"""The quarantine file: the last home of an entry that even ``dead_letters`` refused.

An entry the database refuses alone, again and again, while it takes other writes, becomes a
dead letter; if that insert is refused as well, the entry is appended here, the file and its
directory are fsync'd, and only then is the entry acknowledged. One JSON object per line:

    {"time": "<UTC ISO-8601>", "source": "stream", "key": "stream:ingestd:events:1764-0",
     "error": "...SQLSTATE P0001...", "dead_letter_error": "...", "event_id": "...",
     "encoding": "utf-8" | "base64", "payload": "<the raw payload>"}

``payload`` is the payload exactly as received: its text when it is valid UTF-8 (``encoding``
``utf-8``), else the base64 of its bytes. While the file exists and is not empty the service
reports itself unhealthy; an operator replays the entries and moves the file away to clear it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import os
from pathlib import Path
from typing import Any

import orjson


@dataclasses.dataclass(frozen=True, slots=True)
class QuarantineRecord:
    """One entry given up by the database, as it is written to the file."""

    source: str
    key: str | None
    error: str
    dead_letter_error: str
    payload: bytes | str | None
    event_id: str | None = None

    def to_json(self, now: dt.datetime) -> bytes:
        """One line of the file (with its newline)."""
        data: dict[str, Any] = {
            "time": now.isoformat(),
            "source": self.source,
            "key": self.key,
            "error": self.error,
            "dead_letter_error": self.dead_letter_error,
            "event_id": self.event_id,
        }
        data.update(_payload_fields(self.payload))
        line = orjson.dumps(data)
        # JSON leaves these unescaped, but many line readers (Python's splitlines among them)
        # break lines at them: escaped, one record is one line for every reader.
        for raw, escaped in _LINE_BREAKS:
            line = line.replace(raw, escaped)
        return line + b"\n"


_LINE_BREAKS = (
    ("\u0085".encode(), b"\\u0085"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def _payload_fields(payload: bytes | str | None) -> dict[str, Any]:
    if payload is None:
        return {"encoding": None, "payload": None}
    data = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
    try:
        return {"encoding": "utf-8", "payload": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"encoding": "base64", "payload": base64.b64encode(data).decode("ascii")}


def _clean(text: str | None) -> str | None:
    """Text orjson can write: a lone surrogate becomes its escape."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Quarantine:
    """Appends records durably (write, fsync the file, fsync the directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def add(self, record: QuarantineRecord) -> None:
        """Append ``record``; returns only once it is on disk. Raises OSError if it cannot be."""
        clean = dataclasses.replace(
            record,
            source=_clean(record.source) or "",
            key=_clean(record.key),
            error=_clean(record.error) or "",
            dead_letter_error=_clean(record.dead_letter_error) or "",
            event_id=_clean(record.event_id),
        )
        line = clean.to_json(dt.datetime.now(dt.UTC))
        async with self._lock:  # one line at a time: lines never interleave
            await asyncio.to_thread(self._append, line)

    def _append(self, line: bytes) -> None:
        directory = self.path.parent
        new_directory = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        # A new file's directory entry (and a new directory's) must be durable too, or a crash
        # could lose the file with the entry already acknowledged.
        if created:
            _fsync_directory(directory)
        if new_directory:
            _fsync_directory(directory.parent)

    def holds_entries(self) -> bool:
        """True while the file exists and is not empty (the operator has not cleared it)."""
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
