"""The survivor explanations: well-formed, and matched by file and line text."""

from __future__ import annotations

import json
import pathlib
import shutil
import sqlite3
import subprocess
import sys

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


SOURCE = '''LIMIT = 3


@decorated(LIMIT)
def f(x: int = LIMIT) -> int:
    """Doc."""
    if (
        x > LIMIT
    ):
        return call(
            x,
        )
    return x
'''


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (1, None),  # a module constant runs at import
        (4, None),  # a decorator too
        (5, None),  # and a default
        (7, range(7, 10)),  # a compound statement: its header alone
        (8, range(7, 10)),
        (11, range(10, 13)),  # a statement over several lines: all of them
        (13, range(13, 14)),
    ],
)
def test_a_mutated_line_is_traced_to_its_statement_or_to_import_time(line: int, expected: range | None) -> None:
    assert mutation_runner.statement_lines(SOURCE, line) == expected


def test_the_tests_that_ran_a_statement_are_all_its_lines_contexts_and_none_for_import_time() -> None:
    by_line = {"7": ["t.py::a"], "9": ["t.py::b", "u.py"], "10": ["t.py::c"], "13": [""]}
    assert mutation_runner.tests_that_ran(by_line, SOURCE, [8]) == {"t.py::a", "t.py::b", "u.py"}
    assert mutation_runner.tests_that_ran(by_line, SOURCE, [8, 11]) == {"t.py::a", "t.py::b", "u.py", "t.py::c"}
    assert mutation_runner.tests_that_ran(by_line, SOURCE, [13]) is None  # run while tests were collected
    assert mutation_runner.tests_that_ran(by_line, SOURCE, [1]) is None  # import time
    assert mutation_runner.tests_that_ran({}, SOURCE, [11]) is None  # no test ran it: nothing to narrow by


def test_narrowing_keeps_module_order_and_a_whole_module_whose_fixtures_ran_the_statement() -> None:
    modules = ["t.py", "u.py", "v.py"]
    assert mutation_runner.narrowed(modules, {"u.py", "u.py::x", "t.py::b", "t.py::a"}) == [
        "t.py::a",
        "t.py::b",
        "u.py",
    ]
    assert mutation_runner.narrowed(modules, None) == modules
    assert mutation_runner.narrowed(modules, {"w.py::other"}) == modules


def test_with_a_coverage_map_a_mutant_in_a_function_meets_only_the_tests_that_ran_it(tmp_path: pathlib.Path) -> None:
    pristine, tree = mutated_tree(tmp_path, None)
    relative = "components/render.py"
    lines = (pristine / relative).read_text().splitlines(keepends=True)
    body = next(number for number, line in enumerate(lines, start=1) if line.startswith("def _pg_size")) + 2
    lines[body - 1] = lines[body - 1].replace("\n", "  # mutated\n")
    (tree / relative).write_text("".join(lines))
    coverage_map = {relative: {str(body): ["tests/test_render.py::test_one", "tests/test_program.py"]}}
    (tmp_path / "map.json").write_text(json.dumps(coverage_map))
    given = ["tests/test_render.py", "tests/test_program.py", "tests/test_settings.py", "tests/e2e/test_x.py"]
    assert mutation_runner.select(
        ["--pristine", str(pristine), "--coverage", str(tmp_path / "map.json"), "-x", *given], tree
    ) == [
        "-x",
        "tests/test_render.py::test_one",
        "tests/test_program.py",
        "tests/e2e/test_x.py",
    ]
    # Its import-time line (the `def`) meets every test of the file.
    lines[body - 3] = lines[body - 3].replace("\n", "  # mutated\n")
    (tree / relative).write_text("".join(lines))
    assert mutation_runner.select(
        ["--pristine", str(pristine), "--coverage", str(tmp_path / "map.json"), *given], tree
    ) == [
        "tests/test_render.py",
        "tests/test_program.py",
        "tests/test_settings.py",
        "tests/e2e/test_x.py",
    ]


def test_the_map_credits_every_test_that_used_a_cached_evaluation_and_import_time_to_none(
    tmp_path: pathlib.Path,
) -> None:
    # Two tests of one module share `evaluated(stack)` through a cache; both ran the program.
    tests = [
        "tests/test_program.py::test_counts_and_docker_names[dev]",
        "tests/test_program.py::test_every_container_gets_the_hygiene[dev]",
    ]
    out = tmp_path / "map.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tests.mutation_map", str(out), *tests],
        cwd=mutation_score.EXPLANATIONS.parent.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    by_line = json.loads(out.read_text())["components/render.py"]
    source = (mutation_score.EXPLANATIONS.parent.parent / "components/render.py").read_text().splitlines()
    definition = next(number for number, line in enumerate(source, start=1) if line.startswith("def pg_hba_conf"))
    first = next(number for number in range(definition, len(source)) if "subnet =" in source[number - 1])
    assert set(by_line[str(first)]) == set(tests)
    assert by_line[str(definition)] == [""]  # the `def` ran at import


def mutmut_cache(directory: pathlib.Path, mutants: list[tuple[str, int, str, str]]) -> None:
    """A .mutmut-cache with the tables the score reads, holding (file, line number, line, status)."""
    directory.mkdir()
    with sqlite3.connect(directory / ".mutmut-cache") as db:
        db.execute("CREATE TABLE SourceFile (id INTEGER PRIMARY KEY, filename TEXT)")
        db.execute("CREATE TABLE Line (id INTEGER PRIMARY KEY, sourcefile INTEGER, line_number INTEGER, line TEXT)")
        db.execute("CREATE TABLE Mutant (id INTEGER PRIMARY KEY, line INTEGER, status TEXT)")
        for number, (filename, line_number, line, status) in enumerate(mutants, start=1):
            db.execute("INSERT INTO SourceFile VALUES (?, ?)", (number, filename))
            db.execute("INSERT INTO Line VALUES (?, ?, ?, ?)", (number, number, line_number, line))
            db.execute("INSERT INTO Mutant VALUES (?, ?, ?)", (number, number, status))


def test_a_shard_whose_unmutated_run_failed_is_named_and_fails_the_score(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutmut_cache(tmp_path / "shard-1", [])
    mutmut_cache(tmp_path / "shard-2", [("a.py", 0, "x = 1", "ok_killed"), ("a.py", 1, "y = 2", "bad_survived")])
    assert mutation_score.main(["score", str(tmp_path / "shard-1"), str(tmp_path / "shard-2")]) == 1
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'shard-1'}: no mutant yet, its unmutated test run failed or is still running" in printed
    assert "mutation score: 1/2 killed = 50.0% (0 untested)" in printed
    assert mutation_score.main(["score", str(tmp_path / "shard-2")]) == 0


def test_a_run_that_waits_forever_ends_killed_after_the_limit(tmp_path: pathlib.Path) -> None:
    # The wait is in C (a lock), where no Python-level timer could interrupt it.
    (tmp_path / "test_hang.py").write_text(
        "import threading\n\n\ndef test_hang():\n    lock = threading.Lock()\n    lock.acquire()\n    lock.acquire()\n"
    )
    args = ["-q", "--limit", "2", "-p", "no:cacheprovider", str(tmp_path / "test_hang.py")]
    code = f"import sys; from tests import mutation_runner; sys.exit(mutation_runner.main({args!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=pathlib.Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "Timeout (0:00:02)!" in done.stderr  # faulthandler's report of where it waited
    assert "in test_hang" in done.stderr


def test_the_run_limit_is_taken_out_of_the_arguments_and_defaults_to_the_runners_own() -> None:
    assert mutation_runner.run_limit(["--pristine", "p", "--limit", "900", "-x", "t.py"]) == (
        900.0,
        ["--pristine", "p", "-x", "t.py"],
    )
    assert mutation_runner.run_limit(["-x", "t.py"]) == (mutation_runner.RUN_LIMIT_SECONDS, ["-x", "t.py"])
