"""A dead letter can always be written into the real ``dead_letters`` table, whatever the input.

The property is checked against PostgreSQL itself, not against a model of it: arbitrary text
(NULs, lone surrogates, any plane) and arbitrary bytes (invalid UTF-8) in every field, at and
beyond every column's width, and each resulting dead letter is inserted by the sink's own
statement. Any refusal (a value too long once escaped, a NUL, an invalid byte sequence) fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.daemon.deadletters import ascii_dead_letter, make_dead_letter
from ingestd.daemon.sinks.postgres import insert_dead_letters

pytestmark = [pytest.mark.pg]

# Every code point, surrogates included (Hypothesis leaves them out unless asked), with the
# troublemakers made likely.
_CHARS = st.one_of(
    st.characters(codec=None, exclude_categories=()),
    st.sampled_from(["\x00", "\ud800", "\udfff", "\\", "'", "é", "한", "\U0001f600", "\n"]),
)
_TEXT = st.lists(_CHARS, max_size=400).map("".join)
_RAW = st.one_of(_TEXT, st.binary(max_size=600))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop of this test's own: Hypothesis calls the test body synchronously, many times."""
    new = asyncio.new_event_loop()
    yield new
    new.close()


@settings(
    max_examples=250,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    raw=_RAW,
    error=_TEXT,
    source=_TEXT,
    field=st.none() | _TEXT,
    dedup_key=st.none() | _TEXT,
    event_type=st.none() | _TEXT,
    event_id=st.none() | _TEXT,
    producer=st.none() | _TEXT,
)
def test_any_dead_letter_is_written_into_the_real_table(
    db_dsn: str,
    loop: asyncio.AbstractEventLoop,
    raw: str | bytes,
    error: str,
    source: str,
    field: str | None,
    dedup_key: str | None,
    event_type: str | None,
    event_id: str | None,
    producer: str | None,
) -> None:
    letter = make_dead_letter(
        raw,
        error,
        source=source,
        field=field,
        dedup_key=dedup_key,
        event_type=event_type,
        event_id=event_id,
        producer=producer,
    )

    async def write() -> None:
        conn = await asyncpg.connect(db_dsn)
        try:
            async with conn.transaction():
                # The sink's path, and each statement on its own too: the fallbacks in
                # insert_dead_letters must not be what makes this pass.
                await conn.execute(
                    "INSERT INTO dead_letters (dedup_key, source, event_type, event_id, producer,"
                    " field, error, payload, payload_bytes, payload_sha256)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                    " ON CONFLICT (dedup_key) DO NOTHING",
                    letter.dedup_key,
                    letter.source,
                    letter.event_type,
                    letter.event_id,
                    letter.producer,
                    letter.field,
                    letter.error,
                    letter.payload,
                    letter.payload_bytes,
                    letter.payload_sha256,
                )
                plain = ascii_dead_letter(letter)
                await insert_dead_letters(conn, [plain])
                raise _Rollback
        except _Rollback:
            pass
        finally:
            await conn.close()

    loop.run_until_complete(write())


class _Rollback(Exception):
    """Leaves the table empty for the next example."""


async def test_a_dead_letter_no_escaping_can_cure_raises_and_spoils_nothing(
    db: asyncpg.Connection,
) -> None:
    # A trigger refuses one dead letter for a reason no escaping can cure: it raises (for the
    # pipeline to isolate its entry), and the transaction around it stays usable.
    await db.execute(
        """
        CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.error = 'refuse me' THEN RAISE EXCEPTION 'refused'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_one BEFORE INSERT ON dead_letters
            FOR EACH ROW EXECUTE FUNCTION refuse_one();
        """
    )
    good = [make_dead_letter(b"{}", f"bad {i}", source="s", dedup_key=f"k{i}") for i in range(3)]
    bad = make_dead_letter(b"{}", "refuse me", source="s", dedup_key="bad")
    async with db.transaction():
        with pytest.raises(asyncpg.RaiseError):
            await insert_dead_letters(db, [good[0], bad, good[1]])
        await db.execute(
            "INSERT INTO dead_letters (source, error, payload, payload_bytes,"
            " payload_sha256) VALUES ('s', 'after', '', 0, repeat('0', 64))"
        )
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 2  # k0 and 'after'
    async with db.transaction():
        await insert_dead_letters(db, good)
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 4
