"""The test command of `make mutate`: pytest, with every failure reported as exit code 1.

mutmut 2.5 counts a mutant as killed only when the tests exit 1 (`tests_pass` returns
`returncode != 1`). A mutant that breaks collection (an import that raises, exit 2), or
makes pytest itself fail (exit 3), would count as a survivor; this maps every non-zero
exit to 1.

Usage: python -m tests.mutation_runner PYTEST_ARGS...
"""

from __future__ import annotations

import sys

import pytest


def main(argv: list[str]) -> int:
    return 0 if pytest.main(argv) == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
