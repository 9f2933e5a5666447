"""What every producer storage shares: event ids, the ``log_*`` methods, the interfaces.

Every event gets its ``event_id`` here, once, before it is written anywhere: a retried publish, the
CSV row of a dual write and a later ``import-csv`` of that row all carry the same id, so the event
lands in the database once whichever path delivers it. Position events are named by the position
(``<position_key>:open`` / ``:close``), so logging the same open twice is harmless too.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol, Self

from ingestd.producer.publisher import EventIds
from ingestd.producer.storage.models import FxRate, OrderLeg, Position, SpreadOpportunity, Trade
from ingestd.wire import tables


class EventBuilder:
    """Wire events from models, each with its stable ``event_id`` and the ``producer``."""

    def __init__(self, producer: str | None = None, id_prefix: str | None = None) -> None:
        self.producer = producer
        self._ids = EventIds(id_prefix if id_prefix is not None else _prefix(producer))

    def next_id(self) -> str:
        """A new id, unique to this builder (host, pid, start time, counter)."""
        return self._ids.next()

    def spread(self, spread: SpreadOpportunity) -> dict[str, Any]:
        """A ``spread`` event."""
        return spread.to_event(event_id=self.next_id(), producer=self.producer)

    def fx_rate(self, rate: FxRate) -> dict[str, Any]:
        """An ``fx_rate`` event."""
        return rate.to_event(event_id=self.next_id(), producer=self.producer)

    def order(self, order: OrderLeg) -> dict[str, Any]:
        """An ``order`` event."""
        return order.to_event(event_id=self.next_id(), producer=self.producer)

    def trade(self, trade: Trade) -> dict[str, Any]:
        """A ``trade`` event."""
        return trade.to_event(event_id=self.next_id(), producer=self.producer)

    def position_open(self, pos: Position) -> dict[str, Any]:
        """A ``position_open`` event (entry columns)."""
        return pos.open_event(event_id=self._position_id(pos, "open"), producer=self.producer)

    def position_close(self, pos: Position) -> dict[str, Any]:
        """A ``position_close`` event (exit and entry columns); ``pos`` must be CLOSED."""
        return pos.close_event(event_id=self._position_id(pos, "close"), producer=self.producer)

    def numbered(self, event: dict[str, Any]) -> dict[str, Any]:
        """``event`` with this builder's next ``seq`` and its ``session`` (for ingestd's gap
        detection, ``producer_gaps``). Called once the event is handed to the stream side, not
        when it is built: a dual write's repeated call (which reuses the event) takes none."""
        return {**event, "seq": self._ids.next_seq(), "session": self._ids.session}

    def _position_id(self, pos: Position, what: str) -> str:
        name = f"{pos.position_key}:{what}"
        return name if len(name) <= tables.EVENT_ID.length else self.next_id()


def _prefix(producer: str | None) -> str | None:
    if producer is None:
        return None
    # The producer's name in front of the default prefix (host-pid-start time): ids stay unique
    # per process and say where they came from.
    return f"{producer[:20]}-{EventIds(None).prefix}"


class LogMethods:
    """The ``log_*`` calls for synchronous storages, in terms of ``_emit``."""

    _events: EventBuilder

    def _emit(self, event: dict[str, Any]) -> str:
        raise NotImplementedError

    def log_position_open(self, pos: Position) -> str:
        """Log that ``pos`` was opened; returns the event id."""
        return self._emit(self._events.position_open(pos))

    def log_position_close(self, pos: Position) -> str:
        """Log that ``pos`` (CLOSED) was closed; returns the event id."""
        return self._emit(self._events.position_close(pos))

    def log_spread(self, spread: SpreadOpportunity) -> str:
        """Log a spread snapshot; returns the event id."""
        return self._emit(self._events.spread(spread))

    def log_order(self, order: OrderLeg) -> str:
        """Log an order leg; returns the event id."""
        return self._emit(self._events.order(order))

    def log_trade(self, trade: Trade) -> str:
        """Log a trade; returns the event id."""
        return self._emit(self._events.trade(trade))

    def log_fx_rate(self, rate: FxRate) -> str:
        """Log an FX rate; returns the event id."""
        return self._emit(self._events.fx_rate(rate))


class AsyncLogMethods:
    """The same ``log_*`` calls for asyncio storages, awaited."""

    _events: EventBuilder

    async def _emit(self, event: dict[str, Any]) -> str:
        raise NotImplementedError

    async def log_position_open(self, pos: Position) -> str:
        """Log that ``pos`` was opened; returns the event id."""
        return await self._emit(self._events.position_open(pos))

    async def log_position_close(self, pos: Position) -> str:
        """Log that ``pos`` (CLOSED) was closed; returns the event id."""
        return await self._emit(self._events.position_close(pos))

    async def log_spread(self, spread: SpreadOpportunity) -> str:
        """Log a spread snapshot; returns the event id."""
        return await self._emit(self._events.spread(spread))

    async def log_order(self, order: OrderLeg) -> str:
        """Log an order leg; returns the event id."""
        return await self._emit(self._events.order(order))

    async def log_trade(self, trade: Trade) -> str:
        """Log a trade; returns the event id."""
        return await self._emit(self._events.trade(trade))

    async def log_fx_rate(self, rate: FxRate) -> str:
        """Log an FX rate; returns the event id."""
        return await self._emit(self._events.fx_rate(rate))


class Storage(Protocol):
    """The synchronous storage interface (CsvStorage, PostgresStorage, DualStorage)."""

    def log_position_open(self, pos: Position) -> str:
        """Log an open."""

    def log_position_close(self, pos: Position) -> str:
        """Log a close."""

    def log_spread(self, spread: SpreadOpportunity) -> str:
        """Log a spread."""

    def log_order(self, order: OrderLeg) -> str:
        """Log an order leg."""

    def log_trade(self, trade: Trade) -> str:
        """Log a trade."""

    def log_fx_rate(self, rate: FxRate) -> str:
        """Log an FX rate."""

    def flush(self, timeout: float | None = None) -> None:
        """Make everything logged so far durable (written / published)."""

    def close(self) -> None:
        """Flush and release resources."""

    def __enter__(self) -> Self:
        """Context manager."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close."""


class AsyncStorage(Protocol):
    """The asyncio storage interface (AsyncCsvStorage, AsyncPostgresStorage, AsyncDualStorage)."""

    async def log_position_open(self, pos: Position) -> str:
        """Log an open."""

    async def log_position_close(self, pos: Position) -> str:
        """Log a close."""

    async def log_spread(self, spread: SpreadOpportunity) -> str:
        """Log a spread."""

    async def log_order(self, order: OrderLeg) -> str:
        """Log an order leg."""

    async def log_trade(self, trade: Trade) -> str:
        """Log a trade."""

    async def log_fx_rate(self, rate: FxRate) -> str:
        """Log an FX rate."""

    async def flush(self) -> None:
        """Make everything logged so far durable (bound it with ``asyncio.timeout``)."""

    async def aclose(self) -> None:
        """Flush and release resources."""

    async def __aenter__(self) -> Self:
        """Async context manager."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close."""
