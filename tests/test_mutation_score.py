"""The survivor explanations: well-formed, and matched by file and line text."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from tests import mutation_runner, mutation_score


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


FAST = ["tests/test_settings.py", "tests/test_render.py", "tests/test_backend_api.py", "tests/test_jobs.py"]


def mutated_tree(tmp_path: pathlib.Path, relative: str | None) -> tuple[pathlib.Path, pathlib.Path]:
    """A pristine copy of the mutated sources and a tree with `relative` changed by one byte."""
    root = mutation_score.EXPLANATIONS.parent.parent
    pristine, tree = tmp_path / "pristine", tmp_path / "tree"
    for top in ("components", "images"):
        shutil.copytree(root / top, pristine / top)
        shutil.copytree(root / top, tree / top)
    if relative is not None:
        (tree / relative).write_text((tree / relative).read_text() + "\n")
    return pristine, tree


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        (None, FAST),  # mutmut's unmutated run: everything given
        ("components/settings.py", ["tests/test_settings.py", "tests/test_render.py"]),
        ("components/redis.py", ["tests/test_settings.py", "tests/test_render.py"]),
        ("images/backend/app/db.py", ["tests/test_backend_api.py"]),
        ("images/common/transvidio_jobs/runner.py", ["tests/test_jobs.py", "tests/test_backend_api.py"]),
        ("images/common/transvidio_jobs/queue.py", ["tests/test_backend_api.py"]),  # its own entry, first
    ],
)
def test_the_runner_runs_only_the_tests_that_import_the_mutated_file(
    tmp_path: pathlib.Path, relative: str | None, expected: list[str]
) -> None:
    pristine, tree = mutated_tree(tmp_path, relative)
    assert mutation_runner.select(["--pristine", str(pristine), "-x", "-p", "no:cacheprovider", *FAST], tree) == [
        "-x",
        "-p",
        "no:cacheprovider",
        *expected,
    ]


def test_the_runner_keeps_a_test_module_it_has_no_map_for(tmp_path: pathlib.Path) -> None:
    pristine, tree = mutated_tree(tmp_path, "components/render.py")
    given = ["tests/e2e/test_rendered_configs.py", "tests/test_render.py", "tests/test_jobs.py"]
    assert mutation_runner.select(["--pristine", str(pristine), *given], tree) == [
        "tests/test_render.py",
        "tests/e2e/test_rendered_configs.py",
    ]
