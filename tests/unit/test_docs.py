"""The README and docs/ stand on their own: small README, links that resolve, no outside documents.

Users have the repository and nothing else, so no tracked file (code comments, help texts, SQL
comments, deploy files, the docs themselves) may send them to a document they do not have. The
README's test command must be the one CI runs, and the reference tables in docs/ must list what
the code accepts (every event field, CSV column and setting), so that the pages cannot drift.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
from pathlib import Path

import orjson
import pytest
import redis

from ingestd.settings import Settings
from ingestd.wire import csv_format, events
from tests.deploy_files import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 12_000

# Documents that exist only outside the repository. The words are split so that this file's own
# source does not contain them whole (it is excluded by path as well, for clarity).
_D, _S = "DESI" + "GN", "se" + "ed"
OUTSIDE_DOCUMENTS = re.compile(
    "|".join(
        (
            rf"\b{_D}(\.md|\s*§|:)",  # "DESIGN §5", "DESIGN.md", "(DESIGN: ...)"
            rf"\b[Ss]{_S[1:]}\s*§",  # "seed §7.1", "Seed §2.2"
            rf"\b[Tt]he {_S}'s\b",  # "the seed's columns"
            rf"\b[Ss]{_S[1:]} table\b",  # "(seed table ``spreads``)"
            rf"(?<!\w)\(\s*{_S}\s*\)",  # "(seed)", not "Random(seed)"
            rf"\bin the {_S}\b",  # "as in the seed"
            rf"\b[Ss]{_S[1:]}\s+``",  # "Seed ``fx`` section"
            r"§\s*[0-9]",  # a bare section number of such a document: "§5.2's queries"
            rf"\b{_S}/000_",  # the seed file itself
            "PERFORM" + r"ANCE\.md",
            "RELIAB" + r"ILITY\.md",
        )
    )
)


def markdown_pages() -> list[Path]:
    """The README and every page under docs/ (not docs/bench's data)."""
    return [README, *sorted(DOCS.glob("*.md"))]


def test_the_readme_is_small() -> None:
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_the_readme_names_the_test_command_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    exec_line = next(line for line in ci.splitlines() if line.startswith("exec "))
    words = shlex.split(exec_line)[1:]
    script = next(w for w in words if w.endswith(".sh"))
    assert script == "scripts/test.sh"
    commands = [line.split("#")[0].split() for line in code_lines(README.read_text("utf-8"))]
    assert [script] in commands, f"the README's quick start must show `{script}` as a command"


def code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks."""
    inside, lines = False, []
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page (code blocks are not headings)."""
    found: set[str] = set()
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        m = re.match(r"#{1,6} (.+)", line)
        if inside or m is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def test_anchor_rules_match_github() -> None:
    page = DOCS / "redis-keys.md"
    assert {"the-mirrors-keys", "how-old-is-a-value"} <= anchors(page)


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_no_tracked_file_refers_to_documents_users_do_not_have() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    this_file = Path(__file__).resolve().relative_to(ROOT).as_posix()
    hits = []
    for name in (n.decode() for n in tracked if n):
        path = ROOT / name
        if name == this_file or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_DOCUMENTS.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not hits, "state the thing itself instead:\n" + "\n".join(hits)


def test_the_pattern_finds_what_it_must() -> None:
    for text in (
        f"see {_D} §5",
        f"{_D}.md",
        f"{_S} §7.1's query",
        f"the {_S}'s columns",
        "PERFORM" + "ANCE.md",
        "RELIAB" + "ILITY.md",
        "§7.1's query",
    ):
        assert OUTSIDE_DOCUMENTS.search(text), text
    for text in ("--seed 1", "a fixed seed and a fresh one", "simulated(n, seed=7)"):
        assert not OUTSIDE_DOCUMENTS.search(text), text


def test_the_events_page_lists_every_event_type_and_field() -> None:
    page = (DOCS / "events.md").read_text(encoding="utf-8")
    missing = []
    for name, spec in events.EVENT_TYPES.items():
        section = page.partition(f"### `{name}`")[2].partition("\n### ")[0]
        if not section:
            missing.append(name)
        missing += [f"{name}.{f.name}" for f in spec.fields if f"| `{f.name}` |" not in section]
    missing += [f for f in sorted(events.ENVELOPE_FIELDS) if f"| `{f}` |" not in page]
    assert not missing


def test_the_csv_page_lists_every_column_of_every_file() -> None:
    page = (DOCS / "csv-migration.md").read_text(encoding="utf-8")
    missing = []
    for table in csv_format.CSV_TABLES:
        section = page.partition(f"### `{table.file_name}`")[2].partition("\n#")[0]
        missing += [f"{table.file_name}:{c}" for c in table.accepted if f"| `{c}` |" not in section]
    assert not missing


def setting_keys(settings: object, prefix: str = "") -> list[str]:
    """Every leaf setting as a dotted key (``pipeline.batch_max_rows``)."""
    keys = []
    for field in dataclasses.fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            keys += setting_keys(value, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def test_the_configuration_page_shows_every_setting() -> None:
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    block = page.partition("```yaml")[2].partition("```")[0]
    shown: set[str] = set()
    stack: list[str] = []
    for line in block.splitlines():
        m = re.match(r"( *)([a-z_]+):", line)
        if m is None:
            continue
        depth = len(m.group(1)) // 2
        del stack[depth:]
        stack.append(m.group(2))
        shown.add(".".join(stack))
    missing = [k for k in setting_keys(Settings()) if k not in shown]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


@pytest.mark.redis
def test_the_readme_producer_example_publishes_its_event(
    redis_url: str, rclient: redis.Redis
) -> None:
    text = README.read_text(encoding="utf-8")
    example = text.partition("```python\n")[2].partition("```")[0]
    assert "redis://127.0.0.1:6379/0" in example
    exec(example.replace("redis://127.0.0.1:6379/0", redis_url), {})  # as a user runs it
    entries = rclient.xrange("ingestd:events") or []
    published = [orjson.loads((fields or {})[b"event"]) for _, fields in entries]
    [event] = [e for e in published if e.get("event_id") == "collector-fx-000001"]
    assert events.parse_event(event).table is not None  # a valid event of a stored type
