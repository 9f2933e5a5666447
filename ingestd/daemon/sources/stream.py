"""Redis Stream intake: one consumer group shared by every replica.

At start this consumer first re-reads its own pending entries (id ``0``: after a crash they are
never returned by ``>``), then reads new ones. Entries left idle by a dead replica are claimed with
``XAUTOCLAIM``. An entry is ``XACK``ed only after its rows are committed; a redelivered entry lands
once because its ``event_id`` (or the one derived from the stream key and its entry id,
``stream:<key>:<entry id>``, unique across streams) is the idempotency key.

Reads are bounded in entries (``read_count``) and in bytes (``read_max_bytes``): Redis has no byte
bound on a read, so the number of entries asked for follows the size of the largest entries seen
lately (at start, ``max_event_bytes``). Entries larger than ``max_event_bytes`` become dead letters
that keep only a prefix, so their payloads are not held in the queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from ingestd import errors
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.deadletters import make_dead_letter
from ingestd.daemon.pipeline import Pipeline
from ingestd.settings import StreamSettings
from ingestd.wire import decoding, events
from ingestd.wire.tables import EVENT_ID

log = logging.getLogger("ingestd.daemon.sources.stream")

EVENT_FIELD = b"event"
# The longest entry id Redis can give: two 64-bit numbers, ``<ms>-<seq>``.
_MAX_ENTRY_ID_CHARS = 2 * 20 + 1
# The longest stream key that ``stream:<key>:<entry id>`` can name and still fit an event_id.
MAX_KEY_CHARS = EVENT_ID.length - len("stream::") - _MAX_ENTRY_ID_CHARS


def derived_id_prefix(key: str) -> str:
    """What the event_id of an entry without one starts with: ``stream:<key>:``.

    Entry ids are unique within a stream only, so the key is part of the id: entries of two
    streams written into one database never share one. A key too long for the id to fit 100
    characters is named by its SHA-256 instead (``stream:sha256=<32 hex>:``).
    """
    if len(key) <= MAX_KEY_CHARS:
        return f"stream:{key}:"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"stream:sha256={digest}:"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamSource:
    """Reads the event stream through a consumer group and acknowledges after commit."""

    name = "stream"

    def __init__(
        self,
        client: aioredis.Redis,
        pipeline: Pipeline,
        settings: StreamSettings,
        *,
        consumer: str,
        max_event_bytes: int,
        max_event_depth: int = events.DEFAULT_MAX_DEPTH,
        retention: events.Retention | None = None,
        observer: Callable[[Sequence[Item]], None] | None = None,
    ) -> None:
        self._client = client
        # Sees every entry as it is taken in, before any commit (heartbeats: health keys that
        # do not wait on the database).
        self._observer = observer
        # XREADGROUP replies stay as Redis sent them: building a dict per entry is a measurable
        # share of the intake's CPU (profiled), and _event_payload reads the flat list.
        client.set_response_callback("XREADGROUP", _raw_reply)
        self._pipeline = pipeline
        self.settings = settings
        self.key = settings.key
        self._derived_id_prefix = derived_id_prefix(settings.key)
        self.group = settings.group
        self.consumer = consumer
        self._max_event_bytes = max_event_bytes
        self._max_event_depth = max_event_depth
        self._retention = retention
        # The size the next read assumes per entry: the largest payload seen lately (halved per
        # read while smaller ones come), at first as large as an event may be.
        self._entry_bytes = max(1, max_event_bytes)
        self._in_flight: set[bytes] = set()
        self._unacked: set[bytes] = set()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.redelivered = 0
        self.claimed = 0
        self._rng = random.Random()  # noqa: S311 - jitter, not security

    # --- acknowledgements --------------------------------------------------------------------

    def dead_letter_key(self, item: Item) -> str | None:
        """Dead letters of stream entries are keyed by the entry id: recorded once."""
        return self._entry_key(item.token)

    def _entry_key(self, entry_id: bytes) -> str:
        return f"stream:{self.key}:{_s(entry_id)}"

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """XACK the committed entries (rejected ones are in dead_letters, so they are done too)."""
        ids = [item.token for item in items]
        self._unacked.update(ids)
        await self._flush_acks()

    async def _flush_acks(self) -> None:
        if not self._unacked:
            return
        # Taken before the first await: a writer and the read loop may both flush, and each id
        # must be sent (and counted) by one of them only.
        batch, self._unacked = self._unacked, set()
        ids = list(batch)
        acked = 0
        try:
            with errors.redis_edge():
                for start in range(0, len(ids), 1000):
                    chunk = ids[start : start + 1000]
                    acked += int(await self._client.xack(self.key, self.group, *chunk))
        except errors.RedisError as exc:
            # All of them again later (an id already acknowledged is acknowledged once).
            self._unacked |= batch
            self._pipeline.metrics.acks += acked
            log.warning("XACK failed, will retry: %s", exc, extra={"action": "ack_retry"})
            return
        self._in_flight.difference_update(ids)
        self._pipeline.metrics.acks += acked

    # --- reading -----------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the group at id 0 (entries published before the first start are not lost)."""
        try:
            await self._client.xgroup_create(self.key, self.group, id="0", mkstream=True)
            log.info(
                "created consumer group %s on %s",
                self.group,
                self.key,
                extra={"action": "group_created"},
            )
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read_count(self) -> int:
        """Entries to ask for: ``read_count``, fewer when entries are large (``read_max_bytes``)."""
        by_bytes = self.settings.read_max_bytes // self._entry_bytes
        return max(1, min(self.settings.read_count, by_bytes))

    def _note_sizes(self, entries: Sequence[Any]) -> None:
        largest = 0
        for _, fields in entries:
            payload = _event_payload(fields)
            if payload is not None and len(payload) > largest:
                largest = len(payload)
        self._entry_bytes = max(1, largest, self._entry_bytes // 2)

    def _to_items(self, entries: Sequence[Any]) -> list[Item]:
        now = time.monotonic()
        items: list[Item] = []
        for entry_id, fields in entries:
            if entry_id in self._in_flight:
                continue
            self._in_flight.add(entry_id)
            items.append(self._item(entry_id, fields, now))
        if self._observer is not None and items:
            self._observer(items)
        return items

    def _item(self, entry_id: bytes, fields: Any, now: float) -> Item:
        payload = _event_payload(fields)
        if payload is None:
            raw: bytes = b"" if fields is None else repr(fields).encode()
            reason = (
                "stream entry was deleted or trimmed before it was processed"
                if fields is None
                else "stream entry has no 'event' field"
            )
            dl = make_dead_letter(
                raw, reason, source=self.name, dedup_key=self._entry_key(entry_id)
            )
            return Item(None, dl, self, entry_id, None, now)
        try:
            ev = decoding.decode_event(
                payload,
                max_bytes=self._max_event_bytes,
                default_event_id=self._derived_id_prefix + _s(entry_id),
                max_depth=self._max_event_depth,
                retention=self._retention,
            )
        except errors.InvalidEvent as exc:
            log.warning(
                "invalid event in entry %s: %s", _s(entry_id), exc, extra={"action": "dead_letter"}
            )
            dl = make_dead_letter(
                payload,
                str(exc),
                source=self.name,
                field=exc.field,
                dedup_key=self._entry_key(entry_id),
            )
            # Not the payload: the dead letter holds what is written (a prefix of an oversize
            # one), and the queue counts that, so refused entries do not pile up in memory.
            return Item(None, dl, self, entry_id, None, now)
        return Item(ev, None, self, entry_id, payload, now)

    async def _read(self, start: str, block: int | None) -> list[Any]:
        reply = await self._client.xreadgroup(
            self.group,
            self.consumer,
            {self.key: start},
            count=self._read_count(),
            block=block,
        )
        if not reply:
            return []
        # The raw RESP2 reply (see __init__): [[stream_key, [[entry_id, [field, value, ...]]]]]
        streams: list[Any] = reply  # type: ignore[assignment]
        entries: list[Any] = streams[0][1]
        self._note_sizes(entries)
        return entries

    async def read_own_pending(self) -> int:
        """Re-read this consumer's unacknowledged entries (after a crash) and queue them."""
        last = "0"
        total = 0
        while True:
            entries = await self._read(last, None)
            if not entries:
                return total
            last = _s(entries[-1][0])
            items = self._to_items(entries)
            del entries  # see _read_loop
            total += len(items)
            self.redelivered += len(items)
            await self._pipeline.put(items)

    async def run(self) -> None:
        """Read until ``stop()``; survives Redis outages with backoff."""
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="ingestd-claim"),
            asyncio.create_task(self._trim_loop(), name="ingestd-trim"),
        ]
        try:
            await self._read_loop()
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read_loop(self) -> None:
        attempt = 0
        need_pending = True
        failing = False
        while not self._stopping.is_set():
            try:
                with errors.redis_edge():
                    if need_pending:
                        await self.ensure_group()
                        n = await self.read_own_pending()
                        if n:
                            log.info(
                                "re-read %d pending entries of consumer %s",
                                n,
                                self.consumer,
                                extra={"action": "pending_reread"},
                            )
                        need_pending = False
                    await self._flush_acks()
                    entries = await self._read(">", self.settings.block_ms)
                    if failing:
                        log.info("stream reads recovered", extra={"action": "stream_recovered"})
                        failing = False
                    attempt = 0
                    if entries:
                        # Even when stopping: the pipeline drains after intake stops, so entries
                        # already delivered to us are written and acknowledged, not left pending.
                        items = self._to_items(entries)
                        # The reply goes before put() may wait for room: refused entries' payloads
                        # (an oversize one is up to any size) are not held meanwhile; the items
                        # keep what they need, and the queue counts it.
                        entries = []
                        await self._pipeline.put(items)
            except errors.ShuttingDown:
                return
            except errors.RedisError as exc:
                if "NOGROUP" in str(exc):
                    need_pending = True  # the group vanished (Redis restarted without its data)
                attempt += 1
                delay = self._rng.uniform(0, min(5.0, 0.1 * 2**attempt))
                if not failing:
                    log.warning(
                        "stream read failed, retrying: %s",
                        exc,
                        extra={"action": "stream_read_failed"},
                    )
                    failing = True
                await asyncio.sleep(delay)

    async def _claim_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.claim_interval_s)
            try:
                with errors.redis_edge():
                    await self.claim_idle()
            except errors.ShuttingDown:
                return
            except errors.RedisError as exc:
                log.warning("XAUTOCLAIM failed: %s", exc, extra={"action": "claim_failed"})

    async def claim_idle(self) -> int:
        """Take over entries idle past ``claim_idle_ms`` (a dead replica's) and queue them."""
        start = "0-0"
        total = 0
        while True:
            reply = await self._client.xautoclaim(
                self.key,
                self.group,
                self.consumer,
                self.settings.claim_idle_ms,
                start_id=start,
                count=self._read_count(),
            )
            next_start, entries = _s(reply[0]), reply[1]
            self._note_sizes(entries)
            deleted = reply[2] if len(reply) > 2 else []
            for entry_id in deleted:
                log.error(
                    "pending entry %s was trimmed from the stream before it was processed",
                    _s(entry_id),
                    extra={"action": "entry_lost"},
                )
            # A deleted entry becomes a dead letter: its loss is recorded, never silent.
            items = self._to_items([*entries, *((entry_id, None) for entry_id in deleted)])
            del reply, entries  # see _read_loop
            if items:
                total += len(items)
                self.claimed += len(items)
                await self._pipeline.put(items)
            if next_start == "0-0":
                if total:
                    log.info("claimed %d idle entries", total, extra={"action": "entries_claimed"})
                return total
            start = next_start

    async def _trim_loop(self) -> None:
        if self.settings.trim_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.settings.trim_interval_s)
            try:
                with errors.redis_edge():
                    await self.trim_acknowledged()
            except errors.RedisError as exc:
                log.warning("stream trim failed: %s", exc, extra={"action": "trim_failed"})

    async def trim_acknowledged(self) -> int:
        """Remove entries that every consumer group of the stream has acknowledged."""
        groups = await self._client.xinfo_groups(self.key)
        if not groups:
            return 0
        floor: tuple[int, int] | None = None
        for g in groups:
            name = _s(g["name"])
            if int(g["pending"]) > 0:
                summary = await self._client.xpending(self.key, name)
                candidate = _parse_id(_s(summary["min"]))
            else:
                ms, seq = _parse_id(_s(g["last-delivered-id"]))
                candidate = (ms, seq + 1)
            floor = candidate if floor is None or candidate < floor else floor
        assert floor is not None
        removed = await self._client.xtrim(
            self.key, minid=f"{floor[0]}-{floor[1]}", approximate=False
        )
        return int(removed)

    def stop(self) -> None:
        """Stop reading; the current blocking read ends within ``block_ms``."""
        self._stopping.set()

    async def finish(self) -> None:
        """Acknowledge what the drained pipeline committed (called after the drain)."""
        await self._flush_acks()


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def _event_payload(fields: Any) -> bytes | None:
    """The ``event`` field of an entry: from a raw ``[field, value, ...]`` list or a dict."""
    if fields is None:
        return None
    if isinstance(fields, dict):
        value: bytes | None = fields.get(EVENT_FIELD)
        return value
    if len(fields) == 2 and fields[0] == EVENT_FIELD:
        first: bytes = fields[1]
        return first
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == EVENT_FIELD:
            found: bytes = fields[i + 1]
            return found
    return None


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
