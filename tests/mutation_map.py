"""The coverage map of `make mutate`: which tests run each line of the mutated sources.

It runs the given fast tests once, under coverage, with one coverage context per test: the
test's node id while it runs, its module's path while its fixtures are set up and torn down (a
module-scoped fixture serves every test of its module, not just the first). Lines run at import
time keep the empty context. tests/mutation_runner.py then runs, for a mutant inside a function,
only the tests that ran its statement.

Cached results would hide a line from every test after the first that needed it: the caches of
the test modules (`@cache def evaluated(stack)`) are cleared before each test, here only, so each
test is credited with every line its own result comes from.

Usage: python -m tests.mutation_map OUT.json TEST_FILES...
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import coverage
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MEASURED = ("components", "images")
OURS = ("tests", *MEASURED)


def clear_test_caches() -> None:
    """Empty every functools cache defined in the tests or the sources (found by file: pytest
    names a test module `test_program`, not `tests.test_program`)."""
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path is None or not any(pathlib.Path(path).resolve().is_relative_to(ROOT / top) for top in OURS):
            continue
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", None) == name:
                value.cache_clear()


class ContextPerTest:
    """A pytest plugin: the coverage context follows the test that runs."""

    def __init__(self, measurement: coverage.Coverage) -> None:
        self.measurement = measurement

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        clear_test_caches()
        self.measurement.switch_context(item.nodeid.split("::", 1)[0])
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        self.measurement.switch_context(item.nodeid)
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        self.measurement.switch_context(item.nodeid.split("::", 1)[0])
        yield


def contexts_by_line(data: Any, root: pathlib.Path) -> dict[str, dict[str, list[str]]]:
    """{source path from root: {line: sorted contexts}} of measured coverage data."""
    lines: dict[str, dict[str, list[str]]] = {}
    for filename in sorted(data.measured_files()):
        relative = pathlib.Path(filename).resolve().relative_to(root).as_posix()
        by_line = data.contexts_by_lineno(filename)
        lines[relative] = {str(number): sorted(by_line[number]) for number in sorted(by_line)}
    return lines


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out, tests = pathlib.Path(argv[1]), argv[2:]
    measurement = coverage.Coverage(data_file=None, source=[str(ROOT / top) for top in MEASURED])
    measurement.start()
    try:
        status = pytest.main(["-q", "-p", "no:cacheprovider", *tests], plugins=[ContextPerTest(measurement)])
    finally:
        measurement.stop()
    if status != 0:
        print(f"the tests failed unmutated (pytest exit {status}): no map written", file=sys.stderr)
        return 1
    out.write_text(json.dumps(contexts_by_line(measurement.get_data(), ROOT), sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
