"""The fuzz generator against the validator: what it calls valid validates to exactly the
values the oracle expects, and what it calls bad input is refused with a clear reason.

A fast check (no servers) that the campaign's expectations are the wire format's: a wrong
expectation here would make the campaign report violations that are not there.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from ingestd import errors
from ingestd.tools.fuzz.generate import Case, Fate, Generator
from ingestd.wire import decoding, events

NOW = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)
# Refused for their age, which validation alone does not know on every build: the campaign
# checks them against the database instead.
NEEDS_THE_CLOCK = {"older_than_retention"}


def _decode(case: Case) -> events.Event:
    if isinstance(case.payload, bytes | str):
        return decoding.decode_event(case.payload, max_bytes=1 << 20, default_event_id="stream:1-1")
    return events.normalize(case.payload)


def _stored(ev: events.Event, column: str) -> Any:
    if column == "producer":
        return ev.producer
    return ev.values[column]


def _same(text: Any, want: Any) -> bool:
    if isinstance(want, bool):
        return bool(text == ("true" if want else "false"))
    if isinstance(want, Decimal):
        return text is not None and Decimal(text) == want
    if isinstance(want, dt.datetime):
        return text is not None and dt.datetime.fromisoformat(text) == want
    return bool(text == want)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generated_cases_meet_the_validator(seed: int) -> None:
    generator = Generator(seed, now=NOW, max_event_bytes=1 << 20, big_payloads=False)
    cases = generator.round(1500)
    problems: list[str] = []
    for case in cases:
        if case.name in NEEDS_THE_CLOCK:
            continue
        try:
            ev = _decode(case)
        except errors.InvalidEvent as exc:
            if case.fate is not Fate.DEAD:
                problems.append(f"refused ({exc}): {case.describe()}")
            elif str(exc).startswith("internal error"):
                problems.append(f"refused as a validation bug, not bad input: {case.describe()}")
            continue
        if case.fate is Fate.DEAD:
            problems.append(f"accepted: {case.describe()}")
        elif case.row is not None:
            for column, want in case.row.values.items():
                got = _stored(ev, column)
                if not _same(got, want):
                    problems.append(f"{column}={got!r}, want {want!r}: {case.describe()}")
    assert not problems, "\n".join(problems[:20])
    fates = {c.fate for c in cases}
    assert fates == set(Fate), f"a round of 1,500 draws every fate, got {fates}"


def test_the_same_seed_gives_the_same_cases() -> None:
    first = Generator(9, now=NOW, max_event_bytes=1 << 20).round(300)
    second = Generator(9, now=NOW, max_event_bytes=1 << 20).round(300)
    assert [c.describe(10_000) for c in first] == [c.describe(10_000) for c in second]
