"""Deterministic crash points for the fault suite (FoundationDB/TiKV-style failpoints).

A failpoint is a named place in the write path where the process can be made to die with a real
SIGKILL, at the n-th time it passes there: ``before_copy``, ``before_commit``, ``after_commit``
(committed, neither mirrored nor acknowledged), ``before_ack``. Unarmed, a pass costs one check
of an empty dict, once per batch.

Only the test suite arms them, by calling ``arm`` in the process it wants killed (the fault tests
start ``ingestd run`` through ``tests/failpoint_run.py``, which arms them and then runs the
command). Nothing in the package calls ``arm``, and no setting or environment variable reaches
it: a deployment's configuration cannot arm a failpoint, so a production process cannot be made
to SIGKILL itself by one (``tests/unit/test_layers.py`` checks that no module calls ``arm``).
"""

from __future__ import annotations

import os
import signal
from typing import Final

from ingestd.errors import ConfigError

NAMES: Final = frozenset({"before_copy", "before_commit", "after_commit", "before_ack"})

_armed: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """``"after_commit=3,before_copy=1"`` -> ``{"after_commit": 3, "before_copy": 1}``."""
    points: dict[str, int] = {}
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        name, _, count = part.partition("=")
        name = name.strip()
        if name not in NAMES:
            raise ConfigError(f"unknown failpoint {name!r} (known: {', '.join(sorted(NAMES))})")
        try:
            n = int(count or "1")
        except ValueError:
            raise ConfigError(f"failpoint {name}: {count!r} is not a count") from None
        if n < 1:
            raise ConfigError(f"failpoint {name}: the count must be >= 1")
        points[name] = n
    return points


def arm(spec: str) -> None:
    """Arm the failpoints of ``spec`` (replacing any armed before); an empty spec disarms."""
    _armed.clear()
    _armed.update(parse(spec))


def hit(name: str) -> None:
    """Pass the failpoint ``name``: on its n-th pass the process is SIGKILLed, as by an operator."""
    if not _armed:
        return
    left = _armed.get(name)
    if left is None:
        return
    if left > 1:
        _armed[name] = left - 1
        return
    os.write(2, f"failpoint {name}: SIGKILL\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
