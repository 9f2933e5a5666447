"""The operations HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

A deliberately small HTTP/1.1 server on the service's own event loop (``asyncio.start_server``):
one request per connection, GET and HEAD only, bounded request size and time. That the loop
answers at all is part of what ``/healthz`` reports; a web framework would add nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import orjson
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("ingestd.daemon.endpoints")

# The classic text format, which every Prometheus version parses (the client library's own
# server answers with it too when the scraper asks for nothing newer).
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES: Final = 8192  # request line plus headers; a scraper sends a few hundred
REQUEST_TIMEOUT_S: Final = 5.0
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

Healthy = Callable[[], tuple[bool, str]]
Ready = Callable[[], Awaitable[tuple[bool, dict[str, str]]]]


class OpsServer:
    """Serves the Prometheus registry and the two probes on ``host:port``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        healthy: Healthy,
        ready: Ready,
        host: str,
        port: int,
    ) -> None:
        self._registry = registry
        self._healthy = healthy
        self._ready = ready
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and start serving (raises OSError when the address is taken)."""
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=MAX_REQUEST_BYTES
        )
        log.info(
            "operations endpoint on http://%s:%d (/metrics, /healthz, /readyz)",
            self._host,
            self.port,
            extra={"action": "endpoint_listening"},
        )

    @property
    def port(self) -> int:
        """The bound port (useful when 0 asked the system for one)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting and close the listening socket."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    method, path = await _read_request(reader)
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
                await _respond(writer, 400, b"bad request\n", head=False)
                return
            head = method == "HEAD"
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, b"GET or HEAD only\n", head=False, allow=True)
                return
            status, body, ctype = await self._route(path)
            await _respond(writer, status, body, head=head, content_type=ctype)
        except (TimeoutError, ConnectionError):
            pass  # a client that hangs or goes away gets nothing more
        except Exception:
            log.exception("operations endpoint failed", extra={"action": "endpoint_error"})
            with contextlib.suppress(ConnectionError, RuntimeError):
                await _respond(writer, 500, b"internal error\n", head=False)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, generate_latest(self._registry), METRICS_CONTENT_TYPE
        if path == "/healthz":
            ok, reason = self._healthy()
            return (200 if ok else 503), (reason + "\n").encode(), "text/plain; charset=utf-8"
        if path == "/readyz":
            ok, checks = await self._ready()
            body = orjson.dumps({"ready": ok, "checks": checks}) + b"\n"
            return (200 if ok else 503), body, "application/json"
        return 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8"


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    line = await reader.readuntil(b"\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request line")
    total = len(line)
    while True:  # headers are read and ignored: nothing here depends on them
        header = await reader.readuntil(b"\n")
        total += len(header)
        if total > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        if header in (b"\r\n", b"\n"):
            break
    method, target = parts[0], parts[1]
    return method, target.split("?", 1)[0]


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    head: bool,
    content_type: str = "text/plain; charset=utf-8",
    allow: bool = False,
) -> None:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        lines.append("Allow: GET, HEAD")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(body)
    await writer.drain()
