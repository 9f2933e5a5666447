"""Hypothesis drives in-process submissions: valid events with one field replaced, added or
removed by arbitrary Python values (text of any code point, NaN and infinite floats and
decimals, huge integers, nested lists and mappings).

Whatever the value, a submission ends one of two ways, and the database says so at once: it is
committed (its row is there, once) or refused (exactly one dead letter, no row). Anything else
(another exception, an unanswered caller) fails the example, which Hypothesis then shrinks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from typing import Any

import asyncpg
import hypothesis
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import strategies as st

from ingestd import errors
from ingestd.daemon.app import Service
from ingestd.daemon.sources.inprocess import Outcome
from ingestd.settings import Settings
from ingestd.tools.fuzz.generate import APPEND_TYPES, SUBMIT, TABLE_OF_TYPE, Generator

pytestmark = [pytest.mark.pg, pytest.mark.redis]


class Deep:
    """Lists nested ``depth`` deep, built only when submitted: Hypothesis's own printer (and
    repr) would recurse through the real thing."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"


def _realize(value: Any) -> Any:
    if isinstance(value, Deep):
        nested: list[Any] = []
        for _ in range(value.depth):
            nested = [nested]
        return nested
    if isinstance(value, list):
        return [_realize(v) for v in value]
    if isinstance(value, dict):
        return {k: _realize(v) for k, v in value.items()}
    return value


# Text of every kind, lone surrogates, control characters and line breaks included.
ODD_TEXT = st.text(st.characters(categories=["Cs", "Cc", "Zl", "Zp", "Lo", "So", "Mn"]))
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**17, max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.decimals(allow_nan=True, allow_infinity=True)
    | st.text()
    | ODD_TEXT
    | st.datetimes(timezones=st.none() | st.timezones())
    | st.integers(min_value=1, max_value=5000).map(Deep)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
TYPES = st.sampled_from((*APPEND_TYPES, "heartbeat"))
# (what, field index or name, value): replace a field, add a key, remove a field, or nothing.
MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 20), VALUES),
    st.tuples(st.just("set"), st.integers(0, 20), st.integers(1, 5000).map(Deep)),
    st.tuples(st.just("add"), st.text(max_size=70) | ODD_TEXT, VALUES),
    st.tuples(st.just("del"), st.integers(0, 20), st.none()),
    st.tuples(st.just("keep"), st.none(), st.none()),
)


def _mutate(event: dict[str, Any], mutation: tuple[str, Any, Any]) -> str:
    what, where, shown = mutation
    value = _realize(shown)  # described by what was drawn: repr of the real thing may recurse
    # event_id and producer carry the marker that finds the dead letter: left alone.
    fields = [k for k in event if k not in ("event_id", "producer")]
    if what == "set":
        name = fields[where % len(fields)]
        event[name] = value
        return f"{name}={shown!r}"
    if what == "add":
        if where in event:
            return "nothing"
        event[where] = value
        return f"added {where!r}={shown!r}"
    if what == "del":
        name = fields[where % len(fields)]
        del event[name]
        return f"removed {name}"
    return "nothing"


async def test_any_submission_lands_once_or_is_one_dead_letter(
    settings: Settings, db: asyncpg.Connection
) -> None:
    loop = asyncio.get_running_loop()
    now = dt.datetime.now(dt.UTC)
    counter = itertools.count(1)
    service_settings = settings.replace(**{"maintenance.enabled": False}).check()

    async def submit_and_look(event: dict[str, Any], table: str | None, marker: str) -> str:
        try:
            outcome = await service.submit(event)
        except errors.InvalidEvent:
            outcome = Outcome.DEAD_LETTER
        dead = await db.fetchval(
            "SELECT count(*) FROM dead_letters WHERE source = 'submit' AND strpos(payload, $1) > 0",
            marker,
        )
        rows = 0
        if table is not None:
            # The table name comes from the fixed TABLE_OF_TYPE map.
            rows = await db.fetchval(f"SELECT count(*) FROM {table} WHERE event_id = $1", marker)
        if outcome is Outcome.COMMITTED:
            assert dead == 0, "committed, yet dead-lettered"
            if table is not None:
                assert rows == 1, f"committed, yet {rows} rows"
        else:
            assert outcome is Outcome.DEAD_LETTER, outcome
            assert dead == 1, f"refused, with {dead} dead letters"
            assert rows == 0, "refused, yet it landed"
        return str(outcome.value)

    @hypothesis.settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(seed=st.integers(0, 2**32 - 1), etype=TYPES, mutation=MUTATIONS)
    # Always tried: a field nested deeper than Python's recursion limit.
    @example(seed=0, etype="spread", mutation=("set", 0, Deep(1985)))
    def one_submission(seed: int, etype: str, mutation: tuple[str, Any, Any]) -> None:
        # The base event comes from the drawn seed alone, so a replay sends the same event;
        # only the marker (event_id and producer) is new each time.
        generator = Generator(seed, now=now, max_event_bytes=1 << 20)
        built = generator.build(etype, 1, SUBMIT)
        event = generator._to_python(built.wire, built.expected)
        marker = f"fzqabcn{next(counter)}z"
        event["event_id"] = event["producer"] = marker
        change = _mutate(event, mutation)
        kind = event.get("type")
        table = TABLE_OF_TYPE.get(kind) if isinstance(kind, str) else None
        future = asyncio.run_coroutine_threadsafe(submit_and_look(event, table, marker), loop)
        try:
            future.result(timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{etype} with {change}: {exc}") from None

    async with Service(service_settings, stream_intake=False) as service:
        # Hypothesis runs in a thread; each example's submission runs on this loop.
        await asyncio.to_thread(one_submission)
        assert service.healthy()
    assert next(counter) > 100, "Hypothesis ran too few examples to mean anything"
