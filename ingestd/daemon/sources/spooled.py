"""Replay of the local spool (ingestd.spool) into the pipeline, in order, once the queue has room.

The spool is a source like the stream: records go into the bounded queue (so a replay never
outruns the database), and a record is marked committed only when its batch has committed. A
record replayed twice (a crash between commit and the spool's bookkeeping) lands once: its
``event_id`` is the idempotency key, as for a redelivered stream entry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from ingestd import errors
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.deadletters import content_key, make_dead_letter
from ingestd.daemon.pipeline import Pipeline
from ingestd.spool import Spool, SpoolRecord
from ingestd.wire import decoding

log = logging.getLogger("ingestd.daemon.sources.spooled")

# How long to sleep when there is nothing to replay (appends also wake the loop).
IDLE_POLL_S = 0.05


class SpoolSource:
    """Feeds spooled records to the pipeline and marks them committed after the commit."""

    name = "spool"

    def __init__(
        self, spool: Spool, pipeline: Pipeline, *, max_event_bytes: int, read_count: int
    ) -> None:
        self._spool = spool
        self._pipeline = pipeline
        self._max_event_bytes = max_event_bytes
        self._read_count = read_count
        self._stopping = asyncio.Event()

    def dead_letter_key(self, item: Item) -> str | None:
        """A replayed record that the database refuses is recorded once, by its content.

        Not by its place: record ids start over when an emptied spool is opened again, so one
        id holds different records over time. The in-process source keys its events the
        same way, so an event both committed from memory and replayed is one dead letter.
        """
        record: SpoolRecord = item.token
        return content_key(record.payload)

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """The batch committed: these records are done."""
        self._spool.committed([item.token for item in items])

    def _item(self, record: SpoolRecord, now: float) -> Item:
        try:
            ev = decoding.decode_event(record.payload, max_bytes=self._max_event_bytes)
        except errors.InvalidEvent as exc:
            # Spooled events were valid when spooled; a newer build may judge them otherwise.
            dl = make_dead_letter(
                record.payload,
                f"spooled event no longer valid: {exc}",
                source=self.name,
                field=exc.field,
                dedup_key=content_key(record.payload),
            )
            return Item(None, dl, self, record, record.payload, now)
        return Item(ev, None, self, record, record.payload, now)

    async def run(self) -> None:
        """Replay until ``stop()``: whatever is spooled, as fast as the queue takes it.

        A failure (the spool's disk, a bug) is logged and retried with backoff: if the replay
        stopped, every in-process event would go on being spooled and none replayed.
        """
        failures = 0
        while not self._stopping.is_set():
            try:
                replayed = await self._replay_once()
            except errors.ShuttingDown:
                return
            except Exception as exc:  # noqa: BLE001 - logged, retried; the records stay on disk
                failures += 1
                log.error(
                    "spool replay failed (attempt %d): %s: %s",
                    failures,
                    type(exc).__name__,
                    exc,
                    extra={"action": "spool_replay_failed"},
                )
                await asyncio.sleep(min(5.0, IDLE_POLL_S * 2**failures))
                continue
            failures = 0
            if not replayed:
                await asyncio.sleep(IDLE_POLL_S)

    async def _replay_once(self) -> bool:
        # While batches fail (the database is down) the records are safer on disk than in
        # memory: replay resumes once a commit succeeds again.
        if self._pipeline.queue.full or self._pipeline.failing or not self._spool.unread:
            return False
        records = await self._spool.read_batch(self._read_count)
        if not records:
            return False
        now = time.monotonic()
        await self._pipeline.put([self._item(r, now) for r in records])
        return True

    def stop(self) -> None:
        """Stop replaying; what was handed out is drained, the rest waits for the next start."""
        self._stopping.set()
