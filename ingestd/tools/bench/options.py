"""What ``ingestd bench`` runs and how big: the phases, their groups, sizes and ``--quick``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from ingestd.errors import ConfigError

PHASES: Final = (
    "copy",
    "server-copy",
    "submit",
    "stream",
    "baselines",
    "mix-copy",
    "mix-submit",
    "mix-stream",
    "latency",
    "stream-latency",
    "batch-size",
    "writers",
    "replicas",
    "memory",
    "startup",
)
GROUPS: Final = {
    "spreads": ("copy", "server-copy", "submit", "stream", "baselines"),
    "mix": ("mix-copy", "mix-submit", "mix-stream"),
    "ceiling": ("copy", "server-copy", "mix-copy"),
    "scaling": ("batch-size", "writers", "replicas"),
}
# A ratio needs its ceiling measured in the same run: --only adds it.
NEEDS: Final = {
    **dict.fromkeys(("server-copy", "submit", "stream", "baselines"), "copy"),
    **dict.fromkeys(("mix-submit", "mix-stream", "batch-size", "writers", "replicas"), "mix-copy"),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """What to run and how big (``--quick`` swaps in ``QUICK``)."""

    events: int = 100_000
    naive_rows: int = 3_000
    scaling_events: int = 100_000
    replica_events: int = 100_000
    memory_events: int = 1_000_000
    latency_seconds: float = 3.0
    loads: tuple[float, ...] = (1_000.0, 5_000.0, 20_000.0)
    grid: tuple[tuple[int, int], ...] = ((1_000, 25), (5_000, 50), (5_000, 100), (5_000, 200))
    stream_loads: tuple[float, ...] = (1_000.0, 5_000.0)
    batch_sizes: tuple[int, ...] = (500, 1_000, 2_000, 5_000, 10_000)
    writers: tuple[int, ...] = (1, 2, 3)
    replicas: tuple[int, ...] = (1, 2, 3)
    repeat: int = 1
    phases: tuple[str, ...] = PHASES
    json_path: str | None = None
    plots_dir: str | None = None
    scratch_database: str = "ingestd_bench"
    # Quick sizes check that every phase runs and verifies; they are too small for the targets
    # (start-up and the first batches dominate), so the report does not judge them against them.
    quick: bool = False

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return dataclasses.asdict(self)


QUICK: Final = Options(
    events=2_000,
    naive_rows=300,
    scaling_events=2_000,
    replica_events=2_000,
    memory_events=10_000,
    latency_seconds=0.5,
    loads=(200.0, 1_000.0),
    grid=((500, 25), (5_000, 200)),
    stream_loads=(500.0,),
    batch_sizes=(500, 2_000),
    writers=(1, 2),
    replicas=(1, 2),
    quick=True,
)


def select_phases(only: Iterable[str], skip: Iterable[str]) -> tuple[str, ...]:
    """The phases to run, in their fixed order; names may be groups (``spreads``, ``mix`` ...)."""

    def expand(names: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            if name in GROUPS:
                out.update(GROUPS[name])
            elif name in PHASES:
                out.add(name)
            else:
                known = ", ".join([*PHASES, *GROUPS])
                raise ConfigError(f"unknown bench phase {name!r} (known: {known})")
        return out

    wanted = expand(only) if only else set(PHASES)
    if only:
        wanted |= {NEEDS[p] for p in wanted if p in NEEDS}
    wanted -= expand(skip)
    return tuple(p for p in PHASES if p in wanted)


def parse_grid(text: str) -> tuple[tuple[int, int], ...]:
    """``1000x25,5000x200`` -> ((1000, 25), (5000, 200)): batch_max_rows x batch_max_age_ms."""
    out = []
    for part in text.split(","):
        rows, sep, age = part.strip().partition("x")
        if not sep:
            raise ConfigError(f"--latency-grid entry {part!r} must be ROWSxAGE_MS, e.g. 1000x25")
        out.append((int(rows), int(age)))
    return tuple(out)


def parse_numbers(text: str, kind: Callable[[str], Any]) -> tuple[Any, ...]:
    """``"1,2,3"`` -> (1, 2, 3) with ``kind`` applied."""
    return tuple(kind(x.strip()) for x in text.split(",") if x.strip())


def split_names(values: Sequence[str]) -> list[str]:
    """``--only a,b --only c`` -> [a, b, c]."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def options_from_args(args: Any) -> Options:
    """The bench options from ``ingestd bench``'s parsed arguments."""
    base = QUICK if args.quick else Options()
    changes: dict[str, Any] = {
        "phases": select_phases(split_names(args.only), split_names(args.skip)),
        "json_path": args.json_path,
        "plots_dir": args.plots_dir,
        "scratch_database": args.scratch_database,
    }
    for name in ("events", "scaling_events", "replica_events", "memory_events"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
            changes[name] = value
    if args.repeat is not None:
        if args.repeat < 1:
            raise ConfigError("--repeat must be at least 1")
        changes["repeat"] = args.repeat
    if args.latency_seconds is not None:
        changes["latency_seconds"] = args.latency_seconds
    lists = {
        "latency_loads": ("loads", float),
        "stream_latency_loads": ("stream_loads", float),
        "batch_sizes": ("batch_sizes", int),
        "writer_counts": ("writers", int),
        "replica_counts": ("replicas", int),
    }
    for arg, (field, kind) in lists.items():
        text = getattr(args, arg)
        if text:
            changes[field] = parse_numbers(text, kind)
    if args.latency_grid:
        changes["grid"] = parse_grid(args.latency_grid)
    return dataclasses.replace(base, **changes)
