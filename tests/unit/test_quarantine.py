"""The quarantine file: one durable JSON line per entry, its payload exactly as received."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from pathlib import Path

import pytest

from ingestd.daemon.quarantine import Quarantine, QuarantineRecord


def record(payload: bytes | str | None, **changes: str | None) -> QuarantineRecord:
    fields: dict[str, str | None] = {
        "source": "stream",
        "key": "stream:ingestd:events:1-0",
        "error": "database rejected the row: no (SQLSTATE P0001)",
        "dead_letter_error": "refused too",
        "event_id": "e-1",
    }
    fields.update(changes)
    return QuarantineRecord(
        source=fields["source"] or "",
        key=fields["key"],
        error=fields["error"] or "",
        dead_letter_error=fields["dead_letter_error"] or "",
        payload=payload,
        event_id=fields["event_id"],
    )


async def test_records_are_appended_one_per_line_in_a_new_directory(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "new" / "dir" / "q.jsonl")
    assert not q.holds_entries()
    await q.add(record('{"type": "fx_rate"}'))
    await q.add(record(b'{"type": "spread"}', event_id=None))
    lines = q.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["payload"] == '{"type": "fx_rate"}'
    assert first["encoding"] == "utf-8"
    assert first["key"] == "stream:ingestd:events:1-0"
    assert "P0001" in first["error"]
    assert dt.datetime.fromisoformat(first["time"]).tzinfo is not None
    assert second["payload"] == '{"type": "spread"}' and second["event_id"] is None
    assert q.holds_entries()
    assert os.stat(q.path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe not utf-8 \x00", "lone \udc80 surrogate", b"", "\x00 nul and \u2028"],
)
async def test_any_payload_comes_back_byte_for_byte(tmp_path: Path, payload: bytes | str) -> None:
    q = Quarantine(tmp_path / "q.jsonl")
    await q.add(record(payload, key="k\udc80", error="e\x00", event_id="\ud800"))
    (line,) = q.path.read_text(encoding="utf-8").splitlines()
    data = json.loads(line)
    raw = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
    if data["encoding"] == "base64":
        assert base64.b64decode(data["payload"]) == raw
    else:
        assert data["encoding"] == "utf-8"
        assert data["payload"].encode("utf-8") == raw
    assert data["key"] == "k\\udc80"  # the descriptive fields are made valid text


async def test_moving_the_file_away_clears_it(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q.jsonl")
    await q.add(record("x"))
    q.path.rename(tmp_path / "replayed.jsonl")
    assert not q.holds_entries()


async def test_an_unwritable_place_raises_rather_than_pretending(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    q = Quarantine(blocker / "q.jsonl")
    with pytest.raises(OSError):
        await q.add(record("x"))
