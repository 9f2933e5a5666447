"""The Redis mirror (docs/redis-keys.md): latest values and heartbeats, written after each commit.

Values are coalesced per key within a flush and written by one Lua call that keeps, per key, the
version it last wrote (event time in microseconds; for open counts a number drawn under the
positions lock): an older event arriving later never replaces a newer one, across writers and
replicas. Redis is a
cache: when it is down the database path goes on, the newest pending value per key is kept, and it
is written when Redis answers again.

A key with a TTL expires its TTL after its value's event time, not after the write: the script
gives it ``ttl - (now - event time)``, never more than ``ttl`` (a producer clock running ahead),
and does not write a value whose event time is older than its TTL at all (after an outage the
catch-up never serves old values as fresh). "now" is the Redis server's clock (``TIME`` inside the
script), not this host's: it is the clock that expires the keys, it is the same for every ingestd
replica and every producer writing through ``RedisCacheStorage``, and it is read at the moment of
the write, however long the write waited for Redis.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable, Sequence

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.wire import keys
from ingestd.wire.events import Event, utc_iso
from ingestd.wire.mirror_format import (
    SET_IF_NEWER,
    STALE,
    script_call,
    spread_snapshot,
    version_key,
    version_micros,
)

log = logging.getLogger("ingestd.daemon.sinks.mirror")


@dataclasses.dataclass(frozen=True, slots=True)
class MirrorWrite:
    """One coalesced key write."""

    value: str
    ttl_ms: int
    version: int
    kind: str  # the metric label: fx, spread, health, open_count


class MirrorStaging:
    """What every mirror does before writing: which keys a batch sets, to what, at which version
    (the newest event per key). ``RedisMirror`` writes them to Redis; ``MemoryMirror``
    (``ingestd.daemon.sinks.memory``) keeps them in a dict for unit tests of the pipeline."""

    def __init__(
        self,
        *,
        key_prefix: str = "",
        fx_ttl_s: float = 3.0,
        spread_ttl_s: float = 60.0,
        health_ttl_s: float = 10.0,
    ) -> None:
        self.prefix = key_prefix
        self._fx_ttl_ms = int(fx_ttl_s * 1000)
        self._spread_ttl_ms = int(spread_ttl_s * 1000)
        self._health_ttl_ms = int(health_ttl_s * 1000)
        self._pending: dict[str, MirrorWrite] = {}

    def key(self, name: str) -> str:
        """The full Redis key for a mirror key name."""
        return self.prefix + name

    def stage_events(self, items: Iterable[Item], outcome: BatchOutcome) -> None:
        """Coalesce the committed events of a batch into pending writes (newest per key).

        The newest event per key is picked first, with one time comparison per event; only
        that one is serialised (a batch of 5,000 spreads of 5 symbols renders 5 snapshots).
        """
        newest: dict[str, Event] = {}
        rejected = outcome.rejected
        for item in items:
            ev = item.event
            if ev is None or (rejected and id(item) in rejected):
                continue
            etype = ev.type
            if etype == "spread":
                key = keys.spread(str(ev.values["symbol"]))
            elif etype == "fx_rate":
                key = keys.fx(str(ev.values["pair"]))
            elif etype == "heartbeat":
                key = keys.health(str(ev.values["component"]))
            else:
                continue
            current = newest.get(key)
            if current is None or ev.time >= current.time:
                newest[key] = ev
        for key, ev in newest.items():
            version = version_micros(ev.time)
            if ev.type == "spread":
                pending = self._pending.get(self.prefix + key)
                if pending is None or version >= pending.version:
                    value = orjson.dumps(spread_snapshot(ev)).decode()
                    self._stage(key, value, self._spread_ttl_ms, version, "spread")
            elif ev.type == "fx_rate":
                self._stage(key, str(ev.values["rate"]), self._fx_ttl_ms, version, "fx")
            else:
                self._stage(key, utc_iso(ev.time), self._health_ttl_ms, version, "health")
        if outcome.open_counts_version is not None:
            for symbol, n in outcome.open_counts.items():
                self._stage(
                    keys.open_count(symbol), str(n), 0, outcome.open_counts_version, "open_count"
                )

    def stage_open_counts(self, counts: dict[str, int], version: int) -> None:
        """Stage a full reconciliation of open counts read from the database."""
        for symbol, n in counts.items():
            self._stage(keys.open_count(symbol), str(n), 0, version, "open_count")

    def stage_heartbeat(self, component: str, moment: dt.datetime) -> None:
        """Stage ``health:{component}`` (ingestd's own heartbeat uses the time it writes it)."""
        self._stage(
            keys.health(component),
            utc_iso(moment),
            self._health_ttl_ms,
            version_micros(moment),
            "health",
        )

    def _stage(self, name: str, value: str, ttl_ms: int, version: int, kind: str) -> None:
        key = self.prefix + name
        current = self._pending.get(key)
        if current is None or version >= current.version:
            self._pending[key] = MirrorWrite(value, ttl_ms, version, kind)

    @property
    def pending(self) -> int:
        """Keys waiting to be written (non-zero while Redis is unreachable)."""
        return len(self._pending)


class RedisMirror(MirrorStaging):
    """Mirrors committed events into Redis keys with TTLs."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "",
        fx_ttl_s: float = 3.0,
        spread_ttl_s: float = 60.0,
        health_ttl_s: float = 10.0,
    ) -> None:
        super().__init__(
            key_prefix=key_prefix,
            fx_ttl_s=fx_ttl_s,
            spread_ttl_s=spread_ttl_s,
            health_ttl_s=health_ttl_s,
        )
        self._client = client
        self._script = client.register_script(SET_IF_NEWER)
        self._failing = False
        self._skipping = False
        self.errors = 0
        # ingestd_mirror_stale_skipped_total{key_kind}: values not written, older than their TTL.
        self.stale_skipped: collections.Counter[str] = collections.Counter()

    async def flush(self) -> bool:
        """Write every pending key in one call; keep them for later if Redis fails."""
        if not self._pending:
            return True
        pending = self._pending
        self._pending = {}
        keys, args = script_call(
            self.prefix, ((key, w.value, w.ttl_ms, w.version) for key, w in pending.items())
        )
        try:
            statuses = await self._script(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            # Put back what has not been superseded meanwhile; the next flush retries it.
            for key, w in pending.items():
                newer = self._pending.get(key)
                if newer is None or newer.version < w.version:
                    self._pending[key] = w
            self.errors += 1
            if not self._failing:
                log.warning(
                    "redis mirror write failed, will retry: %s",
                    exc,
                    extra={"action": "mirror_failed"},
                )
                self._failing = True
            return False
        if self._failing:
            log.info("redis mirror caught up", extra={"action": "mirror_recovered"})
            self._failing = False
        self._count_stale(pending.values(), statuses)
        return True

    def _count_stale(self, writes: Iterable[MirrorWrite], statuses: Sequence[int]) -> None:
        stale = [w for w, status in zip(writes, statuses, strict=True) if status == STALE]
        for w in stale:
            self.stale_skipped[w.kind] += 1
        # One line when old values start being dropped (a catch-up, or a producer clock running
        # behind Redis's), not one per flush while it lasts: the metric counts every one.
        if stale and not self._skipping:
            log.warning(
                "redis mirror: %d value(s) older than their TTL not written (%s)",
                len(stale),
                ", ".join(sorted({w.kind for w in stale})),
                extra={"action": "mirror_stale_skipped"},
            )
        self._skipping = bool(stale)

    async def read_versions(self, names: Sequence[str]) -> list[int | None]:
        """Versions stored for mirror keys (for tests and diagnostics)."""
        raw = await self._client.mget([version_key(self.prefix, self.prefix + n) for n in names])
        return [None if r is None else int(r) for r in raw]
