"""The README as a document: no draft placeholder left where a measured figure belongs."""

from __future__ import annotations

import re

from tests.readme import _FENCE, README

# A line that is one upper-case identifier (``SOME_ROW``) is a drafting placeholder that
# was meant to be replaced by a table row or a figure; code blocks are left out.
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")


def placeholders(text: str) -> list[str]:
    prose = _FENCE.sub("", text)
    return [line for line in prose.splitlines() if _PLACEHOLDER.match(line.strip())]


def test_the_placeholder_finder_finds_a_placeholder_and_nothing_else():
    text = "| a | b |\nABLATION_ROW\nsome TEXT_HERE in prose\n```\nCODE_LINE\n```\nOMP_NUM_THREADS=1 x\n"
    assert placeholders(text) == ["ABLATION_ROW"]


def test_the_readme_has_no_placeholder_left():
    assert placeholders(README.read_text()) == []
