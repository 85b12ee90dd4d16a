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

A run that takes longer than RUN_LIMIT_SECONDS, or `--limit SECONDS` (a mutant that makes a
test wait forever), ends with exit code 1.

With `--coverage MAP` (tests/mutation_map.py's), a mutant inside a function is narrower still:
only the tests that ran the mutated statement run, since a statement no test runs cannot
change a test's outcome. A mutant of a line run at import time (a constant, a default, a
decorator, a class body), or of a statement the map has no test for, meets every test above.

Usage: python -m tests.mutation_runner --pristine DIR [--coverage MAP] [--limit SECONDS] PYTEST_ARGS... TEST_FILES...
"""

from __future__ import annotations

import ast
import faulthandler
import json
import os
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


def changed_lines(text: str, pristine: str) -> list[int] | None:
    """The numbers (from 1) of the lines that differ, or None when lines were added or removed."""
    lines, pristine_lines = text.splitlines(), pristine.splitlines()
    if len(lines) != len(pristine_lines):
        return None
    return [number for number, (a, b) in enumerate(zip(lines, pristine_lines, strict=True), start=1) if a != b]


def statement_lines(source: str, line: int) -> range | None:
    """The lines of the innermost statement holding `line`, when that statement runs inside a
    function (its header alone, for a compound one); None when it runs at import time."""
    module = ast.parse(source)
    functions = [node for node in ast.walk(module) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not any(node.body[0].lineno <= line <= (node.body[-1].end_lineno or 0) for node in functions):
        return None
    holding = [
        node
        for node in ast.walk(module)
        if isinstance(node, ast.stmt) and node.lineno <= line <= (node.end_lineno or 0)
    ]
    innermost = min(holding, key=lambda node: (node.end_lineno or 0) - node.lineno)
    body = getattr(innermost, "body", None)
    if isinstance(body, list) and body and line < body[0].lineno:
        return range(innermost.lineno, body[0].lineno)
    return range(innermost.lineno, (innermost.end_lineno or 0) + 1)


def tests_that_ran(by_line: dict[str, list[str]], source: str, lines: list[int]) -> set[str] | None:
    """The coverage contexts (node ids, or module paths for fixtures) of the tests that ran the
    statements of `lines`; None when one runs at import time or no test ran it."""
    ran: set[str] = set()
    for line in lines:
        statement = statement_lines(source, line)
        if statement is None:
            return None
        contexts = {context for number in statement for context in by_line.get(str(number), [])}
        if not contexts or "" in contexts:
            return None
        ran |= contexts
    return ran


def narrowed(modules: list[str], ran: set[str] | None) -> list[str]:
    """Of `modules`, in their order, the tests in `ran`: a whole module when its fixtures ran
    the statement, else its node ids. All of `modules` when `ran` picks none of them."""
    if ran is None:
        return modules
    picked: list[str] = []
    for module in modules:
        picked += [module] if module in ran else sorted(test for test in ran if test.startswith(module + "::"))
    return picked or modules


def select(argv: list[str], tree: pathlib.Path) -> list[str]:
    """PYTEST_ARGS with TEST_FILES narrowed to the tests that can meet the mutant, when one is mutated."""
    if argv[:1] != ["--pristine"] or len(argv) < 2:
        return argv
    pristine, rest = pathlib.Path(argv[1]), argv[2:]
    coverage_map: dict[str, dict[str, list[str]]] | None = None
    if rest[:1] == ["--coverage"] and len(rest) >= 2:
        coverage_map = json.loads(pathlib.Path(rest[1]).read_text())
        rest = rest[2:]
    options = [arg for arg in rest if arg.startswith("-") or not arg.endswith(".py")]
    given = [arg for arg in rest if arg not in options]
    mutated = changed_file(tree, pristine)
    if mutated is None:
        return options + given
    # A test module outside the map (an end-to-end module, say) is always kept.
    mapped = {test for tests in TESTS_BY_SOURCE.values() for test in tests}
    relevant = [test for test in tests_for(mutated) if test in given]
    ran = None
    if coverage_map is not None and mutated in coverage_map:
        source = (pristine / mutated).read_text()
        lines = changed_lines((tree / mutated).read_text(), source)
        ran = tests_that_ran(coverage_map[mutated], source, lines) if lines else None
    return options + narrowed(relevant, ran) + [test for test in given if test not in mapped]


# A mutant that makes a test wait forever (a timeout turned to None, a loop that never ends)
# is killed after this long: mutmut's own limit is ten times its unmutated run, over ten
# minutes per such mutant. Every test given runs in about a minute here (2 cores, loaded).
RUN_LIMIT_SECONDS = 180


def run_limit(argv: list[str]) -> tuple[float, list[str]]:
    """`--limit SECONDS` (anywhere in the arguments: an end-to-end module needs longer), or
    RUN_LIMIT_SECONDS; and the arguments without it."""
    if "--limit" not in argv:
        return RUN_LIMIT_SECONDS, argv
    at = argv.index("--limit")
    return float(argv[at + 1]), argv[:at] + argv[at + 2 :]


def main(argv: list[str]) -> int:
    limit_seconds, argv = run_limit(argv)
    # faulthandler's watchdog is a C thread: it fires even while every Python thread is blocked,
    # prints where each one waits, and ends the process with exit code 1 (killed). It prints to
    # a copy of stderr, since pytest's capture takes fd 2 over while a test runs.
    with open(os.dup(sys.stderr.fileno()), "w") as stderr:
        faulthandler.dump_traceback_later(limit_seconds, exit=True, file=stderr)
        try:
            return 0 if pytest.main(select(argv, pathlib.Path.cwd())) == 0 else 1
        finally:
            faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
