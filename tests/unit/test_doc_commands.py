"""The commands the docs give next to their figures still run: every script they name exists, and
every option they pass it is one the script declares.  A renamed option or a removed benchmark
would otherwise leave a figure whose command no longer prints it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT_DIRS = ("benchmarks", "scripts", "harness")

# A script named with or without its directory, then the rest of its command line: up to the end
# of the line, a closing backtick, or a shell comment, pipe or bracket.
COMMAND = re.compile(r"(?<![\w/.-])(?:(benchmarks|scripts|harness)/)?([A-Za-z0-9_]+\.(?:py|sh))\b([^`\n#|)]*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def commands(text: str):
    """(directory or None, script name, its options) for every script the text names: in a code
    block a command per line (a backslash continues it), in prose a command inside backticks is
    taken whole across its lines."""
    for i, part in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        part = re.sub(r"\\\n\s*", " ", part)
        if i % 2 == 0:  # prose, between code blocks
            part = re.sub(r"`[^`]*`", lambda m: m.group(0).replace("\n", " "), part)
        for m in COMMAND.finditer(part):
            yield m.group(1), m.group(2), OPTION.findall(m.group(3))


def candidates(directory: str | None, name: str) -> list[Path]:
    dirs = (directory,) if directory else SCRIPT_DIRS
    return [p for d in dirs if (p := ROOT / d / name).is_file()]


def declares(script: Path, option: str) -> bool:
    source = script.read_text()
    if script.suffix == ".sh":
        return option in source
    return f'"{option}"' in source or f"'{option}'" in source


def test_every_script_the_docs_name_exists_and_takes_the_options_they_give():
    problems, seen = [], 0
    for doc in DOCS:
        for directory, name, options in commands(doc.read_text()):
            found = candidates(directory, name)
            if not found:
                if directory:  # a path to a script that is not there
                    problems.append(f"{doc.relative_to(ROOT)}: {directory}/{name} does not exist")
                continue  # a module of the package named in prose (keeper.py), not a command
            seen += 1
            for option in options:
                if option != "--help" and not any(declares(s, option) for s in found):
                    problems.append(f"{doc.relative_to(ROOT)}: {name} has no option {option}")
    assert seen > 40, f"only {seen} commands found in the docs: the pattern no longer matches them"
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_option_a_script_does_not_take():
    text = "`.venv/bin/python benchmarks/boot_bench.py --runs 3\n    --no-such-option`"
    [(directory, name, options)] = list(commands(text))
    assert (directory, name, options) == ("benchmarks", "boot_bench.py", ["--runs", "--no-such-option"])
    [script] = candidates(directory, name)
    assert declares(script, "--runs") and not declares(script, "--no-such-option")
