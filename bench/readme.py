"""README's performance table, made from what `make bench` wrote (bench/results.json).

python -m bench.readme RESULTS README: rewrites the part of README between the two markers
below, one table per benchmark, each headed by what it measured, when, and on which engine.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench import TABLE_HEADER, row

BEGIN = "<!-- bench:begin (made by `make bench` from bench/results.json; do not edit) -->"
END = "<!-- bench:end -->"
# The benchmarks in the order `make bench` runs them.
SECTIONS = ("data_tier", "pipeline", "backups", "postgres_failover", "security")


def tables(results: dict[str, Any]) -> str:
    parts = []
    for section in SECTIONS:
        if section not in results:
            continue
        bench = results[section]
        machine = bench["machine"]
        parts.append(
            f"**{bench['title']}** (`bench/{section}.py`, {bench['measured']}, {bench['engine']}, "
            f"{machine['cores']} cores, Linux {machine['kernel']})\n\n{TABLE_HEADER}\n"
            + "\n".join(row(result) for result in bench["figures"])
        )
    return "\n\n".join(parts)


def rewrite(readme: str, results: dict[str, Any]) -> str:
    """`readme` with the text between the markers replaced by the tables of `results`."""
    head, begin, rest = readme.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"README has no {BEGIN!r} ... {END!r} block")
    return f"{head}{BEGIN}\n{tables(results)}\n{END}{tail}"


def main(results_path: str, readme_path: str) -> None:
    with open(results_path) as source:
        results = json.load(source)
    with open(readme_path) as current:
        readme = current.read()
    with open(readme_path, "w") as out:
        out.write(rewrite(readme, results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
