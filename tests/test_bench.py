"""The benchmark figures' shape: every figure is its runs with their median, min and max, and
README's performance tables are exactly what bench/readme.py makes of bench/results.json
(what `make bench` wrote), so a figure in README can be traced to its runs."""

from __future__ import annotations

import json
import pathlib
import statistics
from typing import Any

import pytest

import bench
from bench import readme

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = json.loads((ROOT / "bench" / "results.json").read_text())


def all_figures() -> list[tuple[str, dict[str, Any]]]:
    return [(section, result) for section, data in RESULTS.items() for result in data["figures"]]


def test_a_figure_is_the_median_min_and_max_of_its_runs() -> None:
    result = bench.figure("failover", "s", [3.14159, 1.0, 2.5, 9.75, 2.0], digits=1)
    assert result == {
        "name": "failover",
        "unit": "s",
        "median": 2.5,
        "min": 1.0,
        "max": 9.8,
        "runs": [3.1, 1.0, 2.5, 9.8, 2.0],
        "digits": 1,
    }
    assert bench.figure("job", "s", [4.0, 2.0, 3.0, 1.0], min_runs=3)["median"] == 2.5


def test_a_figure_of_too_few_runs_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"^failover: 4 runs, a figure needs at least 5$"):
        bench.figure("failover", "s", [1, 2, 3, 4])


def test_bench_runs_never_goes_below_what_a_figure_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_RUNS", raising=False)
    assert bench.runs_setting(10) == 10
    monkeypatch.setenv("BENCH_RUNS", "2")
    assert bench.runs_setting(10) == bench.MIN_RUNS
    assert bench.runs_setting(3, least=bench.MIN_RUNS_LONG) == bench.MIN_RUNS_LONG
    monkeypatch.setenv("BENCH_RUNS", "7")
    assert bench.runs_setting(10) == 7


def test_every_recorded_figure_has_its_runs_and_their_median() -> None:
    assert RESULTS, "bench/results.json holds no benchmark"
    for section, result in all_figures():
        runs = result["runs"]
        where = f"{section}: {result['name']}"
        # Only the MPI job's figures (minutes per run) may have three; every other five or more.
        mpi_job = section == "pipeline" and ("MPI" in result["name"] or "speed-up" in result["name"])
        assert len(runs) >= (bench.MIN_RUNS_LONG if mpi_job else bench.MIN_RUNS), where
        assert result["median"] == round(statistics.median(runs), result["digits"]), where
        assert (result["min"], result["max"]) == (min(runs), max(runs)), where


def test_every_benchmark_says_when_and_on_what_it_was_measured() -> None:
    for section, data in RESULTS.items():
        assert section in readme.SECTIONS
        assert data["measured"][:4].isdigit() and data["engine"].split()[0] in ("Docker", "Podman"), section
        assert data["machine"]["cores"] >= 1


def test_readmes_performance_tables_are_made_from_the_results() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split(readme.BEGIN, 1)[1].split(readme.END, 1)[0]
    assert block == f"\n{readme.tables(RESULTS)}\n"
    for _, result in all_figures():
        assert bench.row(result) in block


def test_rewriting_readme_replaces_only_the_block() -> None:
    before = f"intro\n{readme.BEGIN}\nold table\n{readme.END}\nafter\n"
    rewritten = readme.rewrite(before, RESULTS)
    assert rewritten.startswith(f"intro\n{readme.BEGIN}\n") and rewritten.endswith(f"{readme.END}\nafter\n")
    assert "old table" not in rewritten
    with pytest.raises(ValueError, match=r"no .* block"):
        readme.rewrite("no markers here", RESULTS)


def test_a_row_shows_the_median_the_spread_and_every_run() -> None:
    row = bench.row(bench.figure("kill", "s", [1.8, 1.75, 2.1, 1.9, 1.7]))
    assert row == "| kill | 1.8 s | 1.7 s | 2.1 s | 5: 1.8, 1.75, 2.1, 1.9, 1.7 |"
