"""``docs/design.md`` names only what exists: every file of the repository it names, every dotted
name of the code (``fetch.Reader``, ``p2p.claims``, ``thunderfs_common.glance_client.GlanceClient``), and
every module its layering rules put in a room.  A rename that leaves the map behind fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXT = (REPO / "docs" / "design.md").read_text()
PACKAGES = ("thunderfs", "thunderfs_tracker", "thunderfs_common")
ROOMS = {p.name for p in (REPO / "thunderfs").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
# Short forms the map uses for shared and tracker modules.
SHARED = {"signing", "options", "redis_conn"}


def _exists(path: str) -> bool:
    if (REPO / path).exists():
        return True
    if "/" not in path:  # a bare file name: somewhere in the packages, the benchmarks or the scripts
        return any(any((REPO / p).rglob(path)) for p in (*PACKAGES, "benchmarks", "scripts", "harness"))
    return any((REPO / p / path).exists() for p in PACKAGES)


def test_every_file_it_names_exists():
    named = set(re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|sh|toml))\b", TEXT))
    missing = sorted(p for p in named if not _exists(p))
    assert not missing, f"docs/design.md names files that do not exist: {missing}"


def _resolve(dotted: str) -> bool:
    """An attribute path from an importable module; ``room.Name``, the map's short form, is a
    class or function of one of the room's modules."""
    parts = dotted.split(".")
    head = parts[0]
    if head in ROOMS and len(parts) == 2 and parts[1][:1].isupper():
        return any(hasattr(importlib.import_module(f"thunderfs.{head}.{m.stem}"), parts[1])
                   for m in (REPO / "thunderfs" / head).glob("*.py"))
    for base in (head, *(f"{p}.{head}" for p in PACKAGES)):  # short forms: a module of a package
        if _resolve_from(base.split(".") + parts[1:], len(base.split("."))):
            return True
    return False


def _resolve_from(names: list[str], least: int) -> bool:
    """The longest importable module of ``names`` (at least ``least`` of them), then attributes."""
    for cut in range(len(names), least - 1, -1):
        try:
            obj = importlib.import_module(".".join(names[:cut]))
        except ImportError:
            continue
        try:
            for attr in names[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_dotted_name_of_the_code_it_names_exists():
    heads = "|".join(sorted(ROOMS | SHARED | set(PACKAGES), key=len, reverse=True))
    named = set(re.findall(rf"(?<![\w/.-])((?:{heads})(?:\.[A-Za-z_]\w*)+)", TEXT))
    # And any dotted name in backquotes (a room that no longer exists among them), but files.
    named |= {n for n in re.findall(r"`([a-z_]\w*(?:\.[A-Za-z_]\w*)+)`", TEXT)
              if not re.search(r"\.(py|md|sh|toml|json|txt|service|conf)$", n)}
    assert len(named) > 20  # the map does name the code
    missing = sorted(n for n in named if not _resolve(n))
    assert not missing, f"docs/design.md names what the code does not have: {missing}"


def test_every_module_its_layering_rules_name_is_in_that_room():
    rules = TEXT[TEXT.index("Layering rules"):TEXT.index("One Glance client serves both programs")]
    rules = " ".join(rules.split())
    checked = 0
    for room, chain in re.findall(r"inside `(\w+)`: (.*?)(?:;|\.\s)", rules):
        for module in re.findall(r"`(\w+)`", chain):
            assert (REPO / "thunderfs" / room / f"{module}.py").exists(), f"{room}.{module} named, no such module"
            checked += 1
    top = re.search(r"Top to bottom: (.*?); inside", rules).group(1)
    for module in re.findall(r"`(\w+)`", top):
        assert module in ROOMS or (REPO / "thunderfs" / f"{module}.py").exists(), f"room {module} named, none such"
        checked += 1
    assert checked > 30
