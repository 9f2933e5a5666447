"""A real HTTP client for the operations endpoint (the standard library's, in a thread)."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


@dataclasses.dataclass
class Response:
    """Status, headers and body of one response."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        """The body as UTF-8."""
        return self.body.decode("utf-8")


def _fetch(url: str, method: str) -> Response:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return Response(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, dict(exc.headers.items()), exc.read())


async def get(port: int, path: str, method: str = "GET", host: str = "127.0.0.1") -> Response:
    """One request to ``http://host:port/path``."""
    return await asyncio.to_thread(_fetch, f"http://{host}:{port}{path}", method)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of one labelled family, keyed by that label's value."""
    return {
        dict(labels)[label]: value
        for (n, labels), value in samples.items()
        if n == name and label in dict(labels)
    }


async def scrape(port: int) -> Samples:
    """GET /metrics and parse it."""
    resp = await get(port, "/metrics")
    assert resp.status == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(resp.text)
