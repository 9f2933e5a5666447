"""Command packing for redis-py's asyncio connections done by hiredis, in C.

redis-py packs asyncio commands in Python (only its synchronous connections use hiredis for it).
An XACK of 2,000 entry ids then costs about as much CPU as validating the events themselves
(profiled: ~10 % of the intake). The pool's connection class is given hiredis's packer, the way
the synchronous client already works; replies, retries and TLS are untouched.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import DataError
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    import hiredis


class _HiredisPacking:
    """Mixin: ``pack_command`` through ``hiredis.pack_command``.

    As redis-py's own hiredis serializer, but without its Python pass over every argument
    (which turns memoryviews into bytes): ingestd never sends those, and per entry id that pass
    was most of an XACK's cost. A two-word name (``"XINFO GROUPS"``) is split as redis-py does.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):
            if " " in first:
                args = (*first.split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def use_hiredis_packing(client: aioredis.Redis) -> None:
    """Make the client's future connections pack commands with hiredis, where it is installed."""
    if not HIREDIS_AVAILABLE:  # pragma: no cover - hiredis is a dependency (redis[hiredis])
        return
    pool = client.connection_pool
    base = pool.connection_class
    if not issubclass(base, _HiredisPacking):
        pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
