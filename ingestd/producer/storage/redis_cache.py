"""``RedisCacheStorage``: producers read and write the mirror's keys (docs/redis-keys.md) directly.

    redis_cache = RedisCacheStorage(config.get("storage", {}).get("redis", {}))
    redis_cache.set_fx_rate("USDKRW", 1350.0, ttl=3)
    rate = redis_cache.get_fx_rate("USDKRW")            # Decimal("1350.0")

Keys, values and TTLs are exactly those ingestd's mirror writes, and the writes go through the
mirror's own Lua script and version keys (``ingestd:mirror:version:<key>``, with the value's
TTL): the version is the value's event time (the producer's ``timestamp``, else now), so a direct
write and ingestd's mirror never fight and the newest value by event time wins whoever writes
it. As in the mirror, a key expires its TTL after the value's event time (by the Redis server's
clock), never later than its TTL from now, and a value older than its TTL is not written: the
``set_*`` calls then return False. ``AsyncRedisCacheStorage`` is the asyncio twin; both share
``CacheKeys``, which holds all key, encoding and validation logic.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

import orjson
import redis
import redis.asyncio as aioredis
import redis.exceptions

from ingestd import clients, trading
from ingestd.errors import InvalidEvent
from ingestd.producer.storage.models import SpreadOpportunity, wire_value
from ingestd.settings import RedisSettings, Settings, build_section
from ingestd.wire import events, tables
from ingestd.wire.mirror_format import (
    SET_IF_NEWER,
    WRITTEN,
    script_call,
    spread_snapshot,
    version_micros,
)

D = decimal.Decimal

DEFAULT_FX_TTL_S: Final = 3.0
DEFAULT_SPREAD_TTL_S: Final = 60.0
DEFAULT_HEALTH_TTL_S: Final = 10.0

_SPREAD: Final = events.EVENT_TYPES["spread"]
_SPREAD_KINDS: Final = {f.name: f.kind for f in _SPREAD.fields}
_SNAPSHOT_ORDER: Final = (*(f.name for f in _SPREAD.fields), "event_id", "producer")
_SPREAD_NUMERIC: Final = tuple(
    name for name, kind in _SPREAD_KINDS.items() if isinstance(kind, tables.Numeric)
)

RedisConfig = Mapping[str, Any] | RedisSettings | Settings | None


def redis_settings(config: RedisConfig) -> RedisSettings:
    """The ``storage.redis`` mapping (url, key_prefix, ...) or settings, as RedisSettings."""
    if config is None:
        return RedisSettings()
    if isinstance(config, Settings):
        return config.storage.redis
    if isinstance(config, RedisSettings):
        return config
    return build_section(RedisSettings, config, "storage.redis")


@dataclasses.dataclass(frozen=True, slots=True)
class CacheWrite:
    """One key write for the mirror's set-if-newer script."""

    key: str
    value: str
    ttl_ms: int
    version: int


def _text(value: object, kind: tables.Varchar, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidEvent("expected a non-empty string", field=field)
    if len(value) > kind.length:
        raise InvalidEvent(f"longer than {kind.length} characters ({len(value)})", field=field)
    return value


def _ttl_ms(ttl_s: float, field: str) -> int:
    if ttl_s <= 0:
        raise InvalidEvent("a TTL must be positive (seconds)", field=field)
    return max(1, round(ttl_s * 1000))


def _moment(timestamp: dt.datetime | str | None, field: str = "timestamp") -> dt.datetime:
    if timestamp is None:
        return dt.datetime.now(dt.UTC)
    return events.time_value(timestamp, field)[1]


class CacheKeys:
    """The mirror's keys, values, TTLs and versions: shared by the sync and the asyncio storage."""

    def __init__(
        self,
        prefix: str = "",
        *,
        fx_ttl_s: float = DEFAULT_FX_TTL_S,
        spread_ttl_s: float = DEFAULT_SPREAD_TTL_S,
        health_ttl_s: float = DEFAULT_HEALTH_TTL_S,
    ) -> None:
        self.prefix = prefix
        self.fx_ttl_s = fx_ttl_s
        self.spread_ttl_s = spread_ttl_s
        self.health_ttl_s = health_ttl_s

    # --- keys ---------------------------------------------------------------------------------

    def fx_key(self, pair: str) -> str:
        """``fx:usdkrw`` for ``USDKRW``."""
        return f"{self.prefix}fx:{_text(pair, tables.Varchar(20), 'pair').lower()}"

    def spread_key(self, symbol: str) -> str:
        """``spreads:{SYMBOL}:last``."""
        return f"{self.prefix}spreads:{_text(symbol, tables.Varchar(10), 'symbol')}:last"

    def health_key(self, component: str) -> str:
        """``health:{component}``."""
        return f"{self.prefix}health:{_text(component, tables.Varchar(50), 'component')}"

    # --- writes -------------------------------------------------------------------------------

    def fx(
        self,
        pair: str,
        rate: D | float | int | str,
        ttl: float | None,
        timestamp: dt.datetime | str | None,
    ) -> CacheWrite:
        """``fx:{pair}`` = the rate as exact decimal text (a float read through its repr)."""
        value = events.numeric_text(wire_value(rate), tables.PRICE, "rate")
        ttl_s = self.fx_ttl_s if ttl is None else ttl
        moment = _moment(timestamp)
        return CacheWrite(self.fx_key(pair), value, _ttl_ms(ttl_s, "ttl"), version_micros(moment))

    def spread(
        self,
        symbol: str,
        snapshot: Mapping[str, Any] | SpreadOpportunity,
        ttl: float | None,
    ) -> CacheWrite:
        """``spreads:{SYMBOL}:last`` = the snapshot JSON, in the mirror's exact format.

        A complete spread (every column) is validated as a spread event and written exactly as
        ingestd writes it; a partial one (such as ``{"spread_pct": 0.8, ...}``) keeps the given
        columns, validated one by one, decimals as strings, plus the symbol and a UTC timestamp.
        """
        key = self.spread_key(symbol)
        data = (
            snapshot.to_event()
            if isinstance(snapshot, SpreadOpportunity)
            else {k: wire_value(v) for k, v in snapshot.items()}
        )
        if data.get("type") == "spread":  # a SpreadOpportunity's own event
            del data["type"]
        given = data.get("symbol", symbol)
        if given != symbol:
            raise InvalidEvent(f"the snapshot is for {given!r}, not {symbol!r}", field="symbol")
        data["symbol"] = symbol
        for name in data:
            if name not in _SNAPSHOT_ORDER:
                raise InvalidEvent("unknown field for a spread snapshot", field=str(name)[:60])
        complete = all(data.get(f.name) is not None for f in _SPREAD.fields if f.required)
        if complete:
            ev = events.parse_event({"type": "spread", **data})
            value = spread_snapshot(ev)
            if data.get("event_id") is None:
                value["event_id"] = None
            moment = ev.time
        else:
            value, moment = self._partial_snapshot(data)
        ttl_s = self.spread_ttl_s if ttl is None else ttl
        return CacheWrite(
            key, orjson.dumps(value).decode(), _ttl_ms(ttl_s, "ttl"), version_micros(moment)
        )

    @staticmethod
    def _partial_snapshot(data: Mapping[str, Any]) -> tuple[dict[str, Any], dt.datetime]:
        moment = _moment(data.get("timestamp"))
        out: dict[str, Any] = {}
        for name in _SNAPSHOT_ORDER:
            raw = data.get(name)
            if name == "timestamp":
                out[name] = events.utc_iso(moment)
            elif raw is None:
                continue
            elif name in _SPREAD_NUMERIC:
                kind = _SPREAD_KINDS[name]
                assert isinstance(kind, tables.Numeric)
                out[name] = events.numeric_text(raw, kind, name)
            elif name == "is_opportunity":
                if not isinstance(raw, bool):
                    raise InvalidEvent("expected true or false", field=name)
                out[name] = raw
            elif name == "event_id":
                out[name] = _text(raw, tables.EVENT_ID, name)
            elif name == "producer":
                out[name] = _text(raw, tables.PRODUCER, name)
            else:
                out[name] = raw
        return out, moment

    def heartbeat(
        self, component: str, timestamp: dt.datetime | str | None, ttl: float | None
    ) -> CacheWrite:
        """``health:{component}`` = the heartbeat's UTC ISO-8601 time."""
        moment = _moment(timestamp)
        ttl_s = self.health_ttl_s if ttl is None else ttl
        return CacheWrite(
            self.health_key(component),
            events.utc_iso(moment),
            _ttl_ms(ttl_s, "ttl"),
            version_micros(moment),
        )

    def script_call(self, write: CacheWrite) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV of the mirror's set-if-newer script for one write."""
        return script_call(self.prefix, [(write.key, write.value, write.ttl_ms, write.version)])

    # --- reads --------------------------------------------------------------------------------

    @staticmethod
    def decode_fx(raw: bytes | str | None) -> D | None:
        """The stored rate as an exact Decimal."""
        if raw is None:
            return None
        return D(raw.decode() if isinstance(raw, bytes) else raw)

    @staticmethod
    def decode_spread(raw: bytes | str | None) -> dict[str, Any] | None:
        """The stored snapshot: decimals as Decimal, ``timestamp`` as an aware datetime."""
        if raw is None:
            return None
        obj: dict[str, Any] = orjson.loads(raw)
        for name in _SPREAD_NUMERIC:
            if isinstance(obj.get(name), str):
                obj[name] = D(obj[name])
        for name in ("timestamp", "upbit_ts", "binance_ts", "fx_ts"):
            if isinstance(obj.get(name), str):
                obj[name] = dt.datetime.fromisoformat(obj[name])
        return obj

    @staticmethod
    def decode_heartbeat(raw: bytes | str | None) -> dt.datetime | None:
        """The stored heartbeat time."""
        if raw is None:
            return None
        return dt.datetime.fromisoformat(raw.decode() if isinstance(raw, bytes) else raw)


def _cache_keys(
    config: RedisConfig,
    fx_ttl_s: float | None,
    spread_ttl_s: float | None,
    health_ttl_s: float | None,
) -> CacheKeys:
    # Settings carry the TTLs ingestd's mirror uses; a bare storage.redis mapping has none.
    fx, spread, health = DEFAULT_FX_TTL_S, DEFAULT_SPREAD_TTL_S, DEFAULT_HEALTH_TTL_S
    if isinstance(config, Settings):
        fx, spread = config.fx.ttl_seconds, config.mirror.spread_ttl_s
        health = config.mirror.health_ttl_s
    return CacheKeys(
        redis_settings(config).key_prefix,
        fx_ttl_s=fx if fx_ttl_s is None else fx_ttl_s,
        spread_ttl_s=spread if spread_ttl_s is None else spread_ttl_s,
        health_ttl_s=health if health_ttl_s is None else health_ttl_s,
    )


def _sync_client(s: RedisSettings) -> redis.Redis:
    return clients.redis_sync(s.url, socket_timeout_s=s.mirror_socket_timeout_s)


class RedisCacheStorage:
    """For plain synchronous code: FX rates, spread snapshots and heartbeats in Redis."""

    def __init__(
        self,
        config: RedisConfig = None,
        *,
        client: redis.Redis | None = None,
        fx_ttl_s: float | None = None,
        spread_ttl_s: float | None = None,
        health_ttl_s: float | None = None,
    ) -> None:
        self.keys = _cache_keys(config, fx_ttl_s, spread_ttl_s, health_ttl_s)
        self._owns_client = client is None
        self._client = client if client is not None else _sync_client(redis_settings(config))
        self._script = self._client.register_script(SET_IF_NEWER)

    def __enter__(self) -> RedisCacheStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self, write: CacheWrite) -> bool:
        keys, args = self.keys.script_call(write)
        [status] = self._script(keys=keys, args=args)
        return bool(status == WRITTEN)

    def set_fx_rate(
        self,
        pair: str,
        rate: D | float | int | str,
        ttl: float | None = None,
        *,
        timestamp: dt.datetime | str | None = None,
    ) -> bool:
        """Set ``fx:{pair}``; False when a newer rate (by event time) is there or it is too old.

        Too old: ``timestamp`` (default now) is further back than the TTL on Redis's clock.
        """
        return self._write(self.keys.fx(pair, rate, ttl, timestamp))

    def get_fx_rate(self, pair: str) -> D | None:
        """The current rate, or None when absent or expired."""
        return self.keys.decode_fx(self._client.get(self.keys.fx_key(pair)))

    def set_spread_snapshot(
        self,
        symbol: str,
        snapshot: Mapping[str, Any] | SpreadOpportunity,
        ttl: float | None = None,
    ) -> bool:
        """Set ``spreads:{SYMBOL}:last``; False when a newer snapshot is there or it is too old.

        Too old: its ``timestamp`` is further back than the TTL on Redis's clock.
        """
        return self._write(self.keys.spread(symbol, snapshot, ttl))

    def get_spread_snapshot(self, symbol: str) -> dict[str, Any] | None:
        """The newest snapshot, or None when absent or expired."""
        return self.keys.decode_spread(self._client.get(self.keys.spread_key(symbol)))

    def set_health_heartbeat(
        self,
        component: str,
        *,
        timestamp: dt.datetime | str | None = None,
        ttl: float | None = None,
    ) -> bool:
        """Set ``health:{component}`` to now (or ``timestamp``), with the heartbeat TTL.

        False when a newer heartbeat is there, or ``timestamp`` is older than the TTL.
        """
        return self._write(self.keys.heartbeat(component, timestamp, ttl))

    def get_health_heartbeat(self, component: str) -> dt.datetime | None:
        """The component's last heartbeat, or None when absent or expired."""
        return self.keys.decode_heartbeat(self._client.get(self.keys.health_key(component)))

    def trading_state(self) -> trading.TradingState:
        """``trading:state``; HALTED (with why) when absent, unreadable or Redis unreachable."""
        return trading.read_trading_state(self._client, key_prefix=self.keys.prefix)

    def is_trading_halted(self) -> bool:
        """True unless ``trading:state`` says ACTIVE or REDUCING (absent = halted)."""
        return self.trading_state().halted

    def close(self) -> None:
        """Close the connection pool (if this object created it)."""
        if self._owns_client:
            self._client.close()


class AsyncRedisCacheStorage:
    """The asyncio twin of ``RedisCacheStorage``: the same calls, awaited."""

    def __init__(
        self,
        config: RedisConfig = None,
        *,
        client: aioredis.Redis | None = None,
        fx_ttl_s: float | None = None,
        spread_ttl_s: float | None = None,
        health_ttl_s: float | None = None,
    ) -> None:
        self.keys = _cache_keys(config, fx_ttl_s, spread_ttl_s, health_ttl_s)
        s = redis_settings(config)
        self._owns_client = client is None
        self._client = (
            client
            if client is not None
            else clients.redis_async(s.url, socket_timeout_s=s.mirror_socket_timeout_s)
        )
        self._script = self._client.register_script(SET_IF_NEWER)

    async def __aenter__(self) -> AsyncRedisCacheStorage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _write(self, write: CacheWrite) -> bool:
        keys, args = self.keys.script_call(write)
        [status] = await self._script(keys=keys, args=args)
        return bool(status == WRITTEN)

    async def set_fx_rate(
        self,
        pair: str,
        rate: D | float | int | str,
        ttl: float | None = None,
        *,
        timestamp: dt.datetime | str | None = None,
    ) -> bool:
        """Set ``fx:{pair}``; False when a newer rate (by event time) is there or it is too old.

        Too old: ``timestamp`` (default now) is further back than the TTL on Redis's clock.
        """
        return await self._write(self.keys.fx(pair, rate, ttl, timestamp))

    async def get_fx_rate(self, pair: str) -> D | None:
        """The current rate, or None when absent or expired."""
        return self.keys.decode_fx(await self._client.get(self.keys.fx_key(pair)))

    async def set_spread_snapshot(
        self,
        symbol: str,
        snapshot: Mapping[str, Any] | SpreadOpportunity,
        ttl: float | None = None,
    ) -> bool:
        """Set ``spreads:{SYMBOL}:last``; False when a newer snapshot is there or it is too old.

        Too old: its ``timestamp`` is further back than the TTL on Redis's clock.
        """
        return await self._write(self.keys.spread(symbol, snapshot, ttl))

    async def get_spread_snapshot(self, symbol: str) -> dict[str, Any] | None:
        """The newest snapshot, or None when absent or expired."""
        return self.keys.decode_spread(await self._client.get(self.keys.spread_key(symbol)))

    async def set_health_heartbeat(
        self,
        component: str,
        *,
        timestamp: dt.datetime | str | None = None,
        ttl: float | None = None,
    ) -> bool:
        """Set ``health:{component}`` to now (or ``timestamp``), with the heartbeat TTL.

        False when a newer heartbeat is there, or ``timestamp`` is older than the TTL.
        """
        return await self._write(self.keys.heartbeat(component, timestamp, ttl))

    async def get_health_heartbeat(self, component: str) -> dt.datetime | None:
        """The component's last heartbeat, or None when absent or expired."""
        return self.keys.decode_heartbeat(await self._client.get(self.keys.health_key(component)))

    async def trading_state(self) -> trading.TradingState:
        """``trading:state``; HALTED (with why) when absent, unreadable or Redis unreachable."""
        return await trading.aread_trading_state(self._client, key_prefix=self.keys.prefix)

    async def is_trading_halted(self) -> bool:
        """True unless ``trading:state`` says ACTIVE or REDUCING (absent = halted)."""
        return (await self.trading_state()).halted

    async def aclose(self) -> None:
        """Close the connection pool (if this object created it)."""
        if self._owns_client:
            await self._client.aclose()
