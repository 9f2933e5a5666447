"""What the Redis mirror writes: the set-if-newer script, versions, and the spread snapshot.

Part of the wire format: the daemon's mirror (``ingestd.daemon.sinks.mirror``) and producers that
write
mirror keys directly (``ingestd.producer.storage.redis_cache``) use the same script and the same
versions,
so a direct write and the mirror never fight. See ``ingestd.daemon.sinks.mirror`` for how it is
used.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any, Final

from ingestd.wire.events import Event, utc_iso

# Each mirror key's version (event time in microseconds; for open counts a number drawn under
# the positions lock, see sinks/postgres.py) lives in a key of its own beside it, with the same
# TTL: when a value expires its version goes with it, so an event dated in the future (a skewed
# clock) holds a key for one TTL at most instead of locking it for good.
VERSION_KEY_PREFIX: Final = "ingestd:mirror:version:"

# KEYS = version key, mirror key, for each write; ARGV = value, ttl_ms, version for each write.
# Returns one status per write: WRITTEN, SUPERSEDED (a newer version is there) or STALE.
# ">=" so that rewriting the same event sets its TTL again (catch-up, duplicate delivery); the
# TTL it gets is still counted from its event time.
SET_IF_NEWER: Final = """
-- Redis's clock, in microseconds like the versions (exact in a double until the year 2255).
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local statuses = {}
for i = 1, #KEYS, 2 do
    local j = (i - 1) / 2 * 3
    local version = tonumber(ARGV[j + 3])
    local ttl = tonumber(ARGV[j + 2])
    local status = 1
    if ttl > 0 then
        -- What is left of the TTL counted from the event time; a future event gets the TTL.
        ttl = math.min(ttl, math.floor((ttl * 1000 - (now - version)) / 1000))
        if ttl < 1 then
            status = -1
        end
    end
    if status == 1 then
        local current = redis.call('GET', KEYS[i])
        -- A key never written (or expired) has no version: any event time is newer.
        if current and version < tonumber(current) then
            status = 0
        elseif ttl > 0 then
            redis.call('SET', KEYS[i + 1], ARGV[j + 1], 'PX', ttl)
            redis.call('SET', KEYS[i], ARGV[j + 3], 'PX', ttl)
        else
            redis.call('SET', KEYS[i + 1], ARGV[j + 1])
            redis.call('SET', KEYS[i], ARGV[j + 3])
        end
    end
    statuses[#statuses + 1] = status
end
return statuses
"""

# The script's status for each write.
WRITTEN: Final = 1
SUPERSEDED: Final = 0  # a newer version is in Redis: left as it is
STALE: Final = -1  # the event time is older than the TTL: not written


def version_key(prefix: str, key: str) -> str:
    """The key holding the version of mirror key ``key`` (which already carries ``prefix``)."""
    return prefix + VERSION_KEY_PREFIX + key[len(prefix) :]


def script_call(
    prefix: str, writes: Iterable[tuple[str, str, int, int]]
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of the set-if-newer script for (key, value, ttl_ms, version) writes."""
    keys: list[str] = []
    args: list[str | int] = []
    for key, value, ttl_ms, version in writes:
        keys.extend((version_key(prefix, key), key))
        args.extend((value, ttl_ms, version))
    return keys, args


def version_micros(moment: dt.datetime) -> int:
    """A mirror version: ``moment`` in microseconds since the epoch (exact, unlike a float)."""
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def spread_snapshot(ev: Event) -> dict[str, Any]:
    """The JSON object of ``spreads:{SYMBOL}:last``: columns, decimals as strings, UTC time."""
    v = ev.values
    return {
        "symbol": v["symbol"],
        "upbit_price": v["upbit_price"],
        "binance_price": v["binance_price"],
        "binance_price_krw": v["binance_price_krw"],
        "spread_pct": v["spread_pct"],
        "net_spread_pct": v["net_spread_pct"],
        "is_opportunity": v["is_opportunity"] == "true",
        "timestamp": utc_iso(ev.time),
        "event_id": ev.event_id,
        "producer": ev.producer,
        # Whether ingestd judged the inputs stale, and their times (null when not sent).
        "is_stale": v.get("is_stale") == "true",
        "upbit_ts": _utc_text(v.get("upbit_ts")),
        "binance_ts": _utc_text(v.get("binance_ts")),
        "fx_ts": _utc_text(v.get("fx_ts")),
    }


def _utc_text(text: str | None) -> str | None:
    """A validated time's text in the snapshot's UTC form."""
    return None if text is None else utc_iso(dt.datetime.fromisoformat(text))
