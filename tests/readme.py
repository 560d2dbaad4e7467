"""The README's worked examples as test inputs ("Adding a task", "Adding a reward model"), so
that what the README shows is what the tests run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_block(first_line: str) -> str:
    """The one fenced block of the README whose first line starts with ``first_line``."""
    found = [m.group(1) for m in _FENCE.finditer(README.read_text()) if m.group(1).startswith(first_line)]
    assert len(found) == 1, f"README: {len(found)} blocks start with {first_line!r}"
    return found[0]


def readme_files(folder: Path, *names: str) -> list[Path]:
    """Write each README block that starts with ``# NAME`` (a path, e.g.
    ``experiments/locomotion/tasks/x.yaml``) under ``folder``; returns the paths."""
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(readme_block(f"# {name}"))
        paths.append(path)
    return paths


def readme_command(start: str) -> list[str]:
    """The words of the README's command line that starts with ``start`` (inside a block)."""
    lines = [line for m in _FENCE.finditer(README.read_text()) for line in m.group(1).splitlines()]
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, f"README: {len(found)} command lines start with {start!r}"
    return shlex.split(found[0])
