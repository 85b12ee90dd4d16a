"""The survivor explanations: well-formed, and matched by file and line text."""

from __future__ import annotations

import pytest

from tests import mutation_score


def test_the_committed_explanations_are_well_formed_and_name_existing_files() -> None:
    explanations = mutation_score.load_explanations(mutation_score.EXPLANATIONS.read_text())
    assert explanations
    root = mutation_score.EXPLANATIONS.parent.parent
    missing = sorted({e.filename for e in explanations if not (root / e.filename).is_file()})
    assert missing == []
    # Each explained line still exists: an explanation of code that is gone is stale.
    stale = [
        (e.filename, e.line_start)
        for e in explanations
        if not any(line.strip().startswith(e.line_start) for line in (root / e.filename).read_text().splitlines())
    ]
    assert stale == []


def test_a_survivor_is_matched_by_file_and_the_start_of_its_line() -> None:
    explanations = mutation_score.load_explanations("a.py | x = 1 | why\n# comment\n\nb.py | y | other\n")
    assert mutation_score.reason_for(explanations, "a.py", "    x = 1  # tuning") == "why"
    assert mutation_score.reason_for(explanations, "b.py", "x = 1") is None
    assert mutation_score.reason_for(explanations, "a.py", "y") is None


def test_a_malformed_explanation_is_refused_naming_its_line() -> None:
    with pytest.raises(ValueError, match=r"mutation_survivors.txt:2: expected `file \| line start \| reason`"):
        mutation_score.load_explanations("a.py | x | why\na.py | x\n")
