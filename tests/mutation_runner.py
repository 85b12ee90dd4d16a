"""The test command of `make mutate`: the fast tests that can reach the mutated file, with every
failure reported as exit code 1.

mutmut 2.5 counts a mutant as killed only when the tests exit 1 (`tests_pass` returns
`returncode != 1`). A mutant that breaks collection (an import that raises, exit 2), or
makes pytest itself fail (exit 3), would count as a survivor; this maps every non-zero
exit to 1.

mutmut writes each mutant into the tree it runs in and tells the tests nothing of it; the
mutated file is the one that differs from the pristine copy (`--pristine DIR`). Only the test
modules that import that file's package run, the likeliest killer first: a backend mutant
costs the backend's tests, not the Pulumi program's. A test module the map does not name (an
end-to-end module) always runs. With no file changed (mutmut's first, unmutated run) every
test given runs.

Usage: python -m tests.mutation_runner --pristine DIR PYTEST_ARGS... TEST_FILES...
"""

from __future__ import annotations

import pathlib
import sys

import pytest

# Source tree -> the test modules that import it, in the order most likely to fail first.
TESTS_BY_SOURCE: dict[str, tuple[str, ...]] = {
    "components/render.py": (
        "tests/test_render.py",
        "tests/test_program.py",
        "tests/test_settings.py",
        "tests/test_swarm.py",
    ),
    "components/settings.py": (
        "tests/test_settings.py",
        "tests/test_render.py",
        "tests/test_program.py",
        "tests/test_swarm.py",
    ),
    "components/topology.py": (
        "tests/test_render.py",
        "tests/test_program.py",
        "tests/test_settings.py",
        "tests/test_swarm.py",
    ),
    "components/swarm.py": ("tests/test_swarm.py", "tests/test_program.py"),
    "components/": ("tests/test_program.py", "tests/test_swarm.py", "tests/test_settings.py", "tests/test_render.py"),
    "images/backend/app/": ("tests/test_backend_api.py", "tests/test_backend_routing.py", "tests/test_backend_db.py"),
    "images/common/transvidio_jobs/queue.py": (
        "tests/test_queue.py",
        "tests/test_worker.py",
        "tests/test_backend_api.py",
    ),
    "images/common/transvidio_jobs/": (
        "tests/test_worker.py",
        "tests/test_jobs.py",
        "tests/test_backend_routing.py",
        "tests/test_backend_api.py",
    ),
}


def changed_file(tree: pathlib.Path, pristine: pathlib.Path) -> str | None:
    """The one source file under TESTS_BY_SOURCE whose text differs from the pristine copy."""
    tops = sorted({prefix if prefix.endswith("/") else prefix.rsplit("/", 1)[0] + "/" for prefix in TESTS_BY_SOURCE})
    for top in tops:
        for path in sorted((tree / top).rglob("*.py")):
            relative = path.relative_to(tree).as_posix()
            if path.read_bytes() != (pristine / relative).read_bytes():
                return relative
    return None


def tests_for(relative: str) -> tuple[str, ...]:
    """The tests of the most specific TESTS_BY_SOURCE entry that `relative` falls under."""
    for prefix, tests in sorted(TESTS_BY_SOURCE.items(), key=lambda item: -len(item[0])):
        if relative == prefix or (prefix.endswith("/") and relative.startswith(prefix)):
            return tests
    raise LookupError(f"{relative}: no tests are mapped to it in TESTS_BY_SOURCE")


def select(argv: list[str], tree: pathlib.Path) -> list[str]:
    """PYTEST_ARGS with TEST_FILES narrowed to the mutated file's tests, when one is mutated."""
    if argv[:1] != ["--pristine"] or len(argv) < 2:
        return argv
    pristine, rest = pathlib.Path(argv[1]), argv[2:]
    options = [arg for arg in rest if arg.startswith("-") or not arg.endswith(".py")]
    given = [arg for arg in rest if arg not in options]
    mutated = changed_file(tree, pristine)
    if mutated is None:
        return options + given
    # A test module outside the map (an end-to-end module, say) is always kept.
    mapped = {test for tests in TESTS_BY_SOURCE.values() for test in tests}
    relevant = [test for test in tests_for(mutated) if test in given]
    return options + relevant + [test for test in given if test not in mapped]


def main(argv: list[str]) -> int:
    return 0 if pytest.main(select(argv, pathlib.Path.cwd())) == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
