"""trading:state against a real Redis: reading (absent = HALTED), the producer API, the settings,
hysteresis with a controlled clock, metrics, the simulated paper trader, and heartbeats written
at intake while the database is unreachable."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from ingestd import Service, trading
from ingestd.daemon.metrics import TradingStateCollector
from ingestd.errors import ConfigError
from ingestd.producer.storage import AsyncRedisCacheStorage, RedisCacheStorage
from ingestd.settings import Settings, load_settings
from ingestd.tools.simulate import Simulator
from tests.daemons import run_cli

pytestmark = [pytest.mark.redis]


def test_absent_unreadable_or_naive_state_reads_as_halted() -> None:
    assert trading.parse_state(None).halted
    assert "absent" in trading.parse_state(None).reasons[0]
    assert trading.parse_state(b"not json").halted
    assert trading.parse_state(b'{"state": "MAYBE"}').halted
    assert trading.parse_state(b'{"state": "ACTIVE", "since": "2026-01-01T00:00:00"}').halted
    ok = trading.parse_state(
        b'{"state": "REDUCING", "reasons": ["1 half-hedged position(s) open"],'
        b' "since": "2026-01-01T00:00:00Z"}'
    )
    assert ok.state is trading.State.REDUCING and not ok.halted
    assert ok.since == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_producer_api_reads_the_state_with_the_key_prefix(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    cache = RedisCacheStorage({"url": redis_url, "key_prefix": "pfx:"})
    try:
        assert cache.is_trading_halted()  # absent
        client.set("pfx:trading:state", b'{"state": "ACTIVE", "reasons": [], "since": null}')
        assert cache.trading_state().state is trading.State.ACTIVE
        assert not cache.is_trading_halted()
        client.set("pfx:trading:state", b'{"state": "HALTED", "reasons": ["x"], "since": null}')
        assert cache.is_trading_halted()
        assert cache.trading_state().reasons == ("x",)
    finally:
        cache.close()
        client.close()
    unreachable = RedisCacheStorage({"url": "redis://127.0.0.1:1/0"})
    try:
        assert unreachable.is_trading_halted()
        assert "cannot read" in unreachable.trading_state().reasons[0]
    finally:
        unreachable.close()


async def test_async_producer_api_reads_the_state(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    async with AsyncRedisCacheStorage({"url": redis_url}) as cache:
        assert await cache.is_trading_halted()
        client.set("trading:state", b'{"state": "REDUCING", "reasons": [], "since": null}')
        assert (await cache.trading_state()).state is trading.State.REDUCING
        assert not await cache.is_trading_halted()
    client.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trading.interval_s": 3.0}, "interval_s < trading.lease_s"),
        ({"trading.lease_s": 10.0}, "lease_s < trading.state_ttl_s"),
        ({"trading.fx_pair": "USD/KRW"}, "trading.fx_pair"),
        ({"trading.collector_component": "coll*"}, "trading.collector_component"),
        ({"trading.recover_after_s": 0.0}, "trading.recover_after_s must be > 0"),
    ],
)
def test_trading_settings_are_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        load_settings(None, environ={}, overrides=changes)


def test_trading_section_from_yaml_and_checks_off(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text(
        "trading:\n  fx_pair: ''\n  collector_component: ''\n  recover_after_s: 5\n",
        encoding="utf-8",
    )
    s = load_settings(path, environ={})
    assert (s.trading.fx_pair, s.trading.collector_component) == ("", "")
    assert s.trading.recover_after_s == 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keeper(
    client: aioredis.Redis, clock: FakeClock, report: trading.LocalReport, **limits: object
) -> trading.StateKeeper:
    base: dict[str, object] = {
        "collector_component": "",
        "fx_pair": "",
        "recover_after_s": 30.0,
        "max_commit_failing_s": 10.0,
    }
    return trading.StateKeeper(
        client,
        trading.Limits(**{**base, **limits}),  # type: ignore[arg-type]
        replica="r1",
        local=lambda: report,
        clock=clock,
    )


async def test_hysteresis_severe_at_once_calmer_only_after_the_healthy_period(
    redis_url: str,
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    sync = redis.Redis.from_url(redis_url)
    clock = FakeClock()
    k = keeper(client, clock, trading.LocalReport(failing_s=None, lag_s=None))
    # A fresh writer finds no key: HALTED, until the conditions have been clear 30 s.
    first = await k.tick()
    assert first is not None and first.state is trading.State.HALTED
    assert first.reasons[0].startswith("recovering")
    clock.now += 29.9
    still = await k.tick()
    assert still is not None and still.state is trading.State.HALTED
    clock.now += 0.2
    active = await k.tick()
    assert active is not None and active.state is trading.State.ACTIVE
    assert k.transitions[("HALTED", "ACTIVE")] == 1
    # A half hedge: REDUCING at once.
    sync.set("alerts:half_hedge:p1", b"{}")
    reducing = await k.tick()
    assert reducing is not None and reducing.state is trading.State.REDUCING
    # The operator halts: HALTED at once, with the reason.
    sync.set(trading.HALT_KEY, trading.halt_value("audit"))
    halted = await k.tick()
    assert halted is not None and halted.state is trading.State.HALTED
    assert any("audit" in r for r in halted.reasons)
    # Resume while the half hedge is still open: after 30 s the calmest allowed is REDUCING.
    assert trading.clear_halt(sync) is not None
    first_calm = await k.tick()  # the calmer period starts here, with REDUCING the worst
    assert first_calm is not None and first_calm.state is trading.State.HALTED
    sync.delete("alerts:half_hedge:p1")
    clock.now += 29
    waiting = await k.tick()
    assert waiting is not None and waiting.state is trading.State.HALTED
    clock.now += 1
    after = await k.tick()
    assert after is not None and after.state is trading.State.REDUCING
    assert after.reasons[0].startswith("recovering: conditions allow ACTIVE for 1s")
    # ...and ACTIVE once ACTIVE has been allowed for 30 s, counted from when it was.
    clock.now += 28
    assert (await k.tick()).state is trading.State.REDUCING  # type: ignore[union-attr]
    clock.now += 1
    assert (await k.tick()).state is trading.State.ACTIVE  # type: ignore[union-attr]
    assert trading.parse_state(sync.get(trading.STATE_KEY)).state is trading.State.ACTIVE
    # Metrics: the gauge marks the written state.
    families = {f.name: f for f in TradingStateCollector(k, list(trading.state_names())).collect()}
    gauge = {s.labels["state"]: s.value for s in families["ingestd_trading_state"].samples}
    assert gauge == {"ACTIVE": 1.0, "REDUCING": 0.0, "HALTED": 0.0}
    moves = {
        (s.labels["from"], s.labels["to"]): s.value
        for s in families["ingestd_trading_state_transitions"].samples
        if s.name.endswith("_total")
    }
    assert moves[("ACTIVE", "REDUCING")] == 1 and moves[("REDUCING", "HALTED")] == 1
    await client.aclose()
    sync.close()


async def test_reducing_counts_each_producers_half_hedged_position(redis_url: str) -> None:
    """One alerts:half_hedge:{position_key} key may name two producers' positions (its value's
    ``alerts``): the reason counts positions, not keys."""
    client = aioredis.Redis.from_url(redis_url)
    sync = redis.Redis.from_url(redis_url)
    clock = FakeClock()
    k = keeper(client, clock, trading.LocalReport(failing_s=None, lag_s=None), recover_after_s=0)
    two = {"producer": "paper", "alerts": [{"producer": "paper"}, {"producer": "live"}]}
    sync.set("alerts:half_hedge:pos_1", orjson.dumps(two))
    sync.set("alerts:half_hedge:pos_2", b"not json")  # unreadable: still one half hedge
    state = await k.tick()
    assert state is not None and state.state is trading.State.REDUCING
    assert state.reasons == ("3 half-hedged position(s) open",)
    sync.delete("alerts:half_hedge:pos_1", "alerts:half_hedge:pos_2")
    await client.aclose()
    sync.close()


async def test_stale_and_absent_inputs_halt_with_their_reasons(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    sync = redis.Redis.from_url(redis_url)
    clock = FakeClock()
    k = keeper(
        client,
        clock,
        trading.LocalReport(failing_s=12.0, lag_s=45.0),
        collector_component="collector",
        fx_pair="USDKRW",
    )
    state = await k.tick()
    assert state is not None
    text = " | ".join(state.reasons)
    assert "no fresh heartbeat from collector" in text
    assert "no USDKRW rate taken in" in text
    assert "commits failing for 12s on r1" in text
    assert "ingest lag 45s on r1" in text
    now = dt.datetime.now(dt.UTC)
    sync.set("health:collector", (now - dt.timedelta(seconds=30)).isoformat())
    k.note_fx_time(now - dt.timedelta(seconds=20))
    state = await k.tick()
    assert state is not None
    text = " | ".join(state.reasons)
    assert "collector heartbeat 30" in text and "newest USDKRW rate 20" in text
    # The newest FX time taken in is shared with the other replicas.
    assert sync.get(trading.FX_SEEN_PREFIX + "usdkrw") is not None
    await client.aclose()
    sync.close()


def test_paper_trader_opens_only_while_active(caplog: pytest.LogCaptureFixture) -> None:
    def opens(sim: Simulator, ticks: int) -> int:
        return sum(1 for _ in range(ticks) for ev in sim.step() if ev["type"] == "position_open")

    free = opens(Simulator(seed=3, tick_s=1.0), 3000)
    assert free > 0  # the comparison below means something
    halted = trading.TradingState(trading.State.HALTED, ("collector heartbeat 14s old",), None)
    caplog.set_level(logging.INFO, logger="ingestd.tools.simulate")
    gated = Simulator(seed=3, tick_s=1.0, trading_gate=lambda: halted)
    assert opens(gated, 3000) == 0
    assert gated.opens_refused > 0
    refusals = [r for r in caplog.records if "not opening" in r.getMessage()]
    assert len(refusals) == 1  # once per change of state, not per refused tick
    assert "HALTED (collector heartbeat 14s old)" in refusals[0].getMessage()
    active = trading.TradingState(trading.State.ACTIVE, (), None)
    assert opens(Simulator(seed=3, tick_s=1.0, trading_gate=lambda: active), 3000) == free


@pytest.mark.pg
async def test_heartbeat_written_at_intake_while_the_database_is_unreachable(
    redis_url: str, tmp_path: Path
) -> None:
    settings: Settings = load_settings(
        None,
        environ={},
        overrides={
            # Nothing listens on port 1: the database refuses connections for the whole test.
            "storage.postgres.dsn": "postgresql://postgres@127.0.0.1:1/ingestd",
            "storage.redis.url": redis_url,
            "stream.enabled": False,
            "spool.directory": str(tmp_path / "spool"),
            "metrics_port": 0,
            "pipeline.quarantine_path": str(tmp_path / "q.jsonl"),
        },
    )
    sync = redis.Redis.from_url(redis_url)
    moment = dt.datetime.now(dt.UTC).replace(microsecond=0)
    async with Service(settings) as service:
        outcome = await service.submit(
            {
                "type": "heartbeat",
                "event_id": "hb-intake-1",
                "producer": "collector",
                "component": "collector",
                "timestamp": moment.isoformat(),
            }
        )
        assert outcome.value == "spooled"  # not committed: the database is unreachable
        deadline = time.monotonic() + 10
        while sync.get("health:collector") is None:
            assert time.monotonic() < deadline, "health:collector never written"
            await asyncio.sleep(0.05)
        assert dt.datetime.fromisoformat(sync.get("health:collector").decode()) == moment  # type: ignore[union-attr]
        assert service.pool is None
    sync.close()


def test_halt_value_round_trips() -> None:
    halt = trading.parse_halt(
        trading.halt_value("fat finger", now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    )
    assert halt is not None and halt.reason == "fat finger"
    assert halt.at == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert "@" in halt.by
    broken = trading.parse_halt(b"{")
    assert broken is not None and "unreadable" in broken.reason
    assert orjson.loads(trading.halt_value("x"))["reason"] == "x"


def test_halt_needs_a_reason_and_resume_without_halt_changes_nothing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ingestd import cli

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("INGESTD_CONFIG", raising=False)
    sync = redis.Redis.from_url(redis_url)
    assert cli.main(["halt", "--reason", "   "]) == 2
    assert "--reason must be" in capsys.readouterr().err
    assert sync.get(trading.HALT_KEY) is None
    assert cli.main(["resume"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert cli.main(["halt", "--reason", "manual check"]) == 0
    halt = trading.parse_halt(sync.get(trading.HALT_KEY))
    assert halt is not None and halt.reason == "manual check"
    assert sync.ttl(trading.HALT_KEY) == -1  # no TTL: kept until resumed
    # No ingestd is writing trading:state here: absent reads as HALTED (exit 3).
    assert cli.main(["trading-state"]) == 3
    assert "absent" in capsys.readouterr().out
    sync.close()


async def test_release_on_stop_gives_the_lease_up_and_withdraws_the_report(
    redis_url: str,
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    sync = redis.Redis.from_url(redis_url)
    k = keeper(client, FakeClock(), trading.LocalReport(failing_s=None, lag_s=None))
    await k.tick()
    assert k.leader and sync.get(trading.LEADER_KEY) == b"r1"
    assert sync.hexists(trading.REPORTS_KEY, "r1")
    await k.release()
    assert sync.get(trading.LEADER_KEY) is None
    assert not sync.hexists(trading.REPORTS_KEY, "r1")
    assert sync.get(trading.STATE_KEY) is not None  # stays until a successor writes or it expires
    # Another replica's lease is never released by this one.
    sync.set(trading.LEADER_KEY, b"r2")
    k.leader = True
    await k.release()
    assert sync.get(trading.LEADER_KEY) == b"r2"
    await client.aclose()
    sync.close()


def test_simulate_paced_to_the_wall_clock_keeps_event_times_real_through_a_scenario(
    settings: Settings, rclient: redis.Redis
) -> None:
    """A collector pause drops events; the simulator's clock must not race ahead through them
    (it did when pacing counted the events sent: after the pause every event, heartbeats too,
    was dated seconds in the future, and trading:state never came back to ACTIVE)."""
    done = run_cli(
        settings,
        "simulate",
        # A count, not a duration: on a loaded machine the feed still gets past the pause.
        *("--rate", "100", "--count", "600", "--ignore-trading-state"),
        *("--scenario", "collector-pause", "--scenario-after", "1", "--scenario-duration", "3"),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # (entry id's milliseconds = when it was added, the event as published)
    stream: Any = rclient.xrange(settings.stream.key)
    entries: list[tuple[float, dict[str, object]]] = [
        (int(entry_id.decode().split("-")[0]) / 1000, orjson.loads(fields[b"event"]))
        for entry_id, fields in stream
    ]
    assert entries

    def event_time(ev: dict[str, object]) -> float:
        moment = ev.get("timestamp") or ev.get("timestamp_open") or ev.get("timestamp_close")
        return dt.datetime.fromisoformat(str(moment)).timestamp()

    first = event_time(entries[0][1])
    ahead = [event_time(ev) - added_at for added_at, ev in entries]
    collector_beats_after_pause = sum(
        1 for _, ev in entries if ev.get("component") == "collector" and event_time(ev) > first + 4
    )
    # Publishing may lag the simulated clock (a loaded machine); it never runs ahead of it by
    # more than one publish's worth (the pause was 3 s).
    assert max(ahead) < 1.0, max(ahead)
    assert collector_beats_after_pause >= 1
