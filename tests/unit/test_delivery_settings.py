"""The delivery budget's settings: defaults, YAML, and values that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestd.errors import ConfigError
from ingestd.settings import Settings, load_settings


def test_defaults() -> None:
    p = Settings().pipeline
    assert p.max_entry_attempts == 3
    assert p.quarantine_path == "data/ingestd-quarantine.jsonl"
    assert p.max_pending_age_s == 120.0


def test_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text(
        "pipeline:\n  max_entry_attempts: 5\n  quarantine_path: /var/q.jsonl\n"
        "  max_pending_age_s: 30\n",
        encoding="utf-8",
    )
    p = load_settings(config, environ={}).pipeline
    assert (p.max_entry_attempts, p.quarantine_path, p.max_pending_age_s) == (5, "/var/q.jsonl", 30)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("pipeline.max_entry_attempts", 0, "max_entry_attempts must be >= 1"),
        ("pipeline.quarantine_path", "", "quarantine_path must name a file"),
        ("pipeline.max_pending_age_s", 0.0, "max_pending_age_s must be > 0"),
        ("pipeline.max_pending_age_s", float("nan"), "max_pending_age_s must be a finite number"),
    ],
)
def test_values_that_cannot_work_are_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, environ={}, overrides={key: value})
