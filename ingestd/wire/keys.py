"""The Redis key names (docs/redis-keys.md) in one place: mirror, ``ingestd health``, cache."""

from __future__ import annotations

from typing import Final

# ingestd's own heartbeat component; producers may not send heartbeats under it.
INGESTD_COMPONENT: Final = "ingestd"

# The keys with a TTL, by kind (the ``key_kind`` label of ingestd_mirror_stale_skipped_total): a
# value of these whose event time is older than its TTL is never written.
TTL_KEY_KINDS: Final = ("fx", "spread", "health")


def fx(pair: str) -> str:
    """``fx:{pair lower-case}``."""
    return f"fx:{pair.lower()}"


def spread(symbol: str) -> str:
    """``spreads:{SYMBOL}:last``."""
    return f"spreads:{symbol}:last"


def open_count(symbol: str) -> str:
    """``positions:{SYMBOL}:open_count``."""
    return f"positions:{symbol}:open_count"


def health(component: str) -> str:
    """``health:{component}``."""
    return f"health:{component}"


def replica_component(consumer: str) -> str:
    """The heartbeat component of one ingestd replica (``health:ingestd:<consumer>``).

    ``health:ingestd`` says that some replica is alive; a container's health check needs its
    own replica's, or a stuck replica would pass on its neighbours' heartbeats.
    """
    return f"{INGESTD_COMPONENT}:{consumer}"


def is_reserved_component(component: str) -> bool:
    """True for ``ingestd`` and ``ingestd:<replica>``, which only ingestd writes."""
    return component == INGESTD_COMPONENT or component.startswith(INGESTD_COMPONENT + ":")
