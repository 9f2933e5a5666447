"""``trading:state``: whether a trader may open positions (ACTIVE), only reduce (REDUCING) or must
stop (HALTED), computed by ingestd from its own state and written straight to Redis.

The key is refreshed every ``trading.interval_s`` with a TTL of ``trading.state_ttl_s``, so an
ingestd that is gone (or cannot reach Redis) lets it expire, and **an absent key means HALTED**:
readers (``read_trading_state``) treat absent, unreadable and unreachable alike.

Inputs, all of them readable without the database:

- each replica's own commit failures and ingest lag, published by every replica into one hash
  (``ingestd:trading:replicas``) each tick, so the state covers every replica, not only the one
  that writes it;
- ``health:{collector}`` (written at intake, see ``Service``) and the newest event time of the
  watched FX pair, which every replica pushes (the newest it has taken in) into one shared key,
  besides the mirror's own version of ``fx:{pair}``: each replica sees only part of the stream;
- the operator's halt, ``trading:halt`` (no TTL), set by ``ingestd halt`` and removed by
  ``ingestd resume``;
- open half hedges, the ``alerts:half_hedge:*`` keys, counted with SCAN.

One replica writes: the one holding the lease ``ingestd:trading:leader`` (``SET NX PX``, renewed
every tick). The state is written by a script that checks the lease in the same step, so a replica
that lost its lease can never overwrite its successor's state. A new leader adopts the state it
finds in the key (its ``since`` included), so a change of writer is no change of state.

This module imports neither asyncpg nor the rest of the daemon: producers read the state with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import getpass
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson
import redis
import redis.asyncio as aioredis
import redis.exceptions

from ingestd.settings import TradingSettings

log = logging.getLogger("ingestd.trading")

STATE_KEY: Final = "trading:state"
HALT_KEY: Final = "trading:halt"
HALF_HEDGE_PREFIX: Final = "alerts:half_hedge:"
LEADER_KEY: Final = "ingestd:trading:leader"
REPORTS_KEY: Final = "ingestd:trading:replicas"
FX_SEEN_PREFIX: Final = "ingestd:trading:fx_seen:"
# The mirror's version key of fx:{pair} (event time in microseconds; see
# ingestd/daemon/sinks/mirror.py).
MIRROR_VERSION_PREFIX: Final = "ingestd:mirror:version:"
# How long the newest FX event time taken in is kept in the shared key (longer than any limit).
FX_SEEN_TTL_MS: Final = 24 * 3600 * 1000
# A heartbeat dated further ahead than this is not fresh (as ``ingestd health`` judges it).
MAX_CLOCK_AHEAD_S: Final = 2.0
ABSENT_REASON: Final = "trading:state is absent: ingestd is not running or cannot reach Redis"


class State(enum.Enum):
    """The three states, in increasing severity."""

    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"

    @property
    def severity(self) -> int:
        """0 ACTIVE, 1 REDUCING, 2 HALTED."""
        return _SEVERITY[self]


_SEVERITY: Final = {State.ACTIVE: 0, State.REDUCING: 1, State.HALTED: 2}


@dataclasses.dataclass(frozen=True, slots=True)
class TradingState:
    """What ``trading:state`` says (or HALTED, with why, when it cannot be read)."""

    state: State
    reasons: tuple[str, ...]
    since: dt.datetime | None

    @property
    def halted(self) -> bool:
        """True unless the state is ACTIVE or REDUCING."""
        return self.state is State.HALTED

    def to_json(self) -> bytes:
        """The key's value."""
        since = None if self.since is None else _iso(self.since)
        return orjson.dumps(
            {"state": self.state.value, "reasons": list(self.reasons), "since": since}
        )


def parse_state(raw: bytes | str | None) -> TradingState:
    """The state a ``trading:state`` value says; absent or unreadable is HALTED."""
    if raw is None:
        return TradingState(State.HALTED, (ABSENT_REASON,), None)
    try:
        data = orjson.loads(raw)
        state = State(data["state"])
        reasons = tuple(str(r) for r in data.get("reasons") or ())
        since_text = data.get("since")
        since = None if since_text is None else dt.datetime.fromisoformat(since_text)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return TradingState(State.HALTED, (f"trading:state is unreadable: {exc}",), None)
    if since is not None and since.tzinfo is None:
        return TradingState(State.HALTED, ("trading:state is unreadable: naive since",), None)
    return TradingState(state, reasons, since)


def read_trading_state(client: redis.Redis, *, key_prefix: str = "") -> TradingState:
    """Read ``trading:state`` with a synchronous client; any failure to read is HALTED."""
    try:
        raw = client.get(key_prefix + STATE_KEY)
    except (redis.exceptions.RedisError, OSError) as exc:
        return TradingState(State.HALTED, (f"cannot read trading:state: {exc}",), None)
    return parse_state(raw)


async def aread_trading_state(client: aioredis.Redis, *, key_prefix: str = "") -> TradingState:
    """Read ``trading:state`` with an asyncio client; any failure to read is HALTED."""
    try:
        raw = await client.get(key_prefix + STATE_KEY)
    except (redis.exceptions.RedisError, OSError) as exc:
        return TradingState(State.HALTED, (f"cannot read trading:state: {exc}",), None)
    return parse_state(raw)


# --- the operator's halt ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class OperatorHalt:
    """``trading:halt``: who halted, when, why."""

    reason: str
    at: dt.datetime
    by: str


def halt_value(reason: str, *, now: dt.datetime | None = None) -> bytes:
    """The JSON of ``trading:halt`` for ``ingestd halt --reason``."""
    moment = now or dt.datetime.now(dt.UTC)
    by = f"{_user()}@{socket.gethostname()}"
    return orjson.dumps({"reason": reason, "at": _iso(moment), "by": by})


def parse_halt(raw: bytes | str | None) -> OperatorHalt | None:
    """The operator's halt; a value that cannot be read still halts (reason says so)."""
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
        return OperatorHalt(
            str(data["reason"]), dt.datetime.fromisoformat(data["at"]), str(data.get("by", "?"))
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return OperatorHalt(f"(unreadable trading:halt: {exc})", dt.datetime.now(dt.UTC), "?")


def set_halt(client: redis.Redis, reason: str, *, key_prefix: str = "") -> None:
    """Set the operator's halt (no TTL: it stays until ``clear_halt``)."""
    client.set(key_prefix + HALT_KEY, halt_value(reason))


def clear_halt(client: redis.Redis, *, key_prefix: str = "") -> OperatorHalt | None:
    """Remove the operator's halt; the halt that was removed, if any."""
    pipe = client.pipeline(transaction=True)
    pipe.get(key_prefix + HALT_KEY)
    pipe.delete(key_prefix + HALT_KEY)
    raw, _ = pipe.execute()
    return parse_halt(raw)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# --- the daemon side -------------------------------------------------------------------------


# The thresholds the state is computed with are the ``trading:`` settings themselves (one
# definition: a copy of its fields here had to follow every new setting by hand).
Limits = TradingSettings


@dataclasses.dataclass(frozen=True, slots=True)
class LocalReport:
    """One replica's own conditions: how long its commits have failed, its ingest lag."""

    failing_s: float | None
    lag_s: float | None


# KEYS = leader key; ARGV = me, lease ms. 1 when this replica holds the lease (taken or renewed).
_LEASE: Final = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if not holder then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""

# KEYS = leader key, state key; ARGV = me, state JSON, state ttl ms. Written only by the holder.
_WRITE_IF_LEADER: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS = leader key; ARGV = me. Gives the lease up if held (a clean stop: no wait for a successor).
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS = key; ARGV = microseconds, ttl ms. Keeps the larger of the stored and the given value.
_SET_MAX: Final = """
local current = tonumber(redis.call('GET', KEYS[1]))
if (not current) or tonumber(ARGV[1]) > current then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""


class StateKeeper:
    """Computes and (as leader) publishes ``trading:state`` every ``interval_s``.

    ``tick()`` never touches the database and never raises on a Redis failure: a replica that
    cannot reach Redis publishes nothing, and the key expiring is the HALTED it should be.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        limits: Limits,
        *,
        replica: str,
        key_prefix: str = "",
        local: Callable[[], LocalReport],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.limits = limits
        self.replica = replica
        self.prefix = key_prefix
        self._local = local
        self._clock = clock
        self._lease = client.register_script(_LEASE)
        self._write = client.register_script(_WRITE_IF_LEADER)
        self._set_max = client.register_script(_SET_MAX)
        self._release = client.register_script(_RELEASE)
        self.leader = False
        # What this replica last published (as leader), and since when the conditions have
        # allowed each less severe state (hysteresis).
        self.published: TradingState | None = None
        self._calm_since: dict[State, float] = {}
        self._fx_seen_us: int | None = None
        self._fx_pushed_us: int | None = None
        self.transitions: Counter[tuple[str, str]] = Counter()
        self._failing = False

    @property
    def published_state(self) -> str | None:
        """The state this replica last wrote (None while it is not the writer)."""
        return None if self.published is None or not self.leader else self.published.state.value

    # intake: called by the sources for every parsed event
    def note_fx_time(self, moment: dt.datetime) -> None:
        """The event time of an FX rate of the watched pair that was taken in."""
        us = _micros(moment)
        if self._fx_seen_us is None or us > self._fx_seen_us:
            self._fx_seen_us = us

    def _key(self, name: str) -> str:
        return self.prefix + name

    async def tick(self) -> TradingState | None:
        """Report, take or renew the lease, and publish as leader; the state written, if any."""
        try:
            result = await self._tick()
        except (redis.exceptions.RedisError, OSError) as exc:
            # Not the leader any more as far as we know: a new term re-reads the key first.
            self.leader = False
            if not self._failing:
                log.warning(
                    "cannot publish trading:state (it expires, readers see HALTED): %s",
                    exc,
                    extra={"action": "trading_state_failed"},
                )
                self._failing = True
            return None
        if self._failing:
            log.info("trading:state written again", extra={"action": "trading_state_recovered"})
            self._failing = False
        return result

    async def _tick(self) -> TradingState | None:
        lim = self.limits
        report = self._local()
        now_wall = dt.datetime.now(dt.UTC)
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(
            self._key(REPORTS_KEY),
            self.replica,
            orjson.dumps(
                {"at": now_wall.timestamp(), "failing_s": report.failing_s, "lag_s": report.lag_s}
            ),
        )
        await pipe.execute()
        if lim.fx_pair and self._fx_seen_us is not None and self._fx_seen_us != self._fx_pushed_us:
            await self._set_max(
                keys=[self._key(FX_SEEN_PREFIX + lim.fx_pair.lower())],
                args=[self._fx_seen_us, FX_SEEN_TTL_MS],
            )
            self._fx_pushed_us = self._fx_seen_us
        was_leader = self.leader
        self.leader = bool(
            await self._lease(
                keys=[self._key(LEADER_KEY)], args=[self.replica, int(lim.lease_s * 1000)]
            )
        )
        if not self.leader:
            if was_leader:
                log.info("no longer writing trading:state", extra={"action": "trading_follower"})
            self.published = None
            return None
        if not was_leader or self.published is None:
            await self._adopt()
            log.info(
                "writing trading:state (this replica holds the lease)",
                extra={"action": "trading_leader"},
            )
        worst, reasons = await self._conditions(now_wall)
        state = self._with_hysteresis(worst, reasons, now_wall)
        written = await self._write(
            keys=[self._key(LEADER_KEY), self._key(STATE_KEY)],
            args=[self.replica, state.to_json(), int(lim.state_ttl_s * 1000)],
        )
        if not written:
            self.leader = False
            self.published = None
            return None
        self.published = state
        return state

    async def release(self) -> None:
        """On a clean stop: withdraw this replica's report and give the lease up (if held), so
        that another replica writes at its next tick; the state in the key stays until then.
        Redis errors are ignored: the report ages out and the lease expires by themselves."""
        was_leader, self.leader, self.published = self.leader, False, None
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self._client.hdel(self._key(REPORTS_KEY), self.replica)
            if was_leader:
                await self._release(keys=[self._key(LEADER_KEY)], args=[self.replica])

    async def _adopt(self) -> None:
        """Take over the state in the key (absent: HALTED since now), so a new writer is no
        new state; hysteresis counts afresh."""
        current = parse_state(await self._client.get(self._key(STATE_KEY)))
        since = current.since or dt.datetime.now(dt.UTC)
        self.published = TradingState(current.state, current.reasons, since)
        self._calm_since = {}

    async def _conditions(self, now: dt.datetime) -> tuple[State, list[str]]:
        lim = self.limits
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._key(REPORTS_KEY))
        pipe.get(self._key(HALT_KEY))
        pipe.get(self._key("health:" + lim.collector_component))
        fx_name = "fx:" + lim.fx_pair.lower()
        pipe.get(self._key(FX_SEEN_PREFIX + lim.fx_pair.lower()))
        pipe.get(self._key(MIRROR_VERSION_PREFIX + fx_name))
        reports_raw, halt_raw, beat_raw, fx_seen_raw, fx_mirror_raw = await pipe.execute()
        halted: list[str] = []
        halt = parse_halt(halt_raw)
        if halt is not None:
            halted.append(f"halted by operator {halt.by} at {_iso(halt.at)}: {halt.reason}")
        halted.extend(await self._replica_reasons(reports_raw, now))
        if lim.collector_component:
            age = _age_of_iso(beat_raw, now)
            name = lim.collector_component
            if age is None:
                halted.append(f"no fresh heartbeat from {name} (health:{name} absent)")
            elif age > lim.max_heartbeat_age_s:
                halted.append(f"{name} heartbeat {age:.1f}s old (> {lim.max_heartbeat_age_s:g}s)")
        if lim.fx_pair:
            newest = max(
                (int(v) for v in (fx_seen_raw, fx_mirror_raw) if v is not None), default=None
            )
            if newest is None:
                halted.append(f"no {lim.fx_pair} rate taken in")
            else:
                age = now.timestamp() - newest / 1_000_000
                if age > lim.max_fx_age_s:
                    halted.append(
                        f"newest {lim.fx_pair} rate {age:.1f}s old (> {lim.max_fx_age_s:g}s)"
                    )
        if halted:
            return State.HALTED, halted
        hedges = await self._count_half_hedges()
        if hedges:
            return State.REDUCING, [f"{hedges} half-hedged position(s) open"]
        return State.ACTIVE, []

    async def _replica_reasons(self, reports_raw: dict[Any, Any], now: dt.datetime) -> list[str]:
        lim = self.limits
        reasons: list[str] = []
        gone: list[Any] = []
        # A replica that stopped reporting is gone (or cut off from Redis, and then it cannot
        # commit anything it reads from the stream either): its report no longer counts.
        stale_after = max(3 * lim.interval_s, lim.lease_s)
        for name, raw in reports_raw.items():
            replica = name.decode() if isinstance(name, bytes) else str(name)
            try:
                report = orjson.loads(raw)
                at = float(report["at"])
                failing = report.get("failing_s")
                lag = report.get("lag_s")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                gone.append(name)
                continue
            if now.timestamp() - at > stale_after:
                gone.append(name)
                continue
            if failing is not None and failing >= lim.max_commit_failing_s:
                reasons.append(
                    f"commits failing for {failing:.0f}s on {replica} "
                    f"(> {lim.max_commit_failing_s:g}s)"
                )
            if lag is not None and lag > lim.max_ingest_lag_s:
                reasons.append(f"ingest lag {lag:.0f}s on {replica} (> {lim.max_ingest_lag_s:g}s)")
        if gone:
            await self._client.hdel(self._key(REPORTS_KEY), *gone)
        return reasons

    async def _count_half_hedges(self) -> int:
        # Plain SCAN calls rather than scan_iter: a tick cancelled mid-count (a stop) leaves no
        # half-iterated async generator behind.
        pattern = _glob_escape(self._key(HALF_HEDGE_PREFIX)) + "*"
        count = 0
        cursor = 0
        while True:
            cursor, found = await self._client.scan(cursor, match=pattern, count=1000)
            if found:
                # One key per position_key; its value lists each producer's half-hedged
                # position under that key (``alerts``), so two producers' count as two.
                count += sum(_positions_in(raw) for raw in await self._client.mget(found))
            if cursor == 0:
                return count

    def _with_hysteresis(self, worst: State, reasons: list[str], now: dt.datetime) -> TradingState:
        """More severe at once; less severe only once the conditions have allowed that state
        (or a calmer one) for ``recover_after_s`` without a break."""
        current = self.published
        assert current is not None
        clock = self._clock()
        # For each calmer state: since when the conditions have allowed it without a break.
        for level in (State.ACTIVE, State.REDUCING):
            if worst.severity <= level.severity:
                self._calm_since.setdefault(level, clock)
            else:
                self._calm_since.pop(level, None)
        if worst.severity >= current.state.severity:
            if worst is current.state:
                return TradingState(worst, tuple(reasons), current.since)
            return self._change(current.state, worst, reasons, now)
        recover = self.limits.recover_after_s
        for level in (State.ACTIVE, State.REDUCING):
            started = self._calm_since.get(level)
            if (
                level.severity < current.state.severity
                and started is not None
                and clock - started >= recover
            ):
                kept = reasons if level is worst else [self._recovering(worst, clock), *reasons]
                return self._change(current.state, level, kept, now)
        return TradingState(
            current.state, (self._recovering(worst, clock), *reasons), current.since
        )

    def _recovering(self, worst: State, clock: float) -> str:
        calm_for = clock - self._calm_since.get(worst, clock)
        return (
            f"recovering: conditions allow {worst.value} for {calm_for:.0f}s "
            f"(needs {self.limits.recover_after_s:g}s)"
        )

    def _change(self, old: State, new: State, reasons: list[str], now: dt.datetime) -> TradingState:
        self.transitions[(old.value, new.value)] += 1
        log.log(
            logging.WARNING if new is not State.ACTIVE else logging.INFO,
            "trading state %s -> %s: %s",
            old.value,
            new.value,
            "; ".join(reasons) or "all clear",
            extra={"action": "trading_state"},
        )
        return TradingState(new, tuple(reasons), now)


def _micros(moment: dt.datetime) -> int:
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _age_of_iso(raw: bytes | str | None, now: dt.datetime) -> float | None:
    """Seconds since an ISO-8601 time; None when unreadable or dated too far ahead (a wrong
    clock says nothing about liveness); slightly ahead counts as 0."""
    if raw is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if moment.tzinfo is None:
        return None
    age = (now - moment).total_seconds()
    return None if age < -MAX_CLOCK_AHEAD_S else max(0.0, age)


def _positions_in(raw: bytes | str | None) -> int:
    """How many positions one ``alerts:half_hedge:*`` value names (at least one while it exists:
    a value that cannot be read still means a half hedge)."""
    if raw is None:
        return 0  # deleted between the SCAN and the MGET
    try:
        alerts = orjson.loads(raw).get("alerts")
    except (orjson.JSONDecodeError, AttributeError):
        return 1
    return len(alerts) if isinstance(alerts, list) and alerts else 1


def _glob_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append("\\" + ch if ch in "*?[]\\" else ch)
    return "".join(out)


def state_names() -> Iterable[str]:
    """The state names, for the per-state gauge."""
    return (s.value for s in State)
