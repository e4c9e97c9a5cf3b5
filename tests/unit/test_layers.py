"""The map of docs/design.md holds: the import-linter contracts in pyproject.toml (rooms import
only rooms below them, type-checking imports included; pyfuse3 nowhere, the FUSE layer speaks
the kernel's protocol itself; nothing below the daemon reads the config; from the tracker the
daemon takes only its client; shared code owns nothing of either program), and every module of the
three packages is named by a contract."""

from __future__ import annotations

from pathlib import Path

from importlinter import configuration
from importlinter.application import use_cases

REPO = Path(__file__).resolve().parents[2]


def test_the_import_contracts_hold(capsys):
    configuration.configure()  # what the lint-imports command does, without its logging set-up
    passed = use_cases.lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True)
    out = capsys.readouterr().out
    assert passed, out
    assert "0 broken" in out


def _contracted() -> set[str]:
    """Every module a layers or independence contract names (``container.layer`` for each
    module of a layer, ``a | b`` and ``a : b`` alike)."""
    import tomllib
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    named: set[str] = set()
    for c in contracts:
        if c["type"] == "independence":
            named.update(c["modules"])
        elif c["type"] == "layers":
            items = {m.strip() for layer in c["layers"] for m in layer.replace(":", "|").split("|")}
            for container in c.get("containers", [""]):
                named.update(f"{container}.{m}" if container else m for m in items)
    return named


def test_every_module_is_under_a_contract():
    """No module of the three packages escapes the contracts: each is named in one (a module of
    a package whose own modules are ordered by a contract, not just the package)."""
    named = _contracted()
    missing = []
    for package in ("thunderfs", "thunderfs_tracker", "thunderfs_common"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            # Named itself, or a module of a room (a package) whose modules a contract orders.
            if module not in named:
                missing.append(module)
    assert not missing, f"modules no import contract names: {missing}"


def test_no_import_circles_in_the_whole_tree():
    """No module imports, through any chain, a module that imports it back: in the three
    packages and in the harness (the benchmarks and tests import the harness, nothing imports
    them).  Imports inside functions count too."""
    import grimp
    packages = ("thunderfs", "thunderfs_tracker", "thunderfs_common", "harness")
    graph = grimp.build_graph(*packages, cache_dir=None)
    ours = {m for m in graph.modules if m.split(".")[0] in packages}
    circles = []
    for module in sorted(ours):
        for imported in graph.find_modules_directly_imported_by(module) & ours:
            if imported != module and graph.chain_exists(importer=imported, imported=module):
                circles.append((module, imported))
    assert not circles, f"import circles: {circles[:5]}"
