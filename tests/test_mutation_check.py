"""``scripts/mutation_check.py`` follows the code: every mutation's text occurs exactly once in its file, so the
script applies them all (it went stale twice when refactors moved the text; running it takes minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import mutation_check  # noqa: E402


@pytest.mark.parametrize("name", sorted(mutation_check.MUTATIONS))
def test_every_mutation_still_applies(name):
    path, old, new, tests, _ = mutation_check.MUTATIONS[name]
    assert (REPO / path).read_text().count(old) == 1, f"{name}: update MUTATIONS to the current {path}"
    assert old != new
    for test in tests:
        assert (REPO / test.split("::")[0]).is_file(), test
