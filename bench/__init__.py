"""Benchmarks (`make bench`): figures with their spread, never asserts.

Every figure is measured several times and reported with its runs: the median, the smallest
and the largest, and every run. `record` prints a benchmark's figures as table rows and, with
BENCH_JSON=path, writes them to that file under the benchmark's section with the date, the
engine and the machine; `bench/readme.py` makes README's performance table from that file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

# The benchmarks drive the stack with the e2e suite's own helpers, which import the job
# pipeline the images ship: the same import paths as for the tests.
import tests.conftest  # noqa: F401

# The least runs a figure is the median of; the MPI job runs for minutes, so three.
MIN_RUNS = 5
MIN_RUNS_LONG = 3


def runs_setting(default: int, least: int = MIN_RUNS) -> int:
    """BENCH_RUNS when set (never below `least`, what a figure needs), else `default`."""
    return max(int(os.environ.get("BENCH_RUNS", default)), least)


def figure(name: str, unit: str, runs: Sequence[float], digits: int = 2, min_runs: int = MIN_RUNS) -> dict[str, Any]:
    """A figure from its runs: median, min, max and the runs themselves, in `unit`, each
    rounded to `digits` decimals."""
    if len(runs) < min_runs:
        raise ValueError(f"{name}: {len(runs)} runs, a figure needs at least {min_runs}")
    values = [round(float(run), digits) for run in runs]
    return {
        "name": name,
        "unit": unit,
        "median": round(statistics.median(values), digits),
        "min": min(values),
        "max": max(values),
        "runs": values,
        "digits": digits,
    }


def engine_name() -> str:
    """The engine the figures were measured on, as it names itself."""
    import docker

    version = docker.from_env().version()
    names = [c.get("Name", "") for c in version.get("Components", [])]
    product = "Podman" if any("Podman" in n for n in names) else "Docker"
    return f"{product} {version.get('Version', '?')}"


def row(result: dict[str, Any]) -> str:
    """A figure as a markdown table row: figure, median, min, max, runs."""
    unit = f" {result['unit']}" if result["unit"] else ""
    runs = ", ".join(f"{run:g}" for run in result["runs"])
    return (
        f"| {result['name']} | {result['median']:g}{unit} | {result['min']:g}{unit} | {result['max']:g}{unit} "
        f"| {len(result['runs'])}: {runs} |"
    )


TABLE_HEADER = "| figure | median | min | max | runs |\n|---|---|---|---|---|"


def record(section: str, title: str, figures: list[dict[str, Any]]) -> None:
    """Prints the figures as a table; with BENCH_JSON=path, stores them there under `section`
    (replacing what an earlier run of the same benchmark wrote, keeping the others)."""
    print(f"\n{title}\n{TABLE_HEADER}")
    for result in figures:
        print(row(result))
    path = os.environ.get("BENCH_JSON")
    if not path:
        return
    existing: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as previous:
            existing = json.load(previous)
    existing[section] = {
        "title": title,
        "measured": datetime.date.today().isoformat(),
        "engine": engine_name(),
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "figures": figures,
    }
    with open(path, "w") as out:
        json.dump(existing, out, indent=2, sort_keys=True)
        out.write("\n")
