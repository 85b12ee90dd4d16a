"""Benchmarks (`make bench`): figures with their spread, never asserts."""

from __future__ import annotations

import json
import os
from typing import Any

# The benchmarks drive the stack with the e2e suite's own helpers, which import the job
# pipeline the images ship: the same import paths as for the tests.
import tests.conftest  # noqa: F401


def add_to_bench_json(section: str, figures: dict[str, Any]) -> None:
    """With BENCH_JSON=path, adds `figures` under `section` to what earlier benchmarks wrote."""
    path = os.environ.get("BENCH_JSON")
    if not path:
        return
    existing = {}
    if os.path.exists(path):
        with open(path) as previous:
            existing = json.load(previous)
    with open(path, "w") as out:
        json.dump({**existing, section: figures}, out, indent=2, sort_keys=True)
